"""The synchronous Python API: `LLM(model).generate(prompts, SamplingParams(...))`.

A list of prompts runs as one continuous batch on the engine; results come back in prompt order.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxrs.embedding import Embedder, embedding_source, load_embedder
from jaxrs.engine.engine import Engine, EngineConfig, Request
from jaxrs.engine.output_processor import stream_end
from jaxrs.engine.prompt_logprobs import PromptLogprobs, prompt_logprobs
from jaxrs.engine.requantize import Requantized, source_reloader
from jaxrs.engine.sampling import SamplingParams
from jaxrs.engine.sequence import Sequence as EngineSequence
from jaxrs.engine.sequence import TokenLogprob
from jaxrs.engine.warmup import Warmup
from jaxrs.errors import JaxrsError
from jaxrs.loading import LoadedModel, load_model
from jaxrs.loading.sentence_transformers import EmbeddingSpec
from jaxrs.lora import serving as lora_serving
from jaxrs.lora.config import lora_options
from jaxrs.lora.xlora_config import xlora_options
from jaxrs.ops import Kernels
from jaxrs.parallel.data_parallel import replicate, spare_trees
from jaxrs.prompt_inputs import Prompt, is_one_prompt, prompt_input
from jaxrs.structured.tools import (
    answer_calls,
    template_message,
    tool_conversation,
    tool_params,
    tool_plan,
)
from jaxrs.vision.chat import chat_inputs
from jaxrs.vision.media import MediaPolicy
from jaxrs.vision.prompt import ImagePrompt

log = logging.getLogger("jaxrs")

Message = Mapping[str, object]


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "abort" | "tool_calls"
    logprobs: list[TokenLogprob] | None = None
    # X-LoRA: the classifier's scalings `[positions, lora layers, experts]` of every position fed
    xlora_scalings: np.ndarray | None = None
    # `chat` with tools: the calls made, as OpenAI's {id, type, function: {name, arguments}} (then
    # `text` is the text outside them); None when none were made
    tool_calls: list[dict] | None = None
    stop_reason: int | str | None = None  # vLLM's: the stop token id or stop string that ended it (not EOS)

    @property
    def cumulative_logprob(self) -> float | None:
        """vLLM's: the sum of the chosen tokens' log-probabilities (None unless logprobs were asked)."""
        return None if self.logprobs is None else float(sum(lp.logprob for lp in self.logprobs))


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    prompt_logprobs: PromptLogprobs | None = None  # with SamplingParams.prompt_logprobs (vLLM's)

    # The first sample, for the common n = 1 case.
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str:
        return self.outputs[0].finish_reason


# Greedy and sampled decode compile to different steps (prefill has one variant). Penalties, logit
# bias and top logprobs compile on first use (logged).
WARMUP_PROFILES = (SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_p=0.9))


def resolve_dtype(dtype: str | jnp.dtype) -> jnp.dtype:
    """ "auto" is bfloat16 on accelerators and float32 on CPU (where bf16 matmuls are slow)."""
    if dtype == "auto":
        return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    return jnp.dtype(dtype)


def request_output(request: Request, prompt: str | None) -> RequestOutput:
    seqs = sorted(request.seqs, key=lambda s: s.index)
    outputs = [
        CompletionOutput(
            s.index,
            s.text,
            list(s.output_ids),
            s.finish_reason or "abort",
            list(s.logprobs) if s.params.logprobs is not None else None,
            stop_reason=s.stop_reason,
        )
        for s in seqs
    ]
    return RequestOutput(request.request_id, prompt, seqs[0].prompt_ids, outputs, seqs[0].num_cached_tokens)


def requested_adapters(llm: LLM, requests: object) -> str | list[str | None] | None:
    """vLLM's `lora_request` (a `LoRARequest`, anything with `lora_name` and `lora_path`, or one per
    prompt) as adapter names; an adapter not loaded yet is loaded from its `lora_path` under its name."""
    if requests is None:
        return None
    many = isinstance(requests, Sequence) and not isinstance(requests, str)
    names: list[str | None] = []
    for request in requests if many else [requests]:  # type: ignore[union-attr]
        name = None if request is None else getattr(request, "lora_name", None)
        if request is not None and not isinstance(name, str):
            raise JaxrsError(f"lora_request must have a lora_name (vLLM's LoRARequest), not {request!r}")
        path = getattr(request, "lora_path", None)
        if name is not None and name not in llm.lora_adapters() and path:
            llm.load_lora(name, str(path))
        names.append(name)
    return names if many else names[0]


def per_prompt(lora: str | Sequence[str | None] | None, count: int) -> list[str | None]:
    """The adapter of each of `count` prompts: one name (or None) for all, or one per prompt."""
    names = [lora] * count if lora is None or isinstance(lora, str) else list(lora)
    if len(names) != count:
        raise ValueError(f"{count} prompts but {len(names)} LoRA adapter names")
    return names


class LLM:
    """Load a model once, then generate for lists of prompts or chat conversations.

    `model` is a GGUF file, a Hugging Face model folder, a Hub repo id, or None for the demo model.
    A GGUF's quantized tensors stay packed on the device (`packed=False` dequantizes them to `dtype`
    instead); `isq="Q4K"` (any
    `jaxrs.quant` format name, `4` = Q4K, `8` = Q8_0) quantizes float weights while loading, and
    `requantize("Q8_0")` quantizes them again later, without a restart.
    Engine knobs (`kv_cache_mb`, `max_num_seqs`, `prefix_caching`...) are `EngineConfig` fields.
    `model` may also name a model of the catalog (`jaxrs.loading.catalog`: fetched on first use), and
    `isq_embeddings` says how ISQ stores the embedding and head (see `load_model`). A vision-language
    model's `chat` takes image content parts; `media` (`jaxrs.vision.media.MediaPolicy`) says which
    image URLs it may read; `mmproj` adds a llama.cpp mmproj GGUF's tower to a GGUF text model.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = "auto",
        gguf_file: str | None = None,
        tokenizer: str | None = None,
        kernels: Mapping[str, str] | None = None,
        isq: str | None = None,
        packed: bool | None = None,
        warmup: bool = False,
        isq_embeddings: str = "q8_0",
        media: MediaPolicy | None = None,
        mmproj: str | None = None,
        data_parallel_size: int = 1,
        **engine_config,
    ):
        self.dtype = resolve_dtype(dtype)
        self.media = media or MediaPolicy()  # what image URLs in `chat` may read
        self._engine: Engine | None = None
        self.replicas: list[Engine] = []  # data-parallel engines a server drives (replicas[0] is `engine`)
        self._embedder: Embedder | None = None
        if embedding_source(model):  # a sentence-embedding model: no engine, `embed` only
            self._embedder = load_embedder(
                Path(model).expanduser(),
                dtype=self.dtype,
                kernels=Kernels.from_mapping(kernels),
                tokenizer=tokenizer,
            )
            self.tokenizer = self._embedder.tokenizer
            if warmup:
                self._embedder.warmup()
            return
        loaded = load_model(
            model,
            gguf_file=gguf_file,
            dtype=self.dtype,
            tokenizer=tokenizer,
            packed=packed,
            isq=isq,
            isq_embeddings=isq_embeddings,
            mmproj=mmproj,
        )
        self.tokenizer = loaded.tokenizer
        spare = spare_trees(loaded, data_parallel_size)  # before the engine places its tree in place
        self._engine = Engine(
            loaded,
            EngineConfig(**xlora_options(lora_options(engine_config))),
            kernels=Kernels.from_mapping(kernels),
            dtype=self.dtype,
            reload=source_reloader(loaded.source, self.dtype, tokenizer, isq_embeddings),
        )
        self.replicas = [self._engine, *replicate(self._engine, spare)]
        if warmup:
            self.warmup()

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise JaxrsError(
                f"{self.source} is an embedding model: it embeds (LLM.embed), it does not generate"
            )
        return self._engine

    @property
    def generates(self) -> bool:
        """False for a sentence-embedding model, which only embeds."""
        return self._engine is not None

    @property
    def source(self) -> str:
        return self._engine.source if self._engine is not None else self.embedder.source

    @property
    def embedder(self) -> Embedder:
        """The embedding runner: the embedding model's, or for a generation model one pooling the last
        token of its final hidden states (unit length), built on first use over the engine's weights."""
        if self._embedder is None:
            engine = self.engine
            spec = EmbeddingSpec(pooling=("lasttoken",), normalize=True)
            cfg = engine.model.config
            params = lambda: engine.model.params  # noqa: E731 (the served weights, after requantize too)
            self._embedder = Embedder(
                cfg, params, self.tokenizer, spec, source=engine.source, kernels=engine.kernels
            )
        return self._embedder

    def embed(
        self,
        texts: str | Sequence[str | list[int]],
        *,
        dimensions: int | None = None,
        truncate_prompt_tokens: int | None = None,
    ) -> np.ndarray:
        """Sentence embeddings `[len(texts), dim]` (one text: `[dim]`), batched by length and jitted.
        Too-long inputs are an error unless `truncate_prompt_tokens` (-1: the model's limit) cuts them;
        `dimensions` shortens a Matryoshka model's vectors (re-normalized)."""
        one = isinstance(texts, str)
        inputs = [texts] if one else list(texts)
        out = self.embedder.embed(
            inputs, dimensions=dimensions, truncate_prompt_tokens=truncate_prompt_tokens
        )
        return out.vectors[0] if one else out.vectors

    @property
    def model(self) -> LoadedModel:
        """The model served (the engine's: `requantize` replaces its weights)."""
        return self.engine.model

    def load_lora(self, name: str, path: str) -> None:
        """Load the peft LoRA adapter at `path` as `name` (needs `enable_runtime_lora` or a free slot of
        an engine started with adapters)."""
        lora_serving.load_adapter(self.engine, name, path)

    def unload_lora(
        self, name: str, *, timeout: float = lora_serving.UNLOAD_WAIT_S, force: bool = False
    ) -> None:
        """Unload adapter `name`. Requests running with it (started with `engine.add_request` or a
        `stream` not read to its end) are stepped to their end first, for at most `timeout` seconds;
        then `force` aborts those left, else the adapter stays loaded and `AdapterInUse` is raised.
        While a server drives this LLM, use its `POST /v1/unload_lora_adapter`."""
        lora_serving.unload_adapter(self.engine, name, timeout=timeout, force=force)

    def lora_adapters(self) -> list[str]:
        """The names of the LoRA adapters loaded now."""
        return lora_serving.adapter_names(self.engine)

    def requantize(self, fmt: str) -> Requantized:
        """Quantize the served weights to `fmt` now (runtime ISQ; see `Engine.requantize`): pending
        requests carry on afterwards. While a server drives this LLM, use its `POST /v1/re_isq`."""
        return self.engine.requantize(fmt)

    def warmup(self, *, background: bool = False) -> Warmup | None:
        """Compile every step shape for the sampling profiles serving meets (see `WARMUP_PROFILES`);
        with `background`, the likeliest few now and the rest in a background thread. An embedding model
        compiles its common batch shapes (no background)."""
        if not self.generates:
            self.embedder.warmup()
            return None
        warm = [engine.warmup(WARMUP_PROFILES, background=background) for engine in self.replicas]
        return warm[0]

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        images: Sequence[ImagePrompt | None] | None = None,
        lora: str | Sequence[str | None] | None = None,
        lora_request: object = None,
    ) -> list[RequestOutput]:
        """Generate for each prompt; results come back in prompt order. A prompt is text, token ids, or
        vLLM's `{"prompt": text}` / `{"prompt_token_ids": ids}`, either with `"multi_modal_data":
        {"image": PIL image or list}` (the text holding the model's image marker per image; see
        `jaxrs.prompt_inputs`) and with `"cache_salt"` (prefix-cache blocks shared only within a salt).
        `images`: each prompt's placed images (`jaxrs.vision.prompt.place_images`; `chat` makes them).
        `lora`: the adapter every prompt runs with, or one per prompt (None: the base model); or vLLM's
        `lora_request` (`LoRARequest(name, id, path)`, or one per prompt: loaded from its path on first
        use, see `requested_adapters`)."""
        if lora_request is not None:
            if lora is not None:
                raise JaxrsError("give lora or lora_request, not both")
            lora = requested_adapters(self, lora_request)
        if is_one_prompt(prompts):
            prompts = [prompts]  # type: ignore[list-item]
        vision = self.engine.model.vision
        inputs = [prompt_input(p, self.tokenizer, vision, self.media) for p in prompts]
        if images is not None:
            inputs = [dataclasses.replace(x, images=im) for x, im in zip(inputs, images, strict=True)]
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} sampling params")
        if lora is not None:
            names = per_prompt(lora, len(prompts))
            params_list = [dataclasses.replace(p, lora=n) for p, n in zip(params_list, names, strict=True)]
        elif self.engine.xlora is not None:  # an X-LoRA LLM runs X-LoRA unless told otherwise
            name = self.engine.xlora.name
            params_list = [p if p.lora else dataclasses.replace(p, lora=name) for p in params_list]
        for x, p in zip(inputs, params_list, strict=True):
            if x.images is not None and p.prompt_logprobs is not None:
                raise JaxrsError("prompt_logprobs cannot score a prompt with images")
        requests = []
        try:
            for x, p in zip(inputs, params_list, strict=True):
                requests.append(self.engine.add_request(x.ids, p, images=x.images, cache_salt=x.cache_salt))
            self._run(requests, use_tqdm)
        finally:
            for r in requests:
                if not r.finished:
                    self.engine.abort(r.request_id)
        outputs = [request_output(r, x.text) for r, x in zip(requests, inputs, strict=True)]
        for request, output in zip(requests, outputs, strict=True):
            seqs = sorted(request.seqs, key=lambda s: s.index)
            if (top := seqs[0].params.prompt_logprobs) is not None:
                output.prompt_logprobs = prompt_logprobs(
                    self.engine, seqs[0].prompt_ids, top, seqs[0].params.lora
                )
            for seq, completion in zip(seqs, output.outputs, strict=True):
                completion.xlora_scalings = self.xlora_scalings(seq)
        return outputs

    def xlora_scalings(self, seq: EngineSequence) -> np.ndarray | None:
        """The X-LoRA classifier's scalings of every position of `seq` fed so far (an engine `Sequence`,
        e.g. `request.seqs[0]`), `[positions, lora layers, experts]`; None unless it runs X-LoRA."""
        xlora = self.engine.xlora
        return xlora.scalings(seq) if xlora is not None and xlora.runs(seq) else None

    def _run(self, requests: list[Request], use_tqdm: bool) -> None:
        with tqdm(
            total=len(requests), desc="Generating", unit="req", disable=not use_tqdm or len(requests) < 2
        ) as bar:
            done = 0
            while self.engine.has_unfinished() and done < len(requests):
                self.engine.step()
                now = sum(r.finished for r in requests)
                bar.update(now - done)
                done = now

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | None = None,
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        use_tqdm: bool = True,
        lora: str | None = None,
        tools: list[dict] | None = None,
        tool_choice: str | dict | None = None,
        parallel_tool_calls: bool | None = None,
        tool_call_parser: str | None = None,
        chat_template: str | None = None,
        chat_template_kwargs: Mapping[str, object] | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template (or `chat_template`, a Jinja template, as vLLM's `LLM.chat`
        takes one) to one conversation or a list of them, then generate; `chat_template_kwargs` are
        more template variables (e.g. `enable_thinking`). A
        message's content may be a list of parts: text (`{"type": "text", "text": ...}`) and images
        (`{"type": "image_url", "image_url": {"url": ...}}` with a data/http(s)/file URL, `{"type":
        "image", "image": PIL.Image}`, or a PIL image itself). `lora`: the adapter every conversation
        runs with (None: the base model). `continue_final_message` (with `add_generation_prompt=False`)
        leaves the final message open for the model to continue: a prefilled answer.

        `tools`, `tool_choice` ("auto", "none", "required" or `{"type": "function", "function":
        {"name": ...}}`) and `parallel_tool_calls` as in OpenAI's API: the tools go to the template,
        "required" and a named function are forced by a grammar, and each output's calls come back
        parsed (`CompletionOutput.tool_calls`, finish_reason "tool_calls"). The format is the one the
        template teaches (`tool_call_parser`: hermes, mistral, llama3_json or generic, to name it); a
        template that renders no tools gets the generic one (tools described in the system turn, the
        answer one JSON object held to a call or a `response`)."""
        conversations = [messages] if messages and isinstance(messages[0], Mapping) else messages
        tokenizer = self.tokenizer
        if chat_template is not None:  # a copy, so the model's own template stays for other calls
            tokenizer = copy.copy(tokenizer)
            tokenizer.chat_template = chat_template
        params = sampling_params or SamplingParams()
        plan = tool_plan(tokenizer, tools, tool_choice, parallel_tool_calls, tool_call_parser, params.grammar)
        params = tool_params(plan, params)
        vision = self.engine.model.vision
        inputs = [
            chat_inputs(
                tokenizer,
                vision,
                tool_conversation(tokenizer, plan, [template_message(dict(m)) for m in c]),
                self.media,
                add_generation_prompt=add_generation_prompt,
                tools=plan.template_tools if plan else None,
                continue_final_message=continue_final_message,
                template_variables=chat_template_kwargs,
            )
            for c in conversations
        ]
        prompts = [ids for ids, _ in inputs]
        images = [im for _, im in inputs]
        outs = self.generate(prompts, params, use_tqdm=use_tqdm, images=images, lora=lora)
        for out in outs if plan else []:
            for o in out.outputs:
                text, o.tool_calls, o.finish_reason = answer_calls(plan, o.text, o.finish_reason)
                o.text = text or ""
        return outs

    def chat_prompt_ids(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of a conversation rendered with the chat template (which writes its own BOS)."""
        text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def stream(
        self,
        prompt_ids: list[int],
        sampling_params: SamplingParams | None = None,
        *,
        images: ImagePrompt | None = None,
        lora: str | None = None,
    ) -> Iterator[str]:
        """Yield the text of one request (its first sample) as it is generated, with adapter `lora`
        (None: the params' own, or the base model).

        Text that could be the start of a stop string is held back until it is known not to be one.
        """
        params = sampling_params or SamplingParams()
        params = params if lora is None else dataclasses.replace(params, lora=lora)
        request = self.engine.add_request(prompt_ids, params, images=images)
        seq = request.seqs[0]
        sent = 0
        try:
            while not seq.finished:
                self.engine.step()
                safe = stream_end(seq, sent)
                if safe > sent:
                    yield seq.text[sent:safe]
                    sent = safe
        finally:
            if not request.finished:
                self.engine.abort(request.request_id)

    def score(
        self,
        prompts: Sequence[str | list[int]],
        continuations: Sequence[str | list[int]],
        *,
        lora: str | Sequence[str | None] | None = None,
    ) -> list[list[float]]:
        """Log-probability of each continuation token given the prompt and the tokens before it, under
        the LoRA adapter `lora` (one name for all, or one per prompt; None: the base model).

        Text continuations are tokenized on their own (no BOS), as evaluation harnesses do.
        """
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        results = []
        names = per_prompt(lora, len(prompts))
        for prompt, cont, name in zip(prompts, continuations, names, strict=True):
            p_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            c_ids = (
                self.tokenizer.encode(cont, add_special_tokens=False) if isinstance(cont, str) else list(cont)
            )
            results.append(self.engine.score(p_ids, c_ids, name))
        return results
