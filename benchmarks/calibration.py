#!/usr/bin/env python
"""How much of a zeroth-order gain is recalibration? Zero-shot accuracy with the label biases fitted on dev.

    python benchmarks/calibration.py --task sst2 --template 'Review: {sentence}\\nSentiment:'
    python benchmarks/calibration.py --model gemma3-270m --task sst2 --template 'Review: {sentence}\\nSentiment:'
    python benchmarks/calibration.py --train-file benchmarks/data/skills/copa4.train.jsonl \\
        --eval-file benchmarks/data/skills/copa4.eval.jsonl --label-words A B C D

A classification prompt scores each label word by its logit at the answer position. The cheapest
change to such a model is one bias per label added to those logits: it moves the decision boundary
without changing what the model knows. This script fits exactly that (L − 1 free numbers, by
cross-entropy on the dev split, the untrained model's label logits held fixed) and reports the test
accuracy of the untrained model before and after, beside the label shares. A zeroth-order run whose
test accuracy ends near the calibrated zero-shot figure has learned the biases and little else
(docs/optimiser.md, sixth session). One forward over dev and test; prge train's own data splits
and seeds, so the rows are those the runs in benchmarks/results/ evaluated.

Appends one JSON line per setting to benchmarks/results/calibration.jsonl.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from prge.config import TrainConfig  # noqa: E402
from prge.data.batch import collate  # noqa: E402
from prge.io import append_jsonl  # noqa: E402
from prge.run.train import prepare  # noqa: E402
from prge.zo.loss import label_scores  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "calibration.jsonl"


@torch.no_grad()
def scores(s, rows, bs: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, L) label-word logits of the model as it is, and the (N,) gold labels."""
    out, gold = [], []
    for i in range(0, len(rows), bs):
        b = collate(rows[i:i + bs], s.pad_id)
        out.append(label_scores(s.model, b, s.label_ids).float())
        gold.append(b.label)
    return torch.cat(out), torch.cat(gold)


def fit_bias(logits: torch.Tensor, gold: torch.Tensor, iters: int = 200) -> torch.Tensor:
    """(L,) biases (the first fixed at 0) minimising the mean cross-entropy of logits + bias."""
    bias = torch.zeros(logits.shape[1] - 1, requires_grad=True)
    opt = torch.optim.LBFGS([bias], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        full = torch.cat([torch.zeros(1), bias])
        loss = torch.nn.functional.cross_entropy(logits + full, gold)
        loss.backward()
        return loss

    opt.step(closure)
    return torch.cat([torch.zeros(1), bias.detach()])


def summary(logits: torch.Tensor, gold: torch.Tensor, bias: torch.Tensor) -> dict:
    z = logits + bias
    pred = z.argmax(-1)
    share = torch.bincount(pred, minlength=logits.shape[1]).float() / len(gold)
    return {"accuracy": float((pred == gold).float().mean()), "loss": float(torch.nn.functional.cross_entropy(z, gold)),
            "label_share": [round(float(x), 4) for x in share]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="sst2")
    p.add_argument("--template", help="prompt template (\\n = newline)")
    p.add_argument("--train-file")
    p.add_argument("--eval-file")
    p.add_argument("--label-words", nargs="+")
    p.add_argument("--tag", help="name of this setting (default: model/task[+earlier] or the file's name)")
    p.add_argument("--seed", type=int, default=0, help="prge train's seed (it picks the dev rows)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    t0 = time.time()
    cfg = TrainConfig(model=a.model, task=a.task, train_file=a.train_file, eval_file=a.eval_file, label_words=a.label_words,
                      template=a.template.replace("\\n", "\n") if a.template else None, seed=a.seed, threads=a.threads,
                      progress=False)
    s = prepare(cfg)
    if s.label_ids is None:
        raise SystemExit("error: calibration needs a classification task (label words) — pick one, or pass --label-words")
    tag = a.tag or (Path(a.train_file).name.split(".")[0] if a.train_file else a.task + ("-earlier" if a.template else ""))
    dev, dev_gold = scores(s, s.dev)
    test, test_gold = scores(s, s.test)
    bias = fit_bias(dev, dev_gold)
    zero = torch.zeros(dev.shape[1])
    row = {"tag": tag, "model": a.model, "seed": a.seed, "n_dev": len(dev_gold), "n_test": len(test_gold),
           "bias": [round(float(x), 4) for x in bias],
           "dev_zero_shot": summary(dev, dev_gold, zero), "dev_calibrated": summary(dev, dev_gold, bias),
           "test_zero_shot": summary(test, test_gold, zero), "test_calibrated": summary(test, test_gold, bias),
           "seconds": round(time.time() - t0, 1), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
           "date": time.strftime("%Y-%m-%d")}
    print(f"{a.model} {tag}: test {100 * row['test_zero_shot']['accuracy']:.1f}% zero-shot "
          f"(shares {row['test_zero_shot']['label_share']}) -> {100 * row['test_calibrated']['accuracy']:.1f}% with the "
          f"label biases fitted on {len(dev_gold)} dev rows (shares {row['test_calibrated']['label_share']})", flush=True)
    if not a.no_write:
        append_jsonl(RESULTS, row)


if __name__ == "__main__":
    main()
