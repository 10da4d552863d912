"""A tiny random Llama with a byte-level BPE tokenizer (every byte a token, a few merges, ChatML
specials), so grammars over any text can be spelled, for the structured-output and tool tests."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import save_tiny_hf_model

SPECIALS = ["<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]
MERGES = [("Ġ", "t"), ("e", "r"), ('"', ":"), ("i", "n"), ("o", "n"), ("a", "n")]
# A Qwen2.5-like template: tools in the system turn, assistant tool_calls as <tool_call> JSON, tool
# results in <tool_response>.
TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{%- endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content or '' }}"
    "{%- for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{%- endfor %}"
    "<|im_end|>\n{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


def save_byte_tokenizer(path: Path) -> int:
    """Write tokenizer.json / tokenizer_config.json; returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from jaxrs.loading.gguf_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(path / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "add_bos_token": False, "chat_template": TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return tok.get_vocab_size()


def save_structured_model(path: Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig

    vocab = save_byte_tokenizer(path)
    config = LlamaConfig(
        vocab_size=vocab + 6,  # wider logits than the tokenizer, as real models have
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=vocab - len(SPECIALS) + 1,  # <|im_end|>
        tie_word_embeddings=False,
    )
    save_tiny_hf_model(config, path, seed=seed)
    return path
