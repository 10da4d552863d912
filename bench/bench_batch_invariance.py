"""How far one sequence's logits move when other rows share its calls, per kernel choice.

    python bench/bench_batch_invariance.py [--kernels JSON]

The demo (packed, as loaded by default): the sequence's prompt is prefilled alone and then together with
1, 4, 8 and 32 other prompts (one call; the chunk pads to the longest), then one decode token and a
4-token chunk (a verify's shape) are run for every row; a fabricated 700-key row widens the block tables
in the last two cases. Prints the largest |logit difference| from the sequence run alone, per call kind.
`--kernels '{"qmatmul": "invariant", ...}'` picks implementations (`batch_invariance.KERNELS`: the mode's).
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", default="{}", help="op -> implementation, JSON")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxrs import LLM
    from jaxrs.engine.runner import logits_at, one_token_logits
    from jaxrs.ops import Kernels

    kernels = Kernels.from_mapping(json.loads(args.kernels))
    llm = LLM(None, kv_cache_tokens=8192, max_num_seqs=64, max_model_len=1024)
    runner = llm.engine.runner
    cfg, params, bs = runner.cfg, runner.params, runner.block_size
    opts = dict(runner.xla_options)
    prefill = jax.jit(
        lambda p, kv, tok, meta, idx: logits_at(p, cfg, kernels, kv, tok, meta, idx), compiler_options=opts
    )
    chunk = jax.jit(
        lambda p, kv, tok, meta: logits_at(p, cfg, kernels, kv, tok, meta, jnp.full(tok.shape[0], 3)),
        compiler_options=opts,
    )
    decode = jax.jit(
        lambda p, kv, tok, pos, tab, valid: one_token_logits(p, cfg, kernels, kv, tok, pos, tab, valid),
        compiler_options=opts,
    )
    rng = np.random.default_rng(0)
    target = rng.integers(10, cfg.vocab_size, 21).tolist()
    others = [rng.integers(10, cfg.vocab_size, int(n)).tolist() for n in rng.integers(5, 60, 64)]
    kv0 = runner.kv

    def run(batch: list[list[int]], wide: int = 0) -> tuple:
        """Row 0's logits: prefill of `batch` in one call, one decode token, a 4-token chunk; `wide`: one
        more row of that many keys in the last two (garbage K/V: only its table's width matters)."""
        blocks, nxt = [], 0
        for p in batch:
            n = -(-(len(p) + 8) // bs)
            blocks.append(list(range(nxt, nxt + n)))
            nxt += n
        b, t = runner.rows(len(batch)), runner.chunk_len(max(map(len, batch)))
        w = runner.width(max(map(len, blocks)))
        tokens = np.zeros((b, t), np.int32)
        for i, p in enumerate(batch):
            tokens[i, : len(p)] = p
        meta = runner._metadata([(bl, 0, len(p), None) for bl, p in zip(blocks, batch, strict=True)], b, t, w)
        last = np.zeros(b, np.int32)
        last[: len(batch)] = [len(p) - 1 for p in batch]
        lp, kv = prefill(params, kv0, tokens, meta, last)
        rows = list(zip(blocks, [len(p) for p in batch], strict=True))
        if wide:
            rows.append((list(range(nxt, nxt + -(-wide // bs))), wide - 5))
        b, w = runner.rows(len(rows)), runner.width(max(len(bl) for bl, _ in rows))
        tok, pos, valid = np.zeros(b, np.int32), np.zeros(b, np.int32), np.zeros(b, bool)
        tables = np.zeros((b, w), np.int32)
        for i, (bl, n) in enumerate(rows):
            tok[i], pos[i], valid[i] = 7, n, True
            tables[i, : len(bl)] = bl
        ld, kv = decode(params, kv, tok, pos, tables, valid)
        meta = runner._metadata([(bl, n + 1, 4, None) for bl, n in rows], b, 4, w)
        lc, kv = chunk(params, kv, np.full((b, 4), 9, np.int32), meta)
        return np.asarray(lp)[0], np.asarray(ld)[0], np.asarray(lc)[0]

    alone = run([target])
    print(f"kernels {dict(kernels.choice) or 'default'}; max |logit difference| from the sequence alone")
    print("| beside it | prefill | decode | 4-token chunk |\n|---|---|---|---|")
    cases = [(f"{n - 1} other prompts", [target] + others[: n - 1], 0) for n in (2, 5, 9, 33)]
    cases += [("a 700-key row", [target], 700), ("4 prompts and a 700-key row", [target] + others[:4], 700)]
    for name, batch, wide in cases:
        found = run(batch, wide)
        diffs = " | ".join(f"{np.max(np.abs(a - b)):.2e}" for a, b in zip(found, alone, strict=True))
        print(f"| {name} | {diffs} |", flush=True)


if __name__ == "__main__":
    main()
