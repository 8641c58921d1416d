"""Quantised device programs (8da8w, 8da4w) against the fp32 program: size, step time, ε, accuracy.

    python benchmarks/quantized.py export [--model smollm2-135m] [--quantize none 8da8w 8da4w] [--methods train|all]
    python benchmarks/quantized.py eps    [--eps 1e-3 1e-2 3e-2] [--batches 6]
    python benchmarks/quantized.py eps-eager [--eps ...] [--batches 6]
    python benchmarks/quantized.py train  [--seeds 0 1] [--steps 300] [--native]
    python benchmarks/quantized.py zero-shot-eager [--quantize none 8da8w 8da4w 8da4w-affine]
    python benchmarks/quantized.py train-eager [--quantize none 8da4w 8da4w-affine] [--seeds 0 1] [--steps 300]
    (common: --dir ~/.cache/prge/bench/quantized --threads 1 --q 4 --batch-size 4 --max-length 64 --n-dev 200
     --template 'Review: {sentence}\\nSentiment:')

export: what `prge export` does, for the model on SST-2 with the earlier prompt, once per
        quantisation (kept and reused), recording export seconds and program bytes.
eps:    train_step's time per program (median of the calls below after the first, "kind": "step"); and
        for the same batches, the same step key (so the same z) and a clean B, the 2q losses of
        each program at each ε: |L+ − L−| of the fp32 program (the signal) against the error the
        quantised base adds to it (the noise floor), their ratio, and the correlation and sign
        agreement of the quantised g with the fp32 g.
train:  `prge device-train` (Python loop) per program and seed, resumable (rerun the same command
        after a kill); step time is the mean per-step "seconds" of metrics.jsonl after 2 warm-up
        steps, tokens/s counts the 2q·b·T token positions a step runs, accuracy is the dev
        accuracy after the last step.
zero-shot-eager: the untrained model's dev and test accuracy with its base quantised as `prge export
        --quantize` quantises it (`prge.engine.export._quantize`), in eager PyTorch with torchao's
        reference kernels (within ~3e-3 of XNNPACK's outputs per linear): minutes, no export.
        `8da4w-affine` is 8da4w with max-abs group scales, what `prge export` used before HQQ's.
train-eager: `prge train` (the eager trainer, no readout) on that quantised base, per variant and
        seed, resumable: the accuracy question of `train` without the hour of export per program.

Every row is appended to benchmarks/results/quantized.jsonl with the machine and date.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "quantized.jsonl"
sys.path.insert(0, str(ROOT))


def machine() -> dict:
    return {"cpu": platform.machine(), "cores": os.cpu_count(), "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "load_avg_1min": os.getloadavg()[0]}


def record(row: dict) -> None:
    row = {**row, **machine()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def prge(*args: str, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "prge", *args], check=True, env=env)


def program_path(a, quant: str) -> Path:
    return Path(a.dir).expanduser() / f"{a.model}-{quant}-q{a.q}b{a.batch_size}T{a.max_length}-{a.methods}.pte"


def cmd_export(a) -> None:
    """Export with the Python API (`prge export` does the same with every method); `--methods train`
    exports only train_step, enough for `eps` and a third of the export time of the full program."""
    import torch

    from prge.config import TrainConfig
    from prge.engine.export import export_program
    from prge.engine.formats import QUANTIZED_DEFAULT_EPS, write_dataset
    from prge.run.train import prepare

    torch.set_num_threads(a.threads)
    for quant in a.quantize:
        out = program_path(a, quant)
        if out.is_file() and Path(str(out) + ".json").is_file():
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        cfg = TrainConfig(model=a.model, task="sst2", template=a.template, q=a.q, batch_size=a.batch_size,
                          max_length=a.max_length, n_dev=a.n_dev, threads=a.threads, progress=False)
        s = prepare(cfg)
        methods = ("train_step",) if a.methods == "train" else ("train_step", "read_state", "read_raw", "write_raw", "evaluate")
        t0 = time.time()
        m = export_program(s.model, s.tokenizer, s.label_ids, q=a.q, batch_size=a.batch_size, max_length=a.max_length,
                           quantize=None if quant == "none" else quant, out_path=out, model_name=a.model, methods=methods,
                           run_defaults={"eps": cfg.eps if quant == "none" else max(cfg.eps, QUANTIZED_DEFAULT_EPS), "lr": cfg.lr,
                                         "seed": cfg.seed}, log=print)
        export_s = time.time() - t0
        write_dataset(Path(str(out).removesuffix(".pte") + ".data.safetensors"), s, m)
        record({"kind": "export", "model": a.model, "quantize": quant, "methods": list(methods), "export_s": export_s,
                "program_mb": m["program_bytes"] / 1e6, "q": a.q, "b": a.batch_size, "T": a.max_length,
                "threads": a.threads})


def cmd_eps(a) -> None:
    import torch

    from prge.data.batch import step_indices
    from prge.engine.formats import load_manifest, read_dataset
    from prge.engine.runtime import Engine, split_rows

    torch.set_num_threads(a.threads)
    progs = {quant: program_path(a, quant) for quant in a.quantize}
    manifests = {k: load_manifest(p) for k, p in progs.items()}
    tensors, meta = read_dataset(Path(str(progs["none"]).removesuffix(".pte") + ".data.safetensors"))
    q, b = manifests["none"]["q"], manifests["none"]["batch_size"]
    # all programs loaded at once and called in turn, so a load change on a shared machine hits each alike
    engines = {quant: Engine(path, manifests[quant]) for quant, path in progs.items()}
    losses, times = {}, {quant: [] for quant in progs}  # losses: (quant, eps, batch) -> (2q,)
    for eps in a.eps:
        for k in range(1, a.batches + 1):
            # the data file stores ids compactly (int32); split_rows gives the dtypes the methods take
            batch = split_rows(tensors, "train", step_indices(meta["n_train"], b, 0, k))
            key = torch.tensor([0, k])
            for quant, engine in engines.items():
                # g = 0: the pending update is a no-op, so every call perturbs the same clean (initial) B
                t0 = time.perf_counter()
                losses[quant, eps, k] = engine("train_step", *batch, torch.tensor([0.0]), torch.tensor([eps]),
                                               torch.zeros(q), key)[0].double()
                times[quant].append(time.perf_counter() - t0)
    for quant, ts in times.items():
        m = manifests[quant]
        step_s = sorted(ts[1:])[len(ts[1:]) // 2]  # median, after the first (warm-up) call
        record({"kind": "step", "model": a.model, "quantize": quant, "program_mb": m["program_bytes"] / 1e6,
                "step_s": step_s, "step_s_all": ts, "tokens_per_s": 2 * q * b * m["max_length"] / step_s,
                "q": q, "b": b, "T": m["max_length"], "threads": a.threads})
    summarise_eps(a, losses, q, "program")


def summarise_eps(a, losses: dict, q: int, numerics: str, eps_values=None) -> None:
    import torch

    for eps in eps_values or a.eps:
        ref = torch.stack([losses["none", eps, k] for k in range(1, a.batches + 1)])
        d_ref = ref[:, :q] - ref[:, q:]
        for quant in a.quantize:
            if quant == "none":
                continue
            x = torch.stack([losses[quant, eps, k] for k in range(1, a.batches + 1)])
            d = x[:, :q] - x[:, q:]
            err = (d - d_ref).abs()
            g, g_ref = d.flatten(), d_ref.flatten()
            record({"kind": "eps", "numerics": numerics, "model": a.model, "quantize": quant, "eps": eps, "batches": a.batches, "q": q,
                    "mean_abs_dL_fp32": float(d_ref.abs().mean()), "mean_abs_dL_quant": float(d.abs().mean()),
                    "mean_abs_dL_error": float(err.mean()), "signal_over_noise": float(d_ref.abs().mean() / err.mean()),
                    "g_corr": float(torch.corrcoef(torch.stack([g, g_ref]))[0, 1]),
                    "sign_agree": float(((g > 0) == (g_ref > 0)).double().mean()),
                    "mean_abs_loss_shift": float((x - ref).abs().mean())})


def cmd_eps_eager(a) -> None:
    """The `eps` comparison without exporting: the same torchao quantisation of the base
    (prge.engine.export._quantize) run in eager PyTorch, so its int8 activation rounding is
    torchao's reference kernels' rather than XNNPACK's. Minutes instead of the hour of lowering."""
    import copy

    import torch

    from prge.data.batch import collate, step_indices
    from prge.run.train import prepare
    from prge.zo import estimator as est
    from prge.zo.loss import copy_losses
    from prge.zo.step import perturbed_losses
    from prge.zo.lora import trainable_b

    torch.set_num_threads(a.threads)
    cfg = eager_config(a)  # readout 0: this compares losses only, nothing is trained
    s = prepare(cfg)
    models = {quant: s.model if quant == "none" else quantizer(quant)(copy.deepcopy(s.model)) for quant in a.quantize}
    q = a.q
    losses = {}
    for eps in a.eps:
        for k in range(1, a.batches + 1):
            batch = collate([s.train[i] for i in step_indices(len(s.train), a.batch_size, 0, k)], s.pad_id, a.max_length, 1)
            key = torch.tensor([0, k])
            for quant, model in models.items():
                params = trainable_b(model)
                zs = [est.query_noise(key, j, q, tuple(p.shape)) for j, p in enumerate(params)]
                with torch.no_grad():
                    losses[quant, eps, k] = perturbed_losses(
                        model, params, zs, lambda b, c, m=model: copy_losses(m, b, c, s.label_ids, "class"), batch, eps).double()
        summarise_eps(a, losses, q, "eager-torchao", [eps])  # rows as each eps finishes


def quantizer(variant: str):
    """The in-place base change for a --quantize value: none, 8da8w, 8da4w, or 8da4w-affine."""
    from prge.engine.export import _quantize

    if variant == "none":
        return lambda model: model
    mode, _, qparams = variant.partition("-")
    return lambda model: _quantize(model, mode, **({"int4_qparams": qparams} if qparams else {}))


def eager_config(a, **kw):
    """The eager run's TrainConfig: the programs' shapes, and a built-in model's own lr as `prge train` gives it."""
    from prge.config import TrainConfig
    from prge.models.builtin import builtin_lr

    if builtin_lr(a.model) is not None:
        kw.setdefault("lr", builtin_lr(a.model))
    return TrainConfig(model=a.model, task="sst2", template=a.template, q=a.q, batch_size=a.batch_size,
                       max_length=a.max_length, n_dev=a.n_dev, threads=a.threads, progress=False, readout=0, **kw)


def cmd_zero_shot_eager(a) -> None:
    import copy

    import torch

    from prge.run.train import prepare

    torch.set_num_threads(a.threads)
    s = prepare(eager_config(a))
    for variant in a.quantize:
        t0 = time.time()
        model = quantizer(variant)(copy.deepcopy(s.model))
        s_q = dataclasses.replace(s, model=model)
        dev, test = (s_q.evaluate(items)["accuracy"] for items in (s.dev, s.test))
        record({"kind": "zero-shot-eager", "model": a.model, "quantize": variant, "dev": dev, "test": test, "n_dev": len(s.dev),
                "n_test": len(s.test), "template": a.template, "seconds": time.time() - t0, "threads": a.threads})


def cmd_train_eager(a) -> None:
    from prge.engine.formats import QUANTIZED_DEFAULT_EPS
    from prge.run.train import run

    for seed in a.seeds:
        for variant in a.quantize:
            # the programs' recorded ε (fp32's 1e-2, a quantised one's 3e-2), or --train-eps for every variant
            eps = a.train_eps or (1e-2 if variant == "none" else QUANTIZED_DEFAULT_EPS)
            out = Path(a.dir).expanduser() / f"eager-{a.model}-{variant}-s{seed}-{a.steps}-eps{eps:g}"
            if (out / "summary.json").is_file():
                continue
            resume = (out / "checkpoints" / "last").is_dir()
            cfg = eager_config(a, steps=a.steps, eval_every=a.eval_every, checkpoint_every=10, seed=seed, eps=eps,
                               out=None if resume else str(out), resume=str(out) if resume else None)
            s = run(cfg, base=quantizer(variant))
            record({"kind": "train-eager", "model": a.model, "quantize": variant, "seed": seed, "steps": a.steps, "eps": eps,
                    "lr": cfg.lr, "best_dev": s["best_dev"], "best_step": s["best_step"], "test_before": s["test_before"],
                    "test_after_last": s["test_after_last"], "test_after_best": s["test_after_best"], "n_dev": a.n_dev,
                    "threads": a.threads, "template": a.template, "resumed": resume, "minutes": s.get("minutes")})


def cmd_train(a) -> None:
    from prge.engine.formats import min_eps

    for seed in a.seeds:
        for quant in a.quantize:
            prog = program_path(a, quant)
            loop = "native" if a.native else "python"
            # a quantised program trains at ε >= its floor (programs exported before a floor was raised recorded less)
            manifest = json.loads(Path(str(prog) + ".json").read_text())
            eps = max(manifest.get("run_defaults", {}).get("eps", 1e-2), min_eps(manifest))
            out = Path(a.dir).expanduser() / f"run-{prog.stem}-s{seed}-{a.steps}-{loop}-eps{eps:g}"
            if (out / "summary.json").is_file():
                continue
            resume = ["--resume"] if (out / "checkpoints" / "last").is_dir() else []
            prge("device-train", "--program", str(prog), "--out", str(out), "--steps", str(a.steps), "--seed", str(seed),
                 "--eps", str(eps),
                 "--eval-every", str(a.eval_every), "--checkpoint-every", "10", "--no-progress", *resume, *(["--native"] if a.native else []),
                 threads=a.threads)
            s = json.loads((out / "summary.json").read_text())
            m = json.loads(Path(str(prog) + ".json").read_text())
            secs = [r["seconds"] for r in (json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines())
                    if "seconds" in r and "split" not in r][2:]
            step_s = sum(secs) / max(1, len(secs))
            record({"kind": "train", "model": a.model, "quantize": quant, "loop": loop, "seed": seed, "steps": a.steps, "eps": eps,
                    "lr": s.get("lr"), "program_mb": m["program_bytes"] / 1e6, "step_s": step_s,
                    "tokens_per_s": 2 * m["q"] * m["batch_size"] * m["max_length"] / step_s, "dev_before": s["dev_before"],
                    "dev_after": s["dev_after"], "best_dev": s["best_dev"], "n_dev": a.n_dev, "threads": a.threads,
                    "template": a.template, "resumed": bool(resume), "peak_rss_mb": s.get("peak_rss_mb"),
                    # the label readout fitted after the steps: the dev accuracy of the adapter the run delivers
                    "readout_dev_after": (s.get("readout") or {}).get("dev_after")})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["export", "eps", "eps-eager", "train", "zero-shot-eager", "train-eager"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", choices=["train", "all"], default="all", help="train: train_step only (for eps)")
    p.add_argument("--quantize", nargs="+", default=["none", "8da8w", "8da4w"])
    p.add_argument("--dir", default="~/.cache/prge/bench/quantized")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--q", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--n-dev", type=int, default=200)
    p.add_argument("--template", default="Review: {sentence}\nSentiment:")
    p.add_argument("--eps", type=float, nargs="+", default=[1e-3, 1e-2, 3e-2])
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--train-eps", type=float, help="train-eager: this ε for every variant instead of the programs' own (1e-2 fp32, 3e-2 quantised)")
    p.add_argument("--native", action="store_true", help="train with the C++ runner (prge device-train --native)")
    a = p.parse_args()
    {"export": cmd_export, "eps": cmd_eps, "eps-eager": cmd_eps_eager, "train": cmd_train,
     "zero-shot-eager": cmd_zero_shot_eager, "train-eager": cmd_train_eager}[a.what](a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
