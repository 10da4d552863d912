"""Legacy GGML (ggjt v3) files: a file written by our own writer loads like the same weights in GGUF."""

from __future__ import annotations

import struct

import gguf
import jax
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from transformers import LlamaConfig

from jaxrs.errors import ModelLoadError
from jaxrs.loading import load_model
from jaxrs.loading.ggml_file import NAMES, feed_forward_length
from tests.conftest import relative_error, save_tiny_hf_model, save_tiny_tokenizer
from tests.paged import PagedRun

N_EMBD, N_MULT, N_HEAD, N_LAYER, VOCAB = 64, 32, 4, 2, 96
TINY = LlamaConfig(
    vocab_size=VOCAB,
    hidden_size=N_EMBD,
    intermediate_size=feed_forward_length(N_EMBD, N_MULT),
    num_hidden_layers=N_LAYER,
    num_attention_heads=N_HEAD,
    num_key_value_heads=N_HEAD,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
HF_TO_OLD = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    **{
        f"model.layers.{{i}}.{hf}": f"layers.{{i}}.{old}"
        for hf, old in {
            "self_attn.q_proj.weight": "attention.wq.weight",
            "self_attn.k_proj.weight": "attention.wk.weight",
            "self_attn.v_proj.weight": "attention.wv.weight",
            "self_attn.o_proj.weight": "attention.wo.weight",
            "input_layernorm.weight": "attention_norm.weight",
            "post_attention_layernorm.weight": "ffn_norm.weight",
            "mlp.gate_proj.weight": "feed_forward.w1.weight",
            "mlp.down_proj.weight": "feed_forward.w2.weight",
            "mlp.up_proj.weight": "feed_forward.w3.weight",
        }.items()
    },
}


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def old_tensors(model, quantized: bool = True) -> list[tuple[str, np.ndarray, QT]]:
    """(GGML name, numpy data in file form, type) for every tensor, q/k permuted as llama.cpp did."""
    out = []
    for hf, tensor in model.state_dict().items():
        w = tensor.numpy().astype(np.float32)
        i = hf.split(".")[2] if ".layers." in hf else None
        old = HF_TO_OLD[hf.replace(f".{i}.", ".{i}.") if i else hf].replace("{i}", i or "")
        if old.endswith(("wq.weight", "wk.weight")):
            w = llama_cpp_permute(w, N_HEAD)
        qtype = QT.F32 if w.ndim == 1 or not quantized else (QT.Q8_0 if "feed_forward" in old else QT.Q4_0)
        data = w if qtype == QT.F32 else gguf.quants.quantize(w, qtype)
        out.append((old, data, qtype))
    return out


def write_ggjt(path, tensors, vocab: list[bytes]) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack("<II", 0x67676A74, 3))
        f.write(struct.pack("<7i", VOCAB, N_EMBD, N_MULT, N_HEAD, N_LAYER, N_EMBD // N_HEAD, 2))
        for i, text in enumerate(vocab):
            f.write(struct.pack("<I", len(text)) + text + struct.pack("<f", -float(i)))
        for name, data, qtype in tensors:
            rows = data.shape[0] if data.ndim > 1 else 1
            ne0 = (
                data.size
                if data.ndim == 1
                else (
                    data.shape[1]
                    if qtype == QT.F32
                    else data.shape[1] // gguf.GGML_QUANT_SIZES[qtype][1] * gguf.GGML_QUANT_SIZES[qtype][0]
                )
            )
            dims = [ne0] if data.ndim == 1 else [ne0, rows]
            encoded = name.encode()
            f.write(struct.pack(f"<3i{len(dims)}i", len(dims), len(encoded), int(qtype), *dims) + encoded)
            f.write(b"\0" * (-f.tell() % 32))
            f.write(np.ascontiguousarray(data).tobytes())


def write_gguf(path, tensors) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(N_LAYER)
    w.add_embedding_length(N_EMBD)
    w.add_feed_forward_length(TINY.intermediate_size)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD)
    w.add_context_length(2048)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_vocab_size(VOCAB)
    for name, data, qtype in tensors:
        new = next(
            __import__("re").sub(p, t, name) for p, t in NAMES.items() if __import__("re").fullmatch(p, name)
        )
        w.add_tensor(new, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ggml")
    model = save_tiny_hf_model(TINY, folder)
    save_tiny_tokenizer(folder, VOCAB)
    tensors = old_tensors(model)
    # A SentencePiece-style vocabulary as GGML-era llama.cpp wrote it ('▁' as a space, controls empty):
    # single characters first, then " w", then " w0" ... " w79".
    vocab = [b"", b"", b"", b" ", b"w"] + [str(d).encode() for d in range(10)] + [b" w"]
    vocab += [f" w{i}".encode() for i in range(VOCAB - len(vocab))]
    write_ggjt(folder / "tiny.ggjt.bin", tensors, vocab)
    write_gguf(folder / "tiny.gguf", tensors)
    write_ggjt(folder / "tiny-f32.ggjt.bin", old_tensors(model, quantized=False), vocab)
    return folder


def test_ggml_loads_like_the_same_weights_in_gguf(files):
    ggml = load_model(str(files / "tiny.ggjt.bin"), tokenizer=str(files))
    ref = load_model(str(files / "tiny.gguf"), tokenizer=str(files))
    ids = list(range(3, 35))
    ours = PagedRun(ggml.config, ggml.params).feed(ids)
    np.testing.assert_array_equal(ours, PagedRun(ref.config, ref.params).feed(ids))


def test_f32_ggml_equals_the_hf_folder(files):
    """Names, the q/k permutation and n_mult's FFN width all map back onto the HF weights."""
    ggml = load_model(str(files / "tiny-f32.ggjt.bin"), tokenizer=str(files))
    hf = load_model(str(files))
    assert ggml.config.intermediate_size == hf.config.intermediate_size == TINY.intermediate_size
    ids = list(range(3, 35))
    assert (
        relative_error(PagedRun(ggml.config, ggml.params).feed(ids), PagedRun(hf.config, hf.params).feed(ids))
        < 1e-5
    )


def test_ggml_packed_equals_dequantized(files):
    plain = load_model(str(files / "tiny.ggjt.bin"), tokenizer=str(files), packed=False)
    packed = load_model(str(files / "tiny.ggjt.bin"), tokenizer=str(files))  # the default
    on_cpu = jax.default_backend() == "cpu"  # where Q4_0 moves exactly into Q8F (quant.transcode)
    assert packed.params["layers"]["attn"]["q_proj"]["weight"].fmt == ("Q8F" if on_cpu else "Q4_0")
    ids = list(range(3, 20))
    # the same values in another order of arithmetic (few-row products on CPU)
    np.testing.assert_allclose(
        PagedRun(packed.config, packed.params).feed(ids),
        PagedRun(plain.config, plain.params).feed(ids),
        rtol=1e-5,
        atol=1e-5,
    )


def test_ggml_vocabulary_becomes_a_tokenizer(files):
    loaded = load_model(str(files / "tiny.ggjt.bin"))
    assert loaded.tokenizer.bos_token_id == 1 and 2 in loaded.tokenizer.eos_token_ids
    ids = loaded.tokenizer.encode("w5 w17", add_special_tokens=False)
    assert [loaded.tokenizer.id_to_token(i) for i in ids] == ["\u2581w5", "\u2581w17"]
    assert loaded.tokenizer.decode(ids) == "w5 w17"


def test_truncated_ggml_is_a_clear_error(files, tmp_path):
    cut = tmp_path / "cut.bin"
    cut.write_bytes((files / "tiny.ggjt.bin").read_bytes()[:-1000])
    with pytest.raises(ModelLoadError, match=r"cut\.bin: truncated GGML file"):
        load_model(str(cut), tokenizer=str(files))
