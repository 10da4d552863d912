"""Accelerator benchmark on synthetic weights: Llama-3-8B and Mistral-7B shapes in BF16, Q8_0 and Q4_K.

    python bench/gpu.py [--models llama3-8b mistral-7b] [--formats BF16 Q4_K Q8_0] [--impls pallas xla]
                        [--layer-loops scan unrolled]
    python bench/gpu.py --tiny     # tiny shapes: runs anywhere (Pallas in interpret mode off GPU)

Weights are random (timing only: the text is noise), built in the parameter tree the Llama family
uses, matrices as packed `QuantizedTensor`s of random bytes in the format's layout, on the device.
For each model x format x kernel implementation (`--impls`: the `paged_attention` and `qmatmul` ops
both set to it) x layer loop (`--layer-loops`: under `lax.scan` a kernel may be handed a copy of each
layer's weights sliced out of the stack, which unrolled layers avoid), through the engine (greedy, EOS
ignored, prefix caching off, medians of --passes after a warm-up):

- prefill tok/s: a --prompt-tokens prompt / its time to first token;
- decode tok/s at batch 1: the other --new-tokens - 1 tokens of that sequence / their time, against
  the HBM roofline: (copy bandwidth) / (bytes of weights one decode step reads);
- aggregate tok/s at --batch concurrent requests (short prompts, --new-tokens each, submitted at once).

Also, once: the copy bandwidth (a jitted elementwise pass over a large array: bytes read + written /
time), and Pallas against XLA for each op at decode and prefill shapes (ms per call, median), with the
Pallas kernels' default split of small grids (pallas_kernels/occupancy.py) against no split.
Prints tables, writes JSON (--out, default bench/results/gpu.json) after every row, with "complete": false
until the end, so a run cut short by a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import functools
import gc
import itertools
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from common import RESULTS, fmt, machine_facts, markdown_table, median, median_ms, versions, write_json
from peer_worker import jaxrs_batch, jaxrs_single

from jaxrs.config import ModelConfig
from jaxrs.engine.engine import LAYER_LOOPS, Engine, EngineConfig
from jaxrs.llm import resolve_dtype
from jaxrs.loading import LoadedModel
from jaxrs.models.decoder import model_graph
from jaxrs.ops import Kernels, resolve
from jaxrs.quant import FORMATS, QuantizedTensor, parse_format

SHAPES = {  # the published configs' shapes
    "llama3-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rope_theta=500000.0, max_position_embeddings=8192,
    ),
    "mistral-7b": dict(  # v0.3: 32k vocabulary, no sliding window
        vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rope_theta=1000000.0, max_position_embeddings=32768,
    ),
    "tiny": dict(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=64, max_position_embeddings=2048,
    ),
}  # fmt: skip
BLOCK = 16


def model_config(name: str) -> ModelConfig:
    return ModelConfig(architecture="llama", name=name, **SHAPES[name])


def random_packed(key: jax.Array, fmt_name: str, out_in: tuple[int, int], lead: tuple[int, ...]):
    """A `QuantizedTensor` of random bytes in `fmt_name`'s layout (small positive scales), on the device."""
    spec = FORMATS[fmt_name]
    arrays = {}
    for field, k in zip(spec.fields, jax.random.split(key, len(spec.fields)), strict=True):
        shape = (*lead, out_in[0], out_in[1] // field.per)
        dtype = jnp.dtype(field.dtype)
        if jnp.issubdtype(dtype, jnp.floating):
            arrays[field.name] = (jax.random.uniform(k, shape, jnp.float32) * 2e-3).astype(dtype)
        else:
            bits = jax.random.bits(k, shape, dtype=jnp.dtype(f"uint{8 * dtype.itemsize}"))
            arrays[field.name] = jax.lax.bitcast_convert_type(bits, dtype)
    return QuantizedTensor(fmt_name, out_in, arrays)


def synthetic_params(cfg: ModelConfig, weight_format: str, dtype: jnp.dtype, seed: int = 0) -> dict:
    """The model's parameter tree (the shapes of its module tree, layers stacked) filled with random
    values; matrices in `weight_format` (a float format: plain arrays), norms and biases in `dtype`."""
    _, abstract = model_graph(cfg)
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    spec = FORMATS[weight_format]

    def weight(shape: tuple[int, ...]) -> jax.Array | QuantizedTensor:
        if spec.family != "float":
            return random_packed(next(keys), weight_format, shape[-2:], shape[:-2])
        w = jax.random.normal(next(keys), shape, jnp.float32) * 0.02
        return w.astype(spec.fields[0].dtype)

    flat, tree = jax.tree_util.tree_flatten_with_path(abstract)
    vectors = {path for path, _ in flat if path[-1].key == "bias" or "norm" in jax.tree_util.keystr(path)}
    leaves = [jnp.ones(a.shape, dtype) if path in vectors else weight(a.shape) for path, a in flat]
    return jax.block_until_ready(jax.tree.unflatten(tree, leaves))


def decode_bytes(params: dict, cfg: ModelConfig) -> int:
    """Bytes of weights one decode step reads: everything but the embedding table (one row of it)."""
    read = {key: tree for key, tree in params.items() if key != "embed" or cfg.tie_word_embeddings}
    return sum(int(x.nbytes) for x in jax.tree.leaves(read))


def synthetic_tokenizer(vocab_size: int):
    """A word-level tokenizer over `vocab_size` made-up tokens: the engine needs one to detokenize."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models

    from jaxrs.tokenizer import Tokenizer

    backend = Backend(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    return Tokenizer(backend=backend, bos_token_id=1, eos_token_ids=[2])


def copy_bandwidth(nbytes: int, repeats: int) -> float:
    """Bytes/s of a jitted elementwise pass (reads and writes every byte once) over an f32 array."""
    x = jnp.ones(nbytes // 4, jnp.float32)
    ms = median_ms(jax.jit(lambda a: a + 1.0), x, repeats=repeats)
    return 2 * nbytes / (ms / 1e3)


# -- the engine ---------------------------------------------------------------------------------------


def engine_row(cfg, params, tokenizer, impl: str, layer_loop: str, dtype, args) -> dict:
    """Prefill, batch-1 decode and batched decode through the engine, with both ops set to `impl`."""
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, cfg.vocab_size, args.prompt_tokens).tolist()
    short = [rng.integers(3, cfg.vocab_size, 16).tolist() for _ in range(args.batch)]
    blocks = -(-(16 + args.new_tokens) // BLOCK)
    config = EngineConfig(
        max_num_seqs=args.batch,
        kv_cache_tokens=max(args.prompt_tokens + args.new_tokens, args.batch * blocks * BLOCK)
        + BLOCK * args.batch,
        max_model_len=args.prompt_tokens + args.new_tokens + BLOCK,
        max_num_batched_tokens=max(2048, args.prompt_tokens),
        prefix_caching=False,
        layer_loop=layer_loop,
    )
    loaded = LoadedModel(cfg, params, tokenizer, {}, f"synthetic {cfg.name}")
    kernels = Kernels.from_mapping({"paged_attention": impl, "qmatmul": impl})
    engine = Engine(loaded, config, kernels=kernels, dtype=dtype)
    passes = []
    for p in range(args.passes + 1):  # pass 0 compiles
        single = jaxrs_single(engine, prompt, args.new_tokens)
        batch = jaxrs_batch(engine, short, args.new_tokens)
        if p:
            passes.append(
                {
                    "prefill_tok_s": args.prompt_tokens / single["ttft_s"],
                    "decode_tok_s": single["decode_tokens"] / single["decode_s"],
                    "batch_tok_s": batch["new_tokens"] / batch["wall_s"],
                }
            )
    return {k: median(p[k] for p in passes) for k in passes[0]} | {"passes": passes}


def model_rows(args, dtype, bandwidth: float, rows: list[dict], save: Callable[[], None]) -> None:
    """Appends a row per model x format x implementation x layer loop to `rows`, calling `save` after
    each."""
    for name in args.models:
        cfg = model_config(name)
        tokenizer = synthetic_tokenizer(cfg.vocab_size)
        for weight_format in args.formats:
            try:
                params = synthetic_params(cfg, weight_format, dtype)
            except Exception as e:  # out of memory, most likely: the other rows still run
                rows.append({"model": name, "format": weight_format, "error": f"{type(e).__name__}: {e}"})
                save()
                continue
            weight_bytes = decode_bytes(params, cfg)
            for impl, loop in itertools.product(args.impls, args.layer_loops):
                row = {"model": name, "format": weight_format, "impl": impl, "loop": loop}
                row["weight_gb"] = weight_bytes / 1e9
                row["roofline_tok_s"] = bandwidth / weight_bytes
                start = time.perf_counter()
                try:
                    row |= engine_row(cfg, params, tokenizer, impl, loop, dtype, args)
                    row["pct_roofline"] = 100 * row["decode_tok_s"] / row["roofline_tok_s"]
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {e}"
                    traceback.print_exc()
                row["seconds"] = time.perf_counter() - start
                print(f"{name} {weight_format} {impl} {loop}: {row['seconds']:.0f} s", flush=True)
                rows.append(row)
                save()
                gc.collect()
            del params
            gc.collect()


# -- kernels alone ------------------------------------------------------------------------------------


def attention_case(cfg: ModelConfig, batch: int, q_len: int, context: int, dtype) -> tuple:
    """Arguments of a paged-attention call: `batch` sequences of `context` keys, the last `q_len` of them
    queried, pages scattered over the pool."""
    per_seq = -(-context // BLOCK)
    num_blocks = batch * per_seq + 1
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    cache_shape = (1, num_blocks, BLOCK, cfg.num_kv_heads, cfg.head_dim)
    q = jax.random.normal(k1, (batch, q_len, cfg.num_heads, cfg.head_dim), jnp.float32).astype(dtype)
    k = jax.random.normal(k2, cache_shape, jnp.float32).astype(dtype)
    v = jax.random.normal(k3, cache_shape, jnp.float32).astype(dtype)
    tables = np.random.default_rng(0).permutation(num_blocks - 1)[: batch * per_seq].reshape(batch, per_seq)
    positions = np.broadcast_to(np.arange(context - q_len, context), (batch, q_len))
    context_lens = jnp.full((batch,), context, jnp.int32)
    return (
        q,
        k,
        v,
        jnp.int32(0),
        jnp.asarray(tables, jnp.int32),
        jnp.asarray(positions, jnp.int32),
        context_lens,
    )


def kernel_rows(args, dtype) -> list[dict]:
    cfg = model_config(args.models[0])
    rows = []
    scale = cfg.head_dim**-0.5
    for batch, q_len, context in args.attention_cases:
        case = attention_case(cfg, batch, q_len, context, dtype)
        row = {"op": "paged_attention", "shape": f"batch {batch}, q_len {q_len}, context {context}"}
        row |= time_kernels("paged_attention", case, args.repeats, {"num_splits": 1}, scale=scale)
        rows.append(finish_kernel_row(row))
    out_in = (cfg.intermediate_size, cfg.hidden_size)
    for weight_format in args.formats:
        w = random_packed(jax.random.key(2), weight_format, out_in, ())
        for m in args.qmatmul_rows:
            x = jax.random.normal(jax.random.key(3), (m, cfg.hidden_size), jnp.float32).astype(dtype)
            row = {
                "op": f"qmatmul {weight_format}",
                "shape": f"x [{m}, {out_in[1]}], W [{out_in[0]}, {out_in[1]}]",
            }
            row |= time_kernels("qmatmul", (x, w), args.repeats, {"split_k": 1})
            best = min((t for t in (row["pallas_ms"], row["xla_ms"]) if t), default=None)
            row["weight_gb_s"] = w.nbytes / 1e6 / best if best else None  # W read once per call
            rows.append(finish_kernel_row(row))
    return rows


def time_kernels(op: str, call_args: tuple, repeats: int, unsplit: dict, **options) -> dict:
    """ms per call of `op`'s Pallas kernel (its default split, then with the `unsplit` options) and of its
    XLA reference, on `call_args`."""
    variants = {
        "pallas_ms": ("pallas", options),
        "pallas_unsplit_ms": ("pallas", options | unsplit),
        "xla_ms": ("xla", options),
    }
    return {
        key: safe_time(jax.jit(functools.partial(resolve(op, impl), **kw)), *call_args, repeats=repeats)
        for key, (impl, kw) in variants.items()
    }


def safe_time(fn, *args, repeats: int) -> float | None:
    try:
        return median_ms(fn, *args, repeats=repeats)
    except Exception:  # a kernel that does not lower here: reported as missing
        traceback.print_exc()
        return None


def finish_kernel_row(row: dict) -> dict:
    pallas, xla, unsplit = row["pallas_ms"], row["xla_ms"], row["pallas_unsplit_ms"]
    row["xla_over_pallas"] = xla / pallas if pallas and xla else None
    print(
        f"{row['op']}, {row['shape']}: pallas {fmt(pallas, 3)} ms (unsplit {fmt(unsplit, 3)}), "
        f"xla {fmt(xla, 3)} ms",
        flush=True,
    )
    return row


def model_table(rows: list[dict], batch: int) -> str:
    header = ["model", "format", "kernels", "layers", "weights GB", "prefill tok/s", "decode tok/s (b=1)"]
    header += ["roofline tok/s", "% of roofline", f"aggregate tok/s (b={batch})"]
    lines = []
    for r in rows:
        cells = [r["model"], r["format"], r.get("impl", "—"), r.get("loop", "—"), fmt(r.get("weight_gb"), 2)]
        cells += [fmt(r.get(k)) for k in ("prefill_tok_s", "decode_tok_s", "roofline_tok_s", "pct_roofline")]
        cells.append(fmt(r.get("batch_tok_s")) if "error" not in r else "error: " + r["error"][:80])
        lines.append(cells)
    return markdown_table(header, lines)


def kernel_table(rows: list[dict]) -> str:
    keys = ("pallas_ms", "pallas_unsplit_ms", "xla_ms")
    cells = [[r["op"], r["shape"], *(fmt(r[k], 3) for k in keys), fmt(r["xla_over_pallas"], 2)] for r in rows]
    header = ["op", "shape", "Pallas ms", "Pallas unsplit ms", "XLA ms", "XLA / Pallas"]
    return markdown_table(header, cells)


# -- main ---------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and sizes (a smoke run, any machine)")
    ap.add_argument("--models", nargs="+", choices=sorted(SHAPES))
    ap.add_argument("--formats", nargs="+", default=["BF16", "Q4_K", "Q8_0"])  # the targets first
    ap.add_argument("--impls", nargs="+", default=["pallas", "xla"], help="kernel implementations to compare")
    ap.add_argument("--layer-loops", nargs="+", default=["scan"], choices=LAYER_LOOPS)
    ap.add_argument("--dtype", default="auto", help="compute dtype (auto: bfloat16 on accelerators)")
    ap.add_argument("--prompt-tokens", type=int)
    ap.add_argument("--new-tokens", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--passes", type=int)
    ap.add_argument("--skip-models", action="store_true", help="kernel timings only")
    ap.add_argument("--out", type=Path, default=RESULTS / "gpu.json")
    args = ap.parse_args()
    full = dict(models=["llama3-8b", "mistral-7b"], prompt_tokens=512, new_tokens=128, batch=64, passes=3)
    tiny = dict(models=["tiny"], prompt_tokens=32, new_tokens=8, batch=4, passes=1)
    for key, value in (tiny if args.tiny else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.formats = [parse_format(f) for f in args.formats]
    args.copy_bytes = 2**26 if args.tiny else 2**31
    args.repeats = 3 if args.tiny else 20
    args.attention_cases = (
        [(2, 1, 64), (1, 32, 32)] if args.tiny else [(1, 1, 1024), (1, 1, 4096), (64, 1, 1024), (1, 512, 512)]
    )  # (batch, q_len, context)
    args.qmatmul_rows = [1, 32] if args.tiny else [1, 64, 512]
    return args


def main() -> None:
    args = parse_args()
    dtype = resolve_dtype(args.dtype)
    device = jax.devices()[0]
    print(f"{device.device_kind} ({jax.default_backend()}), compute dtype {dtype.name}", flush=True)
    report = {
        "device": device.device_kind,
        "backend": jax.default_backend(),
        "dtype": dtype.name,
        "machine": machine_facts(),
        "versions": versions(["jaxrs", "jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin"]),
        "args": vars(args),
        "complete": False,
        "models": [],
        "kernels": [],
    }

    def save() -> None:
        write_json(args.out, report)

    bandwidth = copy_bandwidth(args.copy_bytes, args.repeats)
    report["copy_bandwidth_gb_s"] = bandwidth / 1e9
    print(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s", flush=True)
    report["kernels"] = kernel_rows(args, dtype)
    save()
    if not args.skip_models:
        model_rows(args, dtype, bandwidth, report["models"], save)

    print(f"\ncopy bandwidth {bandwidth / 1e9:.1f} GB/s; {device.device_kind}; compute {dtype.name}")
    print(model_table(report["models"], args.batch))
    print()
    print(kernel_table(report["kernels"]))
    report["complete"] = True
    save()


if __name__ == "__main__":
    main()
