"""Learning-rate schedules: pure Python, computed on the host (eager trainer, Python and C++ device
loops, which repeats `lr_at` in native/options.cpp), so a schedule changes no exported program."""

from __future__ import annotations

import math

from prge.errors import PrgeError

LR_SCHEDULES = ("constant", "linear", "cosine")


def check_schedule(name: str) -> None:
    """The one user-facing check of a schedule name (prge train's config, prge device-train)."""
    if name not in LR_SCHEDULES:
        raise PrgeError(f"unknown lr schedule {name!r}", f"pass --lr-schedule {' / '.join(LR_SCHEDULES)}")


def lr_at(lr: float, schedule: str, step: int, steps: int) -> float:
    """The learning rate of the update made from step `step`'s g (steps count from 1) in a run of `steps`.

    constant: lr. linear: lr·(1 − (step−1)/steps). cosine: lr·(1 + cos(π(step−1)/steps))/2. Both decays
    start at lr on step 1 and would reach 0 one step after the last. Step 0 (no g yet) gets lr. The host
    computes it (eager trainer, Python and C++ device loops: the same double arithmetic, then float32 in
    the program), so a schedule changes no exported program.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r} (choose from {', '.join(LR_SCHEDULES)})")
    if schedule == "constant" or step < 1 or steps < 1:
        return lr
    x = (step - 1) / steps
    return lr * (1.0 - x) if schedule == "linear" else lr * 0.5 * (1.0 + math.cos(math.pi * x))
