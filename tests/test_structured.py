"""Structured output: the packed mask (packing, EOS rule, order of processors), grammar errors, and the
engine on a tiny random byte-level model: every constrained output matches its grammar, and free rows
batched with constrained ones give the tokens they give alone."""

from __future__ import annotations

import json
import random
import re

import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

from jaxrs import LLM, SamplingParams
from jaxrs.engine.sampling import build_sampling_batch, sample
from jaxrs.structured import Grammar
from jaxrs.structured.grammar import GrammarError
from jaxrs.structured.mask import all_allowed, allowed, unpack
from jaxrs.structured.state import GrammarState, token_masks
from tests.structured_model import save_structured_model

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 99},
        "kind": {"enum": ["cat", "dog"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
        "pos": {
            "type": "object",
            "properties": {"x": {"type": "number"}, "ok": {"type": "boolean"}},
            "required": ["x", "ok"],
            "additionalProperties": False,
        },
    },
    "required": ["id", "kind", "tags", "pos"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = save_structured_model(tmp_path_factory.mktemp("structured"))
    return LLM(str(path), kv_cache_mb=8, max_model_len=256, max_num_seqs=8)


@pytest.fixture(scope="module")
def compiler(llm):
    return llm.engine.grammars


def test_packing_round_trips_and_matches_the_device_unpack():
    rng = np.random.default_rng(0)
    keep = rng.random((3, 70)) < 0.5
    words = np.zeros((3, 3), np.uint32)
    for r, c in zip(*np.nonzero(keep), strict=True):
        words[r, c // 32] |= np.uint32(1) << np.uint32(c % 32)
    packed = words.view(np.int32)
    assert (unpack(packed, 70) == keep).all()
    assert (np.asarray(allowed(jnp.asarray(packed), 70)) == keep).all()
    assert unpack(all_allowed(2, 70), 70).all()


def test_mask_comes_before_top_k_and_penalties():
    """Top-k 1 keeps the best *allowed* token; a masked token never wins, whatever its bias."""
    logits = jnp.asarray([[5.0, 4.0, 3.0, 2.0], [5.0, 4.0, 3.0, 2.0]])
    params = [
        SamplingParams(temperature=1.0, top_k=1, seed=0, logit_bias={0: 50.0}),
        SamplingParams(temperature=0.0),
    ]
    batch, flags = build_sampling_batch(params, [0, 0], [0, 0], [[1], [1]], [[], []], 2, 4)
    mask = np.zeros((2, 1), np.uint32)
    mask[0, 0] = 0b1010  # tokens 1 and 3
    mask[1, 0] = 0b1111
    batch["token_mask"] = mask.view(np.int32)
    out = sample(logits, batch, flags)
    assert out.tokens.tolist() == [1, 0]


def test_eos_is_allowed_exactly_when_the_grammar_accepts(llm, compiler):
    eos = llm.tokenizer.eos_token_id
    state = GrammarState(compiler, Grammar.regex(r"[0-9]{2,3}"))
    for text, accepting in [("", False), ("4", False), ("42", True), ("421", True)]:
        if text:
            state.advance(llm.tokenizer.encode(text[-1], add_special_tokens=False)[0])
        row = unpack(token_masks([state], 1, llm.engine.vocab_size), llm.engine.vocab_size)[0]
        assert row[eos] == accepting == state.accepting, text
    assert row.sum() == 1  # three digits: only EOS is left


def test_masks_equal_the_library_matcher_on_random_walks(llm, compiler):
    """Every step of random walks through the grammar: our packed rows (EOS aside) are the bits
    llguidance's own matcher computes, and tokens past the tokenizer's vocabulary are never allowed."""
    import llguidance
    import llguidance.numpy as llnp

    vocab, eos = llm.engine.vocab_size, llm.tokenizer.eos_token_id
    rng = random.Random(0)
    for grammar in [
        Grammar.json_schema(SCHEMA),
        Grammar.regex(r"(ab|c)+[0-9]?"),
        Grammar.choice(["yes", "no"]),
    ]:
        for _ in range(3):
            ours = GrammarState(compiler, grammar)
            theirs = llguidance.LLMatcher(compiler.lexicon, compiler.compile(grammar))
            for _ in range(40):
                row = unpack(token_masks([None, ours], 2, vocab), vocab)
                ref = np.zeros((1, -(-vocab // 32)), np.int32)
                llnp.fill_next_token_bitmask(theirs, ref)
                ref_row = unpack(ref, vocab)[0]
                assert row[0].all()  # the free row
                others = np.arange(vocab) != eos
                assert (row[1][others] == ref_row[others]).all()
                assert not row[1][llm.tokenizer.vocab_size :].any()
                choices = np.flatnonzero(row[1])
                token = int(rng.choice(choices))
                if token == eos:
                    break
                ours.advance(token)
                assert theirs.consume_token(token)


@pytest.mark.parametrize(
    "grammar, message",
    [
        (lambda: Grammar.json_schema({"type": "nonsense"}), "invalid json_schema"),
        (lambda: Grammar.json_schema("{not json"), "not valid JSON"),
        (lambda: Grammar.regex("a(b"), "unclosed group"),
        (lambda: Grammar.lark("start: missing"), "missing"),
        (lambda: Grammar.choice([]), "non-empty list"),
        (lambda: Grammar("xml", "<a/>"), "grammar kind must be one of"),
    ],
)
def test_bad_grammars_raise_a_clear_error(compiler, grammar, message):
    with pytest.raises(GrammarError, match=re.escape(message)):
        compiler.compile(grammar())


def test_json_schema_outputs_validate_over_many_seeds(llm):
    params = [
        SamplingParams(max_tokens=120, temperature=1.0, seed=s, grammar=Grammar.json_schema(SCHEMA))
        for s in range(8)
    ]
    outs = llm.generate(["describe a pet"] * len(params), params, use_tqdm=False)
    done = [o for o in outs if o.finish_reason == "stop"]
    assert len(done) >= 5, [o.text for o in outs]  # a random model may run out of tokens in a string
    for o in done:
        jsonschema.validate(json.loads(o.text), SCHEMA)


def test_regex_choice_and_lark_outputs_match(llm):
    prompts = ["a", "b", "c"]
    regex = SamplingParams(
        max_tokens=20, temperature=1.0, seed=3, grammar=Grammar.regex(r"[a-c]{3}-[0-9]{2}")
    )
    choice = SamplingParams(
        max_tokens=20, temperature=1.0, seed=4, n=3, grammar=Grammar.choice(["red", "green"])
    )
    lark = SamplingParams(max_tokens=20, temperature=0.0, grammar=Grammar.lark('start: "x" ("+" "x")*'))
    r, c, g = llm.generate(prompts, [regex, choice, lark], use_tqdm=False)
    assert re.fullmatch(r"[a-c]{3}-[0-9]{2}", r.text) and r.finish_reason == "stop"
    assert len(c.outputs) == 3 and all(o.text in ("red", "green") for o in c.outputs)
    assert re.fullmatch(r"x(\+x)*\+?", g.text)  # greedy runs to max_tokens


def test_free_rows_batched_with_constrained_rows_are_unchanged(llm):
    free = [SamplingParams(max_tokens=12, temperature=0.8, seed=s, ignore_eos=True) for s in range(3)]
    alone = [o.token_ids for o in llm.generate(["one", "two", "three"], free, use_tqdm=False)]
    constrained = SamplingParams(max_tokens=30, temperature=1.0, seed=9, grammar=Grammar.json_object())
    mixed = llm.generate(
        ["one", "x", "two", "y", "three"],
        [free[0], constrained, free[1], constrained, free[2]],
        use_tqdm=False,
    )
    assert [mixed[i].token_ids for i in (0, 2, 4)] == alone
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks


def test_a_grammar_that_cannot_finish_ends_at_length_and_frees_the_matcher(llm):
    params = SamplingParams(max_tokens=5, temperature=0.0, grammar=Grammar.regex("a{50}"))
    (out,) = llm.generate("go", params, use_tqdm=False)
    assert out.finish_reason == "length" and out.text == "aaaaa"
    assert not llm.engine.requests


def test_engine_rejects_a_bad_grammar_before_queueing(llm):
    with pytest.raises(GrammarError):
        llm.engine.add_request([1, 2], SamplingParams(grammar=Grammar.regex("(")))
    assert not llm.engine.has_unfinished()


@pytest.mark.parametrize(
    "text, outputs",
    [
        ('?start: greeting\ngreeting: "hi" | "hello"', {"hi", "hello"}),  # Lark with an inlined start
        ('!start: "a" | "b"', {"a", "b"}),
        ('root ::= answer\nanswer ::= "yes" | "no"', {"yes", "no"}),  # GBNF
    ],
)
def test_a_grammar_is_read_as_gbnf_only_when_it_defines_rules_with_colons_equals(llm, text, outputs):
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=0, n=4, grammar=Grammar("grammar", text))
    (out,) = llm.generate("x", params, use_tqdm=False)
    assert {o.text for o in out.outputs} <= outputs


def test_a_schema_nested_past_the_recursion_limit_is_a_grammar_error():
    schema: dict = {"type": "integer"}
    for _ in range(5000):
        schema = {"type": "array", "items": schema}
    with pytest.raises(GrammarError, match="nested too deeply"):
        Grammar.json_schema(schema)
