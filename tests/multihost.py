"""One model over two processes of 4 simulated CPU devices each (`jax.distributed`, gloo collectives):
process 0 generates, process 1 follows its steps; or the same request in one plain process.

`python -m tests.multihost MODEL_DIR PORT PROCESS MODE`, MODE one of `single` (one process, one
device: the reference), `serve` (process 0 of 2, or 1), `lose` (as serve, then process 1 leaves and
process 0's next request must fail with a clear message). Process 0 prints JSON on its last line.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from jaxrs.parallel import multihost

PROMPT = list(range(10, 30))
ENGINE = dict(
    kv_cache_tokens=256,
    kv_cache_dtype="float32",
    block_size=8,
    max_model_len=64,
    max_num_seqs=2,
    max_num_batched_tokens=32,
    max_decode_steps=2,
)
LEAVE = "leave"  # a message process 0 sends in `lose` mode: process 1 exits on it


def generate(llm) -> list[int]:
    from jaxrs import SamplingParams

    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    return llm.generate([PROMPT], greedy, use_tqdm=False)[0].token_ids


def main(folder: Path, port: int, process: int, mode: str) -> None:
    if mode == "single":
        from jaxrs import LLM

        print(json.dumps({"tokens": generate(LLM(str(folder), dtype="float32", **ENGINE))}), flush=True)
        return
    multihost.initialize(f"127.0.0.1:{port}", 2, process)
    from jaxrs import LLM

    llm = LLM(str(folder), dtype="float32", tensor_parallel_size=8, **ENGINE)
    store = multihost.CoordinatorStore()
    if process:

        def run(call) -> None:
            if call == LEAVE:
                os._exit(0)
            multihost.run_step(llm.engine)(call)

        multihost.follow(run, store, process, poll_s=1.0)
        os._exit(0)
    leader = multihost.lead(llm.engine, store, timeout_s=10.0)
    out = {"tokens": generate(llm), "steps": leader.step}
    if mode == "lose":
        leader.publish(LEAVE)
        try:
            generate(llm)
        except multihost.FollowerLost as error:
            out["error"] = str(error)
    else:
        leader.stop()
    print(json.dumps(out), flush=True)
    os._exit(0)  # no shutdown barrier: in `lose` mode process 1 is gone


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
