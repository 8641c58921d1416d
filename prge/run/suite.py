"""`prge eval --task all`: one model (or adapter), every built-in task, one table.

The model is loaded once; each task's data is loaded and encoded in turn (`prge.run.train.with_task`)
and its requested splits evaluated with the task's own evaluation (label words, multiple choice or
generation). A task whose data is not available here, or that cannot run with this model (a label
word that is several tokens for its tokenizer), becomes a row saying why; the others still run.
"""

from __future__ import annotations

import dataclasses
import json
import time

from prge.errors import PrgeError


def eval_all(cfg, adapter: str | None, splits: list[str], as_json: bool = False, out=print) -> list[dict]:
    """Evaluate every task in `prge.data.tasks.TASKS`; print the table (and one JSON line); return the rows."""
    from prge.data.tasks import TASKS
    from prge.log import say as log
    from prge.run.train import prepare, with_task

    t0 = time.time()
    base = prepare(dataclasses.replace(cfg, task=next(iter(TASKS))), adapter=adapter, data=False)
    rows = []
    for name, task in TASKS.items():
        start = time.time()
        row = {"task": name, "kind": task.kind, "metric": task.metric}
        try:
            s = with_task(base, name)
        except PrgeError as e:
            row["error"] = str(e)
            log(f"{name}: skipped — {e}")
            rows.append(row)
            continue
        row["sizes"] = {"train": len(s.train), "dev": len(s.dev), "test": len(s.test)}
        for split in splits:
            items = {"dev": s.dev, "test": s.test, "train": s.train}[split]
            if not items:
                row["error"] = f"the {split} split is empty"
                break
            row[split] = s.evaluate(items)
        if "error" in row:
            rows.append(row)
            continue
        row["seconds"] = round(time.time() - start, 1)
        log(f"{name}: " + "  ".join(f"{sp} {_score(row[sp], task.metric)}" for sp in splits) + f"  [{row['seconds']:.0f} s]")
        rows.append(row)
    out(table(rows, splits, cfg.model, adapter, (time.time() - t0) / 60))
    if as_json:
        out(json.dumps({"model": cfg.model, "adapter": adapter, "tasks": rows}))
    return rows


def _score(r: dict, metric: str) -> str:
    if metric == "f1":
        return f"F1 {100 * r['f1']:.1f} / EM {100 * r['em']:.1f}"
    return f"{100 * r['accuracy']:.1f}"


def table(rows: list[dict], splits: list[str], model: str, adapter: str | None, minutes: float) -> str:
    """A Markdown table: task, kind, metric, the score (in %) and n per split, and why a task did not run."""
    head = "| task | kind | metric | " + " | ".join(f"{sp} | n" for sp in splits) + " | note |"
    sep = "|" + "---|" * (4 + 2 * len(splits))
    lines = [f"{model}{' + ' + adapter if adapter else ''}, {minutes:.1f} min", "", head, sep]
    for r in rows:
        metric = "F1 / EM" if r["metric"] == "f1" else "accuracy"
        if "error" in r:
            cells = ["–"] * (2 * len(splits)) + ["not run: " + r["error"].split(" — ")[0].replace("|", "/")]
        else:
            cells = []
            for sp in splits:
                cells += [_score(r[sp], r["metric"]).replace("F1 ", "").replace("EM ", ""), str(r[sp]["n"])]
            cells.append("")
        lines.append(f"| {r['task']} | {r['kind']} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
