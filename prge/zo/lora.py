"""Multi-perturbed LoRA-FA ("MP-LoRA"): one frozen A, a trained B, and C perturbed copies of B.

For a target linear y = W x (+ bias), the wrapped layer computes

    y = W x + (alpha / r) · B_k (A x)        for the rows of block k of the batch,

with W and A frozen (A: r × in, Kaiming-uniform like PEFT), and B (out × r, zero-initialised).
During a zeroth-order step the batch is the minibatch repeated C times and block k uses copy k of
B (`copies`, shape (C, out, r)): A x is computed once for the whole repeated batch, and only the
r-wide product is batched over copies — the extra memory of evaluating 2q perturbed models at once
is C copies of B, not C copies of the model.

`copies` is a registered buffer so that an exported ExecuTorch program can hold it as mutable state
and write it in-graph. Which B a forward uses is chosen by `with using(model, ...)` (reset on exit):
- `None` (default): the clean B, the whole batch is one block (evaluation, first-order training);
- a tensor of shape (C, out, r): block k of the batch uses row k (set by the estimator or by the
  exported step from tensors it computed in-graph);
- the string "copies": the `copies` buffer.

Plain LoRA (`train_a=True`) trains A too (first-order only). GPT-2's Conv1D (weight stored in × out)
is handled by reading its shape; the base layer is called unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import math
import re

import torch
from torch import nn

from prge.errors import PrgeError

PAPER_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Names of the same projections in other families (used when the default targets are asked for).
FAMILY_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],  # q/k/v and gate/up are fused
}


def in_out(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear layer that LoRA can wrap."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    if type(base).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: weight (in, out)
        return base.weight.shape[0], base.weight.shape[1]
    raise PrgeError(f"cannot wrap a {type(base).__name__} with LoRA", "target nn.Linear (or GPT-2 Conv1D) modules only")


class MPLoRALinear(nn.Module):
    def __init__(self, base: nn.Module, rank: int, alpha: float, copies: int = 1, train_a: bool = False):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = in_out(base)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        w = base.weight
        a = torch.empty(rank, self.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's initialisation of A, drawn on the CPU: same A on every device
        self.lora_A = nn.Parameter(a.to(w.device), requires_grad=train_a)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=torch.float32, device=w.device))
        self.register_buffer("copies", torch.zeros(copies, self.out_features, rank, dtype=torch.float32, device=w.device))
        self._use: torch.Tensor | str | None = None

    def use(self, b: torch.Tensor | str | None) -> None:
        self._use = b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        ax = nn.functional.linear(x.to(self.lora_A.dtype), self.lora_A)  # (N, T, r): A x once for all copies
        b = self._use
        if b is None:
            d = nn.functional.linear(ax, self.lora_B)
        else:
            if isinstance(b, str):
                b = self.copies
            c = b.shape[0]
            shape = ax.shape
            d = torch.bmm(ax.reshape(c, -1, self.rank), b.transpose(1, 2))  # block k · B_kᵀ
            d = d.reshape(*shape[:-1], self.out_features)
        if d.dtype == y.dtype:
            return y.add_(d, alpha=self.scale)  # in place: y is the base layer's fresh output
        return y + (self.scale * d).to(y.dtype)


def add_lora(model: nn.Module, targets: list[str] | None = None, rank: int = 16, alpha: float = 32.0,
             copies: int = 1, train_a: bool = False, layers: list[int] | None = None, seed: int = 0) -> list[str]:
    """Wrap the target linears of `model` in place; freeze everything but B (and A if `train_a`).

    `targets` are module leaf names (default: the paper's 7 projections, or the family's
    equivalents) or exact full module names such as "model.layers.0.self_attn.q_proj" (what a PEFT
    adapter that covers only some layers lists); `layers` restricts to those decoder layer indices.
    A is drawn from a generator seeded with `seed` in module order, so the same seed gives the same
    A on every machine.
    Returns the wrapped module names.
    """
    if rank < 1:
        raise PrgeError(f"LoRA rank must be >= 1, got {rank}", "pass --rank 1 or more")
    targets = targets or FAMILY_TARGETS.get(getattr(model.config, "model_type", ""), PAPER_TARGETS)
    for p in model.parameters():
        p.requires_grad_(False)
    names = []
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for name, module in list(model.named_modules()):
            leaf = name.rsplit(".", 1)[-1]
            if (leaf not in targets and name not in targets) or isinstance(module, MPLoRALinear):
                continue
            if layers is not None:
                m = re.search(r"\.(\d+)\.", name)
                if m is None or int(m.group(1)) not in layers:
                    continue
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, leaf, MPLoRALinear(module, rank, alpha, copies, train_a))
            names.append(name)
    finally:
        torch.random.set_rng_state(gen_state)
    if not names:
        found = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"})
        raise PrgeError(f"target modules {targets} match nothing in this model", f"choose among its linear layers: {found}")
    return names


def lora_layers(model: nn.Module) -> dict[str, MPLoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MPLoRALinear)}


def set_copies(model: nn.Module, n: int) -> None:
    """Resize every layer's `copies` buffer to n copies (contents: the clean B)."""
    for m in lora_layers(model).values():
        m.copies = m.lora_B.detach()[None].repeat(n, 1, 1).contiguous()


@contextlib.contextmanager
def using(model: nn.Module, per_layer: list[torch.Tensor] | str | None) -> Iterator[None]:
    """Within the block every LoRA layer uses `per_layer` as its B (see the module docstring); after
    it, even on an exception, each is back on its clean B."""
    layers = list(lora_layers(model).values())
    try:
        for i, m in enumerate(layers):
            m.use(per_layer[i] if isinstance(per_layer, list) else per_layer)
        yield
    finally:
        for m in layers:
            m.use(None)


def trainable_b(model: nn.Module) -> list[torch.Tensor]:
    return [m.lora_B for m in lora_layers(model).values()]


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
