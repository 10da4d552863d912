"""What every route needs: the model, the engine driver (once started), names, metrics and the log."""

from __future__ import annotations

import copy
import dataclasses
import time
import uuid
from pathlib import Path

from jaxrs.embedding import Embedder
from jaxrs.engine.async_engine import AsyncEngine
from jaxrs.engine.sampling import SamplingParams
from jaxrs.llm import LLM
from jaxrs.tokenizer import Tokenizer
from server.errors import APIError
from server.generation import Choices
from server.metrics import Metrics
from server.request_log import RequestLog, RequestRecord


def model_names(llm: LLM, served_model_name: str | None) -> list[str]:
    """The served name first, then aliases clients may also use: the file (or folder) stem and name,
    and its path."""
    source = Path(llm.source)
    names = [served_model_name or source.stem, source.stem, source.name, str(source)]
    return [n for n in dict.fromkeys(names) if n]


def adapter_names(llm: LLM) -> list[str]:
    """The LoRA adapters loaded now (requests name them as their `model`)."""
    return llm.lora_adapters() if llm.generates else []


@dataclasses.dataclass
class ServerContext:
    llm: LLM
    names: list[str]
    metrics: Metrics
    chat_tokenizer: Tokenizer  # the model's tokenizer, or a copy with the --chat-template override
    max_waiting: int
    request_log: RequestLog | None = None
    embeddings: bool = False  # /v1/embeddings served (always for an embedding model)
    driver: AsyncEngine | None = None  # set while the app is running (between startup and shutdown)
    tool_call_parser: str | None = None  # the tool-call format; None: chosen from the chat template
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    @classmethod
    def build(
        cls,
        llm: LLM,
        *,
        served_model_name: str | None,
        max_waiting: int,
        request_log: RequestLog | None,
        chat_template: str | None,
        embeddings: bool = False,
        tool_call_parser: str | None = None,
    ) -> ServerContext:
        tokenizer = llm.tokenizer
        if chat_template is not None:  # a copy, so other users of the LLM keep the model's template
            tokenizer = copy.copy(tokenizer)
            tokenizer.chat_template = chat_template
        return cls(
            llm,
            model_names(llm, served_model_name),
            Metrics(),
            tokenizer,
            max_waiting,
            request_log,
            embeddings or not llm.generates,
            tool_call_parser=tool_call_parser,
        )

    @property
    def served_name(self) -> str:
        return self.names[0]

    def ready_driver(self) -> AsyncEngine:
        """The running engine driver; 503 before startup finished or after shutdown began."""
        if self.driver is None:
            raise APIError(503, "the engine is not ready yet")
        return self.driver

    def embedder(self) -> Embedder:
        """The model's embedding runner; 400 when this server does not serve embeddings."""
        if not self.embeddings:
            raise APIError(
                400,
                f"this server does not serve embeddings for {self.served_name}; "
                "start it with --enable-embeddings",
                code="model_not_supported",
            )
        return self.llm.embedder

    def check_model(self, name: str | None) -> str:
        """The served name for a request's `model` (absent means the served model; aliases accepted), or
        the LoRA adapter it names (404 for neither, as OpenAI and vLLM answer)."""
        if name is None or name in self.names:
            return self.served_name
        xlora = self.llm.engine.xlora if self.llm.generates else None
        if xlora is not None and name == xlora.name:
            return self.served_name  # an X-LoRA server's model is X-LoRA
        if name in adapter_names(self.llm):
            return name
        raise APIError(
            404,
            f"model {name!r} is not served here; this server serves {self.served_name!r}",
            param="model",
            code="model_not_found",
        )

    def with_adapter(self, params: SamplingParams, model: str) -> SamplingParams:
        """`params` running with the LoRA adapter `model` (a `check_model` answer) names, if it names one."""
        if model == self.served_name:  # an X-LoRA server's model is X-LoRA (as mistral.rs serves it)
            xlora = self.llm.engine.xlora if self.llm.generates else None
            return params if xlora is None else dataclasses.replace(params, lora=xlora.name)
        return dataclasses.replace(params, lora=model)

    def log_request(self, record: RequestRecord, choices: Choices | None = None) -> None:
        """Write the request's log line (if logging) and fold the engine's latency samples into metrics."""
        self.metrics.drain_latencies()
        if choices is not None:
            record.completion_tokens = choices.completion_tokens
            record.finish_reasons = choices.finish_reasons()
            record.response = ["".join(s.text) for s in choices.states]
        if self.request_log is not None:
            self.request_log.write(record)

    def log_failure(self, record: RequestRecord, error: Exception, choices: Choices | None = None) -> None:
        record.status = error.status if isinstance(error, APIError) else 500
        record.error = str(error)
        self.log_request(record, choices)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
