#!/usr/bin/env python
"""Query-parallel P-RGE (prge.run.dist): what crosses the wire, the all-gather latency, step time and scaling.

Parts (each appends raw rows to benchmarks/results/distributed.jsonl):

  allgather   W gloo processes on loopback (torch.multiprocessing) all-gather the step's losses exactly as
              `prge.run.dist.Share.gather` does: 2q/W float32 per rank, for q in --qs. Median and p90 over
              --iters exchanges after 50 warm-up ones; payload bytes per rank and per step.
  steps       `prge train` on --model (default SmolLM2-135M, or `small`: see small_model; sst2, b = 4) with
              --steps steps, no evaluation between: 1 process x 2 threads at q; 2 processes x 1 thread
              (torchrun) at the same global q; and 1 process x 1 thread at q/2 and q/4 (one rank's
              compute alone, for the projection), and 1 process x 1 thread at q. The median per-step seconds from metrics.jsonl (rank 0),
              step 1 left out.
  tta         time-to-accuracy with N x queries, SmolLM2-135M on SST-2 from the earlier prompt: q = 4 on 1 rank
              (1 process x 1 thread, lr 3e-3) against q = 8 on 2 ranks (2 processes x 1 thread, lr 6e-3: the
              best lr grows with q, lr* = q·rho/tr(H) in docs/optimiser.md section 6), --tta-steps steps each,
              dev (--tta-dev rows) every --tta-eval-every steps and test at the end. The time axis is the
              training wall time (the sum of the step times in rank 0's metrics.jsonl): the evaluations are
              the same in both runs and are left out. One rank = one core here, as one machine would be.
  projection  (no measurement: --render) per-rank step time t(k) = c0 + c1·k, least squares over the
              1-thread runs of the model (k queries per rank), plus a ring all-gather of W-1 hops of the measured 2-rank loopback
              latency: T(W) = t(k) + (W-1)·α. Printed for W = 8..64 at k = q/2 per rank.

    python benchmarks/distributed.py --parts allgather
    nohup python benchmarks/distributed.py --parts steps > /tmp/dist.log 2>&1 &
    nohup python benchmarks/distributed.py --parts tta > /tmp/tta.log 2>&1 &      # ~45 min, both cores
    python benchmarks/distributed.py --render
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "distributed.jsonl"


def machine() -> dict:
    return {"date": datetime.date.today().isoformat(), "machine": f"{os.cpu_count()}-core {platform.machine()} CPU, no GPU",
            "load_avg_1min": os.getloadavg()[0]}


def write(row: dict) -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("a") as f:
        f.write(json.dumps({**machine(), **row}) + "\n")
    print(json.dumps(row), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ allgather


def _gather_worker(rank: int, world: int, port: int, qs: list[int], iters: int, queue) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for q in qs:
        local = torch.randn(2 * q // world)
        parts = [torch.empty_like(local) for _ in range(world)]
        times = []
        for i in range(50 + iters):
            dist.barrier()
            t = time.perf_counter()
            dist.all_gather(parts, local)
            if i >= 50:
                times.append(time.perf_counter() - t)
        if rank == 0:
            times.sort()
            queue.put({"part": "allgather", "world": world, "q": q, "backend": "gloo", "link": "loopback",
                       "payload_bytes_per_rank": local.numel() * 4, "payload_bytes_per_step": 2 * q * 4,
                       "median_us": statistics.median(times) * 1e6, "p90_us": times[int(0.9 * len(times))] * 1e6,
                       "iters": iters})
    dist.destroy_process_group()


def allgather(worlds: list[int], qs: list[int], iters: int) -> None:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    for world in worlds:
        queue = ctx.SimpleQueue()
        port = free_port()
        procs = [ctx.Process(target=_gather_worker, args=(r, world, port, [q for q in qs if q % world == 0], iters, queue))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        while not queue.empty():
            write(queue.get())


# ------------------------------------------------------------------------------------------------ steps


def small_model(folder: Path) -> str:
    """The notes' 21M Llama shape (hidden 512, 4 layers, 8 heads, MLP 1376) with prge.testing's tiny
    tokenizer (vocab ~500), random weights: a model whose step is compute-bound like SmolLM2's, at a
    tenth of its cost, for when the machine is too busy for SmolLM2."""
    if not (folder / "config.json").is_file():
        import torch
        from transformers import AutoModelForCausalLM, LlamaConfig

        from prge.testing import tiny_tokenizer

        tok = tiny_tokenizer()
        cfg = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                          num_key_value_heads=8, max_position_embeddings=512, tie_word_embeddings=True,
                          vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=None, bos_token_id=None, use_cache=False)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(folder)
        tok.save_pretrained(folder)
    return str(folder)


def train_args(model: str, q: int, steps: int, out: Path) -> list[str]:
    return ["train", "--model", model, "--task", "sst2", "--q", str(q), "--batch-size", "4", "--steps", str(steps),
            "--eval-every", "0", "--checkpoint-every", "0", "--n-dev", "8", "--n-test", "8", "--readout", "0", "--no-progress", "--out", str(out)]


def launch(procs: int, threads: int, args: list[str]) -> list[str]:
    """The command for `prge <args>`: one process with `threads` threads, or torchrun with `procs` processes
    (each pinned by prge to its share of the cores)."""
    if procs == 1:
        return [sys.executable, "-m", "prge", *args, "--threads", str(threads)]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m", "prge", *args]


def step_seconds(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["seconds"] for r in rows if "split" not in r]


def steps(model: str, q: int, n: int, only: list[int] | None = None) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    model_name = model if model != "small" else "small (21M-shape Llama, random weights, tiny tokenizer)"
    if model == "small":
        sys.path.insert(0, str(ROOT))
        model = small_model(Path(tempfile.gettempdir()) / "prge-bench-small-llama")
    variants = [("1 process x 2 threads", 1, 2, q), ("2 processes x 1 thread", 2, 1, q),
                ("1 process x 1 thread", 1, 1, q // 2), ("1 process x 1 thread", 1, 1, max(1, q // 4)),
                ("1 process x 1 thread", 1, 1, q)]
    for i, (name, procs, threads, qq) in enumerate(variants):
        if only and i not in only:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run"
            cmd = launch(procs, threads, train_args(model, qq, n, out))
            t = time.time()
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode:
                print(r.stderr[-2000:], file=sys.stderr)
                continue
            secs = step_seconds(out)
            write({"part": "steps", "variant": name, "processes": procs, "threads_per_process": threads, "q": qq,
                   "queries_per_rank": qq // procs, "batch_size": 4, "model": model_name, "task": "sst2", "steps": n,
                   "step_seconds": secs, "median_step_s": statistics.median(secs[1:]), "wall_s": time.time() - t})


# ------------------------------------------------------------------------------------------------ tta

TTA = [("q = 4 on 1 rank", 1, 4, "3e-3"), ("q = 8 on 2 ranks", 2, 8, "6e-3")]


def tta(steps_n: int, eval_every: int, n_dev: int, seed: int, runs: Path) -> None:
    """Each variant is one resumable run folder under `runs` (a killed run continues exactly)."""
    sys.path.insert(0, str(ROOT))
    from prge.data.classification import EARLIER_SST2_TEMPLATE

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name, procs, q, lr in TTA:
        out = runs / f"tta-q{q}-w{procs}-s{seed}"
        args = ["train", "--model", "smollm2-135m", "--task", "sst2", "--template", EARLIER_SST2_TEMPLATE, "--q", str(q),
                "--lr", lr, "--steps", str(steps_n), "--eval-every", str(eval_every), "--n-dev", str(n_dev),
                "--seed", str(seed), "--readout", "0", "--no-progress", "--out", str(out)]
        if (out / "checkpoints" / "last").is_dir() and not (out / "summary.json").is_file():
            args += ["--resume", str(out)]
        if not (out / "summary.json").is_file():
            cmd = launch(procs, 1, args)
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if done.returncode:
                print(done.stderr[-2000:], file=sys.stderr)
                continue
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((out / "summary.json").read_text())
        clock, curve = 0.0, []
        for r in rows:
            if "split" in r:
                curve.append({"step": r["step"], "train_s": round(clock, 1), "dev_accuracy": r["accuracy"], "dev_loss": r["loss"]})
            else:
                clock += r["seconds"]
        write({"part": "tta", "variant": name, "processes": procs, "threads_per_process": 1, "q": q, "lr": float(lr),
               "model": "smollm2-135m", "task": "sst2 (earlier prompt)", "steps": steps_n, "seed": seed, "n_dev": n_dev,
               "curve": curve, "median_step_s": statistics.median(step_seconds(out)),
               **{k: summary.get(k) for k in ("test_before", "test_after_last", "test_after_best", "best_step", "minutes")}})


# ------------------------------------------------------------------------------------------------ render


def newest(rows: list[dict], **match) -> dict | None:
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return found[-1] if found else None


def render_tta(rows: list[dict]) -> None:
    runs = {r["variant"]: r for r in rows if r["part"] == "tta"}  # the newest row of each variant
    if not runs:
        return
    print("\n| variant | lr | step (median) | dev accuracy (loss) at training minutes … | test before → after (best dev) |"
          "\n|---|---|---|---|---|")
    for r in runs.values():
        pts = ", ".join(f"{c['train_s'] / 60:.1f} min: {100 * c['dev_accuracy']:.1f} ({c['dev_loss']:.4f})" for c in r["curve"])
        print(f"| {r['variant']} | {r['lr']:g} | {r['median_step_s']:.2f} s | {pts} | "
              f"{100 * r['test_before']:.1f} → {100 * r['test_after_best']:.1f} |")
    one, two = runs.get(TTA[0][0]), runs.get(TTA[1][0])
    if one and two:
        target, t1, hit = sooner(one["curve"], two["curve"])
        print(f"\n1 rank reaches dev loss {target:.4f} after {t1 / 60:.1f} training minutes; 2 ranks (q = 8) "
              + (f"after {hit / 60:.1f} ({t1 / hit:.2f}x sooner)" if hit else "not within its run"))


def sooner(one: list[dict], two: list[dict]) -> tuple[float, float, float | None]:
    """(the dev loss `one` ends its run at, its training seconds then, the training seconds at which
    `two` first reached that loss or None); curves are [{"train_s", "dev_loss"}, ...] in step order."""
    target, t1 = one[-1]["dev_loss"], one[-1]["train_s"]
    return target, t1, next((c["train_s"] for c in two if c["dev_loss"] <= target), None)


def fit_line(pts: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (c0, c1) of t = c0 + c1·k over (k, t) points."""
    mk = sum(k for k, _ in pts) / len(pts)
    mt = sum(t for _, t in pts) / len(pts)
    c1 = sum((k - mk) * (t - mt) for k, t in pts) / sum((k - mk) ** 2 for k, _ in pts)
    return mt - c1 * mk, c1


def render() -> None:
    rows = [json.loads(x) for x in OUT.read_text().splitlines()] if OUT.exists() else []
    print("| W | q | payload per rank | per step | all-gather median | p90 |\n|---|---|---|---|---|---|")
    for r in rows:
        if r["part"] == "allgather":
            print(f"| {r['world']} | {r['q']} | {r['payload_bytes_per_rank']} B | {r['payload_bytes_per_step']} B | "
                  f"{r['median_us']:.0f} µs | {r['p90_us']:.0f} µs |")
    render_tta(rows)
    for model in dict.fromkeys(r["model"] for r in rows if r["part"] == "steps"):
        render_steps([r for r in rows if r["part"] == "steps" and r["model"] == model], rows, model)


def render_steps(st: list[dict], rows: list[dict], model: str) -> None:
    """One model's step-time rows (the newest of each variant and q), the 2-process speed-up and the projection."""
    newest_of = {(r["processes"], r["threads_per_process"], r["q"]): r for r in st}
    q = max(r["q"] for r in st)
    one, two, serial = newest_of.get((1, 2, q)), newest_of.get((2, 1, q)), newest_of.get((1, 1, q))
    print(f"\n{model}\n\n| processes x threads | q (global) | queries per process | step (median) | load (1 min) |\n|---|---|---|---|---|")
    for (procs, threads, qq), r in sorted(newest_of.items()):
        print(f"| {procs} x {threads} | {qq} | {qq // procs} | {r['median_step_s']:.2f} s | {r.get('load_avg_1min', 0):.1f} |")
    for base, what in ((one, "1 process x 2 threads"), (serial, "1 process x 1 thread")):
        if base and two:
            speedup = base["median_step_s"] / two["median_step_s"]
            print(f"\nat q = {q}, 2 processes x 1 thread against {what}: speed-up {speedup:.2f}"
                  + (f", efficiency {speedup / 2:.2f} of 2 cores" if base is serial else ""))
    # per-rank compute t(k) = c0 + c1·k, least squares over the 1-thread runs (k = queries in the process)
    pts = [(k, r["median_step_s"]) for (procs, threads, k), r in newest_of.items() if procs == 1 and threads == 1]
    ag = newest(rows, part="allgather", world=2, q=q)
    if len(pts) >= 2 and ag:
        c0, c1 = fit_line(pts)
        alpha = ag["median_us"] * 1e-6
        k = q // 2
        print(f"\nprojection (t(k) = {c0:.2f} + {c1:.2f}·k s fitted to k = {sorted(k for k, _ in pts)}, α = {alpha * 1e6:.0f} µs "
              "per hop, ring all-gather of W-1 hops):")
        print("| ranks W | q = k·W | step | queries/s | efficiency |\n|---|---|---|---|---|")
        for w in (8, 16, 32, 64):
            t = c0 + c1 * k + (w - 1) * alpha
            print(f"| {w} | {k * w} | {t:.2f} s | {k * w / t:.1f} | {(c0 + c1 * k) / t:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["allgather", "steps"], choices=["allgather", "steps", "tta"])
    ap.add_argument("--worlds", type=int, nargs="+", default=[2], help="processes for the all-gather part")
    ap.add_argument("--qs", type=int, nargs="+", default=[4, 8, 16, 64], help="global queries for the all-gather part")
    ap.add_argument("--iters", type=int, default=1000, help="timed all-gathers per q")
    ap.add_argument("--model", default="smollm2-135m", help="model for the steps part: a prge --model, or small (see small_model)")
    ap.add_argument("--q", type=int, default=4, help="global queries for the steps part")
    ap.add_argument("--steps", type=int, default=8, help="training steps per variant (the first is not counted)")
    ap.add_argument("--variants", type=int, nargs="+", help="steps part: only these of the variants, by index "
                    "(0: 1 process x 2 threads, 1: 2 processes x 1 thread, 2: 1x1 at q/2, 3: 1x1 at q/4, 4: 1x1 at q)")
    ap.add_argument("--tta-steps", type=int, default=200, help="tta part: training steps per variant")
    ap.add_argument("--tta-eval-every", type=int, default=25, help="tta part: dev evaluation every N steps")
    ap.add_argument("--tta-dev", type=int, default=200, help="tta part: dev rows")
    ap.add_argument("--seed", type=int, default=0, help="tta part: seed")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "distributed", help="tta part: run folders (resumable)")
    ap.add_argument("--render", action="store_true", help="only print the tables from the JSONL")
    a = ap.parse_args()
    if not a.render:
        if "allgather" in a.parts:
            allgather(a.worlds, a.qs, a.iters)
        if "steps" in a.parts:
            steps(a.model, a.q, a.steps, a.variants)
        if "tta" in a.parts:
            tta(a.tta_steps, a.tta_eval_every, a.tta_dev, a.seed, a.runs)
    render()


if __name__ == "__main__":
    main()
