"""Request fields -> `SamplingParams`, with each bad value reported as a 400 naming its field.

Fields the client leaves out stay None, so the model's generation_config.json decides them, as it does
for `LLM.generate`.
"""

from __future__ import annotations

from jaxrs.engine.sampling import SamplingParams
from jaxrs.errors import JaxrsError
from jaxrs.structured import Grammar
from server.errors import APIError
from server.schemas import SamplingFields

# The field a SamplingParams message starts with -> the request field to name in the error.
_PARAMS = {
    "max_tokens": "max_tokens",
    "n": "n",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "logit_bias": "logit_bias",
    "logprobs": "logprobs",
    "stop": "stop",
    "stop_token_ids": "stop_token_ids",
    "min_tokens": "min_tokens",
    "allowed_token_ids": "allowed_token_ids",
    "bad_words": "bad_words",
    "truncate_prompt_tokens": "truncate_prompt_tokens",
    "prompt_logprobs": "prompt_logprobs",
}

# Samples per request (OpenAI's bound; vLLM sets none): each is a sequence of its own, and the scheduler
# runs them max_num_seqs at a time, so a large n waits rather than fails.
MAX_N = 128
MAX_TEMPERATURE = 2.0  # OpenAI's bound (far above it, sampling is noise)
INT32_MAX = 2**31 - 1  # the engine packs top_k into int32; any top_k >= the vocabulary means "off"


def param_of(error: JaxrsError) -> str | None:
    """The request field an engine validation message is about (its first word), if it names one."""
    words = str(error).split()
    return _PARAMS.get(words[0]) if words else None


def sampling_params(
    req: SamplingFields, *, max_tokens: int, logprobs: int | None, grammar: Grammar | None = None
) -> SamplingParams:
    """Build the engine's parameters; `max_tokens`, `logprobs` and the output `grammar` (see
    `server.structured`) are already resolved per endpoint."""
    if req.cache_salt is not None and not req.cache_salt:
        raise APIError(400, "cache_salt must be a non-empty string", param="cache_salt")
    if not 1 <= req.n <= MAX_N:
        raise APIError(400, f"n must be in [1, {MAX_N}], not {req.n}", param="n")
    if req.seed is not None and not -(2**63) <= req.seed < 2**63:  # OpenAI's and vLLM's int64
        raise APIError(400, f"seed must be a 64-bit integer, not {req.seed}", param="seed")
    if req.temperature is not None and req.temperature > MAX_TEMPERATURE:
        raise APIError(
            400,
            f"temperature must be in [0, {MAX_TEMPERATURE:g}], not {req.temperature:g}",
            param="temperature",
        )
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=req.temperature,
            top_k=req.top_k if req.top_k is None else min(req.top_k, INT32_MAX),
            top_p=req.top_p,
            min_p=req.min_p,
            seed=req.seed,
            stop=req.stop,
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos,
            skip_special_tokens=req.skip_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output,
            n=req.n,
            repetition_penalty=req.repetition_penalty,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            logit_bias=req.logit_bias,  # type: ignore[arg-type]  # string keys are converted
            logprobs=logprobs,
            grammar=grammar,
            speculative=req.speculative,
            min_tokens=req.min_tokens or 0,
            allowed_token_ids=req.allowed_token_ids,
            bad_words=req.bad_words,
            truncate_prompt_tokens=req.truncate_prompt_tokens,
            prompt_logprobs=req.prompt_logprobs,
        )
    except JaxrsError as e:
        raise APIError(400, str(e), param=param_of(e)) from None
