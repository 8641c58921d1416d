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


def test_native_runs_the_readout_host_step(setup, device_run, tmp_path):
    native = pytest.importorskip("prge.engine.native")
    if shutil.which("cmake") is None:
        pytest.skip("no cmake")
    from prge.engine.runtime import ReadoutSettings as RS

    summary = native.native_train(setup["path"], setup["data"], tmp_path / "n", steps=STEPS, lr=0.01, eps=setup["cfg"].eps,
                                  seed=0, eval_every=STEPS, readout=RS(None, **{k[len("readout_"):]: v for k, v in RO.items()}))
    assert summary["readout"] == {**device_run[1]["readout"], "minutes": summary["readout"]["minutes"]}


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
