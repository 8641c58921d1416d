"""Evaluation with the clean weights: label-word accuracy for classification, answer-token loss and
token accuracy for completions.

Examples are sorted by length and batched so that padding stays small; the LM head is applied only
at the scored positions (see `prge.loss`).
"""

from __future__ import annotations

import torch

from prge.batch import Encoded, collate
from prge.loss import copy_losses, cross_entropy, head, hidden_at, label_scores


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
