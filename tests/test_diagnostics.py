"""The one-line messages of README's "Troubleshooting", as the CLI prints them."""

from __future__ import annotations

import socket

import pytest

from jaxrs import diagnostics
from jaxrs.cli import main
from jaxrs.errors import JaxrsError


def test_out_of_memory_is_explained():
    error = RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 4398046511104 bytes.")
    message = diagnostics.explain(error)
    assert message.startswith("out of memory (RESOURCE_EXHAUSTED: Out of memory allocating")
    assert "--kv-cache-fraction" in message and "--isq Q4K" in message
    assert diagnostics.explain(ValueError("something else")) is None


def test_cuda_backend_is_explained():
    message = diagnostics.explain(RuntimeError("Unable to initialize backend 'cuda': no GPU"))
    assert message.startswith("the CUDA backend did not start") and ".[cuda12]" in message


def test_a_taken_port_is_named_before_loading(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(JaxrsError, match=f"port {port} on 127.0.0.1 is in use"):
            diagnostics.check_port("127.0.0.1", port)
        assert main(["serve", "--model", "/nonexistent.gguf", "--port", str(port)]) == 1
    assert f"error: port {port} on 127.0.0.1 is in use" in capsys.readouterr().err


def test_multihost_flags_come_together(capsys):
    argv = ["serve", "--model", "/nonexistent.gguf", "--port", "0", "--coordinator-address", "h:1"]
    assert main(argv) == 1
    assert "takes --coordinator-address, --num-processes and --process-id" in capsys.readouterr().err
    assert main([*argv, "--num-processes", "2", "--process-id", "0"]) == 1
    assert "needs --kv-cache-tokens or --kv-cache-mb" in capsys.readouterr().err
