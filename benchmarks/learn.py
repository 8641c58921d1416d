#!/usr/bin/env python
"""Does zeroth-order training learn? Issue 20's target runs, resumable, one `prge train` per cell.

    python benchmarks/learn.py list                      # the cells and whether each has finished
    python benchmarks/learn.py run copa4-fo-s0 copa4-prge-s0 [--threads 1]
    python benchmarks/learn.py table                     # the tables below, and benchmarks/results/learn.json

Each cell is a `prge train` command line (below) run into runs/learn/<cell>; a killed cell continues
exactly with `--resume` when run again, and a finished one (its summary.json exists) is not rerun.
`table` appends nothing: it reads every finished cell's summary.json and metrics.jsonl, writes one
row per cell to benchmarks/results/learn.jsonl (replacing that cell's earlier row) and the issue's
`learn.json`:

    {"sst2_earlier_prompt": {"backprop_minutes": M, "zo_minutes_to_backprop_acc": Z or null, "zo_best_test": A}}

The backprop yardstick from the earlier SST-2 prompt is benchmarks/results/accuracy.jsonl's
`--method fo` rows (3 seeds, 100 steps); the skill sets (benchmarks/skill_sets.py) are user-style
text/label files where the model starts near chance: each is run with backprop (`--method fo`, 60
steps) and with `prge train`'s defaults (300 P-RGE steps), so "the default gains ≥ 40 points" is read
off directly.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "learn"
RESULTS = ROOT / "benchmarks" / "results"
SKILLS = ROOT / "benchmarks" / "data" / "skills"
sys.path.insert(0, str(ROOT))
from prge.data.classification import EARLIER_SST2_TEMPLATE as EARLIER  # noqa: E402
WORDS = {"copa2": "A B", "copa4": "A B C D", "wic10": "A B C D E F G H I J"}


def skill(name: str) -> list[str]:
    return ["--train-file", str(SKILLS / f"{name}.train.jsonl"), "--eval-file", str(SKILLS / f"{name}.eval.jsonl"),
            "--label-words", *WORDS[name].split()]


CELLS: dict[str, list[str]] = {}
for _s in range(3):
    # the one lever merit.py predicts >= 3x for on SST-2 (docs/optimiser.md): only q_proj + k_proj perturbed
    CELLS[f"sst2e-prge-qk-lr1e-2-s{_s}"] = ["--task", "sst2", "--template", EARLIER, "--targets", "q_proj", "k_proj",
                                            "--lr", "1e-2", "--seed", str(_s)]
    # its early gain kept: lr 3e-2 (which measured ~3.4x at step 50, then rose) decaying linearly to 0
    CELLS[f"sst2e-prge-qk-lr3e-2-linear-s{_s}"] = ["--task", "sst2", "--template", EARLIER, "--targets", "q_proj", "k_proj",
                                                   "--lr", "3e-2", "--lr-schedule", "linear", "--seed", str(_s)]
    # all seven projections at twice the default lr, decaying linearly: twice the lr bought 2.1x sooner dev loss on
    # 2 ranks at q = 8 and then rose (README, "More than one machine"); does a decay keep the early gain at q = 4?
    CELLS[f"sst2e-prge-lr6e-3-linear-s{_s}"] = ["--task", "sst2", "--template", EARLIER, "--lr", "6e-3", "--lr-schedule", "linear",
                                               "--seed", str(_s)]
    for _n in WORDS:
        CELLS[f"{_n}-fo-s{_s}"] = [*skill(_n), "--method", "fo", "--steps", "60", "--seed", str(_s)]
        CELLS[f"{_n}-prge-s{_s}"] = [*skill(_n), "--seed", str(_s)]
        CELLS[f"{_n}-prge-qk-lr1e-2-s{_s}"] = [*skill(_n), "--targets", "q_proj", "k_proj", "--lr", "1e-2", "--seed", str(_s)]
    # RTE: merit.py predicts lr* = 5.4e-2 at B = 0, 18x the default 3e-3 (SST-2's lr* is 4.7e-3)
    for _lr in ("3e-3", "3e-2"):
        CELLS[f"rte-prge-lr{_lr}-s{_s}"] = ["--task", "rte", "--lr", _lr, "--steps", "100", "--eval-every", "25", "--n-dev", "200",
                                          "--seed", str(_s)]
    # `prge train` with no options (SST-2, default prompt): does it end above zero-shot on 3/3 seeds?
    CELLS[f"default-s{_s}"] = ["--seed", str(_s)]
    # the second built-in model from the same earlier SST-2 prompt: it learned 65.6 -> 87.5% dev (32 rows) in 40 engine
    # steps at its own lr 1e-4 (README, Gemma-3-270M); backprop as accuracy.py's fo cells run it
    CELLS[f"gemma-sst2e-prge-s{_s}"] = ["--model", "gemma3-270m", "--task", "sst2", "--template", EARLIER, "--steps", "100",
                                        "--eval-every", "25", "--seed", str(_s)]
    CELLS[f"gemma-sst2e-fo-s{_s}"] = ["--model", "gemma3-270m", "--task", "sst2", "--template", EARLIER, "--method", "fo",
                                      "--optimizer", "adam", "--lr", "1e-3", "--batch-size", "16", "--steps", "100",
                                      "--seed", str(_s)]
    # backprop at a tenth of that lr: Gemma's own zeroth-order lr is 1/30 of SmolLM2's, and at 1e-3 its dev accuracy fell
    # from step 50 to 100; the yardstick is the better of the two (learn.json)
    CELLS[f"gemma-sst2e-fo-lr1e-4-s{_s}"] = ["--model", "gemma3-270m", "--task", "sst2", "--template", EARLIER, "--method", "fo",
                                             "--optimizer", "adam", "--lr", "1e-4", "--batch-size", "16", "--steps", "100",
                                             "--seed", str(_s)]


# the skill sets on the second built-in model (base Gemma-3-270M starts at chance on all three: copa2 46.5%, copa4 26.0%,
# wic10 13.0% test): `prge train`'s defaults for that model (300 P-RGE steps, its lr 1e-4), and backprop as above
for _s in range(3):
    for _n in WORDS:
        CELLS[f"gemma-{_n}-prge-s{_s}"] = ["--model", "gemma3-270m", *skill(_n), "--seed", str(_s)]
        CELLS[f"gemma-{_n}-fo-s{_s}"] = ["--model", "gemma3-270m", *skill(_n), "--method", "fo", "--steps", "60",
                                         "--seed", str(_s)]


# the label readout (`prge train --readout`, docs/optimiser.md section 7): fitted after the LoRA steps on the best
# checkpoint, trained zeroth-order on cached final hidden states. `--steps 0` measures it alone (minutes); the
# `-prge-readout` and `default-readout` cells are `prge train`'s defaults since it landed (300 P-RGE steps, then the readout)
for _s in range(3):
    for _n in WORDS:
        CELLS[f"{_n}-readout-s{_s}"] = [*skill(_n), "--steps", "0", "--readout", "64", "--seed", str(_s)]
        CELLS[f"{_n}-prge-readout-s{_s}"] = [*skill(_n), "--readout", "64", "--seed", str(_s)]
        CELLS[f"gemma-{_n}-readout-s{_s}"] = ["--model", "gemma3-270m", *skill(_n), "--steps", "0", "--readout", "64",
                                             "--seed", str(_s)]
    CELLS[f"sst2e-readout-s{_s}"] = ["--task", "sst2", "--template", EARLIER, "--steps", "0", "--readout", "64", "--seed", str(_s)]
    CELLS[f"default-readout-s{_s}"] = ["--readout", "64", "--seed", str(_s)]
    # the readout alone on `prge train`'s default task (SST-2, default prompt): is the LoRA part of the default needed?
    CELLS[f"default-readout-alone-s{_s}"] = ["--steps", "0", "--readout", "64", "--seed", str(_s)]
    # the same two after SST-2's dev rows became whole sentences only (2026-12-03, `prge.data.classification.load_sst2`):
    # the cells above ran with phrase-level dev rows, where the readout's dev gains did not carry to test
    CELLS[f"default-sentdev-s{_s}"] = ["--readout", "64", "--seed", str(_s)]
    CELLS[f"default-sentdev-readout-alone-s{_s}"] = ["--steps", "0", "--readout", "64", "--seed", str(_s)]
    # the readout on 4,000 training rows instead of 1,000 (the linear probe's ceiling on this prompt rises from 85.8 to
    # 86.5% test with more rows: benchmarks/readout_probe.py): does it end above zero-shot on every seed? (--n-train
    # 4000: the readout reads at most the training rows there are, 1,000 by default)
    CELLS[f"default-sentdev-readout-alone-rows4000-s{_s}"] = ["--steps", "0", "--readout", "64", "--n-train", "4000",
                                                             "--readout-rows", "4000", "--seed", str(_s)]

# the top k decoder layers only (issue 20, "the dominant layer"): a step that perturbs only them can run from the
# residual stream cached below them, so it costs about k/30 of a step. First the yardstick: can backprop LoRA-FA on those
# layers alone reach the all-layer backprop figure (86.1% from the earlier prompt)? Same settings as accuracy.py's fo.
for _k in (4, 8):
    _layers = [str(i) for i in range(30 - _k, 30)]
    CELLS[f"sst2e-fo-top{_k}-s0"] = ["--task", "sst2", "--template", EARLIER, "--method", "fo", "--optimizer", "adam",
                                     "--lr", "1e-3", "--batch-size", "16", "--steps", "100", "--eval-every", "25",
                                     "--layers", *_layers, "--seed", "0"]
# ... and zeroth-order on the top 15 layers: merit.py predicts 2.3x per step at B = 0 (1.24 / 3.26 on its halves) with
# lr* 8.8x the default's, so ~4.5x per second once the step runs from a cache of layer 15's input (0.51 of a step,
# benchmarks/top_layers.py); the top 1-8 layers hold no coherent gradient at B = 0 (|g|² estimated <= 0).
# lr 1e-2: the lr the q + k cells ran at
CELLS["sst2e-prge-top15-lr1e-2-s0"] = ["--task", "sst2", "--template", EARLIER, "--layers", *[str(i) for i in range(15, 30)],
                                       "--lr", "1e-2", "--seed", "0"]
# the reference for its dev curve: all layers at the default lr, on today's whole-sentence dev rows (accuracy.py's main
# table ran on phrase-level dev rows, whose losses are not comparable)
CELLS["sst2e-prge-sentdev-s0"] = ["--task", "sst2", "--template", EARLIER, "--seed", "0"]

# a fourth seed of the default (issue 20's "above zero-shot on 3/3 seeds"): how often does it end above, seed by seed?
CELLS["default-sentdev-s3"] = ["--readout", "64", "--seed", "3"]

# the default again once SST-2's dev rows hold no training phrase (2026-12-04, `prge.data.tasks.without_train_phrases`):
# the default-sentdev cells selected on dev rows of which 7-9% contained a phrase the run trained on
for _s in range(3):
    CELLS[f"default-cleandev-s{_s}"] = ["--readout", "64", "--seed", str(_s)]

# the default at twice its lr: on this prompt merit.py puts the B = 0 best lr at 2.2e-2, 4.6x the earlier prompt's
# (docs/optimiser.md section 9), and the default's 3e-3 was chosen on the earlier prompt (evidence 2d). Seed 0 only:
# its dev accuracy fell at every evaluation after step 50 (87.4 -> 78.0% by step 250), so seeds 1 and 2 were stopped
CELLS["default-lr6e-3-s0"] = ["--lr", "6e-3", "--readout", "64", "--seed", "0"]

# backprop's yardstick on `prge train`'s default task (SST-2, its own prompt, 85.1% zero-shot): how far above zero-shot
# can any training take this model there, and does backprop itself end above it on every seed? (the settings of the
# earlier prompt's fo yardstick, accuracy.py)
for _s in range(3):
    CELLS[f"default-fo-s{_s}"] = ["--method", "fo", "--optimizer", "adam", "--lr", "1e-3", "--batch-size", "16",
                                  "--steps", "100", "--eval-every", "25", "--seed", str(_s)]

# the cells above that predate the readout ran without it (it was not there); --readout 0 keeps them meaning that
for _c, _a in CELLS.items():
    if "--method" not in _a and "--readout" not in _a:
        _a += ["--readout", "0"]


def done(cell: str) -> bool:
    return (RUNS / cell / "summary.json").is_file()


def run(cell: str, threads: int) -> None:
    out = RUNS / cell
    cmd = [sys.executable, "-m", "prge", "train", *CELLS[cell], "--threads", str(threads), "--no-progress", "--out", str(out)]
    if (out / "checkpoints" / "last").is_dir():
        cmd += ["--resume", str(out)]
    elif out.exists():  # started, killed before its first checkpoint: start again
        for f in sorted(out.rglob("*"), reverse=True):
            f.unlink() if f.is_file() or f.is_symlink() else f.rmdir()
    print(f"[{time.strftime('%H:%M:%S')}] {cell}: {shlex.join(cmd[3:])}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def cell_row(cell: str) -> dict:
    s = json.loads((RUNS / cell / "summary.json").read_text())
    curve = [json.loads(line) for line in (RUNS / cell / "metrics.jsonl").read_text().splitlines() if line.strip()]
    dev = [(r["step"], r["accuracy"], r.get("loss")) for r in curve if r.get("split") == "dev"]
    secs = {r["step"]: r["seconds"] for r in curve if "seconds" in r and "split" not in r}
    return {"cell": cell, "args": CELLS.get(cell), "method": s["method"], "steps": s["steps"], "minutes": s["minutes"],
            "test_before": s["test_before"], "test_after_last": s["test_after_last"], "test_after_best": s["test_after_best"],
            "best_step": s["best_step"], "best_dev": s["best_dev"], "n_test": s["n_test"], "dev_curve": dev,
            "train_seconds_to_best": sum(v for k, v in secs.items() if k <= s["best_step"]),
            "readout": s.get("readout"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d", time.localtime((RUNS / cell / "summary.json").stat().st_mtime))}  # the run's day, not the table's


def time_to_backprop(bp_min: float, bp_acc: float, zo: list[tuple[float, float, str]]) -> dict:
    """learn.json's record: backprop's minutes and test accuracy, and the zeroth-order runs' (best-dev test
    accuracy, training minutes to that checkpoint, run): the first minute any reached backprop's accuracy."""
    reached = [m for a, m, _ in zo if a >= bp_acc]
    best = max(zo)
    return {"backprop_minutes": round(bp_min, 2), "backprop_test": round(bp_acc, 4),
            "zo_minutes_to_backprop_acc": round(min(reached), 2) if reached else None,
            "zo_best_test": round(best[0], 4), "zo_best_run": best[2], "zo_runs": len(zo),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, 1 thread per run"}


def table() -> None:
    rows = [cell_row(c) for c in CELLS if done(c)]
    jsonl = RESULTS / "learn.jsonl"
    old = [json.loads(x) for x in jsonl.read_text().splitlines()] if jsonl.is_file() else []
    keep = {r["cell"]: r for r in old}
    keep.update({r["cell"]: r for r in rows})
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in keep.values()))
    print("| cell | steps | minutes | test before | after (last) | after (best dev, step) | gain |")
    print("|---|---|---|---|---|---|---|")
    for r in keep.values():
        if "test_before" not in r:  # a cell stopped by hand (e.g. diverging), recorded with its step losses
            print(f"| {r['cell']} | stopped at {r.get('stopped_at')} | – | – | – | {r.get('stopped', '')} | – |")
            continue
        print(f"| {r['cell']} | {r['steps']} | {r['minutes']:.1f} | {100 * r['test_before']:.1f} | {100 * r['test_after_last']:.1f} | "
              f"{100 * r['test_after_best']:.1f} ({r['best_step']}) | {100 * (r['test_after_best'] - r['test_before']):+.1f} |")
    # learn.json: backprop from the earlier prompt (accuracy.jsonl's fo rows), zeroth order from every ZO run from it
    acc = [json.loads(x) for x in (RESULTS / "accuracy.jsonl").read_text().splitlines()]
    fo = [r for r in acc if r["table"] == "main" and r["task"] == "sst2" and r["method"] == "fo"]
    bp_acc = sum(r["test_after_best"] for r in fo) / len(fo)
    bp_min = sum(r["minutes"] for r in fo) / len(fo)
    zo = [(r["test_after_best"], r["minutes"] * r["best_step"] / r["steps"], r.get("run_dir") or r["cell_method"])
          for r in acc if r["table"] == "main" and r["task"] == "sst2" and r["method"] in ("prge", "mezo")]
    zo += [(r["test_after_best"], minutes_to_best(r), r["cell"]) for r in keep.values()
           if r["cell"].startswith("sst2e-") and earlier_prompt(r) and r.get("method") != "fo" and "test_after_best" in r]  # (fo: backprop yardsticks)
    learn = {"sst2_earlier_prompt": time_to_backprop(bp_min, bp_acc, zo)}
    # the same figure for Gemma-3-270M, from its own cells (backprop and P-RGE both run by this script)
    # (backprop: the best of its cells, an lr sweep of one seed each, so the yardstick errs against zeroth order)
    g_fo = [r for c, r in keep.items() if c.startswith("gemma-sst2e-fo-") and "test_after_best" in r]
    g_zo = [(r["test_after_best"], minutes_to_best(r), c) for c, r in keep.items()
            if c.startswith("gemma-sst2e-prge-") and earlier_prompt(r) and "test_after_best" in r]
    if g_fo and g_zo:
        bp = max(g_fo, key=lambda r: r["test_after_best"])
        learn["gemma3_270m_sst2_earlier_prompt"] = {**time_to_backprop(bp["minutes"], bp["test_after_best"], g_zo),
                                                   "backprop_run": bp["cell"]}
    (RESULTS / "learn.json").write_text(json.dumps(learn, indent=1) + "\n")
    print(json.dumps(learn))


def earlier_prompt(r: dict) -> bool:
    """Whether a cell's row trained SST-2 from the earlier prompt (its command line, not its name, says so)."""
    a = r.get("args") or []
    return "--template" in a and a[a.index("--template") + 1] == EARLIER and "--task" in a and a[a.index("--task") + 1] == "sst2"


def minutes_to_best(r: dict) -> float:
    """Minutes until the run's best-dev weights existed: the LoRA steps up to its best step, or the whole
    run where a label readout (fitted after the last step) or no step at all (`--steps 0`) made them."""
    if r.get("readout") or not r["steps"]:
        return r["minutes"]
    return r["minutes"] * r["best_step"] / r["steps"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list")
    r = sub.add_parser("run")
    r.add_argument("cells", nargs="+")
    r.add_argument("--threads", type=int, default=1)
    sub.add_parser("table")
    a = p.parse_args()
    if a.cmd == "list":
        for c, args in CELLS.items():
            print(f"{'done' if done(c) else '    '}  {c}: prge train {shlex.join(args)}")
    elif a.cmd == "run":
        bad = [c for c in a.cells if c not in CELLS]
        if bad:
            raise SystemExit(f"error: unknown cell {bad[0]} — see `python benchmarks/learn.py list`")
        for c in a.cells:
            if not done(c):
                run(c, a.threads)
    else:
        table()


if __name__ == "__main__":
    main()
