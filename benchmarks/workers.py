"""The subprocess harness the speed benchmarks share (benchmarks/speed.py, benchmarks/et_training.py).

Every measured variant runs in its own process, so its peak RSS (`ru_maxrss`) is its own and not the
high-water mark of an earlier export or of another variant. The worker prints its result as the last
line "RESULT {json}"; `spawn` runs one and returns that dict.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class WorkerFailed(RuntimeError):
    """A worker exited non-zero or printed no RESULT line; the message ends with its stderr tail."""


def set_threads(n: int | None) -> None:
    """Pin torch's and the ExecuTorch threadpool's thread counts (default: both use every core).

    With another busy process on a 2-core machine, 2 threads per side make every parallel region wait
    for a descheduled thread (eager elementwise ops ran ~50× slower under such load); 1 thread keeps
    the comparison meaningful there."""
    if not n:
        return
    import torch

    torch.set_num_threads(n)
    try:
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

        _unsafe_reset_threadpool(n)
    except ImportError:
        pass


def report(out: dict, load_before: float) -> None:
    """Worker side: add the process's peak RSS and the load average around the run, print the RESULT line."""
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["load_avg_1min"] = [load_before, os.getloadavg()[0]]  # > cores: other processes competed
    print("RESULT " + json.dumps(out), flush=True)


def spawn(script: str | os.PathLike, argv: list[str], threads: int | None, verbose: bool = False) -> dict:
    """Driver side: run `python script *argv` with `threads` OMP threads; its RESULT dict, or WorkerFailed."""
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    r = subprocess.run([sys.executable, str(script), *argv], stdout=subprocess.PIPE,
                       stderr=None if verbose else subprocess.PIPE, text=True, env=env, cwd=ROOT)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if r.returncode != 0 or line is None:
        raise WorkerFailed(f"exit {r.returncode}, no result:\n{(r.stderr or '(stderr shown above)')[-4000:]}")
    return json.loads(line[len("RESULT "):])
