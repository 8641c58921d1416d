"""The long fuzz campaign: generate bad inputs for every input path of `prge` (tests/hostile.py: data
files in every format, YAML configs, CLI numbers, model folders, --out/--resume paths, device-train
programs, manifests, data files and checkpoints, adapters), run each through the CLI in-process, and
count how many were refused cleanly (one `error:` line, exit 2, no traceback, nothing written).

    python benchmarks/fuzz_campaign.py --examples 2000        # appends one summary row to benchmarks/results/fuzz_campaign.jsonl

Every input that is not refused cleanly is printed and kept in the row's "failures" (kind, what went wrong).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results" / "fuzz_campaign.jsonl"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=2000, help="generated inputs to try")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args()
    import torch
    from hypothesis import HealthCheck, given, settings, seed

    from hostile import cases, drive
    from prge.testing import save_tiny

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="prge-fuzz-campaign-"))
    model = save_tiny(work / "tiny", "llama")
    tried, clean, by_kind, failures = 0, 0, collections.Counter(), []
    t0 = time.time()

    @seed(a.seed)
    @settings(max_examples=a.examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=cases(model, str(DATA)))
    def run(case):
        nonlocal tried, clean
        outcome = drive(case, work / "w")
        tried += 1
        by_kind[case.kind.split(":")[0]] += 1
        if outcome.clean:
            clean += 1
        else:
            failures.append({"kind": case.kind, "why": outcome.why, "stderr": outcome.stderr[:300]})
            print(f"NOT CLEAN {case.kind}: {outcome.why} | {outcome.stderr[:200]}", file=sys.stderr, flush=True)

    run()
    row = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()}-core CPU, no GPU",
           "seed": a.seed, "tried": tried, "refused_cleanly": clean, "not_clean": tried - clean, "by_input_path": dict(by_kind),
           "distinct_failure_kinds": sorted({f["kind"] for f in failures})[:50], "failures": failures[:50],
           "seconds": round(time.time() - t0, 1)}
    with open(a.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k != "failures"}))
    return 0 if tried == clean else 1


if __name__ == "__main__":
    sys.exit(main())
