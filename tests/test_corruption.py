"""A flipped bit in a checkpoint or an adapter is refused naming the file, never trained on; checkpoints
written before hashes existed still resume."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from prge.cli import main
from prge.config import TrainConfig
from prge.errors import PrgeError
from prge.io import load_tensors, save_tensors, verify_dir
from prge.run.train import run
from prge.testing import save_tiny

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("m") / "tiny", "llama")


def cfg(tiny, out, **kw):
    base = dict(model=tiny, task="sst2", data_root=str(DATA), n_train=20, n_dev=8, n_test=8, steps=4, eval_every=2,
                rank=2, alpha=4, q=2, batch_size=2, lr=0.05, out=str(out), progress=False, max_length=48)
    return TrainConfig(**{**base, **kw})


def flip_bit(path: Path, where: float, bit: int = 3) -> None:
    data = bytearray(path.read_bytes())
    data[min(int(len(data) * where), len(data) - 1)] ^= 1 << bit
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def stopped(tiny, tmp_path_factory):
    """An fo/adam run stopped at step 2 (its checkpoint has adapter, optimizer and trainer state)."""
    out = tmp_path_factory.mktemp("r") / "run"
    run(cfg(tiny, out, method="fo", lr=1e-3), stop_after=2)
    return out


@pytest.mark.parametrize("name,where", [("adapter_model.safetensors", 0.97), ("adapter_model.safetensors", 0.02),
                                        ("trainer_state.json", 0.3), ("optimizer.pt", 0.9), ("adapter_config.json", 0.5),
                                        ("SHA256SUMS", 0.1)])
def test_flipped_bit_in_a_checkpoint_is_refused_at_resume(tiny, stopped, tmp_path, capsys, name, where):
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    flip_bit(out / "checkpoints" / "last" / name, where)
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]
    assert "damaged" in err[0] or "not a readable" in err[0]
    assert "last" in err[0]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files  # nothing written or overwritten


def test_flipped_bit_in_an_adapter_is_refused_by_eval(tiny, stopped, tmp_path, capsys):
    adapter = tmp_path / "best"
    shutil.copytree(stopped / "checkpoints" / "best", adapter)
    flip_bit(adapter / "adapter_model.safetensors", 0.97)
    capsys.readouterr()
    rc = main(["eval", "--adapter", str(adapter), "--model", tiny, "--data-root", str(DATA), "--n-test", "4"])
    err = capsys.readouterr().err
    assert rc == 2 and "adapter_model.safetensors is damaged" in err and "Traceback" not in err


def test_safetensors_hash_catches_a_flip_outside_any_folder(tmp_path):
    f = tmp_path / "t.safetensors"
    save_tensors(f, {"w": torch.arange(64, dtype=torch.float32)})
    assert torch.equal(load_tensors(f)["w"], torch.arange(64, dtype=torch.float32))
    flip_bit(f, 0.95, bit=0)
    with pytest.raises(PrgeError, match=r"t\.safetensors is damaged"):
        load_tensors(f)


def test_sha256sums_can_be_checked_by_coreutils(stopped):
    import subprocess

    last = stopped / "checkpoints" / "last"
    verify_dir(last)
    r = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=last, capture_output=True, text=True)
    assert r.returncode == 0 and "adapter_model.safetensors: OK" in r.stdout


def test_checkpoint_without_hashes_still_resumes_exactly(tiny, stopped, tmp_path):
    from safetensors.torch import load_file, save_file

    full = tmp_path / "full"
    run(cfg(tiny, full, method="fo", lr=1e-3))
    out = tmp_path / "old"
    shutil.copytree(stopped, out)
    for sums in out.rglob("SHA256SUMS"):
        sums.unlink()
    for f in out.rglob("*.safetensors"):
        save_file(load_file(str(f)), str(f), metadata={"format": "pt"})  # as written before hashes
    run(cfg(tiny, out, method="fo", lr=1e-3, resume=str(out)))
    a = load_tensors(full / "checkpoints/last/adapter_model.safetensors")
    b = load_tensors(out / "checkpoints/last/adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "checkpoints/last/trainer_state.json").read_text())["step"] == 4


def test_a_changed_config_yaml_is_refused_at_resume_but_a_copy_may_be_edited(tiny, stopped, tmp_path, capsys):
    """The run folder's config.yaml carries its SHA-256: `lr: 0.001` turned into `lr: 0.005` by a bad
    sector would otherwise resume with another lr. The same file copied, edited and given to --config
    is the user's own and is read."""
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    text = (out / "config.yaml").read_text()
    assert "lr: 0.001\n" in text and "# sha256 of the lines above: " in text
    (out / "config.yaml").write_text(text.replace("lr: 0.001\n", "lr: 0.005\n"))
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "config.yaml is damaged or was edited" in err[0]
    mine = tmp_path / "mine.yaml"
    mine.write_text(text.replace("lr: 0.001\n", "lr: 0.005\n"))
    from prge.config import load_yaml
    assert load_yaml(str(mine))["lr"] == 0.005
