"""Examples -> token ids -> fixed-layout batches.

Every task, built-in or the user's own, ends up as a list of `Example`s. `encode` turns them into
token ids once; `collate` pads a few of them into a `Batch`, the one tensor layout that the loss,
the evaluation and the exported ExecuTorch program all take:

- `input_ids` (b, T): prompt + answer tokens, RIGHT-padded. No attention mask is needed: causal
  attention keeps the pads (which come after every real token) from touching real positions.
- `target_pos` (b, K): for each of up to K answer tokens, the position whose next-token logits
  predict it (the position just before the answer token).
- `target_ids` (b, K): the answer token to predict there.
- `target_mask` (b, K): 1.0 for real answer tokens, 0.0 for padding.
- `label` (b,): the class index for classification (index into the task's label words), else -1.

The LM head is evaluated only at `target_pos`, never over the whole sequence.

Truncation rule (documented in the README): if prompt + answer is longer than `max_length`,
tokens are dropped from the *start* of the prompt (after a leading BOS token, which is kept), so the
end of the prompt — where the question and the answer cue are — survives. `truncate="error"`
refuses instead.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from prge.errors import PrgeError


@dataclass
class Example:
    """One training or evaluation item, in text."""

    prompt: str
    answer: str  # the gold continuation: a label word with its leading space, or a completion
    label: int = -1  # class index into the task's label words for classification, else -1
    source: str = ""  # "file:line" for error messages
    add_eos: bool = True  # completions end with EOS; chat answers already end with the template's end of turn
    # multiple choice: every option as (prompt, continuation), the gold one at index `label`; prompt/answer
    # above are the gold option (what training learns). Options may differ in the continuation (COPA, ARC)
    # or in the prompt (WinoGrande: the option fills the blank, the rest of the sentence is scored).
    choices: list[tuple[str, str]] | None = None
    gold: list[str] | None = None  # generation: every accepted answer text (SQuAD), for F1 / exact match
    fields: dict[str, str] | None = None  # classification tasks: the row's text fields, so --template can re-fill the prompt


@dataclass
class Encoded:
    prompt_ids: list[int]
    answer_ids: list[int]
    label: int = -1
    choices: list["Encoded"] | None = None  # multiple choice: each option's prompt + continuation ids
    gold: list[str] | None = None  # generation: the accepted answers


@dataclass
class Batch:
    input_ids: torch.Tensor
    target_pos: torch.Tensor
    target_ids: torch.Tensor
    target_mask: torch.Tensor
    label: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def repeat(self, copies: int) -> "Batch":
        """The batch repeated `copies` times along the batch dimension: block k is copy k."""
        return Batch(*(t.repeat(copies, *([1] * (t.dim() - 1))) for t in self.tensors()))

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.input_ids, self.target_pos, self.target_ids, self.target_mask, self.label)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def continuation_ids(tokenizer, prompt: str, answer: str) -> list[int]:
    """Token ids of `answer` as the tokenizer splits it after `prompt`.

    Tokenizing prompt+answer together and removing the prompt's ids gives the answer's ids as they
    appear in context (SentencePiece and BPE merges across the boundary included); when the prompt's
    ids are not a prefix of the joint ids, fall back to tokenizing the answer alone.
    """
    p = _ids(tokenizer, prompt)
    full = _ids(tokenizer, prompt + answer)
    if full[: len(p)] == p and len(full) > len(p):
        return full[len(p):]
    return _ids(tokenizer, answer)


def label_word_ids(tokenizer, words: list[str]) -> list[int]:
    """One token id per label word (scored with its leading space, e.g. " great"; a word without one,
    like WiC's "Yes", follows a newline and is scored as it splits there)."""
    ids = []
    for w in words:
        t = continuation_ids(tokenizer, "It was" if w.startswith(" ") else "It was\n", w)
        if len(t) != 1:
            pieces = tokenizer.convert_ids_to_tokens(t)
            raise PrgeError(
                f"label word {w!r} is {len(t)} tokens {pieces} for this tokenizer; classification needs one token per label word",
                "choose another word (with its leading space, e.g. ' great') or use the prompt/completion format",
            )
        ids.append(t[0])
    if len(set(ids)) != len(ids):
        raise PrgeError(f"label words {words} map to the same token", "choose label words that differ in their first token")
    return ids


def encode(
    examples: list[Example],
    tokenizer,
    max_length: int,
    label_ids: list[int] | None = None,
    truncate: str = "left",
) -> list[Encoded]:
    """Tokenize examples. With `label_ids`, the answer is the label word's single token."""
    if not examples:
        raise PrgeError("the dataset is empty", "check the data file or the task's split sizes")
    out = []
    for ex in examples:
        if label_ids is not None:
            if not 0 <= ex.label < len(label_ids):
                raise PrgeError(f"{ex.source or 'example'}: label {ex.label} is out of range for {len(label_ids)} label words",
                                "fix the label or the task's label words")
            out.append(_encode_one(tokenizer, ex.prompt, None, [label_ids[ex.label]], ex, max_length, truncate))
            continue
        item = _encode_one(tokenizer, ex.prompt, ex.answer, None, ex, max_length, truncate)
        if ex.choices is not None:
            if not 0 <= ex.label < len(ex.choices):
                raise PrgeError(f"{ex.source or 'example'}: gold option {ex.label} is out of range for {len(ex.choices)} options",
                                "fix the row's answer")
            item.choices = [_encode_one(tokenizer, p, a, None, ex, max_length, truncate) for p, a in ex.choices]
        item.gold = ex.gold
        out.append(item)
    return out


def _encode_one(tokenizer, prompt_text: str, answer_text: str | None, answer: list[int] | None, ex: Example,
                max_length: int, truncate: str) -> Encoded:
    """Token ids of one prompt + answer (the given ids, or `answer_text` as it splits after the prompt)."""
    bos = tokenizer.bos_token_id
    # add_special_tokens=True gives BOS where the model expects one (Llama-2, Gemma), none for SmolLM2
    # (a chat-rendered prompt that already starts with the BOS text gets no second one)
    has_bos = bool(tokenizer.bos_token) and prompt_text.startswith(tokenizer.bos_token)
    prompt = tokenizer(prompt_text, add_special_tokens=not has_bos)["input_ids"]
    if answer is None:
        answer = continuation_ids(tokenizer, prompt_text, answer_text)
        if ex.add_eos and tokenizer.eos_token_id is not None and not answer_text.endswith(tokenizer.eos_token):
            answer = answer + [tokenizer.eos_token_id]
    if not answer:
        raise PrgeError(f"{ex.source or 'example'}: the answer is empty", "every row needs a non-empty completion or label")
    excess = len(prompt) + len(answer) - max_length
    if excess > 0:
        keep_bos = 1 if (bos is not None and prompt and prompt[0] == bos) else 0
        if truncate == "error" or len(prompt) - keep_bos - excess < 1:
            raise PrgeError(
                f"{ex.source or 'example'}: {len(prompt) + len(answer)} tokens, longer than max_length={max_length}",
                "raise --max-length, shorten the row, or use --truncate left",
            )
        prompt = prompt[:keep_bos] + prompt[keep_bos + excess:]
    return Encoded(prompt, answer, ex.label)


def collate(items: list[Encoded], pad_id: int, length: int | None = None, answer_slots: int | None = None) -> Batch:
    """Right-pad to `length` (default: the longest item) with up to `answer_slots` answer tokens."""
    T = length or max(len(e.prompt_ids) + len(e.answer_ids) for e in items)
    K = answer_slots or max(len(e.answer_ids) for e in items)
    b = len(items)
    input_ids = torch.full((b, T), pad_id, dtype=torch.long)
    target_pos = torch.zeros((b, K), dtype=torch.long)
    target_ids = torch.full((b, K), pad_id, dtype=torch.long)
    target_mask = torch.zeros((b, K), dtype=torch.float32)
    for i, e in enumerate(items):
        seq = e.prompt_ids + e.answer_ids
        if len(seq) > T or len(e.answer_ids) > K:
            raise PrgeError(f"an example has {len(seq)} tokens and {len(e.answer_ids)} answer tokens; the batch shape is {T} and {K}",
                            "export the program with a larger --max-length, or shorten the data")
        input_ids[i, : len(seq)] = torch.tensor(seq)
        n = len(e.answer_ids)
        start = len(e.prompt_ids) - 1
        target_pos[i, :n] = torch.arange(start, start + n)
        target_ids[i, :n] = torch.tensor(e.answer_ids)
        target_mask[i, :n] = 1.0
    label = torch.tensor([e.label for e in items], dtype=torch.long)
    return Batch(input_ids, target_pos, target_ids, target_mask, label)


def step_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The examples of step `step` (1-based): consecutive slices of seeded per-epoch permutations."""
    out = []
    start = (step - 1) * batch_size
    for pos in range(start, start + batch_size):
        epoch, i = divmod(pos, n)
        perm = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(perm)
        out.append(perm[i])
    return out
