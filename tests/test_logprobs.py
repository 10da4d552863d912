"""Engine log-probabilities in OpenAI's two response shapes (server/logprobs.py), on a toy vocabulary."""

from __future__ import annotations

from jaxrs.engine.sequence import TokenLogprob
from server.logprobs import chat_logprobs, completion_logprobs

WORDS = {0: "The", 1: " sky", 2: " is", 3: " blue", 4: " red"}


class Words:
    """A tokenizer whose token i reads WORDS[i]."""

    def decode(self, ids: list[int]) -> str:
        return "".join(WORDS[i] for i in ids)


def test_completion_top_logprobs_hold_the_sampled_token_too():
    """A sampled token outside the top alternatives still appears in its `top_logprobs` (OpenAI: up to
    logprobs + 1 entries), and `logprobs: 0` gives the token alone rather than nothing."""
    drawn = [TokenLogprob(3, -2.5, ((4, -0.5), (2, -1.0))), TokenLogprob(1, -0.1, ((1, -0.1), (0, -3.0)))]
    out, end = completion_logprobs(Words(), drawn, top=2, offset=10)
    assert out.tokens == [" blue", " sky"] and out.token_logprobs == [-2.5, -0.1]
    assert out.top_logprobs == [{" red": -0.5, " is": -1.0, " blue": -2.5}, {" sky": -0.1, "The": -3.0}]
    assert out.text_offset == [10, 15] and end == 19

    alone, _ = completion_logprobs(Words(), drawn, top=0, offset=0)
    assert alone.top_logprobs == [{" blue": -2.5}, {" sky": -0.1}]


def test_chat_top_logprobs_are_the_likeliest_only():
    content = chat_logprobs(Words(), [TokenLogprob(3, -2.5, ((4, -0.5),))]).content
    assert [(c.token, c.logprob, bytes(c.bytes)) for c in content] == [(" blue", -2.5, b" blue")]
    assert [(t.token, t.logprob) for t in content[0].top_logprobs] == [(" red", -0.5)]
