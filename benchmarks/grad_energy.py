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

from prge.batch import collate  # noqa: E402
from prge.config import TrainConfig  # noqa: E402
from prge.io import append_jsonl  # noqa: E402
from prge.lora import lora_layers  # noqa: E402
from prge.train import prepare  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "grad_energy.jsonl"


def gradients(cfg: TrainConfig, adapter: str | None, n: int, batch: int) -> dict[str, torch.Tensor]:
    """name -> mean gradient of the loss over the first n training rows, for each LoRA B."""
    s = prepare(cfg, adapter=adapter)
    for p in s.params:
        p.requires_grad_(True)
    rows = s.train[:n]
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        loss = s.loss_fn(collate(chunk, s.pad_id), 1)[0] * len(chunk) / len(rows)
        loss.backward()
    return {name: m.lora_B.grad.detach().clone() for name, m in lora_layers(s.model).items()}


def table(grads: dict[str, torch.Tensor], key) -> list[dict]:
    """Rows {group, grad share, dim share, ratio}, grouped by key(name), largest ratio first."""
    e, d = defaultdict(float), defaultdict(int)
    for name, g in grads.items():
        e[key(name)] += float(g.pow(2).sum())
        d[key(name)] += g.numel()
    te, td = sum(e.values()), sum(d.values())
    rows = [{"group": k, "grad_share": e[k] / te, "dim_share": d[k] / td, "ratio": (e[k] / te) / (d[k] / td)} for k in e]
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
    p.add_argument("--threads", type=int)
    args = p.parse_args()
    cfg = TrainConfig(model=args.model, task=args.task, method="fo", seed=args.seed, threads=args.threads, progress=False)
    t = time.time()
    grads = gradients(cfg, args.adapter, args.n, args.batch)

    def kind(name: str) -> str:
        return name.rsplit(".", 1)[-1]

    def block(name: str) -> str:
        m = re.search(r"layers\.(\d+)\.", name)
        k = int(m.group(1)) // args.layer_block * args.layer_block if m else -1
        return f"layers {k}-{k + args.layer_block - 1}"

    out = {"model": args.model, "task": args.task, "adapter": args.adapter, "n": args.n, "seed": args.seed,
           "grad_norm": float(sum(g.pow(2).sum() for g in grads.values()) ** 0.5),
           "by_kind": table(grads, kind), "by_layers": table(grads, block),
           "minutes": (time.time() - t) / 60, "machine": platform.machine(), "date": time.strftime("%Y-%m-%d")}
    print(f"|∇B| = {out['grad_norm']:.4g} over {args.n} {args.task} training rows ({'B = 0' if not args.adapter else args.adapter})\n")
    for title, rows in (("module kind", out["by_kind"]), ("layers", out["by_layers"])):
        print(f"| {title} | share of |∇|² | share of d | ratio |\n|---|---|---|---|")
        for r in rows:
            print(f"| {r['group']} | {100 * r['grad_share']:.1f}% | {100 * r['dim_share']:.1f}% | {r['ratio']:.2f} |")
        print()
    append_jsonl(RESULTS, out)


if __name__ == "__main__":
    main()
