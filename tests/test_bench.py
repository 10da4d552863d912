"""The benchmark scripts still run (tiny settings; figures are not checked here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BENCH = Path(__file__).parent.parent / "bench"


def bench(script: str, *args: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(Path(args[args.index("--out") + 1]).read_text())


def test_single_stream_script(tmp_path):
    out = bench(
        "bench_single_stream.py",
        "--prompt-tokens",
        "24",
        "--new-tokens",
        "4",
        "--passes",
        "1",
        "--no-peer",
        "--out",
        str(tmp_path / "s.json"),
    )
    assert out["results"]["jaxrs"]["decode_tok_s"] > 0


def test_throughput_script(tmp_path):
    out = bench(
        "bench_throughput.py",
        "--concurrency",
        "1",
        "2",
        "--new-tokens",
        "4",
        "--passes",
        "1",
        "--out",
        str(tmp_path / "t.json"),
    )
    assert [r["concurrency"] for r in out["rows"]] == [1, 2]
    assert all(r["prompts_batched_s"] > 0 and r["prompts_one_call_each_s"] > 0 for r in out["rows"])


def test_decode_step_script(tmp_path):
    out = bench(
        "bench_decode_step.py",
        "--rows",
        "2",
        "--keys",
        "16",
        "--steps",
        "2",
        "--repeats",
        "1",
        "--out",
        str(tmp_path / "d.json"),
    )
    assert [(r["rows"], r["keys"], r["loop"]) for r in out["rows"]] == [(2, 16, "scan"), (2, 16, "unrolled")]
    assert all(r["ms_per_step"] > 0 and r["compile_s"] > 0 for r in out["rows"])


def test_profile_decode_step_script(tmp_path):
    out = bench(
        "profile_decode_step.py",
        *("--rows", "2", "--keys", "40", "--steps", "2", "--calls", "1", "--top", "200"),
        *("--set", "pallas_kernels.read_widths.NARROW_MIN_KEYS=0", "--out", str(tmp_path / "p.json")),
    )
    assert out["thunks"] and all(r["us_per_layer"] > 0 for r in out["thunks"])
    assert any(r["thunk"].startswith("cond") for r in out["thunks"])  # the setting narrowed two rows


def test_isq_script(tmp_path):
    from transformers import LlamaConfig

    from tests.conftest import save_tiny_hf_model, save_tiny_tokenizer

    config = LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2
    )
    save_tiny_hf_model(config, tmp_path)
    save_tiny_tokenizer(tmp_path, config.vocab_size)
    args = ["--model", str(tmp_path), "--formats", "Q8_0", "--passes", "1", "--new-tokens", "4"]
    out = bench(
        "bench_isq.py", *args, "--prompt-tokens", "8", "--no-llamacpp", "--out", str(tmp_path / "q.json")
    )
    f32, q8 = out["rows"]
    assert (f32["format"], q8["format"], q8["measured_on"]) == ("f32", "Q8_0", "ISQ load")
    assert q8["weight_mib"] < f32["weight_mib"] and q8["perplexity"] > 0 and q8["decode_tok_s"] > 0


def tiny_model(folder: Path) -> Path:
    """A tiny random Llama with a tokenizer, in `folder`/model."""
    from transformers import LlamaConfig

    from tests.conftest import save_tiny_hf_model, save_tiny_tokenizer

    config = LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2
    )
    model = folder / "model"
    model.mkdir()
    save_tiny_hf_model(config, model)
    save_tiny_tokenizer(model, config.vocab_size)
    return model


def test_peers_script(tmp_path):
    """The peer harness end to end on a tiny random model, with the two engines of this environment."""
    model = tiny_model(tmp_path)
    # 16 new tokens: transformers' decode time is a whole run less a one-token run, which a loaded machine
    # can make negative over a few tokens (the harness then drops the figure)
    sizes = ["--prompt-tokens", "16", "--prompt-lengths", "40", "--new-tokens", "16", "--passes", "1"]
    sizes += ["--concurrency", "2"]
    out = bench(
        "bench_peers.py",
        *("--model", str(model), "--engines", "jaxrs", "transformers", "--jaxrs-modes", "f32", *sizes),
        *("--skip-cold", "--out", str(tmp_path / "p.json")),
    )
    rows = out["rows"]
    assert set(rows) == {"jaxrs f32", "transformers"}
    for row in rows.values():
        m = row["medians"]
        keys = ("prefill_tok_s", "prefill_tok_s@40", "ttft_ms", "decode_tok_s", "agg_tok_s@2", "peak_mib")
        figures = [m[k] for k in keys]
        assert None not in figures and min(figures) > 0, (figures, row["notes"])
        assert len(row["passes"]) == 1 and row["concurrent"]
    assert rows["jaxrs f32"]["versions"]["jax"] and rows["transformers"]["versions"]["torch"]
    assert out["machine"]["cores"] >= 1 and out["machine"]["cpu"]


def test_peers_script_checkouts(tmp_path):
    """An A/B of two jaxrs checkouts (--jaxrs-checkout) on a tiny model: "new" is this tree, running its own
    worker; "base" is a folder whose jaxrs is a link to this tree's and whose bench/peer_worker.py predates
    the protocol version, so this tree's worker drives it. Warm-up compile time and host shares included."""
    model = tiny_model(tmp_path)
    base = tmp_path / "base"
    (base / "bench").mkdir(parents=True)
    (base / "jaxrs").symlink_to(BENCH.parent / "jaxrs")
    (base / "bench" / "peer_worker.py").write_text("raise SystemExit('an old worker: not to be run')\n")
    # one sequence at a time: the fewest step shapes for the two warm-ups to compile
    sizes = ["--prompt-tokens", "16", "--new-tokens", "4", "--passes", "1", "--concurrency", "1"]
    checkouts = ["--jaxrs-checkout", f"base={base}", "--jaxrs-checkout", f"new={BENCH.parent}"]
    out = bench(
        "bench_peers.py",
        *("--model", str(model), *checkouts, "--engines", "jaxrs@base", "jaxrs@new", "--jaxrs-modes", "f32"),
        *sizes,
        *("--skip-cold", "--out", str(tmp_path / "p.json")),
    )
    rows = out["rows"]
    assert list(rows) == ["jaxrs@base", "jaxrs@new"]
    for label, folder in (("jaxrs@base", base), ("jaxrs@new", BENCH.parent)):
        row = rows[label]
        assert Path(row["versions"]["jaxrs_path"]) == folder, row["notes"]
        assert row["checkout"]["worker"] == str(BENCH / "peer_worker.py") and row["protocol"] >= 2
        m = row["medians"]
        keys = ("prefill_tok_s", "decode_tok_s", "agg_tok_s@1", "warmup_s", "warmup_shapes")
        figures = [m[k] for k in keys]
        assert None not in figures and min(figures) > 0, (figures, row["notes"])
        assert 0 <= m["decode_host_share"] < 1 and 0 <= m["host_share@1"] < 1, row["notes"]
    assert "speaks protocol 1" in " ".join(rows["jaxrs@base"]["notes"])
    assert "A/B ratios against jaxrs@base" in out["table"] and "| jaxrs@new vs jaxrs@base |" in out["table"]


def test_gpu_script_tiny(tmp_path):
    """bench/gpu.py on tiny shapes: synthetic packed weights through the engine with the Pallas kernels
    (interpret mode on CPU), and the kernel-by-kernel Pallas vs XLA timings."""
    out = bench(
        "gpu.py", "--tiny", "--formats", "Q4_K", "--impls", "pallas", "--layer-loops", "unrolled",
        "--out", str(tmp_path / "g.json"),
    )  # fmt: skip
    assert [row["loop"] for row in out["models"]] == ["unrolled"]  # scan: every other engine test
    for row in out["models"]:
        assert "error" not in row, row.get("error")
        assert row["format"] == "Q4_K" and row["decode_tok_s"] > 0 and row["batch_tok_s"] > 0
        assert 0 < row["weight_gb"] and row["roofline_tok_s"] > 0 and out["copy_bandwidth_gb_s"] > 0
    assert {k["op"] for k in out["kernels"]} == {"paged_attention", "qmatmul Q4_K"}
    assert all(k["pallas_ms"] and k["pallas_unsplit_ms"] and k["xla_ms"] for k in out["kernels"])
    assert out["complete"]


def test_cpu_matmul_script(tmp_path):
    out = bench(
        "bench_cpu_matmul.py",
        *("--rows", "1", "--layers", "2", "--repeats", "1", "--formats", "F32", "U8M"),
        *("--xla-option", "xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"),
        *("--out", str(tmp_path / "m.json")),
    )
    assert set(out["ms"]) == {"F32", "U8M"}
    assert out["ms"]["U8M"]["jaxrs @1"] > 0 and out["ms"]["U8M"]["fused @1"] is None  # float only
    assert out["ms"]["F32"]["fused @1"] > 0


def test_cpu_int8_script(tmp_path):
    out = bench(
        "bench_cpu_int8.py",
        *("--shapes", "64x64", "--repeats", "1", "--settings", "default", "YNNPACK dot fusions"),
        *("--out", str(tmp_path / "i.json")),
    )
    assert [r["setting"] for r in out["rows"]] == ["default", "YNNPACK dot fusions"]
    assert all(r["int8_dot"][0] > 0 and r["f32_gemv"][0] > 0 for r in out["rows"])


def test_cpu_attention_script(tmp_path):
    """Every formulation on a GQA shape and on Gemma's (one KV head, head_dim 256, a sliding window), one
    row and two; the script checks each output against jaxrs's before timing it."""
    out = bench(
        "bench_cpu_attention.py",
        *("--shapes", "demo", "gemma", "--cases", "1:40:4", "2:20:2", "--layers", "2", "--repeats", "1"),
        *("--out", str(tmp_path / "a.json")),
    )
    rows = out["ms"]
    assert list(rows) == [
        f"{shape}, {case}, float16"
        for shape in ("demo", "gemma")
        for case in ("1 x 40 tokens, width 64", "2 x 20 tokens, width 32")
    ]
    every = {"jaxrs", "dots", "products", "block_diagonal", "head_gemvs", "float16_dots", "lean_softmax"}
    for label, row in rows.items():
        assert set(row) == (every if "1 x" in label else every - {"head_gemvs"})  # one-row GEMVs: one row
        assert all(r["ms"] > 0 and r["cpu_ms"] > 0 for r in row.values())


def test_prefill_attention_script(tmp_path):
    out = bench(
        "bench_prefill_attention.py",
        *("--cases", "40:20:8", "--variants", "dense", "tiled", "16:32", "--layers", "2", "--repeats", "1"),
        *("--heads", "qwen05", "--window", "24", "--kv-cache-dtype", "float16"),
        *("--out", str(tmp_path / "p.json")),
    )
    assert [r["variant"] for r in out["results"]] == ["dense", "tiled", "16:32"]
    assert all(r["cpu_s"] > 0 and r["wall_s"] > 0 for r in out["results"])


def test_prefill_products_script(tmp_path):
    out = bench(
        "bench_prefill_products.py",
        *("--rows", "8", "--shapes", "gemma3", "--repeats", "1", "--out", str(tmp_path / "m.json")),
    )
    assert len(out["results"]) == 2 * 8 and all(r["cpu_ms"] >= 0 for r in out["results"])


def test_prefill_step_script(tmp_path):
    out = bench(
        "bench_prefill_step.py",
        *("--tokens", "40", "--repeats", "1", "--variant", "kt16:pallas_kernels.tiled_attention.KEY_TILE=16"),
        *("--variant", "f32:kernel.qmatmul=xla", "--out", str(tmp_path / "s.json")),
    )
    assert [(r["tokens"], r["variant"]) for r in out["results"]] == [(40, "base"), (40, "kt16"), (40, "f32")]
    assert all(r["cpu_s"] > 0 and r["wall_s"] > 0 for r in out["results"])
    diffs = {r["variant"]: r["logit_diff"] for r in out["results"]}
    assert diffs["kt16"] < 1e-3  # the same products, attention's tiles added in another order
    assert diffs["f32"] < 1.0  # f32 products against the base's (bfloat16 on a CPU with bfloat16 dots)


def test_speculative_script(tmp_path):
    """Plain, draft-model and n-gram engines on a tiny random model (its own ISQ Q8_0 copy as draft, in
    the device's layout and in the file format), and requests with speculation off at two streams against
    a plain engine."""
    model = tiny_model(tmp_path)
    sizes = ["--ks", "2", "--new-tokens", "4", "--passes", "1", "--prompts", "short", "--off-streams", "2"]
    drafts = ["--draft-isq", "Q8_0", "--draft-file-layout"]
    out = bench(
        "bench_speculative.py",
        *("--target", str(model), "--draft", str(model), *sizes, *drafts, "--out", str(tmp_path / "s.json")),
    )
    rows = {row["engine"]: row for row in out["rows"]}
    assert set(rows) == {"plain", "draft K=2", "draft file-layout K=2", "ngram K=2"}
    assert rows["draft K=2"]["acceptance"] >= 0.5  # its own 8-bit copy: nearly every token kept
    assert all(row["same_tokens_as_plain"] and row["decode_tok_s"] > 0 for row in rows.values())
    off = {row["engine"]: row for row in out["off_streams"]}
    assert off["speculative engine, requests off"]["spec_decode_drafts"] == 0
    assert min(row["aggregate_tok_s"] for row in off.values()) > 0


def test_numerics_script(tmp_path):
    out = bench(
        "bench_numerics.py",
        *(
            "--setting",
            "exact:packed=False,kv_cache_dtype=float32",
            "--setting",
            "kv16:kv_cache_dtype=float16",
        ),
        *("--new-tokens", "2", "--out", str(tmp_path / "n.json")),
    )
    exact, kv16 = out["results"]
    assert (exact["setting"], exact["max_logprob_diff"], exact["greedy_same"]) == ("exact", 0.0, 5)
    assert kv16["options"] == {"kv_cache_dtype": "float16"} and 20 < kv16["perplexity"] < 35
