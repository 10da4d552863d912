"""Peak resident memory of loading a model and serving a few requests: jaxrs against llama.cpp, same GGUF and
the same KV capacity.

    python bench/bench_memory.py [--models PATH ...] [--kv-tokens 1024] [--modes default dequantized]
        [--engines jaxrs llamacpp] [--requests 4] [--new-tokens 32] [--out bench/results/memory.json]

Every measurement is a fresh process, and its figure that process's peak resident memory (`ru_maxrss`
from `wait4`): the bare JAX runtime (import jax and run one jitted op: what any JAX program costs); jaxrs
per --modes (`LLM(model, kv_cache_tokens=N, max_model_len=N)`, then --requests greedy requests of
--new-tokens each, in one batch), whichever `import jaxrs` finds (PYTHONPATH=CHECKOUT measures another
checkout); llama.cpp (llama-cpp-python from `bench/setup_peers.sh`, `n_ctx=N`, the same requests one
after another). jaxrs's process also reports `Engine.memory()` after serving: the weights, the KV pool,
the compiled steps (resident memory grown since the engine was ready) and the rest.

The target ratio is (jaxrs peak - bare JAX peak) / llama.cpp peak: what jaxrs adds to the runtime against
all that llama.cpp takes. Prints a table, writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common import RESULTS, fmt, machine_facts, markdown_table, write_json

MODELS = Path.home() / ".cache" / "jaxrs" / "models"
PEERS = Path(os.environ.get("JAXRS_PEERS", Path.home() / ".cache" / "jaxrs" / "peers"))
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The primary colors are"]
PARTS = ("weights", "kv_pool", "compiled", "rest")
MODES = {  # "dequantized": the old defaults; "gemm-f32": the defaults with f32 GEMMs (`gemm_dtype`)
    "default": {},
    "dequantized": {"packed": False, "kv_cache_dtype": "float32"},
    "gemm-f32": {"gemm_dtype": "float32"},
}

BARE = "import jax, jax.numpy as jnp; jax.jit(lambda x: x + 1)(jnp.ones(4)).block_until_ready()"
JAXRS = """
import json, sys
from jaxrs import LLM, SamplingParams
model, tokens, requests, new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
knobs, prompts = json.loads(sys.argv[5]), json.loads(sys.argv[6])[:requests]
llm = LLM(model, kv_cache_tokens=tokens, max_model_len=tokens, max_num_seqs=len(prompts), **knobs)
llm.generate(prompts, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True), use_tqdm=False)
m = llm.engine.memory() if hasattr(llm.engine, "memory") else None  # (a checkout before the report)
print(json.dumps({} if m is None else {k: getattr(m, k) for k in ("weights", "kv_pool", "compiled", "rest")}))
"""
LLAMACPP = """
import json, sys
import llama_cpp
model, tokens, requests, new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = llama_cpp.Llama(model_path=model, n_ctx=tokens, n_batch=512, n_threads=2, n_threads_batch=2,
                      verbose=False)
for prompt in json.loads(sys.argv[6])[:requests]:
    llm.reset()
    llm(prompt, max_tokens=new, temperature=0.0)
print(json.dumps({}))
"""


def peak_mib(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, dict]:
    """Run `argv` to its end: (its peak resident MiB, the JSON its last stdout line printed)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[:3]} exited with {proc.returncode}")
    lines = out.strip().splitlines()
    return usage.ru_maxrss / 1024, json.loads(lines[-1]) if lines else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_models = [MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf", MODELS / "gemma-3-270m-q4_k_m.gguf"]
    ap.add_argument("--models", nargs="+", type=Path, default=default_models)
    ap.add_argument("--kv-tokens", type=int, default=1024, help="jaxrs's KV pool, llama.cpp's n_ctx")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES), help="jaxrs's")
    ap.add_argument("--engines", nargs="+", default=["jaxrs", "llamacpp"], choices=["jaxrs", "llamacpp"])
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=RESULTS / "memory.json")
    args = ap.parse_args()

    env = os.environ | {"TQDM_DISABLE": "1"}
    bare, _ = peak_mib([sys.executable, "-c", BARE], env)
    print(f"bare JAX runtime: {bare:.0f} MiB", flush=True)
    llama_python = PEERS / "llamacpp" / "bin" / "python"
    rows, results = [], {"bare_jax_mib": bare, "models": {}}
    for model in args.models:
        common = [str(model), str(args.kv_tokens), str(args.requests), str(args.new_tokens)]
        llama = None
        if "llamacpp" in args.engines and llama_python.is_file():
            llama, _ = peak_mib([str(llama_python), "-c", LLAMACPP, *common, "{}", json.dumps(PROMPTS)])
            print(f"{model.name} llama.cpp: {llama:.0f} MiB", flush=True)
        entry = {"llamacpp_mib": llama, "jaxrs": {}}
        for mode in args.modes if "jaxrs" in args.engines else []:
            knobs = json.dumps(MODES[mode])
            peak, parts = peak_mib([sys.executable, "-c", JAXRS, *common, knobs, json.dumps(PROMPTS)], env)
            ratio = (peak - bare) / llama if llama else None
            entry["jaxrs"][mode] = {"peak_mib": peak, "above_bare_mib": peak - bare, "ratio": ratio} | parts
            mib = {k: parts[k] / 2**20 if parts.get(k) is not None else None for k in PARTS}
            print(f"{model.name} jaxrs {mode}: {peak:.0f} MiB, {json.dumps(mib)}", flush=True)
            rows.append(
                [
                    model.name,
                    mode,
                    fmt(peak, 0),
                    fmt(peak - bare, 0),
                    fmt(llama, 0),
                    fmt(ratio, 2),
                    fmt(mib["weights"]),
                    fmt(mib["kv_pool"]),
                    fmt(mib["compiled"]),
                    fmt(mib["rest"]),
                ]
            )
        results["models"][model.name] = entry
    header = ["model", "jaxrs mode", "peak MiB", "above bare JAX", "llama.cpp peak", "ratio", "weights"]
    print(f"\nKV capacity {args.kv_tokens} tokens; bare JAX runtime {bare:.0f} MiB")
    print(markdown_table([*header, "KV pool", "compiled", "rest"], rows))
    write_json(args.out, {"machine": machine_facts(), "args": vars(args)} | results)


if __name__ == "__main__":
    main()
