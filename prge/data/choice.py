"""Built-in multiple-choice tasks: each option is a (prompt, continuation) pair; the best mean log-probability wins."""

from __future__ import annotations

from pathlib import Path

from prge.data.batch import Example
from prge.data.rows import choice_example, fill, convert_rows, hub_pools, jsonl_examples, label_of, option, text
from prge.data.sources import field, first_available, olmo_split
from prge.errors import PrgeError

# ---------------------------------------------------------------------------------------------
# COPA, WinoGrande, ARC (multiple choice)

COPA_TEMPLATE = "{premise without its final period}{ so | because }{choice, first letter lower-cased unless \"I\"}"


def _copa(where: str, row: dict) -> Example:
    premise = text(row, "premise", where)
    premise = premise[:-1] if premise.endswith(".") else premise
    question = field(row, "question", where)
    if question not in ("cause", "effect"):
        raise PrgeError(f"{where}: field 'question' is {question!r}, expected 'cause' or 'effect'", "fix the row")
    prompt = premise + (" so" if question == "effect" else " because")
    options = []
    for name in ("choice1", "choice2"):
        c = option(row.get(name), name, where)
        options.append((prompt, " " + (c if c.split(" ")[0] == "I" else c[:1].lower() + c[1:])))
    return choice_example(options, label_of(row, "label", where, {0: 0, 1: 1, "0": 0, "1": 1}), where)


def load_copa(root: Path) -> dict[str, list[Example]]:
    return first_available("copa", [
        lambda: {"train": jsonl_examples(root, "copa/train350.jsonl", _copa) + jsonl_examples(root, "copa/train_tail50.jsonl", _copa),
                 "test": jsonl_examples(root, "copa/val.jsonl", _copa)},
        lambda: {"train": convert_rows(_copa, olmo_split("super_glue/copa"))},
        lambda: hub_pools(_copa, "super_glue", "copa"),
    ])


WINOGRANDE_TEMPLATE = "{sentence up to the blank, the option filled in}{rest of the sentence}"


def _winogrande(where: str, row: dict) -> Example:
    sentence = field(row, "sentence", where)
    if sentence.count("_") != 1:
        raise PrgeError(f"{where}: the sentence has {sentence.count('_')} blanks '_', expected exactly one", "fix the row")
    before, rest = sentence.split("_")
    if not rest.strip():
        raise PrgeError(f"{where}: nothing follows the blank, so there is no continuation to score", "fix or remove the row")
    options = [(before + option(row.get(name), name, where), rest.rstrip()) for name in ("option1", "option2")]
    return choice_example(options, label_of(row, "answer", where, {"1": 0, "2": 1, 1: 0, 2: 1}), where)


def load_winogrande(root: Path) -> dict[str, list[Example]]:
    return first_available("winogrande", [
        lambda: {"train": convert_rows(_winogrande, olmo_split("winogrande/winogrande_xl"))},
        lambda: hub_pools(_winogrande, "winogrande", "winogrande_xl"),
    ])


ARC_TEMPLATE = "Question: {question}\nAnswer:"


def arc_row(where: str, row: dict) -> Example:
    question = text(row, "question", where)
    choices = row.get("choices")
    if not isinstance(choices, dict) or not isinstance(choices.get("text"), list) or not isinstance(choices.get("label"), list):
        raise PrgeError(f"{where}: expected 'choices' with 'text' and 'label' lists", "fix or remove the row")
    texts, labels = choices["text"], choices["label"]
    if len(texts) != len(labels) or len(texts) < 2:
        raise PrgeError(f"{where}: {len(texts)} option texts for {len(labels)} option labels {labels}",
                        "every item needs all of its options; fix or remove the row")
    prompt = fill(ARC_TEMPLATE, question=question)
    options = [(prompt, " " + option(t, f"choices {lab}", where)) for lab, t in zip(labels, texts)]
    key = str(field(row, "answerKey", where)).strip()
    if key not in [str(x) for x in labels]:
        raise PrgeError(f"{where}: answerKey {key!r} is not one of the options {labels}", "fix the row")
    return choice_example(options, [str(x) for x in labels].index(key), where)


def load_arc(config: str):
    def load(root: Path) -> dict[str, list[Example]]:
        return first_available(f"arc_{config.split('-')[1].lower()}", [
            lambda: {"train": convert_rows(arc_row, olmo_split(f"ai2_arc/{config}"))},
            lambda: hub_pools(arc_row, "ai2_arc", config, test_split="test"),  # ARC's test split is labelled
        ])

    return load


