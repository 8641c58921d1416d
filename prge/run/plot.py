"""A run's curves as a PNG: training loss per step (with a moving average) and dev accuracy."""

from __future__ import annotations

import json
from pathlib import Path

from prge import io


def plot(metrics: Path, out: Path) -> None:
    """Loss per step (with a moving average) and dev accuracy, as a PNG."""
    import io as _io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    tr = [r for r in rows if "loss" in r and "split" not in r]
    ev = [r for r in rows if r.get("split") == "dev"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    if tr:
        xs, ys = [r["step"] for r in tr], [r["loss"] for r in tr]
        a.plot(xs, ys, alpha=0.35, lw=0.8, label="step loss")
        w = max(1, len(ys) // 20)
        avg = [sum(ys[max(0, i - w + 1):i + 1]) / len(ys[max(0, i - w + 1):i + 1]) for i in range(len(ys))]
        a.plot(xs, avg, lw=1.5, label=f"moving average ({w})")
        a.legend()
    a.set(xlabel="step", ylabel="training loss", title="loss")
    if ev:
        b.plot([r["step"] for r in ev], [r["accuracy"] for r in ev], marker="o")
    b.set(xlabel="step", ylabel="dev accuracy", title="dev accuracy")
    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    io.atomic_write_bytes(out, buf.getvalue())

