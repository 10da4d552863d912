"""The output processor on a word-level tokenizer (`w3 w4 ...`, `</s>` = 2 is EOS): stop strings, stop
tokens, EOS, length limits and log-probability records, without a model (host-only, fast)."""

from __future__ import annotations

import numpy as np
import pytest

from jaxrs.engine.output_processor import OutputProcessor, stream_end
from jaxrs.engine.sampling import SampleOutput, SamplingParams
from jaxrs.engine.sequence import Sequence, Status, TokenLogprob
from jaxrs.tokenizer import Tokenizer
from tests.conftest import save_tiny_tokenizer

PROMPT = [3, 4]  # "w3 w4": each generated word's text starts with a space
EOS = 2


@pytest.fixture(scope="module")
def processor(tmp_path_factory) -> OutputProcessor:
    folder = tmp_path_factory.mktemp("word-tokenizer")
    save_tiny_tokenizer(folder, 64)
    tokenizer = Tokenizer.from_hf_folder(folder)
    assert tokenizer.eos_token_ids == [EOS]
    return OutputProcessor(tokenizer, tokenizer.eos_token_ids, max_model_len=64)


def sequence(processor: OutputProcessor, prompt=PROMPT, **params) -> Sequence:
    p = SamplingParams(**params)
    return Sequence("req", 0, list(prompt), p, 0, processor.detokenizer(prompt, p))


def feed(processor: OutputProcessor, seq: Sequence, tokens: list[int]) -> list[str | None]:
    """Append tokens until one finishes the sequence; the finish reason after each."""
    reasons = []
    for token in tokens:
        reasons.append(processor.append_token(seq, token))
        if reasons[-1] is not None:
            seq.status = Status.FINISHED  # as the engine does on a finish
            break
    return reasons


def test_stop_string_spanning_two_tokens_is_held_back_then_cut(processor):
    seq = sequence(processor, stop=["5 w6"], max_tokens=10)
    assert feed(processor, seq, [5]) == [None]
    assert seq.text == " w5" and stream_end(seq, 0) == 0  # " w5" could begin the stop string
    assert feed(processor, seq, [6, 7]) == ["stop"]
    assert seq.text == " w" and seq.output_ids == [5, 6]
    assert stream_end(seq, 0) == len(" w")


def test_include_stop_str_in_output_keeps_the_stop_and_holds_nothing_back(processor):
    """vLLM's `include_stop_str_in_output`: the text ends with the stop string (or the stop token's
    text), and a stream has nothing to hold back, since the text is cut after the string anyway."""
    seq = sequence(processor, stop=["5 w6"], max_tokens=10, include_stop_str_in_output=True)
    assert feed(processor, seq, [5]) == [None] and stream_end(seq, 0) == len(" w5")
    assert feed(processor, seq, [6, 7]) == ["stop"] and seq.text == " w5 w6"
    by_id = sequence(processor, stop_token_ids=[6], max_tokens=10, include_stop_str_in_output=True)
    assert feed(processor, by_id, [5, 6]) == [None, "stop"] and by_id.text == " w5 w6"


def test_text_that_cannot_begin_a_stop_string_streams(processor):
    seq = sequence(processor, stop=["xyz"], max_tokens=10)
    feed(processor, seq, [5, 6])
    assert seq.text == " w5 w6" and stream_end(seq, 0) == len(" w5 w6") - 2


def test_stop_at_the_very_first_token(processor):
    seq = sequence(processor, stop=["w5"], max_tokens=10)
    assert feed(processor, seq, [5, 6]) == ["stop"]
    assert seq.text == " " and seq.output_ids == [5]
    by_id = sequence(processor, stop_token_ids=[5], max_tokens=10)
    assert feed(processor, by_id, [5, 6]) == ["stop"]
    assert by_id.text == "" and by_id.output_ids == [5]  # a stop token adds no text


def test_eos_stops_unless_ignored(processor):
    seq = sequence(processor, max_tokens=10)
    assert feed(processor, seq, [5, EOS, 6]) == [None, "stop"]
    assert seq.text == " w5" and seq.output_ids == [5, EOS]
    ignoring = sequence(processor, max_tokens=10, ignore_eos=True)
    assert feed(processor, ignoring, [5, EOS, 6]) == [None, None, None]
    assert ignoring.text == " w5 w6" and ignoring.output_ids == [5, EOS, 6]  # EOS text skipped


def test_length_stops_at_max_tokens_and_max_model_len(processor):
    seq = sequence(processor, max_tokens=3)
    assert feed(processor, seq, [5, 6, 7, 8]) == [None, None, "length"]
    assert seq.text == " w5 w6 w7"
    long_prompt = list(range(3, 63))  # 60 tokens of the processor's 64
    near_the_end = sequence(processor, prompt=long_prompt, max_tokens=10)
    assert feed(processor, near_the_end, [5, 6, 7, 8, 9]) == [None, None, None, "length"]


def test_logprob_records_follow_the_request(processor):
    out = SampleOutput(
        tokens=np.array([[5, 6]]),
        logprobs=np.array([[-0.5, -1.5]], np.float32),
        top_ids=np.array([[[5, 9, 4], [7, 6, 3]]]),
        top_logprobs=np.array([[[-0.5, -1.0, -2.0], [-1.0, -1.5, -3.0]]], np.float32),
    )
    seq = sequence(processor, max_tokens=10, logprobs=2)
    assert processor.append(seq, out, (0, 0)) is None
    assert processor.append(seq, out, (0, 1)) is None
    assert seq.output_ids == [5, 6] and seq.first_token_time is not None
    assert seq.logprobs == [
        TokenLogprob(5, -0.5, ((5, -0.5), (9, -1.0))),
        TokenLogprob(6, -1.5, ((7, -1.0), (6, -1.5))),
    ]
    none_asked = sequence(processor, max_tokens=10)
    processor.append(none_asked, out, (0, 0))
    assert none_asked.logprobs == []


def test_no_stop_string_before_min_tokens(processor):
    """vLLM's min_tokens: no stop string ends the output before it. Stop tokens and EOS are held back by
    the sampler instead; one that comes anyway (nothing else could be drawn) ends the output."""
    seq = sequence(processor, stop=["w5"], min_tokens=3, max_tokens=10)
    assert feed(processor, seq, [5, 7, 5]) == [None, None, "stop"]
    assert seq.output_ids == [5, 7, 5]
    eos = sequence(processor, stop_token_ids=[6], min_tokens=2, max_tokens=10)
    assert feed(processor, eos, [EOS]) == ["stop"]
    assert feed(processor, sequence(processor, stop_token_ids=[6], min_tokens=2), [6]) == ["stop"]


def test_stop_reason_names_the_stop_token_or_string(processor):
    """vLLM's stop_reason: the stop token id or the stop string that ended the output; None for EOS."""
    by_token = sequence(processor, stop_token_ids=[6])
    feed(processor, by_token, [5, 6])
    by_string = sequence(processor, stop=["w7"])
    feed(processor, by_string, [5, 7])
    by_eos = sequence(processor, stop_token_ids=[6])
    feed(processor, by_eos, [5, EOS])
    assert (by_token.stop_reason, by_string.stop_reason, by_eos.stop_reason) == (6, "w7", None)
