"""Sentence-embedding throughput of all-MiniLM-L6-v2: jaxrs's `LLM.embed` against the transformers
BertModel plus sentence-transformers' pooling (torch on CPU, batched as sentence-transformers' `encode`
does: sorted by length, 32 a batch, padded to the batch's longest), in the same run.

    python bench/bench_embeddings.py [--batches 1 32 256] [--rounds 7] [--threads 2]

Both sides embed the same texts end to end (tokenizing included). The two engines alternate, batch size
by batch size, round after round, so load from other jobs falls on both; the table quotes medians, and
the median of each round's ratio (the two runs of a round met about the same load).
Prints a table and writes bench/results/embeddings.json.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

from common import RESULTS, fmt, machine_facts, markdown_table, median, prompt_text, versions, write_json


def sentences(count: int) -> list[str]:
    """`count` varied sentences (3 to 24 words) cut from `prompt_text()`, the same from run to run."""
    words = re.findall(r"\S+", prompt_text())
    out, at = [], 0
    for i in range(count):
        n = 3 + (i * 7919) % 22
        out.append(" ".join(words[at : at + n]))
        at = (at + n) % (len(words) - 50)
    return out


class Peer:
    """The transformers model plus mean pooling and normalization, batched like sentence-transformers."""

    def __init__(self, path: Path, threads: int):
        import torch
        from transformers import AutoModel, AutoTokenizer

        torch.set_num_threads(threads)
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()

    def embed(self, texts: list[str], batch_size: int = 32):
        torch = self.torch
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = [None] * len(texts)
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                rows = order[start : start + batch_size]
                batch = self.tokenizer(
                    [texts[i] for i in rows],
                    padding=True,
                    truncation=True,
                    max_length=256,
                    return_tensors="pt",
                )
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"][..., None].to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                for i, vec in zip(rows, torch.nn.functional.normalize(pooled, dim=-1), strict=True):
                    out[i] = vec
        return torch.stack(out).numpy()


def timed(fn, texts: list[str]) -> float:
    start = time.perf_counter()
    fn(texts)
    return len(texts) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--out", type=Path, default=RESULTS / "embeddings.json")
    args = ap.parse_args()

    import numpy as np

    from jaxrs import LLM
    from jaxrs.loading.embedding_models import fetch_minilm

    path = fetch_minilm()
    llm = LLM(str(path), dtype="float32")
    peer = Peer(path, args.threads)
    texts = sentences(max(args.batches))
    ours, theirs = llm.embed(texts), peer.embed(texts)  # compiles every shape the runs meet
    agreement = float(np.min(np.sum(ours * theirs, axis=1)))
    for size in args.batches:
        llm.embed(texts[:size])
    rates: dict[str, dict[int, list[float]]] = {"jaxrs": {}, "transformers": {}}
    for _ in range(args.rounds):
        for size in args.batches:
            batch = texts[:size]
            rates["jaxrs"].setdefault(size, []).append(timed(llm.embed, batch))
            rates["transformers"].setdefault(size, []).append(timed(peer.embed, batch))
    rows, results = [], []
    for size in args.batches:
        a, b = median(rates["jaxrs"][size]), median(rates["transformers"][size])
        paired = median(x / y for x, y in zip(rates["jaxrs"][size], rates["transformers"][size], strict=True))
        rows.append([size, fmt(a), fmt(b), f"{a / b:.2f}x", f"{paired:.2f}x"])
        each = {name: by_size[size] for name, by_size in rates.items()}
        results.append(
            {
                "batch": size,
                "jaxrs_sent_s": a,
                "transformers_sent_s": b,
                "paired_ratio": paired,
                "rounds": each,
            }
        )
    print(
        f"all-MiniLM-L6-v2, sentences/s, median of {args.rounds}; lowest cosine to the peer {agreement:.6f}"
    )
    header = ["batch", "jaxrs", f"transformers ({args.threads} threads)", "ratio", "median per-round ratio"]
    print(markdown_table(header, rows))
    write_json(
        args.out,
        {
            "model": str(path),
            "results": results,
            "min_cosine": agreement,
            "torch_threads": args.threads,
            "machine": machine_facts(),
            "versions": versions(["jax", "jaxlib", "torch", "transformers", "tokenizers"]),
            "xla_flags": os.environ.get("XLA_FLAGS"),
        },
    )


if __name__ == "__main__":
    main()
