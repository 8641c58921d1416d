"""The engine fleet (issue 21): one rank's program (`export_program(..., ranks=2)`) under torchrun with
2 gloo ranks on loopback follows the eager P-RGE trainer with all q queries, resumes after a rank is
killed, and is refused with one line where it cannot run (one process, the C++ runner).

One export of a tiny model (a minute or two on 2 cores) is shared by the tests; each torchrun starts two
processes that import torch and executorch (not transformers)."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("executorch")

from prge.cli import main  # noqa: E402
from prge.config import TrainConfig  # noqa: E402
from prge.data.batch import collate, step_indices  # noqa: E402
from prge.engine.export import export_program  # noqa: E402
from prge.engine.formats import final_b, write_dataset  # noqa: E402
from prge.run.evaluate import evaluate  # noqa: E402
from prge.run.train import prepare  # noqa: E402
from prge.testing import save_tiny  # noqa: E402
from prge.zo.loss import copy_losses  # noqa: E402
from prge.zo.lora import lora_layers, trainable_b  # noqa: E402
from prge.zo.step import prge_step  # noqa: E402

from test_dist import env, free_port  # noqa: E402

Q, B, T, SEED, EPS, LR, STEPS = 4, 2, 24, 0, 1e-2, 2e-2, 4


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    cfg = TrainConfig(model=save_tiny(root / "model"), task="sst2", n_train=12, n_dev=10, n_test=4, q=Q,
                      batch_size=B, max_length=T, rank=4, alpha=8.0, seed=SEED, eps=EPS, lr=LR, progress=False)
    s = prepare(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a non-zero B, so that the losses depend on every query's perturbation
        for m in lora_layers(s.model).values():
            m.lora_B.copy_(0.05 * torch.randn(m.lora_B.shape, generator=g))
    eager = copy.deepcopy(s.model)  # export resizes the copies of s.model only
    path = root / "fleet.pte"
    manifest = export_program(s.model, s.tokenizer, s.label_ids, q=Q, batch_size=B, max_length=T, loss="class",
                              out_path=path, model_name=cfg.model, ranks=2)
    data = root / "fleet.data.safetensors"
    write_dataset(data, s, manifest)
    return {"root": root, "setup": s, "eager": eager, "path": path, "data": data, "manifest": manifest}


def eager_run(fleet):
    """One process, all q queries: the eager trainer's steps and evaluations from the same B."""
    s = fleet["setup"]
    model = copy.deepcopy(fleet["eager"])
    params = trainable_b(model)
    losses, accs = [], {}
    for step in range(1, STEPS + 1):
        batch = collate([s.train[i] for i in step_indices(len(s.train), B, SEED, step)], s.pad_id)
        r = prge_step(model, params, lambda b, c: copy_losses(model, b, c, s.label_ids, "class"), batch, step,
                      seed=SEED, q=Q, eps=EPS, lr=LR)
        losses.append(float(r.losses.mean()))
        if step % 2 == 0:
            accs[step] = evaluate(model, s.dev, s.pad_id, s.label_ids, 32, "class")["accuracy"]
    return losses, accs, torch.cat([p.reshape(-1) for p in params])


def device_train_2(fleet, out, restarts=0, **extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--max-restarts", str(restarts), "-m", "prge", "device-train",
           "--program", str(fleet["path"]), "--data", str(fleet["data"]), "--out", str(out), "--steps", str(STEPS),
           "--lr", str(LR), "--eps", str(EPS), "--seed", str(SEED), "--eval-every", "2", "--checkpoint-every", "1",
           "--no-progress", "--no-weight-cache"]
    return subprocess.run(cmd, env=env(OMP_NUM_THREADS="1", **extra), capture_output=True, text=True, timeout=600)


def rows(out):
    return [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def flat_b(fleet, out):
    b = final_b(out)
    return torch.cat([b[x["name"]].reshape(-1) for x in fleet["manifest"]["layers"]])


@pytest.fixture(scope="module")
def two_ranks(fleet):
    out = fleet["root"] / "two"
    r = device_train_2(fleet, out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_the_manifest_says_two_ranks_of_two_queries(fleet):
    m = fleet["manifest"]
    assert (m["q"], m["ranks"], m["copies"], m["raw_size"]) == (Q, 2, Q, m["total"] + 1)
    assert "update" in m["methods"] and "first_query" in m["methods"]["train_step"]


def test_two_ranks_follow_the_eager_trainer_with_all_queries(fleet, two_ranks):
    losses, accs, b_eager = eager_run(fleet)
    r = rows(two_ranks)
    d_losses = [x["loss"] for x in r if "split" not in x]
    assert len(d_losses) == STEPS
    assert max(abs(a - b) for a, b in zip(losses, d_losses)) < 1e-5
    assert {x["step"]: x["accuracy"] for x in r if x.get("split") == "dev" and x["step"] > 0} == accs
    assert float((flat_b(fleet, two_ranks) - b_eager).abs().max()) < 1e-5
    b0 = torch.cat([p.reshape(-1) for p in trainable_b(fleet["eager"])])
    assert float((b_eager - b0).abs().max()) > 1e-4  # the run moved B


def test_a_killed_rank_restarts_both_from_rank0s_checkpoint_exactly(fleet, two_ranks):
    out = fleet["root"] / "killed"
    r = device_train_2(fleet, out, restarts=1, PRGE_KILL_AT="1:2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout + r.stderr
    assert torch.equal(flat_b(fleet, out), flat_b(fleet, two_ranks))


def test_a_fleet_program_alone_or_native_is_one_error_line(fleet, tmp_path, capsys):
    for extra in ([], ["--native"]):
        out = tmp_path / ("native" if extra else "alone")
        rc = main(["device-train", "--program", str(fleet["path"]), "--out", str(out), "--steps", "2", "--no-progress", *extra])
        err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
        assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and "ranks" in err[0], err
        assert not out.exists()


def test_a_query_count_the_ranks_cannot_split_is_refused(fleet):
    from prge.errors import PrgeError

    s = fleet["setup"]
    with pytest.raises(PrgeError, match="do not split evenly"):
        export_program(copy.deepcopy(fleet["eager"]), s.tokenizer, s.label_ids, q=3, batch_size=B, max_length=T,
                       out_path=fleet["root"] / "bad.pte", model_name="x", ranks=2)
    assert not (fleet["root"] / "bad.pte").exists()
