"""The label readout (`prge.zo.readout`): it learns what the final hidden state holds and the head does not
read out, never lowers dev accuracy, travels in the PEFT adapter (PEFT gives the same label logits),
merges, resumes, and refuses what it cannot do with one clear line.

The data: text/label rows whose last token decides the label ("... alpha" -> great, "... beta" -> terrible), so a
tiny random model's final hidden state separates the labels while its head's label rows do not.
"""

import dataclasses
import json

import pytest
import torch

from prge.cli import main
from prge.config import TrainConfig
from prge.data.batch import collate
from prge.errors import PrgeError
from prge.run import adapters
from prge.run.train import prepare, run
from prge.testing import peft_label_logits, save_tiny
from prge.zo import readout
from prge.zo.lora import trainable_b
from prge.zo.loss import label_scores


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("m") / "tiny", "llama")


def rows(n, offset=0):
    words = ["alpha", "beta"]
    return [{"text": f"item {i + offset} is {words[(i * 7 + i // 3) % 2]}", "label": ["great", "terrible"][(i * 7 + i // 3) % 2]} for i in range(n)]


@pytest.fixture
def data(tmp_path):
    tr, ev = tmp_path / "tr.jsonl", tmp_path / "ev.jsonl"
    tr.write_text("".join(json.dumps(r) + "\n" for r in rows(48)))
    ev.write_text("".join(json.dumps(r) + "\n" for r in rows(24, offset=100)))
    return tr, ev


def cfg(tiny, data, out, **kw):
    base = dict(model=tiny, train_file=str(data[0]), eval_file=str(data[1]), label_words=["great", "terrible"], steps=2, eval_every=2,
                rank=2, alpha=4, q=2, batch_size=2, lr=0.01, out=str(out), progress=False, max_length=32,
                readout_steps=1500, readout_rows=48)
    base.update(kw)
    return TrainConfig(**base)


def test_default_run_fits_a_readout_that_learns_the_skill(tiny, data, tmp_path):
    summary = run(cfg(tiny, data, tmp_path / "r"))  # --readout not given: on by default for label words
    ro = summary["readout"]
    assert ro["rank"] >= 2 and ro["dev_after"] >= ro["dev_before"]
    assert summary["test_after_best"] >= 0.9 > summary["test_before"] + 0.2  # the head could not, the readout does
    assert (tmp_path / "r" / "checkpoints" / "best" / adapters.READOUT_NAME).is_file()
    assert not (tmp_path / "r" / "checkpoints" / "last" / adapters.READOUT_NAME).exists()  # fitted on best only


def test_same_seed_same_readout_other_seed_differs(tiny, data):
    s = prepare(cfg(tiny, data, None))
    kw = dict(rank=8, steps=300, lr=1e-2, q=2, eps=1e-2, eval_batch_size=16)
    one, two, other = (readout.fit(s.model, s.train, s.dev, s.pad_id, s.label_ids, seed=seed, **kw) for seed in (0, 0, 1))
    assert torch.equal(one.readout.b, two.readout.b) and one.best_step == two.best_step
    assert not torch.equal(one.readout.b, other.readout.b)


def test_readout_off_and_never_below_its_start(tiny, data, tmp_path):
    summary = run(cfg(tiny, data, tmp_path / "off", readout=0))
    assert "readout" not in summary
    s = prepare(cfg(tiny, data, None))
    fit = readout.fit(s.model, s.train, s.dev, s.pad_id, s.label_ids, rank=4, steps=250, lr=1e3, q=2, eps=1e-2, seed=0,
                      eval_batch_size=16)  # an lr that diverges: the start (B = 0) is kept
    assert fit.dev_after >= fit.dev_before
    if fit.best_step == 0:
        assert float(fit.readout.b.abs().max()) == 0


def test_the_readout_on_the_untrained_model_is_kept_where_it_is_better_on_dev(tiny, data, tmp_path):
    # lr 1.0: the LoRA steps raise dev 0.67 -> 0.75 (best checkpoint at step 4) but leave hidden states that no
    # readout reads better, while the untrained model's readout reaches 0.92
    c = cfg(tiny, data, tmp_path / "r", steps=6, eval_every=2, lr=1.0, readout_steps=300)
    summary = run(c)
    ro = summary["readout"]
    assert summary["best_step"] > 0 and ro["checkpoint_step"] == 0
    assert ro["dev_after_untrained"] == ro["dev_after"] > summary["best_dev"]
    s = prepare(c)  # the untrained model: its own readout, fitted alone, is the one kept
    alone = readout.fit(s.model, s.train[:c.readout_rows], s.dev, s.pad_id, s.label_ids, rank=ro["rank"], steps=300, lr=c.readout_lr,
                        q=c.q, eps=c.eps, seed=c.seed, eval_batch_size=c.eval_batch_size)
    kept = prepare(c, adapter=str(tmp_path / "r" / "checkpoints" / "best"))
    assert torch.equal(readout.get(kept.model).b, alone.readout.b)
    assert all(float(b.abs().max()) == 0 for b in trainable_b(kept.model))  # the best checkpoint's B set to 0
    assert summary["test_after_best"] == kept.evaluate(kept.test)["accuracy"]
    # where the best checkpoint's readout is at least as good, it is kept (ties go to the trained model)
    fit = dataclasses.replace(alone, dev_after=0.5)
    assert readout.keep_untrained(fit, alone) and not readout.keep_untrained(alone, alone)
    assert not readout.keep_untrained(alone, None)


def _trained(tiny, data, tmp_path):
    c = cfg(tiny, data, tmp_path / "r")
    run(c)
    return c, tmp_path / "r" / "checkpoints" / "best"


def test_adapter_round_trip_peft_and_merge(tiny, data, tmp_path):
    pytest.importorskip("peft")
    c, best = _trained(tiny, data, tmp_path)
    s = prepare(c, adapter=str(best))
    assert readout.get(s.model) is not None
    batch = collate(s.dev, s.pad_id)
    ours = label_scores(s.model, batch, s.label_ids)
    bare = prepare(c, adapter=None)
    assert not torch.allclose(ours, label_scores(bare.model, batch, bare.label_ids), atol=1e-3)  # the readout acts

    theirs = peft_label_logits(tiny, best, batch, s.label_ids)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)

    emb = s.model.get_input_embeddings().weight.detach().clone()
    merged = adapters.merge(s.model)  # the tiny llama ties its head to the embeddings, like SmolLM2
    assert readout.get(merged) is None
    torch.testing.assert_close(label_scores(merged, batch, s.label_ids), ours, atol=1e-4, rtol=1e-4)
    assert torch.equal(merged.get_input_embeddings().weight, emb)  # untied, not changed


def test_resume_after_the_last_step_fits_the_same_readout(tiny, data, tmp_path):
    full = run(cfg(tiny, data, tmp_path / "full"))
    part = tmp_path / "part"
    run(cfg(tiny, data, part), stop_after=2)  # stopped at the end, before the readout
    resumed = run(cfg(tiny, data, part, resume=str(part)))
    assert resumed["readout"]["dev_after"] == full["readout"]["dev_after"]
    assert resumed["test_after_best"] == full["test_after_best"]


def test_a_damaged_readout_file_is_refused(tiny, data, tmp_path):
    c, best = _trained(tiny, data, tmp_path)
    (best / adapters.READOUT_NAME).write_text('{"module": "lm_head"}')
    (best / "SHA256SUMS").unlink()
    with pytest.raises(PrgeError, match="does not match"):
        prepare(c, adapter=str(best))


@pytest.mark.parametrize("extra,needle", [
    (["--readout", "8", "--tune", "full", "--method", "mezo"], "--tune full trains no LoRA"),
    (["--readout", "8", "--loss", "lm"], "not a classification task"),
    (["--readout", "-1"], "--readout must be >= 0"),
    (["--readout-lr", "0"], "--readout-lr must be"),
])
def test_bad_readout_options_are_one_clear_line(tiny, data, tmp_path, capsys, extra, needle):
    out = tmp_path / "o"
    code = main(["train", "--model", tiny, "--train-file", str(data[0]), "--eval-file", str(data[1]), "--label-words", "great", "terrible",
                 "--steps", "1", "--no-progress", "--out", str(out), *extra])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err
    assert not (out / "checkpoints").exists()


def test_the_basis_has_one_sign_per_direction_and_whitens():
    # the C++ runner's SVD (Eigen) must give this basis: an SVD's signs are arbitrary, the rule fixes them
    g = torch.Generator().manual_seed(0)
    h = torch.randn(40, 12, generator=g) @ torch.randn(12, 12, generator=g)
    a = readout.basis(h, 16)
    assert a.shape == (16, 12) and float(a[12:].abs().max()) == 0  # rows past the features' rank are zero
    assert bool((a[:12].gather(1, a[:12].abs().argmax(1, keepdim=True)) > 0).all())
    f = h @ a[:12].T
    torch.testing.assert_close(f.T @ f / 40, torch.eye(12), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(readout.basis(-h, 16), a)  # negated features: the same basis

