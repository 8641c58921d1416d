"""The one stderr logger: progress and status lines for people, never the results (those are files)."""

from __future__ import annotations

import sys


def say(msg: str) -> None:
    """Print one status line to stderr, flushed at once (progress bars share the stream)."""
    print(msg, file=sys.stderr, flush=True)
