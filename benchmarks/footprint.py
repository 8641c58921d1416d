"""Peak memory of `prge device-train` (the native runner and the Python loop), with XNNPACK's
shared packed-weight cache off and on, and what the peak is made of.

    python benchmarks/footprint.py [--model smollm2-135m] [--quantize none 8da4w 8da8w] [--steps 3] [--threads 1]

Programs are exported once with `prge export` (q=4, b=4, T=128, SST-2, 64 train / 32 dev
examples) into ~/.cache/prge/bench/footprint/ and reused. Each (program, loop, cache) runs in its
own process for --steps steps with an evaluation at the end. Per run it appends one row to
benchmarks/results/footprint.jsonl:

    model, quantize, weight_cache, loop ("native" | "python"), peak_rss_mb (VmHWM of the process),
    step_s (mean train_step seconds), weights_mb (the program's constant data: named data and the
    constant segment, read from the .pte), arena_mb (the largest method's planned memory:
    non_const_buffer_sizes; arena_by_method_mb: each method's own part, state_mb: the mutable state
    they share), program_mb (file size), rss_start_mb (runtime / Python+torch+executorch
    imported, before the program), rss_loaded_mb (program, methods and data loaded: the packed
    weights are made here), target_mb (1.25 x (weights + arena): the native target), machine, date;
    rss_parts (anonymous / file-backed / the program's own file pages at start, after loading (native)
    and at the end) and the peak broken down from them: bd_runtime_mb, bd_program_file_mb (the mapped
    constant segment resident), bd_data_mb and bd_packed_weights_and_other_mb (the heap loading added),
    bd_running_added_mb (peak − after loading: the planned arenas' pages and XNNPACK's workspace) beside
    bd_arena_mb; see `breakdown`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "footprint.jsonl"
from prge.engine.formats import min_eps, quantized_min_eps

CACHE = Path(os.environ.get("PRGE_CACHE", Path.home() / ".cache" / "prge")) / "bench" / "footprint"

PY_RUNNER = r"""
import json, os, sys
def rss(key):
    return int([l for l in open("/proc/self/status") if l.startswith(key)][0].split()[1]) / 1024
def parts(program):
    want, mine, mapped = os.path.realpath(program), False, 0.0
    for line in open("/proc/self/smaps"):
        if line.startswith("Rss:"):
            mapped += int(line.split()[1]) / 1024 if mine else 0
        elif "-" in line.split(" ", 1)[0] and not line.split(" ", 1)[0].endswith(":"):
            mine = line.rstrip("\n").endswith(want)
    return {"anon_mb": rss("RssAnon:"), "file_mb": rss("RssFile:"), "program_file_mb": mapped}
import torch, executorch.runtime
from prge.engine.runtime import device_train
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
start, start_parts = rss("VmRSS:"), parts(a["program"])
s = device_train(a["program"], a["data"], a["out"], steps=a["steps"], lr=1e-4, eps=a["eps"], seed=0, eval_every=0,
                 progress=False, weight_cache=a["weight_cache"], log=lambda m: None)
print(json.dumps({"peak_rss_mb": rss("VmHWM:"), "rss_start_mb": start,
                  "rss_parts": {"start": start_parts, "end": parts(a["program"])}}))
"""


def export(model: str, quantize: str | None, threads: int) -> Path:
    out = CACHE / f"{model}-{quantize or 'fp32'}.pte"
    if out.is_file() and out.with_suffix(".data.safetensors").is_file():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "prge", "export", "--model", model, "--task", "sst2", "--q", "4", "--batch-size", "4",
           "--max-length", "128", "--n-train", "64", "--n-dev", "32", "--threads", str(threads), "--out", str(out)]
    cmd += ["--quantize", quantize, "--eps", str(quantized_min_eps(quantize))] if quantize else []
    print("exporting:", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return out


def program_sizes(pte: Path) -> dict:
    """The program's constant data (weights) and its largest planned arena, in MB, from the .pte."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    f = deserialize_pte_binary(pte.read_bytes())
    prog = f.program
    def nbytes(b) -> int:  # AlignedData (.buffer), Buffer (.storage) or bytes
        return len(getattr(b, "buffer", getattr(b, "storage", b)))

    named = sum(nbytes(b) for b in (f.named_data.buffers if f.named_data is not None else []))
    const = sum(nbytes(b) for b in prog.constant_buffer)
    arena = max(sum(p.non_const_buffer_sizes[1:]) for p in prog.execution_plan)
    # each method's own planned memory (buffer 1) beside the mutable state all methods share (buffer 2)
    own = {p.name: p.non_const_buffer_sizes[1] / 2**20 for p in prog.execution_plan if len(p.non_const_buffer_sizes) > 1}
    shared = max((sum(p.non_const_buffer_sizes[2:]) for p in prog.execution_plan), default=0)
    return {"weights_mb": (named + const) / 2**20, "arena_mb": arena / 2**20, "program_mb": pte.stat().st_size / 2**20,
            "arena_by_method_mb": own, "state_mb": shared / 2**20}


def mean_step_s(out: Path) -> float:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    s = [r["seconds"] for r in rows if "split" not in r]
    return sum(s[1:]) / max(len(s) - 1, 1) if len(s) > 1 else s[0]  # the first step warms the caches


def run_native(pte: Path, steps: int, eps: float, cache: bool, threads: int, tmp: Path) -> dict:
    from prge.engine import native
    from prge.engine.formats import load_manifest, read_dataset

    m = load_manifest(pte)
    tensors, _ = read_dataset(pte.with_suffix(".data.safetensors"))
    plan = native.write_plan(tmp / "plan.safetensors", tensors["train_input_ids"].shape[0], m["batch_size"], 0, steps)
    out = tmp / f"native-{cache}"
    cmd = [str(native.build()), "--program", str(pte), "--data", str(pte.with_suffix(".data.safetensors")), "--plan", str(plan),
           "--out", str(out), "--steps", str(steps), "--lr", "1e-4", "--eps", str(eps), "--eval-every", "0",
           "--weight-cache", "on" if cache else "off"]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, stderr=subprocess.DEVNULL)
    info = json.loads((out / "native.json").read_text())
    return {"peak_rss_mb": info["peak_rss_mb"], "step_s": mean_step_s(out), "rss_start_mb": info["rss_start_mb"],
            "rss_loaded_mb": info["rss_loaded_mb"], "rss_parts": info.get("rss_parts")}


def breakdown(res: dict, sizes: dict, data_mb: float) -> dict:
    """The peak by what it is made of (MB): the runtime (and, in Python, torch + executorch imported) before
    the program; the program's file pages resident after loading (the memory-mapped constant segment);
    the heap loading added: the data (its file size) and the rest, which is XNNPACK's packed weights and
    the runtime's own allocations (the planned arenas are allocated then but their pages become resident
    only when a method first runs); and what running the methods added up to the peak (the planned arenas'
    pages, bd_arena_mb from the .pte for comparison, and XNNPACK's workspace)."""
    p = res.get("rss_parts") or {}
    start, loaded = p.get("start"), p.get("loaded")
    if not start or not loaded:  # the Python loop: no reading between loading and the first step
        return {"bd_runtime_mb": res["rss_start_mb"], "bd_run_added_mb": res["peak_rss_mb"] - res["rss_start_mb"]}
    heap = loaded["anon_mb"] - start["anon_mb"]
    return {"bd_runtime_mb": res["rss_start_mb"], "bd_program_file_mb": loaded["program_file_mb"],
            "bd_data_mb": data_mb, "bd_packed_weights_and_other_mb": heap - data_mb,
            "bd_running_added_mb": res["peak_rss_mb"] - res["rss_loaded_mb"], "bd_arena_mb": sizes["arena_mb"]}


def run_python(pte: Path, steps: int, eps: float, cache: bool, threads: int, tmp: Path) -> dict:
    out = tmp / f"python-{cache}"
    a = {"program": str(pte), "data": str(pte.with_suffix(".data.safetensors")), "out": str(out), "steps": steps,
         "eps": eps, "weight_cache": cache, "threads": threads}
    r = subprocess.run([sys.executable, "-c", PY_RUNNER, json.dumps(a)], check=True, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)})
    res = json.loads(r.stdout.strip().splitlines()[-1])
    return {**res, "step_s": mean_step_s(out), "rss_loaded_mb": None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--program", help="measure this exported program (its X.data.safetensors beside it) instead of exporting")
    p.add_argument("--name", help="the model name recorded for --program (default: the manifest's)")
    p.add_argument("--quantize", nargs="+", default=["none"], help="none, 8da4w, 8da8w")
    p.add_argument("--loops", nargs="+", default=["native", "python"])
    p.add_argument("--cache", nargs="+", default=["off", "on"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", default=str(RESULTS), help="the JSONL file rows are appended to")
    a = p.parse_args(argv)
    for qz in a.quantize:
        quantize = None if qz == "none" else qz
        pte = Path(a.program) if a.program else export(a.model, quantize, a.threads)
        manifest = json.loads(Path(str(pte) + ".json").read_text())
        if a.program:  # the program says what it is; a quantised one is run at the ε it tolerates
            quantize = manifest.get("quantization")
        sizes = program_sizes(pte)
        eps = max(min_eps(manifest), 1e-3)  # 0 for fp32
        for loop in a.loops:
            for cache in a.cache:
                with tempfile.TemporaryDirectory(prefix="prge-footprint-") as tmp:
                    run = run_native if loop == "native" else run_python
                    res = run(pte, a.steps, eps, cache == "on", a.threads, Path(tmp))
                model = (a.name or manifest["model"]) if a.program else a.model
                data_mb = pte.with_suffix(".data.safetensors").stat().st_size / 2**20
                row = {"model": model, "quantize": quantize or "fp32", "weight_cache": cache == "on", "loop": loop,
                       **res, **sizes, **breakdown(res, sizes, data_mb), "target_mb": 1.25 * (sizes["weights_mb"] + sizes["arena_mb"]),
                       "steps": a.steps, "threads": a.threads, **{k: manifest[k] for k in ("q", "batch_size", "max_length")},
                       "machine": f"{os.cpu_count()}-core {platform.machine()} CPU, no GPU",
                       "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
                results = Path(a.results)
                results.parent.mkdir(parents=True, exist_ok=True)
                with results.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
