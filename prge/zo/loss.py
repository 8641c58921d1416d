"""Answer-token losses and label-word scores, with the LM head evaluated only where it is scored.

The vocabulary projection is about a fifth of SmolLM2-135M's forward, so we never compute logits for
every position: we run the decoder body, gather the hidden states at `target_pos`, and apply the
head there only — for `loss="class"`, only to the label words' rows of the head (MeZO's "train as
classification": a softmax over the label words instead of the whole vocabulary).

The cross-entropy (`estimator.cross_entropy`, re-exported here) is written as logsumexp(x − max) +
max − x[target]: the same numbers as `F.cross_entropy`, in ops that XNNPACK takes when exported (a
portable `log_softmax` was half of an exported step at vocab 32k).

All functions take a batch that may be a repeat of C copies (block k = copy k) and return one value
per copy: the token-mean over that copy's answer tokens.
"""

from __future__ import annotations

import torch
from torch import nn

from prge.data.batch import Batch
from prge.zo.estimator import cross_entropy  # noqa: F401  (the losses' one cross-entropy; imported from here too)
from prge.zo.readout import ATTR as READOUT  # the attribute holding a trained label readout, if any


def body(model: nn.Module) -> nn.Module:
    """The decoder without its LM head (model.model for Llama/Qwen2/Gemma/OPT, .transformer for GPT-2)."""
    return getattr(model, model.base_model_prefix)


def hidden_at(model: nn.Module, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Final hidden states (N, K, H) at `positions` (N, K)."""
    h = body(model)(input_ids=input_ids, use_cache=False)[0]
    return torch.gather(h, 1, positions.unsqueeze(-1).expand(-1, -1, h.shape[-1]))


def label_head(model: nn.Module, h: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The head's logits (all rows, or `rows`) before any readout and soft-capping."""
    lm = model.get_output_embeddings()
    w, b = lm.weight, lm.bias
    if rows is not None:
        w = w[rows]
        b = None if b is None else b[rows]
    return nn.functional.linear(h.to(w.dtype), w, b).float()


def head(model: nn.Module, h: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Logits from hidden states: the whole vocabulary, or only the head's `rows` (token ids).

    A label readout on the model (`prge.zo.readout`) adds its correction when `rows` are its label words."""
    logits = label_head(model, h, rows)
    ro = getattr(model, READOUT, None)
    if ro is not None and rows is not None and ro.label_ids.tolist() == rows.tolist():
        logits = logits + ro(h)
    cap = getattr(model.config, "final_logit_softcapping", None)  # Gemma
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def copy_losses(model: nn.Module, batch: Batch, copies: int, label_ids: torch.Tensor | None = None,
                loss: str = "lm") -> torch.Tensor:
    """(copies,) token-mean CE over each copy's answer tokens.

    loss="lm": next-token CE over the whole vocabulary on every answer token.
    loss="class": CE over the label words only, at the answer position (classification tasks).
    """
    h = hidden_at(model, batch.input_ids, batch.target_pos)
    mask = batch.target_mask
    if loss == "class":
        ce = cross_entropy(head(model, h[:, :1], label_ids), batch.label.unsqueeze(-1))
        mask = mask[:, :1]
    else:
        ce = cross_entropy(head(model, h), batch.target_ids)
    ce = (ce * mask).reshape(copies, -1).sum(1)
    return ce / mask.reshape(copies, -1).sum(1)


def label_scores(model: nn.Module, batch: Batch, label_ids: torch.Tensor) -> torch.Tensor:
    """(N, L) label-word logits at the answer position: the classifier's scores."""
    h = hidden_at(model, batch.input_ids, batch.target_pos[:, :1])
    return head(model, h[:, 0], label_ids)
