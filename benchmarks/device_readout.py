#!/usr/bin/env python
"""The label readout on the device against the eager one, on the real model (issue 20).

    python benchmarks/device_readout.py [--set copa2] [--seed 0] [--steps 0] [--threads 1] [--native]

Exports SmolLM2-135M for a skill set (benchmarks/skill_sets.py; the program is cached under
~/.cache/prge/bench/device_readout/, so a rerun skips the 15–30 minutes of lowering), runs
`prge device-train` with `--steps` P-RGE steps and the default readout (rank 64), and appends one row
to benchmarks/results/device_readout.jsonl beside the eager run of the same command line
(`benchmarks/learn.py` cell `<set>-readout-s<seed>` for --steps 0, `<set>-prge-readout-s<seed>` for 300):
the readout's dev accuracy before and after, on the engine and in eager PyTorch, and the minutes.
With --native the C++ runner takes the steps and fits the readout itself (the program's
`readout_step` method; a cached program exported before that method existed is exported again).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from learn import RUNS, skill  # noqa: E402

CACHE = Path(os.environ.get("PRGE_BENCH_CACHE", Path.home() / ".cache" / "prge" / "bench")) / "device_readout"
OUT = ROOT / "benchmarks" / "results" / "device_readout.jsonl"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--set", default="copa2", choices=["copa2", "copa4", "wic10"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--native", action="store_true", help="the C++ runner (fits the readout itself)")
    a = p.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    prge = [sys.executable, "-m", "prge"]
    CACHE.mkdir(parents=True, exist_ok=True)
    program = CACHE / f"smollm2-135m-{a.set}.pte"
    export_min = None
    manifest = Path(f"{program}.json")
    if a.native and manifest.is_file() and "readout_step" not in json.loads(manifest.read_text()).get("methods", {}):
        print(f"{program.name} predates the readout_step method: exporting it again", flush=True)
        program.with_suffix(".data.safetensors").unlink()
    if not program.with_suffix(".data.safetensors").is_file():
        t0 = time.time()
        subprocess.run([*prge, "export", *skill(a.set), "--seed", str(a.seed), "--threads", str(a.threads), "--out", str(program)],
                       check=True, env=env)
        export_min = (time.time() - t0) / 60
    out = ROOT / "runs" / "device_readout" / f"{a.set}-steps{a.steps}-s{a.seed}{'-native' if a.native else ''}"
    t0 = time.time()
    subprocess.run([*prge, "device-train", "--program", str(program), "--out", str(out), "--steps", str(a.steps), "--seed",
                    str(a.seed), "--no-progress", *(["--native"] if a.native else []), *(["--resume"] if (out / "checkpoints" / "last").exists() else [])],
                   check=True, env=env)
    wall = (time.time() - t0) / 60
    summary = json.loads((out / "summary.json").read_text())
    cell = f"{a.set}-readout-s{a.seed}" if a.steps == 0 else f"{a.set}-prge-readout-s{a.seed}"
    eager_file = RUNS / cell / "summary.json"
    eager = json.loads(eager_file.read_text()).get("readout") if eager_file.is_file() else None
    row = {"set": a.set, "seed": a.seed, "steps": a.steps, "model": "smollm2-135m", "threads": a.threads,
           "loop": "native" if a.native else "python",
           "program_mb": program.stat().st_size / 1e6, "export_minutes": export_min, "device_minutes": wall,
           "device_readout": summary.get("readout"), "device_best_dev": summary.get("best_dev"),
           "eager_cell": cell, "eager_readout": eager,
           "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.python_version()}, {time.strftime('%Y-%m-%d')}"}
    with OUT.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
