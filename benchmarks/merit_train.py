#!/usr/bin/env python
"""Short P-RGE runs with a candidate frozen A in place of the random one: the measured side of merit.py.

    python benchmarks/merit_train.py --cand act_pca --lr 1e-4 --task sst2 --template 'Review: {sentence}\\nSentiment:'

Builds the model exactly as `prge train` does (prepare: LoRA-FA r 16 / alpha 32 on the 7
projections, A drawn with --seed), then overwrites every layer's A with the candidate's A
(computed as benchmarks/merit.py computes it, from the same fit rows), and drives `prge.zo.step.prge_step`
with prge's own batching (`step_indices`, `collate`) and evaluation: the same seed, data order,
noise and step arithmetic as `prge train`, only A differs. `--precondition` multiplies z by
sqrt(D) (a per-element diagonal preconditioner read from a file; the update is then lr·D·ĝ).
Appends one JSON line per dev evaluation (step, dev loss, dev accuracy, seconds) to --out as it
goes, and one summary line at the end.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.merit import (activation_pca, channel_a, generic_text, lm_gradients_generic, match_norm,  # noqa: E402
                              random_a, svd_a)
from prge.data.batch import collate, step_indices  # noqa: E402
from prge.config import TrainConfig  # noqa: E402
from prge.io import append_jsonl  # noqa: E402
from prge.zo.lora import lora_layers  # noqa: E402
from prge.run.train import prepare  # noqa: E402
from prge.zo.step import prge_step  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "merit_curves.jsonl"


def candidate(s, name: str, fit_rows, rank: int, saved: str | None = None) -> list[torch.Tensor]:
    """The candidate's A: from merit.py's saved candidates.pt when given and present, else computed."""
    if saved and Path(saved).is_file():
        cands = torch.load(saved)
        cands = cands.get("cands", cands)  # merit.py's generic-text file holds {"cands": ..., "info": ...}
        if name in cands:
            return cands[name]
    ref = random_a(s.model, rank, 0)
    if name.startswith("random_seed"):
        return random_a(s.model, rank, int(name[len("random_seed"):]))
    if name == "act_pca":
        return match_norm(activation_pca(s, fit_rows, rank), ref)
    if name in ("generic_grad_svd", "generic_channel_mask"):
        ids, _ = generic_text(s.tokenizer, 32, 128)
        grads = lm_gradients_generic(s, ids)
        return match_norm((svd_a if name == "generic_grad_svd" else channel_a)(grads, rank), ref)
    raise SystemExit(f"unknown candidate {name}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cand", required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--task", default="sst2")
    p.add_argument("--template")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--n-dev", type=int, default=500)
    p.add_argument("--fit", default="768:896", help="training rows (slice) the data-dependent A is fitted on, as merit.py's")
    p.add_argument("--targets", nargs="+", help="projections to wrap (default: all 7); a candidate A is then only for those")
    p.add_argument("--saved", help="merit.py's runs/merit/<tag>/candidates.pt (the A's it scored), or its "
                   "runs/merit/generic-<model>-32x128-r16.pt (generic_grad_svd / _gev / generic_channel_mask)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(task=args.task, template=args.template.replace("\\n", "\n") if args.template else None, method="prge",
                      seed=args.seed, lr=args.lr, steps=args.steps, n_dev=args.n_dev, threads=args.threads, progress=False,
                      targets=args.targets)
    s = prepare(cfg)
    lo, hi = (int(x) for x in args.fit.split(":"))
    t = time.time()
    a = candidate(s, args.cand, s.train[lo:hi], cfg.rank, args.saved)
    with torch.no_grad():
        for m, ai in zip(lora_layers(s.model).values(), a):
            m.lora_A.copy_(ai)
    prep_s = time.time() - t
    tag = {"task": s.data_name, "template": cfg.template, "cand": args.cand, "targets": args.targets, "lr": args.lr, "seed": args.seed, "steps": args.steps,
           "q": cfg.q, "b": cfg.batch_size, "eps": cfg.eps, "n_dev": len(s.dev), "threads": args.threads,
           "machine": f"{platform.machine()} {platform.node()}", "date": time.strftime("%Y-%m-%d %H:%M")}
    out = Path(args.out)
    ev = s.evaluate(s.dev)
    append_jsonl(out, {**tag, "step": 0, "dev_loss": ev["loss"], "dev_acc": ev["accuracy"], "seconds": 0.0, "prep_seconds": prep_s})
    print(f"{args.cand} lr {args.lr}: step 0 dev loss {ev['loss']:.4f} acc {ev['accuracy']:.3f}", flush=True)
    t0 = time.time()
    curve = [(0, ev["loss"], ev["accuracy"])]
    for step in range(1, args.steps + 1):
        batch = collate([s.train[i] for i in step_indices(len(s.train), cfg.batch_size, cfg.seed, step)], s.pad_id)
        prge_step(s.model, s.params, s.loss_fn, batch, step, seed=cfg.seed, q=cfg.q, eps=cfg.eps, lr=args.lr, mode=cfg.mode)
        if step % args.eval_every == 0 or step == args.steps:
            ev = s.evaluate(s.dev)
            curve.append((step, ev["loss"], ev["accuracy"]))
            append_jsonl(out, {**tag, "step": step, "dev_loss": ev["loss"], "dev_acc": ev["accuracy"], "seconds": time.time() - t0})
            print(f"{args.cand} lr {args.lr}: step {step} dev loss {ev['loss']:.4f} acc {ev['accuracy']:.3f} [{time.time() - t0:.0f} s]", flush=True)
    append_jsonl(out, {**tag, "summary": True, "curve": curve, "minutes": (time.time() - t0) / 60, "prep_seconds": prep_s})


if __name__ == "__main__":
    main()
