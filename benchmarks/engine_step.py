#!/usr/bin/env python
"""CPU step time and peak memory of the whole P-RGE step inside ExecuTorch vs eager PyTorch.

For each model configuration, each of these runs in its own subprocess (so its peak RSS,
`ru_maxrss`, is its own; about 350 MB of any figure is importing torch and executorch):

  engine-step     the exported `train_step` (prge.export, XNNPACK): rebuild B, apply the pending
                  update, draw counter noise, write the 2q copies, one forward of 2q·b rows
  engine-forward  `forward_losses` of the same program: only the batched forward of 2q·b rows over
                  the copies (no noise, no update) — the step's overhead is engine-step / this.
                  The engine-step worker also runs this forward right after every step and reports
                  the median of the per-pair ratios ("paired"), which load on a shared machine
                  skews less than the ratio of two separate runs
  eager-prge      prge.zo.prge_step (dual): the same step in eager PyTorch
  eager-mezo      prge.zo.mezo_step: q sequential (+, −) pairs of forwards of b rows (MeZO)

All at the same q, b and sequence length T (full-length random token ids, classification loss over
2 label words, LoRA-FA rank 8 / alpha 16 on all 7 projections, random weights: speed does not
depend on the values). `--warmup` untimed steps, then `--steps` timed ones; the median is reported.
Exporting + lowering is done once per configuration in a subprocess of its own (not timed as a
step; its wall time is reported as `export_s`), and the program is cached under --work.

    python benchmarks/engine_step.py                       # tiny and small (21M) configurations
    python benchmarks/engine_step.py --configs smollm2     # SmolLM2-135M (lowering takes minutes)

Prints a markdown table and appends JSON lines to benchmarks/results/engine_step.jsonl.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIGS = {
    # prge.testing.tiny_model("llama"): 2 layers, hidden 64, vocab ~500
    "tiny": {"kind": "tiny", "T": 64},
    # the notes' 21M Llama: hidden 512, 4 layers, vocab 8192
    "small": {"kind": "llama", "T": 128, "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 4,
              "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 8192},
    "smollm2": {"kind": "builtin", "name": "smollm2-135m", "T": 128},
}
VARIANTS = ("engine-step", "engine-forward", "eager-prge", "eager-mezo")


def build(name: str, rank: int):
    """(model with MP-LoRA, tokenizer, label_ids)."""
    import torch

    from prge.lora import add_lora
    from prge.testing import tiny_model, tiny_tokenizer

    spec = CONFIGS[name]
    if spec["kind"] == "tiny":
        model, tok = tiny_model("llama")
    elif spec["kind"] == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        tok = tiny_tokenizer()
        cfg = LlamaConfig(**{k: v for k, v in spec.items() if k not in ("kind", "T")}, max_position_embeddings=512,
                          tie_word_embeddings=True, use_cache=False, pad_token_id=None, bos_token_id=None,
                          eos_token_id=tok.eos_token_id)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = LlamaForCausalLM._from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
    else:
        from prge.models import load_model

        model, tok = load_model(spec["name"])
    add_lora(model, rank=rank, alpha=2.0 * rank, seed=0)
    label_ids = torch.tensor([5, 7])
    return model, tok, label_ids


def batch(name: str, b: int, vocab: int):
    import torch

    from prge.batch import Batch

    T = CONFIGS[name]["T"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (b, T), generator=g)
    pos = torch.full((b, 1), T - 2, dtype=torch.long)
    return Batch(ids, pos, ids[:, T - 1:].clone(), torch.ones(b, 1), torch.randint(0, 2, (b,), generator=g))


def program_path(args) -> Path:
    return Path(args.work) / f"{args.config}-q{args.q}-b{args.b}-r{args.rank}-{args.quantize or 'fp32'}.pte"


def worker_export(args) -> dict:
    from prge.export import export_program

    model, tok, label_ids = build(args.config, args.rank)
    t = time.time()
    export_program(model, tok, label_ids, q=args.q, batch_size=args.b, max_length=CONFIGS[args.config]["T"],
                   loss="class", quantize=args.quantize, out_path=program_path(args), model_name=args.config,
                   methods=("train_step", "forward_losses"), log=lambda m: print(m, file=sys.stderr, flush=True))
    return {"export_s": time.time() - t, "pte_mb": program_path(args).stat().st_size / 1e6}


def worker_engine(args, method: str) -> tuple[list[float], list[float]]:
    import torch
    from executorch.runtime import Runtime

    from prge import estimator as est

    manifest = json.loads(Path(str(program_path(args)) + ".json").read_text())
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

    from prge.lora import trainable_b
    from prge.loss import copy_losses
    from prge.zo import mezo_step, prge_step

    model, tok, label_ids = build(args.config, args.rank)
    params = trainable_b(model)
    bt = batch(args.config, args.b, model.config.vocab_size)

    def loss_fn(b, copies):
        return copy_losses(model, b, copies, label_ids, "class")

    step_fn = prge_step if kind == "prge" else mezo_step
    times = []
    with torch.no_grad():
        for step in range(1, args.warmup + args.steps + 1):
            t = time.perf_counter()
            step_fn(model, params, loss_fn, bt, step, seed=0, q=args.q, eps=1e-2, lr=1e-3)
            if step > args.warmup:
                times.append(time.perf_counter() - t)
    return times


def set_threads(n: int | None) -> None:
    """Pin torch's and the ExecuTorch threadpool's thread counts (default: both use every core).

    With another busy process on a 2-core machine, 2 threads per side make every parallel region wait
    for a descheduled thread (eager elementwise ops ran ~50× slower under such load); 1 thread keeps
    the comparison meaningful there."""
    if not n:
        return
    import torch

    torch.set_num_threads(n)
    try:
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

        _unsafe_reset_threadpool(n)
    except ImportError:
        pass


def run_worker(args) -> None:
    set_threads(args.threads)
    load_before = os.getloadavg()[0]
    if args.worker == "export":
        out = worker_export(args)
    else:
        fn = {"engine-step": lambda: worker_engine(args, "train_step"),
              "engine-forward": lambda: worker_engine(args, "forward_losses"),
              "eager-prge": lambda: (worker_eager(args, "prge"), []),
              "eager-mezo": lambda: (worker_eager(args, "mezo"), [])}[args.worker]
        times, fwd = fn()
        out = {"s_step": statistics.median(times), "s_all": times}
        if fwd:
            out["paired_ratio"] = statistics.median(a / b for a, b in zip(times, fwd))
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["load_avg_1min"] = [load_before, os.getloadavg()[0]]  # > cores: other processes competed
    print("RESULT " + json.dumps(out), flush=True)


def spawn(args, worker: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", worker, "--config", args.config, "--q", str(args.q), "--b", str(args.b),
           "--rank", str(args.rank), "--steps", str(args.steps), "--warmup", str(args.warmup), "--work", args.work]
    if args.quantize:
        cmd += ["--quantize", args.quantize]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if r.returncode != 0 or line is None:
        raise SystemExit(f"{worker} on {args.config} failed:\n{r.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["tiny", "small"], choices=list(CONFIGS))
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--q", type=int, default=2, help="queries per step")
    p.add_argument("--b", type=int, default=4, help="examples per step")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2·rank)")
    p.add_argument("--quantize", choices=["8da4w", "8da8w"], help="quantise the program's frozen base")
    p.add_argument("--threads", type=int, help="torch and ExecuTorch threads (default: every core); use 1 on a busy machine")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--work", default=str(Path.home() / ".cache" / "prge" / "bench"), help="where exported programs are cached")
    p.add_argument("--reexport", action="store_true", help="export again even if a cached program exists")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "engine_step.jsonl"))
    args = p.parse_args()
    if args.worker:
        run_worker(args)
        return
    Path(args.work).mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    rows = []
    for name in args.configs:
        args.config = name
        T = CONFIGS[name]["T"]
        info = {}
        if args.reexport or not program_path(args).is_file() or not Path(str(program_path(args)) + ".json").is_file():
            print(f"[{name}] exporting + lowering ...", file=sys.stderr, flush=True)
            info = spawn(args, "export")
            print(f"[{name}] exported in {info['export_s']:.0f} s, peak RSS {info['peak_rss_mb']:.0f} MB, "
                  f".pte {info['pte_mb']:.1f} MB", file=sys.stderr, flush=True)
        res = {}
        for v in args.variants:
            res[v] = spawn(args, v)
            print(f"[{name}] {v}: {res[v]['s_step']:.4f} s/step, peak RSS {res[v]['peak_rss_mb']:.0f} MB",
                  file=sys.stderr, flush=True)
        for v, r in res.items():
            row = {"date": stamp, "config": name, "variant": v, "q": args.q, "b": args.b, "T": T, "rank": args.rank,
                   "quantize": args.quantize, "s_step": r["s_step"], "s_all": r["s_all"], "peak_rss_mb": r["peak_rss_mb"],
                   "threads": args.threads or os.cpu_count(), "load_avg_1min": r["load_avg_1min"],
                   "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
            if "paired_ratio" in r:
                row["paired_step_over_forward"] = r["paired_ratio"]
            if info:
                row.update({"export_s": info["export_s"], "export_peak_rss_mb": info["peak_rss_mb"], "pte_mb": info["pte_mb"]})
            rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(table(rows, args))


def table(rows: list[dict], args) -> str:
    by = {}
    for r in rows:
        by.setdefault(r["config"], {})[r["variant"]] = r

    def cell(d, v):
        r = d.get(v)
        return "–" if r is None else f"{r['s_step']:.4f} ({r['peak_rss_mb']:.0f})"

    loads = [x for r in rows for x in r["load_avg_1min"]]
    lines = [f"q = {args.q}, b = {args.b}, rank {args.rank}{', ' + args.quantize if args.quantize else ''}; "
             f"seconds per step, median (peak RSS MB); {os.cpu_count()} CPU cores, {args.threads or os.cpu_count()} "
             f"thread(s); 1-min load average {min(loads):.1f}–{max(loads):.1f} during the runs",
             "",
             "| config | T | engine step | engine forward only | step / forward | eager P-RGE | eager MeZO (sequential) |",
             "|---|---|---|---|---|---|---|"]
    for name, d in by.items():
        ratio = (f"{d['engine-step']['s_step'] / d['engine-forward']['s_step']:.2f}"
                 if "engine-step" in d and "engine-forward" in d else "–")
        if "paired_step_over_forward" in d.get("engine-step", {}):
            ratio += f" (paired {d['engine-step']['paired_step_over_forward']:.2f})"
        T = next(iter(d.values()))["T"]
        lines.append(f"| {name} | {T} | {cell(d, 'engine-step')} | {cell(d, 'engine-forward')} | {ratio} | "
                     f"{cell(d, 'eager-prge')} | {cell(d, 'eager-mezo')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
