"""One engine in its own process, for `bench_peers.py`: load a model, then answer measurement requests.

    python bench/peer_worker.py ENGINE --model PATH [--threads 2] [--mode f32] [--max-seqs 32] [--ctx 1024]
    python bench/peer_worker.py llamacpp --model PATH [--prompt-lookup K | --draft-model PATH
        --num-draft-tokens K]
    python bench/peer_worker.py ENGINE --model PATH --cold '{"ids": [...], "text": "..."}'  # one token, exit
    python bench/peer_worker.py jaxrs --model PATH --warmup  # time the engine's warm-up, exit

ENGINE is jaxrs, llamacpp, mistralrs or transformers. A peer runs under the interpreter of its own
virtual environment, so only the standard library is imported at the top; each engine imports its
package inside its class. jaxrs is whichever `import jaxrs` finds: `bench_peers.py --jaxrs-checkout`
puts another checkout first on PYTHONPATH, and this worker drives that checkout's jaxrs through the
API it uses below (`LLM`, `Engine.add_request`/`step`, `ModelRunner.device_seconds`, `LLM.warmup`);
it stays compatible with jaxrs as of commit 5f520ec.

Protocol (version `PROTOCOL` below), JSON lines: after loading, the worker writes {"ready": true,
"protocol": N, ...}; then each line it reads is a request and gets one line back ({"error": ...} if it
failed):

- {"op": "single", "ids": [...], "text": "...", "new_tokens": N}: one greedy sequence, EOS ignored.
  Returns ttft_s (prompt in, first token out), decode_s and decode_tokens (the tokens after the first),
  prompt_tokens (what the engine computed: mistral.rs takes text and tokenizes it itself); llama.cpp
  also the generated `tokens` (bench_speculative.py compares its speculative rows with its plain one).
- {"op": "batch", "prompts": [[...], ...], "texts": [...], "new_tokens": N}: every prompt, all at once
  if the engine batches (`concurrent` in the ready line), else one after another. Returns wall_s and
  new_tokens (the total generated).
- {"op": "stats"}: max_rss_mib, this process's peak resident memory so far.
jaxrs's replies also carry the wall time spent inside the runner's step calls (`device_seconds`: dispatch,
device and the transfer back), from which the host share is 1 - device / wall: `decode_device_s` and
`decode_calls` (engine steps) for the decode part of "single", `device_s` and `steps` for "batch".
With --warmup, a jaxrs worker loads, runs `LLM.warmup()` (every step shape of this configuration for the
greedy and sampled profiles) and writes {"warmup_s": ..., "shapes": N, "compiled": M, "load_s": ...}: the
figures of the engine's "warm-up: N shapes (M compiled now) in S s" log line.
Protocol 2 added `protocol`, `jaxrs_path` in the versions, the device times and --warmup; a worker
without PROTOCOL is version 1.
End of input ends the worker. Protocol lines go to the original stdout; whatever a library prints to
stdout is sent to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

from common import versions

PROTOCOL = 2  # bench_peers.py runs another checkout's own worker only if it speaks at least this version

# jaxrs modes: how the weights are held, the compute dtype and the KV cache's, each pinned (a checkout whose
# EngineConfig has no `kv_cache_dtype` gets none: its cache was in the compute dtype, as pinned).
JAXRS_MODES = {
    "default": {},  # the checkout's own defaults (packed, float16 cache on CPU, since they changed)
    "f32": {"dtype": "float32", "packed": False, "kv_cache_dtype": "float32"},
    "bf16": {"dtype": "bfloat16", "packed": False, "kv_cache_dtype": "bfloat16"},
    "packed": {"dtype": "float32", "packed": True, "kv_cache_dtype": "float32"},
    "packed-bf16": {"dtype": "bfloat16", "packed": True, "kv_cache_dtype": "bfloat16"},
    # float16 KV cache, as llama.cpp's default cache
    "f32-kv16": {"dtype": "float32", "packed": False, "kv_cache_dtype": "float16"},
    "packed-kv16": {"dtype": "float32", "packed": True, "kv_cache_dtype": "float16"},
    # the defaults with every product in f32 operands whatever the CPU (`gemm_dtype`: before bfloat16 GEMMs)
    "gemm-f32": {"gemm_dtype": "float32"},
}


def jaxrs_mode(name: str) -> dict:
    """A mode's `LLM` arguments that this checkout's jaxrs knows."""
    import dataclasses

    from jaxrs.engine.engine import EngineConfig

    known = {f.name for f in dataclasses.fields(EngineConfig)} | {"dtype", "packed"}
    return {k: v for k, v in JAXRS_MODES[name].items() if k in known}


# "<mode>-ynndot": the steps compiled with YNNPACK taking each dot alone on XLA:CPU (an A/B of that option)
YNN_DOTS_ALONE = {
    "xla_options": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
}
# "<mode>-unrolled": the layers unrolled, weights split per layer (EngineConfig.layer_loop)
JAXRS_MODES |= {f"{name}-ynndot": {**mode, **YNN_DOTS_ALONE} for name, mode in list(JAXRS_MODES.items())} | {
    f"{name}-unrolled": {**mode, "layer_loop": "unrolled"} for name, mode in list(JAXRS_MODES.items())
}


# -- jaxrs: these two also serve bench_single_stream.py and gpu.py, on an engine built there -----------


def device_seconds(engine) -> float | None:
    """Wall seconds the engine's runner has spent inside its step calls so far (None if it does not
    count them)."""
    return getattr(engine.runner, "device_seconds", None)


def jaxrs_single(engine, ids: list[int], new_tokens: int) -> dict:
    """One greedy sequence on a jaxrs `Engine`: time to its first token, then to its last; and the part
    of the decode time spent inside the step calls, over how many engine steps."""
    from jaxrs import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    seq = engine.add_request(list(ids), params).seqs[0]
    start = time.perf_counter()
    while not seq.output_ids:  # a long prompt may take several chunks
        engine.step()
    first = time.perf_counter()
    device, calls = device_seconds(engine), 0
    while not seq.finished:
        engine.step()
        calls += 1
    end = time.perf_counter()
    result = {
        "ttft_s": first - start,
        "decode_s": end - first,
        "decode_tokens": len(seq.output_ids) - 1,
        "prompt_tokens": len(ids),
        "decode_calls": calls,
    }
    if device is not None:
        result["decode_device_s"] = device_seconds(engine) - device
    return result


def jaxrs_batch(engine, prompts: list[list[int]], new_tokens: int) -> dict:
    """All prompts submitted at once to a jaxrs `Engine`, run to completion (continuous batching)."""
    from jaxrs import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    device, steps = device_seconds(engine), 0
    start = time.perf_counter()
    requests = [engine.add_request(list(p), params) for p in prompts]
    while not all(r.finished for r in requests) and engine.has_unfinished():
        engine.step()
        steps += 1
    wall = time.perf_counter() - start
    result = {
        "wall_s": wall,
        "new_tokens": sum(len(s.output_ids) for r in requests for s in r.seqs),
        "steps": steps,
    }
    if device is not None:
        result["device_s"] = device_seconds(engine) - device
    return result


class Jaxrs:
    """jaxrs's Python API (`LLM`), one engine serving every request."""

    concurrent = True

    def __init__(self, args: argparse.Namespace):
        from jaxrs import LLM

        self.llm = LLM(
            args.model,
            **jaxrs_mode(args.mode),
            max_num_seqs=args.max_seqs,
            kv_cache_tokens=args.kv_tokens,
            max_model_len=args.ctx,
            prefix_caching=False,  # every pass computes its prompt, as in the peers
        )

    def versions(self) -> dict:
        import jaxrs

        # where the package came from: a --jaxrs-checkout row checks it is the checkout asked for
        return versions(["jaxrs", "jax", "jaxlib"]) | {"jaxrs_path": str(Path(jaxrs.__file__).parent.parent)}

    def warmup(self) -> dict:
        """Time `LLM.warmup()` in this fresh process; the shape counts from the engine's log line."""
        import logging

        counts: list[tuple] = []

        class Catch(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if str(record.msg).startswith("warm-up:"):
                    counts.append(record.args)

        log = logging.getLogger("jaxrs")
        level = log.level
        log.addHandler(catch := Catch())
        log.setLevel(logging.INFO)
        try:
            start = time.perf_counter()
            self.llm.warmup()
            seconds = time.perf_counter() - start
        finally:
            log.removeHandler(catch)
            log.setLevel(level)
        result = {"warmup_s": seconds, "shapes": None, "compiled": None}
        if counts and len(counts[-1]) == 3:  # checkouts before 2026-12-06: (shapes, compiled, seconds)
            result |= {"shapes": counts[-1][0], "compiled": counts[-1][1]}
        elif counts and len(counts[-1]) == 4:  # (shapes, seconds, compiled, what is left to the background)
            result |= {"shapes": counts[-1][0], "compiled": counts[-1][2]}
        return result

    def single(self, ids: list[int], text: str, new_tokens: int) -> dict:
        return jaxrs_single(self.llm.engine, ids, new_tokens)

    def batch(self, prompts: list[list[int]], texts: list[str], new_tokens: int) -> dict:
        return jaxrs_batch(self.llm.engine, prompts, new_tokens)


class LlamaCpp:
    """llama.cpp through llama-cpp-python: one `Llama` object serves one sequence at a time."""

    concurrent = False

    def __init__(self, args: argparse.Namespace):
        import llama_cpp
        from llama_cpp import llama_cpp as bindings

        if args.no_extra_bufts:  # weights in plain CPU buffers: no AMX tiles, no repacked layouts
            default = bindings.llama_model_default_params

            def plain_buffers():
                params = default()
                params.use_extra_bufts = False
                return params

            bindings.llama_model_default_params = plain_buffers  # what `Llama` reads its defaults from
        self.llm = llama_cpp.Llama(
            model_path=args.model,
            n_ctx=args.ctx,
            n_batch=512,
            n_threads=args.threads,
            n_threads_batch=args.threads,
            verbose=False,
            draft_model=llamacpp_draft(args),
        )

    def versions(self) -> dict:
        return versions(["llama_cpp_python"])

    def _generate(self, ids: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
        """Greedy tokens until `new_tokens`, whatever they are (the generator never stops on EOS);
        returns (time to the first token, time after it, the tokens)."""
        self.llm.reset()  # no reuse of the previous pass's prompt in the KV cache
        start = time.perf_counter()
        first, tokens = start, []
        for token in self.llm.generate(ids, top_k=1, temp=0.0):
            tokens.append(int(token))
            if len(tokens) == 1:
                first = time.perf_counter()
            if len(tokens) == new_tokens:
                break
        return first - start, time.perf_counter() - first, tokens

    def single(self, ids: list[int], text: str, new_tokens: int) -> dict:
        ttft, rest, tokens = self._generate(ids, new_tokens)
        return {
            "ttft_s": ttft,
            "decode_s": rest,
            "decode_tokens": len(tokens) - 1,
            "prompt_tokens": len(ids),
            "tokens": tokens,
        }

    def batch(self, prompts: list[list[int]], texts: list[str], new_tokens: int) -> dict:
        start = time.perf_counter()
        total = sum(len(self._generate(ids, new_tokens)[2]) for ids in prompts)
        return {"wall_s": time.perf_counter() - start, "new_tokens": total}


def llamacpp_draft(args: argparse.Namespace):
    """llama-cpp-python's speculative decoding: `--prompt-lookup K` (its `LlamaPromptLookupDecoding`,
    the only proposer it ships), or `--draft-model PATH` with K = `--num-draft-tokens` (a second `Llama`
    behind its `LlamaDraftModel` hook, defined here: the package has no draft-model class). None: plain.
    With either, `Llama.generate` evaluates the last token and the proposals in one batch and keeps them
    up to the first that its greedy sample disagrees with."""
    if args.prompt_lookup:
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        return LlamaPromptLookupDecoding(num_pred_tokens=args.prompt_lookup)
    if not args.draft_model:
        return None
    import llama_cpp
    import numpy as np
    from llama_cpp.llama_speculative import LlamaDraftModel

    class SmallModelDraft(LlamaDraftModel):
        """K greedy tokens from a smaller model of the same vocabulary; its KV cache keeps the longest
        common prefix between calls (`Llama.generate` trims it to the first differing token)."""

        def __init__(self, path: str, k: int):
            self.k = k
            self.llm = llama_cpp.Llama(
                model_path=path,
                n_ctx=args.ctx,
                n_batch=512,
                n_threads=args.threads,
                n_threads_batch=args.threads,
                verbose=False,
            )

        def __call__(self, input_ids, /, **kwargs):
            drafts = []
            for token in self.llm.generate(input_ids.tolist(), top_k=1, temp=0.0):
                drafts.append(int(token))
                if len(drafts) == self.k:
                    break
            return np.array(drafts, dtype=np.intc)

    return SmallModelDraft(args.draft_model, args.num_draft_tokens)


class MistralRs:
    """mistral.rs through its Python package: text in (it tokenizes), timings from its usage report.

    Its `Runner` cannot be entered from two threads at once, so requests run one after another."""

    concurrent = False

    def __init__(self, args: argparse.Namespace):
        from mistralrs import Runner, Which

        path = Path(args.model)
        self.runner = Runner(
            which=Which.GGUF(quantized_model_id=str(path.parent), quantized_filename=path.name),
            prefix_cache_n=0,  # every pass computes its prompt
        )

    def versions(self) -> dict:
        return versions(["mistralrs"])

    def _complete(self, text: str, new_tokens: int):
        from mistralrs import CompletionRequest

        request = CompletionRequest(
            prompt=text, model="default", max_tokens=new_tokens, temperature=0.0, ignore_eos=True
        )
        return self.runner.send_completion_request(request).usage

    def single(self, ids: list[int], text: str, new_tokens: int) -> dict:
        usage = self._complete(text, new_tokens)
        return {
            "ttft_s": usage.total_prompt_time_sec,
            "decode_s": usage.total_completion_time_sec,
            "decode_tokens": usage.completion_tokens,
            "prompt_tokens": usage.prompt_tokens,
        }

    def batch(self, prompts: list[list[int]], texts: list[str], new_tokens: int) -> dict:
        start = time.perf_counter()
        total = sum(self._complete(t, new_tokens).completion_tokens for t in texts)
        return {"wall_s": time.perf_counter() - start, "new_tokens": total}


class Transformers:
    """transformers on CPU torch, weights dequantized to f32. Concurrent requests are one batched
    `generate` call over left-padded prompts (static batching: the batch ends with its longest)."""

    concurrent = True

    def __init__(self, args: argparse.Namespace):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(args.threads)
        path = Path(args.model)
        gguf = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
        folder = path.parent if gguf else path
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **gguf).eval()
        self.torch = torch

    def versions(self) -> dict:
        return versions(["transformers", "torch"])

    def _generate(self, prompts: list[list[int]], new_tokens: int) -> None:
        torch = self.torch
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            self.model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,  # EOS cannot end it early
                do_sample=False,
                pad_token_id=0,
            )

    def single(self, ids: list[int], text: str, new_tokens: int) -> dict:
        # generate has no first-token hook: time one token, then the whole run, and subtract. The one-token
        # run is timed three times and its least taken: a slow one (a busy machine) would leave a short
        # whole run less than it, and no decode figure.
        first = min(self._timed([ids], 1) for _ in range(3))
        whole = self._timed([ids], new_tokens)
        return {
            "ttft_s": first,
            "decode_s": whole - first,
            "decode_tokens": new_tokens - 1,
            "prompt_tokens": len(ids),
        }

    def _timed(self, prompts: list[list[int]], new_tokens: int) -> float:
        start = time.perf_counter()
        self._generate(prompts, new_tokens)
        return time.perf_counter() - start

    def batch(self, prompts: list[list[int]], texts: list[str], new_tokens: int) -> dict:
        return {"wall_s": self._timed(prompts, new_tokens), "new_tokens": len(prompts) * new_tokens}


ENGINES = {"jaxrs": Jaxrs, "llamacpp": LlamaCpp, "mistralrs": MistralRs, "transformers": Transformers}


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def serve(engine, out) -> None:
    """Answer requests from stdin until it closes."""
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        try:
            if op == "single":
                reply = engine.single(request["ids"], request.get("text", ""), request["new_tokens"])
            elif op == "batch":
                reply = engine.batch(request["prompts"], request.get("texts", []), request["new_tokens"])
            elif op == "stats":
                reply = {"max_rss_mib": max_rss_mib()}
            else:
                reply = {"error": f"unknown op {op!r}"}
        except Exception as e:  # report and carry on: one failed measurement is not the whole run
            reply = {"error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine", choices=sorted(ENGINES))
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mode", default="f32", choices=sorted(JAXRS_MODES), help="jaxrs only")
    ap.add_argument("--max-seqs", type=int, default=32, help="jaxrs: most sequences in a batch")
    ap.add_argument("--ctx", type=int, default=1024, help="context length a sequence may reach")
    ap.add_argument("--kv-tokens", type=int, default=8192, help="jaxrs: KV cache size in tokens")
    ap.add_argument("--no-extra-bufts", action="store_true", help="llama.cpp: plain CPU weight buffers")
    ap.add_argument("--prompt-lookup", type=int, metavar="K", help="llama.cpp: prompt lookup, K drafts")
    ap.add_argument("--draft-model", metavar="PATH", help="llama.cpp: speculative decoding with this draft")
    ap.add_argument("--num-draft-tokens", type=int, default=4, metavar="K", help="--draft-model's K")
    ap.add_argument("--cold", metavar="JSON", help='load, one token for {"ids": [...], "text": ...}, exit')
    ap.add_argument("--warmup", action="store_true", help="jaxrs: load, time the engine's warm-up, exit")
    args = ap.parse_args()

    out = os.fdopen(os.dup(1), "w")  # the protocol channel
    os.dup2(2, 1)  # library prints (C or Python) go to stderr
    sys.stdout = sys.stderr
    started = time.perf_counter()
    engine = ENGINES[args.engine](args)
    loaded = time.perf_counter() - started
    if args.cold:
        prompt = json.loads(args.cold)
        engine.single(prompt["ids"], prompt["text"], 1)
        out.write(json.dumps({"first_token": True, "load_s": loaded}) + "\n")
    elif args.warmup:
        if not hasattr(engine, "warmup"):
            raise SystemExit(f"--warmup: {args.engine} has no warm-up to time")
        out.write(json.dumps(engine.warmup() | {"load_s": loaded}) + "\n")
    else:
        ready = {"ready": True, "protocol": PROTOCOL, "load_s": loaded, "concurrent": engine.concurrent}
        out.write(json.dumps(ready | {"versions": engine.versions()}) + "\n")
        out.flush()
        serve(engine, out)
    out.flush()
    os._exit(0)  # an engine's native threads (mistral.rs) must not keep the process alive


if __name__ == "__main__":
    main()
