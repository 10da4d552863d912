"""speculative_config parsing: vLLM's keys, the CLI shorthand, and each bad value named."""

from __future__ import annotations

import pytest

from jaxrs.cli import build_parser, engine_kwargs
from jaxrs.engine.speculative_config import SpeculativeConfig, from_flags
from jaxrs.errors import JaxrsError


def test_parses_mappings_and_json():
    spec = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 5}')
    assert (spec.method, spec.num_speculative_tokens, spec.prompt_lookup_max, spec.prompt_lookup_min) == (
        "ngram",
        3,
        5,
        1,
    )
    spec = SpeculativeConfig.parse({"model": "draft.gguf", "num_speculative_tokens": 4, "isq": "Q4_0"})
    assert (spec.method, spec.model, spec.isq) == ("draft_model", "draft.gguf", "Q4_0")
    assert SpeculativeConfig.parse(None) is None


@pytest.mark.parametrize(
    "value, words",
    [
        ("{not json", "not valid JSON"),
        ('["ngram"]', "JSON object"),
        ({"method": "eagle", "num_speculative_tokens": 2}, "method must be one of"),
        ({"method": "ngram"}, "needs num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 99}, "num_speculative_tokens"),
        ({"method": "draft_model", "num_speculative_tokens": 2}, 'needs "model"'),
        (
            {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2},
            "prompt_lookup_min <= prompt_lookup_max",
        ),
        ({"method": "ngram", "num_speculative_tokens": 2, "draft_tensor_parallel": 1}, "unknown keys"),
    ],
)
def test_bad_configs_name_the_problem(value, words):
    with pytest.raises(JaxrsError, match=words):
        SpeculativeConfig.parse(value)


def test_command_line_flags():
    args = build_parser().parse_args(["run", "--draft-model", "d.gguf", "--num-speculative-tokens", "3"])
    spec = engine_kwargs(args)["speculative_config"]
    assert (spec["method"], spec["model"], spec["num_speculative_tokens"]) == ("draft_model", "d.gguf", 3)
    args = build_parser().parse_args(
        ["serve", "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}']
    )
    assert engine_kwargs(args)["speculative_config"]["method"] == "ngram"
    assert engine_kwargs(build_parser().parse_args(["run"]))["speculative_config"] is None
    with pytest.raises(JaxrsError, match="--num-speculative-tokens"):
        from_flags(None, "d.gguf", None)
