"""Evaluation with the clean weights, by kind: label-word accuracy for classification; answer-token
loss and token accuracy for completions; mean-log-probability choice for multiple choice; greedy
generation with SQuAD F1 / exact match for generation.

Examples are sorted by length and batched so that padding stays small; the LM head is applied only
at the scored positions (see `prge.zo.loss`).
"""

from __future__ import annotations

import re
import string
from collections import Counter

import torch

from prge.data.batch import Encoded, collate
from prge.zo.loss import body, copy_losses, cross_entropy, head, hidden_at, label_scores


def batches(items: list[Encoded], batch_size: int):
    order = sorted(range(len(items)), key=lambda i: len(items[i].prompt_ids) + len(items[i].answer_ids))
    for s in range(0, len(order), batch_size):
        yield [items[i] for i in order[s:s + batch_size]]


@torch.no_grad()
def evaluate(model, items: list[Encoded], pad_id: int, label_ids: torch.Tensor | None = None,
             batch_size: int = 32, loss: str = "lm") -> dict:
    """{"accuracy", "loss", "n"} (+ "label_share": how often each label is predicted, to spot drift)."""
    correct, total_loss, n, tokens = 0, 0.0, 0, 0
    counts = torch.zeros(len(label_ids) if label_ids is not None else 1)
    label_ids = None if label_ids is None else label_ids.to(model.device)
    for chunk in batches(items, batch_size):
        batch = collate(chunk, pad_id).to(model.device)
        if label_ids is not None:
            scores = label_scores(model, batch, label_ids)
            pred = scores.argmax(-1)
            correct += int((pred == batch.label).sum())
            counts += torch.bincount(pred.cpu(), minlength=len(label_ids)).float()
            if loss == "class":
                total_loss += float(cross_entropy(scores, batch.label).sum())
            else:
                total_loss += float(copy_losses(model, batch, len(chunk)).sum())
            n += len(chunk)
        else:
            h = hidden_at(model, batch.input_ids, batch.target_pos)
            logits = head(model, h)
            m = batch.target_mask
            total_loss += float((cross_entropy(logits, batch.target_ids) * m).sum())
            correct += int(((logits.argmax(-1) == batch.target_ids).float() * m).sum())
            tokens += int(m.sum())
            n += len(chunk)
    if label_ids is not None:
        return {"accuracy": correct / n, "loss": total_loss / n, "n": n, "label_share": (counts / n).tolist()}
    return {"accuracy": correct / tokens, "loss": total_loss / tokens, "n": n}


# ------------------------------------------------------------------------------------------------
# multiple choice: the option whose continuation has the highest mean log-probability


@torch.no_grad()
def evaluate_choice(model, items: list[Encoded], pad_id: int, batch_size: int = 32) -> dict:
    """{"accuracy", "loss", "n"} for multiple-choice items (each `Encoded` carries its options).

    Every option of every item is one row; the rows are length-sorted and batched together, and an
    option's score is minus its token-mean cross-entropy over its continuation tokens (the mean
    log-probability, as `copy_losses` computes it with one "copy" per row). "loss" is the gold
    option's token-mean cross-entropy (what training minimises), averaged over items.
    """
    rows = [(i, j, opt) for i, it in enumerate(items) for j, opt in enumerate(option_list(it))]
    scores = [[0.0] * len(it.choices) for it in items]
    rows.sort(key=lambda r: len(r[2].prompt_ids) + len(r[2].answer_ids))
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        batch = collate([opt for _, _, opt in chunk], pad_id).to(model.device)
        ce = copy_losses(model, batch, len(chunk)).tolist()
        for (i, j, _), v in zip(chunk, ce):
            scores[i][j] = -v
    correct = sum(max(range(len(sc)), key=sc.__getitem__) == it.label for sc, it in zip(scores, items))
    loss = sum(-sc[it.label] for sc, it in zip(scores, items))
    return {"accuracy": correct / len(items), "loss": loss / len(items), "n": len(items)}


def option_list(item: Encoded) -> list[Encoded]:
    if not item.choices or not 0 <= item.label < len(item.choices):
        raise ValueError("a multiple-choice item needs its options and the index of the gold one")
    return item.choices


# ------------------------------------------------------------------------------------------------
# generation: greedy decoding, SQuAD F1 / exact match

MAX_NEW_TOKENS = 50


@torch.no_grad()
def greedy(model, prompt_ids: list[int], eos_id: int | None, tokenizer, max_new_tokens: int = MAX_NEW_TOKENS) -> str:
    """Greedy continuation of one prompt until a newline or EOS, at most `max_new_tokens` tokens; the
    text before the newline. One sequence at a time (no padding at all), with the decoder's KV cache;
    the LM head is applied to the last position only."""
    net = body(model)
    ids = torch.tensor([prompt_ids], device=model.device)
    past, out = None, []
    for _ in range(max_new_tokens):
        o = net(input_ids=ids, past_key_values=past, use_cache=True)
        past = o.past_key_values
        nxt = int(head(model, o[0][:, -1]).argmax(-1))
        if nxt == eos_id:
            break
        out.append(nxt)
        if "\n" in tokenizer.decode(out):
            break
        ids = torch.tensor([[nxt]], device=model.device)
    return tokenizer.decode(out, skip_special_tokens=True).split("\n")[0].strip()


@torch.no_grad()
def evaluate_generation(model, tokenizer, items: list[Encoded], pad_id: int, batch_size: int = 32,
                        max_new_tokens: int = MAX_NEW_TOKENS) -> dict:
    """{"accuracy" (= F1), "f1", "em", "loss", "n", "metric"} over generation items (SQuAD).

    F1 and exact match are SQuAD's: the best over the gold answers, after `normalize_answer`. "loss"
    is the teacher-forced answer-token cross-entropy, as for completions.
    """
    f1 = em = 0.0
    for it in items:
        pred = greedy(model, it.prompt_ids, tokenizer.eos_token_id, tokenizer, max_new_tokens)
        gold = it.gold or [tokenizer.decode(it.answer_ids, skip_special_tokens=True).strip()]
        f1 += max(squad_f1(pred, g) for g in gold)
        em += max(exact_match(pred, g) for g in gold)
    n = len(items)
    lm = evaluate(model, items, pad_id, None, batch_size)
    return {"accuracy": f1 / n, "f1": f1 / n, "em": em / n, "loss": lm["loss"], "n": n, "metric": "f1"}


def normalize_answer(s: str) -> str:
    """SQuAD's normalisation: lower case, drop punctuation, drop the articles a/an/the, squeeze whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


_PUNCT = set(string.punctuation)


def exact_match(prediction: str, truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(truth))


def squad_f1(prediction: str, truth: str) -> float:
    """Token F1 between the normalised prediction and answer (SQuAD v1.1's evaluation script)."""
    p, t = normalize_answer(prediction).split(), normalize_answer(truth).split()
    common = Counter(p) & Counter(t)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(t)
    return 2 * precision * recall / (precision + recall)


def describe(result: dict) -> str:
    """One line for a result: the primary metric first ("f1 0.61  em 0.48" or "accuracy 0.87"), then the loss."""
    if result.get("metric") == "f1":
        head_ = f"f1 {result['f1']:.4f}  em {result['em']:.4f}"
    else:
        head_ = f"accuracy {result['accuracy']:.4f}"
    return f"{head_}  loss {result['loss']:.4f}  (n={result['n']})"
