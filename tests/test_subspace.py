"""The frozen A chosen from the data (`--lora-a activations` / a file) instead of at random."""

import json
from pathlib import Path

import pytest
import torch

from prge.config import TrainConfig
from prge.data.batch import Batch
from prge.errors import PrgeError
from prge.io import load_tensors
from prge.run.train import prepare, run
from prge.testing import save_tiny, tiny_model
from prge.zo import subspace
from prge.zo.lora import add_lora, lora_layers

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def batches(n=3, b=4, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 200, (b, T), generator=g)
        pos = torch.randint(4, T - 1, (b, 1), generator=g)
        out.append(Batch(ids, pos, ids[:, :1].clone(), torch.ones(b, 1), torch.zeros(b, dtype=torch.long)))
    return out


def inputs_moment(model, name, bs):
    """E[x xᵀ] of one wrapped module's input over the valid tokens, computed independently."""
    layer = lora_layers(model)[name]
    seen = []
    h = layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().double()))
    for b in bs:
        model.model(input_ids=b.input_ids)
    h.remove()
    rows = []
    for x, b in zip(seen, bs):
        for i in range(x.shape[0]):
            rows.append(x[i, : int(b.target_pos[i].max()) + 1])
    x = torch.cat(rows)
    return x.T @ x / x.shape[0]


def test_activation_basis_is_the_top_principal_subspace():
    model, _ = tiny_model("llama")
    rank = 3
    add_lora(model, rank=rank, alpha=6.0)
    bs = batches()
    a = subspace.activation_basis(model, bs, rank)
    name = next(iter(lora_layers(model)))
    A = a[name].double() / subspace.A_SCALE
    assert torch.allclose(A @ A.T, torch.eye(rank, dtype=torch.float64), atol=1e-5)  # orthonormal rows
    m = inputs_moment(model, name, bs)
    top = torch.linalg.eigvalsh(m).flip(0)[:rank]
    assert torch.allclose(torch.diagonal(A @ m @ A.T), top, rtol=1e-4)  # the variance captured is the top eigenvalues
    random_a = lora_layers(model)[name].lora_A.double()
    q, _ = torch.linalg.qr(random_a.T)
    assert torch.trace(q.T @ m @ q) < top.sum()  # more than a random subspace captures
    assert torch.linalg.norm(a[name]).item() == pytest.approx((rank / 3) ** 0.5, rel=1e-4)  # a random A's norm


def test_activation_basis_is_deterministic_and_sign_fixed():
    model, _ = tiny_model("llama")
    add_lora(model, rank=2, alpha=4.0)
    a1 = subspace.activation_basis(model, batches(), 2)
    a2 = subspace.activation_basis(model, batches(), 2)
    for n in a1:
        assert torch.equal(a1[n], a2[n])
        big = a1[n].abs().argmax(1)
        assert (a1[n].gather(1, big[:, None]) > 0).all()


def cfg(tmp_path, **kw):
    base = dict(model=save_tiny(tmp_path / "model"), task="sst2", data_root=str(DATA), n_train=24, n_dev=8, n_test=8,
                steps=4, eval_every=2, rank=2, alpha=4, q=2, batch_size=2, lr=0.05, progress=False, max_length=64,
                out=str(tmp_path / "run"))
    base.update(kw)
    return TrainConfig(**base)


def test_train_with_activation_a_keeps_it_in_the_adapter_and_resumes(tmp_path):
    c = cfg(tmp_path, lora_a="activations", lora_a_rows=8)
    s = prepare(c)
    a = {n: m.lora_A.detach().clone() for n, m in lora_layers(s.model).items()}
    random = prepare(cfg(tmp_path))
    assert not torch.equal(next(iter(a.values())), next(iter(lora_layers(random.model).values())).lora_A)
    whole = run(cfg(tmp_path, lora_a="activations", lora_a_rows=8, out=str(tmp_path / "whole")))
    saved = load_tensors(Path(whole["adapter"]) / "adapter_model.safetensors")
    for n, t in a.items():
        assert torch.equal(saved[f"base_model.model.{n}.lora_A.weight"], t)
    run(cfg(tmp_path, lora_a="activations", lora_a_rows=8, out=str(tmp_path / "part")), stop_after=2)
    run(cfg(tmp_path, lora_a="activations", lora_a_rows=8, resume=str(tmp_path / "part")))
    done = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("loss") for r in done if "loss" in r and "split" not in r] == \
           [r.get("loss") for r in ref if "loss" in r and "split" not in r]


def test_a_file_round_trips_and_a_file_for_another_model_is_refused(tmp_path):
    s = prepare(cfg(tmp_path, lora_a="activations", lora_a_rows=8))
    f = tmp_path / "a.safetensors"
    subspace.save_a(s.model, f)
    t = prepare(cfg(tmp_path, lora_a=str(f)))
    for (n, m), (_, k) in zip(lora_layers(s.model).items(), lora_layers(t.model).items()):
        assert torch.equal(m.lora_A, k.lora_A)
    with pytest.raises(PrgeError, match="the model's A is"):
        prepare(cfg(tmp_path, lora_a=str(f), rank=3, alpha=6))


def test_conflicting_options_are_one_clear_error(tmp_path):
    with pytest.raises(PrgeError, match="--tune full trains no LoRA"):
        cfg(tmp_path, lora_a="activations", method="mezo", tune="full").check()
    with pytest.raises(PrgeError, match="not random, activations"):
        cfg(tmp_path, lora_a="pca").check()
    with pytest.raises(PrgeError, match="not found"):
        prepare(cfg(tmp_path, lora_a=str(tmp_path / "none.safetensors")))
