"""The label readout: a low-rank correction of the LM head's label-word rows, trained zeroth-order on
cached features after the LoRA steps (issue 20; `docs/optimiser.md` section 7).

Why. Zeroth-order training is noise-limited: each step's progress shrinks with the number of values
it perturbs, and every step costs a forward of the whole model. A classifier's answer is read off
the final hidden state h at the answer position through the head's label-word rows W_L. If the
skill is already in h but W_L does not read it out, a readout on h learns it — and once h is cached
(one forward per training row, no repeats), a step on the readout costs a few small matrix products
instead of a 2q-copy forward of the model, so thousands of steps take seconds.

What. logits_L = W_L h + B (A h), with
- A (r, H): frozen, the top-r principal directions of the uncentred features over the training
  rows, each divided by its root-mean-square (so A h has identity second moment: the readout's
  curvature is near isotropic, which is what a random-direction estimator needs). Forward passes
  only, computed by `basis`.
- B (K, r): trained by the P-RGE arithmetic of `prge.zo.estimator` (q queries at ±ε, g_i, the same
  update), on cached features, B = 0 at the start (the zero-shot model); the best of its dev
  evaluations (step 0 included) is kept.
This is exactly LoRA on the LM head with rank r and alpha r, with B zero outside the label rows, and
is saved as such in the PEFT adapter (`prge.run.adapters`), so PEFT reproduces the label scores.

Cost: one forward per training row used (`--readout-rows`) and per dev row, then `--readout-steps`
steps of (2q·b, r) × (r, K) products.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from prge.data.batch import Encoded, collate
from prge.zo import estimator as est

DEFAULT_RANK = 64  # the rank `prge train` and `prge device-train` fit where the readout applies and --readout is not given
ATTR = "prge_readout"  # the model attribute that holds a trained readout (`attach`; `prge.zo.loss.head` adds it)
STREAM = 1 << 14  # its noise stream's tensor index: apart from every LoRA tensor's
BATCH = 16  # rows per readout step (a step costs microseconds, so a less noisy loss is free)
EVAL_EVERY = 250  # readout steps between its dev evaluations


class Readout(nn.Module):
    """A (r, H) frozen and B (K, r): adds B (A h) to the label-word logits of hidden states h."""

    def __init__(self, a: torch.Tensor, label_ids: torch.Tensor, b: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("a", a.detach().float().clone())
        self.register_buffer("label_ids", label_ids.detach().clone())
        self.b = nn.Parameter(torch.zeros(len(label_ids), a.shape[0]) if b is None else b.detach().float().clone(),
                              requires_grad=False)

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return (h.float() @ self.a.T) @ self.b.T


SIDECAR = "prge_readout.json"  # marks the LM head's LoRA in a PEFT adapter as this readout


def add_to_peft(ro: Readout, head: str, vocab_size: int, config: dict, tensors: dict, prefix: str) -> dict:
    """Put the readout into a PEFT LoRA adapter being written (its `config` and `tensors`, changed in
    place): LoRA on the LM head `head` with rank r and alpha r, B zero outside the label rows, which is
    what PEFT loads. Returns the sidecar (written as `SIDECAR`) that marks it. One writer for the eager
    adapter (`prge.run.adapters`) and the device loop's (`prge.engine.formats.write_adapter`)."""
    config["target_modules"] = sorted([*config["target_modules"], head])
    config["rank_pattern"], config["alpha_pattern"] = {head: ro.rank}, {head: ro.rank}
    b = torch.zeros(vocab_size, ro.rank)
    b[ro.label_ids.cpu()] = ro.b.detach().cpu()
    tensors[f"{prefix}{head}.lora_A.weight"] = ro.a.detach().cpu()
    tensors[f"{prefix}{head}.lora_B.weight"] = b
    return {"module": head, "label_ids": ro.label_ids.tolist()}


def get(model: nn.Module) -> Readout | None:
    return getattr(model, ATTR, None)


def attach(model: nn.Module, readout: Readout | None) -> None:
    """Put `readout` on the model (None removes it)."""
    if hasattr(model, ATTR):
        delattr(model, ATTR)
    if readout is not None:
        dev = next(model.parameters()).device
        model.add_module(ATTR, readout.to(dev))


@torch.no_grad()
def features(model: nn.Module, items: list[Encoded], pad_id: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(final hidden states (N, H) at each row's answer position, labels (N,)): one forward per row."""
    from prge.zo.loss import hidden_at  # the eager model's forward (the device loop never imports it)

    dev = next(model.parameters()).device
    hs, ys = [], []
    for i in range(0, len(items), batch_size):
        b = collate(items[i:i + batch_size], pad_id).to(dev)
        hs.append(hidden_at(model, b.input_ids, b.target_pos[:, :1])[:, 0].float())
        ys.append(b.label)
    return torch.cat(hs), torch.cat(ys)


def basis(feats: torch.Tensor, rank: int) -> torch.Tensor:
    """(rank, H): the top-r right singular vectors of the uncentred features, each scaled by 1/rms of its
    coordinate, so that the readout's inputs A h have identity second moment over these rows; rows past
    the features' numerical rank r are zero (so B is (K, rank) whatever the data, as the exported
    `readout_step` method takes it). Each vector's sign makes its largest-magnitude entry positive (the
    first such entry on a tie): an SVD's signs are arbitrary, and the C++ runner's SVD (Eigen) must draw
    the same basis as this one (MKL/LAPACK) for the runs to follow one trajectory."""
    u, s, v = torch.linalg.svd(feats.double(), full_matrices=False)
    r = min(rank, int((s > s[0] * 1e-6).sum())) if len(s) else 0
    v = v[:r]
    v = v * torch.where(v.gather(1, v.abs().argmax(1, keepdim=True)) < 0, -1.0, 1.0).to(v.dtype)
    rms = s[:r] / max(len(feats), 1) ** 0.5
    out = torch.zeros(rank, feats.shape[1], device=feats.device)
    out[:r] = (v / rms[:, None]).float()
    return out


def rows_order(n: int, count: int, seed: int) -> torch.Tensor:
    """`count` row indices: consecutive seeded permutations of range(n) (an epoch each)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 17)
    epochs = -(-count // max(n, 1))
    return torch.cat([torch.randperm(n, generator=gen) for _ in range(epochs)])[:count] if n else torch.zeros(0, dtype=torch.long)


@dataclass
class Fit:
    readout: Readout
    best_step: int
    dev_before: float
    dev_after: float
    rows: int
    seconds_features: float
    seconds_steps: float


@torch.no_grad()
def fit(model: nn.Module, train: list[Encoded], dev: list[Encoded], pad_id: int, label_ids: torch.Tensor, *, rank: int,
        steps: int, lr: float, q: int, eps: float, seed: int, eval_batch_size: int, batch_size: int = BATCH,
        eval_every: int = EVAL_EVERY) -> Fit:
    """Compute features of the eager model, then `fit_features`."""
    from prge.zo.loss import label_head

    t0 = time.time()
    h_tr, y_tr = features(model, train, pad_id, eval_batch_size)
    h_dv, y_dv = features(model, dev, pad_id, eval_batch_size) if dev else (h_tr, y_tr)
    base_tr, base_dv = label_head(model, h_tr, label_ids), label_head(model, h_dv, label_ids)
    out = fit_features(Features(h_tr, y_tr, base_tr), Features(h_dv, y_dv, base_dv), label_ids, rank=rank, steps=steps, lr=lr,
                       q=q, eps=eps, seed=seed, cap=getattr(model.config, "final_logit_softcapping", None),
                       batch_size=batch_size, eval_every=eval_every)
    out.seconds_features = time.time() - t0 - out.seconds_steps
    return out


def keep_untrained(on_best: Fit, on_untrained: Fit | None) -> bool:
    """Which readout a run keeps, where the LoRA steps moved the model (best checkpoint after step 0): the
    one fitted on the untrained model only where its dev accuracy is strictly higher, else the one on the
    best checkpoint. The LoRA steps are selected by their own dev accuracy, not by what a readout makes of
    the hidden states they leave: on copa4 they raised dev 24.5 -> 35.0% but left h less linearly
    readable (the readout after them 50.0%, on the untrained model 56.5%; docs/optimiser.md section 7).
    Costs one more forward per readout row and dev row."""
    return on_untrained is not None and on_untrained.dev_after > on_best.dev_after


def summary_entry(fit: Fit, steps: int, checkpoint_step: int, dev_after_untrained: float | None) -> dict:
    """summary.json's "readout" entry, one writer for `prge train` and `prge device-train` (both loops)."""
    return {"rank": fit.readout.rank, "rows": fit.rows, "dev_before": fit.dev_before, "dev_after": fit.dev_after,
            "best_step": fit.best_step, "steps": steps, "checkpoint_step": checkpoint_step,
            "dev_after_untrained": dev_after_untrained,
            "minutes": (fit.seconds_features + fit.seconds_steps) / 60}


def logits(base: torch.Tensor, f: torch.Tensor, bs: torch.Tensor, cap: float | None) -> torch.Tensor:
    """(C, n, K) label-word logits of rows with head logits `base` (n, K) and readout inputs f = A h (n, r)
    under C readouts `bs` (C, K, r), soft-capped as the head is (`cap`: Gemma's final logit soft-cap)."""
    x = base + torch.einsum("nr,ckr->cnk", f, bs)
    return torch.tanh(x / cap) * cap if cap else x


def step(b: torch.Tensor, f: torch.Tensor, base: torch.Tensor, y: torch.Tensor, key: torch.Tensor, q: int, eps, lr,
         cap: float | None) -> torch.Tensor:
    """One readout step on a batch of cached rows (f = A h (n, r), head logits `base` (n, K), labels y (n,)):
    q queries of counter noise for step `key` = [seed, t] (stream `STREAM`), the 2q losses at B ± εz in
    one product, g, and the update (`prge.zo.estimator`). Returns the new B (K, r). `fit_features` calls
    it, and it is the exported program's `readout_step` method, which the C++ runner calls."""
    z = est.counter_normal_streams(key, [est.stream(STREAM, i) for i in range(q)], b.numel()).reshape(q, *b.shape)
    x = logits(base, f, est.perturbed(b, z, eps, "+-"), cap)  # (2q, n, K)
    losses = est.cross_entropy(x, y.expand(2 * q, -1)).mean(1)
    g = est.projected_grad(losses[:q], losses[q:], eps)
    return est.update(b, z, g, lr)


@dataclass
class Features:
    """Rows for the readout: final hidden states h (N, H) at the answer position, labels (N,), and the
    head's label-word logits (N, K) before any readout and soft-capping."""
    h: torch.Tensor
    y: torch.Tensor
    base: torch.Tensor


@torch.no_grad()
def fit_features(train: Features, dev: Features, label_ids: torch.Tensor, *, rank: int, steps: int, lr: float, q: int,
                 eps: float, seed: int, cap: float | None = None, batch_size: int = BATCH, eval_every: int = EVAL_EVERY) -> Fit:
    """The basis and B (zeroth-order, on the cached features), the same arithmetic wherever the features
    came from (the eager model, or an exported program's `features` method on the device); returns the
    readout at the best dev accuracy seen (step 0, B = 0, counts, so the readout never lowers dev accuracy).
    `cap` is the model's final logit soft-cap (Gemma), applied after the readout as the head does."""
    t1 = time.time()
    h_tr, y_tr, base_tr, h_dv, y_dv, base_dv = train.h.float(), train.y, train.base, dev.h.float(), dev.y, dev.base
    a = basis(h_tr, rank)
    f_tr, f_dv = h_tr @ a.T, h_dv @ a.T
    k = len(label_ids)
    b = torch.zeros(k, a.shape[0], device=a.device)

    def dev_acc(bb: torch.Tensor) -> float:
        return float((logits(base_dv, f_dv, bb[None], cap)[0].argmax(-1) == y_dv).float().mean())

    before = best = dev_acc(b)
    best_b, best_step = b.clone(), 0
    order = rows_order(len(f_tr), steps * batch_size, seed).to(a.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ops this small only lose to threading (22 ms a step instead of 0.3 on a busy 2-core CPU)
    try:
        for t in range(1, steps + 1):
            idx = order[(t - 1) * batch_size:t * batch_size]
            key = torch.tensor([seed, t], dtype=torch.int64, device=a.device)
            b = step(b, f_tr[idx], base_tr[idx], y_tr[idx], key, q, eps, lr, cap)
            if t % eval_every == 0 or t == steps:
                acc = dev_acc(b)
                if acc > best:
                    best, best_b, best_step = acc, b.clone(), t
    finally:
        torch.set_num_threads(threads)
    return Fit(Readout(a, label_ids, best_b), best_step, before, best, len(h_tr), 0.0, time.time() - t1)
