"""The label readout on the device (`prge.engine.runtime.fit_readout`): the exported program's features
method gives the eager model's hidden states, the host step is the eager trainer's own function, so
`prge device-train` (Python loop and --native) fits the readout `prge train` fits; it travels in the
best checkpoint's PEFT adapter, reruns the same after a resume, and bad options are one clear line.

The data (as tests/test_readout.py): rows whose last word decides the label, which the tiny random
model's final hidden state separates while its head's label rows do not.
"""

import json
import shutil

import pytest
import torch

pytest.importorskip("executorch")

from prge.cli import main  # noqa: E402
from prge.config import TrainConfig  # noqa: E402
from prge.data.batch import collate  # noqa: E402
from prge.engine.export import export_program  # noqa: E402
from prge.engine.runtime import Engine, ReadoutSettings, device_features, device_train  # noqa: E402
from prge.engine.formats import load_manifest, seal, write_dataset  # noqa: E402
from prge.errors import PrgeError  # noqa: E402
from prge.run import adapters  # noqa: E402
from prge.run.train import prepare, run  # noqa: E402
from prge.testing import peft_label_logits, save_tiny  # noqa: E402
from prge.zo import readout  # noqa: E402
from prge.zo.lora import trainable_b  # noqa: E402
from prge.zo.loss import label_head, label_scores  # noqa: E402

STEPS, RO = 2, dict(readout_steps=1500, readout_rows=48)


def rows(n, offset=0):
    words = ["alpha", "beta"]
    return [{"text": f"item {i + offset} is {words[(i * 7 + i // 3) % 2]}", "label": ["great", "terrible"][(i * 7 + i // 3) % 2]}
            for i in range(n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dro")
    tiny = save_tiny(root / "tiny", "llama")
    tr, ev = root / "tr.jsonl", root / "ev.jsonl"
    tr.write_text("".join(json.dumps(r) + "\n" for r in rows(48)))
    ev.write_text("".join(json.dumps(r) + "\n" for r in rows(24, offset=100)))
    cfg = TrainConfig(model=tiny, train_file=str(tr), eval_file=str(ev), label_words=["great", "terrible"], steps=STEPS,
                      eval_every=STEPS, rank=2, alpha=4, q=2, batch_size=2, lr=0.01, progress=False, max_length=32, **RO)
    s = prepare(cfg)
    path = root / "p.pte"
    manifest = export_program(s.model, s.tokenizer, s.label_ids, q=cfg.q, batch_size=cfg.batch_size, max_length=cfg.max_length,
                              out_path=path, model_name=cfg.model, run_defaults={"readout": None, **RO})
    data = root / "p.data.safetensors"
    write_dataset(data, s, manifest)
    eager = run(TrainConfig(**{**vars(cfg), "out": str(root / "eager")}))
    return {"root": root, "cfg": cfg, "path": path, "data": data, "manifest": manifest, "eager": eager}


def device(setup, out, **kw):
    args = dict(steps=STEPS, lr=0.01, eps=setup["cfg"].eps, seed=0, eval_every=STEPS, progress=False,
                readout=ReadoutSettings(None, **{k[len("readout_"):]: v for k, v in RO.items()}))
    args.update(kw)
    return device_train(setup["path"], setup["data"], out, **args)


@pytest.fixture(scope="module")
def device_run(setup):
    out = setup["root"] / "dev"
    return out, device(setup, out)


def test_program_has_the_features_method_and_it_matches_eager(setup):
    m = setup["manifest"]
    assert "features" in m["methods"] and m["readout"]["head"] == "lm_head"
    s = prepare(setup["cfg"])
    engine = Engine(setup["path"], m)
    from prge.engine.formats import read_dataset

    tensors, _ = read_dataset(setup["data"])
    assert "features" not in engine.methods  # loaded only by the host step: its activations stay unplanned in the loop
    engine.load("features")
    got = device_features(engine, tensors, "dev", 24, torch.zeros(m["q"]), 0.01)
    h, y = readout.features(s.model, s.dev, s.pad_id, 16)
    torch.testing.assert_close(got.h, h, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.base, label_head(s.model, h, s.label_ids), atol=1e-4, rtol=1e-4)
    assert torch.equal(got.y, y)


def test_device_train_fits_the_readout_prge_train_fits(setup, device_run):
    out, summary = device_run
    ro, eager = summary["readout"], setup["eager"]["readout"]
    assert ro["rank"] == eager["rank"] and ro["rows"] == eager["rows"] == 48
    assert ro["dev_before"] == eager["dev_before"] and ro["dev_after"] == eager["dev_after"]
    assert ro["dev_after"] >= 0.9 > ro["dev_before"] + 0.2  # the head could not, the readout does
    best = out / "checkpoints" / "best" / "adapter"
    assert (best / adapters.READOUT_NAME).is_file() and not (out / "adapter" / adapters.READOUT_NAME).exists()
    # the device's adapter scores the dev rows as the eager run's best checkpoint does
    s_dev = prepare(setup["cfg"], adapter=str(best))
    s_eag = prepare(setup["cfg"], adapter=str(setup["root"] / "eager" / "checkpoints" / "best"))
    batch = collate(s_dev.dev, s_dev.pad_id)
    a, b = label_scores(s_dev.model, batch, s_dev.label_ids), label_scores(s_eag.model, batch, s_eag.label_ids)
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    torch.testing.assert_close(a, b, atol=5e-3, rtol=1e-3)


def test_the_device_adapter_loads_in_peft(setup, device_run):
    pytest.importorskip("peft")
    best = device_run[0] / "checkpoints" / "best" / "adapter"
    s = prepare(setup["cfg"], adapter=str(best))
    batch = collate(s.dev, s.pad_id)
    torch.testing.assert_close(peft_label_logits(setup["cfg"].model, best, batch, s.label_ids),
                               label_scores(s.model, batch, s.label_ids), atol=1e-4, rtol=1e-4)

def test_resume_after_the_last_step_fits_the_same_readout(setup, device_run):
    out = setup["root"] / "part"
    assert device(setup, out, stop_after=STEPS - 1)["stopped_at"] == STEPS - 1
    assert not (out / "checkpoints" / "best" / "adapter" / adapters.READOUT_NAME).exists()
    resumed = device(setup, out, resume=True)
    assert resumed["readout"] == {**device_run[1]["readout"], "minutes": resumed["readout"]["minutes"]}
    a = readout.get(prepare(setup["cfg"], adapter=str(out / "checkpoints" / "best" / "adapter")).model)
    b = readout.get(prepare(setup["cfg"], adapter=str(device_run[0] / "checkpoints" / "best" / "adapter")).model)
    assert torch.equal(a.b, b.b) and torch.equal(a.a, b.a)


def test_the_device_keeps_the_untrained_readout_as_prge_train_does(setup, tmp_path):
    # lr 1.0 (as tests/test_readout.py): the LoRA steps' best checkpoint reads out worse than the untrained model
    kw = dict(steps=6, eval_every=2, lr=1.0, readout_steps=300)
    eager = run(TrainConfig(**{**vars(setup["cfg"]), **kw, "out": str(tmp_path / "eager")}))
    summary = device(setup, tmp_path / "dev", steps=6, eval_every=2, lr=1.0,
                     readout=ReadoutSettings(None, steps=300, rows=RO["readout_rows"]))
    ro, ero = summary["readout"], eager["readout"]
    assert summary["best_step"] == eager["best_step"] > 0 and ro["checkpoint_step"] == ero["checkpoint_step"] == 0
    assert ro["dev_after_untrained"] == ero["dev_after_untrained"] and ro["dev_after"] == ero["dev_after"]
    kept = prepare(setup["cfg"], adapter=str(tmp_path / "dev" / "checkpoints" / "best" / "adapter"))
    assert all(float(b.abs().max()) == 0 for b in trainable_b(kept.model))
    eager_kept = readout.get(prepare(setup["cfg"], adapter=str(tmp_path / "eager" / "checkpoints" / "best")).model)
    torch.testing.assert_close(readout.get(kept.model).b, eager_kept.b, atol=1e-4, rtol=1e-4)


def test_readout_off_and_the_recorded_default(setup, tmp_path):
    summary = device(setup, tmp_path / "off", readout=ReadoutSettings(0))
    assert "readout" not in summary
    assert load_manifest(setup["path"])["run_defaults"]["readout_steps"] == RO["readout_steps"]


def native_or_skip():
    native = pytest.importorskip("prge.engine.native")
    if shutil.which("cmake") is None:
        pytest.skip("no cmake")
    return native


def settings(**kw):
    return ReadoutSettings(None, **{**{k[len("readout_"):]: v for k, v in RO.items()}, **kw})


def test_the_program_readout_step_is_the_eager_readout_step(setup):
    m = setup["manifest"]
    assert "readout_step" in m["methods"] and m["readout"]["rank"] == readout.DEFAULT_RANK
    engine = Engine(setup["path"], m)
    assert "readout_step" not in engine.methods
    engine.load("readout_step")
    g = torch.Generator().manual_seed(0)
    n, r, k = readout.BATCH, m["readout"]["rank"], len(m["label_ids"])
    f, base, y = torch.randn(n, r, generator=g), torch.randn(n, k, generator=g), torch.randint(0, k, (n,), generator=g)
    b, key = torch.randn(k, r, generator=g) * 0.1, torch.tensor([3, 7])
    got = engine("readout_step", f, base, y, b, key, torch.tensor([1e-2]), torch.tensor([1e-2]))[0]
    want = readout.step(b, f, base, y, key, m["q"], 1e-2, 1e-2, None)
    assert not torch.equal(want, b)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)  # the program's portable kernels, not torch's


def test_native_fits_the_readout_in_the_binary_as_the_python_loop_does(setup, device_run, tmp_path):
    native = native_or_skip()
    out = tmp_path / "n"
    summary = native.native_train(setup["path"], setup["data"], out, steps=STEPS, lr=0.01, eps=setup["cfg"].eps, seed=0,
                                  eval_every=STEPS, readout=settings())
    info = json.loads((out / "native.json").read_text())["readout"]  # fitted by the binary, not by a Python host step
    assert info["rank"] == readout.DEFAULT_RANK and info["rows"] == RO["readout_rows"]
    assert summary["readout"] == {**device_run[1]["readout"], "minutes": summary["readout"]["minutes"]}
    # the binary's basis (Eigen) and steps (the program's readout_step) against the host's (torch)
    a = readout.get(prepare(setup["cfg"], adapter=str(out / "checkpoints" / "best" / "adapter")).model)
    b = readout.get(prepare(setup["cfg"], adapter=str(device_run[0] / "checkpoints" / "best" / "adapter")).model)
    assert float(b.b.abs().max()) > 0.1
    torch.testing.assert_close(a.a, b.a, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.b, b.b, atol=1e-3, rtol=1e-3)


def test_native_keeps_the_untrained_readout_as_the_python_loop_does(setup, tmp_path):
    native = native_or_skip()
    kw = dict(steps=6, eval_every=2, lr=1.0, eps=setup["cfg"].eps, seed=0, readout=settings(steps=300))
    py = device_train(setup["path"], setup["data"], tmp_path / "py", progress=False, **kw)
    nat = native.native_train(setup["path"], setup["data"], tmp_path / "n", **kw)
    assert "readout" in json.loads((tmp_path / "n" / "native.json").read_text())
    assert nat["readout"]["checkpoint_step"] == py["readout"]["checkpoint_step"] == 0 < nat["best_step"]
    assert nat["readout"] == {**py["readout"], "minutes": nat["readout"]["minutes"]}
    kept = prepare(setup["cfg"], adapter=str(tmp_path / "n" / "checkpoints" / "best" / "adapter"))
    assert all(float(b.abs().max()) == 0 for b in trainable_b(kept.model))


def test_native_on_a_program_without_readout_step_fits_it_in_python(setup, device_run, tmp_path):
    native = native_or_skip()
    path = tmp_path / "old.pte"
    for suffix in ("", ".json", ".adapter.safetensors"):
        shutil.copy(str(setup["path"]) + suffix, str(path) + suffix)
    m = json.loads((tmp_path / "old.pte.json").read_text())
    del m["methods"]["readout_step"], m["readout"]["rank"]  # as a program exported before the binary fitted it
    (tmp_path / "old.pte.json").write_text(json.dumps(seal(m)))
    said = []
    summary = native.native_train(path, setup["data"], tmp_path / "n", steps=STEPS, lr=0.01, eps=setup["cfg"].eps, seed=0,
                                  eval_every=STEPS, readout=settings(), log=said.append)
    assert "readout" not in json.loads((tmp_path / "n" / "native.json").read_text())
    assert any("fitted in Python" in x for x in said), said
    assert summary["readout"] == {**device_run[1]["readout"], "minutes": summary["readout"]["minutes"]}


def test_the_binary_refuses_a_readout_rank_its_program_lacks(setup, tmp_path):
    import subprocess

    native = native_or_skip()
    plan = native.write_plan(tmp_path / "plan.safetensors", 48, setup["manifest"]["batch_size"], 0, STEPS, 48, 10)
    out = tmp_path / "o"
    r = subprocess.run([str(native.build()), "--program", str(setup["path"]), "--data", str(setup["data"]), "--plan", str(plan),
                        "--out", str(out), "--steps", str(STEPS), "--lr", "0.01", "--eps", "0.01", "--readout", "8",
                        "--readout-steps", "10", "--readout-lr", "0.01", "--readout-rows", "48"], capture_output=True, text=True)
    errors = [x for x in r.stderr.splitlines() if "error:" in x]
    assert r.returncode == 2 and len(errors) == 1 and "exported for rank 64" in errors[0], r.stderr
    assert not out.exists()


@pytest.mark.parametrize("extra,needle", [
    (["--readout", "-1"], "--readout must be an integer >= 0"),
    (["--readout-lr", "0"], "--readout-lr must be a finite number > 0"),
    (["--readout-rows", "0"], "--readout-rows must be an integer >= 1"),
])
def test_bad_device_readout_options_are_one_clear_line(setup, tmp_path, capsys, extra, needle):
    out = tmp_path / "bad"
    code = main(["device-train", "--program", str(setup["path"]), "--out", str(out), "--no-progress", "--steps", "1", *extra])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert not out.exists()


def test_a_readout_on_a_program_without_features_is_refused(setup, tmp_path):
    path = tmp_path / "old.pte"
    for suffix in ("", ".json", ".adapter.safetensors"):
        shutil.copy(str(setup["path"]) + suffix, str(path) + suffix)
    m = json.loads((tmp_path / "old.pte.json").read_text())
    del m["methods"]["features"], m["readout"]  # as a program exported before the readout existed
    (tmp_path / "old.pte.json").write_text(json.dumps(seal(m)))
    with pytest.raises(PrgeError, match="features method"):
        device_train(path, setup["data"], tmp_path / "o", steps=1, lr=0.01, eps=1e-2, progress=False, readout=ReadoutSettings(8))
    assert not (tmp_path / "o").exists()


def test_export_takes_an_adapter_with_a_readout(setup, tmp_path, capsys):
    cfg = setup["cfg"]
    best = setup["root"] / "eager" / "checkpoints" / "best"
    out = tmp_path / "p.pte"
    code = main(["export", "--model", cfg.model, "--train-file", cfg.train_file, "--eval-file", cfg.eval_file, "--label-words",
                 "great", "terrible", "--rank", "2", "--alpha", "4", "--q", "2", "--batch-size", "2", "--max-length", "32",
                 "--adapter", str(best), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0 and "not carried into the program" in err, err
    assert "features" in load_manifest(out)["methods"]
