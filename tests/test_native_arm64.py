"""The native trainer cross-built for 64-bit ARM Linux (`python -m prge.engine.native cross-build
--arch aarch64`: Debian's g++-aarch64-linux-gnu against the aarch64 executorch wheel) runs under
qemu-user on this x86 machine and follows the Python engine loop; started without the emulator it
is refused with one line, before anything is written.

Needs g++-aarch64-linux-gnu, qemu-user (apt) and the network once (pip downloads the 18 MB wheel
into ~/.cache/prge/native); skipped where they are missing. The cross build takes a few minutes on
2 cores (cached by the hash of the sources); the program is test_native's tiny one.
"""

import json
import platform
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("executorch")
if platform.machine() != "x86_64":
    pytest.skip("this test runs the aarch64 binary under qemu on an x86-64 host", allow_module_level=True)
for tool in ("cmake", "aarch64-linux-gnu-g++", "qemu-aarch64"):
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is missing (apt-get install cmake g++-aarch64-linux-gnu qemu-user)", allow_module_level=True)

from prge.config import TrainConfig  # noqa: E402
from prge.engine import native  # noqa: E402
from prge.engine.export import export_program  # noqa: E402
from prge.engine.formats import final_b, write_dataset  # noqa: E402
from prge.engine.runtime import ReadoutSettings, device_train  # noqa: E402
from prge.errors import PrgeError  # noqa: E402
from prge.run.train import prepare  # noqa: E402
from prge.testing import save_tiny  # noqa: E402

QEMU = ["qemu-aarch64", "-L", "/usr/aarch64-linux-gnu"]
# the label readout with fewer steps than the default 10,000: the aarch64 binary fits it under qemu
KW = dict(steps=4, lr=2e-2, eps=1e-2, seed=3, eval_every=2, readout=ReadoutSettings(None, steps=500))


@pytest.fixture(scope="module")
def arm(tmp_path_factory):
    root = tmp_path_factory.mktemp("arm64")
    cfg = TrainConfig(model=save_tiny(root / "model"), task="sst2", n_train=10, n_dev=8, n_test=4, q=2,
                      batch_size=2, max_length=16, rank=4, alpha=8.0, seed=0, progress=False)
    s = prepare(cfg)
    path = root / "tiny.pte"
    manifest = export_program(s.model, s.tokenizer, s.label_ids, q=2, batch_size=2, max_length=16, loss="class",
                              out_path=path, model_name=cfg.model)
    data = root / "tiny.data.safetensors"
    write_dataset(data, s, manifest)
    try:
        exe = native.cross_build("aarch64")
    except PrgeError as e:
        if "download" in str(e):
            pytest.skip(f"the aarch64 wheel cannot be fetched here: {e}")
        raise
    return {"root": root, "path": path, "data": data, "exe": exe}


def rows(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_cross_built_binary_is_aarch64_and_matches_the_python_loop_under_qemu(arm):
    assert native.binary_machine(arm["exe"]) == "aarch64"
    py, nat = arm["root"] / "py", arm["root"] / "nat"
    sp = device_train(arm["path"], arm["data"], py, progress=False, **KW)
    sn = native.native_train(arm["path"], arm["data"], nat, binary=arm["exe"], launcher=QEMU, log=lambda m: None, **KW)
    assert "readout" in json.loads((nat / "native.json").read_text())  # fitted by the aarch64 binary
    assert sn["readout"] == {**sp["readout"], "minutes": sn["readout"]["minutes"]}
    lp = [r["loss"] for r in rows(py) if "split" not in r]
    ln = [r["loss"] for r in rows(nat) if "split" not in r]
    assert len(lp) == len(ln) == KW["steps"] and max(abs(a - b) for a, b in zip(lp, ln)) <= 1e-5
    assert [r["accuracy"] for r in rows(py) if "split" in r] == [r["accuracy"] for r in rows(nat) if "split" in r]
    bp, bn = final_b(py), final_b(nat)
    assert max(float((bp[k] - bn[k]).abs().max()) for k in bp) <= 1e-5
    assert torch.isfinite(native.final_b_flat(nat)).all()


def test_the_aarch64_binary_run_here_is_refused_with_one_line(arm, tmp_path):
    with pytest.raises(PrgeError, match="built for aarch64, but this machine is x86_64") as e:
        native.native_train(arm["path"], arm["data"], tmp_path / "out", binary=arm["exe"], log=lambda m: None, **KW)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


def test_the_aarch64_binary_refuses_a_flipped_bit_itself(arm, tmp_path):
    """With the target's static libcrypto (Debian's libssl-dev:arm64, extracted by cross_build; .ci/run
    adds the arm64 architecture so apt-get can download it) the ARM64 runner checks SHA-256 like the
    x86 one: a data file with one flipped bit is refused naming it, under qemu, nothing written."""
    import subprocess

    help_ = subprocess.run([*QEMU, str(arm["exe"]), "--help"], capture_output=True, text=True, timeout=300).stdout
    if "SHA-256: not checked" in help_:
        pytest.skip("no libssl-dev:arm64 could be downloaded here: this build checks sizes and shapes only")
    assert "SHA-256: the program, data, plan and checkpoint files are checked" in help_
    data = bytearray(Path(arm["data"]).read_bytes())
    data[int(len(data) * 0.9)] ^= 0x08
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(data))
    native.write_plan(tmp_path / "plan.safetensors", 10, 2, KW["seed"], KW["steps"])
    cmd = [*QEMU, str(arm["exe"]), "--program", str(arm["path"]), "--data", str(bad), "--plan", str(tmp_path / "plan.safetensors"),
           "--out", str(tmp_path / "out"), "--steps", "4", "--lr", "0.02", "--eps", "0.01", "--seed", str(KW["seed"])]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    err = [line for line in r.stderr.splitlines() if "error:" in line]
    assert r.returncode != 0 and len(err) == 1 and "is damaged: its SHA-256 differs" in err[0], r.stderr[-500:]
    assert not (tmp_path / "out").exists()
