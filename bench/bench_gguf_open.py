"""Opening a GGUF: gguf's `GGUFReader` against jaxrs's `parse_gguf`, to the metadata as plain values and the
tensor index (what a load needs before the first weight).

    python bench/bench_gguf_open.py [--models PATH ...] [--repeats 3]

Each open is a fresh process (the modules imported before the clock starts), the readers interleaved;
prints per model the median CPU seconds, wall seconds and the resident memory the open added at its peak
(VmHWM after minus VmRSS before), and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

MODELS = Path.home() / ".cache" / "jaxrs" / "models"
PROBE = """
import json, sys, time
import gguf
from jaxrs.loading.gguf_metadata import parse_gguf
def kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
path, which = sys.argv[1], sys.argv[2]
before, wall, cpu = kib("VmRSS"), time.perf_counter(), time.process_time()
if which == "gguf":
    r = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items()}
    index = [(t.name, t.tensor_type, t.data_offset) for t in r.tensors]
else:
    f = parse_gguf(path)
    meta, index = f.metadata, f.tensors
print(json.dumps({"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall,
                  "peak_added_mib": (kib("VmHWM") - before) / 1024, "keys": len(meta),
                  "tensors": len(index)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = [
        MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf",
        MODELS / "gemma-3-270m-q4_k_m.gguf",
        MODELS / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    ]
    ap.add_argument("--models", nargs="+", type=Path, default=default)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print("| model | reader | CPU s | wall s | peak added MiB |\n|---|---|---|---|---|")
    for model in args.models:
        runs: dict[str, list[dict]] = {"gguf": [], "jaxrs": []}
        for _ in range(args.repeats):
            for which, got in runs.items():
                out = subprocess.run(
                    [sys.executable, "-c", PROBE, str(model), which],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                got.append(json.loads(out.stdout.strip().splitlines()[-1]))
        med = {w: {k: statistics.median(r[k] for r in got) for k in got[0]} for w, got in runs.items()}
        for which, m in med.items():
            row = f"{m['cpu_s']:.2f} | {m['wall_s']:.2f} | {m['peak_added_mib']:.0f}"
            print(
                f"| {model.name} | {'gguf.GGUFReader' if which == 'gguf' else 'jaxrs parse_gguf'} | {row} |"
            )
        print(
            f"| {model.name} | ratio | {med['gguf']['cpu_s'] / med['jaxrs']['cpu_s']:.0f}x | "
            f"{med['gguf']['wall_s'] / med['jaxrs']['wall_s']:.0f}x | "
            f"{med['gguf']['peak_added_mib'] / max(med['jaxrs']['peak_added_mib'], 1):.0f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
