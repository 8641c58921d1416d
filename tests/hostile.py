"""Generated bad inputs for every input path of the `prge` command, and the driver that checks each is
refused cleanly. Used by tests/test_fuzz.py (a small fixed budget) and benchmarks/fuzz_campaign.py (a
long one).

Every case is built to be wrong in at least one way (the defect it is named after), so the only
correct outcome is a refusal: `prge.cli.main(argv)` returns 2, stderr ends with one line starting
`error:`, no traceback is printed or raised, and nothing in the working folder is written,
changed or removed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import strategies as st

# ------------------------------------------------------------------------------------------------
# values


JUNK = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True, allow_infinity=True),
                 st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
NON_STRING = JUNK.filter(lambda v: not isinstance(v, str))
TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), min_size=1, max_size=20).filter(str.strip)
ROW_FIELDS = {"completion": ("prompt", "completion"), "classification": ("text", "label"), "chat": ("messages",)}


def good_row(kind: str, rnd: random.Random, text: str) -> dict:
    if kind == "completion":
        return {"prompt": text, "completion": " " + text}
    if kind == "classification":
        return {"text": text, "label": rnd.choice(["no", "yes", 0, 1, "0", True])}
    return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": text}]}


@st.composite
def data_file(draw) -> tuple[str, bytes, str]:
    """(suffix, bytes, defect) of a training/eval file with at least one defect."""
    kind = draw(st.sampled_from(sorted(ROW_FIELDS)))
    suffix = draw(st.sampled_from([".jsonl", ".json", ".csv", ".tsv"] if kind != "chat" else [".jsonl", ".json"]))
    rnd = random.Random(draw(st.integers(0, 2**32)))
    n = draw(st.integers(12, 30))
    rows = [good_row(kind, rnd, draw(TEXT)) for _ in range(n)]
    extra = draw(st.dictionaries(st.sampled_from(["id", "source", "meta", "x"]), JUNK, max_size=2))
    if suffix in (".jsonl", ".json"):
        rows = [{**r, **extra} for r in rows]  # extra fields are allowed: noise around the defect
    defect = draw(st.sampled_from(["binary", "latin1", "nul", "truncated", "not_an_object", "wrong_type", "missing_field",
                                   "null_field", "mixed_formats", "huge_line_then_bad", "empty", "unknown_label",
                                   "bad_chat", "bad_csv"]))
    k = draw(st.integers(0, n - 1))
    if defect == "unknown_label" and kind != "classification":
        defect = "wrong_type"
    if defect == "bad_chat" and kind != "chat":
        defect = "missing_field"
    if defect == "bad_csv" and suffix not in (".csv", ".tsv"):
        defect = "not_an_object"
    if defect in ("not_an_object", "truncated") and suffix in (".csv", ".tsv"):
        defect = "bad_csv"
    fields = ROW_FIELDS[kind]
    if defect == "wrong_type":
        rows[k] = {**rows[k], draw(st.sampled_from(fields)): draw(NON_STRING if kind != "classification" else
                                                                  st.one_of(st.none(), st.floats(), st.lists(st.integers()), st.dictionaries(st.text(max_size=2), st.integers())))}
        if kind == "classification" and not isinstance(rows[k]["label"], (float, list, dict, type(None))) and "text" in rows[k]:
            rows[k]["text"] = draw(NON_STRING)
    elif defect == "missing_field":
        rows[k] = {key: v for key, v in rows[k].items() if key != draw(st.sampled_from(fields))}
        if all(f in rows[k] for f in fields):  # nothing dropped (extra key): drop the first field
            rows[k].pop(fields[0])
    elif defect == "null_field":
        rows[k] = {**rows[k], draw(st.sampled_from(fields)): None}
    elif defect == "mixed_formats":
        other = draw(st.sampled_from([x for x in sorted(ROW_FIELDS) if x != kind and not (x == "chat" and suffix in (".csv", ".tsv"))]))
        rows[max(k, 1)] = good_row(other, rnd, "mixed")
    elif defect == "unknown_label":
        rows[k] = {**rows[k], "label": draw(st.sampled_from(["maybe", "2", 7, -1, "positive", "YES", ""]))}
    elif defect == "bad_chat":
        rows[k] = {"messages": draw(st.sampled_from([
            "hello", [], [{"role": "user", "content": "a"}], [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            [{"role": "user"}, {"role": "assistant", "content": "b"}], [{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}],
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}], [1, 2]]))}
    elif defect == "huge_line_then_bad":
        rows[0] = {**rows[0], fields[0]: "x" * draw(st.integers(100_000, 2_000_000)) if kind != "chat" else rows[0][fields[0]]}
        rows[-1] = {key: v for key, v in rows[-1].items() if key != fields[-1]}
    body = _serialise(rows, suffix, fields) if defect != "empty" else draw(st.sampled_from([b"", b"\n\n", b"  \n"]))
    if defect == "binary":
        body = b"\xff" + draw(st.binary(min_size=0, max_size=200)) + body[: draw(st.integers(0, len(body)))]
    elif defect == "latin1":
        body = body.decode("utf-8").replace(body.decode("utf-8")[len(body) // 2], "\u00e9", 1).encode("latin-1", "replace")
        if b"\xe9" not in body:
            body = b"\xe9" + body
    elif defect == "nul":
        i = draw(st.integers(0, len(body)))
        body = body[:i] + b"\0" + body[i:]
    elif defect == "truncated":
        lines = body.splitlines(keepends=True)
        last = lines[-1].rstrip(b"\n")
        body = b"".join(lines[:-1]) + last[: draw(st.integers(1, max(1, len(last) - 2)))]
    elif defect == "not_an_object":
        lines = body.splitlines(keepends=True)
        lines[min(k, len(lines) - 1)] = json.dumps(draw(st.one_of(st.lists(st.integers(), max_size=3), st.integers(), st.text(max_size=5),
                                                                   st.none(), st.booleans()))).encode() + b"\n"
        body = b"".join(lines)
    elif defect == "bad_csv":
        lines = body.splitlines(keepends=True)
        bad = draw(st.sampled_from([b'"unterminated,quote\n', b"one_cell_only\n", b"a,b,c,d,e\n", b'x"y,z\n' if suffix == ".csv" else b'x"y\tz\n']))
        if suffix == ".tsv":
            bad = bad.replace(b",", b"\t")
        lines.insert(max(1, min(k, len(lines))), bad)
        body = b"".join(lines)
        if draw(st.booleans()):
            body = body.replace(lines[0], (b"wrong,header\n" if suffix == ".csv" else b"wrong\theader\n"), 1)
    return suffix, body, f"{suffix[1:]}/{kind}/{defect}"


def _serialise(rows: list[dict], suffix: str, fields) -> bytes:
    if suffix in (".jsonl", ".json"):
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    import csv

    buf = io.StringIO()
    cols = list(fields)
    w = csv.writer(buf, delimiter="," if suffix == ".csv" else "\t", lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow(["" if r.get(c) is None else str(r.get(c)) for c in cols] if all(c in r for c in cols) else [str(r.get(c, "")) for c in cols[:1]])
    return buf.getvalue().encode("utf-8")


# (option, values that make no sense for it)
BAD_NUMBERS = {
    "--q": ["0", "-1", "nan", "1.5", "inf", "x"], "--batch-size": ["0", "-3", "nan"], "--steps": ["-1", "nan", "1e3"],
    "--lr": ["-0.1", "nan", "inf", "-inf", "1e999"], "--eps": ["0", "-1e-3", "nan", "inf"], "--rank": ["0", "-2"],
    "--alpha": ["0", "-1", "nan", "inf"], "--n-train": ["0", "-5"], "--n-dev": ["-1"], "--n-test": ["0", "-1"],
    "--max-length": ["0", "1", "-8"], "--eval-every": ["-1"], "--checkpoint-every": ["-2"], "--eval-batch-size": ["0", "-1"],
    "--seed": ["-1", "9223372036854775808", "0.5"], "--threads": ["0", "-1"], "--layers": ["-1"],
}


@st.composite
def yaml_config(draw) -> tuple[bytes, str]:
    """(bytes, defect) of a --config file that is wrong."""
    defect = draw(st.sampled_from(["binary", "not_a_mapping", "unknown_option", "wrong_type", "out_of_domain", "syntax", "non_string_key"]))
    if defect == "binary":
        return b"\xff\xfe" + draw(st.binary(max_size=50)), defect
    if defect == "not_a_mapping":
        return draw(st.sampled_from([b"- q\n- 4\n", b"4\n", b"just words\n", b"[1, 2]\n"])), defect
    if defect == "unknown_option":
        return f"{draw(st.sampled_from(['learning_rate', 'qq', 'epochs', 'Q']))}: 1\n".encode(), defect
    if defect == "syntax":
        return draw(st.sampled_from([b"q: [1\n", b"q: 4\n  lr: 1\n", b"q: {a\n", b"\tq: 1\n", b"q: !!python/object:os.system x\n"])), defect
    if defect == "non_string_key":
        return draw(st.sampled_from([b"1: 2\n", b"[a]: 1\n", b"null: 3\n", b"true: q\n"])), defect
    if defect == "wrong_type":
        name = draw(st.sampled_from(["q", "lr", "steps", "method", "label_words", "layers", "progress", "seed", "targets"]))
        value = draw(st.sampled_from(["[1, 2]", "{a: 1}", "'abc'" if name not in ("method", "targets") else "5", "yes" if name != "progress" else "7"]))
        if name in ("label_words", "targets") and value in ("[1, 2]",):
            value = "7"
        return f"{name}: {value}\n".encode(), f"{defect}:{name}"
    flag = draw(st.sampled_from(sorted(BAD_NUMBERS)))
    value = draw(st.sampled_from(BAD_NUMBERS[flag]))
    value = {"nan": ".nan", "inf": ".inf", "-inf": "-.inf"}.get(value, value)
    if flag == "--layers":
        value = f"[{value}]"
    return f"{flag[2:].replace('-', '_')}: {value}\n".encode(), f"{defect}:{flag}"


# ------------------------------------------------------------------------------------------------
# cases: argv + the files they need


@dataclass
class Case:
    kind: str
    argv: list[str]
    files: dict[str, bytes] = field(default_factory=dict)  # relative path -> bytes, written before the run
    dirs: list[str] = field(default_factory=list)


def _train(model: str, data_root: str, *extra: str) -> list[str]:
    return ["train", "--model", model, "--data-root", data_root, "--n-train", "12", "--n-dev", "4", "--n-test", "4",
            "--steps", "1", "--max-length", "32", "--no-progress", "--out", "{root}/out", *extra]


def fake_manifest() -> dict:
    """A well-formed manifest of a program that does not exist (its .pte is junk): enough to reach the data,
    checkpoint and program checks without exporting anything."""
    from prge.engine.formats import FORMAT, FORMAT_VERSION, METHODS, seal

    return seal({"format": FORMAT, "format_version": FORMAT_VERSION, "program": "p.pte", "program_bytes": 7,
                 "program_sha256": "0" * 64, "model": "tiny", "vocab_size": 300, "vocab_sha256": "1" * 64, "pad_id": 0,
                 "batch_size": 2, "max_length": 8, "answer_slots": 1, "eval_batch_size": 4, "q": 2, "copies": 4, "rank": 2,
                 "alpha": 4.0, "layers": [{"name": "l.q_proj", "shape": [8, 2], "offset": 0}], "total": 16,
                 "noise": "counter", "loss": "class", "label_ids": [5, 6], "methods": {m: {} for m in METHODS},
                 "adapter_config": {"peft_type": "LORA", "r": 2, "lora_alpha": 4}, "run_defaults": {}})


@st.composite
def manifest_file(draw) -> tuple[bytes, str]:
    """A manifest with one field damaged (deleted, retyped) or the whole file junk."""
    m = fake_manifest()
    defect = draw(st.sampled_from(["junk", "delete", "retype", "not_object"]))
    if defect == "junk":
        return draw(st.binary(max_size=80)), defect
    if defect == "not_object":
        return json.dumps(draw(st.one_of(st.lists(st.integers(), max_size=3), st.text(max_size=5), st.integers()))).encode(), defect
    from prge.engine.formats import _MANIFEST_FIELDS, seal

    key = draw(st.sampled_from(sorted(k for k in _MANIFEST_FIELDS if k != "run_defaults")))
    if defect == "delete":
        m.pop(key)
    else:
        bad = draw(JUNK)
        if _MANIFEST_FIELDS[key](bad):
            bad = "junk"
        m[key] = bad
    if draw(st.booleans()):
        m = seal(m)  # re-sealed: the field check must catch it, not only the hash
    return json.dumps(m).encode(), f"{defect}:{key}"


@st.composite
def cases(draw, model: str, data_root: str) -> Case:
    what = draw(st.sampled_from(["train_file", "eval_file", "config", "number", "model_path", "out_path", "resume_path",
                                 "device_manifest", "device_data", "device_number", "device_checkpoint", "adapter"]))
    if what in ("train_file", "eval_file"):
        suffix, body, defect = draw(data_file())
        files = {f"bad{suffix}": body}
        if what == "train_file":
            argv = _train(model, data_root, "--train-file", f"{{root}}/bad{suffix}", "--label-words", "no", "yes")
        else:
            files["good.jsonl"] = "".join(json.dumps({"prompt": f"p{i}", "completion": " c"}) + "\n" for i in range(8)).encode()
            kind = defect.split("/")[1]
            if kind == "classification":
                files["good.jsonl"] = "".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n" for i in range(8)).encode()
            argv = _train(model, data_root, "--train-file", "{root}/good.jsonl", "--eval-file", f"{{root}}/bad{suffix}",
                          "--label-words", "no", "yes")
        return Case(f"{what}:{defect}", argv, files)
    if what == "config":
        body, defect = draw(yaml_config())
        return Case(f"config:{defect}", _train(model, data_root, "--config", "{root}/run.yaml"), {"run.yaml": body})
    if what == "number":
        flag = draw(st.sampled_from(sorted(BAD_NUMBERS)))
        value = draw(st.sampled_from(BAD_NUMBERS[flag]))
        sub = draw(st.sampled_from(["train", "eval"]))
        argv = _train(model, data_root, flag, value)
        if sub == "eval":
            argv = ["eval", *[a for a in argv[1:] if a not in ("--out", "{root}/out", "--steps", "1", "--no-progress")]]
        return Case(f"number:{sub}{flag}={value}", argv)
    if what == "model_path":
        kind = draw(st.sampled_from(["missing", "file", "empty_dir", "junk_config", "config_only", "not_utf8_config"]))
        files, dirs = {}, []
        if kind == "file":
            files["m"] = draw(st.binary(max_size=30))
        elif kind == "empty_dir":
            dirs.append("m")
        elif kind == "junk_config":
            files["m/config.json"] = draw(st.sampled_from([b"{not json", b"[]", b"3", b'{"model_type": "no-such-arch"}']))
        elif kind == "config_only":
            files["m/config.json"] = b'{"model_type": "llama"}'
        else:
            files["m/config.json"] = b"\xff\xfe{}"
        return Case(f"model:{kind}", _train("{root}/m", data_root), files, dirs)
    if what == "out_path":
        kind = draw(st.sampled_from(["file", "under_file", "proc"]))
        files = {"f": b"x"}
        out = {"file": "{root}/f", "under_file": "{root}/f/run", "proc": "/proc/prge-fuzz/run"}[kind]
        argv = _train(model, data_root)
        argv[argv.index("{root}/out")] = out
        return Case(f"out:{kind}", argv, files)
    if what == "resume_path":
        kind = draw(st.sampled_from(["missing", "file", "empty_dir", "junk_state", "state_not_object", "no_adapter"]))
        files, dirs = {}, []
        if kind == "file":
            files["r"] = b"x"
        elif kind == "empty_dir":
            dirs.append("r")
        elif kind in ("junk_state", "state_not_object", "no_adapter"):
            body = {"junk_state": draw(st.binary(max_size=20)), "state_not_object": b"[1, 2]", "no_adapter": b'{"step": 1}'}[kind]
            files["r/checkpoints/last/trainer_state.json"] = body
        return Case(f"resume:{kind}", ["train", "--resume", "{root}/r", "--model", model, "--no-progress"], files, dirs)
    if what == "adapter":
        kind = draw(st.sampled_from(["missing", "file", "empty_dir", "junk_config", "junk_weights"]))
        files, dirs = {}, []
        if kind == "file":
            files["a"] = b"x"
        elif kind == "empty_dir":
            dirs.append("a")
        elif kind == "junk_config":
            files["a/adapter_config.json"] = draw(st.sampled_from([b"{", b"[]", b'{"peft_type": "IA3"}', b'{"peft_type": "LORA", "r": -1}']))
        else:
            files["a/adapter_config.json"] = json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                         "base_model_name_or_path": model}).encode()
            files["a/adapter_model.safetensors"] = draw(st.binary(max_size=64))
        sub = draw(st.sampled_from(["eval", "merge"]))
        argv = (["eval", "--adapter", "{root}/a", "--model", model, "--data-root", data_root, "--n-test", "4"] if sub == "eval"
                else ["merge", "--adapter", "{root}/a", "--model", model, "--out", "{root}/merged"])
        return Case(f"adapter:{sub}:{kind}", argv, files, dirs)
    # device-train: a junk program beside a manifest
    manifest = json.dumps(fake_manifest()).encode()
    files = {"p.pte": b"not a pte", "p.pte.json": manifest}
    argv = ["device-train", "--program", "{root}/p.pte", "--out", "{root}/out", "--no-progress"]
    if what == "device_manifest":
        files["p.pte.json"], defect = draw(manifest_file())
        return Case(f"device:manifest:{defect}", argv, files)
    if what == "device_number":
        flag, value = draw(st.sampled_from([("--steps", "-1"), ("--lr", "nan"), ("--lr", "-1"), ("--eps", "0"), ("--eps", "inf"),
                                            ("--seed", "-3"), ("--eval-every", "-1"), ("--checkpoint-every", "-1"), ("--steps", "x")]))
        return Case(f"device:number{flag}={value}", argv + [flag, value], files)
    if what == "device_data":
        kind = draw(st.sampled_from(["missing", "junk", "truncated_header", "no_metadata"]))
        if kind == "junk":
            files["p.data.safetensors"] = draw(st.binary(max_size=100))
        elif kind == "truncated_header":
            files["p.data.safetensors"] = (200).to_bytes(8, "little") + b'{"train_input_ids": {"dtype": "I32"'
        elif kind == "no_metadata":
            files["p.data.safetensors"] = _safetensors_bytes()
        return Case(f"device:data:{kind}", argv, files)
    # a checkpoint to resume that is damaged
    kind = draw(st.sampled_from(["junk_state", "state_not_object", "junk_tensors", "no_tensors"]))
    files["p.data.safetensors"] = _dataset_bytes()
    files["out/metrics.jsonl"] = b'{"step": 0, "split": "dev", "accuracy": 0.5}\n'
    last = "out/checkpoints/last/"
    files[last + "trainer_state.json"] = {"junk_state": draw(st.binary(max_size=20)), "state_not_object": b"[1]"}.get(kind, b'{"step": 2, "seed": 0}')
    if kind == "junk_tensors":
        files[last + "state.safetensors"] = draw(st.binary(max_size=64))
    return Case(f"device:checkpoint:{kind}", argv + ["--resume"], files)


def _safetensors_bytes(metadata: dict | None = None) -> bytes:
    import tempfile

    import torch
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as d:
        save_file({"x": torch.zeros(2)}, f"{d}/x", metadata=metadata)
        return Path(f"{d}/x").read_bytes()


def _dataset_bytes() -> bytes:
    """A data file that matches `fake_manifest` (so a run gets as far as the checkpoint)."""
    import tempfile

    from prge.data.batch import Encoded
    from prge.engine.formats import write_dataset

    with tempfile.TemporaryDirectory() as d:
        items = [Encoded([3, 4, 5], [5], 0), Encoded([3, 6], [6], 1)] * 2
        write_dataset(f"{d}/x.safetensors", {"train": items, "dev": items[:2]}, fake_manifest())
        return Path(f"{d}/x.safetensors").read_bytes()


# ------------------------------------------------------------------------------------------------
# the driver


@dataclass
class Outcome:
    case: str
    rc: int | None
    clean: bool  # refused with one error line, no traceback, nothing written
    why: str  # what was wrong when not clean
    stderr: str


def snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames:
            out[os.path.relpath(os.path.join(dirpath, n), root)] = ("dir",)
        for n in filenames:
            p = os.path.join(dirpath, n)
            st_ = os.stat(p)
            out[os.path.relpath(p, root)] = (st_.st_size, st_.st_mtime_ns)
    return out


def drive(case: Case, root: Path) -> Outcome:
    """Lay out `case`'s files under `root` (emptied first), run the CLI in-process, judge the outcome."""
    from prge.cli import main

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    for d in case.dirs:
        (root / d).mkdir(parents=True, exist_ok=True)
    for rel, body in case.files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(body)
    argv = [a.replace("{root}", str(root)) for a in case.argv]
    before = snapshot(root)
    err, out = io.StringIO(), io.StringIO()
    rc, raised = None, None
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            rc = main(argv)
    except BaseException as e:  # noqa: BLE001 - anything escaping main is what we are looking for
        raised = "".join(traceback.format_exception_only(type(e), e)).strip()
    text = err.getvalue()
    lines = [line for line in text.strip().splitlines() if line.strip()]
    after = snapshot(root)
    why = ""
    if raised:
        why = f"raised {raised[:300]}"
    elif "Traceback" in text:
        why = "printed a traceback"
    elif rc != 2:
        why = f"exit status {rc}, not 2"
    elif not lines or not lines[-1].startswith("error: "):
        why = "the last stderr line is not `error: ...`"
    elif sum(line.startswith("error:") for line in lines) != 1:
        why = "more than one error line"
    elif after != before:
        changed = sorted(set(after) ^ set(before) | {k for k in after if k in before and after[k] != before[k]})
        why = f"wrote or changed {changed[:5]}"
    return Outcome(case.kind, rc, not why, why, lines[-1] if lines else "")
