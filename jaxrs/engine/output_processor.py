"""From sampled tokens to what a request returns: text, log-probabilities, and when a sequence stops.

Runs on the host after every step. A stop token (a request's `stop_token_ids`, or EOS unless
`ignore_eos`) ends a sequence without adding its text; a stop string ends it with the text cut before
the string (both kept with `include_stop_str_in_output`). No stop string ends one shorter than
`min_tokens`, and the sampler holds stop tokens back until then, unless nothing else may be drawn (a
grammar or `allowed_token_ids` that can only end): a stop token that comes anyway ends the sequence.
A stream must not show text that a later token could turn into a stop string, so it shows a running
sequence's text up to `stream_end` only.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from jaxrs.engine.sampling import SampleOutput, SamplingParams
from jaxrs.engine.sequence import Sequence, TokenLogprob
from jaxrs.tokenizer import IncrementalDetokenizer, Tokenizer


def held_back(params: SamplingParams) -> int:
    """Characters at the end of a running sequence's text that may still begin a stop string (none
    when the stop string stays in the text)."""
    if params.include_stop_str_in_output:
        return 0
    return max((len(s) for s in params.stop), default=1) - 1


def stream_end(seq: Sequence, sent: int) -> int:
    """How much of `seq.text` a stream that has shown `sent` characters may show now: a finished
    sequence's whole text, a running one's but for an end that may still begin a stop string."""
    if seq.finished:
        return len(seq.text)
    return max(sent, len(seq.text) - held_back(seq.params))


def logprob_record(out: SampleOutput, at: tuple, top: int) -> TokenLogprob:
    """The chosen token's log-probability at `at` in a step's output, with its `top` best alternatives."""
    alternatives = zip(out.top_ids[at].tolist(), out.top_logprobs[at].tolist(), strict=True)
    return TokenLogprob(int(out.tokens[at]), float(out.logprobs[at]), tuple(alternatives)[:top])


class OutputProcessor:
    """Appends each sampled token to its sequence and says whether, and why, the sequence finished.

    It decides; the engine acts on a finish (frees the blocks, forgets the request).
    """

    def __init__(self, tokenizer: Tokenizer, eos_token_ids: Iterable[int], max_model_len: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len

    def detokenizer(self, prompt_ids: list[int], params: SamplingParams) -> IncrementalDetokenizer:
        """A new sequence's detokenizer (the prompt's last ids give the first tokens their context)."""
        return IncrementalDetokenizer(
            self.tokenizer, prompt_ids, skip_special_tokens=params.skip_special_tokens
        )

    def append(self, seq: Sequence, out: SampleOutput, at: tuple) -> str | None:
        """Append the token sampled at `at` in a step's output; returns the finish reason, if any."""
        record = logprob_record(out, at, seq.params.logprobs) if seq.params.logprobs is not None else None
        return self.append_token(seq, int(out.tokens[at]), record)

    def append_token(self, seq: Sequence, token: int, logprob: TokenLogprob | None = None) -> str | None:
        """Append one token (and its log-probability record, if the request asked for them); returns
        "stop" or "length" when this token ends the sequence, else None."""
        p = seq.params
        seq.output_ids.append(token)
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        if logprob is not None:
            seq.logprobs.append(logprob)
        may_stop = len(seq.output_ids) >= p.min_tokens  # vLLM's: no stop string before min_tokens tokens
        if token in p.stop_token_ids or (token in self.eos_token_ids and not p.ignore_eos):
            seq.stop_reason = token if token in p.stop_token_ids else None
            if p.include_stop_str_in_output:
                seq.text += seq.detokenizer.push(token)
            self.flush(seq)
            return "stop"
        before = len(seq.text)
        seq.text += seq.detokenizer.push(token)
        for stop in p.stop if may_stop else ():
            at = seq.text.find(stop, max(0, before - len(stop) + 1))
            if at >= 0:
                seq.text = seq.text[: at + len(stop) if p.include_stop_str_in_output else at]
                seq.stop_reason = stop
                return "stop"
        if len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            self.flush(seq)
            return "length"
        return None

    def flush(self, seq: Sequence) -> None:
        """Add the text the detokenizer still holds (a sequence ending by length or a stop token)."""
        seq.text += seq.detokenizer.flush()
