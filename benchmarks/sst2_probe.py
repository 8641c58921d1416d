"""Short P-RGE runs of SmolLM2-135M on SST-2 with a few settings each, ranked by dev accuracy.

Usage: python benchmarks/sst2_probe.py OUT.jsonl 'rank=1 lr=1e-2' 'rank=4 lr=3e-3 normalize=true' ...
Each argument is one run: `key=value` overrides of prge.config.TrainConfig (values parsed as YAML).
Common settings are the defaults of `prge train` plus `--base 'key=value ...'` (and --template /
--label-words, which may contain spaces). Selection uses the dev
split only; the test split is evaluated once at the start and end of each run, as `prge train` does.
Appends one JSON line per run (the run's summary, its overrides and its dev curve) to OUT.jsonl.
A killed run resumes exactly from its last checkpoint when the same command is run again.
`--stop-after N` runs a long point in slices (one per session): it stops after step N (a checkpoint
is written there) and records the dev curve so far, marked "stopped_at".
"""

import argparse
import hashlib
import json
import platform
import re
import time
from pathlib import Path

import yaml

from prge.config import TrainConfig, coerce
from prge.io import append_jsonl, read_jsonl
from prge.run.train import run


def overrides(text: str) -> dict:
    return coerce({k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in text.split())})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("runs", nargs="+")
    p.add_argument("--base", default="", help="settings common to every run")
    p.add_argument("--template", help="prompt template for the task (\\n = newline)")
    p.add_argument("--label-words", nargs="+")
    p.add_argument("--runs-dir", default="runs/probe")
    p.add_argument("--stop-after", type=int, help="stop each run after this step and "
                   "record its partial curve; the same command without it continues the run")
    args = p.parse_args()
    common = overrides(args.base)
    if args.template:
        common["template"] = args.template.replace("\\n", "\n")
    if args.label_words:
        common["label_words"] = args.label_words
    for spec in args.runs:
        kw = {**common, **overrides(spec)}
        tag = hashlib.sha1(json.dumps(kw, sort_keys=True).encode()).hexdigest()[:8]
        slug = re.sub(r"[^A-Za-z0-9._=-]+", "", "_".join(f"{k}-{v}" for k, v in overrides(spec).items()))
        run_dir = Path(args.runs_dir) / f"{slug}-{tag}"
        if (run_dir / "summary.json").is_file():
            print(spec, "done already:", run_dir, flush=True)
            continue
        resume = str(run_dir) if (run_dir / "checkpoints" / "last").is_dir() else None  # killed earlier: continue it exactly
        t = time.time()
        summary = run(TrainConfig(**{**kw, "out": str(run_dir), "progress": False, "resume": resume, "readout": 0}), stop_after=args.stop_after)
        dev = [r for _, r in read_jsonl(run_dir / "metrics.jsonl") if r.get("split") == "dev"]
        curve = [(r["step"], r["accuracy"]) for r in dev]
        append_jsonl(Path(args.out), {"overrides": kw, "dev_curve": curve, "dev_loss_curve": [(r["step"], r["loss"]) for r in dev],
                                      **summary, "wall_minutes": (time.time() - t) / 60,
                                      "machine": f"{platform.machine()} {platform.node()}", "date": time.strftime("%Y-%m-%d")})
        if "stopped_at" in summary:
            print(spec, "stopped at step", summary["stopped_at"], "dev", curve, flush=True)
        else:
            print(spec, "dev", curve, "test", summary["test_before"], "->", summary["test_after_best"], flush=True)


if __name__ == "__main__":
    main()
