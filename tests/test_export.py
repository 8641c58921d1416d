"""The whole P-RGE step inside ExecuTorch: parity with eager training, the device loop, resume,
and refusals.

One program is exported per test session (XNNPACK lowering takes about a minute on 2 cores) from
a tiny 2-layer Llama with LoRA on all 7 projections, q = 2, b = 2, T = 24, on SST-2 rows. Its B
starts random and nonzero, so the initial state serialised into the .pte is checked too (a zero
B would pass whether or not it was serialised).
"""

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("executorch")

from prge.zo import estimator as est  # noqa: E402
from prge.data.batch import Encoded, collate, step_indices  # noqa: E402
from prge.config import TrainConfig  # noqa: E402
from prge.engine.runtime import Engine, device_train  # noqa: E402
from prge.engine.formats import final_b, load_manifest, read_dataset
from prge.errors import PrgeError  # noqa: E402
from prge.run.evaluate import evaluate  # noqa: E402
from prge.engine.export import export_program, model_meta  # noqa: E402
from prge.engine.formats import check_manifest, write_dataset
from prge.zo.lora import add_lora, lora_layers, trainable_b  # noqa: E402
from prge.zo.loss import copy_losses, label_scores  # noqa: E402
from prge.zo.schedule import lr_at  # noqa: E402
from prge.testing import save_tiny, tiny_model  # noqa: E402
from prge.run.train import prepare  # noqa: E402
from prge.zo.step import apply_update, perturbed_losses, prge_step  # noqa: E402

Q, B, T, SEED, EPS, LR = 2, 2, 24, 0, 1e-2, 2e-2
ROOT = Path(__file__).resolve().parents[1]


def randomize_b(model, seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.copy_(scale * torch.randn(m.lora_B.shape, generator=g))


@pytest.fixture(scope="module")
def prog(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    cfg = TrainConfig(model=save_tiny(root / "model"), task="sst2", n_train=12, n_dev=10, n_test=4, q=Q,
                      batch_size=B, max_length=T, rank=4, alpha=8.0, seed=SEED, eps=EPS, lr=LR, progress=False)
    s = prepare(cfg)
    randomize_b(s.model)
    eager = copy.deepcopy(s.model)  # the reference; export resizes the copies of s.model only
    path = root / "tiny.pte"
    manifest = export_program(s.model, s.tokenizer, s.label_ids, q=Q, batch_size=B, max_length=T, loss="class",
                              out_path=path, model_name=cfg.model, label_words=[" great", " terrible"])
    data = root / "tiny.data.safetensors"
    write_dataset(data, s, manifest)
    return {"root": root, "cfg": cfg, "setup": s, "eager": eager, "path": path, "data": data, "manifest": manifest}


def fresh_eager(prog):
    model = copy.deepcopy(prog["eager"])
    return model, trainable_b(model)


def class_loss(model, label_ids):
    return lambda batch, copies: copy_losses(model, batch, copies, label_ids, "class")


def flat(bs):
    return torch.cat([b.reshape(-1) for b in bs])


def test_manifest_describes_the_program(prog):
    m = load_manifest(prog["path"])
    assert m == prog["manifest"]
    assert (m["q"], m["batch_size"], m["max_length"], m["answer_slots"], m["copies"]) == (Q, B, T, 1, 2 * Q)
    assert m["noise"] == "counter" and m["reproducible"] and m["loss"] == "class"
    assert [x["name"] for x in m["layers"]] == list(lora_layers(prog["eager"]))
    # the training methods, and for a classification program the label readout's features and readout_step methods
    assert set(m["methods"]) == {"train_step", "read_state", "read_raw", "write_raw", "evaluate", "features", "readout_step"}
    assert m["readout"] == {"head": "lm_head", "hidden_size": prog["eager"].config.hidden_size, "softcap": None,
                            "rank": 64, "batch": 16, "eval_every": 250}
    assert m["label_ids"] == prog["setup"].label_ids.tolist() and m["rank"] == 4
    assert os.path.getsize(prog["path"]) == m["program_bytes"]


def planned_mb(path: Path) -> dict:
    """benchmarks/footprint.py's reading of a program's planned memory (weights, arena per method, state)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_footprint", ROOT / "benchmarks" / "footprint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.program_sizes(Path(path))


def test_the_state_is_planned_once(prog):
    """The 2q copies of B are written in place: train_step's planned memory is its forward's (as large
    as evaluate's, whose batch is as large), not the forward plus a second set of copies and the noise,
    and write_raw holds its input plus one layer, not the input plus a second copy of the state.
    (Measured on this program before the in-place writes: train_step evaluate + 0.95 x state,
    write_raw 2.0 x state.)"""
    sizes, state = planned_mb(prog["path"]), 4 * prog["manifest"]["raw_size"] / 2**20
    own = sizes["arena_by_method_mb"]
    assert sizes["state_mb"] >= state - 1e-3  # the copies and ε, shared by every method
    assert own["train_step"] < own["evaluate"] + 0.5 * state
    assert own["write_raw"] < 1.5 * state


def test_open_loop_parity_with_eager(prog):
    """The same g sequence into the eager step (the estimator's functions on a copy of the model)
    and into the engine: the same losses per step and the same B at the end."""
    s = prog["setup"]
    model, params = fresh_eager(prog)
    engine = Engine(prog["path"], prog["manifest"])
    # the initial B was serialised into the program (InitializedMutableBufferPass)
    b0 = engine("read_state", torch.zeros(Q), torch.tensor([LR]))[0]
    assert torch.equal(b0, flat(params))
    tensors, _ = read_dataset(prog["data"])
    gs = [torch.tensor([0.8, -0.5]), torch.tensor([-1.2, 0.3]), torch.tensor([0.4, 0.9])]
    g_prev, worst = torch.zeros(Q), 0.0
    for step, g in enumerate(gs, start=1):
        idx = step_indices(len(s.train), B, SEED, step)
        batch = collate([s.train[i] for i in idx], s.pad_id, T, 1)
        key = torch.tensor([SEED, step])
        zs = [est.query_noise(key, j, Q, tuple(p.shape)) for j, p in enumerate(params)]
        eager_losses = perturbed_losses(model, params, zs, class_loss(model, s.label_ids), batch, EPS)
        apply_update(params, zs, g, LR)
        losses = engine("train_step", *batch.tensors(), torch.tensor([LR]), torch.tensor([EPS]), g_prev, key)[0]
        worst = max(worst, float((losses - eager_losses).abs().max()))
        g_prev = g
    b = engine("read_state", g_prev, torch.tensor([LR]))[0]
    b_err = float((b - flat(params)).abs().max())
    print(f"open-loop parity: max |loss diff| {worst:.2e}, max |B diff| {b_err:.2e}")
    assert worst < 1e-5
    assert b_err < 1e-6
    # evaluation uses the clean B with the pending update folded in
    ev = collate(s.dev[:8], s.pad_id, T, 1)
    n = prog["manifest"]["eval_batch_size"]
    ids = torch.cat([ev.input_ids, ev.input_ids[:1].repeat(n - 8, 1)])
    pos = torch.cat([ev.target_pos, ev.target_pos[:1].repeat(n - 8, 1)])
    scores = engine("evaluate", ids, pos, g_prev, torch.tensor([LR]))[0][:8]
    with torch.no_grad():
        ref = label_scores(model, ev, s.label_ids)
    assert float((scores - ref).abs().max()) < 1e-5


def test_host_noise_is_the_estimators():
    """Noise mode "host" draws exactly estimator.query_noise, in manifest layer order; the engine's
    batched counter noise (one hash chain per tensor size) is the same numbers too."""
    from prge.engine.runtime import host_noise
    from prge.zo.estimator import all_noise as batched_noise

    shapes = [[64, 4], [32, 4], [32, 4], [128, 4], [5, 3]]
    off, layers = 0, []
    for i, s in enumerate(shapes):
        layers.append({"name": f"l{i}", "shape": s, "offset": off})
        off += s[0] * s[1]
    key = torch.tensor([5, 17])
    z = host_noise({"q": 3, "layers": layers}, key)
    ref = [est.query_noise(key, j, 3, tuple(s)) for j, s in enumerate(shapes)]
    assert torch.equal(z, torch.cat([r.reshape(3, -1) for r in ref], 1))
    assert all(torch.equal(a, b) for a, b in zip(batched_noise(key, 3, [tuple(s) for s in shapes]), ref))


def eager_run(prog, steps, eval_every, lr_schedule="constant"):
    """The eager trainer's loop (prge_step, same seed, data order, lr schedule and evaluation) from the same B."""
    s = prog["setup"]
    model, params = fresh_eager(prog)

    def loss_fn(batch, copies):
        return copy_losses(model, batch, copies, s.label_ids, "class")

    losses, accs = [], {}
    for step in range(1, steps + 1):
        batch = collate([s.train[i] for i in step_indices(len(s.train), B, SEED, step)], s.pad_id)
        r = prge_step(model, params, loss_fn, batch, step, seed=SEED, q=Q, eps=EPS, lr=lr_at(LR, lr_schedule, step, steps))
        losses.append(float(r.losses.mean()))
        if step % eval_every == 0 or step == steps:
            accs[step] = evaluate(model, s.dev, s.pad_id, s.label_ids, 32, "class")["accuracy"]
    return losses, accs, flat(params)


def rows(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def device_run(prog):
    out = prog["root"] / "run_full"
    summary = device_train(prog["path"], prog["data"], out, steps=6, lr=LR, eps=EPS, seed=SEED, eval_every=3, progress=False)
    return out, summary


def test_closed_loop_matches_the_eager_trainer(prog, device_run):
    out, summary = device_run
    losses, accs, b_eager = eager_run(prog, 6, 3)
    r = rows(out)
    d_losses = [x["loss"] for x in r if "loss" in x and "split" not in x]
    d_accs = {x["step"]: x["accuracy"] for x in r if x.get("split") == "dev" and x["step"] > 0}
    assert len(d_losses) == 6
    assert max(abs(a - b) for a, b in zip(losses, d_losses)) < 1e-5
    assert d_accs == accs
    names = [x["name"] for x in prog["manifest"]["layers"]]
    b_dev = final_b(out)
    assert float((flat([b_dev[n] for n in names]) - b_eager).abs().max()) < 1e-5
    assert summary["dev_after"] == accs[6]


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_lr_schedule_matches_the_eager_trainer(prog, device_run, schedule):
    """A decaying lr is host-side: call t + 1 applies step t's g at step t's lr, as the eager trainer does."""
    out = prog["root"] / f"run_{schedule}"
    device_train(prog["path"], prog["data"], out, steps=6, lr=LR, eps=EPS, seed=SEED, eval_every=3, progress=False,
                 lr_schedule=schedule)
    losses, accs, b_eager = eager_run(prog, 6, 3, schedule)
    d_losses = [x["loss"] for x in rows(out) if "split" not in x]
    assert max(abs(a - b) for a, b in zip(losses, d_losses)) < 1e-5
    assert {x["step"]: x["accuracy"] for x in rows(out) if x.get("split") == "dev" and x["step"] > 0} == accs
    names = [x["name"] for x in prog["manifest"]["layers"]]
    b_dev, b_const = final_b(out), final_b(device_run[0])
    assert float((flat([b_dev[n] for n in names]) - b_eager).abs().max()) < 1e-5
    assert max(float((b_dev[n] - b_const[n]).abs().max()) for n in names) > 1e-4  # the schedule changed the run
    saved = json.loads((out / "checkpoints" / "last" / "trainer_state.json").read_text())
    assert saved["lr_schedule"] == schedule


def test_adapter_is_peft_format_and_loads(prog, device_run):
    from prge.run.adapters import load_adapter

    out, _ = device_run
    folder = out / "adapter"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
    model, _ = tiny_model("llama")
    load_adapter(model, folder)
    eager = prog["eager"]
    for name, m in lora_layers(model).items():
        assert torch.equal(m.lora_A, lora_layers(eager)[name].lora_A)
    assert (out / "checkpoints" / "best" / "adapter" / "adapter_model.safetensors").is_file()


def test_resume_is_bit_exact(prog, device_run):
    out_full, _ = device_run
    out = prog["root"] / "run_resumed"
    kw = dict(steps=6, lr=LR, eps=EPS, seed=SEED, eval_every=3, progress=False)
    assert device_train(prog["path"], prog["data"], out, stop_after=4, **kw)["stopped_at"] == 4
    # a stop below the resumed step ends there at once, without relabelling the checkpoint
    assert device_train(prog["path"], prog["data"], out, resume=True, stop_after=2, **kw)["stopped_at"] == 4
    assert json.loads((out / "checkpoints" / "last" / "trainer_state.json").read_text())["step"] == 4
    device_train(prog["path"], prog["data"], out, resume=True, **kw)
    a, b = final_b(out_full), final_b(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [x for x in rows(out) if "split" not in x] != []
    assert [x["loss"] for x in rows(out) if "split" not in x] == [x["loss"] for x in rows(out_full) if "split" not in x]
    with pytest.raises(PrgeError, match="seed"):
        device_train(prog["path"], prog["data"], out, resume=True, **{**kw, "seed": 1})


@pytest.mark.parametrize("kill_at", [1, 5])
def test_a_kill_between_evaluations_resumes_from_the_periodic_checkpoint(prog, device_run, monkeypatch, kill_at):
    """With no evaluation until the end, a run killed at step `kill_at` resumes from the last
    --checkpoint-every checkpoint (step 0, written right after the before-training evaluation, or
    step 4), and ends on the bits of the uninterrupted run (which evaluated every 3 steps and wrote
    no periodic checkpoint: neither changes the trajectory)."""
    from prge.engine.runtime import Engine

    out_full, _ = device_run
    out = prog["root"] / f"run_killed_{kill_at}"
    kw = dict(steps=6, lr=LR, eps=EPS, seed=SEED, eval_every=0, checkpoint_every=2, progress=False)
    real, calls = Engine.__call__, []

    def dies(self, method, *inputs):
        if method == "train_step":
            calls.append(1)
            if len(calls) == kill_at:
                raise KeyboardInterrupt("killed")
        return real(self, method, *inputs)

    monkeypatch.setattr(Engine, "__call__", dies)
    with pytest.raises(KeyboardInterrupt):
        device_train(prog["path"], prog["data"], out, **kw)
    assert json.loads((out / "checkpoints" / "last" / "trainer_state.json").read_text())["step"] == (0 if kill_at == 1 else 4)
    monkeypatch.setattr(Engine, "__call__", real)
    device_train(prog["path"], prog["data"], out, resume=True, **kw)
    assert [x["step"] for x in rows(out) if x.get("split") == "dev"] == [0, 6]  # the first evaluation was kept, not redone
    assert [x["loss"] for x in rows(out) if "split" not in x] == [x["loss"] for x in rows(out_full) if "split" not in x]
    a, b = final_b(out_full), final_b(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(PrgeError, match="checkpoint-every"):
        device_train(prog["path"], prog["data"], out, **{**kw, "checkpoint_every": -1})


def test_nan_loss_names_the_step_and_keeps_the_checkpoint(prog):
    out = prog["root"] / "run_nan"
    with pytest.raises(PrgeError, match=r"non-finite loss at step \d+"):
        device_train(prog["path"], prog["data"], out, steps=8, lr=1e37, eps=EPS, seed=SEED, eval_every=1, progress=False)
    state = json.loads((out / "checkpoints" / "last" / "trainer_state.json").read_text())
    raw = read_state_file(out / "checkpoints" / "last")
    assert torch.isfinite(raw).all() and state["step"] >= 1


def read_state_file(folder):
    from prge.io import load_tensors

    return load_tensors(folder / "state.safetensors")["raw"]


# ------------------------------------------------------------------------------------------------
# refusals


def copy_program(prog, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for suffix in ("", ".json", ".adapter.safetensors"):
        shutil.copy(str(prog["path"]) + suffix, str(dest / "tiny.pte") + suffix)
    return dest / "tiny.pte"


@pytest.mark.parametrize("field,value", [("max_length", 32), ("q", 4), ("batch_size", 4), ("loss", "lm")])
def test_data_for_another_program_is_refused(prog, tmp_path, field, value):
    other = {**prog["manifest"], field: value}
    data = tmp_path / "other.safetensors"
    write_dataset(data, prog["setup"], other)
    with pytest.raises(PrgeError, match=f"{field}.*re-export"):
        device_train(prog["path"], data, tmp_path / "run", steps=1, lr=LR, eps=EPS, progress=False)


def test_sequence_longer_than_the_program_is_refused(prog, tmp_path):
    s = prog["setup"]
    long = Encoded(list(range(3, 3 + T + 5)), [s.label_ids[0].item()], 0)
    with pytest.raises(PrgeError, match="larger --max-length"):
        write_dataset(tmp_path / "d.safetensors", {"train": s.train + [long], "dev": s.dev}, prog["manifest"])


def test_truncated_program_is_refused(prog, tmp_path):
    path = copy_program(prog, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PrgeError, match="truncated"):
        device_train(path, prog["data"], tmp_path / "run", steps=1, lr=LR, eps=EPS, progress=False)
    # same size, damaged contents: refused by the program's recorded SHA-256 ...
    path.write_bytes(b"\0" * len(data))
    with pytest.raises(PrgeError, match="tiny.pte is damaged: its SHA-256 differs"):
        device_train(path, prog["data"], tmp_path / "run", steps=1, lr=LR, eps=EPS, progress=False)
    # ... and without a recorded hash (older manifests) the runtime's refusal becomes a PrgeError too
    unhashed = {k: v for k, v in load_manifest(path).items() if k != "program_sha256"}
    with pytest.raises(PrgeError, match="cannot load"):
        Engine(path, unhashed)


def test_eps_below_what_a_quantised_program_resolves_is_refused(prog, tmp_path):
    """A quantised base cannot resolve a small ε (int8 activation rounding swamps L+ - L-): the Python
    loop, the CLI (before the native runner starts) and the exporter refuse it, writing nothing."""
    from prge.cli import main

    path = copy_program(prog, tmp_path)
    mpath = Path(str(path) + ".json")
    from prge.engine.formats import seal

    # a manifest is sealed (issue 23): the edited one must be sealed again to reach the eps check
    mpath.write_text(json.dumps(seal({**json.loads(mpath.read_text()), "quantization": "8da4w"})))
    with pytest.raises(PrgeError, match="eps=0.001 is below.*8da4w.*--eps 0.03"):
        device_train(path, prog["data"], tmp_path / "run", steps=1, lr=LR, eps=1e-3, progress=False)
    for native in ([], ["--native"]):
        assert main(["device-train", "--program", str(path), "--data", str(prog["data"]), "--out", str(tmp_path / "run"),
                     "--steps", "1", "--eps", "1e-3", "--no-progress", *native]) == 2
    assert not (tmp_path / "run").exists()
    with pytest.raises(PrgeError, match="eps=0.005 is below"):
        export_program(prog["eager"], prog["setup"].tokenizer, prog["setup"].label_ids, q=Q, batch_size=B, max_length=T,
                       quantize="8da8w", out_path=tmp_path / "q.pte", model_name="tiny", run_defaults={"eps": 5e-3})
    assert not (tmp_path / "q.pte").exists()
    # at the threshold the check passes (the loop then runs the fp32 program under this manifest)
    device_train(path, prog["data"], tmp_path / "ok", steps=1, lr=LR, eps=3e-2, eval_every=0, progress=False)


def test_export_quantize_option_defaults_to_an_fp32_base(capsys):
    from prge.cli import parser

    p = parser()
    assert p.parse_args(["export", "--out", "x.pte"]).quantize == "none"
    assert p.parse_args(["export", "--out", "x.pte", "--quantize", "8da4w"]).quantize == "8da4w"
    with pytest.raises(SystemExit):
        p.parse_args(["export", "--out", "x.pte", "--quantize", "int3"])
    with pytest.raises(SystemExit):
        p.parse_args(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert text.count("(default: none)") == 1 and "none: a float32 base" in text


@pytest.mark.parametrize("quantize,eps,recorded", [("none", None, 1e-2), ("8da8w", None, 3e-2), ("8da4w", None, 3e-2),
                                                   ("8da8w", "1e-2", 1e-2), ("none", "5e-3", 5e-3)])
def test_prge_export_records_the_eps_a_quantised_base_trains_at(tmp_path, monkeypatch, capsys, quantize, eps, recorded):
    """Without --eps, `prge export --quantize` records QUANTIZED_DEFAULT_EPS (3e-2) for the device run and
    says so; an --eps the base resolves (8da8w down to 1e-2) is recorded as given."""
    import prge.engine.export as ex
    from prge.cli import main

    seen = {}

    def fake_export(model, tokenizer, label_ids, **kw):  # stop before the minutes of lowering
        seen.update(quantize=kw["quantize"], eps=kw["run_defaults"]["eps"])
        raise PrgeError("stopped here", "a test")

    monkeypatch.setattr(ex, "export_program", fake_export)
    args = ["export", "--model", save_tiny(tmp_path / "m"), "--task", "sst2", "--n-train", "4", "--n-dev", "4", "--q", "1",
            "--batch-size", "1", "--max-length", "16", "--quantize", quantize, "--out", str(tmp_path / "p.pte")]
    assert main(args + (["--eps", eps] if eps else [])) == 2
    assert seen == {"quantize": None if quantize == "none" else quantize, "eps": recorded}
    assert ("recording eps 0.03" in capsys.readouterr().err) == (quantize != "none" and eps is None)


def test_corrupt_checkpoint_is_refused(prog, tmp_path, device_run):
    out = tmp_path / "run"
    shutil.copytree(device_run[0], out)
    state = out / "checkpoints" / "last" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(PrgeError, match="state.safetensors"):
        device_train(prog["path"], prog["data"], out, steps=8, lr=LR, eps=EPS, resume=True, progress=False)
    (out / "checkpoints" / "last" / "trainer_state.json").write_text("{not json")
    with pytest.raises(PrgeError, match="damaged"):
        device_train(prog["path"], prog["data"], out, steps=8, lr=LR, eps=EPS, resume=True, progress=False)


def test_manifest_model_mismatch_is_refused(prog):
    s, m = prog["setup"], prog["manifest"]
    check_manifest(m, model_meta(prog["eager"], s.tokenizer, m["model"]))  # the right model passes
    other, tok = tiny_model("llama")
    add_lora(other, rank=8, alpha=16)
    with pytest.raises(PrgeError, match="LoRA layers differ"):
        check_manifest(m, model_meta(other, tok))
    with pytest.raises(PrgeError, match="model is"):
        check_manifest(m, {"model": "smollm2-135m"})
    with pytest.raises(PrgeError, match="vocab_sha256"):
        check_manifest(m, {"vocab_sha256": "0" * 64})


def test_device_train_imports_no_model_code(prog, tmp_path):
    code = f"""
import sys
from prge.engine.runtime import device_train
device_train({str(prog['path'])!r}, {str(prog['data'])!r}, {str(tmp_path / 'run')!r}, steps=2, lr={LR}, eps={EPS},
             eval_every=1, progress=False)
bad = [m for m in ("transformers", "prge.models", "prge.zo.lora", "prge.zo.loss", "prge.run.train", "prge.engine.export", "prge.zo.step")
       if m in sys.modules]
print("BAD", bad)
assert not bad, bad
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "BAD []" in r.stdout
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_cli_device_train(prog, tmp_path):
    from prge.cli import main

    out = tmp_path / "run"
    assert main(["device-train", "--program", str(prog["path"]), "--data", str(prog["data"]), "--out", str(out),
                 "--steps", "2", "--lr", str(LR), "--eps", str(EPS), "--eval-every", "0", "--no-progress"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert main(["device-train", "--program", str(tmp_path / "missing.pte"), "--data", str(prog["data"]),
                 "--out", str(out), "--steps", "1"]) == 2


# ------------------------------------------------------------------------------------------------
# the other program variants: one more export each (40-90 s), so marked slow (pytest -m slow)


def small_setup(tmp_path, **kw):
    cfg = TrainConfig(model=save_tiny(tmp_path / "model"), task="sst2", n_train=8, n_dev=8, n_test=4, q=Q,
                      batch_size=B, max_length=16, rank=4, alpha=8.0, seed=SEED, progress=False, **kw)
    s = prepare(cfg)
    randomize_b(s.model)
    return s, copy.deepcopy(s.model)


@pytest.mark.slow
@pytest.mark.parametrize("noise", ["host", "engine"])
def test_noise_modes(tmp_path, noise):
    s, eager = small_setup(tmp_path)
    params = trainable_b(eager)
    m = export_program(s.model, s.tokenizer, s.label_ids, q=Q, batch_size=B, max_length=16, noise=noise,
                       out_path=tmp_path / "p.pte", model_name="tiny", methods=("train_step", "read_state", "read_raw"))
    assert m["reproducible"] == (noise != "engine")
    engine = Engine(tmp_path / "p.pte", m)
    from prge.engine.runtime import host_noise

    g_prev = torch.zeros(Q)
    for step, g in enumerate([torch.tensor([0.5, -0.3]), torch.tensor([0.2, 0.9])], start=1):
        batch = collate(s.train[2 * step - 2:2 * step], s.pad_id, 16, 1)
        key = torch.tensor([SEED, step])
        extra = [host_noise(m, key)] if noise == "host" else []
        losses = engine("train_step", *batch.tensors(), torch.tensor([LR]), torch.tensor([EPS]), g_prev, key, *extra)[0]
        raw = engine("read_raw")[0]
        # the copies hold B ± εz for this step's z: rebuild both and check the update on the host
        zs, off = [], 0
        for p in params:
            n = 2 * Q * p.numel()
            b, z = est.rebuild(raw[off:off + n].reshape(2 * Q, *p.shape), EPS)
            zs.append(z)
            if noise == "host":
                assert float((z - est.query_noise(key, len(zs) - 1, Q, tuple(p.shape))).abs().max()) < 1e-3
            assert float((b - p).abs().max()) < 1e-6  # the clean B the eager side holds
            off += n
        ref = perturbed_losses(eager, params, zs, class_loss(eager, s.label_ids), batch, EPS)
        apply_update(params, zs, g, LR)
        assert float((losses - ref).abs().max()) < 1e-5
        g_prev = g
    b = engine("read_state", g_prev, torch.tensor([LR]))[0]
    assert float((b - flat(params)).abs().max()) < 1e-6


@pytest.mark.slow
def test_quantized_base(tmp_path):
    s, eager = small_setup(tmp_path)
    m = export_program(s.model, s.tokenizer, s.label_ids, q=Q, batch_size=B, max_length=16, quantize="8da4w",
                       out_path=tmp_path / "p.pte", model_name="tiny", methods=("train_step", "read_state"))
    assert m["quantization"] == "8da4w" and m["int4_qparams"] == "hqq_scale_only"
    assert all(type(x.base.weight) is torch.nn.Parameter for x in lora_layers(s.model).values())  # caller's model untouched
    engine = Engine(tmp_path / "p.pte", m)
    batch = collate(s.train[:2], s.pad_id, 16, 1)
    key = torch.tensor([SEED, 1])
    losses = engine("train_step", *batch.tensors(), torch.tensor([LR]), torch.tensor([EPS]), torch.zeros(Q), key)[0]
    params = trainable_b(eager)
    zs = [est.query_noise(key, j, Q, tuple(p.shape)) for j, p in enumerate(params)]
    ref = perturbed_losses(eager, params, zs, class_loss(eager, s.label_ids), batch, EPS)
    assert torch.isfinite(losses).all()
    assert float((losses - ref).abs().max()) < 0.05  # int4 weights: close, not equal
    b = engine("read_state", torch.zeros(Q), torch.tensor([LR]))[0]
    assert float((b - flat(params)).abs().max()) < 1e-6  # B stays float32


@pytest.mark.slow
def test_lm_loss_program(tmp_path):
    """Completions (loss "lm", several answer tokens): the step's losses and evaluate's per-example
    answer CE and correct tokens match eager."""
    from prge.data.batch import Example, encode

    model, tok = tiny_model("llama")
    add_lora(model, rank=4, alpha=8.0)
    randomize_b(model)
    eager = copy.deepcopy(model)
    exs = [Example(f"Question {i}: the capital of France is", " Paris. The dog was happy.") for i in range(4)]
    items = encode(exs, tok, 24)
    K = max(len(e.answer_ids) for e in items)
    m = export_program(model, tok, None, q=Q, batch_size=B, max_length=24, answer_slots=K, loss="lm",
                       out_path=tmp_path / "p.pte", model_name="tiny")
    engine = Engine(tmp_path / "p.pte", m)
    batch = collate(items[:2], tok.pad_token_id, 24, K)
    key = torch.tensor([SEED, 1])
    losses = engine("train_step", *batch.tensors(), torch.tensor([LR]), torch.tensor([EPS]), torch.zeros(Q), key)[0]
    params = trainable_b(eager)
    zs = [est.query_noise(key, j, Q, tuple(p.shape)) for j, p in enumerate(params)]
    ref = perturbed_losses(eager, params, zs, lambda b, c: copy_losses(eager, b, c, None, "lm"), batch, EPS)
    assert float((losses - ref).abs().max()) < 1e-5
    n = m["eval_batch_size"]
    ev = collate((items * n)[:n], tok.pad_token_id, 24, K)
    ce, correct = engine("evaluate", *ev.tensors()[:4], torch.zeros(Q), torch.tensor([LR]))
    ref_eval = evaluate(eager, items, tok.pad_token_id, None, 32, "lm")
    tokens = float(ev.target_mask[:4].sum())
    assert abs(float(ce[:4].sum()) / tokens - ref_eval["loss"]) < 1e-4
    assert abs(float(correct[:4].sum()) / tokens - ref_eval["accuracy"]) < 1e-6


# --- reliability: a flipped bit in any engine file is refused naming the file; one run per folder ---


def flip_bit(path: Path, where: float = 0.9, bit: int = 2) -> None:
    """Flip one bit of `path` at fraction `where` of its length (0.9: inside a safetensors file's tensors)."""
    data = bytearray(path.read_bytes())
    i = min(int(len(data) * where), len(data) - 1)
    data[i] ^= 1 << bit
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("suffix,where", [("", 0.5), ("", 0.99), (".json", 0.5), (".adapter.safetensors", 0.9)])
def test_flipped_bit_in_a_program_file_is_refused(prog, tmp_path, suffix, where):
    path = copy_program(prog, tmp_path / "p")
    flip_bit(Path(str(path) + suffix), where)
    with pytest.raises(PrgeError, match=r"tiny\.pte" + suffix.replace(".", r"\.") + r".* (damaged|not valid JSON|not a readable)"):
        device_train(path, prog["data"], tmp_path / "run", steps=1, lr=LR, eps=EPS, progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where", [0.5, 0.95])
def test_flipped_bit_in_the_data_file_is_refused(prog, tmp_path, where):
    data = tmp_path / "d.safetensors"
    shutil.copy(prog["data"], data)
    flip_bit(data, where)
    with pytest.raises(PrgeError, match=r"d\.safetensors"):
        device_train(prog["path"], data, tmp_path / "run", steps=1, lr=LR, eps=EPS, progress=False)


@pytest.mark.parametrize("name", ["state.safetensors", "trainer_state.json", "adapter/adapter_model.safetensors",
                                  "adapter/adapter_config.json", "SHA256SUMS"])
def test_flipped_bit_in_an_engine_checkpoint_is_refused(prog, tmp_path, device_run, name):
    out = tmp_path / "run"
    shutil.copytree(device_run[0], out)
    last = out / "checkpoints" / "last"
    assert (last / "SHA256SUMS").is_file() and (last / "adapter" / "SHA256SUMS").is_file()
    flip_bit(last / name, 0.6 if name.endswith(".json") else 0.95)
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(PrgeError, match="damaged|missing"):
        device_train(prog["path"], prog["data"], out, steps=8, lr=LR, eps=EPS, resume=True, progress=False)
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing written


def test_engine_checkpoint_without_hashes_still_resumes(prog, tmp_path, device_run):
    """Checkpoints written before hashes existed (no SHA256SUMS, no prge_sha256 metadata) resume as before."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "run"
    shutil.copytree(device_run[0], out)
    for sums in out.rglob("SHA256SUMS"):
        sums.unlink()
    for f in out.rglob("*.safetensors"):
        save_file(load_file(str(f)), str(f), metadata={"format": "pt"})
    device_train(prog["path"], prog["data"], out, steps=8, lr=LR, eps=EPS, eval_every=3, resume=True, progress=False)
    assert (out / "checkpoints" / "last" / "SHA256SUMS").is_file()


def test_device_train_into_a_live_runs_folder_is_refused(prog, tmp_path):
    out = tmp_path / "run"
    code = f"from prge.run.lock import run_lock\nimport time\nwith run_lock({str(out)!r}):\n    print('held', flush=True)\n    time.sleep(60)\n"
    holder = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        with pytest.raises(PrgeError, match=f"in use by prge run pid {holder.pid}"):
            device_train(prog["path"], prog["data"], out, steps=2, lr=LR, eps=EPS, progress=False)
        assert sorted(p.name for p in out.iterdir()) == [".prge.lock"]
    finally:
        holder.kill()
        holder.wait()
    device_train(prog["path"], prog["data"], out, steps=2, lr=LR, eps=EPS, eval_every=0, progress=False)
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and not (out / ".prge.lock").exists()
