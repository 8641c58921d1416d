"""Row readers shared by the built-in tasks' converters: GLUE tsv files, jsonl / Arrow / hub rows as
(where, dict) pairs, label lookups, template filling, and the `Example` builders of each kind."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from prge.data.batch import Example
from prge.data.sources import field, hub_split, local_file, read_jsonl
from prge.errors import PrgeError


def data_file(root: Path, rel: str) -> Path:
    path = root / rel
    if not path.is_file():
        raise PrgeError(
            f"task data file not found: {path}",
            "pass --data-root or set PRGE_DATA to the folder that holds sst2/ and rte_glue/",
        )
    return path


def read_tsv(path: Path, columns: list[str], header: bool) -> list[tuple[int, list[str]]]:
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


def tsv_label(path: Path, lineno: int, value: str, mapping: dict[str, int]) -> int:
    value = value.strip()
    if value not in mapping:
        raise PrgeError(f"{path}:{lineno}: unknown label {value!r}, expected one of {', '.join(mapping)}",
                        "fix the label column")
    return mapping[value]


def fill(template: str, **fields: str) -> str:
    # str.replace, not str.format: the text itself may contain braces
    for k, v in fields.items():
        template = template.replace("{" + k + "}", v)
    return template


Row = tuple[str, dict]

BOOL = {"false": 0, "true": 1, "0": 0, "1": 1, False: 0, True: 1}


def label_of(row: dict, key: str, where: str, names: dict) -> int:
    """The class index of row[key]: a bool, an int, or a name, looked up in `names`."""
    if key not in row or row[key] is None:
        raise PrgeError(f"{where}: missing field {key!r}", "fix or remove the malformed row")
    value = row[key]
    look = value.strip().lower() if isinstance(value, str) else value
    if not isinstance(value, (str, int)) or look not in names:  # bool is an int
        shown = ", ".join(dict.fromkeys(str(k) for k in names))
        raise PrgeError(f"{where}: unknown label {value!r} in field {key!r}, expected one of {shown}", "fix the label")
    return names[look]


def convert_rows(convert: Callable[[str, dict], Example], rows: list[Row]) -> list[Example]:
    return [convert(where, row) for where, row in rows]


def jsonl_examples(root: Path, rel: str, convert) -> list[Example]:
    return convert_rows(convert, read_jsonl(local_file(root, rel)))


def hub_pools(convert, path: str, name: str | None, test_split: str = "validation") -> dict[str, list[Example]]:
    """MeZO's layout on the hub: train pool = the train split, test = the labelled validation split."""
    return {"train": convert_rows(convert, hub_split(path, name, "train")), "test": convert_rows(convert, hub_split(path, name, test_split))}



def classify(template: str, words: list[str], label: int, where: str, **fields: str) -> Example:
    return Example(fill(template, **fields), words[label], label, where, fields=dict(fields))


def text(row: dict, name: str, where: str) -> str:
    return field(row, name, where).strip()


def option(value, name: str, where: str) -> str:
    """One option of a multiple-choice item: a missing or empty option is an error, never skipped."""
    if not isinstance(value, str) or not value.strip():
        raise PrgeError(f"{where}: multiple-choice option {name!r} is missing or empty ({value!r})",
                        "every item needs all of its options; fix or remove the row")
    return value.strip()


def choice_example(options: list[tuple[str, str]], gold: int, where: str) -> Example:
    prompt, answer = options[gold]
    return Example(prompt, answer, gold, where, add_eos=False, choices=options)
