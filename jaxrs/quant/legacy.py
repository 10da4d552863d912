"""Quantizers for the 32-element block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, U8M and Q8F).

Same arithmetic as ggml's `quantize_row_q*_ref` (and `gguf.quants`), in f32, so the bytes match. U8M
(no ggml counterpart) is Q4_1's scheme with 255 levels and f32 scale and min; Q8F is Q8_0 (same codes,
same half-precision scale) with the scale held in f32.
"""

from __future__ import annotations

import numpy as np

from jaxrs.quant import packing

F32 = np.float32


def _round_away(x: np.ndarray) -> np.ndarray:
    """C's roundf: halves away from zero."""
    a = np.abs(x)
    floored = np.floor(a)
    return np.sign(x) * (floored + np.floor(2 * (a - floored)))


def _safe_inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, F32(0), F32(1) / d).astype(F32)


def _signed_max(blocks: np.ndarray) -> np.ndarray:
    """The value of largest magnitude in each block (first one on ties), keeping its sign."""
    return np.take_along_axis(blocks, np.abs(blocks).argmax(axis=-1)[..., None], axis=-1)


def quantize_legacy(w: np.ndarray, fmt: str) -> dict[str, np.ndarray]:
    """`w` f32 `[..., in]` -> the arrays of `fmt` (see `formats`)."""
    lead = w.shape[:-1]
    blocks = w.astype(F32).reshape(*lead, -1, 32)
    if fmt in ("Q8_0", "Q8F"):
        d = np.abs(blocks).max(axis=-1, keepdims=True) / F32(127)
        qs = _round_away(blocks * _safe_inverse(d)).astype(np.int8)
        half = d[..., 0].astype(np.float16)
        return {"qs": qs.reshape(*lead, -1), "d": half if fmt == "Q8_0" else half.astype(F32)}
    if fmt in ("Q4_0", "Q5_0"):
        half = 8 if fmt == "Q4_0" else 16
        d = _signed_max(blocks) / F32(-half)
        q = np.trunc(blocks * _safe_inverse(d) + F32(half + 0.5)).astype(np.uint8).clip(0, 2 * half - 1)
        out = {"d": d[..., 0].astype(np.float16)}
    else:  # Q4_1, Q5_1, U8M
        levels = {"Q4_1": 15, "Q5_1": 31, "U8M": 255}[fmt]
        mx = blocks.max(axis=-1, keepdims=True)
        mn = blocks.min(axis=-1, keepdims=True)
        d = (mx - mn) / F32(levels)
        q = np.trunc((blocks - mn) * _safe_inverse(d) + F32(0.5)).clip(0, levels).astype(np.uint8)
        if fmt == "U8M":
            return {"qs": q.reshape(*lead, -1), "d": d[..., 0], "m": mn[..., 0]}
        out = {"d": d[..., 0].astype(np.float16), "m": mn[..., 0].astype(np.float16)}
    q = q.reshape(*lead, -1)
    out["qs"] = packing.pack_nibble_halves(q & 0xF, 32)
    if fmt in ("Q5_0", "Q5_1"):
        out["qh"] = packing.pack_bits_u32(q >> 4)
    return out
