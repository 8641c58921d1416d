"""One run per run folder: `prge train` and `prge device-train` (Python loop and --native) hold
OUT/.prge.lock while they run, so a second run into the same --out is refused instead of mixing two
trajectories' checkpoints and metrics.

The lock is an `flock` on that file, which the kernel drops when the holder exits however it exits
(SIGKILL included), and the file names the holder's pid so the refusal can say who holds it. A lock
file left by a killed run is therefore free and is taken over (the log says whose it was). The file
is removed when the run ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
from pathlib import Path
from typing import Iterator

from prge.errors import PrgeError

LOCK_NAME = ".prge.lock"


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""
    return text


def _describe(text: str) -> str:
    parts = text.split(maxsplit=2)
    if not parts:
        return "another prge run"
    who = f"prge run pid {parts[0]}"
    if len(parts) > 1 and parts[1] != socket.gethostname():
        who += f" on {parts[1]}"
    return who + (f" ({parts[2]})" if len(parts) > 2 else "")


def check_out_dir(run_dir: Path) -> None:
    """A run folder must be a folder: a file there (or above it) is a clear error, not a traceback."""
    for p in (run_dir, *run_dir.parents):
        if p.exists():
            if not p.is_dir():
                raise PrgeError(f"{p} is a file, not a folder", f"pass a folder path to --out (not {p})")
            break


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike, log=None) -> Iterator[Path]:
    """Hold the lock of `run_dir` (created if needed) for the body; PrgeError if a live run holds it.

    A folder this call created is removed again if the body fails and left it holding only the lock,
    so a refused run writes nothing."""
    run_dir = Path(run_dir)
    check_out_dir(run_dir)
    created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]  # removed again on failure
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PrgeError(f"cannot create the run folder {run_dir} ({e.strerror})", "pass a writable --out") from None
    path = run_dir / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            _remove_if_created(run_dir, created)
            raise PrgeError(f"cannot write in the run folder {run_dir} ({e.strerror})", "pass a writable --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _holder(fd)
            os.close(fd)
            raise PrgeError(f"{run_dir} is in use by {_describe(holder)}",
                            "wait for that run to finish (or stop it), or pass another --out") from None
        try:  # the holder we waited out may have removed the file: lock the file that is there now
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    previous = _holder(fd)
    if previous and log is not None:
        log(f"prge: took over the lock of {run_dir} left by {_describe(previous)}, which is no longer running")
    os.ftruncate(fd, 0)
    cmd = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv[:3]))
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {cmd}\n".encode(), 0)
    ok = False
    try:
        yield run_dir
        ok = True
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)
        if not ok:
            _remove_if_created(run_dir, created)


def _remove_if_created(run_dir: Path, created: list[Path]) -> None:
    for p in created:  # innermost first; a folder that is not empty stays
        try:
            p.rmdir()
        except OSError:
            return
