#!/usr/bin/env python
"""Per-query curvature weights for P-RGE: predicted speed-up, from exact per-row gradients (issue 20).

    python benchmarks/query_weights.py --task sst2 --template 'Review: {sentence}\\nSentiment:' --n 256 --threads 1

The candidate: add one clean copy of B to the batched forward (2q + 1 blocks instead of 2q) and
weight each query by its measured curvature along z,

    c_i = (L⁺_i + L⁻_i − 2·L₀) / ε²,   g_i ← w_i · (L⁺_i − L⁻_i) / 2ε,   w_i = 1 / max(c_i, δ·c̄),

the per-query form of HiZOO's curvature step (c̄: the mean Gauss–Newton curvature along z, tr H).
Why it might help where a fixed diagonal D could not (docs/optimiser.md section 6): for the class loss at B = 0 a b-row batch's Hessian along z is
c = (1/b)·Σ_k p_k(1 − p_k)·(J_kᵀz)², built from the same projections J_kᵀz as the batch's noise
(1/b)·Σ_k (p_k − y_k)·J_kᵀz. A query whose batch projections happen to be large is a noisy query, and
c says so; 1/c is then the Bayes weight of a measurement whose noise variance is ∝ c (the Fisher
identity, per query instead of on average). With the projections Gaussian and c ~ χ²_b this gives
E[c]·E[1/c] = b/(b − 2) at best: 2× at b = 4, unbounded at b ≤ 2 — before the network's own curvature
and finite-difference noise put a floor under c.

What is computed (no training; one forward + one backward per row, server-side maths):

1. per row i of --n training rows, J_i = ∇_B d_i (d: the label-logit difference; LoRA-FA B of every
   wrapped module, the model's own random A) by hooks, as benchmarks/merit.py does, kept whole
   (n × 2.49M floats for SmolLM2), and r_i = p_i − y_i, π_i = p_i(1 − p_i);
2. the check: on --check-batches batches of b rows and --check-z Gaussian z each, the real
   L⁺, L⁻, L₀ at ±ε (prge's own forward) against the linear/GGN model s = (1/b)Σ r_k J_kᵀz,
   c_GGN = (1/b)Σ π_k (J_kᵀz)²: how well the model predicts s, and what c_FD − c_GGN (the network's
   curvature Σ r ∇²d, plus rounding) adds;
3. a Monte-Carlo of ZO-SGD steps on the quadratic model: z's projections on all rows drawn exactly
   (u = Jᵀz ~ N(0, JᵀJ)), batches from the first half of the rows, the true directional derivative
   t = zᵀg from the other half (unbiased, independent of the batch), the curvature of the update
   zᵢᵀ H zⱼ from all rows; the observed c is c_GGN plus a draw of the measured residual. Per scheme
   the step's best gain is A1² / (2·A2) with A1 = E[(1/q)Σ w s t], A2 = E[(1/q²)Σᵢⱼ wᵢwⱼ sᵢsⱼ zᵢᵀHzⱼ];
   the predicted speed-up is that over the unweighted step's (w = 1), at the same b, q, and per
   forward row: (2q + 1)·b rows instead of 2q·b.

Appends one JSON line per (b, scheme) to benchmarks/results/query_weights.jsonl.
"""

from __future__ import annotations

import argparse
import itertools
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from prge.config import TrainConfig  # noqa: E402
from prge.data.batch import collate  # noqa: E402
from prge.io import append_jsonl  # noqa: E402
from prge.run.train import prepare  # noqa: E402
from prge.zo.lora import lora_layers, using  # noqa: E402
from prge.zo.loss import copy_losses, head, hidden_at  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "query_weights.jsonl"
CACHE = ROOT / "runs" / "query_weights"


def b_sizes(layers) -> list[int]:
    """Values of each wrapped module's B: the flat layout of J's columns and of z (lora_layers order)."""
    return [m.out_features * m.rank for m in layers]


def per_row_j(s, rows, bs: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, D) J_i = ∇_B d_i over every wrapped module's B (lora_layers order, each (out, r) row-major),
    and the rows' p_i (probability of label 1) and y_i."""
    layers = list(lora_layers(s.model).values())
    offs = [0, *itertools.accumulate(b_sizes(layers))]
    J = torch.zeros(len(rows), offs[-1])
    xs: dict = {}
    cur = {"start": 0}

    def fwd(i):
        def f(mod, args, out):
            xs[i] = args[0].detach()
            if out.requires_grad:
                out.register_hook(lambda d, i=i: bwd(i, d))
        return f

    def bwd(i, d):
        m = layers[i]
        ax = xs[i].float() @ m.lora_A.detach().T  # (N, T, r)
        j = m.scale * torch.einsum("nto,ntr->nor", d.float(), ax)  # (N, out, r)
        a = cur["start"]
        J[a:a + j.shape[0], offs[i]:offs[i + 1]] = j.reshape(j.shape[0], -1)
        return None

    p_all, y_all = [], []
    for m in layers:
        m.lora_B.requires_grad_(True)
    hooks = [m.register_forward_hook(fwd(i)) for i, m in enumerate(layers)]
    try:
        for start in range(0, len(rows), bs):
            chunk = rows[start:start + bs]
            b = collate(chunk, s.pad_id)
            cur["start"] = start
            hid = hidden_at(s.model, b.input_ids, b.target_pos)
            logits = head(s.model, hid[:, 0], s.label_ids)
            dd = logits[:, 1] - logits[:, 0]
            p_all.append(torch.sigmoid(dd.detach()))
            y_all.append(b.label.float())
            dd.sum().backward()
            xs.clear()
            print(f"  J: {start + len(chunk)} of {len(rows)} rows", flush=True)
    finally:
        for h in hooks:
            h.remove()
        for m in layers:
            m.lora_B.requires_grad_(False)
            m.lora_B.grad = None
    return J, torch.cat(p_all), torch.cat(y_all)


def split_z(z: torch.Tensor, layers) -> list[torch.Tensor]:
    """A flat z as one (1, out, r) copy per module, in J's column layout."""
    return [c.reshape(1, m.out_features, m.rank) for c, m in zip(z.split(b_sizes(layers)), layers)]


@torch.no_grad()
def check(s, rows, J, r, pi, b: int, batches: int, nz: int, eps: float, seed: int) -> dict:
    """Real finite differences against the linear / GGN model on `batches` batches × `nz` directions."""
    layers = list(lora_layers(s.model).values())
    gen = torch.Generator().manual_seed(seed)
    recs = []
    for k in range(batches):
        idx = list(range(k * b, (k + 1) * b))
        batch = collate([rows[i] for i in idx], s.pad_id)
        for _ in range(nz):
            z = torch.randn(J.shape[1], generator=gen)
            zs = split_z(z, layers)
            copies = [torch.cat([eps * zz, -eps * zz, torch.zeros_like(zz)]) for zz in zs]
            with using(s.model, copies):
                lp, lm, l0 = copy_losses(s.model, batch.repeat(3), 3, s.label_ids, "class").double().tolist()
            u = (J[idx] @ z).double()
            recs.append({"s_fd": (lp - lm) / (2 * eps), "c_fd": (lp + lm - 2 * l0) / eps ** 2,
                         "s_lin": float((r[idx] * u).mean()), "c_ggn": float((pi[idx] * u * u).mean())})
    s_fd = torch.tensor([x["s_fd"] for x in recs])
    s_lin = torch.tensor([x["s_lin"] for x in recs])
    c_fd = torch.tensor([x["c_fd"] for x in recs])
    c_ggn = torch.tensor([x["c_ggn"] for x in recs])
    resid = c_fd - c_ggn
    return {"b": b, "n": len(recs), "eps": eps,
            "s_corr": float(torch.corrcoef(torch.stack([s_fd, s_lin]))[0, 1]),
            "s_rel_err": float((s_fd - s_lin).norm() / s_lin.norm()),
            "c_corr": float(torch.corrcoef(torch.stack([c_fd, c_ggn]))[0, 1]),
            "c_fd_mean": float(c_fd.mean()), "c_ggn_mean": float(c_ggn.mean()),
            "c_ggn_cv": float(c_ggn.std() / c_ggn.mean()),
            "resid_mean": float(resid.mean()), "resid_std": float(resid.std()),
            "c_fd_min": float(c_fd.min()), "frac_c_fd_below_0": float((c_fd <= 0).double().mean())}


def monte_carlo(G: torch.Tensor, r: torch.Tensor, pi: torch.Tensor, b: int, q: int, steps: int, schemes: dict,
                resid_mean: float, resid_std: float, seed: int, groups: int = 20) -> dict:
    """Best per-step gain of each weighting scheme on the quadratic model (see the module text)."""
    n = G.shape[0]
    half = n // 2
    ev, evec = torch.linalg.eigh(G.double())
    L = evec * ev.clamp_min(0).sqrt()  # u = L ξ ~ N(0, G)
    gen = torch.Generator().manual_seed(seed)
    r, pi = r.double(), pi.double()
    acc = {k: torch.zeros(groups, 2, dtype=torch.float64) for k in schemes}
    per = steps // groups
    chunk = 2000
    for gi in range(groups):
        done = 0
        while done < per:
            m = min(chunk, per - done)
            xi = torch.randn(n, m * q, generator=gen, dtype=torch.float64)
            U = (L @ xi).reshape(n, m, q)  # u_i for every row, step, query
            bidx = torch.stack([torch.randperm(half, generator=gen)[:b] for _ in range(m)])  # (m, b) batch rows
            Ub = torch.gather(U[:half], 0, bidx.T.unsqueeze(-1).expand(b, m, q))  # (b, m, q)
            rb, pb = r[bidx].T.unsqueeze(-1), pi[bidx].T.unsqueeze(-1)
            s = (rb * Ub).mean(0)  # (m, q)
            c = (pb * Ub * Ub).mean(0) + resid_mean + resid_std * torch.randn(m, q, generator=gen, dtype=torch.float64)
            t = (r[half:, None, None] * U[half:]).mean(0)  # zᵀg from the other half
            Hz = (pi[:, None, None] * U)  # for zᵢᵀ H zⱼ = (1/n) Σ_rows π u_i u_j
            H = torch.einsum("nmi,nmj->mij", Hz, U) / n  # (m, q, q)
            for k, fn in schemes.items():
                w = fn(c)
                ws = w * s
                a1 = (ws * t).mean(1)  # (1/q) Σ w s t
                a2 = torch.einsum("mi,mij,mj->m", ws, H, ws) / q ** 2
                acc[k][gi, 0] += a1.sum()
                acc[k][gi, 1] += a2.sum()
            done += m
    def best_gain(x: torch.Tensor) -> torch.Tensor:  # A1² / (2·A2) over the rows (groups) of x = [A1, A2]
        return x[:, 0].mean() ** 2 / (2 * x[:, 1].mean())

    out = {}
    base = acc["w=1"] / per
    g_base = best_gain(base)
    for k, a in acc.items():
        a = a / per
        gain = best_gain(a)
        # jackknife over groups for the ratio's standard error
        ratios = []
        for j in range(groups):
            keep = [i for i in range(groups) if i != j]
            ratios.append(float(best_gain(a[keep]) / best_gain(base[keep])))
        rt = torch.tensor(ratios)
        se = float(((groups - 1) / groups * ((rt - rt.mean()) ** 2).sum()).sqrt())
        out[k] = {"gain_per_step": float(gain), "speedup_per_step": float(gain / g_base), "se": se,
                  "speedup_per_forward_row": float(gain / g_base) * (2 * q) / (2 * q + (0 if k == "w=1" else 1)),
                  "a1": float(a[:, 0].mean()), "a2": float(a[:, 1].mean())}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="sst2")
    p.add_argument("--template", help="prompt template (\\n = newline)")
    p.add_argument("--tag", default=None)
    p.add_argument("--n", type=int, default=256, help="training rows (half for batches, half for the true gradient)")
    p.add_argument("--bs", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--q", type=int, default=4)
    p.add_argument("--eps", type=float, default=1e-2)
    p.add_argument("--steps", type=int, default=100_000, help="Monte-Carlo steps per (b, scheme)")
    p.add_argument("--check-batches", type=int, default=4)
    p.add_argument("--check-z", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    tag = args.tag or args.task + ("-earlier" if args.template else "")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    cfg = TrainConfig(model=args.model, task=args.task, method="prge", seed=args.seed, threads=args.threads,
                      template=args.template.replace("\\n", "\n") if args.template else None, progress=False)
    s = prepare(cfg)
    if s.loss_kind != "class" or len(s.label_ids) != 2:
        raise SystemExit("error: this prediction is for 2-label classification (the class loss) — pick such a task")
    rows = s.train[:args.n]
    J, p1, y = per_row_j(s, rows)
    r, pi = p1 - y, p1 * (1 - p1)
    print(f"[{time.time() - t0:.0f}s] J: {tuple(J.shape)}, train loss {float(-(y * p1.log() + (1 - y) * (1 - p1).log()).mean()):.4f}", flush=True)
    G = J @ J.T
    g = (r[:, None] * J).mean(0)
    coh = float(g.norm() ** 2 / (r ** 2 * G.diag()).mean())  # |mean g_i|² / mean |g_i|² (biased up by 1/n)
    chk = {}
    for b in (4, 1):
        chk[b] = check(s, rows, J, r, pi, b, args.check_batches, args.check_z, args.eps, args.seed)
        print(f"[{time.time() - t0:.0f}s] check b={b}: {chk[b]}", flush=True)
    del J
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save({"G": G, "r": r, "pi": pi, "check": chk}, CACHE / f"{tag}-n{args.n}.pt")
    results = []
    cbar = float((pi * G.diag()).mean())  # mean GGN curvature along z of a batch (any b): tr(H_GGN)
    for b in args.bs:
        # the observed c = c_GGN + the residual (the network's own curvature Σ r ∇²d plus rounding), drawn
        # from the check: b = 1 and 4 as measured; other b from b = 4's, its spread scaled like a mean over b rows
        cb = chk.get(b) or chk[4]
        rm = cb["resid_mean"]
        rs = cb["resid_std"] * (1.0 if b in chk else math.sqrt(4 / b))

        def floor(d):
            return lambda c, d=d: 1.0 / c.clamp_min(d * cbar)

        schemes = {"w=1": lambda c: torch.ones_like(c)}
        for d in (0.05, 0.1, 0.3, 1.0):
            schemes[f"1/max(c,{d}c̄)"] = floor(d)
        for label, (m, sd) in {"measured c": (rm, rs), "exact GGN c (no residual)": (0.0, 0.0)}.items():
            mc = monte_carlo(G, r, pi, b, args.q, args.steps, schemes, m, sd, args.seed + b)
            for k, v in mc.items():
                row = {"tag": tag, "model": args.model, "b": b, "q": args.q, "scheme": k, "c_model": label, **v,
                       "resid_mean": m, "resid_std": sd, "cbar_ggn": cbar, "n_rows": args.n, "coherence_per_row": coh,
                       "steps": args.steps, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
                       "date": time.strftime("%Y-%m-%d")}
                results.append(row)
                print(f"  b={b:2d} {label:26s} {k:16s} speed-up per step {v['speedup_per_step']:.3f} ± {v['se']:.3f}  "
                      f"per forward row {v['speedup_per_forward_row']:.3f}", flush=True)
    if not args.no_write:
        for row in results:
            append_jsonl(RESULTS, row)
        append_jsonl(RESULTS, {"tag": tag, "model": args.model, "check": {str(k): v for k, v in chk.items()},
                               "seconds": time.time() - t0, "date": time.strftime("%Y-%m-%d")})
    print(f"[{time.time() - t0:.0f}s] done", flush=True)


if __name__ == "__main__":
    main()
