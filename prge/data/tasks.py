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
  train never share a row; where the train pool holds phrases cut from the dev pool's sentences
  (SST-2, `Task.phrase_field`), dev also skips every sentence that contains a training row of
  >= 3 tokens.
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
  rows, GLUE train incl. phrase-level rows, 90%), dev pool the whole sentences of `sst2/dev.tsv`
  (1,300 of its 6,735 rows, the other 10%; until 2026-12-03 every row, mostly phrases), less those
  that contain one of the run's training rows of >= 3 tokens (`without_train_phrases`; since
  2026-12-04: both pools are GLUE train, whose phrase rows are pieces of its sentences), test
  `sst2/test.tsv` (the 872-row labelled GLUE dev set, whole sentences). Sentences are GLUE's lower-cased,
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


import dataclasses
import os
import re
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Callable

from prge.data.batch import Example
from prge.data.choice import ARC_TEMPLATE, COPA_TEMPLATE, WINOGRANDE_TEMPLATE, load_arc, load_copa, load_winogrande
from prge.data.classification import (BOOLQ_TEMPLATE, BOOLQ_WORDS, CB_TEMPLATE, CB_WORDS, MRPC_TEMPLATE, MULTIRC_TEMPLATE,
                                      MULTIRC_WORDS, NO_YES, QNLI_TEMPLATE, QQP_TEMPLATE, RTE_TEMPLATE, RTE_WORDS,
                                      SST2_TEMPLATE, SST2_WORDS, WIC_TEMPLATE, WIC_WORDS, WNLI_TEMPLATE, WSC_TEMPLATE,
                                      WSC_WORDS, YES_NO, load_boolq, load_cb, load_glue, load_multirc, load_rte, load_sst2,
                                      load_wic, load_wsc)
from prge.data.generation import SQUAD_TEMPLATE, load_squad
from prge.data.rows import fill
from prge.data.sampling import fixed_sample, seeded_sample
from prge.errors import PrgeError


# Kinds a task may have (see the module docstring); code that dispatches on kind rejects kinds it does
# not handle rather than assume classification.
KINDS = ("classification", "multiple_choice", "generation")
TEST_CAP = 1000  # MeZO's "up to 1000 test examples"

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
    # the field whose text the train pool cuts into phrases of the dev pool's rows (SST-2: both pools are GLUE
    # train, whose phrase rows are parse-tree pieces of its sentences): dev drops a row containing a training row
    phrase_field: str | None = None

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


# ---------------------------------------------------------------------------------------------
# The registry

TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("sst2", "classification", "SST-2 movie-review sentiment (GLUE); test = the 872-row GLUE dev set",
             SST2_TEMPLATE, load_sst2, SST2_WORDS, phrase_field="sentence"),
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
    return [dataclasses.replace(x, prompt=fill(template, **x.fields)) for x in examples]


def get_task(name: str) -> Task:
    task = TASKS.get(name.strip().lower())
    if task is None:
        raise PrgeError(f"unknown task {name!r}", f"choose one of: {', '.join(sorted(TASKS))}")
    return task



PHRASE_MIN_TOKENS = 3


def without_train_phrases(pool: list[Example], train: list[Example], field: str) -> list[Example]:
    """The rows of `pool` whose `field` contains no training row's text of >= 3 tokens (on token boundaries).

    SST-2's dev pool and train pool are both GLUE train, whose phrase rows are pieces of its sentences, so a dev
    sentence can hold a phrase the run trains on: with 1,000 training rows, 8.6-10.4% of the dev sentences did
    (seeds 0-2) against 0.1-0.3% of the test sentences, which come from elsewhere. Shorter rows are words and
    word pairs that test sentences hold as often (1.4-6.4%): vocabulary, not a shared sentence."""
    keys = [f" {e.fields[field]} " for e in train if len(e.fields[field].split()) >= PHRASE_MIN_TOKENS]
    return [e for e in pool if not any(k in f" {e.fields[field]} " for k in keys)]


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
    elif task.phrase_field:
        dev_pool = without_train_phrases(dev_pool, train, task.phrase_field)
    dev, _ = seeded_sample(dev_pool, min(500, len(dev_pool)) if n_dev is None else n_dev, seed, what=f"{task.name} dev rows")
    if n_test is not None and n_test < len(test):
        test, _ = seeded_sample(test, n_test, seed, what=f"{task.name} test rows")
    return TaskData(task, train, dev, test, carved)
