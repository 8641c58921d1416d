"""Seeded draws of rows, shared by every built-in task and by the user's own data.

Every draw is `seeded_sample`: a fresh `random.Random(seed)` shuffles the row indices and the first
n are taken. The result depends only on the seed, the rows and the sizes (Python's `random` is a
Mersenne Twister with a documented, platform-independent algorithm), so every run and every
machine gets the same rows.
"""

from __future__ import annotations

import random
from typing import Callable, Sequence, TypeVar

from prge.errors import PrgeError

T = TypeVar("T")
FIXED_SEED = 0  # the draw of carved and capped test sets, whatever --seed is


def seeded_sample(
    items: Sequence[T],
    n: int,
    seed: int,
    label_of: Callable[[T], int] | None = None,
    what: str = "rows",
) -> tuple[list[T], list[T]]:
    """Draw `n` of `items` without replacement; return (picked, rest).

    A fresh `random.Random(seed)` shuffles the indices of `items` and the first `n` are picked, in
    that shuffled order; `rest` keeps the original order. With `label_of`, the draw is
    class-balanced: classes (in sorted label order) are shuffled one after another with the same
    generator, each gives its quota (`n // k`, the first `n % k` classes one more), a short class
    gives all it has and the shortfall is drawn from the pooled leftovers, then the picked rows are
    shuffled once more so they are not grouped by class.
    """
    if n < 0:
        raise PrgeError(f"cannot draw {n} {what}", "the number of rows must be 0 or more")
    if n > len(items):
        raise PrgeError(f"asked for {n} {what} but only {len(items)} are available", f"ask for at most {len(items)}")
    rng = random.Random(seed)
    if label_of is None:
        order = list(range(len(items)))
        rng.shuffle(order)
        picked = order[:n]
    else:
        by_class: dict[int, list[int]] = {}
        for i, item in enumerate(items):
            by_class.setdefault(label_of(item), []).append(i)
        classes = sorted(by_class)
        k = len(classes)
        picked, leftover = [], []
        for j, c in enumerate(classes):
            idx = by_class[c]
            rng.shuffle(idx)
            quota = n // k + (1 if j < n % k else 0)
            picked += idx[:quota]
            leftover += idx[quota:]
        short = n - len(picked)
        if short:
            leftover.sort()
            rng.shuffle(leftover)
            picked += leftover[:short]
        rng.shuffle(picked)
    chosen = set(picked)
    return [items[i] for i in picked], [x for i, x in enumerate(items) if i not in chosen]


def fixed_sample(items: list[T], n: int, what: str) -> tuple[list[T], list[T]]:
    """(n rows drawn with the fixed seed, kept in file order; the rest): carved and capped test sets."""
    picked, _ = seeded_sample(list(range(len(items))), n, FIXED_SEED, what=what)
    chosen = set(picked)
    return [x for i, x in enumerate(items) if i in chosen], [x for i, x in enumerate(items) if i not in chosen]
