"""`dequantize_packed`: packed arrays -> weights, in jnp (jittable; the on-device reference, and
`qmatmul_xla`'s first half).

The arithmetic follows ggml's dequantizers step for step in f32 (e.g. Q6_K computes `(d * sc) * q`,
not `d * (sc * q)`), so the result equals `gguf.quants.dequantize` of the same bytes bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.formats import LAYOUTS

f32 = jnp.float32

# On CPU a weight dequantized into bfloat16 (the operand of a bfloat16 GEMM) is rounded to nearest even in
# integer operations (`round_to_bfloat16`), the same bits as XLA:CPU's convert without its NaN check, which
# cost about as much again as the dequantization before it (bench/RESULTS.md, "Dequantized weights rounded
# to bfloat16 in integer operations").
BF16_BY_INTEGER_ROUNDING = True


def _expand(scale: jax.Array) -> jax.Array:
    """`[..., n]` -> `[..., n, 1]` f32, to multiply groups of elements."""
    return scale.astype(f32)[..., None]


def _groups(x: jax.Array, per: int) -> jax.Array:
    return x.reshape(*x.shape[:-1], -1, per)


def _flat(x: jax.Array) -> jax.Array:
    """Merge the trailing group axes back into one `in` axis."""
    return x.reshape(*x.shape[:-2], -1)


def _nibble_halves(qs: jax.Array, unit: int) -> jax.Array:
    """Bytes `[..., I/2]` -> 4-bit codes `[..., I/unit, unit]` (byte l: element l and l + unit/2)."""
    qs = qs.reshape(*qs.shape[:-1], -1, unit // 2)
    return jnp.concatenate([qs & 0xF, qs >> 4], axis=-1)


def _crumbs(qs: jax.Array) -> jax.Array:
    """Bytes `[..., I/4]` -> 2-bit codes `[..., I/128, 128]` (per 128: byte l bits 2j = element 32j+l)."""
    qs = qs.reshape(*qs.shape[:-1], -1, 1, 32)
    shifts = (2 * jnp.arange(4, dtype=jnp.uint8))[:, None]
    return ((qs >> shifts) & 3).reshape(*qs.shape[:-3], -1, 128)


def _bit_planes(bits: jax.Array) -> jax.Array:
    """Bytes `[..., I/8]` -> bits `[..., I/256, 256]` (per 256: byte l bit b = element 32b + l)."""
    bits = bits.reshape(*bits.shape[:-1], -1, 1, 32)
    return ((bits >> jnp.arange(8, dtype=jnp.uint8)[:, None]) & 1).reshape(*bits.shape[:-3], -1, 256)


def _legacy(fmt: str, a: dict[str, jax.Array]) -> jax.Array:
    d = _expand(a["d"])
    if fmt in ("Q8_0", "Q8F"):
        return _flat(_groups(a["qs"], 32).astype(f32) * d)
    # [..., nb, 32] codes: U8M stores one a byte, the others two
    q = _groups(a["qs"], 32) if fmt == "U8M" else _nibble_halves(a["qs"], 32)
    if fmt in ("Q5_0", "Q5_1"):
        high = (a["qh"][..., None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
        q = q | (high.astype(jnp.uint8) << 4)
    if fmt == "Q4_0":
        return _flat(d * (q.astype(f32) - 8))
    if fmt == "Q5_0":
        return _flat(d * (q.astype(f32) - 16))
    return _flat(d * q.astype(f32) + _expand(a["m"]))  # Q4_1, Q5_1, U8M


def _kquant(fmt: str, a: dict[str, jax.Array]) -> jax.Array:
    lead = a["d"].shape  # [..., out, superblocks]
    d = a["d"].astype(f32)[..., None]  # [..., out, ns, 1]

    def sub(v: jax.Array, n: int) -> jax.Array:  # [..., out, ns * n] -> [..., out, ns, n]
        return v.reshape(*lead, n)

    if fmt == "Q8_K":
        return _flat(sub(a["qs"], 256).astype(f32) * d)
    if fmt == "Q2_K":
        q = _crumbs(a["qs"]).reshape(*lead, 16, 16).astype(f32)
        sc = sub(a["sc"], 16)
        dl = d * (sc & 0xF).astype(f32)
        ml = a["dmin"].astype(f32)[..., None] * (sc >> 4).astype(f32)
        return _flat(_flat(dl[..., None] * q - ml[..., None]))
    if fmt in ("Q3_K", "Q6_K"):  # 16 signed sub-block scales
        if fmt == "Q3_K":
            low = _crumbs(a["qs"]).astype(jnp.int8)
            high = _bit_planes(a["hmask"]).astype(jnp.int8)
            q = low.reshape(*lead, 256) - 4 * (1 - high.reshape(*lead, 256))
        else:
            ql = a["ql"].reshape(*lead, 2, 1, 64)  # (n, nibble, byte): low nibble 128n + l, high +64
            low = jnp.concatenate([ql & 0xF, ql >> 4], axis=-2).reshape(*lead, 256)
            high = _crumbs(a["qh"]).reshape(*lead, 256)
            q = (low | (high << 4)).astype(jnp.int8) - 32
        dl = d * sub(a["sc"], 16).astype(f32)
        return _flat(_flat(dl[..., None] * q.reshape(*lead, 16, 16).astype(f32)))
    # Q4_K, Q5_K: 8 sub-blocks of 32, unsigned 6-bit scales and mins
    q = _nibble_halves(a["qs"], 64).reshape(*lead, 8, 32)
    if fmt == "Q5_K":
        q = q | (_bit_planes(a["qh"]).reshape(*lead, 8, 32) << 4)
    dl = d * sub(a["sc"], 8).astype(f32)
    ml = a["dmin"].astype(f32)[..., None] * sub(a["m"], 8).astype(f32)
    return _flat(_flat(dl[..., None] * q.astype(f32) - ml[..., None]))


def _hqq(fmt: str, a: dict[str, jax.Array]) -> jax.Array:
    q = _nibble_halves(a["qs"], 64) if fmt == "HQQ4" else _groups(a["qs"], 64)
    return _flat((q.astype(f32) - _expand(a["zero"])) * _expand(a["scale"]))


def dequantize_packed(
    arrays: Mapping[str, jax.Array], *, fmt: str, out_in: tuple[int, int], dtype: jnp.dtype = jnp.float32
) -> jax.Array:
    """The `[..., out, in]` weights that `arrays` (the fields of `fmt`'s layout, `[..., out, in // per]`)
    stand for, computed in f32 and returned in `dtype`."""
    a = {n: jnp.asarray(x) for n, x in arrays.items()}
    layout = LAYOUTS[fmt]
    family = layout.family
    if family == "float":
        w = a["w"]
    elif family == "legacy":
        w = _legacy(fmt, a)
    elif family == "k":
        w = _kquant(fmt, a)
    else:
        w = _hqq(fmt, a)
    w = w.reshape(*layout.lead_shape(arrays), *out_in)
    cpu_rounds = BF16_BY_INTEGER_ROUNDING and jax.default_backend() == "cpu"
    if cpu_rounds and w.dtype == f32 and jnp.dtype(dtype) == jnp.bfloat16:
        return round_to_bfloat16(w)
    return w.astype(dtype)


def round_to_bfloat16(w: jax.Array) -> jax.Array:
    """f32 `w` in bfloat16, rounded to nearest even as a convert rounds it, in integer operations and
    without its NaN check (a NaN whose payload lies in the low half alone would become infinite; a
    dequantized weight is never NaN)."""
    bits = lax.bitcast_convert_type(w, jnp.uint32)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return lax.bitcast_convert_type(bits.astype(jnp.uint16), jnp.bfloat16)
