"""OpenAI request and response bodies as msgspec Structs.

Requests ignore fields they do not know (msgspec's default), so clients that send newer OpenAI fields
still work; fields that change what is generated but are not supported are rejected where they are read.
"""

from __future__ import annotations

from typing import Literal

import msgspec
from msgspec import UNSET, UnsetType

# -- requests -------------------------------------------------------------------------------------


class ImageURL(msgspec.Struct):
    url: str
    detail: str | None = None


class ContentPart(msgspec.Struct):
    """One part of a message's content: text, or an image (`image_url`) for a vision-language model."""

    type: str
    text: str | None = None
    image_url: ImageURL | str | None = None


class ChatMessage(msgspec.Struct):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict] | None = None  # an assistant's calls: {id, type, function: {name, arguments}}
    tool_call_id: str | None = None  # a tool result: the call it answers


class StreamOptions(msgspec.Struct):
    """Unset fields stay UNSET, so `{}` (which vLLM takes without `stream`) is told from a set field."""

    include_usage: bool | UnsetType = UNSET
    continuous_usage_stats: bool | UnsetType = UNSET  # vLLM's: each chunk's running usage too

    @property
    def given(self) -> bool:
        return self.include_usage is not UNSET or self.continuous_usage_stats is not UNSET


class SamplingFields(msgspec.Struct, kw_only=True):
    """Fields shared by both generation endpoints. Unset means "the model's generation config"."""

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    n: int = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    max_tokens: int | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False  # vLLM's: the matched stop string stays in the text
    speculative: bool = True  # extension: false turns speculative decoding off for this request
    xlora_scalings: bool = False  # extension: an X-LoRA answer carries each choice's latest scalings
    cache_salt: str | None = None  # vLLM's: prefix-cache blocks are shared only with the same salt
    # vLLM's extras (`jaxrs.engine.sampling.SamplingParams`).
    min_tokens: int | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = None
    prompt_logprobs: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Output constraints (server.structured): OpenAI's, vLLM's (and its older guided_*), mistral.rs's.
    response_format: dict | None = None
    structured_outputs: dict | None = None
    grammar: dict | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


class ChatCompletionRequest(SamplingFields, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    # vLLM's chat template options: a prefilled answer continued, more template variables.
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict | None = None


class CompletionRequest(SamplingFields, kw_only=True):
    # str, list[str], list[int] or list[list[int]]; msgspec allows one array type per union, so the
    # list's items are checked by `server.routes_completions.prompt_ids`.
    prompt: str | list[str | int | list[int]]
    suffix: str | None = None
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None


# -- responses ------------------------------------------------------------------------------------


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int  # prompt tokens found in the prefix cache (OpenAI's; vLLM's with a flag)


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | UnsetType = UNSET  # on a response's final usage


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(msgspec.Struct):
    content: list[ChatTokenLogprob]


class AssistantMessage(msgspec.Struct):
    content: str | None
    role: str = "assistant"
    tool_calls: list[dict] | UnsetType = UNSET  # {id, type: "function", function: {name, arguments}}


class ChatChoice(msgspec.Struct):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None
    stop_reason: int | str | None = None  # vLLM's: the stop token id or string that ended it (not EOS)


class PromptLogprob(msgspec.Struct):
    """vLLM's prompt_logprobs entry: one token's log-probability and rank at a prompt position."""

    logprob: float
    rank: int
    decoded_token: str


class ChatCompletion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: Literal["chat.completion"] = "chat.completion"
    system_fingerprint: str | None = None
    xlora_scalings: list | msgspec.UnsetType = msgspec.UNSET  # extension: per choice, [lora layers][experts]
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | UnsetType = (
        UNSET  # vLLM's (see CompletionChoice)
    )


class Delta(msgspec.Struct):
    """A streamed message delta; unset fields are left out (the final chunk's delta is `{}`)."""

    role: str | UnsetType = UNSET
    content: str | UnsetType = UNSET
    tool_calls: list[dict] | UnsetType = UNSET  # {index, id, type, function: {name, arguments}} fragments


class ChatChunkChoice(msgspec.Struct):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    usage: Usage | None | UnsetType = UNSET  # null on every chunk when usage is asked for, else absent
    system_fingerprint: str | None = None


class CompletionLogprobs(msgspec.Struct):
    """The legacy completions logprobs object: one entry per token of the choice's text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None
    # vLLM's: None for the first prompt token, then {token id: entry} for the prompt token and the top N
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | UnsetType = UNSET
    stop_reason: int | str | None = None  # vLLM's: the stop token id or string that ended it (not EOS)


class Completion(msgspec.Struct):
    """A completion, or (object "text_completion" too) one chunk of a streamed one."""

    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    object: Literal["text_completion"] = "text_completion"
    usage: Usage | None | UnsetType = UNSET
    system_fingerprint: str | None = None


class ModelCard(msgspec.Struct):
    """A served model (vLLM's card: `root` the model's source, `max_model_len` its context) or a LoRA
    adapter (`parent` the base model's served name, `root` the adapter's path)."""

    id: str
    created: int
    owned_by: str = "jaxrs"
    object: Literal["model"] = "model"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: Literal["list"] = "list"


class ErrorBody(msgspec.Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(msgspec.Struct):
    error: ErrorBody
