#!/usr/bin/env python
"""Zero-shot dev accuracy of prompt templates and label words for a built-in classification task.

The prompt is the cheapest lever there is (no training step at all), so it is screened first and on
the dev split only (never the test split): every candidate is scored with the same model, the same
seeded dev rows and the label-word scoring `prge train` uses, and the table is ranked by dev accuracy.

    python benchmarks/prompts.py                     # the SST-2 candidates below, SmolLM2-135M
    python benchmarks/prompts.py --task rte --candidates '{premise}\\nQuestion: {hypothesis} True or False?\\nAnswer:|| True|| False'

A candidate is `template||word0||word1...` (words in label order; `\\n` in the template is a newline).
Appends JSON lines to benchmarks/results/prompts.jsonl and prints a markdown table.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# train-split rows (text, label word) used as demonstrations by the few-shot candidates
POS_A = ("it 's a treat -- a delightful , witty , improbable romantic comedy with a zippy jazzy score", "positive")
NEG_A = ("plays like a glossy melodrama that occasionally verges on camp .", "negative")
POS_B = ("manages to be compelling , amusing and unsettling at the same time", "positive")
NEG_B = ("is n't nearly surprising or clever enough to sustain a reasonable degree of suspense on its own", "negative")
WORDS = " negative|| positive"


def _shots(*demos: tuple[str, str]) -> str:
    """One `Review: …\\nSentiment: word` block per demonstration, in the order given, then the row's own
    `Review: {sentence}\\nSentiment:` (newlines written as `\\n`, like every candidate here)."""
    return "".join(f"Review: {text}\\nSentiment: {word}\\n\\n" for text, word in demos) + "Review: {sentence}\\nSentiment:"


SST2 = [
    "{sentence} It was|| terrible|| great",  # the paper's (MeZO's) template
    "{sentence} It was|| bad|| good",
    "{sentence} It was|| negative|| positive",
    "Review: {sentence}\\nSentiment:|| negative|| positive",
    "Movie review: {sentence}\\nIs this review positive or negative? Answer:|| negative|| positive",
    "{sentence}\\nQuestion: Is this movie review positive or negative?\\nAnswer:|| negative|| positive",
    "Classify the sentiment of the movie review as positive or negative.\\nReview: {sentence}\\nSentiment:|| negative|| positive",
    "<|im_start|>user\\nIs this movie review positive or negative?\\n{sentence}<|im_end|>\\n<|im_start|>assistant\\n||negative||positive",
    "<|im_start|>user\\nIs this movie review positive or negative? Answer with one word.\\nReview: {sentence}<|im_end|>\\n<|im_start|>assistant\\nThe review is|| negative|| positive",
    # second round (2026-12-01): two- and four-shot demonstrations from the train split, then variants of
    # the first "Movie review:" line and of the answer cue; the last one of this list is the default now
    _shots(POS_A, NEG_A) + "||" + WORDS,
    _shots(NEG_A, POS_A) + "||" + WORDS,
    _shots(POS_B, NEG_B, POS_A, NEG_A) + "||" + WORDS,
    "Review: {sentence}\\nSentiment (positive or negative):|| negative|| positive",
    "Movie review: {sentence}\\nSentiment:|| negative|| positive",
    "Film review: {sentence}\\nSentiment:|| negative|| positive",
    "Movie Review: {sentence}\\nSentiment:|| negative|| positive",
    "Movie review: {sentence}\\nSentiment:|| bad|| good",
    "Movie review: {sentence}\\nSentiment:|| Negative|| Positive",
    "Movie review: {sentence}\\nOverall sentiment:|| negative|| positive",
    "Movie review: {sentence}\\nReview sentiment:|| negative|| positive",
    "Movie review: \"{sentence}\"\\nSentiment:|| negative|| positive",
    "Movie review: {sentence}\\nThis movie review is|| negative|| positive",
    "Movie review: {sentence}\\nThe sentiment of this review is|| negative|| positive",
    "Movie review: {sentence}\\nThe sentiment of the movie review above is|| negative|| positive",
    "Review: {sentence}\\nThe sentiment of this movie review is|| negative|| positive",
    "Movie review: \"{sentence}\"\\nThe sentiment of this movie review is|| negative|| positive",
    "Movie review: {sentence}\\nThe sentiment of this movie review is|| bad|| good",
    "Movie review: {sentence}\\nThe sentiment of this movie review is|| negative|| positive",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="sst2")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--candidates", nargs="+", help="template||word0||word1 ... (default: the SST-2 list in this file)")
    p.add_argument("--n-dev", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument("--data-root")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "prompts.jsonl"))
    args = p.parse_args()

    import torch

    from prge.config import TrainConfig
    from prge.run.evaluate import evaluate
    from prge.io import append_jsonl
    from prge.models.load import load_model
    from prge.run.train import load_encoded

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows = []
    for cand in args.candidates or SST2:
        template, *words = cand.replace("\\n", "\n").split("||")
        cfg = TrainConfig(model=args.model, task=args.task, template=template, label_words=words, n_dev=args.n_dev,
                          n_train=10, n_test=1, seed=args.seed, data_root=args.data_root)
        t = time.time()
        _, _, _, dev, _, label_ids = load_encoded(cfg, tok)
        with torch.no_grad():
            r = evaluate(model, dev, pad_id, label_ids, 32, "class")
        row = {"task": args.task, "model": args.model, "template": template, "label_words": words, "split": "dev",
               "n": r["n"], "accuracy": r["accuracy"], "label_share": r.get("label_share"), "seconds": time.time() - t,
               "seed": args.seed, "machine": f"{platform.machine()} {platform.node()}", "date": time.strftime("%Y-%m-%d")}
        rows.append(row)
        print(f"{r['accuracy']:.3f}  {template!r} {words}", file=sys.stderr, flush=True)
        append_jsonl(Path(args.out), row)
    print(f"\n{args.task} zero-shot, {args.model}, dev split ({rows[0]['n']} rows, seed {args.seed})\n")
    print("| dev acc. | template | label words |\n|---|---|---|")
    for r in sorted(rows, key=lambda r: -r["accuracy"]):
        print(f"| {100 * r['accuracy']:.1f} | `{r['template']!r}` | {', '.join(repr(w) for w in r['label_words'])} |")


if __name__ == "__main__":
    main()
