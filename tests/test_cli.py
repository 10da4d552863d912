"""The `jaxrs` command line on the demo model."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def jaxrs(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "jaxrs.cli", "--log-level", "WARNING", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def test_run_prompt_prints_the_answer(demo_gguf):
    done = jaxrs(
        "run",
        "--model",
        str(demo_gguf),
        "--prompt",
        "What is the capital of France?",
        "--temperature",
        "0",
        "--max-tokens",
        "20",
    )
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout


def test_interactive_chat_keeps_history(demo_gguf):
    done = jaxrs(
        "run",
        "--model",
        str(demo_gguf),
        "--temperature",
        "0",
        "--max-tokens",
        "12",
        stdin="What is the capital of France?\nAnd of Italy?\n\n",
    )
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout and "Rome" in done.stdout


def test_unknown_kernel_is_a_clean_error(demo_gguf):
    done = jaxrs("run", "--model", str(demo_gguf), "--prompt", "x", "--kernel", "paged_attention=nope")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "no implementation 'nope' of 'paged_attention' (registered: invariant, pallas, xla)" in done.stderr


def test_isq_flag_and_unknown_type(demo_gguf):
    done = jaxrs("run", "--model", str(demo_gguf), "--isq", "Q9", "--prompt", "x")
    assert done.returncode == 1 and "Traceback" not in done.stderr and "Q4_K" in done.stderr
    done = jaxrs(
        "run",
        "--model",
        str(demo_gguf),
        "--isq",
        "8",
        "--prompt",
        "What is the capital of France?",
        "--temperature",
        "0",
        "--max-tokens",
        "12",
    )
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout


def test_gemma3_270m_base_model_completes_the_prompt():
    """The real Gemma 3 270M GGUF: a base model with no chat template, so `run --prompt` completes the
    text as written (in Gemma's chat turns it answers with noise, in transformers too), and answers."""
    from tests.gemma3_gguf import fetch_gemma3_270m

    done = jaxrs(
        "run",
        "--model",
        str(fetch_gemma3_270m()),
        "--prompt",
        "What is the capital of France?",
        "--temperature",
        "0",
        "--max-tokens",
        "24",
        "--kv-cache-tokens",
        "256",
    )
    assert done.returncode == 0, done.stderr
    assert "The capital of France is Paris." in done.stdout


def test_kv_cache_dtype_and_layer_loop_flags_reach_the_engine_config():
    from jaxrs.cli import build_parser, engine_kwargs

    parse = build_parser().parse_args
    assert engine_kwargs(parse(["run", "--kv-cache-dtype", "float16"]))["kv_cache_dtype"] == "float16"
    assert engine_kwargs(parse(["run"]))["kv_cache_dtype"] is None  # auto: float16 on CPU
    assert engine_kwargs(parse(["serve", "--layer-loop", "unrolled"]))["layer_loop"] == "unrolled"
    assert engine_kwargs(parse(["run"]))["layer_loop"] == "scan"


def test_dequantize_flag_opts_out_of_packed_loading():
    """Packed is the default (unset: `load_model` packs unless --isq); --dequantize opts out; the old
    --packed still parses, and the two together are an argparse error."""
    from jaxrs.cli import build_parser, packed_flag

    parse = build_parser().parse_args
    assert packed_flag(parse(["run"])) is None
    assert packed_flag(parse(["serve", "--dequantize"])) is False
    assert packed_flag(parse(["quantize", "--packed", "--out", "x"])) is True
    with pytest.raises(SystemExit):
        parse(["run", "--packed", "--dequantize"])


def test_xla_option_flags_reach_the_engine_config():
    from jaxrs.cli import build_parser, engine_kwargs
    from jaxrs.errors import JaxrsError

    parse = build_parser().parse_args
    args = parse(["serve", "--xla-option", "xla_a=1", "--xla-option", "xla_b="])
    assert engine_kwargs(args)["xla_options"] == {"xla_a": "1", "xla_b": ""}
    assert engine_kwargs(parse(["run"]))["xla_options"] is None
    with pytest.raises(JaxrsError, match="--xla-option takes NAME=VALUE"):
        engine_kwargs(parse(["run", "--xla-option", "xla_a"]))


def test_logs_raised_while_an_answer_streams_follow_its_line():
    """A step shape compiling mid-answer logs after the answer's newline, not inside the text."""
    import io
    import logging

    from jaxrs.cli import _print_stream

    terminal = io.StringIO()  # stdout and stderr share a terminal
    root = logging.getLogger()
    handler = logging.StreamHandler(terminal)
    root.addHandler(handler)
    old_stdout, sys.stdout = sys.stdout, terminal
    try:

        def pieces():
            yield "The"
            logging.getLogger("jaxrs").warning("compiled decode (1, 8, 8) in 3.1 s")
            yield " capital of France is Paris."

        assert _print_stream(pieces()) == "The capital of France is Paris."
        assert terminal.getvalue() == "The capital of France is Paris.\ncompiled decode (1, 8, 8) in 3.1 s\n"
        logging.getLogger("jaxrs").warning("after")  # the real handler is back: logs go straight out
        assert terminal.getvalue().endswith("in 3.1 s\nafter\n")
    finally:
        sys.stdout = old_stdout
        root.removeHandler(handler)


def test_serve_enable_embeddings_reaches_the_app(monkeypatch):
    from jaxrs.cli import main

    seen: dict = {}
    monkeypatch.setattr("jaxrs.cli.load_llm", lambda args: None)
    monkeypatch.setattr("server.app.create_app", lambda llm, **options: seen.update(options))
    monkeypatch.setattr("uvicorn.run", lambda *args, **kwargs: None)
    assert main(["serve", "--no-warmup", "--enable-embeddings"]) == 0
    assert seen["enable_embeddings"] is True
    assert main(["serve", "--no-warmup"]) == 0
    assert seen["enable_embeddings"] is False


def test_run_on_an_embedding_model_is_a_clean_error():
    from jaxrs.loading.embedding_models import fetch_minilm

    done = jaxrs("run", "--model", str(fetch_minilm(quiet=True)), "--prompt", "hi", "--raw")
    assert done.returncode == 1
    assert "is an embedding model" in done.stderr and "Traceback" not in done.stderr
