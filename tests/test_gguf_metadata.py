"""The GGUF metadata parser against gguf's own reader, and its errors on damaged files."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

from jaxrs.errors import ModelLoadError
from jaxrs.loading.gguf_metadata import parse_gguf

# One key per value type, scalars and arrays (every element type, nested arrays, non-ASCII strings).
VALUES: dict[str, tuple[object, VT, VT | None]] = {
    "t.u8": (200, VT.UINT8, None),
    "t.i8": (-100, VT.INT8, None),
    "t.u16": (60_000, VT.UINT16, None),
    "t.i16": (-30_000, VT.INT16, None),
    "t.u32": (4_000_000_000, VT.UINT32, None),
    "t.i32": (-2_000_000_000, VT.INT32, None),
    "t.f32": (0.25, VT.FLOAT32, None),
    "t.bool": (True, VT.BOOL, None),
    "t.str": ("héllo ▁wörld ✓", VT.STRING, None),
    "t.empty_str": ("", VT.STRING, None),
    "t.u64": (2**63 + 5, VT.UINT64, None),
    "t.i64": (-(2**62), VT.INT64, None),
    "t.f64": (1e-300, VT.FLOAT64, None),
    "t.arr_u8": ([0, 1, 255], VT.ARRAY, VT.UINT8),
    "t.arr_i8": ([-128, 0, 127], VT.ARRAY, VT.INT8),
    "t.arr_u16": ([1, 65_535], VT.ARRAY, VT.UINT16),
    "t.arr_i16": ([-5, 5], VT.ARRAY, VT.INT16),
    "t.arr_u32": ([7, 4_000_000_000], VT.ARRAY, VT.UINT32),
    "t.arr_i32": ([-7, 2_000_000_000], VT.ARRAY, VT.INT32),
    "t.arr_f32": ([0.5, -1.5, 3.0], VT.ARRAY, VT.FLOAT32),
    "t.arr_bool": ([True, False, True], VT.ARRAY, VT.BOOL),
    "t.arr_u64": ([2**64 - 1, 0], VT.ARRAY, VT.UINT64),
    "t.arr_i64": ([-(2**63), 1], VT.ARRAY, VT.INT64),
    "t.arr_f64": ([0.1, 1e300], VT.ARRAY, VT.FLOAT64),
    "t.arr_str": (["a", "", "▁tok", "日本語", "<0x0A>"], VT.ARRAY, VT.STRING),
    "t.nested": ([[1, 2], [3], [4, 5, 6]], VT.ARRAY, VT.ARRAY),
    "t.nested_str": ([["x", "yz"], ["ü"]], VT.ARRAY, VT.ARRAY),
}


def tensors() -> dict[str, tuple[np.ndarray, QT]]:
    """Tensors in float, integer and block-quantized storage (the data as gguf's writer takes it)."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 256)).astype(np.float32)
    return {
        "a.f32": (rng.normal(size=(3, 5)).astype(np.float32), QT.F32),
        "b.f16": (rng.normal(size=(2, 3, 4)).astype(np.float16), QT.F16),
        "c.i32": (np.arange(6, dtype=np.int32), QT.I32),
        "d.q8_0": (gguf.quants.quantize(w, QT.Q8_0), QT.Q8_0),
        "e.q4_k": (rng.integers(0, 256, size=(4, 144), dtype=np.uint8), QT.Q4_K),  # any bytes will do
        "f.bf16": (gguf.quants.quantize(w, QT.BF16), QT.BF16),
    }


def write_gguf(path: Path, alignment: int | None = None) -> Path:
    w = gguf.GGUFWriter(path, "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, (value, vtype, sub) in VALUES.items():
        w.add_key_value(key, value, vtype, sub)
    for name, (data, qtype) in tensors().items():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "every-type.gguf")


def assert_same_as_gguf_reader(path: Path) -> None:
    """Metadata (values and types), tensor index and tensor data as `gguf.GGUFReader` reads them."""
    ours, theirs = parse_gguf(path), gguf.GGUFReader(path)
    fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(fields)
    for key, field in fields.items():
        if field.types[:2] == [VT.ARRAY, VT.ARRAY]:  # gguf's reader flattens nested arrays; ours keeps them
            flat = [x for item in ours.metadata[key] for x in item]
            assert flat == field.contents(), key
            continue
        assert ours.metadata[key] == field.contents(), key
        assert ours.value_types[key][:2] == tuple(field.types[:2]), key
    assert len(ours.tensors) == len(theirs.tensors)
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert (a.name, a.tensor_type, a.shape) == (b.name, b.tensor_type, tuple(int(d) for d in b.shape))
        assert (a.n_elements, a.n_bytes, a.data_offset) == (b.n_elements, b.n_bytes, b.data_offset)
        if a.n_bytes < 1 << 20:
            data = a.data
            assert (data.dtype, data.shape) == (b.data.dtype, b.data.shape), a.name
            np.testing.assert_array_equal(data, b.data)


def test_every_value_type_reads_as_gguf_reader_reads_it(written):
    assert_same_as_gguf_reader(written)
    meta = parse_gguf(written).metadata
    for key, (value, vtype, _) in VALUES.items():
        if vtype in (VT.FLOAT32,) or key == "t.arr_f32":
            assert meta[key] == pytest.approx(value)
        else:
            assert meta[key] == value, key
    assert meta["general.architecture"] == "llama"


def test_tensor_data_matches_what_was_written(written):
    by_name = {t.name: t for t in parse_gguf(written).tensors}
    for name, (data, qtype) in tensors().items():
        t = by_name[name]
        assert t.tensor_type == qtype
        np.testing.assert_array_equal(t.data, data)


def test_custom_alignment_places_the_data_section(tmp_path):
    path = write_gguf(tmp_path / "aligned.gguf", alignment=64)
    parsed = parse_gguf(path)
    assert parsed.alignment == 64 and parsed.data_start % 64 == 0
    assert_same_as_gguf_reader(path)


def raw_gguf(kvs: bytes = b"", n_kv: int = 0, tensor_infos: bytes = b"", n_tensors: int = 0) -> bytes:
    """A GGUF v3 file built by hand, for what gguf's writer refuses to write (empty arrays, damage)."""
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kvs + tensor_infos


def s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def test_empty_arrays(tmp_path):
    kvs = s("e.nums") + struct.pack("<IIQ", VT.ARRAY, VT.FLOAT32, 0)
    kvs += s("e.strs") + struct.pack("<IIQ", VT.ARRAY, VT.STRING, 0)
    path = tmp_path / "empty.gguf"
    path.write_bytes(raw_gguf(kvs, 2))
    parsed = parse_gguf(path)
    assert parsed.metadata == {"e.nums": [], "e.strs": []}
    assert parsed.value_types["e.strs"] == (VT.ARRAY, VT.STRING)


def test_every_truncation_is_a_clear_error(written, tmp_path):
    data = written.read_bytes()
    parsed = parse_gguf(written)
    ends = {t.name: t.data_offset + t.n_bytes for t in parsed.tensors}
    cut = tmp_path / "cut.gguf"
    # inside the header, inside keys and values (the string array among them), inside the tensor index
    # and inside the last tensor's data
    for size in [6, 20, 30, 100, 400, 800, parsed.data_start - 10, max(ends.values()) - 1]:
        cut.write_bytes(data[:size])
        with pytest.raises(ModelLoadError, match=r"cut\.gguf: truncated GGUF file") as e:
            parse_gguf(cut)
        assert "Traceback" not in str(e.value)


def test_truncated_tensor_names_the_tensor(written, tmp_path):
    data = written.read_bytes()
    last = parse_gguf(written).tensors[-1]
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: last.data_offset + 1])
    with pytest.raises(ModelLoadError, match=rf"tensor '{last.name}' ends at byte"):
        parse_gguf(cut)


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"GGML" + bytes(20), r"not a GGUF file \(magic bytes b'GGML'"),
        (b"GGUF" + struct.pack("<IQQ", 9, 0, 0), r"unsupported GGUF version 9"),
        (
            b"GGUF" + struct.pack(">IQQ", 3, 0, 0),
            r"a big-endian GGUF file \(version 3\); only little-endian files load",
        ),
        (raw_gguf(s("k") + struct.pack("<I", 99), 1), r"metadata key 'k' has unknown value type 99"),
        (
            raw_gguf(s("toks") + struct.pack("<IIQ", VT.ARRAY, VT.STRING, 2**40), 1),
            r"truncated GGUF file: metadata key 'toks' \(1099511627776 strings\)",
        ),
        (
            raw_gguf(
                s("toks") + struct.pack("<IIQ", VT.ARRAY, VT.STRING, 2) + s("a") + struct.pack("<Q", 10**9),
                1,
            ),
            r"truncated GGUF file: metadata key 'toks': string 1 of 2 runs past the end of the file "
            r"\(\d+ bytes\)",
        ),
        (
            raw_gguf(tensor_infos=s("w") + struct.pack("<IQIQ", 1, 4, 77, 0), n_tensors=1),
            r"tensor 'w' has unknown storage type 77",
        ),
        (
            raw_gguf(tensor_infos=(s("w") + struct.pack("<IQIQ", 1, 1, QT.F32, 0)) * 2, n_tensors=2),
            r"tensor 'w' is listed twice",
        ),
        (
            raw_gguf(tensor_infos=s("q") + struct.pack("<IQIQ", 1, 33, QT.Q8_0, 0), n_tensors=1),
            r"tensor 'q': rows of 33 values do not divide into Q8_0 blocks",
        ),
        (
            raw_gguf(s("general.alignment") + struct.pack("<II", VT.UINT32, 24), 1),
            r"general.alignment 24 is not a power of two",
        ),
    ],
)
def test_corrupt_files_are_clear_errors(tmp_path, content, problem):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=r"bad\.gguf: " + problem):
        parse_gguf(path)


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match=r"nope\.gguf: no such file"):
        parse_gguf(tmp_path / "nope.gguf")


@pytest.mark.slow
def test_demo_file_reads_as_gguf_reader_reads_it(demo_gguf):
    assert_same_as_gguf_reader(demo_gguf)
