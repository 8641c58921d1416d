"""The zeroth-order arithmetic, once: noise, perturbation, projected gradient, update.

Everything here is plain tensor ops so that the eager trainers (`prge`, `mezo`) and the exported
ExecuTorch step (`prge.engine.export`) call the very same functions; the parity tests keep them honest.

Randomized gradient estimate with q queries (arXiv 2409.15520, eq. 1):

    g_i = (L(θ + ε z_i) − L(θ − ε z_i)) / 2ε,   θ ← θ − η · (1/q) Σ_i g_i z_i,   z_i ~ N(0, I).

Noise. z for (tensor j, query i) at step t is a pure function of (seed, t, j, i, element index):
an integer hash of those numbers, made uniform, then Box–Muller. It is written in int64 tensor ops
(multiply, xor, mask and right shift; the exporter lets `bitwise_right_shift`, whose portable
kernel exists, past the core-ATen check) so the
engine draws bit-identical integers to eager PyTorch, and any query's noise can be regenerated alone
(this is MeZO's "seed trick": z is never stored). `noise="torch"` instead draws with a
`torch.Generator` seeded from the same numbers: faster for full-parameter MeZO (135M values), but
eager-only.
"""

from __future__ import annotations

import math

import torch

from prge.errors import PrgeError


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32, an integer finaliser, in place on an int32 tensor (multiplication wraps mod 2^32).

    `(x >> k) & mask` is a logical right shift of the 32-bit pattern; in-place ops keep the eager
    cost near 35 ms per million values on 2 cores.
    """
    x ^= (x >> 16) & 0xFFFF
    x *= 0x7FEB352D
    x ^= (x >> 15) & 0x1FFFF
    x *= -2073254261  # 0x846CA68B as a signed 32-bit value
    x ^= (x >> 16) & 0xFFFF
    return x


def stream_keys(key: torch.Tensor, streams: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 32-bit keys per (tensor, query) stream from key = int64 tensor [seed, step].

    key[0:1], not key[0]: ExecuTorch's edge passes promote 0-dim int32 tensors combined with Python
    ints to int64, which would break the 32-bit wrap-around; (1,)-shaped tensors stay int32.
    """
    k = _mix32(key[0:1].to(torch.int32) * -1640531535 + streams)  # 0x9E3779B1
    k = _mix32(k + key[1:2].to(torch.int32) * -2048144789 + 0x632BE59B)  # 0x85EBCA6B
    return k, _mix32(k ^ 0x5BD1E995)


def counter_normal_streams(key: torch.Tensor, streams: list[int], n: int, first: torch.Tensor | None = None) -> torch.Tensor:
    """(len(streams), n) standard normal noise, row s a pure function of (key, streams[s] + first, index).

    `first` (an int tensor of shape (1,), or None for 0) shifts every stream id at run time: an
    exported program that takes it as an input draws the noise of any block of global query ids
    (the engine fleet: a rank's queries start at its offset), bit-identical to the same ids drawn here.

    Two hash rounds with the key entering each (so streams are not shifted copies of one sequence),
    a 24-bit uniform in (0, 1), and Box–Muller using both the cosine and the sine half. All streams
    of one size are drawn as one matrix: in an exported graph that is a few dozen nodes instead of a
    few dozen per (layer, query), and XNNPACK lowering time grows with the node count.
    """
    m = (n + 1) // 2
    ids = torch.tensor(streams, dtype=torch.int32, device=key.device)
    k1, k2 = stream_keys(key, ids if first is None else ids + first.to(torch.int32))
    x = torch.arange(2 * m, dtype=torch.int32, device=key.device)[None, :] + k1[:, None]
    x = _mix32(x)
    x ^= k2[:, None]
    x = _mix32(x)
    u = ((x >> 8) & 0xFFFFFF).to(torch.float32).add_(0.5).mul_(1.0 / 16777216.0)
    r = torch.log(u[:, :m]).mul_(-2.0).sqrt_()
    a = u[:, m:] * (2.0 * math.pi)
    return torch.cat([r * torch.cos(a), r * torch.sin(a)], dim=1)[:, :n]


def counter_normal(key: torch.Tensor, stream: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal noise of `shape` for one stream."""
    return counter_normal_streams(key, [stream], math.prod(shape)).reshape(shape)


def torch_normal(seed: int, step: int, stream: int, shape: tuple[int, ...], device=None) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + step) * 10_007 + stream)
    return torch.randn(shape, generator=gen).to(device)


def noise(key: torch.Tensor, tensor_index: int, query: int, shape: tuple[int, ...], kind: str = "counter") -> torch.Tensor:
    """z for (tensor j, query i) under key = [seed, step]: one query alone (MeZO regenerates it)."""
    if kind == "counter":
        return counter_normal(key, stream(tensor_index, query), shape)
    return torch_normal(int(key[0]), int(key[1]), stream(tensor_index, query), shape, key.device)


def stream(tensor_index: int, query: int) -> int:
    return tensor_index * 65537 + query


def query_noise(key: torch.Tensor, tensor_index: int, q: int, shape: tuple[int, ...], kind: str = "counter") -> torch.Tensor:
    """(q, *shape): the noise of all q queries for one tensor."""
    if kind != "counter":
        return torch.stack([noise(key, tensor_index, i, shape, kind) for i in range(q)])
    streams = [stream(tensor_index, i) for i in range(q)]
    return counter_normal_streams(key, streams, math.prod(shape)).reshape(q, *shape)


def all_noise(key: torch.Tensor, q: int, shapes: list[tuple[int, ...]], kind: str = "counter",
              first: torch.Tensor | None = None, tensors: list[int] | None = None) -> list[torch.Tensor]:
    """[(q, *shape_j)]: the noise of all q queries for every trained tensor j, under key = [seed, step].

    The eager P-RGE step and the exported step both call this; tensors of equal size share one draw.
    With `first` (a (1,) int tensor, counter noise only) the queries are first .. first + q − 1: the
    same values as all_noise(key, first + q)[first:], without drawing the others. With `tensors` (indices
    into `shapes`) only those tensors' noise is drawn, in that order, the same values as in the full draw
    (the exported step draws a few layers at a time, `noise_chunks`, to keep its planned memory small).
    """
    if first is not None and kind != "counter":
        raise PrgeError("a query offset needs the counter noise", "use noise 'counter'")
    wanted = list(range(len(shapes))) if tensors is None else list(tensors)
    if kind != "counter":
        return [query_noise(key, j, q, shapes[j], kind) for j in wanted]
    groups: dict[int, list[int]] = {}
    for j in wanted:
        groups.setdefault(math.prod(shapes[j]), []).append(j)
    out: dict[int, torch.Tensor] = {}
    for n, js in groups.items():
        z = counter_normal_streams(key, [stream(j, i) for j in js for i in range(q)], n, first).reshape(len(js), q, n)
        for t, j in enumerate(js):
            out[j] = z[t].reshape(q, *shapes[j])
    return [out[j] for j in wanted]


def noise_chunks(q: int, shapes: list[tuple[int, ...]], max_values: int) -> list[list[int]]:
    """Consecutive runs of tensor indices whose noise for q queries holds at most `max_values` values
    (a tensor larger than that is a run of its own): how the exported step splits its draw."""
    chunks: list[list[int]] = []
    size = 0
    for j, s in enumerate(shapes):
        n = q * math.prod(s)
        if not chunks or size + n > max_values:
            chunks.append([])
            size = 0
        chunks[-1].append(j)
        size += n
    return chunks


def perturbed(b: torch.Tensor, z: torch.Tensor, eps, signs: str = "+-") -> torch.Tensor:
    """Copies of B: "+-" gives (2q, ...) = [B + εz_1..q, B − εz_1..q] (dual); "+" or "-" gives q."""
    parts = {"+": b + eps * z, "-": b - eps * z}
    return torch.cat([parts[s] for s in signs]) if len(signs) > 1 else parts[signs]


def projected_grad(loss_plus: torch.Tensor, loss_minus: torch.Tensor, eps, normalize: bool = False) -> torch.Tensor:
    """g_i = (L⁺_i − L⁻_i) / 2ε, one scalar per query.

    normalize=True divides the differences by the spread of all 2q losses instead of by 2ε (as FZOO
    does): g_i = (L⁺_i − L⁻_i) / (2·std(L)), so the step size stops depending on the loss scale and ε.
    It needs q >= 2 (one pair has no spread); the host computes it, so the exported step is unchanged.
    """
    if normalize:
        spread = torch.cat([loss_plus, loss_minus]).std()
        return (loss_plus - loss_minus) / (2.0 * spread.clamp_min(1e-12))
    return (loss_plus - loss_minus) / (2.0 * eps)


def update(b: torch.Tensor, z: torch.Tensor, g: torch.Tensor, lr) -> torch.Tensor:
    """B − η · (1/q) Σ_i g_i z_i   (z: (q, *B.shape), g: (q,))."""
    q = z.shape[0]
    step = (g.reshape(q, *([1] * (z.dim() - 1))) * z).sum(0) / q
    return b - lr * step


def rebuild(copies: torch.Tensor, eps) -> tuple[torch.Tensor, torch.Tensor]:
    """From dual copies [B + εz ; B − εz] (2q, ...) back to the clean B and z (q, ...).

    This is how the exported step keeps its whole state in the copies it already needs for the
    forward: no separate clean B buffer, so state read/write is the copies plus ε and the step.
    """
    q = copies.shape[0] // 2
    plus, minus = copies[:q], copies[q:]
    b = ((plus + minus) * 0.5).mean(0)
    z = (plus - minus) / (2.0 * eps)
    return b, z


def cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-element CE in logsumexp form; target holds indices into the last dimension."""
    m = logits.amax(-1, keepdim=True).detach()
    lse = torch.log(torch.exp(logits - m).sum(-1)) + m.squeeze(-1)
    return lse - torch.gather(logits, -1, target.unsqueeze(-1)).squeeze(-1)
