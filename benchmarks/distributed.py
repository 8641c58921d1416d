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
  projection  (no measurement: --render) per-rank step time t(k) = c0 + c1·k fitted to the 1-thread runs
              (k queries per rank), plus a ring all-gather of W-1 hops of the measured 2-rank loopback
              latency: T(W) = t(k) + (W-1)·α. Printed for W = 8..64 at k = q/2 per rank.

    python benchmarks/distributed.py --parts allgather
    nohup python benchmarks/distributed.py --parts steps > /tmp/dist.log 2>&1 &
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
            "--eval-every", "0", "--checkpoint-every", "0", "--n-dev", "8", "--n-test", "8", "--no-progress", "--out", str(out)]


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
            if procs == 1:
                cmd = [sys.executable, "-m", "prge", *train_args(model, qq, n, out), "--threads", str(threads)]
            else:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--rdzv-backend", "c10d",
                       "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m", "prge", *train_args(model, qq, n, out)]
            t = time.time()
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode:
                print(r.stderr[-2000:], file=sys.stderr)
                continue
            secs = step_seconds(out)
            write({"part": "steps", "variant": name, "processes": procs, "threads_per_process": threads, "q": qq,
                   "queries_per_rank": qq // procs, "batch_size": 4, "model": model_name, "task": "sst2", "steps": n,
                   "step_seconds": secs, "median_step_s": statistics.median(secs[1:]), "wall_s": time.time() - t})


# ------------------------------------------------------------------------------------------------ render


def newest(rows: list[dict], **match) -> dict | None:
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return found[-1] if found else None


def render() -> None:
    rows = [json.loads(x) for x in OUT.read_text().splitlines()] if OUT.exists() else []
    print("| W | q | payload per rank | per step | all-gather median | p90 |\n|---|---|---|---|---|---|")
    for r in rows:
        if r["part"] == "allgather":
            print(f"| {r['world']} | {r['q']} | {r['payload_bytes_per_rank']} B | {r['payload_bytes_per_step']} B | "
                  f"{r['median_us']:.0f} µs | {r['p90_us']:.0f} µs |")
    st = [r for r in rows if r["part"] == "steps"]
    if not st:
        return
    q = max(r["q"] for r in st)
    one = newest(st, processes=1, threads_per_process=2, q=q)
    two = newest(st, processes=2, q=q)
    print("\n| variant | q | step (median) |\n|---|---|---|")
    for r in st:
        print(f"| {r['variant']} | {r['q']} | {r['median_step_s']:.2f} s |")
    serial = newest(st, processes=1, threads_per_process=1, q=q)
    for base, what in ((one, "1 process x 2 threads"), (serial, "1 process x 1 thread")):
        if base and two:
            speedup = base["median_step_s"] / two["median_step_s"]
            print(f"\nat q = {q}, 2 processes x 1 thread against {what}: speed-up {speedup:.2f}"
                  + (f", efficiency {speedup / 2:.2f} of 2 cores" if base is serial else ""))
    k1 = newest(st, processes=1, threads_per_process=1, q=max(1, q // 4))
    k2 = newest(st, processes=1, threads_per_process=1, q=q // 2)
    ag = newest(rows, part="allgather", world=2, q=q)
    if k1 and k2 and ag and k2["q"] != k1["q"]:
        c1 = (k2["median_step_s"] - k1["median_step_s"]) / (k2["q"] - k1["q"])
        c0 = k1["median_step_s"] - c1 * k1["q"]
        alpha = ag["median_us"] * 1e-6
        k = q // 2
        print(f"\nprojection (t(k) = {c0:.2f} + {c1:.2f}·k s, α = {alpha * 1e6:.0f} µs per hop, ring all-gather of W-1 hops):")
        print("| ranks W | q = k·W | step | queries/s | efficiency |\n|---|---|---|---|---|")
        for w in (8, 16, 32, 64):
            t = c0 + c1 * k + (w - 1) * alpha
            print(f"| {w} | {k * w} | {t:.2f} s | {k * w / t:.1f} | {(c0 + c1 * k) / t:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["allgather", "steps"], choices=["allgather", "steps"])
    ap.add_argument("--worlds", type=int, nargs="+", default=[2], help="processes for the all-gather part")
    ap.add_argument("--qs", type=int, nargs="+", default=[4, 8, 16, 64], help="global queries for the all-gather part")
    ap.add_argument("--iters", type=int, default=1000, help="timed all-gathers per q")
    ap.add_argument("--model", default="smollm2-135m", help="model for the steps part: a prge --model, or small (see small_model)")
    ap.add_argument("--q", type=int, default=4, help="global queries for the steps part")
    ap.add_argument("--steps", type=int, default=8, help="training steps per variant (the first is not counted)")
    ap.add_argument("--variants", type=int, nargs="+", help="steps part: only these of the variants, by index "
                    "(0: 1 process x 2 threads, 1: 2 processes x 1 thread, 2: 1x1 at q/2, 3: 1x1 at q/4, 4: 1x1 at q)")
    ap.add_argument("--render", action="store_true", help="only print the tables from the JSONL")
    a = ap.parse_args()
    if not a.render:
        if "allgather" in a.parts:
            allgather(a.worlds, a.qs, a.iters)
        if "steps" in a.parts:
            steps(a.model, a.q, a.steps, a.variants)
    render()


if __name__ == "__main__":
    main()
