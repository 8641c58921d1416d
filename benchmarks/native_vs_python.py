"""Step time and peak RSS of the native (C++) device trainer vs the Python engine loop, same program.

    python benchmarks/native_vs_python.py [--program X.pte --data D.safetensors] [--steps 30] [--threads 1]

Without --program it exports the tiny test program (2-layer Llama, q=2, b=2, T=24; ~1-2 min of
XNNPACK lowering) into ~/.cache/prge/bench/native. Each loop runs in its own process with the same
settings; step time is the mean of metrics.jsonl's per-step "seconds" (batch gather + train_step +
g, the same span in both loops) after `--warmup` steps; peak RSS is the process's VmHWM
(/proc/self/status), which for Python includes importing torch and executorch. Parity of the two
runs (max |Δloss| per step, max |ΔB|) is printed too. Results are appended to
benchmarks/results/native_vs_python.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PY_RUNNER = r"""
import json, sys
from prge.engine.runtime import device_train
a = json.loads(sys.argv[1])
device_train(a["program"], a["data"], a["out"], steps=a["steps"], lr=a["lr"], eps=a["eps"], seed=a["seed"],
             eval_every=0, progress=False, log=lambda m: None)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print(json.dumps({"peak_rss_mb": int(hwm) / 1024}))
"""


def export_tiny(root: Path) -> tuple[Path, Path]:
    program, data = root / "tiny.pte", root / "tiny.data.safetensors"
    if program.is_file() and data.is_file():
        return program, data
    from prge.config import TrainConfig
    from prge.engine.export import export_program
    from prge.engine.formats import write_dataset
    from prge.testing import save_tiny
    from prge.run.train import prepare

    root.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(model=save_tiny(root / "model"), task="sst2", n_train=32, n_dev=16, n_test=4, q=2,
                      batch_size=2, max_length=24, rank=4, alpha=8.0, seed=0, progress=False)
    s = prepare(cfg)
    m = export_program(s.model, s.tokenizer, s.label_ids, q=2, batch_size=2, max_length=24, loss="class",
                       out_path=program, model_name=cfg.model)
    write_dataset(data, s, m)
    return program, data


def step_rows(out: Path) -> list[dict]:
    return [r for r in (json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()) if "split" not in r]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--program")
    p.add_argument("--data")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-2)
    p.add_argument("--eps", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    from prge.engine import native
    from prge.engine.formats import final_b, load_manifest

    if a.program:
        program = Path(a.program)
        data = Path(a.data) if a.data else program.with_suffix(".data.safetensors")
    else:
        program, data = export_tiny(Path.home() / ".cache" / "prge" / "bench" / "native")
    exe = native.build()
    manifest = load_manifest(program)
    settings = {"program": str(program), "data": str(data), "steps": a.steps, "lr": a.lr, "eps": a.eps, "seed": a.seed}
    with tempfile.TemporaryDirectory() as tmp:
        py_out, nat_out = Path(tmp) / "py", Path(tmp) / "nat"
        t0 = time.time()
        r = subprocess.run([sys.executable, "-c", PY_RUNNER, json.dumps({**settings, "out": str(py_out)})],
                           capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        if r.returncode:
            print(r.stderr[-2000:], file=sys.stderr)
            return 1
        py_wall = time.time() - t0
        py_rss = json.loads(r.stdout.strip().splitlines()[-1])["peak_rss_mb"]
        t0 = time.time()
        s = native.native_train(program, data, nat_out, steps=a.steps, lr=a.lr, eps=a.eps, seed=a.seed, eval_every=0,
                                binary=exe, threads=a.threads, log=lambda m: None)
        nat_wall = time.time() - t0
        rp, rn = step_rows(py_out), step_rows(nat_out)
        mean = lambda rows: sum(x["seconds"] for x in rows[a.warmup:]) / max(len(rows) - a.warmup, 1)  # noqa: E731
        d_loss = max(abs(x["loss"] - y["loss"]) for x, y in zip(rp, rn))
        bp, bn = final_b(py_out), final_b(nat_out)
        d_b = max(float((bp[k] - bn[k]).abs().max()) for k in bp)
    result = {"program": program.name, "model": manifest["model"], "q": manifest["q"], "b": manifest["batch_size"],
              "T": manifest["max_length"], "steps": a.steps, "threads": a.threads,
              "python": {"step_s": mean(rp), "peak_rss_mb": py_rss, "process_wall_s": py_wall},
              "native": {"step_s": mean(rn), "peak_rss_mb": s["peak_rss_mb"], "process_wall_s": nat_wall},
              "max_abs_dloss": d_loss, "max_abs_dB": d_b, "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(json.dumps(result, indent=2))
    out = ROOT / "benchmarks" / "results" / "native_vs_python.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(result) + "\n")
    print(f"| loop | step time (ms) | peak RSS (MB) | process wall (s) |\n|---|---|---|---|\n"
          f"| Python engine loop | {1e3 * result['python']['step_s']:.2f} | {py_rss:.0f} | {py_wall:.1f} |\n"
          f"| native C++ | {1e3 * result['native']['step_s']:.2f} | {s['peak_rss_mb']:.0f} | {nat_wall:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
