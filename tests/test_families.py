"""Every model family `prge train` takes exports and trains identically in eager and in the engine.

One tiny random model per family (prge.testing ARCHS: Llama, Qwen2, Qwen3, Gemma3, Phi-3, OPT,
GPT-2), LoRA on the family's default targets with a random nonzero B, exported with every method
the device loop needs (q = 2, b = 2, T = 16), then trained 4 steps by `device_train` and by the
eager trainer's step from the same B: the same losses, dev accuracy and final B. Each export costs
about a minute of CPU, so Qwen3, OPT and GPT-2 are marked slow; Llama, the SmolLM2 family, is
covered in depth by tests/test_export.py.
"""

import copy
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("executorch")

from prge.config import TrainConfig  # noqa: E402
from prge.data.batch import collate, step_indices  # noqa: E402
from prge.engine.export import SUPPORTED_FAMILIES, export_program  # noqa: E402
from prge.engine.formats import final_b, write_dataset  # noqa: E402
from prge.engine.runtime import device_train  # noqa: E402
from prge.errors import PrgeError  # noqa: E402
from prge.run.evaluate import evaluate  # noqa: E402
from prge.run.train import prepare  # noqa: E402
from prge.testing import ARCHS, save_tiny, tiny_model  # noqa: E402
from prge.zo.lora import add_lora, lora_layers, trainable_b  # noqa: E402
from prge.zo.loss import copy_losses  # noqa: E402
from prge.zo.step import prge_step  # noqa: E402

Q, B, T, SEED, EPS, LR, STEPS = 2, 2, 16, 0, 1e-2, 2e-2, 4


def randomize_b(model, seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.copy_(scale * torch.randn(m.lora_B.shape, generator=g))


def flat(bs):
    return torch.cat([b.reshape(-1) for b in bs])


def eager_run(model, s):
    params = trainable_b(model)
    losses = []
    for step in range(1, STEPS + 1):
        batch = collate([s.train[i] for i in step_indices(len(s.train), B, SEED, step)], s.pad_id)
        r = prge_step(model, params, lambda b, c: copy_losses(model, b, c, s.label_ids, "class"), batch, step,
                      seed=SEED, q=Q, eps=EPS, lr=LR)
        losses.append(float(r.losses.mean()))
    acc = evaluate(model, s.dev, s.pad_id, s.label_ids, 32, "class")["accuracy"]
    return losses, acc, flat(params)


# Every family `prge train` takes, in CI (issue 22): Qwen2's q/k/v biases, Qwen3's q/k norms, Gemma-3's
# sliding window, scaled embedding and q/k norms, Phi-3's fused projections, OPT's learned positions
# and GPT-2's Conv1D; Llama is test_export.py's own model. One tiny export each (~1 minute here).
@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "llama"])
def test_family_trains_identically_in_eager_and_engine(tmp_path, arch):
    cfg = TrainConfig(model=save_tiny(tmp_path / "model", arch=arch), task="sst2", n_train=8, n_dev=8, n_test=4, q=Q,
                      batch_size=B, max_length=T, rank=4, alpha=8.0, seed=SEED, eps=EPS, lr=LR, progress=False)
    s = prepare(cfg)
    randomize_b(s.model)
    eager = copy.deepcopy(s.model)
    manifest = export_program(s.model, s.tokenizer, s.label_ids, q=Q, batch_size=B, max_length=T, out_path=tmp_path / "p.pte",
                              model_name=cfg.model)
    assert manifest["model_type"] == s.model.config.model_type
    assert [x["name"] for x in manifest["layers"]] == list(lora_layers(eager))
    data = tmp_path / "p.data.safetensors"
    write_dataset(data, s, manifest)
    out = tmp_path / "run"
    summary = device_train(tmp_path / "p.pte", data, out, steps=STEPS, lr=LR, eps=EPS, seed=SEED, eval_every=0,
                           progress=False)
    losses, acc, b_eager = eager_run(eager, s)
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    d_losses = [x["loss"] for x in rows if "loss" in x and "split" not in x]
    assert len(d_losses) == STEPS
    # Gemma-3's tanh-GELU and soft attention run on XNNPACK's approximations; a loss difference of
    # ~1e-6 becomes ~1e-5 after a few closed-loop steps (g divides it by 2ε). Observed: 1.08e-5.
    tol = 5e-5 if arch == "gemma3" else 1e-5
    assert max(abs(a - b) for a, b in zip(losses, d_losses)) < tol
    b_dev = final_b(out)
    assert float((flat([b_dev[x["name"]] for x in manifest["layers"]]) - b_eager).abs().max()) < tol
    assert summary["dev_after"] == acc
    assert float(b_eager.abs().max()) > 0 and not torch.equal(b_eager, flat(trainable_b(s.model)))  # B moved


def test_phi3_targets_its_fused_projections():
    model, _ = tiny_model("phi3")
    names = add_lora(model, rank=2)
    assert {n.rsplit(".", 1)[-1] for n in names} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert len(names) == 4 * model.config.num_hidden_layers


def test_unsupported_family_is_refused_naming_the_supported_ones(tmp_path):

    model, tok = tiny_model("llama")
    model.config.model_type = "mistral"  # any family the exporter has not been checked on
    add_lora(model, rank=2)
    with pytest.raises(PrgeError) as e:
        export_program(model, tok, [5, 6], q=1, batch_size=1, max_length=8, out_path=tmp_path / "p.pte", model_name="m")
    msg = str(e.value)
    assert "mistral" in msg and all(f in msg for f in SUPPORTED_FAMILIES)
    assert "\n" not in msg and not (tmp_path / "p.pte").exists()
