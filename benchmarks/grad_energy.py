#!/usr/bin/env python
"""Where the gradient of the trained LoRA-FA B matrices lives, per module kind and per layer (issue 6, part 2).

    python benchmarks/grad_energy.py                                # SmolLM2-135M, SST-2, B = 0 (the start of training)
    python benchmarks/grad_energy.py --adapter runs/.../checkpoints/last  # at a trained adapter (e.g. the ZO plateau)

A diagnostic for choosing what zeroth-order training perturbs. A random-direction estimator's
progress per step, at its best learning rate, scales with |∇_S|² / d_S for the set S of perturbed
values (d_S of them) when the curvature is about isotropic: perturbing values that carry little
gradient adds variance without signal. This script takes one backward pass of the training loss
(mean over `--n` training rows, the same rows, loss and LoRA A as `prge train --seed`) and prints,
for each module kind and each block of layers, the share of |∇|² it holds, its share of d, and the
ratio of the two (the speed-up that perturbing only that set would give under that assumption).

The curvature is not the same everywhere, so `--curvature K` (default 6) also estimates, per module
kind, tr(H_S) from forward passes only, with the estimator's own ± perturbations:
tr(H_S) ≈ mean over K Gaussian z of (L(B + εz) + L(B − εz) − 2 L(B)) / ε² (Hutchinson). On a quadratic
model one zeroth-order step with z over S decreases the loss by at most |∇_S|² / (2 tr(H_S)), at
lr = 1 / tr(H_S); the "ZO speed" column is that figure relative to perturbing every kind, and "lr
scale" is how far S's best lr sits above the full set's.
Uses the train split only. Appends one JSON line to benchmarks/results/grad_energy.jsonl.
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from prge.data.batch import collate  # noqa: E402
from prge.config import TrainConfig  # noqa: E402
from prge.io import append_jsonl  # noqa: E402
from prge.zo.lora import lora_layers  # noqa: E402
from prge.run.train import prepare  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "grad_energy.jsonl"


def mean_loss(s, rows, batch: int, grad: bool = False) -> torch.Tensor:
    """The training loss averaged over `rows` (backpropagated into the B's when `grad`)."""
    total = torch.zeros(())
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        with torch.set_grad_enabled(grad):
            loss = s.loss_fn(collate(chunk, s.pad_id), 1)[0] * len(chunk) / len(rows)
        if grad:
            loss.backward()
        total += loss.detach()
    return total


def gradients(s, rows, batch: int) -> dict[str, torch.Tensor]:
    """name -> mean gradient of the loss over `rows`, for each LoRA B (trainable: `s` was prepared with method fo)."""
    mean_loss(s, rows, batch, grad=True)
    return {name: m.lora_B.grad.detach().clone() for name, m in lora_layers(s.model).items()}


def curvature(s, rows, batch: int, groups: dict[str, list[str]], k: int, eps: float, seed: int) -> dict[str, float]:
    """group -> Hutchinson estimate of tr(H) over that group's B values, from ± perturbations (forward only)."""
    layers = lora_layers(s.model)
    base = mean_loss(s, rows, batch)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for group, names in groups.items():
        est = []
        for _ in range(k):
            zs = {n: torch.randn(layers[n].lora_B.shape, generator=gen) for n in names}
            pair = []
            for sign in (1.0, -1.0):
                for n in names:
                    layers[n].lora_B.data.add_(zs[n], alpha=sign * eps)
                pair.append(mean_loss(s, rows, batch))
                for n in names:
                    layers[n].lora_B.data.sub_(zs[n], alpha=sign * eps)
            est.append(float(pair[0] + pair[1] - 2 * base) / eps ** 2)
        out[group] = sum(est) / k
    return out


def table(grads: dict[str, torch.Tensor], key, trace: dict[str, float] | None = None) -> list[dict]:
    """Rows {group, grad share, dim share, ratio[, trace share, zo_speed, lr_scale]}, grouped by key(name),
    largest ratio first. With `trace` (group -> tr(H) estimate): zo_speed = (|∇_S|²/tr H_S) / (|∇|²/tr H)
    and lr_scale = tr H / tr H_S, both against perturbing every group."""
    e, d = defaultdict(float), defaultdict(int)
    for name, g in grads.items():
        e[key(name)] += float(g.pow(2).sum())
        d[key(name)] += g.numel()
    te, td = sum(e.values()), sum(d.values())
    rows = [{"group": k, "grad_share": e[k] / te, "dim_share": d[k] / td, "ratio": (e[k] / te) / (d[k] / td)} for k in e]
    if trace:
        tt = sum(trace.values())
        for r in rows:
            h = trace[r["group"]]
            ok = h > 0 and tt > 0  # a non-positive estimate (too few directions, or negative curvature): no figure
            r.update(trace_share=h / tt, zo_speed=r["grad_share"] / (h / tt) if ok else None, lr_scale=tt / h if ok else None)
    return sorted(rows, key=lambda r: -r["ratio"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="sst2")
    p.add_argument("--adapter", help="a checkpoint folder: take the gradient there instead of at B = 0")
    p.add_argument("--n", type=int, default=256, help="training rows the gradient is averaged over")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--layer-block", type=int, default=5, help="layers per row of the per-layer table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--curvature", type=int, default=6, help="random directions per module kind for tr(H) (0: skip)")
    p.add_argument("--eps", type=float, default=1e-2, help="perturbation scale of the tr(H) estimate (prge train's ε)")
    p.add_argument("--threads", type=int)
    args = p.parse_args()
    cfg = TrainConfig(model=args.model, task=args.task, method="fo", seed=args.seed, threads=args.threads, progress=False)
    t = time.time()
    s = prepare(cfg, adapter=args.adapter)
    rows = s.train[:args.n]
    grads = gradients(s, rows, args.batch)

    def kind(name: str) -> str:
        return name.rsplit(".", 1)[-1]

    trace = None
    if args.curvature:
        groups = defaultdict(list)
        for name in grads:
            groups[kind(name)].append(name)
        trace = curvature(s, rows, args.batch, groups, args.curvature, args.eps, args.seed)

    def block(name: str) -> str:
        m = re.search(r"layers\.(\d+)\.", name)
        k = int(m.group(1)) // args.layer_block * args.layer_block if m else -1
        return f"layers {k}-{k + args.layer_block - 1}"

    out = {"model": args.model, "task": args.task, "adapter": args.adapter, "n": args.n, "seed": args.seed,
           "grad_norm": float(sum(g.pow(2).sum() for g in grads.values()) ** 0.5),
           "by_kind": table(grads, kind, trace), "by_layers": table(grads, block), "trace": trace,
           "curvature_directions": args.curvature, "eps": args.eps,
           "minutes": (time.time() - t) / 60, "machine": platform.machine(), "date": time.strftime("%Y-%m-%d")}
    print(f"|∇B| = {out['grad_norm']:.4g} over {args.n} {args.task} training rows ({'B = 0' if not args.adapter else args.adapter})\n")
    for title, tab in (("module kind", out["by_kind"]), ("layers", out["by_layers"])):
        extra = " tr(H) share | ZO speed | lr scale |" if "zo_speed" in tab[0] else ""
        print(f"| {title} | share of |∇|² | share of d | ratio |{extra}\n|---|---|---|---|{'---|---|---|' if extra else ''}")
        for r in tab:
            more = (f" {100 * r['trace_share']:.1f}% | " + (f"{r['zo_speed']:.2f} | {r['lr_scale']:.1f} |" if r["zo_speed"] else "– | – |")
                    if extra else "")
            print(f"| {r['group']} | {100 * r['grad_share']:.1f}% | {100 * r['dim_share']:.1f}% | {r['ratio']:.2f} |{more}")
        print()
    if trace:
        print(f"tr(H) over all B values ≈ {sum(trace.values()):.4g} ({args.curvature} directions per kind, ε = {args.eps})")
    append_jsonl(RESULTS, out)


if __name__ == "__main__":
    main()
