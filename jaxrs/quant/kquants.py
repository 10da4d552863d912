"""K-quant quantizers (Q2_K..Q6_K, Q8_K): ggml's reference search, vectorized over all sub-blocks.

Follows `quantize_row_q*_K_ref` and its helpers (`make_qkx2_quants` for the formats with mins,
`make_q3_quants` for Q3_K, `make_qx_quants` for Q6_K) in f32: each sub-block's scale (and min) is
searched over a few candidate grids, the scales are quantized to 4/6/8 bits against one f16
super-scale per 256 values, and the values are then re-rounded against the quantized scales.
Sums use NumPy's pairwise order rather than C's sequential one, so a rare near-tie may resolve
differently from llama.cpp; the result is always a valid encoding of the same quality.
"""

from __future__ import annotations

import numpy as np

from jaxrs.quant import packing

F32 = np.float32
_SUPERBLOCKS_PER_CHUNK = 4096  # the search arrays stay at a few MiB


def _nearest(x: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: round half to even (the 1.5 * 2^23 trick), as int32."""
    return np.rint(x).astype(np.int32)


def _sum(x: np.ndarray) -> np.ndarray:
    return x.sum(axis=-1, dtype=F32)


def _signed_max(x: np.ndarray) -> np.ndarray:
    """Per row, the value of largest magnitude (first on ties) with its sign: `[N]`."""
    return np.take_along_axis(x, np.abs(x).argmax(axis=-1)[:, None], axis=-1)[:, 0]


def make_qkx2_quants(
    x: np.ndarray, weights: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Affine fit `x ~ scale * L - min` per row of `x` `[N, n]`, L in [0, nmax], min >= 0.

    Tries the min/max grid, then `nstep + 1` stretched grids, each refined by weighted least
    squares; keeps the one with the smallest weighted error. Returns (scale, min, L).
    """
    mn = np.minimum(x.min(axis=-1), F32(0))
    mx = x.max(axis=-1)
    sum_w = _sum(weights)
    sum_x = _sum(weights * x)
    flat = mx == mn
    span = np.where(flat, F32(1), mx - mn)
    iscale = F32(nmax) / span
    scale = np.where(flat, F32(0), F32(1) / iscale)

    def err(s, m, L):
        diff = s[:, None] * L + m[:, None] - x
        return _sum(weights * (np.abs(diff) if use_mad else diff * diff))

    L = np.clip(_nearest(iscale[:, None] * (x - mn[:, None])), 0, nmax).astype(F32)
    best = err(scale, mn, L)
    for step in range(nstep + 1):
        iscale = (F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)) / span
        Laux = np.clip(_nearest(iscale[:, None] * (x - mn[:, None])), 0, nmax).astype(F32)
        sum_l = _sum(weights * Laux)
        sum_l2 = _sum(weights * Laux * Laux)
        sum_xl = _sum(weights * Laux * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        D = np.where(ok, D, F32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
        this_min = np.where(pos, F32(0), this_min)
        mad = err(this_scale, this_min, Laux)
        better = ok & (mad < best) & ~flat
        L = np.where(better[:, None], Laux, L)
        best = np.where(better, mad, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    L = np.where(flat[:, None], F32(0), L)
    return scale.astype(F32), (-mn).astype(F32), L.astype(np.int32)


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric fit `x ~ scale * L`, L in [-nmax, nmax - 1], weights x^2, then up to 5 passes of
    per-element moves that raise the fit's (sum w x l)^2 / (sum w l^2). Returns (scale, L + nmax)."""
    vmax = _signed_max(x)
    zero = vmax == 0
    iscale = np.where(zero, F32(0), F32(-nmax) / np.where(zero, F32(1), vmax))
    L = np.clip(_nearest(iscale[:, None] * x), -nmax, nmax - 1).astype(F32)
    w = x * x
    wx = w * x
    sumlx = _sum(wx * L)
    suml2 = _sum(w * L * L)
    for _ in range(5):  # a pass that changes nothing leaves the state as is: no early exit needed
        for i in range(x.shape[1]):
            li, wi, wxi = L[:, i], w[:, i], wx[:, i]
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            pos = slx > 0
            with np.errstate(divide="ignore", invalid="ignore"):
                new_l = np.clip(_nearest(np.where(pos, x[:, i] * sl2 / slx, 0)), -nmax, nmax - 1).astype(F32)
            slx = slx + wxi * new_l
            sl2 = sl2 + wi * new_l * new_l
            take = pos & (new_l != li) & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L[:, i] = np.where(take, new_l, li)
            sumlx = np.where(take, slx, sumlx)
            suml2 = np.where(take, sl2, suml2)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(zero, F32(0), sumlx / suml2)
    L = np.where(zero[:, None], F32(0), L + nmax)
    return scale.astype(F32), L.astype(np.int32)


def make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric fit (rmse_type 1: weights x^2) over 19 grids `-(nmax + 0.1 k) / max`, keeping the
    one with the best least-squares fit. Returns (scale, L + nmax)."""
    vmax = _signed_max(x)
    zero = np.abs(vmax) < F32(1e-30)
    safe_max = np.where(zero, F32(1), vmax)
    w = x * x

    def fit(iscale):
        L = np.clip(_nearest(iscale[:, None] * x), -nmax, nmax - 1).astype(F32)
        return L, _sum(w * x * L), _sum(w * L * L)

    L, sumlx, suml2 = fit(F32(-nmax) / safe_max)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = sumlx / suml2
    best = scale * sumlx
    for k in range(-9, 10):
        if k == 0:
            continue
        Lk, slx, sl2 = fit(-(F32(nmax) + F32(0.1) * F32(k)) / safe_max)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(better, slx / sl2, scale)
        L = np.where(better[:, None], Lk, L)
        best = np.where(better, scale * slx, best)
    scale = np.where(zero, F32(0), scale)
    L = np.where(zero[:, None], F32(0), L + nmax)
    return scale.astype(F32), L.astype(np.int32)


def _f16_roundtrip(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(F32)


def _requantize(x: np.ndarray, d: np.ndarray, dm: np.ndarray | None, L: np.ndarray, lo: int, hi: int):
    """Re-round each sub-block against its quantized scale `d` (and min `dm`), where d != 0.

    x `[S, G, n]`, d/dm `[S, G]`, L `[S, G, n]` (kept where d == 0, as ggml does)."""
    ok = d != 0
    safe = np.where(ok, d, F32(1))[..., None]
    shifted = x if dm is None else x + dm[..., None]
    new = np.clip(_nearest(shifted / safe), lo, hi)
    return np.where(ok[..., None], new, L)


def _q2_k(x: np.ndarray) -> dict[str, np.ndarray]:
    S = x.shape[0]
    sub = x.reshape(-1, 16)
    scales, mins, L = make_qkx2_quants(sub, np.abs(sub), 3, -0.5, 0.1, 15, True)
    scales, mins, L = scales.reshape(S, 16), mins.reshape(S, 16), L.reshape(S, 16, 16)
    max_scale = np.maximum(scales.max(axis=-1), F32(0))
    max_min = np.maximum(mins.max(axis=-1), F32(0))
    has_s, has_m = max_scale > 0, max_min > 0
    ls = np.where(has_s[:, None], _nearest((F32(15) / np.where(has_s, max_scale, 1))[:, None] * scales), 0)
    lm = np.where(has_m[:, None], _nearest((F32(15) / np.where(has_m, max_min, 1))[:, None] * mins), 0)
    sc = ((ls & 0xF) | ((lm & 0xF) << 4)).astype(np.uint8)  # ggml writes the ints into a byte
    d = np.where(has_s, max_scale / F32(15), F32(0)).astype(np.float16)
    dmin = np.where(has_m, max_min / F32(15), F32(0)).astype(np.float16)
    dl = d.astype(F32)[:, None] * (sc & 0xF).astype(F32)
    ml = dmin.astype(F32)[:, None] * (sc >> 4).astype(F32)
    L = _requantize(x.reshape(S, 16, 16), dl, ml, L, 0, 3)
    return {"qs": packing.pack_crumbs(L.reshape(S, 256)), "sc": sc, "d": d, "dmin": dmin}


def _q3_k(x: np.ndarray) -> dict[str, np.ndarray]:
    S = x.shape[0]
    scales, L = make_q3_quants(x.reshape(-1, 16), 4)
    scales, L = scales.reshape(S, 16), L.reshape(S, 16, 16)
    max_scale = _signed_max(scales)
    has = max_scale != 0
    iscale = np.where(has, F32(-32) / np.where(has, max_scale, F32(1)), F32(0))
    sc = np.clip(_nearest(iscale[:, None] * scales).astype(np.int8), -32, 31).astype(np.int8)
    sc = np.where(has[:, None], sc, np.int8(-32))  # all-zero scale bytes unpack to -32
    with np.errstate(divide="ignore"):
        d = np.where(has, F32(1) / iscale, F32(0)).astype(np.float16)
    dl = d.astype(F32)[:, None] * sc.astype(F32)
    L = _requantize(x.reshape(S, 16, 16), dl, None, L - 4, -4, 3) + 4
    L = L.reshape(S, 256)
    return {
        "hmask": packing.pack_bit_planes(L > 3),
        "qs": packing.pack_crumbs(L & 3),
        "sc": sc,
        "d": d,
    }


def _q45_k(x: np.ndarray, nmax: int, rmin: float, nstep: int) -> dict[str, np.ndarray]:
    S = x.shape[0]
    sub = x.reshape(-1, 32)
    av_x = np.sqrt(_sum(sub * sub) / F32(32))
    weights = av_x[:, None] + np.abs(sub)
    scales, mins, L = make_qkx2_quants(sub, weights, nmax, rmin, 0.1, nstep, False)
    scales, mins, L = scales.reshape(S, 8), mins.reshape(S, 8), L.reshape(S, 8, 32)
    max_scale = np.maximum(scales.max(axis=-1), F32(0))
    max_min = np.maximum(mins.max(axis=-1), F32(0))
    inv_scale = np.where(max_scale > 0, F32(63) / np.where(max_scale > 0, max_scale, 1), F32(0))
    inv_min = np.where(max_min > 0, F32(63) / np.where(max_min > 0, max_min, 1), F32(0))
    sc = np.minimum(_nearest(inv_scale[:, None] * scales).astype(np.uint8), 63)
    m = np.minimum(_nearest(inv_min[:, None] * mins).astype(np.uint8), 63)
    d = (max_scale / F32(63)).astype(np.float16)
    dmin = (max_min / F32(63)).astype(np.float16)
    dl = d.astype(F32)[:, None] * sc.astype(F32)
    ml = dmin.astype(F32)[:, None] * m.astype(F32)
    L = _requantize(x.reshape(S, 8, 32), dl, ml, L, 0, nmax).reshape(S, 256)
    out = {"qs": packing.pack_nibble_halves(L & 0xF, 64), "sc": sc, "m": m, "d": d, "dmin": dmin}
    if nmax == 31:
        out["qh"] = packing.pack_bit_planes(L >> 4)
    return out


def _q6_k(x: np.ndarray) -> dict[str, np.ndarray]:
    S = x.shape[0]
    scales, L = make_qx_quants(x.reshape(-1, 16), 32)
    scales, L = scales.reshape(S, 16), L.reshape(S, 16, 16)
    max_scale = _signed_max(scales)
    has = max_scale != 0
    iscale = np.where(has, F32(-128) / np.where(has, max_scale, F32(1)), F32(0))
    with np.errstate(divide="ignore"):
        d = np.where(has, F32(1) / iscale, F32(0)).astype(np.float16)
    sc = np.where(has[:, None], np.minimum(_nearest(iscale[:, None] * scales), 127), 0).astype(np.int8)
    dl = d.astype(F32)[:, None] * sc.astype(F32)
    L = _requantize(x.reshape(S, 16, 16), dl, None, L - 32, -32, 31) + 32
    L = np.where(has[:, None, None], L, 0).reshape(S, 256)  # an all-zero superblock is all-zero bytes
    ql, qh = packing.pack_q6k(L)
    return {"ql": ql, "qh": qh, "sc": sc, "d": d}


def _q8_k(x: np.ndarray) -> dict[str, np.ndarray]:
    vmax = _signed_max(x)
    has = vmax != 0
    iscale = np.where(has, F32(-127) / np.where(has, vmax, F32(1)), F32(0))
    qs = np.minimum(_nearest(iscale[:, None] * x), 127).astype(np.int8)
    with np.errstate(divide="ignore"):
        d = np.where(has, F32(1) / iscale, F32(0)).astype(F32)
    return {"qs": qs, "d": d}


_QUANTIZERS = {
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": lambda x: _q45_k(x, 15, -1.0, 20),
    "Q5_K": lambda x: _q45_k(x, 31, -0.5, 15),
    "Q6_K": _q6_k,
    "Q8_K": _q8_k,
}


def quantize_kquant(w: np.ndarray, fmt: str) -> dict[str, np.ndarray]:
    """`w` f32 `[..., in]` (in a multiple of 256) -> the arrays of `fmt`, in chunks of superblocks."""
    lead = w.shape[:-1]
    superblocks = w.astype(F32).reshape(-1, 256)
    chunk = _SUPERBLOCKS_PER_CHUNK
    parts = [_QUANTIZERS[fmt](superblocks[i : i + chunk]) for i in range(0, len(superblocks), chunk)]
    joined = {n: np.concatenate([p[n].reshape(len(p[n]), -1) for p in parts]) for n in parts[0]}
    return {n: a.reshape(*lead, -1) for n, a in joined.items()}
