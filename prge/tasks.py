"""Built-in tasks: where their rows come from, how a row becomes a prompt, and how splits are made.

A `Task` is one small entry in `TASKS`: a name, a kind, its label words and a `load(data_root)` that
reads the task's files into pools of `Example`s. `load_task` turns the pools into the three splits
every run uses, always the same way:

- **train**: `n_train` rows drawn class-balanced from the task's train pool: each class gets
  `n_train // k` rows (the first `n_train % k` classes, in label order, one more); a class with too
  few rows gives all it has and the shortfall is drawn from the other classes' leftover rows. The
  picked rows are then shuffled, so the list is not sorted by class.
- **dev** (model selection and periodic evaluation): `n_dev` rows drawn from the task's dev pool; a
  task without a dev pool (RTE) draws them from the train-pool rows that train did not pick, so dev
  and train never share a row.
- **test** (the number reported): the task's test file, all of it in file order; `n_test` caps it
  with a seeded draw.

Every draw is `seeded_sample`: a fresh `random.Random(seed)` shuffles the row indices and the first
n are taken. The result depends only on the seed, the file and the sizes (Python's `random` is a
Mersenne Twister with a documented, platform-independent algorithm), so every run and every
machine gets the same rows. Asking for more rows than a pool has is an error, not a silent cut,
because it would change the experiment.

The tasks now:

- `sst2`: `{sentence} It was` + " terrible" (0) / " great" (1). Train pool `sst2/train.tsv` (60,614
  rows, GLUE train incl. phrase-level rows, 90%), dev pool `sst2/dev.tsv` (6,735, the other 10%),
  test `sst2/test.tsv` (the 872-row labelled GLUE dev set). Sentences are GLUE's lower-cased,
  tokenized text ("it 's a charming ... journey ."); only surrounding whitespace is stripped, the
  tokenization is kept as the reference code feeds it.
- `rte`: `{premise}\\nDoes this mean that "{hypothesis}" is true? Yes or No?` + " Yes" (0,
  entailment) / " No" (1, not_entailment). Train pool `rte_glue/train.tsv` + `rte_glue/val.tsv`
  (2,127 + 363 = the 2,490-row GLUE train set), no dev pool (dev comes from the train rows not
  picked), test `rte_glue/dev.tsv` (the 277-row GLUE dev set).

Prompts end without a trailing space; the label word carries it (" great"), as the tokenizer
splits the answer after the prompt.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence, TypeVar

from prge.batch import Example
from prge.errors import PrgeError

T = TypeVar("T")

# Kinds a task may have. "multiple_choice" (COPA, WinoGrande) and "generation" (SQuAD) are meant to be
# added here with their own Example layout and metric; code that dispatches on kind should reject
# kinds it does not handle rather than assume classification.
KINDS = ("classification",)

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
    label_words: list[str] = field(default_factory=list)  # with leading spaces; classification only

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name}: unknown kind {self.kind!r}, expected one of {KINDS}")
        if self.kind == "classification":
            if len(self.label_words) < 2 or not all(w.startswith(" ") for w in self.label_words):
                raise ValueError(f"task {self.name}: classification needs >= 2 label words with leading spaces")


@dataclass
class TaskData:
    task: Task
    train: list[Example]
    dev: list[Example]
    test: list[Example]


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

SST2_TEMPLATE = "{sentence} It was"
SST2_WORDS = [" terrible", " great"]


def _sst2_rows(path: Path) -> list[Example]:
    out = []
    for lineno, (sentence, label) in _read_tsv(path, ["sentence", "label"], header=True):
        y = _label(path, lineno, label, {"0": 0, "1": 1})
        sentence = sentence.strip()
        if not sentence:
            raise PrgeError(f"{path}:{lineno}: empty sentence", "fix or remove the row")
        out.append(Example(_fill(SST2_TEMPLATE, sentence=sentence), SST2_WORDS[y], y, f"{path}:{lineno}"))
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
        prompt = _fill(RTE_TEMPLATE, premise=premise.strip(), hypothesis=hypothesis.strip())
        out.append(Example(prompt, RTE_WORDS[y], y, f"{path}:{lineno}"))
    return out


def load_rte(root: Path) -> dict[str, list[Example]]:
    train = _rte_rows(_data_file(root, "rte_glue/train.tsv"), header=True)
    train += _rte_rows(_data_file(root, "rte_glue/val.tsv"), header=False)  # val.tsv has no header row
    return {"train": train, "test": _rte_rows(_data_file(root, "rte_glue/dev.tsv"), header=True)}


# ---------------------------------------------------------------------------------------------
# The registry

TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("sst2", "classification", "SST-2 movie-review sentiment (GLUE); test = the 872-row GLUE dev set",
             SST2_TEMPLATE, load_sst2, SST2_WORDS),
        Task("rte", "classification", "RTE textual entailment (GLUE); test = the 277-row GLUE dev set",
             RTE_TEMPLATE, load_rte, RTE_WORDS),
    ]
}


def get_task(name: str) -> Task:
    task = TASKS.get(name.strip().lower())
    if task is None:
        raise PrgeError(f"unknown task {name!r}", f"choose one of: {', '.join(sorted(TASKS))}")
    return task


def load_task(
    name: str,
    data_root: str | os.PathLike | None = None,
    seed: int = 0,
    n_train: int = 1000,
    n_dev: int = 500,
    n_test: int | None = None,
) -> TaskData:
    """The task's train/dev/test splits, drawn as the module docstring describes."""
    task = get_task(name)
    pools = task.load(resolve_data_root(data_root))
    train, rest = seeded_sample(pools["train"], n_train, seed, label_of=lambda e: e.label, what=f"{task.name} train rows")
    dev_pool = pools["dev"] if "dev" in pools else rest
    dev, _ = seeded_sample(dev_pool, n_dev, seed, what=f"{task.name} dev rows")
    test = pools["test"]
    if n_test is not None and n_test < len(test):
        test, _ = seeded_sample(test, n_test, seed, what=f"{task.name} test rows")
    return TaskData(task, train, dev, test)
