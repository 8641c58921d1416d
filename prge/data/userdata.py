"""The user's own data: JSONL or CSV/TSV files in one of three row formats, turned into `Example`s.

File types, by extension: `.jsonl` / `.json` hold one JSON object per line (JSON Lines; blank lines
are skipped); `.csv` and `.tsv` have a header row naming the columns.

Row formats, detected from the first row's keys unless `fmt` names one:

- `completion`: `{"prompt": ..., "completion": ...}`. The model learns the completion after the
  prompt; the text is used exactly as written (put a leading space in the completion if the
  tokenizer expects one).
- `chat`: `{"messages": [{"role": ..., "content": ...}, ...]}`, JSONL only. The conversation is
  rendered with the tokenizer's chat template: the prompt is every message but the last with the
  generation prompt added (`add_generation_prompt=True`), the answer is what the full rendering
  adds after that prompt (the last message and the template's end-of-turn text). The last message
  must be the assistant's.
- `classification`: `{"text": ..., "label": ...}` with a `template` containing `{text}` (default
  `"{text}"`) and `label_words`, either a list (label index -> word) or a dict {label name: word}
  (label index = position in the dict). A row's label may be a label name (a dict key, or "0",
  "1", ... for a list), the label word itself as written ("A" with words A B C D, "positive" with
  words negative positive), an integer index, or a JSON boolean (false = 0, true = 1); a label that
  is the name of one class and the word of another is refused as ambiguous. A word without a
  leading space gets one (" great", not "great"): the word is scored as the token that follows the
  prompt, and most tokenizers fold the space into that token.

Every problem is a `PrgeError` naming `file:line`.

Without an eval file, `load_user_data` holds out `round(eval_fraction * N)` rows (at least one when
eval_fraction > 0) of the N train rows as dev, drawn with `prge.data.sampling.seeded_sample(rows, n, seed)`;
train is the remaining rows in file order.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from prge.data.batch import Example
from prge.errors import PrgeError
from prge.io import read_jsonl, text_lines
from prge.data.sampling import seeded_sample

FORMATS = ("completion", "chat", "classification")
_FIELDS = {"completion": ("prompt", "completion"), "chat": ("messages",), "classification": ("text", "label")}
_FORMAT_HELP = 'use {"prompt", "completion"}, {"messages"} or {"text", "label"} keys'


def _read_table(path: Path, delimiter: str) -> list[tuple[int, dict]]:
    """Rows of a CSV/TSV file with a header; the line number is where the row starts."""
    rows = []
    text = "".join(text_lines(path))
    with io.StringIO(text, newline="") as f:
        reader = csv.reader(f, delimiter=delimiter, strict=True)
        header = None
        end = 0  # reader.line_num after the previous row: a row starts on the line after it
        for row in _csv_rows(reader, path):
            lineno, end = end + 1, reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = [c.strip() for c in row]
                continue
            if len(row) != len(header):
                raise PrgeError(f"{path}:{lineno}: expected {len(header)} columns ({', '.join(header)}), found {len(row)}",
                                "fix the row; quote fields that contain the delimiter")
            rows.append((lineno, dict(zip(header, row))))
    return rows


def _csv_rows(reader, path: Path):
    """The reader's rows; a quoting error (an unterminated quote, a quote inside a field) names file:line."""
    while True:
        try:
            yield next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise PrgeError(f"{path}:{reader.line_num}: malformed CSV ({e})",
                            'quote fields that contain the delimiter, a quote (write it as "") or a line break') from None


def _read_rows(path: Path) -> list[tuple[int, dict]]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return read_jsonl(path)
    if suffix in (".csv", ".tsv"):
        return _read_table(path, "," if suffix == ".csv" else "\t")
    raise PrgeError(f"{path}: unknown file type {suffix or '(no extension)'!r}", "use a .jsonl, .json, .csv or .tsv file")


def _detect(keys, where: str) -> str:
    if "messages" in keys:
        return "chat"
    if "prompt" in keys and "completion" in keys:
        return "completion"
    if "text" in keys and "label" in keys:
        return "classification"
    raise PrgeError(f"{where}: cannot tell the format from the keys {sorted(keys)}", _FORMAT_HELP)


def normalize_label_words(label_words) -> tuple[list[str], list[str]]:
    """(label names, words with a leading space) from a list (index -> word) or a dict {name: word}."""
    if isinstance(label_words, dict):
        names, words = [str(k) for k in label_words], list(label_words.values())
    elif isinstance(label_words, (list, tuple)):
        names, words = [str(i) for i in range(len(label_words))], list(label_words)
    else:
        raise PrgeError(f"label words must be a list or a dict, got {type(label_words).__name__}",
                        'pass e.g. [" terrible", " great"] or {"negative": " terrible", "positive": " great"}')
    if len(words) < 2:
        raise PrgeError(f"classification needs at least 2 label words, got {len(words)}", "give one word per class")
    for w in words:
        if not isinstance(w, str) or not w.strip():
            raise PrgeError(f"label word {w!r} is not a non-empty string", "give one word per class")
    plain = [w.strip() for w in words]
    twice = sorted({w for w in plain if plain.count(w) > 1})
    if twice:
        raise PrgeError(f"the label words {twice} are given for more than one class (the classes could not be told apart)",
                        "give a different word to each class")
    return names, [w if w.startswith(" ") else " " + w for w in words]


def _string(obj: dict, key: str, where: str, allow_empty: bool = False) -> str:
    if key not in obj:
        raise PrgeError(f"{where}: missing field {key!r}", f"every row needs the same fields as the first ({_FORMAT_HELP})")
    value = obj[key]
    if not isinstance(value, str):
        raise PrgeError(f"{where}: field {key!r} must be a string, found {type(value).__name__}", "quote the value")
    if not allow_empty and not value.strip():
        raise PrgeError(f"{where}: field {key!r} is empty", "fill it in or remove the row")
    return value


def _label_index(value, names: list[str], words: list[str], where: str) -> int:
    """The class index of a row's label: a label name (a dict key, or "0", "1", ... for a list), the
    label word itself as users write it ("A" for the word " A", "positive" for " positive"), an
    integer index, or a JSON boolean. A label that names one class and is the word of another is refused."""
    if isinstance(value, bool):
        value = int(value)
    if not isinstance(value, (int, str)):
        raise PrgeError(f"{where}: label must be a string or an integer, found {type(value).__name__}", "fix the label")
    key = str(value).strip()
    by_name = names.index(key) if key in names else None
    if by_name is None and isinstance(value, int) and 0 <= value < len(names):  # an index into a dict's labels
        by_name = value
    by_word = [i for i, w in enumerate(words) if w.strip() == key] if isinstance(value, str) else []
    if by_name is not None and by_word and by_word != [by_name]:
        raise PrgeError(f"{where}: label {value!r} is ambiguous: it is the name of class {by_name} (word {words[by_name].strip()!r}) "
                        f"and the label word of class {by_word[0]}",
                        "pass name=word pairs, e.g. --label-words " + " ".join(f"{n}={w.strip()}" for n, w in zip(names, words)))
    if by_name is not None:
        return by_name
    if by_word:
        return by_word[0]
    raise PrgeError(f"{where}: unknown label {value!r}, expected one of {', '.join(_expected(names, words))}",
                    "fix the label or the label words")


def _expected(names: list[str], words: list[str]) -> list[str]:
    plain = [w.strip() for w in words]
    return names + [w for w in plain if w not in names]


def _chat(obj: dict, where: str, tokenizer) -> tuple[str, str]:
    if "messages" not in obj:
        raise PrgeError(f"{where}: missing field 'messages'", f"every row needs the same fields as the first ({_FORMAT_HELP})")
    messages = obj["messages"]
    if not isinstance(messages, list) or len(messages) < 2:
        raise PrgeError(f"{where}: 'messages' must be a list of at least 2 messages", "end each conversation with the assistant's reply")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise PrgeError(f"{where}: each message needs 'role' and 'content'", 'write {"role": "user", "content": "..."}')
        if not isinstance(m["role"], str) or not isinstance(m["content"], str):
            raise PrgeError(f"{where}: a message's 'role' and 'content' must be strings", "quote the values")
    if messages[-1]["role"] != "assistant":
        raise PrgeError(f"{where}: the last message is from {messages[-1]['role']!r}, not the assistant",
                        "end each conversation with the assistant's reply, the text the model learns")
    if not messages[-1]["content"].strip():
        raise PrgeError(f"{where}: the assistant's reply is empty", "fill it in or remove the row")
    try:
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # jinja errors from the template itself (e.g. "roles must alternate")
        raise PrgeError(f"{where}: the chat template rejected this conversation: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                        "fix the conversation's roles or use the prompt/completion format") from None
    if not full.startswith(prompt):
        raise PrgeError(f"{where}: the chat template's rendering of the conversation does not start with its rendering of the prompt",
                        "use the prompt/completion format for this model")
    if not full[len(prompt):].strip():
        raise PrgeError(f"{where}: the chat template rendered no text for the assistant's reply",
                        "use the prompt/completion format for this model")
    return prompt, full[len(prompt):]


def load_user_file(path, fmt: str = "auto", template: str | None = None, label_words=None, tokenizer=None) -> tuple[list[Example], dict]:
    """Examples from one file, and {"format": ..., "label_words": [...] or None}.

    Classification rows become Example(prompt=template with the text, answer=the label word,
    label=its index); the other formats have label -1.
    """
    path = Path(path)
    if not path.is_file():
        raise PrgeError(f"data file not found: {path}", "check the path")
    rows = _read_rows(path)
    if not rows:
        raise PrgeError(f"{path}: no rows", "the file is empty; add rows or check the path")
    if fmt == "auto":
        fmt = _detect(rows[0][1].keys(), f"{path}:{rows[0][0]}")
    elif fmt not in FORMATS:
        raise PrgeError(f"unknown data format {fmt!r}", f"choose auto or one of: {', '.join(FORMATS)}")

    names = words = None
    if fmt == "classification":
        if label_words is None:
            raise PrgeError(f"{path}: text/label rows need label words", 'pass label words, e.g. --label-words " terrible" " great"')
        names, words = normalize_label_words(label_words)
        template = "{text}" if template is None else template
        if "{text}" not in template:
            raise PrgeError(f"the template {template!r} has no {{text}} placeholder", 'write e.g. "{text} It was"')
    elif fmt == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise PrgeError(f"{path}: chat rows need a tokenizer with a chat template",
                            "use a chat model (one whose tokenizer has a chat template) or the prompt/completion format")
        if path.suffix.lower() in (".csv", ".tsv"):
            raise PrgeError(f"{path}: the chat format needs JSONL", "write the conversations as one JSON object per line")

    examples = []
    for lineno, obj in rows:
        where = f"{path}:{lineno}"
        if fmt == "completion":
            ex = Example(_string(obj, "prompt", where), _string(obj, "completion", where), -1, where)
        elif fmt == "chat":
            prompt, answer = _chat(obj, where, tokenizer)
            ex = Example(prompt, answer, -1, where, add_eos=False)  # the template already ends the turn
        else:
            text = _string(obj, "text", where)
            if "label" not in obj:
                raise PrgeError(f"{where}: missing field 'label'", f"every row needs the same fields as the first ({_FORMAT_HELP})")
            y = _label_index(obj["label"], names, words, where)
            ex = Example(template.replace("{text}", text), words[y], y, where)
        examples.append(ex)
    return examples, {"format": fmt, "label_words": words}


def load_user_data(
    train_path,
    eval_path=None,
    seed: int = 0,
    eval_fraction: float = 0.1,
    fmt: str = "auto",
    template: str | None = None,
    label_words=None,
    tokenizer=None,
) -> tuple[list[Example], list[Example], dict]:
    """(train, dev, info) from the user's files (info as `load_user_file` gives it); without `eval_path`, dev is a seeded held-out part of train."""
    kw = dict(fmt=fmt, template=template, label_words=label_words, tokenizer=tokenizer)
    train, info = load_user_file(train_path, **kw)
    if eval_path is not None:
        dev, dev_info = load_user_file(eval_path, **kw)
        if dev_info["format"] != info["format"]:
            raise PrgeError(f"{eval_path} has {dev_info['format']} rows but {train_path} has {info['format']} rows",
                            "use the same format for the train and eval files")
        return train, dev, info
    if not 0 <= eval_fraction < 1:
        raise PrgeError(f"eval fraction {eval_fraction} is not in [0, 1)", "pass a fraction such as 0.1, or an eval file")
    n_dev = round(eval_fraction * len(train))
    if eval_fraction > 0:
        n_dev = max(n_dev, 1)
        if n_dev >= len(train):
            raise PrgeError(f"{train_path}: {len(train)} rows are too few to hold out {eval_fraction:.0%} for evaluation",
                            "add rows, pass an eval file, or set the eval fraction to 0")
    dev, train = seeded_sample(train, n_dev, seed, what="eval rows")
    return train, dev, info
