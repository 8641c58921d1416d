"""Built-in tasks on the real shared data: exact prompts, label mapping, split rules, errors."""

from collections import Counter
from pathlib import Path

import pytest

from prge.errors import PrgeError
from prge.data.sampling import seeded_sample
from prge.data.tasks import TASKS, get_task, load_task, resolve_data_root

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def sst2():
    return load_task("sst2", data_root=DATA, seed=0)


@pytest.fixture(scope="module")
def rte():
    return load_task("rte", data_root=DATA, seed=0)


def by_source(examples):
    return {e.source: e for e in examples}


def test_sst2_known_rows(sst2):
    test = by_source(sst2.test)
    first = test[f"{DATA / 'sst2' / 'test.tsv'}:2"]
    assert first.prompt == "Movie review: it 's a charming and often affecting journey .\nThe sentiment of this movie review is"
    assert (first.answer, first.label) == (" positive", 1)
    second = test[f"{DATA / 'sst2' / 'test.tsv'}:3"]
    assert second.prompt == "Movie review: unflinchingly bleak and desperate\nThe sentiment of this movie review is"
    assert (second.answer, second.label) == (" negative", 0)
    assert sst2.task.label_words == [" negative", " positive"]
    assert all(not e.prompt.endswith(" ") and e.answer == sst2.task.label_words[e.label] for e in sst2.train + sst2.dev + sst2.test)


def test_rte_known_rows(rte):
    test = by_source(rte.test)
    no = test[f"{DATA / 'rte_glue' / 'dev.tsv'}:2"]
    assert no.prompt == (
        "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, according to the "
        "Christopher Reeve Foundation.\nDoes this mean that \"Christopher Reeve had an accident.\" is true? Yes or No?"
    )
    assert (no.answer, no.label) == (" No", 1)  # not_entailment
    yes = test[f"{DATA / 'rte_glue' / 'dev.tsv'}:3"]
    assert yes.prompt.endswith('\nDoes this mean that "Bacteria is winning the war against antibiotics." is true? Yes or No?')
    assert (yes.answer, yes.label) == (" Yes", 0)  # entailment


def test_rte_train_pool_includes_headerless_val():
    pool = get_task("rte").load(DATA)
    assert len(pool["train"]) == 2490 and "dev" not in pool
    row = by_source(pool["train"])[f"{DATA / 'rte_glue' / 'val.tsv'}:1"]  # val.tsv has no header: line 1 is data
    assert row.prompt.startswith("Herceptin was already approved") and row.label == 0


def test_split_sizes(sst2, rte):
    assert (len(sst2.train), len(sst2.dev), len(sst2.test)) == (1000, 500, 872)
    assert (len(rte.train), len(rte.dev), len(rte.test)) == (1000, 500, 277)
    small = load_task("rte", data_root=DATA, n_train=16, n_dev=8, n_test=50)
    assert (len(small.train), len(small.dev), len(small.test)) == (16, 8, 50)
    assert len(load_task("rte", data_root=DATA, n_test=10_000).test) == 277  # n_test only caps


def test_train_is_class_balanced(sst2, rte):
    assert Counter(e.label for e in sst2.train) == {0: 500, 1: 500}
    assert Counter(e.label for e in rte.train) == {0: 500, 1: 500}
    odd = load_task("rte", data_root=DATA, n_train=7, n_dev=0)
    assert Counter(e.label for e in odd.train) == {0: 4, 1: 3}
    assert [e.label for e in sst2.train[:20]] != sorted(e.label for e in sst2.train[:20])  # shuffled, not grouped


def test_same_seed_same_splits_other_seed_differs(rte):
    again = load_task("rte", data_root=DATA, seed=0)
    other = load_task("rte", data_root=DATA, seed=1)
    src = lambda xs: [e.source for e in xs]  # noqa: E731
    assert src(again.train) == src(rte.train) and src(again.dev) == src(rte.dev)
    assert set(src(other.train)) != set(src(rte.train)) and set(src(other.dev)) != set(src(rte.dev))
    assert src(other.test) == src(rte.test)  # test is the whole file, in file order, whatever the seed


def test_sst2_dev_holds_no_phrase_the_run_trains_on(sst2):
    """SST-2's train pool cuts GLUE train's sentences into phrases and its dev pool is GLUE train too: no dev
    sentence may contain a training row of >= 3 tokens (before the rule 8.6-10.4% did), while dev keeps its size."""
    from prge.data.batch import Example
    from prge.data.tasks import without_train_phrases

    train = [f" {e.fields['sentence']} " for e in sst2.train if len(e.fields["sentence"].split()) >= 3]
    assert len(train) > 300 and len(sst2.dev) == 500
    assert not any(t in f" {e.fields['sentence']} " for e in sst2.dev for t in train)
    pool = get_task("sst2").load(DATA)["dev"]
    kept = without_train_phrases(pool, sst2.train, "sentence")
    assert 0.8 * len(pool) < len(kept) < 0.95 * len(pool)  # the rule removes the 8-10% that overlap, not more
    # token boundaries, and only rows of >= 3 tokens count
    row = lambda text: Example("p", " positive", 1, fields={"sentence": text})  # noqa: E731
    dev = [row("a good filmmaker at work ."), row("a good film at work ."), row("truly great .")]
    trained = [row("good film at"), row("truly great")]
    assert [e.fields["sentence"] for e in without_train_phrases(dev, trained, "sentence")] == ["a good filmmaker at work .", "truly great ."]


def test_sst2_other_seed_differs(sst2):
    other = load_task("sst2", data_root=DATA, seed=1, n_test=100)
    assert {e.source for e in other.train} != {e.source for e in sst2.train}
    assert {e.source for e in other.dev} != {e.source for e in sst2.dev}
    assert all("sst2/train.tsv" in e.source for e in sst2.train) and all("sst2/dev.tsv" in e.source for e in sst2.dev)


def test_sst2_dev_rows_are_whole_sentences_like_test(sst2):
    """SST-2 selects on whole sentences, as its test rows are; its train pool keeps the phrases."""
    from prge.data.classification import whole_sentence

    assert all(whole_sentence(e.fields["sentence"]) for e in sst2.dev)
    assert sum(whole_sentence(e.fields["sentence"]) for e in sst2.test) / len(sst2.test) > 0.95
    assert sum(whole_sentence(e.fields["sentence"]) for e in sst2.train) / len(sst2.train) < 0.5
    assert not whole_sentence("well-conceived") and whole_sentence("a charming journey .") and not whole_sentence("")


def test_rte_dev_is_disjoint_from_train(rte):
    assert not {e.source for e in rte.train} & {e.source for e in rte.dev}
    assert all("rte_glue/dev.tsv" not in e.source for e in rte.train + rte.dev)


def test_asking_for_too_many_rows_is_an_error():
    with pytest.raises(PrgeError, match="only 490"):
        load_task("rte", data_root=DATA, n_train=2000, n_dev=500)


def test_seeded_sample_fills_a_short_class():
    items = [0] * 3 + [1] * 20
    picked, rest = seeded_sample(items, 10, seed=0, label_of=lambda x: x)
    assert Counter(picked) == {0: 3, 1: 7} and len(rest) == 13
    assert seeded_sample(list(range(50)), 5, seed=3) == seeded_sample(list(range(50)), 5, seed=3)


def test_unknown_task_lists_known_ones():
    with pytest.raises(PrgeError) as e:
        get_task("sst-3")
    assert "sst-3" in str(e.value) and all(name in str(e.value) for name in TASKS)


def test_missing_data_root(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(PrgeError) as e:
        load_task("sst2", data_root=missing)
    msg = str(e.value)
    assert str(missing / "sst2" / "train.tsv") in msg and "--data-root" in msg and "PRGE_DATA" in msg


def test_resolve_data_root_order(tmp_path, monkeypatch):
    monkeypatch.setenv("PRGE_DATA", str(tmp_path / "env"))
    assert resolve_data_root(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_root(None) == tmp_path / "env"
    monkeypatch.delenv("PRGE_DATA")
    monkeypatch.chdir(tmp_path)
    assert resolve_data_root(None) == tmp_path / ".." / "shared" / "data"


def write_sst2(root: Path, train_rows: str):
    (root / "sst2").mkdir(parents=True)
    for name in ("train", "dev", "test"):
        body = train_rows if name == "train" else "a fine film \t1\n"
        (root / "sst2" / f"{name}.tsv").write_text("sentence\tlabel\n" + body)


def test_malformed_rows_name_file_and_line(tmp_path):
    write_sst2(tmp_path / "cols", "good \t1\nbad row with no tab\n")
    with pytest.raises(PrgeError, match=r"sst2/train\.tsv:3: expected 2 tab-separated columns"):
        load_task("sst2", data_root=tmp_path / "cols")
    write_sst2(tmp_path / "label", "good \t1\nfine \tpositive\n")
    with pytest.raises(PrgeError, match=r"sst2/train\.tsv:3: unknown label 'positive', expected one of 0, 1"):
        load_task("sst2", data_root=tmp_path / "label")
    rte = tmp_path / "rte" / "rte_glue"
    rte.mkdir(parents=True)
    header = "index\tsentence1\tsentence2\tlabel\n"
    (rte / "train.tsv").write_text(header + "0\tp\th\tentailment\n")
    (rte / "val.tsv").write_text("1\tp\th\tentailment\n2\tp\th\tmaybe\n")
    (rte / "dev.tsv").write_text(header + "0\tp\th\tentailment\n")
    with pytest.raises(PrgeError, match=r"rte_glue/val\.tsv:2: unknown label 'maybe'"):
        load_task("rte", data_root=tmp_path / "rte")


def test_template_override_refills_built_in_prompts(sst2, rte):
    from prge.data.classification import PAPER_SST2_TEMPLATE
    from prge.data.tasks import retemplate

    paper = retemplate(sst2.test[:2], PAPER_SST2_TEMPLATE, "sst2")
    assert paper[0].prompt == "it 's a charming and often affecting journey . It was"
    assert [x.label for x in paper] == [x.label for x in sst2.test[:2]]
    pair = retemplate(rte.test[:1], "{hypothesis} / {premise}", "rte")[0]
    assert pair.prompt == f"{rte.test[0].fields['hypothesis']} / {rte.test[0].fields['premise']}"


@pytest.mark.parametrize("template,match", [("{review} It was", "unknown: \\['review'\\]"), ("It was", "only the task's fields")])
def test_template_override_errors_name_the_fields(sst2, template, match):
    from prge.data.tasks import retemplate

    with pytest.raises(PrgeError, match=match) as e:
        retemplate(sst2.test[:1], template, "sst2")
    assert "{sentence}" in e.value.fix


def test_template_override_refused_for_multiple_choice():
    from prge.data.batch import Example
    from prge.data.tasks import retemplate

    with pytest.raises(PrgeError, match="only classification tasks"):
        retemplate([Example("p", " a", 0, "x", choices=[("p", " a"), ("p", " b")])], "{x}", "copa")


def test_train_config_template_and_words_give_the_papers_sst2():
    from prge.config import TrainConfig
    from prge.run.train import load_data

    cfg = TrainConfig(task="sst2", data_root=str(DATA), template="{sentence} It was", label_words=["terrible", "great"],
                      n_train=4, n_dev=2, n_test=2)
    name, kind, train, dev, test, words = load_data(cfg, tokenizer=None)
    assert words == [" terrible", " great"]
    assert all(x.prompt.endswith(" It was") and "Review:" not in x.prompt for x in train + dev + test)
