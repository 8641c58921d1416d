"""One zeroth-order step: P-RGE (q queries in one batched forward) and sequential MeZO.

Both draw z_i for step t from the same generator (`estimator.noise`, keyed by [seed, t]) and apply
the same `estimator.update`, so with the same seed, q and batch they produce the same update up to
float rounding (tests/test_estimator.py checks it):

- `prge_step(..., mode="dual")`: one forward of batch 2q·b; block k uses copy k of B,
  copies = [B + εz_1..q, B − εz_1..q].
- `prge_step(..., mode="single")`: two forwards of batch q·b, first the + copies, then the − copies.
- `mezo_step`: q sequential pairs of forwards of batch b, perturbing the parameters in place
  (+εz, −2εz, +εz back) and regenerating z from the key instead of storing it. Works on the LoRA B
  tensors or on every parameter of the model (full-parameter MeZO).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from prge.zo import estimator as est
from prge.data.batch import Batch
from prge.errors import PrgeError
from prge.zo.lora import using

LossFn = Callable[[Batch, int], torch.Tensor]  # (batch repeated C times, C) -> (C,) losses


@dataclass
class ZOStep:
    losses: torch.Tensor  # (2q,): L⁺_1..q then L⁻_1..q
    g: torch.Tensor  # (q,)


def check_finite(losses: torch.Tensor, step: int) -> None:
    if not torch.isfinite(losses).all():
        raise PrgeError(
            f"non-finite loss at step {step} ({losses.tolist()}); the last good checkpoint is kept",
            "lower --lr or --eps, or train in float32",
        )


@torch.no_grad()
def perturbed_losses(model, params: list[torch.Tensor], zs: list[torch.Tensor], loss_fn: LossFn, batch: Batch,
                     eps: float, mode: str = "dual") -> torch.Tensor:
    """(2q,) losses L⁺_1..q then L⁻_1..q of the MP-LoRA model at B ± εz, in one (dual) or two (single) forwards."""
    q = zs[0].shape[0]
    if mode == "dual":
        with using(model, [est.perturbed(p, z, eps, "+-") for p, z in zip(params, zs)]):
            return loss_fn(batch.repeat(2 * q), 2 * q)
    if mode == "single":
        half = []
        for sign in "+-":
            with using(model, [est.perturbed(p, z, eps, sign) for p, z in zip(params, zs)]):
                half.append(loss_fn(batch.repeat(q), q))
        return torch.cat(half)
    raise PrgeError(f"unknown P-RGE mode {mode!r}", "use --mode dual or --mode single")


@torch.no_grad()
def apply_update(params: list[torch.Tensor], zs: list[torch.Tensor], g: torch.Tensor, lr: float) -> None:
    """B ← B − lr · mean_i g_i z_i for every trained tensor, in place."""
    for p, z in zip(params, zs):
        p.copy_(est.update(p, z, g, lr))


@torch.no_grad()
def prge_step(model, params: list[torch.Tensor], loss_fn: LossFn, batch: Batch, step: int, *, seed: int,
              q: int, eps: float, lr: float, mode: str = "dual", noise: str = "counter", normalize: bool = False,
              share=None) -> ZOStep:
    """One P-RGE step on the LoRA B tensors `params` of an MP-LoRA model.

    `share` (a `prge.run.dist.Share`) splits the queries across processes: this one evaluates the
    global queries `share.queries` only, `share.gather` exchanges the losses, and every process applies
    the same update from all q. (Data-parallel: `batch` is this process's share of the step's
    examples, it evaluates all q queries, and `gather` averages the losses over the processes.) The noise is drawn for all q by global query id, so it never depends
    on the process."""
    key = torch.tensor([seed, step], dtype=torch.int64, device=params[0].device)
    zs = est.all_noise(key, q, [tuple(p.shape) for p in params], noise)
    if share is None:
        losses = perturbed_losses(model, params, zs, loss_fn, batch, eps, mode)
    else:
        local = perturbed_losses(model, params, [z[share.queries] for z in zs], loss_fn, batch, eps, mode)
        losses = share.gather(local, share.weight(batch))
    check_finite(losses, step)
    g = est.projected_grad(losses[:q], losses[q:], eps, normalize)
    apply_update(params, zs, g, lr)
    return ZOStep(losses, g)


@torch.no_grad()
def mezo_step(model, params: list[torch.Tensor], loss_fn: LossFn, batch: Batch, step: int, *, seed: int,
              q: int, eps: float, lr: float, noise: str = "counter", normalize: bool = False) -> ZOStep:
    """Sequential MeZO: q pairs of forwards of batch b, z regenerated from the key, never stored."""
    key = torch.tensor([seed, step], dtype=torch.int64, device=params[0].device)

    def z(j: int, i: int, p: torch.Tensor) -> torch.Tensor:
        return est.noise(key, j, i, tuple(p.shape), noise).to(p.dtype)

    plus, minus = [], []
    for i in range(q):
        for j, p in enumerate(params):
            p.add_(z(j, i, p), alpha=eps)
        plus.append(loss_fn(batch, 1)[0])
        for j, p in enumerate(params):
            p.add_(z(j, i, p), alpha=-2 * eps)
        minus.append(loss_fn(batch, 1)[0])
        for j, p in enumerate(params):
            p.add_(z(j, i, p), alpha=eps)
    losses = torch.stack(plus + minus)
    check_finite(losses, step)
    g = est.projected_grad(losses[:q], losses[q:], eps, normalize)
    for i in range(q):  # the same update as est.update, one query at a time (no stored noise)
        for j, p in enumerate(params):
            p.copy_(est.update(p, z(j, i, p)[None], g[i:i + 1], lr / q))
    return ZOStep(losses, g)
