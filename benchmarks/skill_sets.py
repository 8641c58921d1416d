#!/usr/bin/env python
"""Text/label data sets that teach a skill the model lacks but can learn (issue 20's "new skill" target).

    python benchmarks/skill_sets.py [--out benchmarks/data/skills] [--data-root ../shared/data]

Each set states the answer in the question and lists options labelled by letters, so the only thing
to learn is answering with the right letter: SmolLM2-135M starts near chance, and backprop LoRA-FA
learns it in minutes. The rows are the suite's own data written as a user would (`{"text", "label"}`
JSON lines, labels "A", "B", ...), built deterministically (seed 0):

- `copa2`:  a COPA premise, the correct alternative stated, two options (chance 50%)
- `wic10`:  "Which option is the word "W"?" with ten WiC target words as options (chance 10%)
- `copa4`:  a COPA premise, the correct alternative stated, four options (the other three drawn from
            other items' alternatives; chance 25%)

Train them like any user data: `prge train --train-file benchmarks/data/skills/wic10.train.jsonl
--eval-file benchmarks/data/skills/wic10.eval.jsonl --label-words A B C D E F G H I J`.
"""

from __future__ import annotations

import argparse
import json
import random
import string
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LETTERS = string.ascii_uppercase


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def options_text(options: list[str]) -> str:
    return "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))


def stated(question: str, answer: str, options: list[str]) -> str:
    return f"{question}\nThe correct answer is: {answer}\nOptions:\n{options_text(options)}\nAnswer with the letter of the correct option.\nAnswer:"


def copa(root: Path, k: int, rng: random.Random) -> list[dict]:
    items = rows(root / "copa" / "train350.jsonl") + rows(root / "copa" / "train_tail50.jsonl") + rows(root / "copa" / "val.jsonl")
    pool = [x[f"choice{j}"] for x in items for j in (1, 2)]
    out = []
    for x in items:
        right = x["choice1"] if x["label"] == 0 else x["choice2"]
        wrong = x["choice2"] if x["label"] == 0 else x["choice1"]
        distract = [wrong] + rng.sample([p for p in pool if p not in (right, wrong)], k - 2)
        options = [right] + distract[:k - 1]
        rng.shuffle(options)
        ask = f"{x['premise']} What was the {'cause' if x['question'] == 'cause' else 'effect'}?"
        out.append({"text": stated(ask, right, options), "label": LETTERS[options.index(right)]})
    return out


def wic10(root: Path, rng: random.Random, n: int = 800) -> list[dict]:
    words = sorted({x["word"] for x in rows(root / "wic" / "train.jsonl")})
    out = []
    for _ in range(n):
        options = rng.sample(words, 10)
        right = rng.choice(options)
        out.append({"text": stated(f'Which option is the word "{right}"?', right, options), "label": LETTERS[options.index(right)]})
    return out


def write(out: Path, name: str, data: list[dict], n_eval: int, rng: random.Random) -> None:
    rng.shuffle(data)
    ev, tr = data[:n_eval], data[n_eval:]
    for split, part in (("train", tr), ("eval", ev)):
        (out / f"{name}.{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    print(f"{name}: {len(tr)} train / {len(ev)} eval rows, {len({r['label'] for r in data})} labels -> {out}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "data" / "skills"))
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    a = p.parse_args(argv)
    out, root = Path(a.out), Path(a.data_root)
    out.mkdir(parents=True, exist_ok=True)
    write(out, "copa2", copa(root, 2, random.Random(0)), 200, random.Random(1))
    write(out, "copa4", copa(root, 4, random.Random(2)), 200, random.Random(3))
    write(out, "wic10", wic10(root, random.Random(4)), 200, random.Random(5))
    return 0


if __name__ == "__main__":
    sys.exit(main())
