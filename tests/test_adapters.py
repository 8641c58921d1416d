"""PEFT-format adapters, merging, and the atomic writers they use.

The contract is interoperability: an adapter we save must give the same predictions under
`peft.PeftModel.from_pretrained` as under our own layers, and one peft saves must give the same
predictions once loaded here. Checked on tiny random models with random nonzero B (a zero B would
make every comparison pass trivially).
"""

import json
import os
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")

from prge.run.adapters import load_adapter, merge, merge_to_folder, save_adapter  # noqa: E402
from prge.errors import PrgeError  # noqa: E402
from prge.io import (atomic_dir, atomic_write_bytes, atomic_write_json, atomic_write_text, load_tensors,  # noqa: E402
                     resolve_dir, save_tensors)
from prge.zo.lora import MPLoRALinear, add_lora, lora_layers, using  # noqa: E402
from prge.testing import tiny_model  # noqa: E402

IDS = torch.randint(3, 400, (2, 9), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def randomize_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g))


def peft_model(arch, **lora_kwargs):
    """A peft LoRA model on the tiny base with random nonzero B."""
    base, _ = tiny_model(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's Conv1D fan_in_fan_out notice, transformers deprecations
        pm = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", **lora_kwargs))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    return pm.eval()


def ours(arch, tmp_path, **kwargs):
    """A tiny model with our LoRA (random B), saved as an adapter."""
    model, _ = tiny_model(arch)
    add_lora(model, rank=4, alpha=8.0, **kwargs)
    randomize_b(model)
    folder = tmp_path / "adapter"
    save_adapter(model, folder, base_name_or_path=f"tiny-{arch}")
    return model, folder


# (a) ours -> peft


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "qwen2"])
def test_saved_adapter_loads_in_peft_with_same_logits(arch, tmp_path):
    model, folder = ours(arch, tmp_path, layers=[1])  # only some layers: target_modules must be exact names
    base, _ = tiny_model(arch)
    plain = logits(base)
    pm = peft.PeftModel.from_pretrained(base, folder)
    ref = logits(model)
    assert not torch.allclose(ref, plain, atol=1e-3)  # the adapter does something
    torch.testing.assert_close(logits(pm), ref, atol=1e-5, rtol=0)
    wrapped = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert wrapped == set(lora_layers(model))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_saved_files_match_what_peft_writes(arch, tmp_path):
    model, folder = ours(arch, tmp_path)
    names = sorted(lora_layers(model))
    pm = peft_model(arch, r=4, lora_alpha=8, target_modules=names)
    pm.save_pretrained(tmp_path / "peft")
    theirs, mine = load_tensors(tmp_path / "peft" / "adapter_model.safetensors"), load_tensors(folder / "adapter_model.safetensors")
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in theirs.items()}
    cfg, ref = (json.loads((f / "adapter_config.json").read_text()) for f in (folder, tmp_path / "peft"))
    for key in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "bias", "fan_in_fan_out",
                "use_rslora", "use_dora", "rank_pattern", "alpha_pattern"):
        assert cfg[key] == ref[key], key
    assert sorted(cfg["target_modules"]) == sorted(ref["target_modules"]) == names
    assert cfg["fan_in_fan_out"] == (arch == "gpt2")
    assert cfg["base_model_name_or_path"] == f"tiny-{arch}"


def test_peft_loads_our_adapter_without_warnings(tmp_path):
    _, folder = ours("llama", tmp_path)
    base, _ = tiny_model("llama")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft.PeftModel.from_pretrained(base, folder)
    ours_warnings = [str(w.message) for w in caught if "checkpointing" not in str(w.message)]  # transformers' own
    assert ours_warnings == []


# (b) peft -> ours


@pytest.mark.parametrize("arch,kwargs", [
    ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"])),  # suffixes
    ("llama", dict(target_modules=["model.layers.1.self_attn.k_proj", "model.layers.0.mlp.up_proj"])),  # exact names
    ("llama", dict(target_modules=r".*\.1\.self_attn\.(q|o)_proj", lora_dropout=0.1)),  # regex; dropout is fine
    ("llama", dict(target_modules=["o_proj"], layers_to_transform=[0])),
    ("gpt2", dict(target_modules=["c_attn", "c_fc"])),
    ("opt", dict(target_modules=["q_proj", "fc2"])),
])
def test_peft_adapter_loads_with_same_logits(arch, kwargs, tmp_path):
    pm = peft_model(arch, r=4, lora_alpha=16, **kwargs)
    pm.save_pretrained(tmp_path / "peft")
    expected = {n.removeprefix("base_model.model.") for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    model, _ = tiny_model(arch)
    names = load_adapter(model, tmp_path / "peft")
    assert set(names) == expected
    torch.testing.assert_close(logits(model), logits(pm), atol=1e-5, rtol=0)


def test_legacy_bin_adapter_loads(tmp_path):
    pm = peft_model("llama", r=2, lora_alpha=4, target_modules=["v_proj"])
    pm.save_pretrained(tmp_path / "peft", safe_serialization=False)
    assert (tmp_path / "peft" / "adapter_model.bin").is_file()
    model, _ = tiny_model("llama")
    load_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(logits(model), logits(pm), atol=1e-5, rtol=0)


def test_load_into_existing_lora_layers_keeps_their_setup(tmp_path):
    trained, folder = ours("llama", tmp_path)
    model, _ = tiny_model("llama")
    add_lora(model, rank=4, alpha=8.0, copies=3, seed=7)  # e.g. set up for training, then resumed
    load_adapter(model, folder)
    torch.testing.assert_close(logits(model), logits(trained), atol=1e-5, rtol=0)
    for m in lora_layers(model).values():
        assert m.copies.shape[0] == 3 and torch.equal(m.copies[2], m.lora_B)
    with using(model, "copies"):
        torch.testing.assert_close(logits(model)[:1], logits(trained)[:1], atol=1e-5, rtol=0)


# (c) merge


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_gives_plain_model_with_same_logits(arch, tmp_path):
    model, folder = ours(arch, tmp_path)
    ref = logits(model)
    merged = merge(model)
    assert not any(isinstance(m, MPLoRALinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged), ref, atol=1e-5, rtol=0)

    from transformers import AutoModelForCausalLM

    base, tok = tiny_model(arch)
    out = tmp_path / "merged"
    merge_to_folder(base, tok, folder, out)
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folder left
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    torch.testing.assert_close(logits(reloaded), ref, atol=1e-5, rtol=0)


def test_merge_refuses_a_tied_head():
    model, _ = tiny_model("llama")  # tied embeddings, like SmolLM2
    add_lora(model, targets=["lm_head"], rank=2)
    with pytest.raises(PrgeError, match="tied"):
        merge(model)


# (d) atomic writes


def test_atomic_dir_keeps_old_folder_when_body_raises(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("new")
            raise RuntimeError("crash")
    assert (target / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_replaces_whole_folder_and_recovers_from_half_swap(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("x")
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("1")
    # the stale file is gone; SHA256SUMS is the hash list every atomic folder now carries (issue 23)
    assert sorted(p.name for p in target.iterdir()) == ["SHA256SUMS", "a.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    os.replace(target, tmp_path / "out.old")  # a crash between the two renames
    assert resolve_dir(target) == tmp_path / "out.old"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("2")
    assert resolve_dir(target) == target and (target / "a.txt").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_writes_leave_no_temp_file(tmp_path):
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "t.txt", "hello")
    atomic_write_json(tmp_path / "j.json", {"a": 1})
    atomic_write_json(tmp_path / "j.json", {"a": 2})
    save_tensors(tmp_path / "w.safetensors", {"x": torch.arange(3.0)})
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "j.json", {"a": object()})  # fails mid-write: old file survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.bin", "j.json", "t.txt", "w.safetensors"]
    assert json.loads((tmp_path / "j.json").read_text()) == {"a": 2}
    assert torch.equal(load_tensors(tmp_path / "w.safetensors")["x"], torch.arange(3.0))


# (e) refusals


def test_missing_files_raise(tmp_path):
    _, folder = ours("llama", tmp_path)
    model, _ = tiny_model("llama")
    with pytest.raises(PrgeError, match="does not exist"):
        load_adapter(model, tmp_path / "nowhere")
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(PrgeError, match="adapter_model.safetensors"):
        load_adapter(model, folder)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(PrgeError, match="adapter_config.json"):
        load_adapter(model, folder)
    assert not lora_layers(model)


def test_wrong_base_model_raises(tmp_path):
    _, folder = ours("llama", tmp_path)
    opt, _ = tiny_model("opt")  # q_proj lives under model.decoder.layers there
    with pytest.raises(PrgeError, match="does not have"):
        load_adapter(opt, folder)
    assert not lora_layers(opt)


@pytest.mark.parametrize("edit", [dict(use_dora=True), dict(use_rslora=True), dict(rank_pattern={"q_proj": 8}),
                                  dict(alpha_pattern={"q_proj": 2}), dict(peft_type="IA3"),
                                  dict(init_lora_weights="pissa"), dict(modules_to_save=["lm_head"])])
def test_unrepresentable_config_raises(edit, tmp_path):
    _, folder = ours("llama", tmp_path)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, **edit}))
    model, _ = tiny_model("llama")
    with pytest.raises(PrgeError):
        load_adapter(model, folder)
    assert not lora_layers(model)


def test_peft_dora_adapter_raises(tmp_path):
    pm = peft_model("llama", r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    pm.save_pretrained(tmp_path / "dora")
    model, _ = tiny_model("llama")
    with pytest.raises(PrgeError, match="use_dora"):
        load_adapter(model, tmp_path / "dora")


def test_shape_mismatch_raises(tmp_path):
    _, folder = ours("llama", tmp_path)
    from transformers import AutoModelForCausalLM

    bigger, _ = tiny_model("llama")
    cfg = bigger.config
    cfg.hidden_size, cfg.head_dim = 128, 32
    other = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(PrgeError, match="expected A"):
        load_adapter(other, folder)
