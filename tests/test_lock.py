"""One run per run folder: a second `prge train` into a live run's --out is refused naming the holder's
pid; a lock left by a killed run is taken over."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prge.cli import main
from prge.errors import PrgeError
from prge.run.lock import LOCK_NAME, run_lock
from prge.testing import save_tiny

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parents[0] / "shared" / "data"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("m") / "tiny", "llama")


def train_args(tiny, out, steps):
    return ["train", "--model", tiny, "--task", "sst2", "--data-root", str(DATA), "--n-train", "20", "--n-dev", "4",
            "--n-test", "4", "--steps", str(steps), "--eval-every", "0", "--checkpoint-every", "0", "--rank", "2",
            "--q", "1", "--batch-size", "1", "--max-length", "32", "--threads", "1", "--no-progress", "--out", str(out)]


def wait_for(pred, seconds=120.0):
    end = time.time() + seconds
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.1)
    return False


def start(args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "prge", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_second_train_into_a_live_run_is_refused_then_a_killed_runs_lock_is_taken_over(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    first = start(train_args(tiny, out, 100000))
    try:
        lock = out / LOCK_NAME
        assert wait_for(lambda: lock.is_file() and lock.read_text().startswith(f"{first.pid} ")), first.stderr.read1()
        assert wait_for(lambda: (out / "checkpoints" / "last").is_dir())
        config = (out / "config.yaml").read_bytes()
        capsys.readouterr()
        assert main(train_args(tiny, out, 2)) == 2
        err = capsys.readouterr().err
        assert f"is in use by prge run pid {first.pid}" in err and err.startswith("error:") and "Traceback" not in err
        assert (out / "config.yaml").read_bytes() == config  # nothing overwritten
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (out / LOCK_NAME).read_text().startswith(f"{first.pid} ")  # left behind by the kill
    capsys.readouterr()
    assert main(train_args(tiny, out, 2) + ["--resume", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"took over the lock of {out} left by prge run pid {first.pid}" in err
    assert not (out / LOCK_NAME).exists()  # released at the end
    assert (out / "summary.json").is_file()


def test_lock_held_by_another_process_blocks_run_lock(tmp_path):
    out = tmp_path / "r"
    code = f"from prge.run.lock import run_lock\nimport sys, time\nwith run_lock({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(60)\n"
    holder = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        with pytest.raises(PrgeError, match=rf"in use by prge run pid {holder.pid}"):
            with run_lock(out):
                pass
    finally:
        holder.kill()
        holder.wait()
    logged = []
    with run_lock(out, log=logged.append):
        assert (out / LOCK_NAME).read_text().startswith(f"{os.getpid()} ")
    assert logged and f"pid {holder.pid}" in logged[0]


def test_refused_run_into_a_new_folder_leaves_nothing(tmp_path):
    out = tmp_path / "a" / "b"
    with pytest.raises(PrgeError):
        with run_lock(out):
            raise PrgeError("bad data", "fix it")
    assert not (tmp_path / "a").exists()


def test_out_that_is_a_file_is_an_error(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(PrgeError, match="is a file, not a folder"):
        with run_lock(f / "run"):
            pass
    assert f.read_text() == "x"


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_at_step_0(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text("999999999 elsewhere prge train\n")  # what a kill during model loading leaves
    assert main(train_args(tiny, out, 2) + ["--resume", str(out)]) == 0
    err = capsys.readouterr().err
    assert "stopped before its first checkpoint; starting again at step 0" in err
    assert (out / "summary.json").is_file()
