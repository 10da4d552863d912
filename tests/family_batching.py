"""Every family's tiny configs through the whole engine: greedy prompts submitted together give the tokens
each gives alone.

Run as its own process (`python -m tests.family_batching [NAME ...]`, exit status 1 on a mismatch), as
`test_model_families_batching.py` does: the sweep compiles some seventy steps, and XLA:CPU has crashed in
compilation after very many compiles in one long test process. Shapes are kept to three per config: one
prefill chunk length, decode batches of 1 and 4 (one step per call), one block-table width.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import jax.numpy as jnp

from jaxrs.engine.engine import Engine, EngineConfig
from jaxrs.engine.sampling import SamplingParams
from jaxrs.loading import load_model
from tests import test_llama, test_model_families, test_model_families_2
from tests.conftest import save_tiny_hf_model, save_tiny_tokenizer

CONFIGS = {
    **test_llama.CONFIGS,
    "llama-dynamic-ntk": test_llama.DYNAMIC,  # a base per sequence, by its length
    **test_model_families.CONFIGS,
    **test_model_families_2.CONFIGS,
}
# 5, 11 and 16 tokens (blocks of 8): inside one block, across a boundary, two full blocks; prefilled in one
# step together, then decoded as one batch
PROMPTS = [list(range(5, 10)), list(range(40, 51)), list(range(100, 116))]
GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
ENGINE = EngineConfig(
    kv_cache_tokens=256,
    block_size=8,
    max_model_len=64,
    max_num_seqs=4,
    max_num_batched_tokens=64,
    max_decode_steps=1,
    prefix_caching=False,
)


def generate(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    requests = [engine.add_request(p, GREEDY) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    assert engine.blocks.num_free == engine.blocks.num_blocks, "blocks leaked"
    return [r.seqs[0].output_ids for r in requests]


def batched_and_alone(name: str, folder: Path) -> tuple[list[list[int]], list[list[int]]]:
    save_tiny_hf_model(CONFIGS[name], folder, seed=3)
    save_tiny_tokenizer(folder, CONFIGS[name].vocab_size)
    engine = Engine(load_model(str(folder)), ENGINE, dtype=jnp.float32)
    together = generate(engine, PROMPTS)
    return together, [generate(engine, [p])[0] for p in PROMPTS]


def main(names: list[str]) -> int:
    """Prints one line per config, `NAME ok` or `NAME MISMATCH ...`."""
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in names or CONFIGS:
            together, alone = batched_and_alone(name, Path(tmp) / name)
            if together == alone:
                print(f"{name} ok", flush=True)
            else:
                failed += 1
                print(f"{name} MISMATCH together={together} alone={alone}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
