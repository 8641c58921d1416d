"""Atomic writes: a crash (or Ctrl-C, or a full disk) never leaves a half-written file or folder.

Every writer in prge goes through here. A file is written to a temporary name in the *same* folder
(so the final `os.replace` is a rename within one filesystem, which POSIX makes atomic), flushed and
fsynced before the rename, and the folder is fsynced after it, so that after a power cut a reader
sees either the old contents or the new ones, never a mix or an empty file.

Folders (an adapter, a merged model: several files that only make sense together) are built in a
temporary folder beside the target and swapped in with two renames: `path` -> `path.old`, then
temp -> `path`. No filesystem renames over a non-empty folder atomically, so there is a moment
where only `path.old` exists; `resolve_dir` lets readers find it if a crash hit exactly then.

Content hashes, so that a flipped bit is refused rather than trained on: every folder written by
`atomic_dir` (checkpoints, adapters) gets a `SHA256SUMS` file in coreutils format (`sha256sum -c
SHA256SUMS` checks it by hand) that `verify_dir` checks on load, and every safetensors file written
by `save_tensors` carries the SHA-256 of its tensors in its metadata ("prge_sha256"), which
`load_tensors` checks. Files written before hashes existed have neither and are read as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

from prge.errors import PrgeError


def _umask_mode(base: int) -> int:
    """`base` masked by the process umask: what a plain open()/mkdir() would have produced.

    mkstemp/mkdtemp create 0600/0700 entries; without this an atomically written file would be
    private while the same file written the ordinary way would be readable by the group.
    """
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable. Best effort: some platforms cannot open a directory."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _temp_file_beside(path: Path) -> Iterator[Path]:
    """A temporary file name next to `path`; renamed onto `path` if the body succeeds, removed otherwise.

    The body writes the file (by name, so library writers such as safetensors can be used); this
    function fsyncs it, fixes its mode and renames it into place.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file in the same folder, fsync, os.replace)."""
    with _temp_file_beside(Path(path)) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def _old(path: Path) -> Path:
    return path.with_name(path.name + ".old")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; on success it replaces `path` as a whole.

    The swap is: fsync the new files, rename an existing `path` to `path.old`, rename the temp
    folder to `path`, remove `path.old`. If the body raises, the temp folder is removed and `path`
    is untouched. The whole folder is replaced: files in the old `path` that the body did not
    write again are gone afterwards, which is the point (an adapter folder never mixes two saves).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        write_sums(tmp)
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                with open(os.path.join(root, name), "rb+") as f:
                    os.fsync(f.fileno())
            _fsync_dir(Path(root))
        os.chmod(tmp, _umask_mode(0o777))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = _old(path)
    if path.exists():
        if old.exists():  # left by a crash after the last swap's second rename: `path` is the good copy
            shutil.rmtree(old)
        os.replace(path, old)
    # (if only `old` exists, a crash hit between the renames last time; it is replaced now)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def resolve_dir(path: str | os.PathLike) -> Path:
    """`path`, or `path.old` when only that exists (a crash between atomic_dir's two renames)."""
    path = Path(path)
    if not path.exists() and _old(path).is_dir():
        return _old(path)
    return path


SUMS = "SHA256SUMS"
TENSORS_SHA256 = "prge_sha256"  # the safetensors metadata key holding `tensors_sha256` of the file's tensors


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_sums(folder: Path) -> None:
    """SHA256SUMS over every file under `folder` (coreutils format: `<hex>  <relative path>`)."""
    lines = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            p = Path(root) / name
            rel = p.relative_to(folder).as_posix()
            if rel != SUMS:
                lines.append(f"{sha256_file(p)}  {rel}\n")
    with open(folder / SUMS, "w") as f:
        f.write("".join(lines))


def verify_dir(folder: str | os.PathLike) -> None:
    """Check every file listed in `folder`/SHA256SUMS; a folder without one (written before hashes) passes."""
    folder = Path(folder)
    sums = folder / SUMS
    if not sums.is_file():
        return
    fix = "restore the folder from a copy, or use an earlier checkpoint (checkpoints/best or another run)"
    try:
        entries = [line.split("  ", 1) for line in sums.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError):
        entries = None
    if entries is None or any(len(e) != 2 or len(e[0]) != 64 for e in entries):
        raise PrgeError(f"{sums} is damaged (not a list of SHA-256 sums)", fix)
    for digest, rel in entries:
        p = folder / rel
        if not p.is_file():
            raise PrgeError(f"{p} is missing (listed in {sums})", fix)
        if sha256_file(p) != digest:
            raise PrgeError(f"{p} is damaged: its SHA-256 differs from the one recorded when it was written ({sums})", fix)


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the tensor's own buffer: a copy would double a 76 MB state at the peak
    return h.hexdigest()


def check_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None) -> None:
    """Refuse tensors whose hash differs from the one their file recorded (files without one pass)."""
    recorded = (metadata or {}).get(TENSORS_SHA256)
    if recorded is not None and recorded != tensors_sha256(tensors):
        raise PrgeError(f"{path} is damaged: its tensors' SHA-256 differs from the one recorded when it was written",
                        "write the file again (or restore it from a copy)")


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomically write a safetensors file. metadata defaults to {"format": "pt"}, which
    transformers and PEFT expect of a PyTorch safetensors file; the tensors' SHA-256 is added to it."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    metadata = {**(metadata or {"format": "pt"}), TENSORS_SHA256: tensors_sha256(tensors)}
    with _temp_file_beside(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_tensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file, checking its recorded hash; a missing, unreadable or damaged file is a
    PrgeError naming it, not a traceback."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise PrgeError(f"{path} does not exist", "check the path (a save that crashed leaves the previous file)")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types (and OSError) for a damaged file
        raise PrgeError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__})",
                        "write it again") from None
    check_tensors(path, tensors, metadata)
    return {k: v.to(device) for k, v in tensors.items()} if device != "cpu" else tensors


def text_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file (a leading BOM is dropped); bytes that are not UTF-8 text are a
    PrgeError naming file:line, not a UnicodeDecodeError."""
    data = Path(path).read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise PrgeError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})",
                        "save the file as UTF-8 text (a binary or differently encoded file cannot be read)") from None
    if "\0" in text:
        line = text[:text.index("\0")].count("\n") + 1
        raise PrgeError(f"{path}:{line}: holds a NUL byte, so it is not a text file", "save the file as UTF-8 text")
    lines = text.split("\n")  # only "\n" ends a line (as when iterating a file), not the other characters str.splitlines splits on
    return [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON Lines file; a bad line names file:line."""
    rows = []
    for lineno, line in enumerate(text_lines(path), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except RecursionError:
            raise PrgeError(f"{path}:{lineno}: JSON nested too deeply to read", "write flat objects: one row per line") from None
        except json.JSONDecodeError as e:
            fix = ("write one JSON object per line (JSON Lines), not a JSON array" if line.lstrip().startswith("[")
                   else "fix the line; each line must be one complete JSON object")
            raise PrgeError(f"{path}:{lineno}: invalid JSON ({e.msg})", fix) from None
        if not isinstance(obj, dict):
            raise PrgeError(f"{path}:{lineno}: expected a JSON object, found {type(obj).__name__}",
                            "write one JSON object per line (JSON Lines)")
        rows.append((lineno, obj))
    return rows


def append_jsonl(path: Path, row: dict) -> None:
    """One metrics row (appending a line is atomic enough: a torn last line is dropped on resume)."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics rows after `step` (a resumed run writes them again), atomically."""
    path = Path(path)
    if path.is_file():
        rows = []
        for line in path.read_text().splitlines():
            try:
                if line.strip() and json.loads(line)["step"] <= step:
                    rows.append(line)
            except (json.JSONDecodeError, KeyError):
                continue  # a line torn by a kill mid-write
        atomic_write_text(path, "".join(r + "\n" for r in rows))
