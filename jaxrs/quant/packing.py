"""NumPy bit packing shared by the quantizers and the GGUF codec (integer codes <-> packed bytes).

Codes are per-element unsigned integers `[..., I]` in natural element order; see `formats` for where
each element's bits land.
"""

from __future__ import annotations

import numpy as np


def pack_nibble_halves(q: np.ndarray, unit: int) -> np.ndarray:
    """4-bit codes -> bytes: in each `unit` of elements, byte l = element l | element l + unit/2 << 4."""
    q = q.astype(np.uint8).reshape(*q.shape[:-1], -1, 2, unit // 2)
    return (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(*q.shape[:-3], -1)


def unpack_nibble_halves(qs: np.ndarray, unit: int) -> np.ndarray:
    """Inverse of `pack_nibble_halves`: bytes `[..., I/2]` -> 4-bit codes `[..., I]` (u8)."""
    qs = qs.reshape(*qs.shape[:-1], -1, unit // 2)
    return np.concatenate([qs & 0xF, qs >> 4], axis=-1).reshape(*qs.shape[:-2], -1)


def pack_bits_u32(bits: np.ndarray) -> np.ndarray:
    """Bits `[..., I]` -> u32 `[..., I/32]` with bit j of word b = element 32b + j (Q5_0/Q5_1 qh)."""
    bits = bits.astype(np.uint32).reshape(*bits.shape[:-1], -1, 32)
    return np.bitwise_or.reduce(bits << np.arange(32, dtype=np.uint32), axis=-1)


def unpack_bits_u32(words: np.ndarray) -> np.ndarray:
    """Inverse of `pack_bits_u32`: u32 `[..., I/32]` -> bits `[..., I]` (u8)."""
    bits = (words[..., None] >> np.arange(32, dtype=np.uint32)) & 1
    return bits.astype(np.uint8).reshape(*words.shape[:-1], -1)


def pack_bit_planes(bits: np.ndarray) -> np.ndarray:
    """Bits `[..., I]` -> bytes `[..., I/8]`: per 256, byte l bit b = element 32b + l (Q3_K/Q5_K)."""
    bits = bits.astype(np.uint8).reshape(*bits.shape[:-1], -1, 8, 32)
    out = np.bitwise_or.reduce(bits << np.arange(8, dtype=np.uint8)[:, None], axis=-2)
    return out.reshape(*bits.shape[:-3], -1)


def unpack_bit_planes(packed: np.ndarray) -> np.ndarray:
    """Inverse of `pack_bit_planes`: bytes `[..., I/8]` -> bits `[..., I]` (u8)."""
    planes = packed.reshape(*packed.shape[:-1], -1, 1, 32) >> np.arange(8, dtype=np.uint8)[:, None]
    return (planes & 1).reshape(*packed.shape[:-1], -1)


def pack_crumbs(q: np.ndarray) -> np.ndarray:
    """2-bit codes -> bytes `[..., I/4]`: per 128 elements, byte l bits 2j = element 32j + l."""
    q = q.astype(np.uint8).reshape(*q.shape[:-1], -1, 4, 32)
    out = np.bitwise_or.reduce(q << (2 * np.arange(4, dtype=np.uint8))[:, None], axis=-2)
    return out.reshape(*q.shape[:-3], -1)


def pack_q6k(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """6-bit codes `[..., I]` -> (ql `[..., I/2]`, qh `[..., I/4]`) in Q6_K's order."""
    q = q.astype(np.uint8)
    lead = q.shape[:-1]
    lo = (q & 0xF).reshape(*lead, -1, 2, 2, 2, 32)  # (superblock, n, nibble, k, l)
    ql = (lo[..., 0, :, :] | (lo[..., 1, :, :] << 4)).reshape(*lead, -1)
    qh = pack_crumbs(q >> 4)
    return ql, qh


# ---- GGUF's 12-byte packing of 6-bit scales ----


def unpack_scales_q3k(packed: np.ndarray) -> np.ndarray:
    """Q3_K's 12 bytes `[..., 12]` -> 16 signed scales `[..., 16]` (i8, 32 subtracted)."""
    low = packed[..., :8]
    high = packed[..., 8:12]
    j = np.arange(16)
    low4 = np.where(j < 8, low[..., j % 8] & 0xF, low[..., j % 8] >> 4)
    high2 = (high[..., j % 4] >> (2 * (j // 4)).astype(np.uint8)) & 3
    return ((low4 | (high2 << 4)).astype(np.int16) - 32).astype(np.int8)


def pack_scales_q3k(sc: np.ndarray) -> np.ndarray:
    """Inverse of `unpack_scales_q3k`: 16 scales in [-32, 31] -> 12 bytes."""
    l6 = (sc.astype(np.int16) + 32).astype(np.uint8).reshape(*sc.shape[:-1], 2, 8)
    low = (l6[..., 0, :] & 0xF) | ((l6[..., 1, :] & 0xF) << 4)  # byte j: scale j | scale j+8 << 4
    hi2 = (l6 >> 4).reshape(*sc.shape[:-1], 4, 4)  # [.., j//4, j%4]
    high = np.bitwise_or.reduce(hi2 << (2 * np.arange(4, dtype=np.uint8))[:, None], axis=-2)
    return np.concatenate([low, high], axis=-1)


def unpack_scales_k4(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes `[..., 12]` -> (scales `[..., 8]`, mins `[..., 8]`), 6-bit each, u8."""
    d, m, md = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def pack_scales_k4(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Inverse of `unpack_scales_k4` (values in [0, 63])."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    d = sc[..., :4] | ((sc[..., 4:] >> 4) << 6)
    m = mn[..., :4] | ((mn[..., 4:] >> 4) << 6)
    md = (sc[..., 4:] & 0xF) | ((mn[..., 4:] & 0xF) << 4)
    return np.concatenate([d, m, md], axis=-1)
