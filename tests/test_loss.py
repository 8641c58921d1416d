"""Losses on the answer tokens only, with the head applied only where scored, equal the full-logit CE."""

import pytest
import torch

from prge.data.batch import Example, collate, encode, label_word_ids
from prge.errors import PrgeError
from prge.zo.loss import copy_losses, label_scores
from prge.testing import tiny_model


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "qwen2", "gemma3"])
def test_answer_token_loss_matches_full_logits(arch):
    model, tok = tiny_model(arch)
    exs = [Example("the movie was", " great fun", -1), Example("a long and dull story that", " ends", -1)]
    batch = collate(encode(exs, tok, 64), tok.pad_token_id)
    ours = copy_losses(model, batch, 2)  # one "copy" per example here
    with torch.no_grad():
        logits = model(batch.input_ids).logits
    for i in range(2):
        m = batch.target_mask[i].bool()
        pos, tgt = batch.target_pos[i][m], batch.target_ids[i][m]
        ref = torch.nn.functional.cross_entropy(logits[i, pos], tgt)
        assert torch.allclose(ours[i], ref, atol=1e-5)
    # the answer includes EOS for completions
    assert batch.target_ids[0][batch.target_mask[0].bool()][-1].item() == tok.eos_token_id


def test_label_scores_are_the_label_word_logits():
    model, tok = tiny_model("llama")
    words = [" terrible", " great"]
    ids = label_word_ids(tok, words)
    exs = [Example("a fine film It was", " great", 1), Example("bad It was", " terrible", 0)]
    batch = collate(encode(exs, tok, 64, ids), tok.pad_token_id)
    scores = label_scores(model, batch, torch.tensor(ids))
    with torch.no_grad():
        logits = model(batch.input_ids).logits
    for i, e in enumerate(encode(exs, tok, 64, ids)):
        assert torch.allclose(scores[i], logits[i, len(e.prompt_ids) - 1, ids], atol=1e-5)


def test_multi_token_label_word_is_refused():
    _, tok = tiny_model("llama")
    with pytest.raises(PrgeError, match="tokens"):
        label_word_ids(tok, [" great", " xylophonically"])


def test_truncation_keeps_the_end_of_the_prompt_or_refuses():
    _, tok = tiny_model("llama")
    ex = Example("one two three four five six seven eight nine ten the movie was", " great", 1)
    ids = label_word_ids(tok, [" terrible", " great"])
    full = encode([ex], tok, 512, ids)[0]
    short = encode([ex], tok, 6, ids)[0]
    assert len(short.prompt_ids) + len(short.answer_ids) == 6
    assert short.prompt_ids == full.prompt_ids[-5:]
    with pytest.raises(PrgeError, match="max_length"):
        encode([ex], tok, 6, ids, truncate="error")
    with pytest.raises(PrgeError, match="empty"):
        encode([], tok, 6, ids)
