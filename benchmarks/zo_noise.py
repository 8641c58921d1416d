#!/usr/bin/env python
"""Zeroth-order runs against exact-gradient SGD at the same cumulative learning rate (issue 6, part 2).

    python benchmarks/zo_noise.py \\
        --reference runs/sweep/method-fo_optimizer-sgd_lr-0.003-* runs/sweep/method-fo_optimizer-sgd_lr-0.03-* \\
        --zo runs/sweep/lr-0.003_steps-2000-* runs/sweep/lr-0.0015_steps-1000-* runs/sweep/lr-0.006_lr_schedule-linear-*

The run folders come from `benchmarks/sst2_probe.py` (docs/evidence.md part 2 has the commands): the
references are `method=fo optimizer=sgd` runs of the same adapter, data order and batch, so their
dev curve is where the zeroth-order runs would be with a noise-free estimate. Both are read
against S, the summed learning rate of the steps so far (Σ lr_t): the expected zeroth-order step is
lr·∇, so at small lr both follow the same gradient flow and differ only by the estimate's noise.

The noise model the table is read with (a quadratic loss, Gaussian directions): each step's random
part adds, in expectation, ½·lr²·|g_b|²·tr(H)/q to the loss, where |g_b| is the gradient of the
step's b-row batch (E[g_i²] = |g_b|², g_i = (L⁺ − L⁻)/2ε), tr(H) the curvature summed over the
perturbed values (`benchmarks/grad_energy.py`, ~37 here) and q the queries. Summed over the S/lr
steps that take the flow to S, the excess over the flow is about κ·lr·S with κ = ½·|g_b|²·tr(H)/q —
until the stiffest directions settle, which makes it an upper estimate. The "κ measured" column is
(ZO loss − reference loss)/(mean lr · S) at each evaluation; "κ model" uses the run's own g_i².

The projection then asks what a zeroth-order run would need to reach the reference's accuracy
target: S* where the reference first reaches it, and the lr that keeps the excess at S* under
`--excess`: steps = S*/lr, minutes = steps × `--step-seconds` (P-RGE q = 4, b = 4 on SmolLM2-135M,
quiet 2-core machine, 2 threads: 1.3 s). Appends one JSON line to benchmarks/results/zo_noise.jsonl.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from prge.io import append_jsonl, read_jsonl  # noqa: E402
from prge.zo.schedule import lr_at  # noqa: E402

TWO_OVER_PI = 2 / 3.141592653589793


def load(run: Path) -> dict:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    rows = [r for _, r in read_jsonl(run / "metrics.jsonl")]
    cum, s = {0: 0.0}, 0.0
    for step in range(1, max([r["step"] for r in rows] + [0]) + 1):
        s += lr_at(cfg["lr"], cfg.get("lr_schedule", "constant"), step, cfg["steps"])
        cum[step] = s
    dev = [(r["step"], cum[r["step"]], r["loss"], r["accuracy"]) for r in rows if r.get("split") == "dev"]
    g = [r["g_abs"] for r in rows if "g_abs" in r and r["step"] > 0]
    return {"run": run.name, "method": cfg["method"], "lr": cfg["lr"], "schedule": cfg.get("lr_schedule", "constant"),
            "q": cfg["q"], "b": cfg["batch_size"], "dev": dev, "g_abs": g}


def interp(curve: list[tuple[float, float]], s: float) -> float | None:
    """The reference value at cumulative lr s (linear between its evaluations), None outside them."""
    for (s0, v0), (s1, v1) in zip(curve, curve[1:]):
        if s0 <= s <= s1:
            return v0 + (v1 - v0) * (s - s0) / (s1 - s0) if s1 > s0 else v0
    return None


def gb2(g_abs: list[float], q: int) -> float:
    """|g_b|² from the logged mean over q of |g_i| (each |N(0, |g_b|²)|): E[mean²] = ((1 − 2/π)/q + 2/π)·|g_b|²."""
    return statistics.mean(x * x for x in g_abs) / ((1 - TWO_OVER_PI) / q + TWO_OVER_PI)


def compare(ref_loss: list[tuple[float, float]], zos: list[dict], trace: float) -> list[dict]:
    """One row per zeroth-order dev evaluation inside the reference's range of S: the excess over the
    reference at the same S, κ measured = excess / (mean lr so far · S), and κ of the noise model."""
    rows = []
    for r in zos:
        g2 = gb2(r["g_abs"], r["q"])
        for step, s, loss, acc in r["dev"]:
            ref = interp(ref_loss, s)
            if step == 0 or ref is None:
                continue
            rows.append({"run": r["run"], "step": step, "S": s, "zo_loss": loss, "zo_acc": acc, "ref_loss": ref,
                         "excess": loss - ref, "kappa": (loss - ref) / ((s / step) * s),
                         "kappa_model": 0.5 * g2 * trace / r["q"], "gb2": g2})
    return rows


def projection(pts: list[tuple[float, float, float]], rows: list[dict], target: float, excess: float,
               step_seconds: float, budget_minutes: float) -> dict | None:
    """The reference's first S reaching `target` accuracy, and the lr / steps / minutes that keep the
    zeroth-order excess there under `excess` with the median positive measured κ; and, for a run of
    `budget_minutes`, the S among the reference's evaluations that minimises reference loss + κ·S²/N
    (the constant lr S/N over its N steps): the best dev loss the noise model allows in that time."""
    hit = next(((s, loss) for s, loss, acc in pts if acc >= target), None)
    kappas = [x["kappa"] for x in rows if x["kappa"] > 0]
    if hit is None or not kappas:
        return None
    s_star, kappa = hit[0], statistics.median(kappas)
    lr = excess / (kappa * s_star)
    n = budget_minutes * 60 / step_seconds
    s_b, loss_b, acc_b = min(((s, loss + kappa * s * s / n, acc) for s, loss, acc in pts if s > 0), key=lambda x: x[1])
    return {"S_star": s_star, "ref_loss": hit[1], "kappa": kappa, "lr": lr, "steps": s_star / lr,
            "minutes": s_star / lr * step_seconds / 60,
            "budget": {"minutes": budget_minutes, "steps": n, "S": s_b, "lr": s_b / n, "loss": loss_b, "ref_acc_at_S": acc_b}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", nargs="+", required=True, help="exact-gradient SGD run folders (method=fo optimizer=sgd)")
    p.add_argument("--zo", nargs="+", required=True, help="zeroth-order run folders")
    p.add_argument("--trace", type=float, default=37.0, help="tr(H) over the perturbed values (benchmarks/grad_energy.py)")
    p.add_argument("--target", type=float, default=0.85, help="dev accuracy the projection asks for")
    p.add_argument("--excess", type=float, default=0.01, help="dev-loss excess over the reference allowed at the target")
    p.add_argument("--step-seconds", type=float, default=1.3, help="seconds per zeroth-order step for the projection")
    p.add_argument("--budget-minutes", type=float, default=60.0, help="wall-clock budget of the best-in-budget estimate")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "zo_noise.jsonl"))
    args = p.parse_args()

    refs = [load(Path(r)) for r in args.reference]
    pts = sorted({(s, loss, acc) for r in refs for _, s, loss, acc in r["dev"]})
    ref_loss = [(s, loss) for s, loss, _ in pts]
    print("reference (exact-gradient SGD, same adapter, data order and batch): S → dev loss / acc")
    for r in refs:
        print(f"  lr {r['lr']:g}: " + ", ".join(f"{s:.2f} → {loss:.3f} / {acc:.3f}" for _, s, loss, acc in r["dev"]))

    rows = compare(ref_loss, [load(Path(z)) for z in args.zo], args.trace)
    print("\n| run | step | S = Σ lr | ZO dev loss | reference at S | excess | κ measured | κ model |")
    print("|---|---|---|---|---|---|---|---|")
    for x in rows:
        print(f"| {x['run']} | {x['step']} | {x['S']:.2f} | {x['zo_loss']:.3f} | {x['ref_loss']:.3f} | "
              f"{x['excess']:+.3f} | {x['kappa']:.0f} | {x['kappa_model']:.0f} |")
    proj = projection(pts, rows, args.target, args.excess, args.step_seconds, args.budget_minutes)
    if proj:
        print(f"\nprojection: the reference first reaches dev accuracy {args.target:.2f} at S* = {proj['S_star']:.2f} "
              f"(dev loss {proj['ref_loss']:.3f}); with the median measured κ = {proj['kappa']:.0f}, an excess under "
              f"{args.excess} there needs lr ≤ {proj['lr']:.2e}, i.e. {proj['steps']:,.0f} steps ≈ {proj['minutes']:,.0f} "
              f"minutes at {args.step_seconds} s per step")
        b = proj["budget"]
        print(f"in {b['minutes']:g} minutes ({b['steps']:,.0f} steps) the least dev loss the model allows is {b['loss']:.3f}, "
              f"at S = {b['S']:.2f} (lr {b['lr']:.1e}), where the reference's dev accuracy is {b['ref_acc_at_S']:.3f}")
    else:
        print(f"\nno reference evaluation reaches dev accuracy {args.target:.2f} (or no positive κ): no projection")
    append_jsonl(Path(args.out), {"reference": [r["run"] for r in refs], "rows": rows, "projection": proj,
                                  "trace": args.trace, "target": args.target, "excess": args.excess,
                                  "step_seconds": args.step_seconds, "machine": platform.machine(),
                                  "date": time.strftime("%Y-%m-%d")})


if __name__ == "__main__":
    main()
