#!/usr/bin/env python
"""How much can the label readout learn with more training rows or a higher rank? (issue 20)

    python benchmarks/readout_probe.py --task sst2 --template EARLIER --rows 8000 [--threads 1]

The prediction for a readout (docs/optimiser.md section 7) is the linear-probe ceiling: the test
accuracy of the readout's own parameterisation, label logits W_L h + B (A h) with A the whitened
top-r basis of `prge.zo.readout.basis`, when B is fitted by L-BFGS on exact gradients (server-side
maths) instead of zeroth-order. This script computes the final hidden states of `--rows` training
rows, the dev rows and the test rows once (cached under ~/.cache/prge/bench/readout_probe/), then
fits the probe for every (rows used, rank) pair, picks the L2 weight on dev, and appends one row per
pair to benchmarks/results/readout_probe.jsonl. A pair whose ceiling clears the target is the one
to measure with `prge train --steps 0 --readout R --readout-rows N`.

    python benchmarks/readout_probe.py --layers 10 15 20 25 30 --rows 2000 --use 1000 2000

`--layers` probes the hidden states of other layers (HF hidden_states index: 0 the embeddings, the
last the final normed state the readout reads today) at the answer position, with the same
parameterisation (head's zero-shot label logits + B (A h_l)): whether a readout on an intermediate
layer (a side readout, not a LoRA on the head) would have a higher ceiling. Rows get "layer".

    python benchmarks/readout_probe.py --pool --rows 4000 --use 1000 2000 4000 --ranks 64 256

`--pool` probes features that are not the answer position's alone: the mean of a layer's hidden
states over the prompt's tokens ("mean@L"), and concatenations with the answer position's state
("last@30+mean@L"), same parameterisation (head's zero-shot label logits + B (A x)). Rows get
"features". Whether a readout on pooled states would lift the ceiling the answer position sets.
`--pool SPEC ... --mlp 64 256` fits a one-hidden-layer GELU network (AdamW, exact gradients) on
those features instead: whether a nonlinear readout would. Rows get "mlp" (its hidden width).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from prge.config import TrainConfig  # noqa: E402
from prge.data.classification import EARLIER_SST2_TEMPLATE  # noqa: E402
from prge.run.train import prepare  # noqa: E402
from prge.zo import readout  # noqa: E402
from prge.zo.loss import label_head  # noqa: E402

CACHE = Path(os.environ.get("PRGE_BENCH_CACHE", Path.home() / ".cache" / "prge" / "bench")) / "readout_probe"
OUT = ROOT / "benchmarks" / "results" / "readout_probe.jsonl"


def template(name: str) -> str | None:
    """--template: EARLIER for SST-2's earlier prompt, DEFAULT for the task's own (`prge train`'s), else the text."""
    return {"EARLIER": EARLIER_SST2_TEMPLATE, "DEFAULT": None}.get(name, name)


def cached_features(a, suffix: str, rows_of) -> dict:
    """{split: rows_of(prepared run, items, batch size), "seconds"} for train/dev/test, computed once and
    cached under CACHE (the file name says model, task, prompt, rows and `suffix`)."""
    path = CACHE / f"{a.model}-{a.task}-{a.template.lower() if a.template in ('EARLIER', 'DEFAULT') else 'custom'}-{a.rows}{suffix}.pt"
    if path.is_file():
        return torch.load(path)
    cfg = TrainConfig(model=a.model, task=a.task, template=template(a.template),
                      n_train=a.rows, steps=0, progress=False, threads=a.threads, readout=0)
    s = prepare(cfg)
    out = {}
    t0 = time.time()
    for split, items in (("train", s.train), ("dev", s.dev), ("test", s.test)):
        out[split] = rows_of(s, items, cfg.eval_batch_size)
        print(f"{split}: {len(items)} rows, {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    out["seconds"] = time.time() - t0
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


def features(a) -> dict:
    """{split: {"h": (N, H) the final hidden state at the answer position, "y", "base"}}."""
    def rows_of(s, items, batch_size):
        h, y = readout.features(s.model, items, s.pad_id, batch_size)
        return {"h": h, "y": y, "base": label_head(s.model, h, s.label_ids)}

    return cached_features(a, "", rows_of)


def pooled_features(a) -> dict:
    """{split: {"hl": (N, L+1, H) every layer's state at the answer position, "ml": (N, L+1, H) every layer's
    mean over the prompt's tokens (positions 0 .. answer position), "y", "base"}}."""
    from prge.data.batch import collate
    from prge.zo.loss import body

    @torch.no_grad()
    def rows_of(s, items, batch_size):
        hs, ms, ys = [], [], []
        for i in range(0, len(items), batch_size):
            b = collate(items[i:i + batch_size], s.pad_id)
            states = torch.stack(body(s.model)(input_ids=b.input_ids, use_cache=False, output_hidden_states=True).hidden_states, 1).float()
            pos = b.target_pos[:, 0]
            keep = (torch.arange(states.shape[2])[None, :] <= pos[:, None]).float()  # (b, T): the prompt's tokens
            hs.append(states[torch.arange(len(pos)), :, pos])
            ms.append((states * keep[:, None, :, None]).sum(2) / keep.sum(1)[:, None, None])
            ys.append(b.label)
        h = torch.cat(hs)
        return {"hl": h, "ml": torch.cat(ms), "y": torch.cat(ys), "base": label_head(s.model, h[:, -1], s.label_ids)}

    return cached_features(a, "-pool", rows_of)


POOLS = ("last@30", "mean@30", "mean@24", "mean@20", "mean@16", "last@30+mean@30", "last@30+mean@24",
         "last@30+mean@20", "last@30+mean@16", "last@30+last@24", "last@30+last@24+mean@24+mean@16")


def pooled(fp: dict, spec: str) -> dict:
    """The features `spec` names ("last@L" / "mean@L", joined by "+"), each part divided by its rms over the
    training rows so no part's scale dominates the basis."""
    def part(split: str, name: str) -> torch.Tensor:
        kind, layer = name.split("@")
        return fp[split]["hl" if kind == "last" else "ml"][:, int(layer)]
    out = {}
    for split in ("train", "dev", "test"):
        xs = [part(split, n) / part("train", n).pow(2).mean().sqrt() for n in spec.split("+")]
        out[split] = {"h": torch.cat(xs, 1), "y": fp[split]["y"], "base": fp[split]["base"]}
    out["seconds"] = fp["seconds"]
    return out


def probe(f: dict, rows: int, rank: int, l2: float) -> tuple[float, float]:
    """(dev accuracy, test accuracy) of B fitted by L-BFGS on the first `rows` training rows."""
    tr = f["train"]
    a = readout.basis(tr["h"][:rows], rank)
    x = {k: f[k]["h"] @ a.T for k in ("train", "dev", "test")}
    b = torch.zeros(tr["base"].shape[1], a.shape[0], requires_grad=True)
    opt = torch.optim.LBFGS([b], max_iter=300, line_search_fn="strong_wolfe")
    xt, bt, yt = x["train"][:rows], tr["base"][:rows], tr["y"][:rows]

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(bt + xt @ b.T, yt) + l2 * (b ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        acc = [float(((f[k]["base"] + x[k] @ b.T).argmax(-1) == f[k]["y"]).float().mean()) for k in ("dev", "test")]
    return acc[0], acc[1]


def mlp_probe(f: dict, hidden: int, wd: float, epochs: int = 60) -> tuple[float, float]:
    """(dev, test) accuracy at the best-dev epoch (every 5th) of head's zero-shot logits + MLP(x), the MLP's
    output layer from zero, AdamW lr 1e-3, 64 rows a step, on every training row."""
    torch.manual_seed(0)
    xt, yt, bt = f["train"]["h"], f["train"]["y"], f["train"]["base"]
    net = torch.nn.Sequential(torch.nn.Linear(xt.shape[1], hidden), torch.nn.GELU(), torch.nn.Linear(hidden, bt.shape[1]))
    torch.nn.init.zeros_(net[2].weight)
    torch.nn.init.zeros_(net[2].bias)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=wd)
    best = (0.0, 0.0)
    for epoch in range(epochs):
        perm = torch.randperm(len(yt))
        for i in range(0, len(yt), 64):
            j = perm[i:i + 64]
            loss = torch.nn.functional.cross_entropy(bt[j] + net(xt[j]), yt[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch % 5 == 4:
            with torch.no_grad():
                acc = [float(((f[k]["base"] + net(f[k]["h"])).argmax(-1) == f[k]["y"]).float().mean()) for k in ("dev", "test")]
            best = max(best, tuple(acc), key=lambda t: t[0])
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="sst2")
    p.add_argument("--template", default="EARLIER", help="a prompt template, EARLIER for SST-2's earlier prompt, or DEFAULT for the task's own")
    p.add_argument("--rows", type=int, default=8000, help="training rows whose hidden states are computed")
    p.add_argument("--use", type=int, nargs="+", default=[1000, 2000, 4000, 8000], help="training rows each probe uses")
    p.add_argument("--ranks", type=int, nargs="+", default=[64, 128, 256, 576])
    p.add_argument("--l2", type=float, nargs="+", default=[0.0, 1e-4, 1e-3, 1e-2])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layers", type=int, nargs="+", help="probe these layers' hidden states (see above) instead of the final one")
    p.add_argument("--pool", nargs="*", metavar="SPEC", help=f"probe pooled features (see above); default: {' '.join(POOLS)}")
    p.add_argument("--mlp", type=int, nargs="+", metavar="WIDTH", help="with --pool: fit an MLP of these hidden widths instead (see above)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.pool is not None:
        fp = pooled_features(a)
        for spec in a.pool or POOLS:
            if a.mlp:
                run_mlp_probes(a, pooled(fp, spec), spec)
            else:
                run_probes(a, pooled(fp, spec), {"features": spec})
        return
    if a.layers:
        fl = pooled_features(a)  # its "hl": every layer's state at the answer position
        for layer in a.layers:  # (the rms scaling `pooled` applies leaves the probe as it was: its basis whitens)
            run_probes(a, pooled(fl, f"last@{layer}"), {"layer": layer})
        return
    run_probes(a, features(a), {})


def record(a, fields: dict) -> None:
    """Print one probe's row and append it to OUT, with the model, task, prompt and machine."""
    row = {"model": a.model, "task": a.task, "template": a.template, **fields,
           "machine": f"{platform.machine()} {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}"}
    print(json.dumps(row), flush=True)
    with OUT.open("a") as fh:
        fh.write(json.dumps(row) + "\n")


def run_mlp_probes(a, f: dict, spec: str) -> None:
    """One row per MLP width, its weight decay chosen on dev from 1e-3 / 1e-2 / 1e-1."""
    for width in a.mlp:
        n = len(f["train"]["y"])
        wd, (dev, test) = max(((wd, mlp_probe(f, width, wd)) for wd in (1e-3, 1e-2, 1e-1)), key=lambda t: t[1][0])
        record(a, {"features": spec, "mlp": width, "rows": n, "weight_decay": wd, "dev": dev, "test": test})


def run_probes(a, f: dict, extra: dict) -> None:
    zero = [float((f[k]["base"].argmax(-1) == f[k]["y"]).float().mean()) for k in ("dev", "test")]
    print(f"zero-shot: dev {zero[0]:.4f} test {zero[1]:.4f}; features {f['seconds'] / 60:.1f} min", flush=True)
    for n in a.use:
        if n > len(f["train"]["y"]):
            continue
        for r in a.ranks:
            fits = [(l2, *probe(f, n, r, l2)) for l2 in a.l2]
            l2, dev, test = max(fits, key=lambda t: t[1])  # the L2 weight chosen on dev
            record(a, {**extra, "rows": n, "rank": r, "l2": l2, "dev": dev, "test": test, "zero_shot_dev": zero[0],
                       "zero_shot_test": zero[1], "features_minutes_all_rows": f["seconds"] / 60})


if __name__ == "__main__":
    main()
