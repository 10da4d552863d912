"""`jaxrs` command line: run or serve a model, quantize one into a folder or GGUF, fetch catalog models."""

from __future__ import annotations

import argparse
import contextlib
import logging
import logging.handlers
import sys
from collections.abc import Iterable, Iterator, Sequence

from jaxrs.engine.options import (
    BLOCK_SIZES,
    CPU_KV_CACHE_MB,
    FLOAT_DTYPES,
    GEMM_DTYPES,
    KV_CACHE_DTYPES,
    LAYER_LOOPS,
    MAX_WAITING,
    config_defaults,
)
from jaxrs.engine.speculative_config import from_flags
from jaxrs.errors import JaxrsError
from jaxrs.lora.cli_args import add_lora_args, lora_kwargs
from jaxrs.parallel.flags import add_serve_args
from jaxrs.vision.cli_args import add_media_args, media_policy

ENGINE = config_defaults()  # the engine flags' defaults are EngineConfig's


def _source_args(p: argparse.ArgumentParser) -> None:
    """Which model, and how its weights are loaded."""
    p.add_argument(
        "--model",
        "-m",
        help="GGUF file, HF model folder, Hub repo id or catalog name (`jaxrs fetch` lists them; default: "
        "the demo model)",
    )
    p.add_argument("--gguf-file", help="which GGUF file of a folder or Hub repo")
    p.add_argument("--tokenizer", help="HF tokenizer folder to use instead of the model's own")
    p.add_argument("--dtype", default="auto", choices=["auto", *FLOAT_DTYPES])
    p.add_argument(
        "--isq-embeddings",
        type=_isq_embeddings,
        default="q8_0",
        metavar="HOW",
        help="how ISQ stores the embedding and output head: q8_0 (default), isq (the --isq type, if "
        "smaller) or float",
    )
    p.add_argument("--isq", metavar="TYPE", help="quantize weights at load (Q4K, Q8_0, HQQ4...; 4 = Q4K)")
    packing = p.add_mutually_exclusive_group()
    packing.add_argument(
        "--dequantize",
        action="store_true",
        help="dequantize a GGUF's quantized tensors to --dtype at load (default: kept packed on the device)",
    )
    packing.add_argument("--packed", action="store_true", help=argparse.SUPPRESS)  # the default now


def packed_flag(args: argparse.Namespace) -> bool | None:
    """`load_model`'s `packed` from the flags: False with --dequantize, True with --packed, else unset
    (packed, unless --isq quantizes)."""
    return False if args.dequantize else (True if args.packed else None)


def _isq_embeddings(value: str) -> str:
    """`--isq-embeddings` checked by the ISQ policy (imported here: `jaxrs --help` needs no JAX)."""
    from jaxrs.quant.policy import check_embeddings

    try:
        return check_embeddings(value.lower())
    except JaxrsError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _model_args(p: argparse.ArgumentParser) -> None:
    _source_args(p)
    kv = p.add_mutually_exclusive_group()
    kv.add_argument(
        "--kv-cache-mb",
        type=float,
        help=f"memory for the paged KV cache, MiB (CPU default: {CPU_KV_CACHE_MB})",
    )
    kv.add_argument("--kv-cache-fraction", type=float, help="share of free device memory for the KV cache")
    kv.add_argument("--kv-cache-tokens", type=int, help="size the KV cache to hold this many tokens")
    p.add_argument(
        "--kv-cache-dtype",
        choices=["auto", *KV_CACHE_DTYPES],
        default=ENGINE["kv_cache_dtype"] or "auto",
        help="KV cache element type (auto: float16 on CPU, the compute dtype on accelerators)",
    )
    p.add_argument(
        "--block-size",
        type=int,
        default=ENGINE["block_size"],
        choices=BLOCK_SIZES,
        help="tokens per KV block",
    )
    p.add_argument("--max-model-len", type=int, help="longest sequence served (default: the model's)")
    p.add_argument(
        "--max-num-seqs", type=int, default=ENGINE["max_num_seqs"], help="sequences decoded together"
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=ENGINE["max_num_batched_tokens"],
        help="tokens per step (prefill chunk)",
    )
    p.add_argument(
        "--max-decode-steps",
        type=int,
        default=ENGINE["max_decode_steps"],
        help="decode tokens per call when nothing waits",
    )
    p.add_argument("--no-prefix-cache", action="store_true", help="turn prefix caching off")
    p.add_argument(
        "--kernel",
        action="append",
        default=[],
        metavar="OP=IMPL",
        help="kernel choice, e.g. paged_attention=pallas (see jaxrs.ops)",
    )
    p.add_argument(
        "--xla-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="XLA compiler option for the model steps, over jaxrs's per-platform defaults (NAME= drops one)",
    )
    p.add_argument(
        "--layer-loop",
        choices=LAYER_LOOPS,
        default=ENGINE["layer_loop"],
        help="layers under lax.scan or unrolled (CPU: more 32-stream throughput, bigger and slower compiles)",
    )
    p.add_argument(
        "--seed", type=int, default=ENGINE["seed"], help="engine seed (requests without a seed draw from it)"
    )
    p.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=ENGINE["tensor_parallel_size"],
        metavar="N",
        help="split the model over N devices (tensor parallelism)",
    )
    p.add_argument(
        "--batch-invariant",
        action="store_true",
        help="each row's logits independent of the batch: seeded requests reproducible in any batch (CPU)",
    )
    p.add_argument(
        "--gemm-dtype",
        choices=GEMM_DTYPES,
        default=ENGINE["gemm_dtype"],
        help="operands of weight products of 4 or more rows (prompt chunks, decode batches) on CPU "
        "(auto: bfloat16 for packed weights where the CPU has bfloat16 dot instructions)",
    )

    add_lora_args(p)
    spec = p.add_argument_group("speculative decoding")
    spec.add_argument(
        "--speculative-config",
        metavar="JSON",
        help='vLLM\'s keys, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\' (README)',
    )
    spec.add_argument("--draft-model", metavar="PATH", help="draft model (same vocabulary as the target)")
    spec.add_argument("--num-speculative-tokens", type=int, metavar="K", help="draft tokens per step")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, help="0 is greedy (default: the model's generation config)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--min-p", type=float)
    p.add_argument("--sample-seed", type=int, help="seed of this request's sampling")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxrs", description="A pure-JAX/XLA LLM inference engine.")
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="complete one prompt, or chat interactively without --prompt")
    _model_args(run)
    _sampling_args(run)
    add_media_args(run)
    run.add_argument("--prompt", "-p", help="the prompt; without it, an interactive chat")
    run.add_argument("--system", help="system message for chat")
    run.add_argument(
        "--raw", action="store_true", help="complete the prompt as is, without the chat template"
    )
    sub.add_parser("fetch-demo", help="download the demo model (SmolLM2-135M-Instruct) into the local cache")
    fetch = sub.add_parser(
        "fetch", help="download catalog models into the local cache; without a name, list the catalog"
    )
    fetch.add_argument("names", nargs="*", metavar="NAME", help="catalog model names")
    serve = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    _model_args(serve)
    _serve_args(serve)
    quantize = sub.add_parser(
        "quantize", help="quantize a model once into a folder (or a GGUF file) that run, serve and LLM() load"
    )
    _source_args(quantize)
    quantize.add_argument(
        "--out", "-o", required=True, help="folder to write (new, or an earlier output), or a file X.gguf"
    )
    return parser


def _serve_args(p: argparse.ArgumentParser) -> None:
    add_media_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (default: $JAXRS_API_KEY)")
    p.add_argument("--served-model-name", help="the model name clients use (default: the file or repo name)")
    p.add_argument("--log", metavar="FILE", help="append one JSON line per request to FILE")
    p.add_argument("--log-full-text", action="store_true", help="include prompts and responses in --log")
    p.add_argument(
        "--max-waiting", type=int, default=MAX_WAITING, help="queued requests before answering 429"
    )
    p.add_argument("--max-body-mb", type=float, default=4.0, help="largest request body, MiB (413 above)")
    p.add_argument("--chat-template", metavar="FILE", help="Jinja chat template replacing the model's")
    p.add_argument(
        "--tool-call-parser",
        choices=("hermes", "mistral", "llama3_json"),
        help="the format the model writes tool calls in (default: read from its chat template)",
    )
    p.add_argument("--no-warmup", action="store_true", help="compile step shapes only on first use")
    p.add_argument(
        "--enable-embeddings",
        action="store_true",
        help="also serve /v1/embeddings from a generation model (last-token pooling; an embedding model "
        "always serves it)",
    )
    p.add_argument(
        "--image-model", metavar="PATH", help="also serve /v1/images/generations from this FLUX folder"
    )
    p.add_argument(
        "--image-output-dir", default="jaxrs-images", help="where url images are stored and served from"
    )
    p.add_argument("--image-transformer", metavar="FILE", help="the FLUX transformer from a BFL single file")
    p.add_argument("--image-isq", metavar="TYPE", help="ISQ format for the FLUX transformer blocks")

    add_serve_args(p)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("jax").setLevel(logging.WARNING)  # backend probing chatter
    try:
        if args.command == "fetch-demo":
            from jaxrs.loading.demo import fetch_demo_model

            print(fetch_demo_model())
            return 0
        if args.command == "fetch":
            return _fetch(args.names)
        if args.command == "serve":
            return _serve(args)
        if args.command == "quantize":
            return _quantize(args)
        return _run(args)
    except JaxrsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # out of memory, a CUDA backend that will not start: one clear line
        from jaxrs.diagnostics import explain

        if (message := explain(e)) is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1


def parse_pairs(pairs: list[str], flag: str = "--kernel", form: str = "OP=IMPL") -> dict[str, str]:
    """`KEY=VALUE` flag values as a dict."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise JaxrsError(f"{flag} takes {form}, not {pair!r}")
        out[key] = value
    return out


def load_llm(args: argparse.Namespace):
    """The LLM the shared model flags describe."""
    from jaxrs.llm import LLM

    return LLM(
        args.model,
        dtype=args.dtype,
        gguf_file=args.gguf_file,
        tokenizer=args.tokenizer,
        kernels=parse_pairs(args.kernel),
        isq_embeddings=args.isq_embeddings,
        isq=args.isq,
        packed=packed_flag(args),
        media=media_policy(args),
        mmproj=getattr(args, "mmproj", None),
        data_parallel_size=getattr(args, "data_parallel_size", 1),
        **engine_kwargs(args),
    )


def engine_kwargs(args: argparse.Namespace) -> dict:
    """EngineConfig fields from the shared model flags."""
    return dict(
        block_size=args.block_size,
        kv_cache_mb=args.kv_cache_mb,
        kv_cache_fraction=args.kv_cache_fraction,
        kv_cache_tokens=args.kv_cache_tokens,
        kv_cache_dtype=None if args.kv_cache_dtype == "auto" else args.kv_cache_dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_decode_steps=args.max_decode_steps,
        prefix_caching=not args.no_prefix_cache,
        seed=args.seed,
        xla_options=parse_pairs(args.xla_option, "--xla-option", "NAME=VALUE") or None,
        layer_loop=args.layer_loop,
        tensor_parallel_size=args.tensor_parallel_size,
        batch_invariant=args.batch_invariant,
        gemm_dtype=args.gemm_dtype,
        **lora_kwargs(args),
        speculative_config=from_flags(args.speculative_config, args.draft_model, args.num_speculative_tokens),
    )


@contextlib.contextmanager
def logs_after_answer() -> Iterator[None]:
    """Hold the log records raised while an answer streams (a step shape compiling on first use) until
    the answer's line has ended, so streamed text and log lines never interleave on a terminal."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    held = [
        logging.handlers.MemoryHandler(2**20, flushLevel=logging.CRITICAL + 1, target=h) for h in handlers
    ]
    for handler, buffer in zip(handlers, held, strict=True):
        root.removeHandler(handler)
        root.addHandler(buffer)
    try:
        yield
    finally:
        for handler, buffer in zip(handlers, held, strict=True):
            root.removeHandler(buffer)
            buffer.flush()
            root.addHandler(handler)


def _print_stream(pieces: Iterable[str]) -> str:
    """Print an answer as it streams, then its newline; logs raised meanwhile follow it. Returns it."""
    answer = []
    with logs_after_answer():
        for piece in pieces:
            answer.append(piece)
            print(piece, end="", flush=True)
        print(flush=True)
    return "".join(answer)


def _run(args: argparse.Namespace) -> int:
    from jaxrs.engine.sampling import SamplingParams

    llm = load_llm(args)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        seed=args.sample_seed,
    )
    system = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        if args.raw or llm.tokenizer.chat_template is None:
            stream = llm.stream(llm.tokenizer.encode(args.prompt), params)
        else:
            stream = llm.stream(
                llm.chat_prompt_ids(system + [{"role": "user", "content": args.prompt}]), params
            )
        _print_stream(stream)
        return 0
    return _chat(llm, params, system)


def _quantize(args: argparse.Namespace) -> int:
    """Load with ISQ (or a GGUF packed) and write the folder; no engine is built."""
    from pathlib import Path

    from jaxrs.llm import resolve_dtype
    from jaxrs.loading import load_model, resolve_source
    from jaxrs.loading.prequantized import save_quantized

    if not args.isq and (args.dequantize or resolve_source(args.model, args.gguf_file)[0] != "gguf"):
        raise JaxrsError("quantize needs --isq TYPE (without it, a GGUF's own quantized tensors are kept)")
    if args.out.endswith(".gguf"):
        return _quantize_to_gguf(args)
    loaded = load_model(
        args.model,
        gguf_file=args.gguf_file,
        dtype=resolve_dtype(args.dtype),
        tokenizer=args.tokenizer,
        packed=packed_flag(args),
        isq=args.isq,
        isq_embeddings=args.isq_embeddings,
        device_layout=False,  # the folder holds the formats themselves, not this device's layout
    )
    out = Path(args.out)
    save_quantized(loaded, out)
    print(out)
    return 0


def _quantize_to_gguf(args: argparse.Namespace) -> int:
    """`--out X.gguf`: a GGUF source re-quantized into a GGUF file that llama.cpp loads as well."""
    from pathlib import Path

    from jaxrs.loading import resolve_source
    from jaxrs.loading.ggml_file import is_ggml
    from jaxrs.loading.gguf_export import requantize_gguf

    kind, path = resolve_source(args.model, args.gguf_file)
    if kind != "gguf" or (path.is_file() and is_ggml(path)):
        raise JaxrsError(f"--out {args.out} writes a GGUF file, which needs a GGUF model, not {path}")
    if not args.isq:
        raise JaxrsError("--out X.gguf needs --isq TYPE: the type to write")
    done = requantize_gguf(path, Path(args.out), args.isq, embeddings=args.isq_embeddings)
    logging.getLogger("jaxrs").info(
        "re-quantized %d tensors to %s in %.1f s", done["requantized"], done["format"], done["seconds"]
    )
    print(args.out)
    return 0


def _fetch(names: list[str]) -> int:
    """Fetch each named catalog model and print its path; without names, list the catalog."""
    from jaxrs.loading.catalog import CATALOG, catalog_model, fetch_model

    if names:
        for model in [catalog_model(n) for n in names]:  # every name checked before any download
            print(fetch_model(model))
        return 0
    width = max(len(m.name) for m in CATALOG)
    for m in CATALOG:
        where = str(m.path()) if m.is_cached() else "not fetched"
        print(f"{m.name:<{width}}  {m.size / 1e6:6.0f} MB  {m.about}  [{where}]")
    return 0


def _serve(args: argparse.Namespace) -> int:
    """Load (progress shown), compile the likeliest step shapes, then serve until interrupted while the
    rest compile in the background."""
    import os
    from pathlib import Path

    import uvicorn

    from jaxrs.diagnostics import check_backend, check_port
    from jaxrs.parallel import multihost
    from server.app import create_app

    log = logging.getLogger("jaxrs")
    template = None
    if args.chat_template:
        path = Path(args.chat_template)
        if not path.is_file():
            raise JaxrsError(f"{path}: chat template file not found")
        template = path.read_text(encoding="utf-8")
    if not args.process_id:  # the process that serves HTTP
        check_port(args.host, args.port)  # before minutes of loading
    process = multihost.join(args)  # None when serving alone
    check_backend()
    log.info("loading %s", args.model or "the demo model")
    llm = load_llm(args)
    if process:
        return multihost.serve_as_follower(llm.engine)
    leader = None if process is None else multihost.serve_as_leader(llm.engine)
    if not args.no_warmup:
        log.info("warming up: the likeliest step shapes now, the rest while serving (--no-warmup skips this)")
        llm.warmup(background=True)
    # A Hub repo id is what clients will call the model; a local file goes by its stem.
    served = args.served_model_name or (
        args.model if args.model and not Path(args.model).expanduser().exists() else None
    )
    app = create_app(
        llm,
        served_model_name=served,
        api_key=args.api_key or os.environ.get("JAXRS_API_KEY") or None,
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_waiting=args.max_waiting,
        request_log=args.log,
        log_full_text=args.log_full_text,
        chat_template=template,
        enable_embeddings=args.enable_embeddings,
        image_model=_image_model(args),
        image_output_dir=args.image_output_dir,
        tool_call_parser=args.tool_call_parser,
    )
    log.info("serving on http://%s:%d (OpenAI API under /v1, /health, /metrics)", args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower(), access_log=False)
    if leader is not None:
        leader.stop()  # the followers return
    return 0


def _image_part(path: str, media) -> list[dict]:
    """`/image PATH` in the interactive chat: the image as a content part (none, with a message, if it
    cannot be read)."""
    from pathlib import Path

    from jaxrs.vision.media import load_image

    try:
        image = load_image(Path(path).expanduser().read_bytes(), media, path)
    except (OSError, JaxrsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return []
    print(f"[image {path}: {image.width}x{image.height}]", file=sys.stderr)
    return [{"type": "image", "image": image}]


def _image_model(args: argparse.Namespace):
    """The `--image-model` pipeline, or None."""
    if not args.image_model:
        return None
    from jaxrs.images import ImageModel

    return ImageModel(
        args.image_model, dtype=args.dtype, isq=args.image_isq, transformer_file=args.image_transformer
    )


def _chat(llm, params, history: list[dict]) -> int:
    if llm.tokenizer.chat_template is None:
        raise JaxrsError("this model has no chat template; pass --prompt (or a --tokenizer with a template)")
    print("Chat with the model; an empty line or Ctrl-D ends it; /image PATH adds an image.", file=sys.stderr)
    from jaxrs.vision.chat import chat_inputs

    images: list[dict] = []  # images for the next message
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        if not line.strip():
            return 0
        if line.startswith("/image"):
            images += _image_part(line.removeprefix("/image").strip(), llm.media)
            continue
        content = [*images, {"type": "text", "text": line}] if images else line
        history.append({"role": "user", "content": content})
        images = []
        try:
            ids, placed = chat_inputs(llm.tokenizer, llm.engine.model.vision, history, llm.media)
        except JaxrsError as e:
            print(f"error: {e}", file=sys.stderr)
            history.pop()
            continue
        reply = _print_stream(llm.stream(ids, params, images=placed))
        history.append({"role": "assistant", "content": reply})


if __name__ == "__main__":
    sys.exit(main())
