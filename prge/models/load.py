"""Loading the model to fine-tune: a built-in name, a local folder, or a Hugging Face hub id.

Every model comes back the same way: a Hugging Face causal LM in eval mode with eager attention
and no KV cache, plus its tokenizer with a pad token. Eager attention because the exported
ExecuTorch programs are traced from these modules, and the SDPA/flash paths do not export (or
export to ops the runtime lacks); the KV cache is useless for scoring fixed batches and adds
outputs to the traced graph.

Built-in models are fetched by `prge.models.builtin`; the hub probe is `prge.models.hub`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from prge.errors import PrgeError
from prge.models import hub
from prge.models.builtin import BUILTINS, builtin_folder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
        config = json.loads((folder / "config.json").read_bytes().decode("utf-8"))
    except (OSError, ValueError) as e:
        raise PrgeError(f"{folder / 'config.json'} is not readable JSON ({_first_line(e)})",
                        "pass a folder saved with save_pretrained (config.json, weights, tokenizer)") from None
    if not isinstance(config, dict):
        raise PrgeError(f"{folder / 'config.json'} is not a JSON object", "pass a folder saved with save_pretrained")
    try:
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, attn_implementation="eager")
        model.to(torch_dtype)  # a no-op, except on transformers releases that ignore `dtype=`
    except Exception as e:  # transformers raises a zoo of types for a folder it cannot read
        raise PrgeError(f"could not load a causal LM from {folder}: {_first_line(e)}",
                        "pass a folder saved with save_pretrained holding a causal LM and its tokenizer")
    return model, tok


def _load_hub(name: str, torch_dtype):
    """The ordinary hub path (`from_pretrained(name)`), made fast and clear when there is no network.

    Without network, huggingface_hub retries for most of a minute before failing; so first probe the
    endpoint for a few seconds and, if it is unreachable, look only in the local hub cache.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    offline = hub.offline()
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
