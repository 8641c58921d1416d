#!/usr/bin/env python
"""Accuracy tables: zero-shot, backprop LoRA-FA (Adam), MeZO q = 1, P-RGE q = 4 and q = 16, and P-RGE
inside the engine, on SmolLM2-135M (issue 6, part 3).

    python benchmarks/accuracy.py run --table main           # SST-2 and RTE, seeds 0 1 2
    python benchmarks/accuracy.py run --table suite          # BoolQ, WiC, COPA, WinoGrande, SQuAD, ARC-Easy; seed 0
    python benchmarks/accuracy.py run --table suite --tasks copa wic arc_easy boolq --methods prge-q4 mezo-q1   # the paper's claim
    python benchmarks/accuracy.py run --table main --shard 0/2 &   # two processes, one per core
    python benchmarks/accuracy.py run --table main --shard 1/2 &
    python benchmarks/accuracy.py run --table main --tasks sst2 --seeds 1   # only some cells
    python benchmarks/accuracy.py run --table engine         # the engine run beside its eager twin (slow: lowering)
    python benchmarks/accuracy.py run --table sst2-default   # SST-2 from today's default prompt (the main table pins the earlier one)
    python benchmarks/accuracy.py render                     # the tables from benchmarks/results/accuracy.jsonl
    python benchmarks/accuracy.py render --into docs/evidence.md   # ... rewritten in place between its markers
    python benchmarks/accuracy.py plot                       # dev curves of the main table -> accuracy-main.png

Every cell is one `prge train` run (`prge export` + `prge device-train` + `prge eval` for the engine)
in runs/accuracy/<table>/<task>-<method>-s<seed>/. A finished cell is skipped; a cell killed half-way
resumes from its last checkpoint exactly (prge's resume is bit-exact), so the command can be rerun
across sessions until the table is full. Cells run in the order of the list below (all methods of
seed 0 first), so a partial table is still a side-by-side comparison.

Equal budgets: every zeroth-order method does 2·q·b = 32 row-forwards per step (MeZO q = 1 with b = 16,
P-RGE q = 4 with b = 4, P-RGE q = 16 with b = 1) and the same number of steps, so the same number of
forward passes. Backprop runs `FO_STEPS` Adam steps of batch 16. Zero-shot is the test accuracy every
run measures before its first step (it does not depend on the seed: the test split is fixed and B = 0).

Reported: "final" = test accuracy of the last step's adapter; "best" = test accuracy of the
checkpoint with the best dev accuracy (selection on dev, never on test). The paper's "best-seen" is
the best of periodic test evaluations, which selects on test and reads higher; we do not report that.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from prge.io import append_jsonl, atomic_write_text, read_jsonl  # noqa: E402
from prge.data.classification import EARLIER_SST2_TEMPLATE  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "accuracy.jsonl"
CURVES = ROOT / "benchmarks" / "results" / "accuracy_curves.jsonl"  # each finished cell's dev evaluations
PLOT = ROOT / "benchmarks" / "results" / "accuracy-main.png"
BEGIN, END = "<!-- accuracy tables: begin (benchmarks/accuracy.py render --into) -->", "<!-- accuracy tables: end -->"
RUNS = ROOT / "runs" / "accuracy"

ZO_STEPS = 300  # every zeroth-order cell (9,600 row-forwards); equal forward passes across ZO methods
FO_STEPS = 100  # backprop LoRA-FA with Adam, batch 16
COMMON = {"model": "smollm2-135m", "eval_every": 100, "threads": 1, "progress": False,
          "readout": 0}  # the tables compare the steps themselves; the label readout is measured in learn.py

# The zeroth-order settings are `prge train`'s defaults (the part-2 sweep's winner, see the README);
# only q and b change between the ZO methods.
METHODS = {
    "fo": {"method": "fo", "optimizer": "adam", "lr": 1e-3, "batch_size": 16, "steps": FO_STEPS},
    "mezo-q1": {"method": "mezo", "q": 1, "batch_size": 16, "steps": ZO_STEPS},
    "prge-q4": {"method": "prge", "q": 4, "batch_size": 4, "steps": ZO_STEPS},
    "prge-q16": {"method": "prge", "q": 16, "batch_size": 1, "steps": ZO_STEPS},
}
# The main and engine tables were measured (2026-11-24/25) with the SST-2 prompt that was `prge train`'s
# default then, `Review: {sentence}\nSentiment:` (78.6% zero-shot test); it is pinned for them so that
# rerunning a cell reproduces the table it belongs to (and ENGINE_MAX_LENGTH below holds every row). The
# default is now the 85.1% prompt of part 2a's second round (2026-12-01): the `sst2-default` table runs
# the same methods with it (prge train's defaults, nothing pinned).
EARLIER_PROMPT = {"sst2": {"template": EARLIER_SST2_TEMPLATE}}
TABLES = {
    "main": {"tasks": ["sst2", "rte"], "seeds": [0, 1, 2], "methods": ["prge-q4", "mezo-q1", "fo", "prge-q16"],
             "overrides": EARLIER_PROMPT},
    # mezo-q1 and arc_easy were added for issue 20's "the paper's claim" figure (P-RGE q = 4 beats MeZO q = 1 at
    # equal forwards on >= 4 of SST-2, RTE, WiC, BoolQ, COPA, ARC-Easy); the earlier cells are unchanged.
    "suite": {"tasks": ["boolq", "wic", "copa", "winogrande", "squad", "arc_easy"], "seeds": [0],
              "methods": ["fo", "prge-q4", "mezo-q1"]},
    "engine": {"tasks": ["sst2"], "seeds": [0], "methods": ["engine-q4"], "overrides": EARLIER_PROMPT},
    "sst2-default": {"tasks": ["sst2"], "seeds": [0, 1, 2], "methods": ["prge-q4", "mezo-q1", "fo"]},
}
PAIRED = ("main", "sst2-default", "suite")
CLAIM_TASKS = (("main", "sst2"), ("main", "rte"), ("suite", "wic"), ("suite", "boolq"), ("suite", "copa"), ("suite", "arc_easy"))  # the tables whose P-RGE / MeZO / backprop cells the figures compare
ENGINE_MAX_LENGTH = 64  # the program's static sequence length: the longest SST-2 train/dev row with the earlier
# prompt is 64 tokens (measured), so nothing is truncated and the padded forward is half that of T = 128


def cells(table: str, tasks=None, methods=None, seeds=None) -> list[tuple[str, str, int]]:
    """The table's (task, method, seed) cells in run order, optionally only some tasks / methods / seeds."""
    t = TABLES[table]
    return [(task, m, seed) for seed in t["seeds"] for task in t["tasks"] for m in t["methods"]
            if (not tasks or task in tasks) and (not methods or m in methods) and (seeds is None or seed in seeds)]


def prge_cli(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(COMMON["threads"]), "TRANSFORMERS_VERBOSITY": "error"}
    r = subprocess.run([sys.executable, "-m", "prge.cli", *args], cwd=ROOT, env=env)
    if r.returncode:
        raise SystemExit(f"prge {' '.join(args)} failed (exit {r.returncode})")


def run_cell(table: str, task: str, method: str, seed: int, data_root: str | None) -> dict:
    from prge.config import TrainConfig
    from prge.run.train import run

    out = RUNS / table / f"{task}-{method}-s{seed}"
    if method == "engine-q4":
        return run_engine(out, task, seed, data_root, overrides(table, task))
    if (out / "summary.json").is_file():  # finished, its row not yet recorded (or the folder was copied in)
        return {**json.loads((out / "summary.json").read_text()), "run_dir": str(out.relative_to(ROOT))}
    resume = str(out) if (out / "checkpoints" / "last").is_dir() else None
    cfg = TrainConfig(**{**COMMON, **METHODS[method], **overrides(table, task), "task": task, "seed": seed, "data_root": data_root,
                         "out": str(out), "resume": resume})
    t = time.time()
    summary = run(cfg)
    return {**summary, "wall_minutes": (time.time() - t) / 60, "run_dir": str(out.relative_to(ROOT))}


def overrides(table: str, task: str) -> dict:
    """The TrainConfig fields a table pins for a task (e.g. the prompt it was measured with)."""
    return TABLES[table].get("overrides", {}).get(task, {})


def run_engine(out: Path, task: str, seed: int, data_root: str | None, pinned: dict) -> dict:
    """export (T = ENGINE_MAX_LENGTH) -> device-train -> eager `prge eval` of its adapters on the test split."""
    m = METHODS["prge-q4"]
    out.mkdir(parents=True, exist_ok=True)
    pte = out / "program.pte"
    common = ["--task", task, "--seed", str(seed), "--threads", str(COMMON["threads"])] + (["--data-root", data_root] if data_root else [])
    common += [a for k, v in pinned.items() for a in (f"--{k.replace('_', '-')}", v)]
    t = time.time()
    if not pte.is_file():
        prge_cli("export", *common, "--q", str(m["q"]), "--batch-size", str(m["batch_size"]),
                 "--max-length", str(ENGINE_MAX_LENGTH), "--out", str(pte))
    export_min = (time.time() - t) / 60
    train = out / "train"
    resume = ["--resume"] if (train / "checkpoints" / "last").is_dir() else []
    prge_cli("device-train", "--program", str(pte), "--out", str(train), "--steps", str(m["steps"]), "--seed", str(seed),
             "--eval-every", str(COMMON["eval_every"]), "--no-progress", *resume)
    summary = json.loads((train / "summary.json").read_text())
    acc = {}
    for which, adapter in (("last", summary["adapter"]), ("best", summary["best_adapter"])):
        r = subprocess.run([sys.executable, "-m", "prge.cli", "eval", *common, "--adapter", adapter, "--split", "test", "--json"],
                           cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        line = [x for x in r.stdout.splitlines() if x.startswith("{")]
        if r.returncode or not line:
            raise SystemExit(f"prge eval of {adapter} failed:\n{r.stderr[-2000:]}")
        acc[which] = json.loads(line[-1])
    eager = RUNS / "main" / f"{task}-prge-q4-s{seed}"
    return {"task": task, "method": "prge", "steps": summary["steps"], "minutes": summary["minutes"],
            "max_loss_gap_vs_eager": loss_gap(train / "metrics.jsonl", eager / "metrics.jsonl"),
            "export_minutes": export_min, "test_after_last": acc["last"]["test"]["accuracy"],
            "test_after_best": acc["best"]["test"]["accuracy"],
            "best_dev": summary["best_dev"], "best_step": summary["best_step"], "test_before": None,
            "wall_minutes": (time.time() - t) / 60, "run_dir": str(out.relative_to(ROOT))}


def loss_gap(a: Path, b: Path) -> float | None:
    """Largest |loss_a - loss_b| over the training steps two runs' metrics.jsonl share (None if either is missing)."""
    if not (a.is_file() and b.is_file()):
        return None
    la, lb = ({r["step"]: r["loss"] for _, r in read_jsonl(p) if "split" not in r} for p in (a, b))
    common = la.keys() & lb.keys()
    return max(abs(la[k] - lb[k]) for k in common) if common else None


def cmd_run(args) -> None:
    todo = cells(args.table, args.tasks, args.methods, args.seeds)
    if not todo:
        raise SystemExit(f"no {args.table} cells match --tasks/--methods/--seeds: the table has tasks "
                         f"{TABLES[args.table]['tasks']}, methods {TABLES[args.table]['methods']}, seeds {TABLES[args.table]['seeds']}")
    k, n = (int(x) for x in args.shard.split("/"))
    for task, method, seed in todo[k::n]:
        # read before every cell: another process (the other core, or --tasks/--methods run beside) may have done it
        if (args.table, task, method, seed) in {(r["table"], r["task"], r["cell_method"], r["seed"]) for r in read_rows()}:
            continue
        with cell_lock(RUNS / args.table / f"{task}-{method}-s{seed}") as mine:
            if not mine:
                print(f"[accuracy] {args.table}: {task} {method} seed {seed} is being run by another process; skipped",
                      file=sys.stderr, flush=True)
                continue
            print(f"[accuracy] {args.table}: {task} {method} seed {seed}", file=sys.stderr, flush=True)
            res = run_cell(args.table, task, method, seed, args.data_root)
            row = {"table": args.table, "task": task, "cell_method": method, "seed": seed, **res,
                   "machine": f"{platform.machine()}, {os.cpu_count()} cores", "threads": COMMON["threads"],
                   "date": time.strftime("%Y-%m-%d")}
            append_jsonl(RESULTS, row)
            record_curves([row])
    print(render(read_rows()))


@contextlib.contextmanager
def cell_lock(out: Path):
    """Yields True if this process holds the cell (a `running.pid` file beside its run; one left by a process
    that no longer exists is taken over), False if a live process holds it."""
    out.mkdir(parents=True, exist_ok=True)
    lock = out / "running.pid"
    if lock.exists() and not _alive(lock.read_text()):
        lock.unlink(missing_ok=True)  # stale: its process is gone
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        yield False
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    try:
        yield True
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except PermissionError:  # another user's live process
        return True
    except (ProcessLookupError, ValueError, OverflowError):
        return False
    return True


def dev_curve(metrics: Path) -> list[dict]:
    """A run's dev evaluations, each with the minutes of training steps before it (the sum of the steps'
    own seconds: evaluation time is left out, so methods with different evaluation costs compare fairly).
    A resumed run may have logged a step twice (once before the kill, once after): the last one counts."""
    steps, devs = {}, {}
    for _, r in read_jsonl(metrics):
        if r.get("split") == "dev":
            devs[r["step"]] = r
        elif "split" not in r and "seconds" in r:
            steps[r["step"]] = r["seconds"]
    return [{"step": k, "train_minutes": sum(v for s, v in steps.items() if s <= k) / 60,
             "accuracy": devs[k]["accuracy"], "loss": devs[k]["loss"]} for k in sorted(devs)]


def record_curves(rows: list[dict]) -> int:
    """Appends to CURVES the dev curve of every row that has none yet and whose run folder is here; returns
    how many were added. The run folders (runs/) are not committed, the curves file is."""
    have = {(c["table"], c["task"], c["cell_method"], c["seed"]) for _, c in read_jsonl(CURVES)} if CURVES.is_file() else set()
    added = 0
    for r in rows:
        key = (r["table"], r["task"], r["cell_method"], r["seed"])
        run_dir = ROOT / r["run_dir"]
        metrics = run_dir / ("train" if r["cell_method"] == "engine-q4" else "") / "metrics.jsonl"
        if key in have or not metrics.is_file():
            continue
        append_jsonl(CURVES, dict(zip(("table", "task", "cell_method", "seed"), key), dev=dev_curve(metrics)))
        have.add(key)
        added += 1
    return added


def plot(curves: list[dict], path: Path) -> Path:
    """Dev accuracy and dev loss against minutes of training steps, one row of panels per main-table task:
    a thin line per seed, a thick one through the seeds' means at each evaluation step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = TABLES["main"]["tasks"]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 4 * len(tasks)), squeeze=False)
    colors = dict(zip(TABLES["main"]["methods"], plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for (ax_acc, ax_loss), task in zip(axes, tasks):
        for m in TABLES["main"]["methods"]:
            cs = [c["dev"] for c in curves if (c["table"], c["task"], c["cell_method"]) == ("main", task, m)]
            if not cs:
                continue
            for ax, key, scale in ((ax_acc, "accuracy", 100), (ax_loss, "loss", 1)):
                for c in cs:
                    ax.plot([e["train_minutes"] for e in c], [scale * e[key] for e in c], "-", color=colors[m], lw=0.7, alpha=0.4)
                common = sorted(set.intersection(*({e["step"] for e in c} for c in cs)))
                at = [[next(e for e in c if e["step"] == k) for c in cs] for k in common]
                ax.plot([statistics.mean(e["train_minutes"] for e in es) for es in at],
                        [scale * statistics.mean(e[key] for e in es) for es in at], "o-", color=colors[m], lw=2,
                        label=f"{m} ({len(cs)} seed{'s' if len(cs) > 1 else ''})")
        ax_acc.set(title=f"{task}: dev accuracy", xlabel="minutes of training steps (1 thread)", ylabel="dev accuracy (%)")
        ax_loss.set(title=f"{task}: dev loss", xlabel="minutes of training steps (1 thread)", ylabel="dev loss (class cross-entropy)")
        ax_acc.legend(fontsize=8)
        for ax in (ax_acc, ax_loss):
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_rows() -> list[dict]:
    return [row for _, row in read_jsonl(RESULTS)] if RESULTS.is_file() else []


def mean_std(xs: list[float]) -> str:
    if not xs:
        return "–"
    xs = [100 * x for x in xs]
    if len(xs) == 1:
        return f"{xs[0]:.1f}"
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}"


def render(rows: list[dict]) -> str:
    """Markdown: one row per (task, method), mean ± std over the seeds that finished (n shown); the engine
    cell beside its eager twin (same task, seed and settings); then the figures we hold ourselves to."""
    out = []
    for table in TABLES:
        rs = [r for r in rows if r["table"] == table]
        if not rs:
            continue
        score = "test acc. (SQuAD: F1)" if "squad" in TABLES[table]["tasks"] else "test acc."  # evaluate's "accuracy" is F1 there
        out += [f"**{table}**", "", f"| task | method | seeds | final {score} | best-dev {score} | minutes (train loop) |",
                "|---|---|---|---|---|---|"]
        for task in TABLES[table]["tasks"]:
            trs = [r for r in rs if r["task"] == task]
            zs = [r["test_before"] for r in trs if r.get("test_before") is not None]
            if zs:
                out.append(f"| {task} | zero-shot | – | {100 * zs[0]:.1f} | {100 * zs[0]:.1f} | 0 |")
            for m in TABLES[table]["methods"]:
                mr = [r for r in trs if r["cell_method"] == m]
                if table == "engine":  # beside the eager run of the same seeds
                    twins = [r for r in rows if r["table"] == "main" and r["task"] == task and r["cell_method"] == "prge-q4"
                             and r["seed"] in {e["seed"] for e in mr}]
                    out += [_row(task, "prge-q4 (eager, same seeds)", twins)]
                out.append(_row(task, m, mr))
        out.append("")
    return "\n".join(out + figures(rows))


def splice(path: Path, tables: str) -> None:
    """Replace what lies between the BEGIN and END marker lines of a Markdown file with `tables`, written
    atomically, so the document's tables are the rendered ones and never a hand copy."""
    text = path.read_text(encoding="utf-8")
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"{path}: needs exactly one line {BEGIN!r} followed later by one line {END!r} "
                         f"around the tables to replace; add them (an empty block is fine) and rerun")
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    atomic_write_text(path, f"{head}{BEGIN}\n\n{tables.strip()}\n\n{END}{tail}")


def _row(task: str, method: str, mr: list[dict]) -> str:
    if not mr:
        return f"| {task} | {method} | 0 | not run yet | | |"
    return (f"| {task} | {method} | {len(mr)} | {mean_std([r['test_after_last'] for r in mr])} | "
            f"{mean_std([r['test_after_best'] for r in mr])} | {statistics.mean(r['minutes'] for r in mr):.1f} |")


def _means(rows: list[dict], table: str, task: str, method: str, seeds=None) -> tuple[float, float, int] | None:
    """(mean final, mean best-dev, n) in points, over the finished seeds (or only `seeds`)."""
    rs = [r for r in rows if (r["table"], r["task"], r["cell_method"]) == (table, task, method)
          and (seeds is None or r["seed"] in seeds)]
    if not rs:
        return None
    return (100 * statistics.mean(r["test_after_last"] for r in rs), 100 * statistics.mean(r["test_after_best"] for r in rs),
            len(rs))


def figures(rows: list[dict]) -> list[str]:
    """The issue's three figures, each per task on final and on best-dev test accuracy: met, missed or
    mixed (met on one of the two), over the seeds both sides finished (1 seed is within the noise: the
    test-set standard error alone is ~1.4 points at 80% of 872 examples)."""
    out = ["| figure we hold ourselves to | task | measured (final · best-dev) | status |", "|---|---|---|---|"]

    def status(oks: list[bool]) -> str:
        return "met" if all(oks) else "**missed**" if not any(oks) else "mixed"

    def seeds(table: str, task: str, method: str) -> set[int]:
        return {r["seed"] for r in rows if (r["table"], r["task"], r["cell_method"]) == (table, task, method)}

    for table, task in ((t, task) for t in PAIRED for task in TABLES[t]["tasks"]):
        for other, figure, ok in (("mezo-q1", "P-RGE q = 4 beats MeZO q = 1 at equal forwards", lambda p, o: p > o),
                                  ("fo", "P-RGE q = 4 within 3 points of backprop", lambda p, o: o - p <= 3)):
            common = seeds(table, task, "prge-q4") & seeds(table, task, other)  # paired: the seeds both finished
            if not common:
                continue
            p, o = _means(rows, table, task, "prge-q4", common), _means(rows, table, task, other, common)
            name = task if table == "main" else f"{task} ({table})"
            out.append(f"| {figure} | {name} | {p[0]:.1f} vs {o[0]:.1f} · {p[1]:.1f} vs {o[1]:.1f} "
                       f"(seeds {', '.join(map(str, sorted(common)))}) | {status([ok(p[0], o[0]), ok(p[1], o[1])])} |")
    claim = []  # the paper's claim over the six tasks, paired seeds, best-dev test accuracy
    for table, task in CLAIM_TASKS:
        common = seeds(table, task, "prge-q4") & seeds(table, task, "mezo-q1")
        if common:
            claim.append(_means(rows, table, task, "prge-q4", common)[1] > _means(rows, table, task, "mezo-q1", common)[1])
    if claim:
        out.append(f"| P-RGE q = 4 beats MeZO q = 1 on >= 4 of the 6 tasks (best-dev) | {len(claim)} of 6 measured | "
                   f"wins on {sum(claim)} | {'met' if sum(claim) >= 4 else '**missed**' if sum(claim) + 6 - len(claim) < 4 else 'open'} |")
    for task in TABLES["engine"]["tasks"]:
        e = _means(rows, "engine", task, "engine-q4")
        e_seeds = seeds("engine", task, "engine-q4")
        w = _means(rows, "main", task, "prge-q4", e_seeds)
        if e and w:
            gaps = [r["max_loss_gap_vs_eager"] for r in rows if (r["table"], r["task"]) == ("engine", task)
                    and r.get("max_loss_gap_vs_eager") is not None]
            gap = f"; per-step training loss within {max(gaps):.1e} of eager" if gaps else ""
            out.append(f"| engine within 1 point of eager (same seed) | {task} | {e[0]:.1f} vs {w[0]:.1f} · "
                       f"{e[1]:.1f} vs {w[1]:.1f} (seeds {', '.join(map(str, sorted(e_seeds)))}){gap} | {status([abs(e[0] - w[0]) <= 1, abs(e[1] - w[1]) <= 1])} |")
    return out if len(out) > 2 else []


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the missing cells of a table (resumable)")
    r.add_argument("--table", choices=list(TABLES), default="main")
    r.add_argument("--shard", default="0/1", help="k/n: run every n-th cell starting at k (one process per core)")
    r.add_argument("--tasks", nargs="+", help="only these tasks of the table")
    r.add_argument("--methods", nargs="+", help="only these methods of the table (e.g. prge-q4 mezo-q1)")
    r.add_argument("--seeds", nargs="+", type=int, help="only these seeds of the table")
    r.add_argument("--data-root")
    r.add_argument("--threads", type=int, default=COMMON["threads"],
                   help="threads per cell (default 1: one cell per core; 2 finishes one long cell sooner on a free machine)")
    rd = sub.add_parser("render", help="print the tables from the results file (or write them into a document)")
    rd.add_argument("--into", type=Path, help="a Markdown file whose block between the lines "
                                             f"{BEGIN!r} and {END!r} is replaced with the tables")
    sub.add_parser("plot", help=f"draw the main table's dev curves into {PLOT.relative_to(ROOT)} (collecting the curves "
                                f"of finished cells whose run folders are here into {CURVES.relative_to(ROOT)})")
    args = p.parse_args()
    if args.cmd == "run":
        COMMON["threads"] = args.threads  # recorded with each row
        RUNS.mkdir(parents=True, exist_ok=True)
        cmd_run(args)
    elif args.cmd == "plot":
        added = record_curves(read_rows())
        print(f"{added} new curve(s) recorded; plot: {plot([c for _, c in read_jsonl(CURVES)], PLOT)}")
    elif args.into:
        splice(args.into, render(read_rows()))
        print(f"tables written into {args.into}")
    else:
        print(render(read_rows()))


if __name__ == "__main__":
    main()
