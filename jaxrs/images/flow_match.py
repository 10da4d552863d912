"""The flow-match Euler sampler (diffusers' `FlowMatchEulerDiscreteScheduler` as FLUX uses it): the noise
levels (sigmas) of each step, shifted by image size for FLUX.1-dev, and the Euler update."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """`scheduler/scheduler_config.json`: schnell uses a fixed shift of 1, dev a shift that grows with
    the number of image tokens (`use_dynamic_shifting`)."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15

    @classmethod
    def from_dict(cls, raw: dict) -> SchedulerConfig:
        for option in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas"):
            if raw.get(option):
                raise ValueError(f"scheduler option {option} is not supported")
        if raw.get("shift_terminal") or raw.get("time_shift_type", "exponential") != "exponential":
            raise ValueError("only the exponential time shift without a terminal stretch is supported")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})


def image_shift(seq_len: int, cfg: SchedulerConfig) -> float:
    """mu: linear in the number of packed image tokens, base_shift at base length, max_shift at max."""
    slope = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    return seq_len * slope + cfg.base_shift - slope * cfg.base_image_seq_len


def sigmas(num_steps: int, seq_len: int, cfg: SchedulerConfig) -> np.ndarray:
    """`[num_steps + 1]` noise levels from 1 down to 0 (f32, the final 0 appended)."""
    s = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    if cfg.use_dynamic_shifting:
        mu = image_shift(seq_len, cfg)
        s = math.exp(mu) / (math.exp(mu) + (1 / s - 1) ** 1.0)
    else:
        s = cfg.shift * s / (1 + (cfg.shift - 1) * s)
    return np.append(s.astype(np.float32), np.float32(0.0))


def euler_step(latents: jax.Array, velocity: jax.Array, sigma: jax.Array, sigma_next: jax.Array) -> jax.Array:
    """One Euler step along the predicted velocity, in f32, back in the latents' dtype."""
    out = latents.astype(jnp.float32) + (sigma_next - sigma) * velocity.astype(jnp.float32)
    return out.astype(latents.dtype)
