"""Engine log-probabilities in OpenAI's two response shapes (server/logprobs.py), on a toy vocabulary."""

from __future__ import annotations

from jaxrs.engine.sequence import TokenLogprob
from server.logprobs import chat_logprobs, completion_logprobs, token_bytes
from tests.test_gguf_tokenizer import our_tokenizer

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


def test_chat_bytes_are_the_token_bytes_so_split_characters_join(demo_gguf):
    """OpenAI's `bytes`: a token holding part of a character (its text U+FFFD) carries its own bytes,
    so the tokens' bytes join into the text (they carried U+FFFD's bytes)."""
    tokenizer = our_tokenizer(str(demo_gguf))  # byte-level BPE
    text = "Good morning 日本 😀🎉"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # some tokens split a character
    content = chat_logprobs(tokenizer, [TokenLogprob(i, -1.0, ((i, -1.0),)) for i in ids]).content
    assert b"".join(bytes(c.bytes) for c in content) == text.encode()
    assert all(c.top_logprobs[0].bytes == c.bytes for c in content)


def test_sentencepiece_byte_pieces_are_their_byte():
    class Pieces(Words):
        def decode(self, ids: list[int]) -> str:
            return "\ufffd"

        def id_to_token(self, token_id: int) -> str:
            return "<0xE6>"

    assert token_bytes(Pieces(), 7) == b"\xe6"
