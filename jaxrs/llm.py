"""The synchronous Python API: `LLM(model).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from jaxrs.engine.engine import Engine, EngineConfig
from jaxrs.engine.sampling import SamplingParams
from jaxrs.loading import load_model
from jaxrs.ops import Kernels

log = logging.getLogger("jaxrs")

Message = Mapping[str, object]


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "abort"


def resolve_dtype(dtype: str | jnp.dtype) -> jnp.dtype:
    """ "auto" is bfloat16 on accelerators and float32 on CPU (where bf16 matmuls are slow)."""
    if dtype == "auto":
        return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    return jnp.dtype(dtype)


class LLM:
    """Load a model once, then generate for lists of prompts or chat conversations.

    `model` is a GGUF file, a Hugging Face model folder, a Hub repo id, or None for the demo model.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = "auto",
        gguf_file: str | None = None,
        tokenizer: str | None = None,
        kernels: Mapping[str, str] | None = None,
        block_size: int = 16,
        kv_cache_mb: float = 512.0,
        max_model_len: int | None = None,
        max_num_seqs: int = 32,
        max_num_batched_tokens: int = 2048,
        seed: int = 0,
    ):
        self.dtype = resolve_dtype(dtype)
        self.model = load_model(model, gguf_file=gguf_file, dtype=self.dtype, tokenizer=tokenizer)
        self.tokenizer = self.model.tokenizer
        config = EngineConfig(
            block_size=block_size,
            kv_cache_mb=kv_cache_mb,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            seed=seed,
        )
        self.engine = Engine(self.model, config, kernels=Kernels.from_mapping(kernels), dtype=self.dtype)

    def generate(
        self,
        prompts: str | list[int] | Sequence[str] | Sequence[list[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for each prompt (text or token ids); results come back in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} sampling params")
        seqs, texts = [], []
        for prompt, p in zip(prompts, params_list, strict=True):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            texts.append(prompt if isinstance(prompt, str) else None)
            seqs.append(self.engine.add_request(ids, p))
        bar = tqdm(total=len(seqs), desc="Generating", unit="req", disable=not use_tqdm or len(seqs) < 2)
        try:
            while self.engine.has_unfinished():
                done_before = sum(s.finished for s in seqs)
                self.engine.step()
                bar.update(sum(s.finished for s in seqs) - done_before)
        finally:
            bar.close()
            for s in seqs:
                if not s.finished:
                    self.engine.abort(s)
        return [
            RequestOutput(s.request_id, t, s.prompt_ids, s.text, s.output_ids, s.finish_reason or "abort")
            for s, t in zip(seqs, texts, strict=True)
        ]

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | None = None,
        *,
        add_generation_prompt: bool = True,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], Mapping) else messages
        prompts = [
            self.chat_prompt_ids(c, add_generation_prompt=add_generation_prompt) for c in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def chat_prompt_ids(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of a conversation rendered with the chat template (which writes its own BOS)."""
        text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def stream(self, prompt_ids: list[int], sampling_params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the text of one request as it is generated.

        Text that could be the start of a stop string is held back until it is known not to be one.
        """
        seq = self.engine.add_request(prompt_ids, sampling_params or SamplingParams())
        hold = max((len(s) for s in seq.params.stop), default=1) - 1
        sent = 0
        try:
            while not seq.finished:
                self.engine.step()
                safe = len(seq.text) if seq.finished else max(sent, len(seq.text) - hold)
                if safe > sent:
                    yield seq.text[sent:safe]
                    sent = safe
        finally:
            if not seq.finished:
                self.engine.abort(seq)
