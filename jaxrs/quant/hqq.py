"""HQQ (half-quadratic quantization): group-wise affine 4/8-bit with zero points fitted by a
proximal solver, no calibration data.

For each group of 64 weights, q = round(w / scale + zero) clipped to [0, 2^bits - 1] and
w ~ (q - zero) * scale. The scale comes from the group's min/max; the zero is then refined by HQQ's
half-quadratic iterations (`optimize_weights_proximal`): the error e = w - w_hat is passed through a
shrinkage operator for an lp-norm with p < 1 (so a few outlier weights are allowed a large error
instead of dragging every other weight's error up), and the zero is re-solved in closed form against
w - e. Each group keeps the iterate with the lowest mean absolute error. Finally, per group, whichever
of the fitted zero and plain min/max round-to-nearest gives the lower squared error (with the f16
scale and zero actually stored) is kept, so HQQ never does worse than round-to-nearest.
"""

from __future__ import annotations

import numpy as np

from jaxrs.quant.packing import pack_nibble_halves

F32 = np.float32
GROUP = 64


def _shrink_lp(x: np.ndarray, beta: float, p: float) -> np.ndarray:
    """Proximal operator of the lp "norm" (p < 1): soft threshold that spares large entries."""
    ax = np.abs(x)
    return np.sign(x) * np.maximum(ax - (F32(1) / F32(beta)) * np.power(ax + F32(1e-8), F32(p - 1)), 0)


def optimize_zero(
    g: np.ndarray,
    inv_scale: np.ndarray,
    zero: np.ndarray,
    qmax: int,
    *,
    iters: int = 20,
    lp_norm: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
) -> np.ndarray:
    """HQQ's zero-point solver for groups `g` `[N, G]` with fixed `inv_scale` `[N]`; returns the zero."""
    inv = inv_scale[:, None]
    best_zero = zero.copy()
    best_err = np.full(zero.shape, np.inf, F32)
    active = np.ones(zero.shape, bool)
    for _ in range(iters):
        z = zero[:, None]
        q = np.clip(np.rint(g * inv + z), 0, qmax)
        recon = (q - z) / inv
        err = np.abs(g - recon).mean(axis=-1, dtype=F32)
        improved = active & (err < best_err)
        best_err = np.where(improved, err, best_err)
        best_zero = np.where(improved, zero, best_zero)
        active = improved  # a group stops at its first non-improving step, as HQQ does
        if not active.any():
            break
        e = _shrink_lp(g - recon, beta, lp_norm)
        new_zero = np.mean(q - (g - e) * inv, axis=-1, dtype=F32)
        zero = np.where(active, new_zero, zero)
        beta *= kappa
    return best_zero


def _codes(g: np.ndarray, scale: np.ndarray, zero: np.ndarray, qmax: int) -> np.ndarray:
    safe = np.where(scale == 0, F32(1), scale)[:, None]
    return np.clip(np.rint(g / safe + zero[:, None]), 0, qmax)


def _sq_err(g, q, scale, zero) -> np.ndarray:
    return np.square((q - zero[:, None]) * scale[:, None] - g).sum(axis=-1, dtype=F32)


def rtn_params(g: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Plain min/max affine parameters (f16 scale and zero) for groups `g` `[N, G]`."""
    mn, mx = g.min(axis=-1), g.max(axis=-1)
    span = mx - mn
    flat = span == 0
    scale = np.where(flat, mn, span / F32(qmax)).astype(np.float16)  # flat group: q = 0, zero = -1
    s32 = scale.astype(F32)
    zero = np.where(flat, F32(-1), -mn / np.where(s32 == 0, F32(1), s32)).astype(np.float16)
    return scale, zero


def quantize_hqq(w: np.ndarray, bits: int, *, iters: int = 20) -> dict[str, np.ndarray]:
    """`w` f32 `[..., in]` (in a multiple of 64) -> HQQ4 / HQQ8 arrays (`qs`, `scale`, `zero`)."""
    lead = w.shape[:-1]
    g = w.astype(F32).reshape(-1, GROUP)
    qmax = (1 << bits) - 1
    rtn_scale, rtn_zero = rtn_params(g, qmax)

    mn, mx = g.min(axis=-1), g.max(axis=-1)
    span = mx - mn
    inv = np.minimum(F32(qmax) / np.where(span > 0, span, F32(1)), F32(2e4))  # HQQ's clamp
    zero = optimize_zero(g, inv, -mn * inv, qmax, iters=iters)
    hqq_scale = (F32(1) / inv).astype(np.float16)
    hqq_zero = zero.astype(np.float16)

    candidates = []
    for scale, zero16 in ((hqq_scale, hqq_zero), (rtn_scale, rtn_zero)):
        s, z = scale.astype(F32), zero16.astype(F32)
        q = _codes(g, s, z, qmax)
        candidates.append((scale, zero16, q, _sq_err(g, q, s, z)))
    (s_h, z_h, q_h, e_h), (s_r, z_r, q_r, e_r) = candidates
    use_hqq = (e_h <= e_r) & np.isfinite(z_h.astype(F32))
    scale = np.where(use_hqq, s_h, s_r)
    zero = np.where(use_hqq, z_h, z_r)
    q = np.where(use_hqq[:, None], q_h, q_r).astype(np.uint8).reshape(*lead, -1)
    if bits == 4:
        q = pack_nibble_halves(q, GROUP)
    return {"qs": q, "scale": scale.reshape(*lead, -1), "zero": zero.reshape(*lead, -1)}
