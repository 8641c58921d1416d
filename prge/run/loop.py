"""The one training loop: cadence, resume, best/last checkpoints, metrics, progress and NaN handling.

`train(stepper, plan, run_dir)` drives any `Stepper` — the eager step (`prge.run.train.EagerStepper`)
and the exported program's step (`prge.engine.runtime.EngineStepper`) alike — so `prge train` and
`prge device-train` share every rule below; the C++ runner (`prge/engine/native/`) is the on-device
copy of this file and follows the same rules.

Per run folder:
    metrics.jsonl       one row per step ({"step", "loss", "g_abs", "seconds"}) and one per
                        evaluation ({"step", "split": "dev", "accuracy", "loss", ...})
    checkpoints/last/   written after the before-training evaluation, at every evaluation and every
                        `checkpoint_every` steps between them: a killed run resumes from here and
                        loses at most that many steps
    checkpoints/best/   written when the dev accuracy beats the best so far (step 0 counts)

A step is evaluated when `eval_every` divides it, and always at the last step. Resuming reloads
checkpoints/last, drops the metrics rows after its step, and continues the same trajectory: every
step's examples and noise are functions of (seed, step), so the stepper's state at a step is all
that is needed.
"""

from __future__ import annotations

import errno
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from prge import io
from prge.errors import PrgeError

# the loop's own fields of a checkpoint's trainer_state.json (a stepper adds its own beside them)
LOOP_STATE = ("best_accuracy", "best_step", "before", "before_loss", "seconds")


@dataclass
class Plan:
    """How long to train and how often to evaluate and checkpoint."""

    steps: int
    eval_every: int
    checkpoint_every: int
    progress: bool = True
    desc: str = "train"  # the progress bar's label
    stop_after: int | None = None  # end early after this step with a checkpoint (tests: an interrupted run)
    record: bool = True  # False on the ranks of a distributed run other than 0: same steps, nothing written


class Stepper(Protocol):
    """What the loop needs from a way of taking steps."""

    def start(self) -> tuple[dict | None, dict | None]:
        """Evaluate before training: (the evaluation reported as "before", the dev evaluation); None where absent."""

    def step(self, step: int) -> tuple[float, float]:
        """Take training step `step` (1-based); (mean loss, mean |g|). Raises PrgeError on a non-finite loss."""

    def evaluate(self, step: int) -> dict | None:
        """The dev evaluation after `step` ({"accuracy", "loss", "n", ...}), or None without a dev split."""

    def save(self, folder: Path, step: int, state: dict) -> None:
        """Write a checkpoint of the weights after `step` (and `state`) into `folder`, atomically."""

    def load(self, folder: Path) -> dict:
        """Restore the checkpoint in `folder`; its trainer state (with "step")."""


def train(stepper: Stepper, plan: Plan, run_dir: Path, resume: Path | None = None, log=None,
          on_eval: Callable[[int, dict], None] | None = None) -> dict:
    """Run `plan` with `stepper`, writing metrics and checkpoints under `run_dir`; returns the loop state
    ({"best_accuracy", "best_step", "before", "seconds", "last_accuracy", "end", "stopped"}).

    `log(msg)` gets status lines; `on_eval(step, evaluation)` runs after each dev evaluation is recorded
    (the eager run redraws its curves there)."""
    log = log or (lambda msg: None)
    try:
        return _train(stepper, plan, run_dir, resume, log, on_eval)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        last = run_dir / "checkpoints" / "last"
        step = _saved_step(last)
        raise PrgeError(f"no space left on the device of {run_dir} ({e.filename or 'while writing'}); "
                        + (f"the last good checkpoint, step {step}, is intact in {last}" if step is not None else "no checkpoint was written yet"),
                        "free some space, then run the same command with --resume") from None


def _saved_step(folder: Path) -> int | None:
    import json

    try:
        return int(json.loads((io.resolve_dir(folder) / "trainer_state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _train(stepper: Stepper, plan: Plan, run_dir: Path, resume: Path | None, log, on_eval) -> dict:
    ckpts, metrics = run_dir / "checkpoints", run_dir / "metrics.jsonl"
    # the one writer of a run (rank 0 of a distributed run): metrics and checkpoints
    append = io.append_jsonl if plan.record else (lambda path, row: None)
    save = stepper.save if plan.record else (lambda folder, step, state: None)
    if plan.record:
        run_dir.mkdir(parents=True, exist_ok=True)
    state = {"best_accuracy": -1.0, "best_step": 0, "before": None, "before_loss": None, "seconds": 0.0}
    if resume is not None:
        saved = stepper.load(resume)
        start = saved["step"]
        state.update({k: saved[k] for k in LOOP_STATE if k in saved})
        if plan.record:
            io.truncate_metrics(metrics, start)
        log(f"resumed from {resume} at step {start}")
    else:
        start = 0
        if plan.record:
            metrics.unlink(missing_ok=True)
        before, dev0 = stepper.start()
        if before is not None:
            state["before"], state["before_loss"] = before["accuracy"], before["loss"]
        if dev0 is not None:
            state["best_accuracy"] = dev0["accuracy"]
            append(metrics, {"step": 0, "split": "dev", **dev0})
        save(ckpts / "best", 0, state)
        save(ckpts / "last", 0, state)  # a kill before the first step keeps the evaluations

    bar = _progress(plan, start)
    t_loop = time.time() - state["seconds"]
    end = max(start, min(plan.steps, plan.stop_after)) if plan.stop_after else plan.steps  # never below the resumed step
    last_acc = None
    try:
        for step in range(start + 1, end + 1):
            t = time.time()
            loss, g_abs = stepper.step(step)
            append(metrics, {"step": step, "loss": loss, "g_abs": g_abs, "seconds": time.time() - t})
            if plan.eval_every and step % plan.eval_every == 0 or step == plan.steps:
                state["seconds"] = time.time() - t_loop
                ev = stepper.evaluate(step)
                if ev is not None:
                    last_acc = ev["accuracy"]
                    append(metrics, {"step": step, "split": "dev", **ev})
                    if ev["accuracy"] > state["best_accuracy"]:
                        state["best_accuracy"], state["best_step"] = ev["accuracy"], step
                        save(ckpts / "best", step, state)
                save(ckpts / "last", step, state)
                if ev is not None and on_eval is not None:
                    on_eval(step, ev)
            elif plan.checkpoint_every and step % plan.checkpoint_every == 0 and step < end:
                state["seconds"] = time.time() - t_loop
                save(ckpts / "last", step, state)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", dev_acc="-" if last_acc is None else f"{last_acc:.3f}")
    finally:
        if bar is not None:
            bar.close()
    state["seconds"] = time.time() - t_loop
    stopped = bool(plan.stop_after) and end < plan.steps
    if stopped:
        save(ckpts / "last", end, state)
    return {**state, "last_accuracy": last_acc, "end": end, "stopped": stopped}


def _progress(plan: Plan, start: int):
    if not plan.progress or plan.steps == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=plan.steps, initial=start, desc=plan.desc, unit="step", dynamic_ncols=True, file=sys.stderr)
