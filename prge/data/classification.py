"""Built-in classification tasks: a prompt, then one label word scored at the answer position."""

from __future__ import annotations

from pathlib import Path

from prge.data.batch import Example
from prge.data.rows import (BOOL, Row, classify, convert_rows, data_file, fill, hub_pools, jsonl_examples, label_of, read_tsv,
                            text, tsv_label)
from prge.data.sources import first_available, local_file, olmo_split, read_jsonl
from prge.errors import PrgeError

# ---------------------------------------------------------------------------------------------
# SST-2

SST2_TEMPLATE = "Movie review: {sentence}\nThe sentiment of this movie review is"
EARLIER_SST2_TEMPLATE = "Review: {sentence}\nSentiment:"  # the default until 2026-12-01: part 3's SST-2 tables
SST2_WORDS = [" negative", " positive"]
PAPER_SST2_TEMPLATE, PAPER_SST2_WORDS = "{sentence} It was", [" terrible", " great"]  # MeZO's / the paper's


def _sst2_rows(path: Path) -> list[Example]:
    out = []
    for lineno, (sentence, label) in read_tsv(path, ["sentence", "label"], header=True):
        y = tsv_label(path, lineno, label, {"0": 0, "1": 1})
        sentence = sentence.strip()
        if not sentence:
            raise PrgeError(f"{path}:{lineno}: empty sentence", "fix or remove the row")
        out.append(Example(fill(SST2_TEMPLATE, sentence=sentence), SST2_WORDS[y], y, f"{path}:{lineno}",
                           fields={"sentence": sentence}))
    return out


# The words a whole GLUE sentence ends with (tokenised: "... journey ."). SST-2's test rows (GLUE dev)
# are whole sentences (97.6% end so, median 19 words); its train and dev pools are GLUE train, mostly
# phrase-level rows ("well-conceived", median 7 words, 19% end so).
SENTENCE_ENDS = frozenset({".", "!", "?", "...", "'"})


def whole_sentence(sentence: str) -> bool:
    words = sentence.split()
    return bool(words) and words[-1] in SENTENCE_ENDS


def load_sst2(root: Path) -> dict[str, list[Example]]:
    """Train on every row of the train pool; select (dev) on the dev pool's whole sentences only
    (1,300 of 6,735 rows), so that dev measures what test measures: on phrase-level dev rows a
    readout's dev gains of +1.0 to +2.6 points came with test losses of 0.2 to 1.0 (docs/optimiser.md,
    section 7), and the best-dev checkpoint was chosen on a distribution test never shows."""
    return {
        "train": _sst2_rows(data_file(root, "sst2/train.tsv")),
        "dev": [e for e in _sst2_rows(data_file(root, "sst2/dev.tsv")) if whole_sentence(e.fields["sentence"])],
        "test": _sst2_rows(data_file(root, "sst2/test.tsv")),
    }


# ---------------------------------------------------------------------------------------------
# RTE

RTE_TEMPLATE = '{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?'
RTE_WORDS = [" Yes", " No"]
RTE_COLUMNS = ["index", "sentence1", "sentence2", "label"]


def _rte_rows(path: Path, header: bool) -> list[Example]:
    out = []
    for lineno, (_, premise, hypothesis, label) in read_tsv(path, RTE_COLUMNS, header=header):
        y = tsv_label(path, lineno, label, {"entailment": 0, "not_entailment": 1})
        fields = {"premise": premise.strip(), "hypothesis": hypothesis.strip()}
        out.append(Example(fill(RTE_TEMPLATE, **fields), RTE_WORDS[y], y, f"{path}:{lineno}", fields=fields))
    return out


def load_rte(root: Path) -> dict[str, list[Example]]:
    train = _rte_rows(data_file(root, "rte_glue/train.tsv"), header=True)
    train += _rte_rows(data_file(root, "rte_glue/val.tsv"), header=False)  # val.tsv has no header row
    return {"train": train, "test": _rte_rows(data_file(root, "rte_glue/dev.tsv"), header=True)}


# ---------------------------------------------------------------------------------------------
# BoolQ, CB, WSC, WiC, MultiRC (SuperGLUE)

BOOLQ_TEMPLATE = "{passage} {question}?"
BOOLQ_WORDS = [" No", " Yes"]


def _boolq(where: str, row: dict) -> Example:
    y = label_of(row, "label" if "label" in row else "answer", where, BOOL)  # SuperGLUE: label; HF boolq: answer
    return classify(BOOLQ_TEMPLATE, BOOLQ_WORDS, y, where, passage=text(row, "passage", where),
                     question=text(row, "question", where).rstrip("?"))


def load_boolq(root: Path) -> dict[str, list[Example]]:
    return first_available("boolq", [
        lambda: {"train": jsonl_examples(root, "fewglue/BoolQ/val.jsonl", _boolq)},  # the official 3,270 validation rows: carve
        lambda: {"train": convert_rows(_boolq, olmo_split("boolq/none"))},
        lambda: hub_pools(_boolq, "super_glue", "boolq"),
    ])


CB_TEMPLATE = 'Suppose {premise} Can we infer that "{hypothesis}"? Yes, No, or Maybe?'
CB_WORDS = [" Yes", " No", " Maybe"]
CB_LABELS = {"entailment": 0, "contradiction": 1, "neutral": 2, 0: 0, 1: 1, 2: 2}  # HF's integer coding is the same


def _cb(where: str, row: dict) -> Example:
    return classify(CB_TEMPLATE, CB_WORDS, label_of(row, "label", where, CB_LABELS), where,
                     premise=text(row, "premise", where), hypothesis=text(row, "hypothesis", where))


def _fewglue(root: Path, task: str, convert) -> dict[str, list[Example]]:
    """FewGLUE: 32 train rows and 32 dev rows (both from the official train set), the official validation as test."""
    return {"train": jsonl_examples(root, f"fewglue/{task}/train.jsonl", convert),
            "dev": jsonl_examples(root, f"fewglue/{task}/dev32.jsonl", convert),
            "test": jsonl_examples(root, f"fewglue/{task}/val.jsonl", convert)}


def load_cb(root: Path) -> dict[str, list[Example]]:
    return first_available("cb", [
        lambda: _fewglue(root, "CB", _cb),
        lambda: {"train": convert_rows(_cb, olmo_split("super_glue/cb"))},
        lambda: hub_pools(_cb, "super_glue", "cb"),
    ])


WSC_TEMPLATE = '{text}\nIn the previous sentence, does the pronoun "{span2}" refer to {span1}? Yes or No?'
WSC_WORDS = [" No", " Yes"]


def _wsc(where: str, row: dict) -> Example:
    spans = row["target"] if isinstance(row.get("target"), dict) else row  # SuperGLUE jsonl nests them; HF does not
    return classify(WSC_TEMPLATE, WSC_WORDS, label_of(row, "label", where, BOOL), where, text=text(row, "text", where),
                     span1=text(spans, "span1_text", where), span2=text(spans, "span2_text", where))


def load_wsc(root: Path) -> dict[str, list[Example]]:
    return first_available("wsc", [
        lambda: _fewglue(root, "WSC", _wsc),
        lambda: hub_pools(_wsc, "super_glue", "wsc.fixed"),
    ])


WIC_TEMPLATE = 'Does the word "{word}" have the same meaning in these two sentences? Yes, No?\n{sentence1}\n{sentence2}\n'
WIC_WORDS = ["No", "Yes"]  # after the newline: no leading space


def _wic(where: str, row: dict) -> Example:
    return classify(WIC_TEMPLATE, WIC_WORDS, label_of(row, "label", where, BOOL), where, word=text(row, "word", where),
                     sentence1=text(row, "sentence1", where), sentence2=text(row, "sentence2", where))


def load_wic(root: Path) -> dict[str, list[Example]]:
    return first_available("wic", [
        lambda: {"train": jsonl_examples(root, "wic/train.jsonl", _wic), "test": jsonl_examples(root, "wic/val.jsonl", _wic)},
        lambda: hub_pools(_wic, "super_glue", "wic"),
    ])


MULTIRC_TEMPLATE = '{paragraph}\nQuestion: {question}\nI found this answer "{answer}". Is that correct? Yes or No?'
MULTIRC_WORDS = [" No", " Yes"]


def _multirc(where: str, row: dict) -> Example:
    return classify(MULTIRC_TEMPLATE, MULTIRC_WORDS, label_of(row, "label", where, BOOL), where,
                     paragraph=text(row, "paragraph", where), question=text(row, "question", where),
                     answer=text(row, "answer", where))


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
        return {split: convert_rows(_multirc, _multirc_flat(read_jsonl(local_file(root, f"fewglue/MultiRC/{name}.jsonl"))))
                for split, name in (("train", "train"), ("dev", "dev32"), ("test", "val"))}

    return first_available("multirc", [fewglue, lambda: hub_pools(_multirc, "super_glue", "multirc")])


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
        return classify(template, words, label_of(row, label_key, where, names), where,
                         **{a: text(row, a, where), b: text(row, b, where)})

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
        attempts = [lambda: glue_tsv(root, task, *GLUE_TSV[task])]
        if task == "mrpc":
            attempts.append(lambda: {"train": convert_rows(CONVERTERS[task], olmo_split("glue/mrpc"))})
        attempts.append(lambda: hub_pools(CONVERTERS[task], "glue", task))
        return first_available(task, attempts)

    return load


def glue_tsv(root: Path, task: str, columns: list[str], keys: list[str]) -> dict[str, list[Example]]:
    """GLUE's own train.tsv / dev.tsv under <root>/<task>/ (dev = the labelled GLUE dev set = test)."""
    convert = CONVERTERS[task]
    pools = {}
    for split, rel in (("train", f"{task}/train.tsv"), ("test", f"{task}/dev.tsv")):
        path = local_file(root, rel)
        pools[split] = [convert(f"{path}:{n}", dict(zip(keys, fields))) for n, fields in read_tsv(path, columns, header=True)]
    return pools
