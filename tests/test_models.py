import time

import pytest
import torch

from prge.data.batch import label_word_ids
from prge.errors import PrgeError
from prge.models.load import load_model, model_info
from prge.testing import ARCHS, LABEL_WORDS, save_tiny, tiny_model, tiny_tokenizer


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_arch_forward(arch):
    model, tok = tiny_model(arch)
    assert not model.training and model.config.use_cache is False
    assert model.config._attn_implementation == "eager"
    ids = torch.tensor([tok("This movie was great. It was")["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert torch.isfinite(logits).all()


def test_tiny_model_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, _ = tiny_model("llama", seed=1)
    after = torch.rand(3)
    b, _ = tiny_model("llama", seed=1)
    c, _ = tiny_model("llama", seed=2)
    assert torch.equal(after, expected)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_tiny_tokenizer_shape_like_smollm2():
    tok = tiny_tokenizer()
    assert 400 <= len(tok) <= 600
    assert tok.bos_token_id is None
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token_id == tok.eos_token_id
    assert tok("It was great", add_special_tokens=True)["input_ids"] == tok("It was great", add_special_tokens=False)["input_ids"]
    ids = label_word_ids(tok, LABEL_WORDS)
    assert len(set(ids)) == len(LABEL_WORDS)
    assert tok.convert_ids_to_tokens(ids[0]) == "Ġgreat"
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    # a fresh object per call, same vocabulary
    tok.padding_side = "left"
    again = tiny_tokenizer()
    assert again is not tok and again.padding_side == "right" and again.get_vocab() == tok.get_vocab()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_load_local_folder_same_logits(tmp_path, arch):
    save_tiny(tmp_path / "m", arch=arch)
    original, tok0 = tiny_model(arch)
    model, tok = load_model(str(tmp_path / "m"))
    assert tok.get_vocab() == tok0.get_vocab() and tok.pad_token_id == tok.eos_token_id
    assert tok.bos_token_id is None
    assert label_word_ids(tok, LABEL_WORDS) == label_word_ids(tok0, LABEL_WORDS)
    assert not model.training and model.config.use_cache is False
    assert model.config._attn_implementation == "eager"
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)
    info = model_info(model)
    assert info["num_params"] == sum(p.numel() for p in original.parameters())
    assert info["model_type"] == original.config.model_type and info["dtype"] == "float32"


def test_load_local_folder_bfloat16(tmp_path):
    save_tiny(tmp_path / "m")
    model, _ = load_model(str(tmp_path / "m"), dtype="bfloat16")
    assert model_info(model)["dtype"] == "bfloat16"


def test_unknown_dtype():
    with pytest.raises(PrgeError, match="dtype"):
        load_model("smollm2-135m", dtype="int3")


def test_missing_local_path(tmp_path):
    with pytest.raises(PrgeError, match="does not exist"):
        load_model(str(tmp_path / "nothing-here"))
    with pytest.raises(PrgeError, match="does not exist"):
        load_model("./no/such/folder")


def test_folder_without_config(tmp_path):
    with pytest.raises(PrgeError, match="config.json"):
        load_model(str(tmp_path))


def test_unknown_hub_id_fails_fast_with_advice():
    start = time.time()
    with pytest.raises(PrgeError) as e:
        load_model("no/such-folder-xyz")
    assert time.time() - start < 10
    msg = str(e.value)
    assert "'no/such-folder-xyz'" in msg and "local" in msg and "smollm2-135m" in msg


@pytest.mark.slow
def test_smollm2_is_a_real_lm():
    model, tok = load_model("smollm2-135m")
    info = model_info(model)
    assert info["name_or_path"] == "smollm2-135m" and info["model_type"] == "llama"
    assert info["num_params"] == 134_515_008
    # SmolLM2: eos = pad = <|im_end|>; BOS <|im_start|> is declared but never added
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (2, 2, 1)
    assert tok("Hello", add_special_tokens=True)["input_ids"] == tok("Hello", add_special_tokens=False)["input_ids"]
    label_word_ids(tok, [" great", " terrible", " Yes", " No"])
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    with torch.no_grad():
        top = model(ids).logits[0, -1].argmax().item()
    assert tok.decode(top) == " Paris"


@pytest.mark.slow
def test_default_sst2_prompt_beats_the_earlier_one_zero_shot():
    """The default SST-2 prompt was picked for SmolLM2-135M's zero-shot dev accuracy (85.6% on 500 rows
    against 78.0% for the earlier default, docs/evidence.md 2a); on the first 200 of those rows it must
    still be the better one, and calibrated (neither label word taking most rows)."""
    from prge.config import TrainConfig
    from prge.run.evaluate import evaluate
    from prge.data.classification import EARLIER_SST2_TEMPLATE
    from prge.run.train import load_encoded

    model, tok = load_model("smollm2-135m")
    scores = {}
    for template in (None, EARLIER_SST2_TEMPLATE):
        cfg = TrainConfig(task="sst2", template=template, n_dev=500, n_train=10, n_test=1, seed=0)
        _, _, _, dev, _, label_ids = load_encoded(cfg, tok)
        with torch.no_grad():
            scores[template] = evaluate(model, dev[:200], tok.pad_token_id, label_ids, 32, "class")
    new, old = scores[None], scores[EARLIER_SST2_TEMPLATE]
    assert new["accuracy"] >= 0.82 and new["accuracy"] > old["accuracy"] + 0.03
    assert max(new["label_share"]) < 0.6


def test_a_builtin_models_own_lr_is_the_default_unless_one_is_given(tmp_path, capsys):
    """Gemma-3-270M diverges at the default 3e-3 (and at 1e-3): `prge train --model gemma3-270m` takes
    its own lr unless --lr or --config gives one."""
    from prge.cli import build_config, parser

    def cfg(*argv):
        return build_config(parser().parse_args(["train", *argv]))

    assert cfg("--model", "gemma3-270m").lr == 1e-4
    assert "--lr 0.0001, gemma3-270m's default" in capsys.readouterr().err
    assert cfg("--model", "gemma3-270m", "--lr", "3e-3").lr == 3e-3
    assert cfg().lr == 3e-3 and cfg("--model", "smollm2-135m").lr == 3e-3
    yaml = tmp_path / "c.yaml"
    yaml.write_text("model: gemma3-270m\nlr: 2e-4\n")
    assert cfg("--config", str(yaml)).lr == 2e-4
    # `prge eval` trains nothing: no lr line, no lr change
    capsys.readouterr()
    assert build_config(parser().parse_args(["eval", "--model", "gemma3-270m"]), builtin_lr=False).lr == 3e-3
    assert capsys.readouterr().err == ""
