"""A run whose --out fills up stops with one clear error, keeps its last good checkpoint intact and
loadable, and resumes exactly once space is back. The full disk is injected: from a chosen moment
every write prge makes (atomic files, metrics rows) fails with ENOSPC, as write(2) does on a full disk."""

import errno
import json
import os
from pathlib import Path

import pytest
import torch

from prge import io
from prge.cli import main
from prge.io import load_tensors, verify_dir
from prge.testing import save_tiny

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("m") / "tiny", "llama")


def args(tiny, out, *extra):
    return ["train", "--model", tiny, "--task", "sst2", "--data-root", str(DATA), "--n-train", "20", "--n-dev", "6",
            "--n-test", "6", "--steps", "6", "--eval-every", "2", "--checkpoint-every", "0", "--rank", "2", "--q", "2",
            "--batch-size", "2", "--max-length", "48", "--lr", "0.05", "--no-progress", "--out", str(out), *extra]


class Disk:
    """Fails every write with ENOSPC once `full` is set; `fill_after_step` sets it when that step's metrics row is written."""

    def __init__(self, monkeypatch, fill_after_step: int):
        self.full = False
        real_temp, real_append = io._temp_file_beside, io.append_jsonl

        def temp_file_beside(path):
            if self.full:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return real_temp(path)

        def append_jsonl(path, row):
            if self.full:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            real_append(path, row)
            if row.get("step") == fill_after_step and "split" not in row:
                self.full = True

        monkeypatch.setattr(io, "_temp_file_beside", temp_file_beside)
        monkeypatch.setattr(io, "append_jsonl", append_jsonl)


@pytest.mark.parametrize("method", ["prge", "fo"])
def test_full_disk_stops_cleanly_keeps_the_checkpoint_and_resumes_exactly(tiny, tmp_path, monkeypatch, capsys, method):
    full_run = tmp_path / "full"
    assert main(args(tiny, full_run, "--method", method)) == 0
    out = tmp_path / "run"
    disk = Disk(monkeypatch, fill_after_step=3)  # the checkpoint of step 4 is the first write that fails
    capsys.readouterr()
    assert main(args(tiny, out, "--method", method)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert disk.full
    assert err[-1].startswith("error: no space left on the device") and "step 2, is intact" in err[-1]
    assert "--resume" in err[-1] and not any("Traceback" in line for line in err)
    last = out / "checkpoints" / "last"
    assert json.loads((last / "trainer_state.json").read_text())["step"] == 2
    verify_dir(last)  # intact, and loadable:
    load_tensors(last / "adapter_model.safetensors")
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # no half-written leftovers
    monkeypatch.undo()  # space is back
    assert main(args(tiny, out, "--method", method, "--resume", str(out))) == 0
    a = load_tensors(full_run / "checkpoints/last/adapter_model.safetensors")
    b = load_tensors(last / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "summary.json").read_text())["steps"] == 6
