"""Large packed GGUF tensors read a slice of rows at a time: the same tensor as reading it whole, in
aligned buffers, relaid per slice."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from jaxrs.loading import gguf_file
from jaxrs.loading.gguf_file import read_in_row_chunks
from jaxrs.loading.gguf_reader import open_gguf
from jaxrs.loading.layer_stack import ALIGN
from jaxrs.quant import from_gguf_bytes
from jaxrs.quant.gguf_codec import to_gguf_bytes
from jaxrs.quant.quantize import quantize
from jaxrs.quant.transcode import cpu_layout


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "rows.gguf"
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama")
    for qtype in (QT.Q8_0, QT.Q5_0, QT.Q4_K):
        data = to_gguf_bytes(quantize(rng.standard_normal((37, 256), dtype=np.float32), qtype.name))
        w.add_tensor(f"t.{qtype.name}", data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return open_gguf(path)


@pytest.mark.parametrize("relayout", [None, cpu_layout], ids=["as stored", "cpu layout"])
@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q5_0, QT.Q4_K])
def test_row_slices_give_the_whole_tensor(written, qtype, relayout, monkeypatch):
    tensor = next(t for t in written.tensors if t.name == f"t.{qtype.name}")
    monkeypatch.setattr(gguf_file, "CHUNK_BYTES", tensor.n_bytes // 37 * 5)  # 8 slices, the last short
    got = read_in_row_chunks(tensor, relayout)
    whole = from_gguf_bytes(tensor.data, qtype, (37, 256))
    want = relayout(whole) if relayout else whole
    assert (got.fmt, got.out_in) == (want.fmt, want.out_in)
    for name, array in want.arrays.items():
        assert got.arrays[name].ctypes.data % ALIGN == 0
        np.testing.assert_array_equal(got.arrays[name], array)


def test_rows_outside_a_truncated_file_are_an_error(written):
    tensor = next(t for t in written.tensors if t.name == "t.Q8_0")
    assert tensor.rows(36, 37).shape == (1, tensor.n_bytes // 37)
    with pytest.raises(Exception, match="cut short"):
        tensor.rows(36, 37 + 10**6)
