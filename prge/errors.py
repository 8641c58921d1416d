"""The one exception type users see: a one-line message naming the problem and the fix."""


class PrgeError(Exception):
    """A user-facing error. The CLI prints `error: <message>` and exits 2, never a traceback."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem} — {fix}")
