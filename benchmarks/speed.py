#!/usr/bin/env python
"""Speed and memory of one training step: P-RGE in the engine vs eager P-RGE, MeZO, backprop and
ExecuTorch's own training, at q in {1, 4, 16} with q·b = 16 (the issue-6 table).

Variants, each in its own subprocess (so its peak RSS, `ru_maxrss`, is its own; ~350 MB of every
figure is importing torch and executorch):

  (a) engine-step       the exported `train_step` (prge.engine.export, XNNPACK): rebuild B, apply the pending
                        update, draw counter noise, write the 2q copies, one forward of 2q·b rows.
                        The worker also runs (f) right after every step and reports the median of the
                        per-pair ratios ("paired"), which load on a shared machine skews less
  (f) engine-forward    `forward_losses` of the same program: only the batched forward of 2q·b rows
                        over the copies — the inference floor
  (b) eager-prge        prge.zo.step.prge_step, dual (one forward of 2q·b rows)
      eager-prge-single prge.zo.step.prge_step, single (two forwards of q·b rows). The engine program is
                        dual only: single exists to trade speed for memory in eager PyTorch
  (c) eager-mezo        prge.zo.step.mezo_step: q sequential (+, −) pairs of forwards of b rows (MeZO)
  (d) backprop          LoRA-FA (B trained, A frozen) forward + backward + Adam on q·b = 16 rows
  (e) et-training       ExecuTorch's own first-order training (benchmarks/et_training.py: joint
                        forward-backward graph, executorch.extension.training, SGD) on the same 16 rows
  gemm                  this machine's fp32 matrix-multiply peak (torch.mm, same threads): the GFLOP/s
                        of (a) — analytic forward FLOPs of 2q·b rows per step — is reported against it

(d), (e) and gemm do not depend on q and run once per configuration (gemm only in a run that measures (a);
the ExecuTorch training program is lowered in its own process, so (e)'s peak RSS is the step's). The table
takes the newest successful row of each variant, so `--variants backprop` redoes one row. Every step of every variant sees
the same q·b examples of full length T (random token ids; speed does not depend on the values),
classification loss over 2 label words, LoRA-FA r = 8 / alpha 16 on all 7 projections. `--warmup`
untimed steps, then `--steps` timed ones; medians are reported. Each engine program is exported and
lowered once per (configuration, q) in a subprocess and cached under --work (`export_s` reports it).

    python benchmarks/speed.py                          # small (21M) configuration, q = 1, 4, 16
    python benchmarks/speed.py --configs smollm2        # SmolLM2-135M (each lowering takes ~15-25 min)
    python benchmarks/speed.py --render                 # re-render tables/plots from the JSONL

Appends JSON lines to benchmarks/results/speed.jsonl, prints markdown tables and writes
benchmarks/results/speed-<config>.png (step time and peak RSS against q).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import workers  # noqa: E402
from benchmarks.workers import report, set_threads  # noqa: E402
from benchmarks.bench_models import CONFIGS, batch, build  # noqa: E402
from prge.io import append_jsonl, read_jsonl  # noqa: E402

VARIANTS = ("engine-step", "engine-forward", "eager-prge", "eager-prge-single", "eager-mezo", "backprop", "et-training")
PER_Q = ("engine-step", "engine-forward", "eager-prge", "eager-prge-single", "eager-mezo")  # the rest: once per config
LABELS = {"engine-step": "(a) engine P-RGE", "eager-prge": "(b) eager P-RGE dual", "eager-prge-single": "(b) eager P-RGE single",
          "eager-mezo": "(c) eager MeZO", "backprop": "(d) backprop LoRA-FA", "et-training": "(e) ExecuTorch training",
          "engine-forward": "(f) engine forward"}


def program_path(args) -> Path:
    return Path(args.work) / f"{args.config}-q{args.q}-b{args.b}-r{args.rank}-{args.quantize or 'fp32'}.pte"


def forward_gflop(model, rows: int, T: int) -> float:
    """Analytic forward FLOPs (GFLOP) of `rows` sequences of length T: 2·(decoder linear weights + the
    LoRA A/B of the wrapped modules) per token, plus attention scores and values (4·T·d per token and
    layer, full T×T as eager attention computes it). The embedding lookup and the 2-word head are ignored."""
    import torch

    from prge.zo.lora import lora_layers

    layers = model.model.layers
    weights = sum(m.weight.numel() for m in layers.modules() if isinstance(m, torch.nn.Linear))
    lora = sum(m.lora_A.numel() + m.lora_B.numel() for m in lora_layers(model).values())
    d_attn = model.config.num_attention_heads * getattr(model.config, "head_dim", model.config.hidden_size // model.config.num_attention_heads)
    per_token = 2 * (weights + lora) + 4 * T * d_attn * len(layers)
    return per_token * rows * T / 1e9


def worker_export(args) -> dict:
    from prge.engine.export import export_program

    model, tok, label_ids = build(args.config, args.rank)
    t = time.time()
    export_program(model, tok, label_ids, q=args.q, batch_size=args.b, max_length=CONFIGS[args.config]["T"],
                   loss="class", quantize=args.quantize, out_path=program_path(args), model_name=args.config,
                   methods=("train_step", "forward_losses"), log=lambda m: print(m, file=sys.stderr, flush=True))
    return {"export_s": time.time() - t, "pte_mb": program_path(args).stat().st_size / 1e6}


def worker_engine(args, method: str) -> tuple[list[float], list[float]]:
    import torch
    from executorch.runtime import Runtime

    from prge.zo import estimator as est
    from prge.engine.formats import manifest_path

    manifest = json.loads(manifest_path(program_path(args)).read_text())
    prog = Runtime.get().load_program(program_path(args))
    methods = {m: prog.load_method(m) for m in manifest["methods"]}  # all before the first call
    bt = batch(args.config, args.b, manifest["vocab_size"] if args.config != "small" else CONFIGS["small"]["vocab_size"])
    q, lr, eps = args.q, torch.tensor([1e-3]), torch.tensor([1e-2])
    g, times, fwd = torch.zeros(q), [], []
    for step in range(1, args.warmup + args.steps + 1):
        t = time.perf_counter()
        if method == "train_step":
            losses = methods["train_step"].execute([*bt.tensors(), lr, eps, g, torch.tensor([0, step])])[0]
            g = est.projected_grad(losses[:q], losses[q:], 1e-2)
            t2 = time.perf_counter()
            # the plain forward right after each step, in the same process: the step/forward ratio from
            # these pairs does not drift with the machine's load the way two separate runs can
            methods["forward_losses"].execute(list(bt.tensors()))
            if step > args.warmup:
                fwd.append(time.perf_counter() - t2)
            t3 = t2
        else:
            methods["forward_losses"].execute(list(bt.tensors()))
            t3 = time.perf_counter()
        if step > args.warmup:
            times.append(t3 - t)
    return times, fwd


def worker_eager(args, kind: str) -> list[float]:
    import torch

    from prge.zo.lora import trainable_b
    from prge.zo.loss import copy_losses
    from prge.zo.step import mezo_step, prge_step

    model, tok, label_ids = build(args.config, args.rank)
    params = trainable_b(model)
    rows = args.q * args.b if kind == "backprop" else args.b
    bt = batch(args.config, rows, model.config.vocab_size)

    def loss_fn(b, copies):
        return copy_losses(model, b, copies, label_ids, "class")

    times = []
    if kind == "backprop":  # LoRA-FA backprop: only B requires grad, Adam as `prge train --method fo`
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=1e-3)
    for step in range(1, args.warmup + args.steps + 1):
        t = time.perf_counter()
        if kind == "backprop":
            opt.zero_grad(set_to_none=True)
            loss_fn(bt, 1)[0].backward()
            opt.step()
        else:
            with torch.no_grad():
                if kind == "mezo":
                    mezo_step(model, params, loss_fn, bt, step, seed=0, q=args.q, eps=1e-2, lr=1e-3)
                else:
                    prge_step(model, params, loss_fn, bt, step, seed=0, q=args.q, eps=1e-2, lr=1e-3, mode=kind)
        if step > args.warmup:
            times.append(time.perf_counter() - t)
    return times


def et_program_path(args) -> Path:
    return Path(args.work) / f"{args.config}-train-b{args.q * args.b}-r{args.rank}.pte"


def worker_et_export(args) -> dict:
    """Lower ExecuTorch's joint forward-backward program, in its own process: the training worker then
    only loads it, so its peak RSS is the training step's and not the lowering's (10.8 GB for SmolLM2)."""
    from benchmarks.et_training import export_training
    from prge.engine.formats import manifest_path

    model, tok, label_ids = build(args.config, args.rank)
    path = et_program_path(args)
    info = export_training(model, label_ids, args.q * args.b, CONFIGS[args.config]["T"], path,
                           log=lambda m: print(m, file=sys.stderr, flush=True))
    manifest_path(path).write_text(json.dumps({"vocab_size": model.config.vocab_size}))
    return info


def worker_et_training(args) -> list[float]:
    from benchmarks.et_training import train_steps
    from prge.engine.formats import manifest_path

    path = et_program_path(args)
    manifest = manifest_path(path)
    if not manifest.is_file():
        raise SystemExit(f"{manifest} is missing: the et-export worker lowers the program first")
    vocab = json.loads(manifest.read_text())["vocab_size"]
    return train_steps(path, batch(args.config, args.q * args.b, vocab), args.steps, args.warmup, 1e-3)


def worker_gemm(args) -> dict:
    """Best fp32 torch.mm GFLOP/s over a few square sizes (the machine's matrix-multiply peak)."""
    import torch

    best = {}
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        reps = max(3, int(2e10 / (2 * n ** 3)))
        t = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        best[n] = 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9
    return {"gemm_gflops": max(best.values()), "gemm_by_n": best}


def run_worker(args) -> None:
    set_threads(args.threads)
    load_before = os.getloadavg()[0]
    if args.worker == "export":
        out = worker_export(args)
    elif args.worker == "et-export":
        out = worker_et_export(args)
    elif args.worker == "gemm":
        out = worker_gemm(args)
    else:
        fwd, extra = [], {}
        if args.worker in ("engine-step", "engine-forward"):
            times, fwd = worker_engine(args, "train_step" if args.worker == "engine-step" else "forward_losses")
        elif args.worker == "et-training":
            times = worker_et_training(args)
        else:
            times = worker_eager(args, {"eager-prge": "dual", "eager-prge-single": "single", "eager-mezo": "mezo",
                                        "backprop": "backprop"}[args.worker])
        out = {"s_step": statistics.median(times), "s_all": times, **extra}
        if fwd:
            out["paired_ratio"] = statistics.median(a / b for a, b in zip(times, fwd))
        if args.worker == "engine-step":
            model, _, _ = build(args.config, args.rank)
            out["gflop_step"] = forward_gflop(model, 2 * args.q * args.b, CONFIGS[args.config]["T"])
    report(out, load_before)


def spawn(args, worker: str) -> dict:
    cmd = ["--worker", worker, "--config", args.config, "--q", str(args.q), "--b", str(args.b),
           "--rank", str(args.rank), "--steps", str(args.steps), "--warmup", str(args.warmup), "--work", args.work]
    if args.quantize:
        cmd += ["--quantize", args.quantize]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    try:
        return workers.spawn(__file__, cmd, args.threads)
    except workers.WorkerFailed as e:  # keep measuring the other variants; the row records the error
        err = (str(e).strip().splitlines() or ["no output"])[-1]
        print(f"[{args.config}] {worker} failed: {err}", file=sys.stderr, flush=True)
        return {"error": err}


def measure(args, out: Path) -> None:
    from prge.engine.formats import manifest_path

    Path(args.work).mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    common = {"date": stamp, "threads": args.threads or os.cpu_count(), "rank": args.rank, "quantize": args.quantize,
              "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "qb": args.qb}

    def record(row: dict) -> None:  # one line as soon as it is measured: a long run killed half-way keeps its rows
        append_jsonl(out, {**common, **row})

    for name in args.configs:
        args.config = name
        T = CONFIGS[name]["T"]
        args.q, args.b = 1, args.qb
        if "engine-step" in args.variants:  # the peak that (a)'s GFLOP/s is read against, in the same run
            res = spawn(args, "gemm")
            print(f"[{name}] fp32 GEMM peak {res.get('gemm_gflops', float('nan')):.1f} GFLOP/s", file=sys.stderr, flush=True)
            record({"config": name, "variant": "gemm", "T": T, **res})
        for v in [v for v in args.variants if v not in PER_Q]:
            info = {}
            if v == "et-training" and (args.reexport or not manifest_path(et_program_path(args)).is_file()):
                print(f"[{name}] et-training: exporting + lowering ...", file=sys.stderr, flush=True)
                info = spawn(args, "et-export")
                if "error" in info:
                    record({"config": name, "variant": v, "q": None, "b": args.qb, "rows": args.qb, "T": T, **info})
                    continue
            res = spawn(args, v)
            if info:  # the lowering's own cost, measured in the et-export process
                res.update({"export_s": info["export_s"], "export_peak_rss_mb": info["peak_rss_mb"], "pte_mb": info["pte_mb"]})
            print(f"[{name}] {v}: {res.get('s_step', float('nan')):.4f} s/step, peak RSS {res.get('peak_rss_mb', 0):.0f} MB",
                  file=sys.stderr, flush=True)
            record({"config": name, "variant": v, "q": None, "b": args.qb, "rows": args.qb, "T": T, **res})
        for q in args.qs:
            args.q, args.b = q, args.qb // q
            info = {}
            if {"engine-step", "engine-forward"} & set(args.variants) and (
                    args.reexport or not program_path(args).is_file() or not manifest_path(program_path(args)).is_file()):
                print(f"[{name}] q={q}: exporting + lowering ...", file=sys.stderr, flush=True)
                info = spawn(args, "export")
                if "error" in info:
                    continue
                print(f"[{name}] q={q}: exported in {info['export_s']:.0f} s, peak RSS {info['peak_rss_mb']:.0f} MB, "
                      f".pte {info['pte_mb']:.1f} MB", file=sys.stderr, flush=True)
            for v in [v for v in args.variants if v in PER_Q]:
                res = spawn(args, v)
                print(f"[{name}] q={q} {v}: {res.get('s_step', float('nan')):.4f} s/step, "
                      f"peak RSS {res.get('peak_rss_mb', 0):.0f} MB", file=sys.stderr, flush=True)
                row = {"config": name, "variant": v, "q": q, "b": args.b, "rows": 2 * q * args.b, "T": T, **res}
                if info and v == "engine-step":
                    row.update({"export_s": info["export_s"], "export_peak_rss_mb": info["peak_rss_mb"], "pte_mb": info["pte_mb"]})
                record(row)


def latest(rows: list[dict]) -> dict[str, dict]:
    """{config: {(variant, q): row}}, the newest successful row of each."""
    by: dict[str, dict] = {}
    for r in rows:
        if "error" not in r:
            by.setdefault(r["config"], {})[(r["variant"], r.get("q"))] = r
    return by


def tables(rows: list[dict]) -> str:
    out = []
    for name, d in latest(rows).items():
        gemm = d.get(("gemm", None), {}).get("gemm_gflops")
        any_row = next(iter(d.values()))
        qs = sorted({q for (v, q) in d if q is not None})
        loads = [x for r in d.values() for x in r.get("load_avg_1min", [])]
        out += [f"**{name}** (T = {any_row['T']}, q·b = {any_row.get('qb', 16)}, LoRA r = {any_row['rank']} on 7 projections; "
                f"{any_row['cores']} cores, {any_row['threads']} thread(s) per process; 1-min load average "
                f"{min(loads, default=0):.1f}–{max(loads, default=0):.1f}; fp32 GEMM peak "
                f"{gemm:.1f} GFLOP/s; newest run {max(r['date'] for r in d.values())})" if gemm else f"**{name}**",
                "",
                "seconds per step, median · forward tokens per second · peak RSS MB",
                "",
                "| variant | " + " | ".join(f"q = {q} (b = {d.get(('engine-step', q), d.get(('eager-prge', q), {})).get('b', '?')})" for q in qs) + " |",
                "|---|" + "---|" * len(qs)]

        def cell(r):
            if not r:
                return "–"
            tok = r["rows"] * r["T"] / r["s_step"]
            return f"{r['s_step']:.3f} s · {tok:,.0f} tok/s · {r['peak_rss_mb']:.0f} MB"

        for v in VARIANTS:
            if v in PER_Q:
                out.append(f"| {LABELS[v]} | " + " | ".join(cell(d.get((v, q))) for q in qs) + " |")
            elif (v, None) in d:
                out.append(f"| {LABELS[v]} (16 rows, any q) | " + " | ".join([cell(d[(v, None)])] * len(qs)) + " |")
        out += ["", "| ratio (target) | " + " | ".join(f"q = {q}" for q in qs) + " |", "|---|" + "---|" * len(qs)]

        def ratio(f):
            vals = []
            for q in qs:
                try:
                    vals.append(f(q))
                except (KeyError, TypeError, ZeroDivisionError):
                    vals.append(None)
            return " | ".join("–" if x is None else x for x in vals)

        a = lambda q: d[("engine-step", q)]
        bp, et = d.get(("backprop", None)), d.get(("et-training", None))
        out.append("| (a) / (f) time (≤ 1.05) | " + ratio(lambda q: f"{a(q)['s_step'] / d[('engine-forward', q)]['s_step']:.2f}"
                                                          + (f" (paired {a(q)['paired_ratio']:.2f})" if 'paired_ratio' in a(q) else "")) + " |")
        out.append("| (c) / (a) time (≥ 1.5) | " + ratio(lambda q: f"{d[('eager-mezo', q)]['s_step'] / a(q)['s_step']:.2f}") + " |")
        out.append("| (b) dual / (a) time | " + ratio(lambda q: f"{d[('eager-prge', q)]['s_step'] / a(q)['s_step']:.2f}") + " |")
        out.append("| (a) / (f) peak RSS (≤ 1.1) | " + ratio(lambda q: f"{a(q)['peak_rss_mb'] / d[('engine-forward', q)]['peak_rss_mb']:.2f}") + " |")
        out.append("| (a) / (d) peak RSS (≤ 0.33) | " + ratio(lambda q: f"{a(q)['peak_rss_mb'] / bp['peak_rss_mb']:.2f}") + " |")
        out.append("| (a) / (e) peak RSS (≤ 0.33) | " + ratio(lambda q: f"{a(q)['peak_rss_mb'] / et['peak_rss_mb']:.2f}") + " |")
        out.append("| (a) GFLOP/s, % of GEMM peak (≥ 60%) | " + ratio(
            lambda q: f"{a(q)['gflop_step'] / a(q)['s_step']:.1f}, {100 * a(q)['gflop_step'] / a(q)['s_step'] / gemm:.0f}%") + " |")
        out.append("")
    return "\n".join(out)


def plot(rows: list[dict], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    paths = []
    for name, d in latest(rows).items():
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for v in VARIANTS:
            pts = sorted((q, r) for (vv, q), r in d.items() if vv == v and q is not None)
            if pts:
                qs = [q for q, _ in pts]
                ax1.plot(qs, [r["s_step"] for _, r in pts], "o-", label=LABELS[v])
                ax2.plot(qs, [r["peak_rss_mb"] for _, r in pts], "o-", label=LABELS[v])
            elif (v, None) in d:
                r = d[(v, None)]
                ax1.axhline(r["s_step"], ls="--", lw=1, color="gray" if v == "backprop" else "brown", label=LABELS[v])
                ax2.axhline(r["peak_rss_mb"], ls="--", lw=1, color="gray" if v == "backprop" else "brown", label=LABELS[v])
        for ax, what in ((ax1, "seconds per step"), (ax2, "peak RSS (MB)")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({q for (_, q) in d if q is not None}))
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_ylim(bottom=0)  # linear from 0: the ratios read off the plot as drawn
            ax.set_xlabel("q (queries per step), b = 16 / q")
            ax.set_ylabel(what)
            ax.grid(alpha=0.3)
        ax2.legend(fontsize=7, loc="best")
        fig.suptitle(f"{name}: one training step, q·b = 16")
        fig.tight_layout()
        p = folder / f"speed-{name}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["small"], choices=list(CONFIGS))
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--q", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--b", type=int, default=16, help=argparse.SUPPRESS)
    p.add_argument("--qs", type=int, nargs="+", default=[1, 4, 16], help="queries per step to measure (b = qb / q)")
    p.add_argument("--qb", type=int, default=16, help="examples per step times queries: q·b, fixed across q")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2·rank)")
    p.add_argument("--quantize", choices=["8da4w", "8da8w"], help="quantise the program's frozen base")
    p.add_argument("--threads", type=int, default=1, help="torch and ExecuTorch threads per process (default 1: comparable "
                   "on a shared 2-core machine; 0 = every core)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--work", default=str(Path.home() / ".cache" / "prge" / "bench"), help="where exported programs are cached")
    p.add_argument("--reexport", action="store_true", help="export again even if a cached program exists")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "speed.jsonl"))
    p.add_argument("--render", action="store_true", help="only render the tables and plots from --out")
    args = p.parse_args()
    if args.worker:
        run_worker(args)
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.render:
        measure(args, out)
    rows = [row for _, row in read_jsonl(out)]
    print(tables(rows))
    for path in plot(rows, out.parent):
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
