#!/usr/bin/env python
"""What a P-RGE step costs when only the top decoder layers are perturbed and the rest is cached (issue 20).

    python benchmarks/top_layers.py --from 15 22 26 --threads 1

With LoRA only on layers L..N-1, the residual stream entering layer L does not depend on B, so a device
could compute it once per training row (one forward) and run each step's 2q·b-row forward through the
top N - L layers only. This measures that step against today's whole-model step on the same batch
(SmolLM2-135M, SST-2 earlier prompt, q = 4, b = 4): the cache is emulated by replacing the layers below
L with pass-throughs and the token embedding with the cached states, so the step's code (`prge_step`,
the loss) is the one the trainer runs. It also checks that the cached step's losses equal the full
step's. One JSON line per L to benchmarks/results/top_layers.jsonl; merit.py's "top k layers only"
rows predict the per-step side (docs/optimiser.md section 8).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from prge.config import TrainConfig  # noqa: E402
from prge.data.batch import collate  # noqa: E402
from prge.data.classification import EARLIER_SST2_TEMPLATE  # noqa: E402
from prge.io import append_jsonl  # noqa: E402
from prge.run.train import prepare  # noqa: E402
from prge.zo.step import prge_step  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "top_layers.jsonl"


class PassThrough(nn.Module):
    """A decoder layer whose output is its input: the layers below the cache."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class Cached(nn.Module):
    """Stands in for the token embedding: returns the cached states entering layer L, one block per copy."""

    def __init__(self, states: torch.Tensor):
        super().__init__()
        self.states = states

    def forward(self, input_ids):
        return self.states.repeat(input_ids.shape[0] // self.states.shape[0], 1, 1)


def timed_steps(s, batch, n: int, q: int) -> tuple[list[float], torch.Tensor]:
    times, losses = [], None
    for _ in range(n):
        t = time.perf_counter()
        r = prge_step(s.model, s.params, s.loss_fn, batch, 0, seed=0, q=q, eps=1e-2, lr=0.0)
        times.append(time.perf_counter() - t)
        losses = r.losses
    return times, losses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="start", type=int, nargs="+", default=[15, 22, 26], help="first perturbed layer L")
    p.add_argument("--q", type=int, default=4)
    p.add_argument("--b", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per setting (the median is kept)")
    p.add_argument("--batches", type=int, default=3, help="distinct training batches timed")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    for start in a.start:
        # LoRA on layer L and every layer above it (64: more than any built-in model has)
        cfg = TrainConfig(task="sst2", template=EARLIER_SST2_TEMPLATE, layers=list(range(start, 64)), seed=0,
                          threads=a.threads, progress=False, q=a.q, batch_size=a.b)
        s = prepare(cfg)
        body = s.model.get_decoder() if hasattr(s.model, "get_decoder") else s.model.model
        n_layers = len(body.layers)
        full_t, cached_t, diffs, tokens = [], [], [], []
        for k in range(a.batches):
            batch = collate(s.train[k * a.b:(k + 1) * a.b], s.pad_id)
            tokens.append(int(batch.input_ids.shape[1]))
            tf, lf = timed_steps(s, batch, a.repeats, a.q)
            grab = {}

            def keep(module, args, kwargs):
                grab["h"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

            h = body.layers[start].register_forward_pre_hook(keep, with_kwargs=True)
            with torch.no_grad():
                s.model(input_ids=batch.input_ids, use_cache=False)
            h.remove()
            layers, embed = body.layers, body.embed_tokens
            body.layers = nn.ModuleList([PassThrough() for _ in range(start)] + list(layers[start:]))
            body.embed_tokens = Cached(grab["h"])
            try:
                tc, lc = timed_steps(s, batch, a.repeats, a.q)
            finally:
                body.layers, body.embed_tokens = layers, embed
            full_t.append(statistics.median(tf))
            cached_t.append(statistics.median(tc))
            diffs.append(float((lf - lc).abs().max()))
        row = {"model": cfg.model, "task": "sst2", "template": "EARLIER", "first_layer": start, "layers": n_layers - start,
               "n_layers": n_layers, "q": a.q, "b": a.b, "full_step_s": statistics.mean(full_t),
               "cached_step_s": statistics.mean(cached_t), "cost_fraction": statistics.mean(cached_t) / statistics.mean(full_t),
               "max_loss_diff": max(diffs), "tokens": tokens,
               "threads": a.threads, "machine": f"{platform.machine()}, {os.cpu_count()} cores",
               "date": time.strftime("%Y-%m-%d %H:%M")}
        print(f"layers {start}..{n_layers - 1}: full step {row['full_step_s']:.2f} s, from the cache {row['cached_step_s']:.2f} s "
              f"(x{row['cost_fraction']:.2f}); losses differ by at most {row['max_loss_diff']:.2e}", flush=True)
        if not a.no_write:
            append_jsonl(RESULTS, row)


if __name__ == "__main__":
    main()
