"""Labels as users write them: a row's label may be its label word ("A", "positive"); ambiguous cases are errors."""

import json

import pytest

from prge.config import TrainConfig
from prge.data.userdata import load_user_file
from prge.errors import PrgeError
from prge.run.train import load_data


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_letter_labels_equal_to_the_label_words(tmp_path):
    rows = [{"text": f"q{i}", "label": y} for i, y in enumerate("ABCDCA")]
    examples, info = load_user_file(write(tmp_path / "d.jsonl", rows), label_words=["A", "B", "C", "D"])
    assert [e.label for e in examples] == [0, 1, 2, 3, 2, 0]
    assert [e.answer for e in examples] == [" A", " B", " C", " D", " C", " A"]
    assert info["label_words"] == [" A", " B", " C", " D"]


@pytest.mark.parametrize("ext", ["jsonl", "csv"])
def test_word_labels_in_csv_and_jsonl(tmp_path, ext):
    rows = [("loved it", "positive"), ("hated it", "negative"), ("fine", " positive")]
    path = tmp_path / f"d.{ext}"
    if ext == "csv":
        path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in rows), encoding="utf-8")
    else:
        write(path, [{"text": t, "label": y} for t, y in rows])
    examples, _ = load_user_file(path, label_words=["negative", "positive"])
    assert [e.label for e in examples] == [1, 0, 1]


def test_index_names_and_words_mix_in_one_file(tmp_path):
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": "great"}, {"text": "c", "label": "1"}]
    examples, _ = load_user_file(write(tmp_path / "d.jsonl", rows), label_words=["terrible", "great"])
    assert [e.label for e in examples] == [0, 1, 1]


def test_a_dict_still_takes_its_names_and_also_its_words(tmp_path):
    rows = [{"text": "a", "label": "pos"}, {"text": "b", "label": "bad"}]
    examples, _ = load_user_file(write(tmp_path / "d.jsonl", rows), label_words={"neg": "bad", "pos": "good"})
    assert [e.label for e in examples] == [1, 0]


def test_a_digit_word_that_is_another_class_index_is_ambiguous(tmp_path):
    # words "1", "0": label "1" is index 1 (word "0") and the word of class 0
    path = write(tmp_path / "d.jsonl", [{"text": "a", "label": "1"}])
    with pytest.raises(PrgeError, match=r"d.jsonl:1: label '1' is ambiguous.*name=word pairs"):
        load_user_file(path, label_words=["1", "0"])


def test_a_dict_name_that_is_another_class_word_is_ambiguous(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"text": "a", "label": "yes"}])
    with pytest.raises(PrgeError, match="ambiguous"):
        load_user_file(path, label_words={"yes": "no", "no": "yes"})


def test_the_same_word_for_two_classes_is_refused(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"text": "a", "label": "A"}])
    with pytest.raises(PrgeError, match=r"label words \['A'\] are given for more than one class"):
        load_user_file(path, label_words=["A", " A", "B"])


def test_digit_words_matching_their_own_index_are_fine(tmp_path):
    rows = [{"text": "a", "label": "0"}, {"text": "b", "label": 1}]
    examples, _ = load_user_file(write(tmp_path / "d.jsonl", rows), label_words=["0", "1"])
    assert [e.label for e in examples] == [0, 1]


def test_unknown_label_lists_the_words_too(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"text": "a", "label": "E"}])
    with pytest.raises(PrgeError, match=r"unknown label 'E', expected one of 0, 1, A, B"):
        load_user_file(path, label_words=["A", "B"])


def test_cli_label_words_mixing_pairs_and_words_is_refused(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"text": "a", "label": "A"}] * 3)
    cfg = TrainConfig(train_file=str(path), label_words=["x=A", "B"])
    with pytest.raises(PrgeError, match="mixes name=word pairs and plain words"):
        load_data(cfg, None)


def test_cli_label_words_naming_a_label_twice_is_refused(tmp_path):
    path = write(tmp_path / "d.jsonl", [{"text": "a", "label": "x"}] * 3)
    cfg = TrainConfig(train_file=str(path), label_words=["x=A", "x=B"])
    with pytest.raises(PrgeError, match="names a label twice"):
        load_data(cfg, None)
