"""Where LoRA-FA perturbs: the frozen A matrices, at random or chosen from the data.

With A frozen, a perturbation z of B moves the weight by ΔW = (alpha/r)·z·A, so the rows of A span the
input directions a zeroth-order step can explore. A random A (PEFT's Kaiming init, `prge.zo.lora`)
spreads them evenly; `activation_basis` puts them along the top-r principal directions of each
wrapped module's inputs over training rows — the span a linear layer's weight gradient lies in
(it is Σ_t δ_t x_tᵀ) — computed with forward passes only, so the device could compute it too.
docs/optimiser.md has what each choice predicts and measures.

`A_SCALE` keeps the Frobenius norm of a data A equal to a random A's (E|A|² = r/3 for PEFT's
Kaiming-uniform init), so the lr keeps its meaning across choices.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import torch

from prge.data.batch import Batch
from prge.errors import PrgeError
from prge.zo.lora import lora_layers
from prge.zo.loss import body

A_CHOICES = ("random", "activations")
A_SCALE = 1 / math.sqrt(3)


@torch.no_grad()
def activation_basis(model: torch.nn.Module, batches: Iterable[Batch], rank: int) -> dict[str, torch.Tensor]:
    """{module name: A (rank, in)}: the top-`rank` eigenvectors of E[x xᵀ] of each LoRA layer's input
    over the real tokens of `batches` (up to each row's last scored position), scaled by `A_SCALE`.

    One forward per batch, no head, no gradients. Signs are fixed (largest entry positive) so that
    the same data gives the same A on every machine up to float rounding."""
    layers = lora_layers(model)
    moments = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in layers.items()}
    valid: list[torch.Tensor] = []

    def hook(name):
        def capture(module, args):
            x = args[0].detach().to(torch.float64)
            keep = valid[0].to(x.device)
            rows = x[keep]  # (tokens, in)
            moments[name] += (rows.T @ rows).cpu()
        return capture

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    tokens = 0
    try:
        for batch in batches:
            T = batch.input_ids.shape[1]
            last = batch.target_pos.max(dim=1).values
            valid[:] = [torch.arange(T, device=last.device)[None, :] <= last[:, None]]
            tokens += int(valid[0].sum())
            body(model)(input_ids=batch.input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if tokens == 0:
        raise PrgeError("no training tokens to compute an activation basis from", "check the training data")
    out = {}
    for name, mom in moments.items():
        if rank > mom.shape[0]:
            raise PrgeError(f"LoRA rank {rank} exceeds the input size {mom.shape[0]} of {name}", "pass a smaller --rank")
        _, vecs = torch.linalg.eigh(mom / tokens)
        top = vecs[:, -rank:].flip(1).T  # (rank, in), largest eigenvalue first
        sign = torch.sign(top.gather(1, top.abs().argmax(1, keepdim=True)))
        out[name] = (top * sign * A_SCALE).to(torch.float32)
    return out


def set_a(model: torch.nn.Module, a: dict[str, torch.Tensor], where: str = "the A matrices") -> None:
    """Copy A matrices into the model's LoRA layers; every layer must get one of its shape."""
    layers = lora_layers(model)
    missing = sorted(set(layers) - set(a))
    if missing:
        raise PrgeError(f"{where} lack {len(missing)} of the model's LoRA layers (e.g. {missing[0]})",
                        "make them for this model, --targets and --rank")
    with torch.no_grad():
        for name, m in layers.items():
            if tuple(a[name].shape) != tuple(m.lora_A.shape):
                raise PrgeError(f"{where}: {name} is {tuple(a[name].shape)}, the model's A is {tuple(m.lora_A.shape)}",
                                "make them for this model, --targets and --rank")
            m.lora_A.copy_(a[name].to(m.lora_A.dtype))


def load_a(path: str | Path) -> dict[str, torch.Tensor]:
    """A matrices saved by `save_a` (or any safetensors file of {module name: A})."""
    from prge import io

    p = Path(path)
    if not p.is_file():
        raise PrgeError(f"A matrices file {p} not found", "pass a .safetensors file written by prge, or --lora-a random")
    return io.load_tensors(p)


def save_a(model: torch.nn.Module, path: str | Path) -> None:
    from prge import io

    io.save_tensors(path, {n: m.lora_A.detach().contiguous() for n, m in lora_layers(model).items()})
