"""Kill at any moment: SIGKILL `prge train` (prge, mezo, fo, and prge on 2 torchrun ranks) and
`prge device-train` (Python loop and --native) at random moments, resume each, and check the final
adapter equals an uninterrupted run's.

Per configuration: one uninterrupted reference run (its wall time T), then `--kills` trials. A trial
starts the same command and SIGKILLs its whole process group (torchrun's ranks too) at one of three
kinds of moment, in turn: a uniform random moment in [0, T] ("random"); the moment a write is under
way in the run folder ("write": a `.tmp` file or folder, or a `.old` folder of the atomic swap,
exists, after a random number of writes were let through); or the first write after the last step
("final": the final checkpoint and adapter). It then runs the same command with --resume (plain
again if the kill came before the run folder existed) until it finishes, and compares every tensor
of the final adapter(s) with the reference bit for bit. One JSON row per trial is appended to
benchmarks/results/kill_campaign.jsonl as it finishes:

    {"config", "trial", "mode", "kill_after_s", "during_write", "what_was_written", "exit_signal",
     "resume_rc", "identical", "date", "machine"}

    python benchmarks/kill_campaign.py --kills 9             # 6 configs x 9 kills (tiny model, ~1 h on 2 cores)
    python benchmarks/kill_campaign.py --configs train-prge --kills 2 --out /tmp/k.jsonl   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results" / "kill_campaign.jsonl"
CONFIGS = ("train-prge", "train-mezo", "train-fo", "train-dist", "device-python", "device-native")
TRAIN = ["--task", "sst2", "--n-train", "24", "--n-dev", "8", "--n-test", "8", "--max-length", "48", "--rank", "2",
         "--alpha", "4", "--q", "2", "--batch-size", "2", "--seed", "3"]
STEPS = 12
LOOP = ["--steps", str(STEPS), "--eval-every", "4", "--checkpoint-every", "2"]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PRGE_DATA": str(DATA)}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(config: str, model: str, program: Path | None, out: Path) -> list[str]:
    prge = [sys.executable, "-m", "prge"]
    if config == "train-dist":  # 2 gloo ranks under torchrun, 1 of the 2 queries each; a fresh port per start
        prge = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m", "prge"]
        return [*prge, "train", "--model", model, *TRAIN, *LOOP, "--method", "prge", "--lr", "0.05", "--threads", "1",
                "--no-progress", "--out", str(out)]
    if config.startswith("train-"):
        method = config.split("-", 1)[1]
        extra = ["--lr", "1e-3", "--optimizer", "adam"] if method == "fo" else ["--lr", "0.05"]
        return [*prge, "train", "--model", model, *TRAIN, *LOOP, "--method", method, *extra, "--threads", "1",
                "--no-progress", "--out", str(out)]
    native = ["--native"] if config == "device-native" else []
    return [*prge, "device-train", "--program", str(program), *LOOP, "--lr", "0.05", "--eps", "0.01", "--seed", "3",
            "--no-progress", "--out", str(out), *native]


def adapters(config: str, out: Path) -> list[Path]:
    """The files whose tensors must equal the reference run's."""
    if config.startswith("train-"):
        return [out / "checkpoints" / "last" / "adapter_model.safetensors", out / "checkpoints" / "best" / "adapter_model.safetensors"]
    return [out / "adapter" / "adapter_model.safetensors", out / "checkpoints" / "best" / "adapter" / "adapter_model.safetensors"]


def same(a: list[Path], b: list[Path]) -> bool:
    import torch
    from safetensors.torch import load_file

    for x, y in zip(a, b):
        if not (x.is_file() and y.is_file()):
            return False
        tx, ty = load_file(str(x)), load_file(str(y))
        if tx.keys() != ty.keys() or not all(torch.equal(tx[k], ty[k]) for k in tx):
            return False
    return True


def writing(out: Path) -> str | None:
    """The name of a write under way in `out` (a temporary file/folder or the swap's .old folder), if any."""
    if not out.is_dir():
        return None
    for root, dirs, files in os.walk(out):
        for n in dirs + files:
            if n.endswith(".tmp") or n.endswith(".old"):
                return str(Path(root, n).relative_to(out))
    return None


def last_step_done(out: Path) -> bool:
    m = out / "metrics.jsonl"
    return m.is_file() and f'"step": {STEPS}, "loss"' in m.read_text()


def trial(config: str, cmd_for, reference: list[Path], seconds: float, mode: str, rng: random.Random, work: Path) -> dict:
    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    cmd = cmd_for(out)
    # its own session, so the kill takes the whole process group (torchrun's ranks too)
    p = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    t0, what = time.time(), None
    if mode == "random":
        deadline = t0 + rng.uniform(0.0, seconds)
        while time.time() < deadline and p.poll() is None:
            time.sleep(0.005)
        what = writing(out)
    elif mode == "final":  # the first write after the last step: the final checkpoint and adapter
        while p.poll() is None:
            w = writing(out)
            if w is not None and last_step_done(out):
                what = w
                break
            time.sleep(0.0005)
    else:  # the moment a write is seen, after a random number of writes have been let through
        skip, seen_prev = rng.randrange(0, 12), None
        while p.poll() is None:
            w = writing(out)
            if w is not None and w != seen_prev:
                if skip == 0:
                    what = w
                    break
                skip -= 1
            seen_prev = w
            time.sleep(0.0005)
    after = time.time() - t0
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
    rc = p.wait()
    cmd = cmd_for(out)  # (a fresh rendezvous port for torchrun)
    resume = cmd + ["--resume"] + ([str(out)] if config.startswith("train-") else []) if out.is_dir() else cmd
    r = subprocess.run(resume, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    row = {"config": config, "mode": mode, "kill_after_s": round(after, 3), "during_write": what is not None,
           "what_was_written": what, "exit_signal": -rc if rc < 0 else None, "resume_rc": r.returncode,
           "identical": r.returncode == 0 and same(adapters(config, out), reference)}
    if r.returncode != 0:
        row["resume_error"] = r.stderr.strip().splitlines()[-1:] if r.stderr.strip() else []
    return row


def export_program(model: str, work: Path) -> Path:
    prog = work / "tiny.pte"
    if not prog.is_file():
        data = [x for i, x in enumerate(TRAIN) if x != "--n-test" and TRAIN[i - 1] != "--n-test"]
        subprocess.run([sys.executable, "-m", "prge", "export", "--model", model, *data, *LOOP, "--lr", "0.05",
                        "--out", str(prog)], env=env(), check=True, stdout=subprocess.DEVNULL)
    return prog


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--kills", type=int, default=10, help="kill trials per configuration")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS), help="JSONL file the rows are appended to")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from prge.testing import save_tiny

    rng = random.Random(a.seed)
    work = Path(a.work or tempfile.mkdtemp(prefix="prge-kill-"))
    work.mkdir(parents=True, exist_ok=True)
    model = str(work / "tiny") if (work / "tiny").is_dir() else save_tiny(work / "tiny", "llama")
    machine = f"{platform.machine()} {os.cpu_count()}-core CPU, no GPU"
    program = None
    for config in a.configs:
        if config.startswith("device") and program is None:
            program = export_program(model, work)
        if config == "device-native":
            try:
                from prge.engine.native import build

                build()
            except Exception as e:  # no toolchain here: say so in the results rather than fail
                print(f"{config}: skipped ({e})", file=sys.stderr)
                continue
        cwork = work / config
        cwork.mkdir(exist_ok=True)
        cmd_for = lambda out, c=config: command(c, model, program, out)  # noqa: E731
        ref = cwork / "reference"
        shutil.rmtree(ref, ignore_errors=True)
        t0 = time.time()
        subprocess.run(cmd_for(ref), env=env(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.time() - t0
        reference = adapters(config, ref)
        for i in range(a.kills):
            mode = ("random", "write", "final")[i % 3]
            row = trial(config, cmd_for, reference, seconds, mode, rng, cwork)
            row = {**row, "trial": i, "reference_s": round(seconds, 1), "date": time.strftime("%Y-%m-%d"), "machine": machine}
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
