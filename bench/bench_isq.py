"""Quantized formats on CPU: what each one costs (perplexity) and buys (bytes, decode speed).

    python bench/bench_isq.py [--model PATH] [--formats Q8_0 Q4_K ...] [--passes 3] [--new-tokens 128]
        [--prompt-tokens 32] [--threads 2] [--no-llamacpp] [--fresh] [--out bench/results/isq.json]

Per format: the ISQ load time (`LLM(model, isq=FMT)`), then, for a GGUF model and a format GGUF stores,
the model re-quantized into a GGUF file (`jaxrs.loading.gguf_export`, cached under
<cache>/models/requantized/) and loaded `packed=True`: the same weights as ISQ, in a file llama.cpp
reads too. On that model: weight bytes on the device, the share of the weights in the format, perplexity
on tests/data/english.txt, and single-stream decode tok/s (greedy, EOS ignored, prefix caching off,
median of --passes after a warm-up pass). In turn with each of those passes, the f32 model (the
source dequantized, the first row) and llama.cpp (`peer_worker.py` under the interpreter
bench/setup_peers.sh installs, --threads threads) decode the same way, llama.cpp from the same file:
the ratios compare passes run side by side. Formats without a GGUF type (HQQ, Q8_K) are measured on
the ISQ load (its embedding in Q8_0, as in the GGUF). Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from bench_peers import Row, Worker, peer_python, probe_llamacpp, thread_env
from common import RESULTS, fmt, machine_facts, markdown_table, median, versions, write_json
from peer_worker import jaxrs_single

ENGLISH = Path(__file__).parent.parent / "tests" / "data" / "english.txt"


def engine_kwargs(args: argparse.Namespace) -> dict:
    """One stream: a small KV pool, every pass computes its prompt."""
    ctx = args.prompt_tokens + args.new_tokens + 16
    return {
        "kv_cache_tokens": max(2048, ctx),
        "max_model_len": 1024,
        "max_num_seqs": 4,
        "prefix_caching": False,
        "kv_cache_dtype": "float32",  # the figures were measured with an exact cache
    }


def format_share(params: dict, fmt_name: str) -> float:
    """Fraction of the model's weights (elements) held in `fmt_name`."""
    import jax

    from jaxrs.quant import QuantizedTensor

    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QuantizedTensor))
    total = sum(int(np.prod(x.shape)) for x in leaves)
    packed = sum(int(np.prod(x.shape)) for x in leaves if getattr(x, "fmt", None) == fmt_name)
    return packed / total


def bits_per_weight(fmt_name: str) -> float:
    """GGUF's bits per weight for a GGUF type, else our layout's (HQQ)."""
    from gguf.constants import GGML_QUANT_SIZES

    from jaxrs.quant import FORMATS

    spec = FORMATS[fmt_name]
    if spec.ggml_type is None:
        return spec.bits_per_weight()
    block, size = GGML_QUANT_SIZES[spec.ggml_type]
    return 8 * size / block


def requantized_file(src: Path, fmt_name: str, fresh: bool) -> tuple[Path, float | None]:
    """The cached GGUF of `src` in `fmt_name` (written now if missing, stale or `fresh`), and the
    seconds writing it took (None when it came from the cache)."""
    from jaxrs.loading.gguf_export import requantize_gguf
    from jaxrs.paths import cache_dir

    dst = cache_dir() / "models" / "requantized" / f"{src.stem}.{fmt_name}.gguf"
    if dst.is_file() and not fresh and dst.stat().st_mtime >= src.stat().st_mtime:
        return dst, None
    dst.parent.mkdir(parents=True, exist_ok=True)
    return dst, requantize_gguf(src, dst, fmt_name)["seconds"]


def decode_rates(runs: dict[str, Callable[[], dict]], passes: int) -> dict:
    """Median decode tok/s of each run (one greedy stream, `peer_worker`'s reply), the runs taking turns
    pass by pass so the drifts of a shared machine fall on all alike. The first pass warms up."""
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for p in range(passes + 1):
        for name, run in runs.items():
            reply = run()
            if p:
                rates[name].append(reply["decode_tokens"] / reply["decode_s"])
    return {f"{n}_tok_s": median(r) for n, r in rates.items()} | {f"{n}_passes": r for n, r in rates.items()}


class LlamaCpp:
    """llama.cpp on a GGUF file: one `peer_worker.py` process per file, under the peer's interpreter."""

    def __init__(self, args: argparse.Namespace, ids: list[int]):
        self.args, self.ids = args, ids
        common = ["--threads", str(args.threads), "--ctx", str(engine_kwargs(args)["max_model_len"])]
        self.row = Row("llama.cpp", "llamacpp", str(peer_python("llamacpp")), common)
        self.env = thread_env(args.threads)
        self.logs = Path(tempfile.mkdtemp(prefix="jaxrs-isq-"))
        self.probed = False

    @contextlib.contextmanager
    def worker(self, path: Path) -> Iterator[Worker]:
        """A loaded worker on `path`, closed on exit."""
        log = self.logs / f"{path.stem}.log"
        if not self.probed:  # once: does it run here with its AMX / repacked buffers?
            probe_llamacpp(self.row, str(path), {"ids": self.ids[:16], "text": ""}, self.env, log)
            self.probed = True
        worker = Worker(self.row.command(str(path)), self.env, log)
        try:
            worker.read(self.args.timeout)  # its ready line
            yield worker
        finally:
            worker.close()


def measure_format(src: Path, kind: str, fmt_name: str, args: argparse.Namespace, f32, ids, text, llamacpp):
    """One row: ISQ time, then the model the speed is measured on (the re-quantized file, packed, when
    there is one), its bytes and perplexity, and its decode speed in turn with the f32 model's and
    llama.cpp's on the same file."""
    from jaxrs.llm import LLM
    from jaxrs.quant import FORMATS

    row: dict = {"format": fmt_name, "bits_per_weight": bits_per_weight(fmt_name)}
    start = time.perf_counter()
    llm = LLM(str(src), isq=fmt_name, **engine_kwargs(args))
    row["isq_load_s"] = time.perf_counter() - start
    path = None
    if kind == "gguf" and FORMATS[fmt_name].ggml_type is not None and fmt_name != "Q8_K":
        del llm
        path, row["export_s"] = requantized_file(src, fmt_name, args.fresh)
        row["file_mib"] = path.stat().st_size / 2**20
        llm = LLM(str(path), packed=True, **engine_kwargs(args))
        row["measured_on"] = "GGUF, packed"
    else:
        row["measured_on"] = "ISQ load"
    n = args.new_tokens
    runs = {
        "decode": lambda: jaxrs_single(llm.engine, ids, n),
        "f32_decode": lambda: jaxrs_single(f32.engine, ids, n),
    }
    use_peer = llamacpp is not None and path is not None
    with llamacpp.worker(path) if use_peer else contextlib.nullcontext() as peer:
        if peer is not None:
            runs["llamacpp_decode"] = lambda: peer.ask(
                args.timeout, op="single", ids=ids, text="", new_tokens=n
            )
        row |= model_figures(llm, fmt_name, text, runs, args)
    return row


def model_figures(llm, fmt_name: str | None, text: str, runs: dict, args: argparse.Namespace) -> dict:
    """Bytes, share of the weights in `fmt_name`, perplexity, and the decode speeds of `runs`."""
    from jaxrs.eval import perplexity
    from jaxrs.quant.tensor import tree_nbytes

    params = llm.model.params
    return {
        "weight_mib": tree_nbytes(params) / 2**20,
        "share_in_format": format_share(params, fmt_name) if fmt_name else None,
        "perplexity": perplexity(llm, text),
    } | decode_rates(runs, args.passes)


def progress(row: dict) -> None:
    print(
        f"{row['format']}: load {row['isq_load_s']:.1f} s, {row['weight_mib']:.1f} MiB, "
        f"ppl {row['perplexity']:.3f}, decode {row['decode_tok_s']:.1f} tok/s, "
        f"llama.cpp {fmt(row.get('llamacpp_decode_tok_s'))}",
        flush=True,
    )


def table(rows: list[dict]) -> str:
    f32 = rows[0]
    header = [
        "format",
        "bits/weight",
        "weights in it",
        "weight MiB",
        "ppl",
        "ppl / f32",
        "jaxrs decode tok/s",
        "llama.cpp decode tok/s",
        "jaxrs / llama.cpp",
        "jaxrs / f32",
        "ISQ load s",
    ]
    lines = []
    for r in rows:
        peer = r.get("llamacpp_decode_tok_s")
        share = r.get("share_in_format")
        lines.append(
            [
                r["format"] + ("" if r.get("measured_on") != "ISQ load" else " (ISQ)"),
                fmt(r.get("bits_per_weight"), 2),
                "—" if share is None else f"{100 * share:.0f}%",
                fmt(r["weight_mib"]),
                fmt(r["perplexity"], 3),
                f"{r['perplexity'] / f32['perplexity']:.4f}",
                fmt(r["decode_tok_s"]),
                fmt(peer),
                "—" if not peer else f"{r['decode_tok_s'] / peer:.2f}x",
                f"{r['decode_tok_s'] / r.get('f32_decode_tok_s', r['decode_tok_s']):.2f}x",
                fmt(r.get("isq_load_s")),
            ]
        )
    return markdown_table(header, lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF file or model folder (default: the demo GGUF)")
    ap.add_argument("--formats", nargs="+", help="formats to measure (default: every quantized format)")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=32, help="prompt of the decode runs")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    ap.add_argument("--no-llamacpp", action="store_true", help="skip the llama.cpp measurements")
    ap.add_argument("--fresh", action="store_true", help="write the re-quantized files again")
    ap.add_argument("--timeout", type=float, default=900, help="seconds any one llama.cpp answer may take")
    ap.add_argument("--out", type=Path, default=RESULTS / "isq.json")
    args = ap.parse_args()
    began = time.perf_counter()

    from jaxrs.llm import LLM
    from jaxrs.loading import resolve_source
    from jaxrs.quant import QUANTIZED_FORMATS, parse_format

    kind, src = resolve_source(args.model)
    formats = [parse_format(f) for f in args.formats] if args.formats else list(QUANTIZED_FORMATS)
    text = ENGLISH.read_text()
    start = time.perf_counter()
    # the reference, kept for every row's speed ratio
    f32_llm = LLM(str(src), packed=False, **engine_kwargs(args))
    f32 = {"format": "f32", "isq_load_s": time.perf_counter() - start, "measured_on": "f32 load"}
    ids = f32_llm.tokenizer.encode(text)[: args.prompt_tokens]
    runs = {"decode": lambda: jaxrs_single(f32_llm.engine, ids, args.new_tokens)}
    f32 |= model_figures(f32_llm, None, text, runs, args)  # llama.cpp has no f32 file here
    rows = [f32]
    progress(f32)
    llamacpp = None
    if not args.no_llamacpp:
        if peer_python("llamacpp").is_file():
            llamacpp = LlamaCpp(args, ids)
        else:
            print(
                f"skipping llama.cpp: not installed at {peer_python('llamacpp')} (bash bench/setup_peers.sh)"
            )
    for name in formats:
        row = measure_format(src, kind, name, args, f32_llm, ids, text, llamacpp)
        rows.append(row)
        progress(row)
    text_table = table(rows)
    print(
        f"\n{src.name}: perplexity on {ENGLISH.name}, decode of {args.new_tokens} tokens after a "
        f"{len(ids)}-token prompt, greedy, median of {args.passes} passes\n"
    )
    print(text_table)
    write_json(
        args.out,
        {
            "model": str(src),
            "args": vars(args),
            "machine": machine_facts(),
            "versions": versions(["jaxrs", "jax", "jaxlib", "gguf"]),
            "rows": rows,
            "table": text_table,
            "wall_s": time.perf_counter() - began,
        },
    )


if __name__ == "__main__":
    main()
