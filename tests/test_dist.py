"""Query-parallel P-RGE under torchrun: 2 gloo ranks on loopback against one process, faults, bad setup.

Each torchrun here starts two Python processes (torch + transformers imports dominate: ~10 s each run on
a quiet 2-core machine), so the runs are shared between tests through module-scoped fixtures.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prge.cli import main
from prge.config import TrainConfig
from prge.io import load_tensors
from prge.run.train import run
from prge.testing import save_tiny

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
ARGS = dict(task="sst2", data_root=str(DATA), n_train=40, n_dev=16, n_test=16, steps=6, eval_every=3, checkpoint_every=2,
            rank=2, alpha=4, q=4, batch_size=2, lr=0.05, max_length=64)


def flags(**kw) -> list[str]:
    out = []
    for k, v in {**ARGS, **kw}.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out + ["--no-progress"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict:
    e = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra}
    e.pop("WORLD_SIZE", None)
    return e


def torchrun(launch: list[str], args: list[str], **extra) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "prge", "train", *args]
    return subprocess.run(cmd, env=env(**extra), capture_output=True, text=True, timeout=300)


def standalone(n: int, args: list[str], restarts: int = 0, **extra) -> subprocess.CompletedProcess:
    launch = ["--nproc-per-node", str(n), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
              "--max-restarts", str(restarts)]
    return torchrun(launch, args, **extra)


def losses(run_dir) -> list[float]:
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "split" not in r]


def adapter(run_dir) -> dict[str, torch.Tensor]:
    return load_tensors(Path(run_dir) / "checkpoints/last/adapter_model.safetensors")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("m") / "tiny", "llama")


@pytest.fixture(scope="module")
def two(tiny, tmp_path_factory):
    """An uninterrupted run of 6 steps on 2 ranks, 2 of the 4 queries each."""
    out = tmp_path_factory.mktemp("two") / "run"
    r = standalone(2, flags(model=tiny, out=out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stderr


def test_two_ranks_match_one_process(tiny, two, tmp_path):
    out, log = two
    run(TrainConfig(**ARGS, model=tiny, out=str(tmp_path / "one"), progress=False))
    assert len(losses(out)) == 6
    assert max(abs(a - b) for a, b in zip(losses(out), losses(tmp_path / "one"))) <= 1e-6
    assert max_diff(adapter(out), adapter(tmp_path / "one")) <= 1e-6
    assert max(float(v.abs().max()) for k, v in adapter(out).items() if "lora_B" in k) > 0  # it trained
    assert log.count("before training:") == 1 and log.count("test accuracy:") == 1  # only rank 0 reports
    assert "2 processes x 2 of 4 queries" in log


def test_a_killed_rank_restarts_all_from_rank0_checkpoint(tiny, two, tmp_path):
    """Rank 1 is SIGKILLed after step 5 (checkpoints every 2 steps): torchrun restarts both ranks, they
    resume from step 4, and the final adapter is bit for bit the uninterrupted run's."""
    out = tmp_path / "killed"
    r = standalone(2, flags(model=tiny, out=out), restarts=1, PRGE_KILL_AT="1:5")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "at step 4" in r.stderr
    assert losses(out) == losses(two[0])
    assert max_diff(adapter(out), adapter(two[0])) == 0.0


def test_resume_with_another_world_size_continues_the_trajectory(tiny, two, tmp_path):
    """3 steps in one process, the other 3 on 2 ranks: the same trajectory as 6 steps on 2 ranks."""
    part = tmp_path / "part"
    assert run(TrainConfig(**ARGS, model=tiny, out=str(part), progress=False), stop_after=3)["stopped_at"] == 3
    r = standalone(2, flags(model=tiny, resume=part))
    assert r.returncode == 0, r.stderr[-3000:]
    assert max(abs(a - b) for a, b in zip(losses(part), losses(two[0]))) <= 1e-6 and len(losses(part)) == 6
    assert max_diff(adapter(part), adapter(two[0])) <= 1e-6


def test_ranks_with_different_configs_stop_with_one_error(tiny, tmp_path):
    """Two "machines" (two torchrun agents meeting at a c10d rendezvous), one started with another --lr."""
    port = free_port()
    procs = []
    for node, lr in ((0, 0.05), (1, 0.01)):
        launch = ["--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                  "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "mismatch"]
        cmd = [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "prge", "train",
               *flags(model=tiny, out=tmp_path / f"r{node}", lr=lr)]
        procs.append(subprocess.Popen(cmd, env=env(), stderr=subprocess.PIPE, text=True))
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode != 0 for p in procs)
    lines = [x for e in errs for x in e.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, errs
    assert "started with other lr than rank 0" in lines[0] and "rank 0: lr = 0.05" in lines[0]
    assert not (tmp_path / "r0" / "metrics.jsonl").exists()


def test_unreachable_rendezvous_times_out_with_a_clear_error(tmp_path, monkeypatch, capsys):
    port = free_port()  # nothing listens here
    for k, v in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(k, v)
    assert main(["train", "--model", "unused", "--dist-timeout", "2", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: rank 1 could not reach the other ranks at 127.0.0.1:") and "within 2 s" in err[0]
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("q,world", [(3, 2), (1, 2)])
def test_queries_must_split_evenly(q, world, tmp_path, monkeypatch, capsys):
    for k, v in {"RANK": "0", "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(k, v)
    assert main(["train", "--model", "unused", "--q", str(q), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--q {q} queries do not split evenly over {world} processes" in err[0]
    assert not (tmp_path / "r").exists()


def test_share_orders_the_gathered_losses_by_global_query(monkeypatch):
    from prge.run import dist

    assert [dist.Share(r, 2, 8).queries for r in range(2)] == [slice(0, 4), slice(4, 8)]
    # rank 0 holds [L+ of queries 0,1, L- of queries 0,1]; rank 1 the same for queries 2,3
    sent = [torch.tensor([1.0, 2.0, -1.0, -2.0]), torch.tensor([3.0, 4.0, -3.0, -4.0])]

    def all_gather(parts, local):
        for p, t in zip(parts, sent):
            p.copy_(t)

    monkeypatch.setattr(dist.dist, "all_gather", all_gather)
    got = dist.Share(0, 2, 4).gather(sent[0])
    assert got.tolist() == [1.0, 2.0, 3.0, 4.0, -1.0, -2.0, -3.0, -4.0]


def test_ranks_whose_weights_drift_apart_stop_naming_the_step(tiny, tmp_path):
    """Rank 1's B is nudged by 1e-6 after step 3; the guard (every 2 steps) stops the run at step 4
    with one error line, before anything of step 4 is written; rank 0's checkpoint (step 3, written at the
    evaluation) is left to resume from."""
    out = tmp_path / "drift"
    r = standalone(2, flags(model=tiny, out=out, check_every=2), PRGE_DRIFT_AT="1:3")
    assert r.returncode != 0
    lines = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, r.stderr[-3000:]
    assert "rank 1 differ from rank 0's after step 4" in lines[0]
    assert json.loads((out / "checkpoints/last/trainer_state.json").read_text())["step"] == 3  # rank 0's, nothing after


def test_data_parallel_ranks_match_one_process_with_the_whole_batch(tiny, tmp_path):
    """--parallel data: 2 ranks evaluate all 4 queries on 1 of the step's 2 examples each, and the
    averaged losses give the trajectory of one process on both examples."""
    out = tmp_path / "data"
    r = standalone(2, flags(model=tiny, out=out, parallel="data"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 processes x 1 of 2 examples" in r.stderr
    run(TrainConfig(**ARGS, model=tiny, out=str(tmp_path / "one"), progress=False))
    assert len(losses(out)) == 6
    assert max(abs(a - b) for a, b in zip(losses(out), losses(tmp_path / "one"))) <= 1e-6
    assert max_diff(adapter(out), adapter(tmp_path / "one")) <= 1e-6


def test_data_parallel_needs_a_batch_the_ranks_can_split(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    from prge.errors import PrgeError
    from prge.run import dist

    with pytest.raises(PrgeError) as e:  # refused before joining any process group
        dist.start(TrainConfig(**{**ARGS, "batch_size": 3}, parallel="data", model="x", out=str(tmp_path / "o")))
    assert "--batch-size 3" in e.value.problem and "multiple of 2" in e.value.fix
