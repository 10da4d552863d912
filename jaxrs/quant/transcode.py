"""Packed tensors moved to another format: exactly where the target holds the same values.

Two uses. `cpu_layout`: on XLA:CPU, formats with nibbles and bit planes dequantize several times
slower than one byte per weight (a 30-layer stack at one row: Q4_1 41 ms, Q4_K 86 ms, Q8_0 7.7 ms, f32
14.6 ms), so packed weights are moved, exactly, into Q8F (Q4_0, Q5_0, Q8_0: same scale in f32, codes
recentred) or U8M (Q4_1, Q5_1, Q4_K, Q5_K: byte codes with the f32 scale and min each 32-block already
has). Scales in f32 because a fused one-row GEMV converts a half scale once per weight, not per block:
Q8_0's f16 scales made a 262,144 x 640 head about twice as slow as the same codes with f32 scales.

`unify_formats`: mixed per-layer formats -> one format, so a stacked parameter stays packed.

llama.cpp's `_M`/`_S` mixes give some layers more bits (Q4_K_M: `attn_v` and `ffn_down` in Q6_K or Q8_0
on an eighth of the layers at each end and every third between, the rest Q4_K or Q5_0). The layers run
under one `lax.scan`, which needs one format per stacked parameter, so the layers in fewer bits move to
the format with the most bits among them: exactly for the symmetric 32-blocks (Q4_0, Q5_0) into Q8_0
(same scale, codes recentred), otherwise by re-quantizing their dequantized values (the error of the
richer format on values the poorer one could already hold).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from jaxrs.quant import packing
from jaxrs.quant.dequant import dequantize
from jaxrs.quant.formats import FORMATS
from jaxrs.quant.gguf_codec import to_gguf_bytes
from jaxrs.quant.quantize import quantize
from jaxrs.quant.tensor import QuantizedTensor

log = logging.getLogger("jaxrs")

# Formats whose values another holds exactly, by target: w = d * (q - 8 or 16) (Q8_0 keeps the half
# scale, Q8F the same scale in f32); w = d*q + m per 32 (K: d*sc and -dmin*m, in f32).
EXACT_INTO = {
    "Q8_0": ("Q4_0", "Q5_0"),
    "Q8F": ("Q4_0", "Q5_0", "Q8_0"),
    "U8M": ("Q4_1", "Q5_1", "Q4_K", "Q5_K"),
}
CPU_LAYOUT = {fmt: target for target in ("Q8F", "U8M") for fmt in EXACT_INTO[target]}


def cpu_layout(qt: QuantizedTensor) -> QuantizedTensor:
    """`qt` in the format XLA:CPU reads fastest that holds its values exactly (itself if none)."""
    return to_format(qt, CPU_LAYOUT[qt.fmt]) if qt.fmt in CPU_LAYOUT else qt


def to_format(qt: QuantizedTensor, fmt: str) -> QuantizedTensor:
    """`qt` re-encoded in `fmt` (host arrays): exactly into Q8_0 / Q8F / U8M from the formats above (in
    NumPy, no device work or compiled code), else by re-quantizing its values."""
    if qt.fmt == fmt:
        return qt
    if qt.fmt not in EXACT_INTO.get(fmt, ()):
        return quantize(host_values(qt), fmt)
    a = {n: np.asarray(x) for n, x in qt.arrays.items()}
    if fmt in ("Q8_0", "Q8F"):
        scale = a["d"] if fmt == "Q8_0" else a["d"].astype(np.float32)
        if qt.fmt == "Q8_0":
            return QuantizedTensor(fmt, qt.out_in, {"qs": a["qs"], "d": scale})
        offset = 8 if qt.fmt == "Q4_0" else 16
        codes = (_codes(qt.fmt, a).astype(np.int16) - offset).astype(np.int8)
        return QuantizedTensor(fmt, qt.out_in, {"qs": codes, "d": scale})
    f32 = np.float32
    if qt.spec.family == "legacy":
        d, m = a["d"].astype(f32), a["m"].astype(f32)
    else:  # 8 sub-blocks of 32 per superblock, each with a 6-bit scale and min
        d = np.repeat(a["d"].astype(f32), 8, axis=-1) * a["sc"].astype(f32)
        m = -(np.repeat(a["dmin"].astype(f32), 8, axis=-1) * a["m"].astype(f32))
    return QuantizedTensor("U8M", qt.out_in, {"qs": _codes(qt.fmt, a), "d": d, "m": m})


def host_values(qt: QuantizedTensor) -> np.ndarray:
    """`qt`'s f32 values on the host: by `gguf.quants` for the GGUF formats (the same values as our
    dequantization, without compiling a JAX executable per tensor shape while a model loads)."""
    if qt.spec.ggml_type is not None:
        values = gguf.quants.dequantize(to_gguf_bytes(qt), qt.spec.ggml_type)
        return values.astype(np.float32, copy=False).reshape(qt.shape)
    with jax.default_device(jax.devices("cpu")[0]):
        return np.asarray(dequantize(qt, jnp.float32))


def _codes(fmt: str, a: dict[str, np.ndarray]) -> np.ndarray:
    """The unsigned integer codes `[..., in]` (u8, before any offset) of a tensor in one of the formats
    that move exactly (`CPU_LAYOUT`), from its fields `a`."""
    if fmt in ("Q4_K", "Q5_K"):  # nibbles per 64 elements, the fifth bits in bit planes per 256
        q = packing.unpack_nibble_halves(a["qs"], 64)
        return q | (packing.unpack_bit_planes(a["qh"]) << 4) if fmt == "Q5_K" else q
    q = packing.unpack_nibble_halves(a["qs"], 32)  # Q4_0, Q4_1, Q5_0, Q5_1
    return q | (packing.unpack_bits_u32(a["qh"]) << 4) if fmt in ("Q5_0", "Q5_1") else q


def unify_formats(tensors: Sequence[QuantizedTensor], name: str = "") -> list[QuantizedTensor]:
    """`tensors` all in the format with the most bits per weight among them (unchanged if they agree)."""
    formats = [t.fmt for t in tensors]
    if len(set(formats)) <= 1:
        return list(tensors)
    target = max(set(formats), key=lambda f: FORMATS[f].bits_per_weight())
    log_unified(name, formats, target)
    return [to_format(t, target) for t in tensors]


def log_unified(name: str, formats: Sequence[str], target: str) -> None:
    """One line saying which layers (by their own `formats`) a stacked weight stores as `target`."""
    moved = sorted({f for f in formats if f != target})
    exact = all(f in EXACT_INTO.get(target, ()) for f in moved)
    log.info(
        "%s: layers in %s stored as %s to stack with the others (%s)",
        name or "a stacked weight",
        ", ".join(f"{f} ({list(formats).count(f)})" for f in moved),
        target,
        "exactly" if exact else "re-quantized",
    )
