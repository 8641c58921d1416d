"""The native (C++) device trainer: it builds against the executorch wheel, follows the Python
engine loop step for step (same losses and final B), resumes exactly, and refuses bad input with
one line and a non-zero exit, writing nothing.

One tiny program is exported for the module (2-layer Llama, q = 2, b = 2, T = 16; XNNPACK lowering
takes ~40-80 s on 2 cores); the binary builds in ~10 s (cached in ~/.cache/prge/native).
"""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

pytest.importorskip("executorch")
if shutil.which("cmake") is None or shutil.which("c++") is None:
    pytest.skip("cmake or a C++ compiler is missing: the native trainer cannot be built here", allow_module_level=True)

from prge import io  # noqa: E402
from prge.engine import native  # noqa: E402
from prge.config import TrainConfig  # noqa: E402
from prge.engine.runtime import device_train  # noqa: E402
from prge.engine.formats import final_b
from prge.errors import PrgeError  # noqa: E402
from prge.engine.export import export_program  # noqa: E402
from prge.engine.formats import write_dataset
from prge.zo.lora import lora_layers  # noqa: E402
from prge.testing import save_tiny  # noqa: E402
from prge.run.train import prepare  # noqa: E402

Q, B, T, SEED, EPS, LR, STEPS = 2, 2, 16, 3, 1e-2, 2e-2, 6


@pytest.fixture(scope="module")
def prog(tmp_path_factory):
    root = tmp_path_factory.mktemp("native")
    cfg = TrainConfig(model=save_tiny(root / "model"), task="sst2", n_train=10, n_dev=8, n_test=4, q=Q,
                      batch_size=B, max_length=T, rank=4, alpha=8.0, seed=0, progress=False)
    s = prepare(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a nonzero B, so the serialised initial state is exercised
        for m in lora_layers(s.model).values():
            m.lora_B.copy_(0.05 * torch.randn(m.lora_B.shape, generator=g))
    path = root / "tiny.pte"
    manifest = export_program(s.model, s.tokenizer, s.label_ids, q=Q, batch_size=B, max_length=T, loss="class",
                              out_path=path, model_name=cfg.model)
    data = root / "tiny.data.safetensors"
    write_dataset(data, s, manifest)
    exe = native.build()
    return {"root": root, "path": path, "data": data, "manifest": manifest, "exe": exe}


def rows(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def step_losses(out):
    return [r["loss"] for r in rows(out) if "split" not in r]


KW = dict(steps=STEPS, lr=LR, eps=EPS, seed=SEED, eval_every=3)


@pytest.fixture(scope="module")
def runs(prog):
    py = prog["root"] / "py"
    nat = prog["root"] / "nat"
    device_train(prog["path"], prog["data"], py, progress=False, **KW)
    summary = native.native_train(prog["path"], prog["data"], nat, binary=prog["exe"], log=lambda m: None, **KW)
    return py, nat, summary


def test_parity_with_the_python_engine_loop(runs):
    py, nat, summary = runs
    lp, ln = step_losses(py), step_losses(nat)
    assert len(lp) == len(ln) == STEPS
    assert max(abs(a - b) for a, b in zip(lp, ln)) <= 1e-5
    bp, bn = final_b(py), final_b(nat)
    assert bp.keys() == bn.keys()
    assert max(float((bp[k] - bn[k]).abs().max()) for k in bp) <= 1e-5
    ev_p = [r["accuracy"] for r in rows(py) if r.get("split") == "dev"]
    ev_n = [r["accuracy"] for r in rows(nat) if r.get("split") == "dev"]
    assert ev_p == ev_n
    # the same run folder: PEFT adapters, checkpoints either loop can resume, summary
    for d in (nat / "adapter", nat / "checkpoints" / "best" / "adapter", nat / "checkpoints" / "last" / "adapter"):
        assert (d / "adapter_config.json").is_file() and (d / "adapter_model.safetensors").is_file()
    st_p = io.load_tensors(py / "checkpoints" / "last" / "state.safetensors")
    st_n = io.load_tensors(nat / "checkpoints" / "last" / "state.safetensors")
    assert torch.allclose(st_p["raw"], st_n["raw"], atol=1e-6) and torch.allclose(st_p["g"], st_n["g"], atol=1e-5)
    assert summary["native"] and summary["peak_rss_mb"] > 0 and summary["step_seconds"] > 0


def test_lr_schedule_parity(prog):
    """The C++ loop computes prge.zo.schedule.lr_at itself: same losses and final B as the Python loop."""
    kw = {**KW, "lr_schedule": "cosine"}
    py, nat = prog["root"] / "py_cos", prog["root"] / "nat_cos"
    device_train(prog["path"], prog["data"], py, progress=False, **kw)
    native.native_train(prog["path"], prog["data"], nat, binary=prog["exe"], log=lambda m: None, **kw)
    assert max(abs(a - b) for a, b in zip(step_losses(py), step_losses(nat))) <= 1e-5
    bp, bn = final_b(py), final_b(nat)
    assert max(float((bp[k] - bn[k]).abs().max()) for k in bp) <= 1e-5
    assert json.loads((nat / "checkpoints" / "last" / "trainer_state.json").read_text())["lr_schedule"] == "cosine"


def test_resume_is_exact(prog, runs):
    _, nat, _ = runs
    out = prog["root"] / "nat_resume"
    s = native.native_train(prog["path"], prog["data"], out, binary=prog["exe"], stop_after=4, log=lambda m: None, **KW)
    assert s["stopped_at"] == 4 and not (out / "adapter").exists()
    # a stop below the resumed step ends there at once, without relabelling the checkpoint
    s = native.native_train(prog["path"], prog["data"], out, binary=prog["exe"], resume=True, stop_after=2, log=lambda m: None, **KW)
    assert s["stopped_at"] == 4
    native.native_train(prog["path"], prog["data"], out, binary=prog["exe"], resume=True, log=lambda m: None, **KW)
    assert step_losses(out) == step_losses(nat)
    assert torch.equal(native.final_b_flat(out), native.final_b_flat(nat))


def test_native_resumes_a_python_checkpoint(prog, runs):
    py, _, _ = runs
    out = prog["root"] / "py_then_native"
    device_train(prog["path"], prog["data"], out, progress=False, stop_after=3, **KW)
    native.native_train(prog["path"], prog["data"], out, binary=prog["exe"], resume=True, log=lambda m: None, **KW)
    bp, bn = final_b(py), final_b(out)
    assert max(float((bp[k] - bn[k]).abs().max()) for k in bp) <= 1e-5


def test_a_killed_binary_resumes_from_the_periodic_checkpoint(prog, tmp_path):
    """SIGKILL the binary mid-run (no evaluation until the end, --checkpoint-every 2): checkpoints/last
    holds an even step short of the end, and resuming from it ends on the uninterrupted run's losses."""
    import signal
    import time

    steps = 300
    kw = dict(steps=steps, lr=1e-3, eps=EPS, seed=SEED, eval_every=0, checkpoint_every=2)
    full = tmp_path / "full"
    native.native_train(prog["path"], prog["data"], full, binary=prog["exe"], log=lambda m: None, **kw)
    out = tmp_path / "part"
    cmd = bin_cmd(prog, tmp_path, steps=steps, lr=1e-3, out=out, **{"eval-every": 0, "checkpoint-every": 2})
    p = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    while p.poll() is None:
        if metrics.is_file() and metrics.read_text().count('"g_abs"') >= 5:  # step 5 ran, so step 4's checkpoint is written
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.001)
    assert p.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    saved = json.loads((out / "checkpoints" / "last" / "trainer_state.json").read_text())["step"]
    assert saved % 2 == 0 and 4 <= saved < steps
    native.native_train(prog["path"], prog["data"], out, binary=prog["exe"], resume=True, log=lambda m: None, **kw)
    assert step_losses(out) == step_losses(full)
    assert torch.equal(native.final_b_flat(out), native.final_b_flat(full))
    (tmp_path / "neg").mkdir()
    r = run_bin(prog, tmp_path / "neg", **{"checkpoint-every": -1})
    assert r.returncode == 2 and "--checkpoint-every >= 0" in r.stderr and not (tmp_path / "neg" / "out").exists()


def bin_cmd(prog, tmp_path, steps=STEPS, lr=LR, **over):
    """The binary's command line on the module's program; `over` replaces or adds flags (a plan for `steps`
    steps is written under tmp_path unless one is given)."""
    args = {"program": prog["path"], "data": prog["data"], "plan": tmp_path / "plan.safetensors", "out": tmp_path / "out",
            "steps": steps, "lr": lr, "eps": EPS, "seed": SEED}
    args.update(over)
    if not Path(args["plan"]).exists() and over.get("plan") is None:
        native.write_plan(args["plan"], 10, B, SEED, steps)
    return [str(prog["exe"])] + [x for k, v in args.items() for x in (f"--{k}", str(v))]


def run_bin(prog, tmp_path, **over):
    return subprocess.run(bin_cmd(prog, tmp_path, **over), capture_output=True, text=True, timeout=120)


def corrupt_copy(src: Path, dest: Path, keep: int | None = None, garbage: bool = False) -> Path:
    data = src.read_bytes()
    data = data[:keep] if keep else data
    if garbage:
        data = bytes(len(data))
    dest.write_bytes(data)
    return dest


@pytest.mark.parametrize("case", ["missing_program", "corrupt_program", "truncated_program", "missing_data",
                                  "corrupt_data", "shape_mismatch", "plan_other_seed", "unwritable_out"])
def test_bad_input_fails_cleanly(prog, tmp_path, case):
    over, expect = {}, ""
    if case == "missing_program":
        over, expect = {"program": tmp_path / "nope.pte"}, "not found"
    elif case in ("corrupt_program", "truncated_program"):
        p = tmp_path / "bad.pte"
        shutil.copy(str(prog["path"]) + ".json", str(p) + ".json")
        if case == "corrupt_program":  # (without its recorded hash: the runtime's own check)
            m = json.loads(Path(str(prog["path"]) + ".json").read_text())
            m.pop("program_sha256", None)
            Path(str(p) + ".json").write_text(json.dumps(m))
            corrupt_copy(prog["path"], p, garbage=True)
            expect = "cannot load"
        else:
            corrupt_copy(prog["path"], p, keep=1000)
            expect = "truncated"
        over = {"program": p}
    elif case == "missing_data":
        over, expect = {"data": tmp_path / "nope.safetensors"}, "not found"
    elif case == "corrupt_data":
        over, expect = {"data": corrupt_copy(prog["data"], tmp_path / "d.safetensors", keep=200)}, "data file"
    elif case == "shape_mismatch":
        from prge.data.batch import Encoded

        other = dict(prog["manifest"], max_length=T + 8)
        d = tmp_path / "long.safetensors"
        write_dataset(d, {"train": [Encoded([5, 6, 7], [8], 0)] * 4}, other)
        over, expect = {"data": d}, "max_length"
    elif case == "plan_other_seed":
        native.write_plan(tmp_path / "p2.safetensors", 10, B, SEED + 1, STEPS)
        over, expect = {"plan": tmp_path / "p2.safetensors"}, "seed"
    elif case == "unwritable_out":
        (tmp_path / "afile").write_text("x")
        over, expect = {"out": tmp_path / "afile" / "run"}, "cannot"
    r = run_bin(prog, tmp_path, **over)
    assert r.returncode != 0
    err = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(err) == 1 and expect in err[0], r.stderr[-500:]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def flipped_copy(src: Path, dest: Path, where: float) -> Path:
    data = bytearray(Path(src).read_bytes())
    data[int(len(data) * where)] ^= 0x08
    dest.write_bytes(bytes(data))
    return dest


@pytest.mark.parametrize("what", ["program", "data", "plan", "checkpoint"])
def test_a_flipped_bit_is_refused_by_the_binary_itself(prog, tmp_path, what):
    """The runner run alone (as on a phone, without the Python wrapper's checks) compares the program
    with its manifest's program_sha256 and every safetensors file with the tensors' SHA-256 in its
    metadata, and refuses a flipped bit naming the file."""
    if not native.hashing_available(prog["exe"]):
        pytest.skip("this build has no OpenSSL (sizes and shapes only)")
    over = {}
    if what == "program":
        p = tmp_path / "p.pte"
        for suffix in (".json", ".adapter.safetensors"):
            shutil.copy(str(prog["path"]) + suffix, str(p) + suffix)
        over["program"] = flipped_copy(prog["path"], p, 0.6)
    elif what == "data":
        over["data"] = flipped_copy(prog["data"], tmp_path / "d.safetensors", 0.9)
    elif what == "plan":
        native.write_plan(tmp_path / "good_plan.safetensors", 10, B, SEED, STEPS)
        over["plan"] = flipped_copy(tmp_path / "good_plan.safetensors", tmp_path / "plan.safetensors", 0.95)
    else:  # a checkpoint the binary wrote itself carries the hash too
        r = run_bin(prog, tmp_path, **{"stop-after": 4, "checkpoint-every": 2})
        assert r.returncode == 0, r.stderr[-500:]
        state = tmp_path / "out" / "checkpoints" / "last" / "state.safetensors"
        flipped_copy(state, state, 0.97)
        over["resume"] = ""
    cmd = bin_cmd(prog, tmp_path, **over)
    if what == "checkpoint":
        cmd = [x for x in cmd if x != ""]
    before = sorted(p.name for p in (tmp_path / "out").rglob("*")) if (tmp_path / "out").exists() else []
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    err = [line for line in r.stderr.splitlines() if "error:" in line]
    assert r.returncode != 0 and len(err) == 1 and "is damaged: its SHA-256 differs" in err[0], r.stderr[-500:]
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == before if before else not (tmp_path / "out").exists()


def test_wrapper_refuses_with_a_prge_error(prog, tmp_path):
    with pytest.raises(PrgeError, match="not found"):
        native.native_train(tmp_path / "nope.pte", prog["data"], tmp_path / "o", binary=prog["exe"], **KW)


def test_the_program_describes_itself(prog):
    """Shapes and the identity hash are constant methods of the .pte, equal to the manifest's."""
    from executorch.runtime import Runtime

    from prge.engine.formats import CONSTANT_METHODS, identity_sha256, read_dataset

    p = Runtime.get().load_program(prog["path"])
    got = {m: p.load_method(m).execute([])[0] for m in CONSTANT_METHODS}
    m = prog["manifest"]
    assert got == {meth: m[field] for meth, field in CONSTANT_METHODS.items()}
    assert got["get_identity_sha256"] == identity_sha256(m) == m["identity_sha256"]
    _, meta = read_dataset(prog["data"])
    assert meta["identity_sha256"] == m["identity_sha256"]


@pytest.mark.parametrize("field", ["model", "label_ids"])
def test_data_for_another_program_is_refused_by_the_identity_hash(prog, tmp_path, field):
    """Same shapes, another identity (model or label words): the binary compares the program's hash
    with the data file's and refuses with one line, writing nothing; the Python loop refuses too."""
    from prge.data.batch import Encoded

    other = dict(prog["manifest"], **{field: "another/model" if field == "model" else prog["manifest"]["label_ids"][::-1]})
    d = tmp_path / "other.safetensors"
    write_dataset(d, {"train": [Encoded([5, 6, 7], [8], 0)] * 10, "dev": [Encoded([5, 6], [8], 1)] * 2}, other)
    r = run_bin(prog, tmp_path, data=d)
    err = [line for line in r.stderr.splitlines() if "error:" in line]
    assert r.returncode == 1 and len(err) == 1 and "written for another program (identity hash" in err[0], r.stderr[-500:]
    assert not (tmp_path / "out").exists()
    with pytest.raises(PrgeError, match=field):
        device_train(prog["path"], d, tmp_path / "py", progress=False, **KW)
    assert not (tmp_path / "py").exists()


def test_a_replaced_manifest_is_refused(prog, tmp_path):
    """The Python loop checks the program's own identity hash against the manifest beside it."""
    p = tmp_path / "p.pte"
    shutil.copy(prog["path"], p)
    shutil.copy(str(prog["path"]) + ".adapter.safetensors", str(p) + ".adapter.safetensors")
    m = dict(prog["manifest"], model="another/model")
    (tmp_path / "p.pte.json").write_text(json.dumps(m))
    from prge.engine.runtime import Engine

    with pytest.raises(PrgeError, match="does not match its manifest"):
        Engine(p, m)


@pytest.mark.parametrize("quantization,recorded,floor", [("8da4w", None, 0.03), ("8da8w", None, 0.01), ("8da8w", 0.03, 0.03),
                                                         ("int2", None, 0.03)])
def test_the_binary_alone_refuses_an_eps_below_the_programs_min_eps(prog, tmp_path, quantization, recorded, floor):
    """Run directly (not through `prge device-train --native`), the binary reads the smallest ε the
    program resolves (`get_min_eps`, the manifest's min_eps, and at least the quantisation's own floor:
    3e-2 for 8da4w and any quantisation it does not know, 1e-2 for 8da8w) and refuses a smaller --eps
    with one line and exit 2, writing nothing; at the threshold it trains. Python's rule
    (formats.min_eps) gives the same threshold."""
    from prge.engine.formats import min_eps, seal

    assert prog["manifest"]["min_eps"] == 0.0 and min_eps(prog["manifest"]) == 0.0  # an fp32 program
    p = tmp_path / "q.pte"
    shutil.copy(prog["path"], p)
    m = dict(prog["manifest"], quantization=quantization)
    if recorded is None:
        m.pop("min_eps")  # a manifest from before the field: the floor alone
    else:
        m["min_eps"] = recorded  # exported when 8da8w's floor was 3e-2: the program's own word holds
    m = seal(m)
    Path(str(p) + ".json").write_text(json.dumps(m))
    assert min_eps(m) == floor
    r = run_bin(prog, tmp_path, program=p, eps=floor * 0.9)
    err = [line for line in r.stderr.splitlines() if "error:" in line]
    assert r.returncode == 2 and len(err) == 1 and f"min_eps {floor:g}" in err[0], r.stderr[-500:]
    assert not (tmp_path / "out").exists()
    r = run_bin(prog, tmp_path, program=p, eps=floor, steps=1)
    assert r.returncode == 0, r.stderr[-500:]
    assert len(step_losses(tmp_path / "out")) == 1


def test_the_weight_cache_changes_no_result(prog, runs):
    """XNNPACK's shared packed weights (on by default) give the same bits as one packed copy per method."""
    _, nat, _ = runs
    out = prog["root"] / "nat_nocache"
    native.native_train(prog["path"], prog["data"], out, binary=prog["exe"], weight_cache=False, log=lambda m: None, **KW)
    assert json.loads((out / "native.json").read_text())["weight_cache"] is False
    assert json.loads((nat / "native.json").read_text())["weight_cache"] is True
    assert step_losses(out) == step_losses(nat)
    assert torch.equal(native.final_b_flat(out), native.final_b_flat(nat))
