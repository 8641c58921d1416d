"""A training run end to end on a tiny model: outputs, resume, methods, and bad input at the CLI."""

import json
import math
from pathlib import Path

import pytest
import torch

from prge.cli import main
from prge.config import TrainConfig
from prge.testing import save_tiny
from prge.run.train import run

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("m") / "tiny", "llama")


def cfg(tiny, out, **kw):
    base = dict(model=tiny, task="sst2", data_root=str(DATA), n_train=40, n_dev=16, n_test=16, steps=6, eval_every=3,
                rank=2, alpha=4, q=2, batch_size=2, lr=0.05, out=str(out), progress=False, max_length=64)
    base.update(kw)
    return TrainConfig(**base)


def losses(run_dir):
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "split" not in r]


def test_run_writes_everything(tiny, tmp_path):
    summary = run(cfg(tiny, tmp_path / "r"))
    r = tmp_path / "r"
    for f in ["config.yaml", "metrics.jsonl", "curves.png", "summary.json", "checkpoints/last/adapter_model.safetensors",
              "checkpoints/last/adapter_config.json", "checkpoints/best/trainer_state.json"]:
        assert (r / f).is_file(), f
    assert len(losses(r)) == 6
    assert summary["test_before"] is not None and 0 <= summary["test_after_last"] <= 1
    assert (r / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # the adapter moved away from zero
    from prge.io import load_tensors

    b = [v for k, v in load_tensors(r / "checkpoints/last/adapter_model.safetensors").items() if "lora_B" in k]
    assert max(float(t.abs().max()) for t in b) > 0


@pytest.mark.parametrize("method,extra", [("prge", {}), ("mezo", {}), ("fo", {"optimizer": "adam", "lr": 1e-3}),
                                          ("prge", {"lr_schedule": "cosine"}),
                                          ("fo", {"optimizer": "adam", "lr": 1e-3, "lr_schedule": "linear"})])
def test_resume_continues_the_exact_trajectory(tiny, tmp_path, method, extra):
    full = tmp_path / "full"
    run(cfg(tiny, full, method=method, **extra))
    part = tmp_path / "part"
    out = run(cfg(tiny, part, method=method, **extra), stop_after=3)
    assert out["stopped_at"] == 3 and len(losses(part)) == 3
    run(cfg(tiny, part, method=method, resume=str(part), **extra))
    assert losses(part) == losses(full)  # bit for bit: same losses after the resume
    from prge.io import load_tensors

    a = load_tensors(full / "checkpoints/last/adapter_model.safetensors")
    b = load_tensors(part / "checkpoints/last/adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_changed_base_trains_on_it_and_resumes_on_it(tiny, tmp_path):
    """run(base=f): f changes the frozen base after it is loaded (benchmarks/quantized.py train-eager
    quantises it); an interrupted run resumed with the same f follows the uninterrupted one bit for bit."""
    from prge.zo.lora import lora_layers

    seen = []

    def halve(model):
        seen.append(model)
        with torch.no_grad():
            for m in lora_layers(model).values():
                m.base.weight.mul_(0.5)

    run(cfg(tiny, tmp_path / "full"), base=halve)
    run(cfg(tiny, tmp_path / "plain"))
    assert len(seen) == 1 and losses(tmp_path / "full") != losses(tmp_path / "plain")
    part = tmp_path / "part"
    run(cfg(tiny, part), stop_after=3, base=halve)
    run(cfg(tiny, part, resume=str(part)), base=halve)
    assert losses(part) == losses(tmp_path / "full")


def test_resume_with_an_earlier_stop_keeps_the_checkpoint(tiny, tmp_path):
    """Resuming at step 3 with stop_after=1 (a slice already done) stops at 3 without relabelling the checkpoint."""
    run(cfg(tiny, tmp_path / "full"))
    part = tmp_path / "part"
    run(cfg(tiny, part), stop_after=3)
    assert run(cfg(tiny, part, resume=str(part)), stop_after=1)["stopped_at"] == 3
    assert json.loads((part / "checkpoints/last/trainer_state.json").read_text())["step"] == 3
    run(cfg(tiny, part, resume=str(part)))
    assert losses(part) == losses(tmp_path / "full")


@pytest.mark.parametrize("method,extra", [("prge", {}), ("fo", {"optimizer": "sgd", "lr": 0.5})])
def test_lr_schedule_starts_at_lr_then_decays(tiny, tmp_path, method, extra):
    """Step 1's update uses the full lr (so the first two losses agree with a constant run); later ones less."""
    run(cfg(tiny, tmp_path / "c", method=method, **extra))
    run(cfg(tiny, tmp_path / "l", method=method, lr_schedule="linear", **extra))
    const, lin = losses(tmp_path / "c"), losses(tmp_path / "l")
    assert lin[:2] == const[:2]
    assert lin[2:] != const[2:]


def test_same_seed_same_trajectory_other_seed_differs(tiny, tmp_path):
    run(cfg(tiny, tmp_path / "a", steps=3, eval_every=0))
    run(cfg(tiny, tmp_path / "b", steps=3, eval_every=0))
    run(cfg(tiny, tmp_path / "c", steps=3, eval_every=0, seed=1))
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert losses(tmp_path / "a") != losses(tmp_path / "c")


def test_user_jsonl_completion_data(tiny, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"the movie {i} was", "completion": " great"}) + "\n" for i in range(20)))
    summary = run(cfg(tiny, tmp_path / "u", train_file=str(f), steps=2, eval_every=0))
    assert summary["task"] == "d" and summary["n_test"] == 2


def test_completion_runs_report_loss_and_perplexity_and_n_test_caps_the_eval_file(tiny, tmp_path, capsys):
    f, e = tmp_path / "d.jsonl", tmp_path / "e.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"the movie {i} was", "completion": " great"}) + "\n" for i in range(20)))
    e.write_text("".join(json.dumps({"prompt": f"a film {i} was", "completion": " fine"}) + "\n" for i in range(10)))
    summary = run(cfg(tiny, tmp_path / "u", train_file=str(f), eval_file=str(e), n_test=3, steps=2, eval_every=0))
    assert summary["n_test"] == 3
    for k in ("before", "after_last", "after_best"):
        assert summary[f"test_perplexity_{k}"] == pytest.approx(math.exp(summary[f"test_loss_{k}"]))
    assert summary["test_loss_before"] > 0
    err = capsys.readouterr().err
    assert "test token accuracy: before" in err and "perplexity" in err
    saved = json.loads((tmp_path / "u" / "summary.json").read_text())
    assert saved["test_perplexity_after_last"] == summary["test_perplexity_after_last"]


def test_user_classification_csv(tiny, tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("text,label\n" + "".join(f"film number {i},{'pos' if i % 2 else 'neg'}\n" for i in range(20)))
    # label words as name -> word (a YAML mapping in a config file); a leading space is added
    c = cfg(tiny, tmp_path / "u", train_file=str(f), template="{text} It was", steps=1, eval_every=0)
    c.label_words = {"neg": "terrible", "pos": "great"}
    summary = run(c)
    assert 0 <= summary["test_after_last"] <= 1


def test_nan_loss_keeps_the_last_good_checkpoint(tiny, tmp_path, monkeypatch):
    import prge.run.train as train

    r = tmp_path / "n"
    run(cfg(tiny, r, steps=3))
    before = (r / "checkpoints/last/adapter_model.safetensors").read_bytes()
    real = train.Setup.loss_fn

    def bad(self, batch, copies):
        out = real(self, batch, copies)
        return out * float("nan")

    monkeypatch.setattr(train.Setup, "loss_fn", bad)
    from prge.errors import PrgeError

    with pytest.raises(PrgeError, match="step 4"):
        run(cfg(tiny, r, steps=6, resume=str(r)))
    assert (r / "checkpoints/last/adapter_model.safetensors").read_bytes() == before


def cli(*args, capsys):
    code = main(list(args))
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("args,needle", [
    (["--task", "nope"], "unknown task"),
    (["--q", "0"], "q (queries per step) must be >= 1"),
    (["--eps", "0"], "eps (perturbation scale) must be > 0"),
    (["--targets", "no_such_proj"], "match nothing"),
    (["--train-file", "/no/such/file.jsonl"], "/no/such/file.jsonl"),
    (["--model", "/no/such/model/folder"], "does not exist"),
    (["--label-words", " great", " xylophonically", "--train-file", "LABELS"], "tokens"),
])
def test_bad_input_is_one_clear_line(tiny, tmp_path, capsys, args, needle):
    if "LABELS" in args:
        f = tmp_path / "l.jsonl"
        f.write_text("".join(json.dumps({"text": f"row {i}", "label": i % 2}) + "\n" for i in range(10)))
        args = [str(f) if a == "LABELS" else a for a in args]
    base = ["train", "--model", tiny, "--data-root", str(DATA), "--out", str(tmp_path / "o"), "--n-train", "8",
            "--n-dev", "4", "--n-test", "4", "--steps", "1", "--no-progress"]
    code, err = cli(*base, *args, capsys=capsys)
    assert code == 2
    line = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and needle in line[0], err
    assert "Traceback" not in err


def test_malformed_jsonl_row_names_file_and_line(tiny, tmp_path, capsys):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "a", "completion": " b"}\n{"prompt": "a", \n')
    code, err = cli("train", "--model", tiny, "--train-file", str(f), "--out", str(tmp_path / "o"), capsys=capsys)
    assert code == 2 and "bad.jsonl:2" in err


def test_yaml_config_and_flags(tiny, tmp_path, capsys):
    y = tmp_path / "c.yaml"
    y.write_text(f"model: {tiny}\ndata_root: {DATA}\nn_train: 8\nn_dev: 4\nn_test: 4\nsteps: 2\nq: 3\nrank: 2\nlr: 1e-3\n")
    code, _ = cli("train", "--config", str(y), "--q", "1", "--out", str(tmp_path / "y"), "--no-progress", "--eval-every", "0",
                  capsys=capsys)
    assert code == 0
    import yaml

    saved = yaml.safe_load((tmp_path / "y" / "config.yaml").read_text())
    assert saved["q"] == 1 and saved["steps"] == 2 and saved["rank"] == 2  # flag beats file, file beats default
    assert saved["lr"] == 1e-3  # YAML 1.1 reads 1e-3 as a string; it still arrives as a number
    y.write_text("nonsense_option: 3\n")
    code, err = cli("train", "--config", str(y), capsys=capsys)
    assert code == 2 and "nonsense_option" in err


def test_eval_and_merge_commands(tiny, tmp_path, capsys):
    r = tmp_path / "r"
    run(cfg(tiny, r, steps=3))
    adapter = r / "checkpoints" / "last"
    code = main(["eval", "--adapter", str(adapter), "--data-root", str(DATA), "--n-test", "16", "--json"])
    out = capsys.readouterr().out
    assert code == 0 and "test: accuracy" in out
    res = json.loads(out.strip().splitlines()[-1])
    code = main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged")])
    assert code == 0 and (tmp_path / "merged" / "config.json").is_file()
    capsys.readouterr()
    code = main(["eval", "--model", str(tmp_path / "merged"), "--data-root", str(DATA), "--n-test", "16", "--json"])
    merged = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert merged["test"]["accuracy"] == res["test"]["accuracy"]
    assert abs(merged["test"]["loss"] - res["test"]["loss"]) < 1e-4


@pytest.mark.parametrize("kill_at", [1, 5])
def test_a_kill_between_evaluations_resumes_from_the_periodic_checkpoint(tiny, tmp_path, monkeypatch, kill_at):
    """A run killed at step `kill_at` with no evaluation since the start resumes from the last
    --checkpoint-every checkpoint (step 0 right after the before-training evaluations, or step 4),
    not from scratch, and continues the uninterrupted trajectory exactly."""
    import prge.run.train as train

    kw = dict(eval_every=0, checkpoint_every=2)
    evaluations = []
    real_eval = train.Setup.evaluate
    monkeypatch.setattr(train.Setup, "evaluate", lambda self, rows: evaluations.append(len(rows)) or real_eval(self, rows))
    run(cfg(tiny, tmp_path / "full", **kw))
    uninterrupted = len(evaluations)
    real = train.one_step

    def dies(s, batch, step, optimizer):
        if step == kill_at:
            raise KeyboardInterrupt("killed")
        return real(s, batch, step, optimizer)

    monkeypatch.setattr(train, "one_step", dies)
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        run(cfg(tiny, part, **kw))
    saved = json.loads((part / "checkpoints/last/trainer_state.json").read_text())["step"]
    assert saved == (0 if kill_at == 1 else 4)
    monkeypatch.setattr(train, "one_step", real)
    evaluations.clear()
    summary = run(cfg(tiny, part, resume=str(part), **kw))
    assert losses(part) == losses(tmp_path / "full")
    assert len(evaluations) == uninterrupted - 2  # the before-training test and dev evaluations were kept, not redone
    assert summary["test_before"] == json.loads((tmp_path / "full" / "summary.json").read_text())["test_before"]


def test_negative_checkpoint_every_is_refused(tiny, tmp_path):
    from prge.errors import PrgeError

    with pytest.raises(PrgeError, match="checkpoint-every"):
        run(cfg(tiny, tmp_path / "r", checkpoint_every=-1).check())


def test_device_train_defaults_follow_the_program_then_prge_train(tmp_path):
    """device-train's options: a given flag wins, else what the program recorded at export, else
    prge train's default (one source: TrainConfig)."""
    import json

    from prge.cli import device_run_options, parser
    from prge.engine.formats import FORMAT, RUN_DEFAULTS

    t = TrainConfig()
    assert t.steps == 300 and t.lr == 3e-3  # the documented default job (README)
    old = tmp_path / "old.pte"  # a program exported before programs recorded their run
    (tmp_path / "old.pte.json").write_text(json.dumps({"format": FORMAT}))
    opts = device_run_options(parser().parse_args(["device-train", "--program", str(old), "--out", "o"]))
    assert opts == {k: getattr(t, k) for k in RUN_DEFAULTS}
    new = tmp_path / "new.pte"
    recorded = {**opts, "seed": 3, "lr": 5e-4, "steps": 40}
    (tmp_path / "new.pte.json").write_text(json.dumps({"format": FORMAT, "run_defaults": recorded}))
    opts = device_run_options(parser().parse_args(["device-train", "--program", str(new), "--out", "o"]))
    assert (opts["seed"], opts["lr"], opts["steps"], opts["eps"]) == (3, 5e-4, 40, t.eps)
    opts = device_run_options(parser().parse_args(["device-train", "--program", str(new), "--out", "o", "--seed", "0",
                                                   "--steps", "7"]))
    assert (opts["seed"], opts["steps"], opts["lr"]) == (0, 7, 5e-4)