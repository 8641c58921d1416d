"""The user's own files: three row formats in JSONL and CSV, held-out dev, and every bad input."""

import csv
import re
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from prge.errors import PrgeError
from prge.data.userdata import load_user_data, load_user_file

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def chat_tokenizer():
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "<eos>": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="[UNK]")
    t.chat_template = CHAT_TEMPLATE
    return t


def sst2_rows(n):
    """The first n rows of the real SST-2 test file as (text, label) pairs."""
    lines = (DATA / "sst2" / "test.tsv").read_text(encoding="utf-8").splitlines()[1 : n + 1]
    return [(s.strip(), int(y)) for s, y in (line.split("\t") for line in lines)]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if path.suffix == ".tsv" else ",")
        w.writeheader()
        w.writerows(rows)
    return path


# --- the three formats -----------------------------------------------------------------------


@pytest.mark.parametrize("ext", ["jsonl", "csv", "tsv"])
def test_prompt_completion(tmp_path, ext):
    rows = [{"prompt": "Translate: chat", "completion": " cat"}, {"prompt": 'Quote, "comma"', "completion": " ok"}]
    path = (write_jsonl if ext == "jsonl" else write_csv)(tmp_path / f"d.{ext}", rows)
    examples, info = load_user_file(path)
    assert info == {"format": "completion", "label_words": None}
    assert [(e.prompt, e.answer, e.label) for e in examples] == [("Translate: chat", " cat", -1), ('Quote, "comma"', " ok", -1)]
    assert examples[1].source == f"{path}:{2 if ext == 'jsonl' else 3}"


@pytest.mark.parametrize("ext", ["jsonl", "csv"])
def test_text_label_with_real_sst2_rows(tmp_path, ext):
    rows = [{"text": s, "label": y} for s, y in sst2_rows(4)]
    path = (write_jsonl if ext == "jsonl" else write_csv)(tmp_path / f"d.{ext}", rows)
    examples, info = load_user_file(path, template="{text} It was", label_words=["terrible", " great"])
    assert info == {"format": "classification", "label_words": [" terrible", " great"]}  # leading space added
    assert examples[0].prompt == "it 's a charming and often affecting journey . It was"
    assert (examples[0].answer, examples[0].label) == (" great", 1)
    assert (examples[1].prompt, examples[1].answer, examples[1].label) == ("unflinchingly bleak and desperate It was", " terrible", 0)


@pytest.mark.parametrize("ext", ["jsonl", "csv"])
def test_text_label_names_from_a_dict(tmp_path, ext):
    rows = [{"text": "loved it", "label": "pos"}, {"text": "hated it", "label": "neg"}]
    path = (write_jsonl if ext == "jsonl" else write_csv)(tmp_path / f"d.{ext}", rows)
    examples, info = load_user_file(path, label_words={"neg": " bad", "pos": "good"})
    assert [(e.prompt, e.answer, e.label) for e in examples] == [("loved it", " good", 1), ("hated it", " bad", 0)]
    assert info["label_words"] == [" bad", " good"]


def test_text_label_int_and_bool_labels_index_a_dict(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": False}])
    examples, _ = load_user_file(path, label_words={"no": " No", "yes": " Yes"})
    assert [(e.answer, e.label) for e in examples] == [(" Yes", 1), (" No", 0)]


def test_chat(tmp_path, chat_tokenizer):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conv}, "", {"messages": conv[1:]}])
    examples, info = load_user_file(path, tokenizer=chat_tokenizer)
    assert info["format"] == "chat" and len(examples) == 2
    assert examples[0].prompt == "<|system|>Be brief.<eos>\n<|user|>Capital of France?<eos>\n<|assistant|>"
    assert examples[0].answer == "Paris.<eos>\n"
    assert examples[1].source == f"{path}:3"  # the blank line 2 is skipped, line numbers are kept


def test_blank_lines_are_skipped(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ["", {"prompt": "p", "completion": " c"}, "   ", {"prompt": "q", "completion": " d"}])
    examples, _ = load_user_file(path)
    assert [e.source.rsplit(":", 1)[1] for e in examples] == ["2", "4"]


# --- held-out dev ----------------------------------------------------------------------------


def test_held_out_dev_is_seeded(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "completion": f" c{i}"} for i in range(50)])
    train, dev, _ = load_user_data(path, seed=0, eval_fraction=0.1)
    assert (len(train), len(dev)) == (45, 5)
    assert not {e.prompt for e in train} & {e.prompt for e in dev}
    assert [e.prompt for e in train] == sorted((e.prompt for e in train), key=lambda p: int(p[1:]))  # file order
    again_train, again_dev, _ = load_user_data(path, seed=0, eval_fraction=0.1)
    assert [e.prompt for e in again_dev] == [e.prompt for e in dev]
    assert {e.prompt for e in load_user_data(path, seed=1)[1]} != {e.prompt for e in dev}
    assert len(load_user_data(path, eval_fraction=0.0)[1]) == 0


def test_eval_file(tmp_path):
    tr = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a", "completion": " b"}] * 3)
    ev = write_csv(tmp_path / "eval.csv", [{"prompt": "x", "completion": " y"}])
    train, dev, _ = load_user_data(tr, ev)
    assert (len(train), len(dev), dev[0].answer) == (3, 1, " y")
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": "x", "label": 0}])
    with pytest.raises(PrgeError, match="same format"):
        load_user_data(tr, other, label_words=[" a", " b"])


def test_too_few_rows_to_hold_out(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": " b"}])
    with pytest.raises(PrgeError, match="too few"):
        load_user_data(path)


# --- bad input: every error names the file and the line --------------------------------------

BAD_JSONL = [
    ("invalid_json", ['{"prompt": "a", "completion": " b"}', '{"prompt": "a", '], {}, 2, "invalid JSON"),
    ("json_array", ['[{"prompt": "a", "completion": " b"}]'], {}, 1, "expected a JSON object"),
    ("not_object", ['{"prompt": "a", "completion": " b"}', '"just text"'], {}, 2, "expected a JSON object"),
    ("missing_field", [{"prompt": "a", "completion": " b"}, {"prompt": "c"}], {}, 2, "missing field 'completion'"),
    ("empty_prompt", [{"prompt": "a", "completion": " b"}, "", {"prompt": "  ", "completion": " b"}], {}, 3, "'prompt' is empty"),
    ("empty_completion", [{"prompt": "a", "completion": ""}], {}, 1, "'completion' is empty"),
    ("non_string", [{"prompt": "a", "completion": 7}], {}, 1, "'completion' must be a string"),
    ("unknown_keys", [{"question": "a", "answer": "b"}], {}, 1, "cannot tell the format"),
    ("unknown_label", [{"text": "a", "label": 0}, {"text": "b", "label": "maybe"}], {"label_words": [" no", " yes"]}, 2,
     "unknown label 'maybe'"),
    ("label_out_of_range", [{"text": "a", "label": 5}], {"label_words": [" no", " yes"]}, 1, "unknown label 5"),
    ("missing_label", [{"text": "a", "label": 0}, {"text": "b"}], {"label_words": [" no", " yes"]}, 2, "missing field 'label'"),
    ("non_string_text", [{"text": ["a"], "label": 0}], {"label_words": [" no", " yes"]}, 1, "'text' must be a string"),
    ("chat_not_assistant_last", [{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "?"}]}], {}, 1,
     "not the assistant"),
    ("chat_non_string", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}]}], {}, 1,
     "must be strings"),
    ("chat_missing", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, {"prompt": "x"}], {},
     2, "missing field 'messages'"),
]


@pytest.mark.parametrize("rows,kwargs,line,msg", [c[1:] for c in BAD_JSONL], ids=[c[0] for c in BAD_JSONL])
def test_bad_jsonl(tmp_path, chat_tokenizer, rows, kwargs, line, msg):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(PrgeError) as e:
        load_user_file(path, tokenizer=chat_tokenizer, **kwargs)
    assert f"{path}:{line}:" in str(e.value) and msg in str(e.value)


def test_bad_csv_rows(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("prompt,completion\na, b\n\nc,d,extra\n", encoding="utf-8")
    with pytest.raises(PrgeError, match=rf"{re.escape(str(path))}:4: expected 2 columns"):
        load_user_file(path)
    path.write_text("text,label\nfine,1\nmeh,neutral\n", encoding="utf-8")
    with pytest.raises(PrgeError, match=rf"{re.escape(str(path))}:3: unknown label 'neutral'"):
        load_user_file(path, label_words=[" bad", " good"])
    path.write_text('prompt,completion\n"two\nlines", ok\nx,\n', encoding="utf-8")
    with pytest.raises(PrgeError, match=rf"{re.escape(str(path))}:4: field 'completion' is empty"):  # the quoted row spans lines 2-3
        load_user_file(path)


def test_classification_needs_label_words(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 0}])
    with pytest.raises(PrgeError, match=rf"{re.escape(str(path))}: text/label rows need label words"):
        load_user_file(path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
@pytest.mark.parametrize("ext", ["jsonl", "csv"])
def test_empty_file(tmp_path, content, ext):
    path = tmp_path / f"empty.{ext}"
    path.write_text(content)
    with pytest.raises(PrgeError, match=rf"{re.escape(str(path))}: no rows"):
        load_user_file(path)


def test_chat_needs_a_tokenizer_with_a_template(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}])
    with pytest.raises(PrgeError, match="chat template"):
        load_user_file(path)


def test_chat_prompt_not_a_prefix(tmp_path, chat_tokenizer):
    tok = chat_tokenizer.__class__(tokenizer_object=chat_tokenizer.backend_tokenizer, eos_token="<eos>")
    tok.chat_template = (  # the generation prompt differs from how the assistant turn is rendered
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}ASSISTANT>{% endif %}"
    )
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}])
    with pytest.raises(PrgeError, match=rf"{re.escape(str(path))}:1: .*does not start with"):
        load_user_file(path, tokenizer=tok)


def test_unknown_extension(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("hello\n")
    with pytest.raises(PrgeError, match="unknown file type"):
        load_user_file(path)
