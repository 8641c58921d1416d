"""The engine's files, in one place: the program manifest, the pre-tokenised data, the adapter it writes.

A program `X.pte` travels with two files that `prge.engine.export` writes beside it:

    X.pte.json                 the manifest: format, the identity fields below, shapes, the LoRA
                               layer table (name, shape, offset into the flat B), methods, hashes
    X.pte.adapter.safetensors  the frozen A matrices, so a run can write a PEFT adapter without the model

and its data is one safetensors file (`write_dataset`). `check_manifest` refuses a program whose
identity fields (`IDENTITY`) disagree with the data or the model meant for it. This module needs
only torch, safetensors and prge's small pure modules, so the on-device loop can import it without
the model code; the C++ runner (`prge/engine/native/`) reads the same files.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

import prge
from prge import io
from prge.data.batch import Encoded, collate
from prge.errors import PrgeError

FORMAT = "prge-engine-program"
FORMAT_VERSION = 1
DATA_FORMAT = "prge-engine-data"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# fields that must agree between a program's manifest and the data (or model) fed to it, with the
# export option that changes each
IDENTITY = {
    "model": "--model",
    "vocab_size": "--model (its tokenizer)",
    "vocab_sha256": "--model (its tokenizer)",
    "pad_id": "--model (its tokenizer)",
    "batch_size": "--batch-size",
    "max_length": "--max-length",
    "answer_slots": "--max-length and the data (answer tokens per example)",
    "q": "--q",
    "loss": "--loss",
    "label_ids": "--task / --label-words",
    "layers": "--rank / --targets / --layers",
}
SPLIT_FIELDS = ("input_ids", "target_pos", "target_ids", "target_mask", "label")
# the options of a device run that a program records at export ("run_defaults" in the manifest)
RUN_DEFAULTS = ("seed", "steps", "lr", "eps", "lr_schedule", "eval_every", "checkpoint_every", "normalize")
# and those of the label readout's host step after the loop (`prge.engine.runtime.fit_readout`)
READOUT_DEFAULTS = ("readout", "readout_steps", "readout_lr", "readout_rows")
# the methods `prge export` writes by default and training needs (the C++ runner loads the same list)
METHODS = ("train_step", "read_state", "read_raw", "write_raw", "evaluate")
# what a program says about itself: constant methods of the .pte (as ExecuTorch's LLM export passes
# `get_max_seq_len`), from the manifest fields named here; the C++ runner reads these, not the manifest
CONSTANT_METHODS = {"get_identity_sha256": "identity_sha256", "get_noise": "noise", "get_q": "q",
                    "get_batch_size": "batch_size", "get_max_seq_len": "max_length", "get_answer_slots": "answer_slots",
                    "get_eval_batch_size": "eval_batch_size", "get_total": "total", "get_vocab_size": "vocab_size",
                    "get_min_eps": "min_eps"}


def identity_sha256(fields: dict) -> str:
    """sha256 of the canonical JSON (sorted keys, no spaces) of the `IDENTITY` fields present in
    `fields` (a manifest, or a data file's metadata, which copies them from its manifest): a program
    and its data agree iff their hashes do."""
    ident = {k: fields[k] for k in IDENTITY if k in fields}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------
# manifest and data


def manifest_path(program_path: str | os.PathLike) -> Path:
    return Path(str(program_path) + ".json")


def lora_a_path(program_path: str | os.PathLike) -> Path:
    return Path(str(program_path) + ".adapter.safetensors")


def load_manifest(program_path: str | os.PathLike) -> dict:
    path = manifest_path(program_path)
    if not path.is_file():
        raise PrgeError(f"{path} not found (every prge program has its manifest beside it)",
                        "export the program with `prge export`, which writes both")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise PrgeError(f"{path} is not valid JSON ({e})", "re-export the program") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PrgeError(f"{path} is not a prge program manifest", "re-export the program with `prge export`")
    if "manifest_sha256" in manifest and seal(manifest)["manifest_sha256"] != manifest["manifest_sha256"]:
        raise PrgeError(f"{path} is damaged: its fields do not match the manifest_sha256 recorded at export",
                        "export the program again (or restore the manifest from a copy)")
    return manifest


def _is_int(x, low: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


# fields older manifests lack (checked when present)
OPTIONAL_FIELDS = {"run_defaults", "min_eps", "readout"}
# the fields the loops read, with what each must be
_MANIFEST_FIELDS = {
    "q": lambda x: _is_int(x, 1), "copies": lambda x: _is_int(x, 2), "total": lambda x: _is_int(x, 1),
    "batch_size": lambda x: _is_int(x, 1), "max_length": lambda x: _is_int(x, 1), "answer_slots": lambda x: _is_int(x, 1),
    "eval_batch_size": lambda x: _is_int(x, 1), "vocab_size": lambda x: _is_int(x, 1), "pad_id": lambda x: _is_int(x),
    "model": lambda x: isinstance(x, str), "noise": lambda x: x in ("counter", "host", "engine"),
    "loss": lambda x: x in ("class", "lm"), "methods": lambda x: isinstance(x, dict),
    "adapter_config": lambda x: isinstance(x, dict),
    "label_ids": lambda x: x is None or (isinstance(x, list) and len(x) >= 2 and all(_is_int(i) for i in x)),
    "layers": lambda x: isinstance(x, list) and len(x) > 0 and all(
        isinstance(layer, dict) and isinstance(layer.get("name"), str) and _is_int(layer.get("offset"))
        and isinstance(layer.get("shape"), list) and len(layer["shape"]) == 2 and all(_is_int(d, 1) for d in layer["shape"])
        for layer in x),
    "run_defaults": lambda x: isinstance(x, dict),
    "min_eps": lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < 1,
    "readout": lambda x: isinstance(x, dict) and isinstance(x.get("head"), str) and _is_int(x.get("hidden_size"), 1)
    and (x.get("softcap") is None or isinstance(x["softcap"], (int, float))),
}


def check_manifest_fields(manifest: dict, path) -> None:
    """Every field the loops read is present with a value of its kind (a hand-edited or foreign
    manifest is one clear error, not a KeyError in the middle of a run)."""
    for key, ok in _MANIFEST_FIELDS.items():
        if key in OPTIONAL_FIELDS and key not in manifest:
            continue
        if key not in manifest or not ok(manifest[key]):
            raise PrgeError(f"{path}: field {key!r} is {'missing' if key not in manifest else 'not valid (' + _short(manifest[key]) + ')'}",
                            "export the program again with `prge export`")
    ranks = manifest.get("ranks", 1)
    if not isinstance(ranks, int) or isinstance(ranks, bool) or ranks < 1 or manifest["q"] % ranks:
        raise PrgeError(f"{path}: field 'ranks' is not valid ({_short(ranks)})", "export the program again with `prge export`")
    if manifest["copies"] != 2 * manifest["q"] // ranks:
        raise PrgeError(f"{path}: copies ({manifest['copies']}) is not 2·q/ranks ({2 * manifest['q'] // ranks})", "export the program again")


def seal(manifest: dict) -> dict:
    """`manifest` with "manifest_sha256": the SHA-256 of its other fields, checked by `load_manifest`."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return {**body, "manifest_sha256": hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()}


def verify_program(program_path: str | os.PathLike, manifest: dict) -> None:
    """Refuse a .pte whose size or SHA-256 differs from what its manifest recorded at export."""
    path = Path(program_path)
    size = path.stat().st_size
    if manifest.get("program_bytes") not in (None, size):
        raise PrgeError(f"{path} is {size} bytes but its manifest says {manifest['program_bytes']} (truncated or replaced)",
                        "export the program again (the manifest and the .pte are written together)")
    if manifest.get("program_sha256") and io.sha256_file(path) != manifest["program_sha256"]:
        raise PrgeError(f"{path} is damaged: its SHA-256 differs from the program_sha256 its manifest recorded at export",
                        "export the program again (or restore it from a copy)")


# smallest ε each quantised base takes. Below it the int8 activation rounding error in L+ − L- swamps the
# difference (benchmarks/quantized.py eps-eager; README "Quantised programs"). 8da8w: 1e-2, where it still
# trains (SmolLM2's program: best dev 82.0 / 83.5% on seeds 0 / 1, 84.5 / 83.5 at 3e-2; Gemma eager: 85.6 /
# 83.0% test, 80.0 at 3e-2) though its g is noisier (signal / error 0.86). 8da4w: 3e-2, where its g first
# follows fp32's (correlation 0.54; 0.03 at 1e-2).
MIN_EPS_BY_QUANTIZATION = {"8da8w": 1e-2, "8da4w": 3e-2}
QUANTIZED_MIN_EPS = max(MIN_EPS_BY_QUANTIZATION.values())  # an unknown quantisation's floor
# the ε `prge export --quantize` records for the device run where --eps is not given: SmolLM2's 8da8w program
# ends higher at 3e-2 than at 1e-2 after 300 steps (dev 81.5 / 80.5% against 80.0 / 72.0% on seeds 0 / 1);
# Gemma-3 does better at 1e-2 (pass --eps 1e-2)
QUANTIZED_DEFAULT_EPS = 3e-2


def quantized_min_eps(quantization: str | None) -> float:
    """The ε floor of a base quantised with `quantization` (0 for fp32)."""
    if quantization in (None, "none"):
        return 0.0
    return MIN_EPS_BY_QUANTIZATION.get(quantization, QUANTIZED_MIN_EPS)


def min_eps(manifest: dict) -> float:
    """The smallest ε the program's base resolves: the manifest's `min_eps` (the program's own
    `get_min_eps` returns the same), and at least its quantisation's floor (quantized_min_eps: a
    manifest from before the field, or from before a floor was raised, recorded less). The C++
    runner applies the same rule."""
    return max(float(manifest.get("min_eps", 0.0)), quantized_min_eps(manifest.get("quantization")))


def check_eps(manifest: dict, eps: float) -> None:
    """Refuse an ε the program's base cannot resolve (a quantised base needs ε >= its min_eps)."""
    least = min_eps(manifest)
    if eps < least:
        raise PrgeError(f"eps={eps:g} is below what a {manifest.get('quantization')} program resolves (min_eps {least:g}): the int8 "
                        "activation rounding swamps L+ - L- at small eps",
                        f"pass --eps {least:g} or larger, or export with --quantize none")


def _short(x) -> str:
    s = repr(x)
    return s if len(s) <= 48 else s[:22] + "…" + s[-22:]


def check_manifest(manifest: dict, data_meta: dict) -> None:
    """Refuse a program whose manifest disagrees with the data (or model) meant for it.

    Compares every identity field present in both (model, tokenizer vocabulary, b, T, K, q, loss,
    label ids, LoRA layers) and raises a PrgeError naming the first difference and the fix.
    `data_meta` is a dataset's metadata (`read_dataset`) or `prge.engine.export.model_meta(model, tok)`.
    """
    if manifest.get("format") != FORMAT:
        raise PrgeError("not a prge program manifest", "export the program with `prge export`")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise PrgeError(f"the program was exported by a newer prge (manifest version {manifest.get('format_version')})",
                        "upgrade prge or re-export the program with this version")
    name = manifest.get("program", "the program")
    for key, flag in IDENTITY.items():
        if key not in manifest or key not in data_meta or manifest[key] == data_meta[key]:
            continue
        if key == "layers":
            a = [(x["name"], tuple(x["shape"])) for x in manifest[key]]
            b = [(x["name"], tuple(x["shape"])) for x in data_meta[key]]
            if a == b:
                continue
            diff = next((f"{x} vs {y}" for x, y in zip(a, b) if x != y), f"{len(a)} vs {len(b)} layers")
            what = f"its LoRA layers differ from the data/model's ({diff})"
        else:
            what = f"{key} is {_short(manifest[key])} in the program but {_short(data_meta[key])} in the data/model"
        raise PrgeError(f"{name} does not match: {what}",
                        f"re-export the program for this data/model (prge export ... {flag}); "
                        "prge export writes a matching dataset beside the program")
    if "identity_sha256" in data_meta and data_meta["identity_sha256"] != identity_sha256(manifest):
        raise PrgeError(f"{name} does not match: the data was written for another program (identity hash "
                        f"{data_meta['identity_sha256'][:12]} vs {identity_sha256(manifest)[:12]})",
                        "re-export the program for this data, or write the data for it with `prge export`")


def read_dataset(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a file written by `prge.engine.formats.write_dataset`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise PrgeError(f"data file {path} not found", "pass the .data.safetensors file that `prge export` wrote")
    try:
        with safe_open(str(path), framework="pt") as f:
            file_meta = f.metadata() or {}
            raw_meta = file_meta.get("prge")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise PrgeError(f"{path} is not a readable data file ({e})", "write it again with `prge export`") from None
    io.check_tensors(path, tensors, file_meta)
    try:
        meta = json.loads(raw_meta) if raw_meta else None
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != DATA_FORMAT:
        raise PrgeError(f"{path} is not a prge engine data file (no 'prge' metadata)", "write it with `prge export`")
    for split in ("train", "dev"):
        n = meta.get(f"n_{split}", 0)
        for f in SPLIT_FIELDS:
            t = tensors.get(f"{split}_{f}")
            if n and (t is None or t.shape[0] != n):
                raise PrgeError(f"{path}: {split}_{f} is missing or has the wrong length", "write the file again")
    return tensors, meta


def check_data_shapes(tensors: dict[str, torch.Tensor], manifest: dict, path) -> None:
    T, K = manifest["max_length"], manifest["answer_slots"]
    for split in ("train", "dev"):
        ids = tensors.get(f"{split}_input_ids")
        if ids is None:
            continue
        if ids.shape[1] != T or tensors[f"{split}_target_pos"].shape[1] != K:
            raise PrgeError(f"{path}: {split} examples are padded to T={ids.shape[1]}, K={tensors[f'{split}_target_pos'].shape[1]}; "
                            f"the program takes T={T}, K={K}", "write the data for this program with `prge export`")
        if int(ids.max()) >= manifest["vocab_size"] or int(ids.min()) < 0:
            raise PrgeError(f"{path}: token ids outside the program's vocabulary", "write the data for this program")


def write_adapter(folder: str | os.PathLike, manifest: dict, lora_a: dict[str, torch.Tensor], b_flat: torch.Tensor,
                  readout=None) -> Path:
    """Write a PEFT LoRA adapter from the flat clean B (read_state) and the export-time A matrices,
    in exactly the format of `prge.run.adapters.save_adapter` (the config was taken from it at export),
    with the device's label `readout` (`prge.zo.readout.Readout`) on the LM head if given."""
    tensors = {}
    for layer in manifest["layers"]:
        name, (out, r), off = layer["name"], layer["shape"], layer["offset"]
        a_key = f"{PEFT_PREFIX}{name}.lora_A.weight"
        if a_key not in lora_a:
            raise PrgeError(f"the program's A matrices lack {name}", "re-export the program")
        tensors[a_key] = lora_a[a_key]
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b_flat[off:off + out * r].reshape(out, r).clone()
    config, sidecar = json.loads(json.dumps(manifest["adapter_config"])), None
    if readout is not None:
        from prge.zo.readout import add_to_peft

        sidecar = add_to_peft(readout, manifest["readout"]["head"], manifest["vocab_size"], config, tensors, PEFT_PREFIX)
    folder = Path(folder)
    with io.atomic_dir(folder) as tmp:
        io.atomic_write_json(Path(tmp) / ADAPTER_CONFIG, config)
        io.save_tensors(Path(tmp) / ADAPTER_WEIGHTS, tensors)
        if sidecar:
            from prge.zo.readout import SIDECAR

            io.atomic_write_json(Path(tmp) / SIDECAR, sidecar)
    return folder




def final_b(out_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The B matrices of a finished run's adapter, by module name (for tests and tools)."""
    t = io.load_tensors(Path(out_dir) / "adapter" / ADAPTER_WEIGHTS)
    return {k[len(PEFT_PREFIX):-len(".lora_B.weight")]: v for k, v in t.items() if k.endswith(".lora_B.weight")}


def write_dataset(path: str | os.PathLike, data, manifest: dict) -> dict:
    """Write the train and dev examples, padded to the program's (T, K), as one safetensors file.

    `data` is a `prge.run.train.Setup` (its .train / .dev / .pad_id) or a dict {"train": [Encoded],
    "dev": [Encoded]} (pad id: manifest["pad_id"]). The file holds, for each split s in train, dev:

        s_input_ids   int32 (n, T)   prompt + answer, right-padded with pad_id
        s_target_pos  int32 (n, K)   position whose next-token logits predict answer token k
        s_target_ids  int32 (n, K)   the answer tokens (pad_id in unused slots)
        s_target_mask float32 (n, K) 1 for real answer tokens
        s_label       int32 (n,)     class index into the label words, -1 for completions

    and the metadata key "prge" (a JSON string): format, the program's identity fields (model,
    vocabulary hash, b, T, K, q, loss, label ids, layers) and n_train / n_dev. safetensors is
    an 8-byte header length, a JSON header, and raw little-endian tensors: trivial to read from C++.
    Returns the metadata.
    """
    if isinstance(data, dict):
        splits, pad_id = data, manifest["pad_id"]
    else:
        splits, pad_id = {"train": data.train, "dev": data.dev}, data.pad_id
    T, K = manifest["max_length"], manifest["answer_slots"]
    tensors = {}
    for split in ("train", "dev"):
        items: list[Encoded] = list(splits.get(split) or [])
        if not items:
            if split == "train":
                raise PrgeError("no training examples to write", "check the data")
            continue
        b = collate(items, pad_id, T, K)
        tensors[f"{split}_input_ids"] = b.input_ids.to(torch.int32)
        tensors[f"{split}_target_pos"] = b.target_pos.to(torch.int32)
        tensors[f"{split}_target_ids"] = b.target_ids.to(torch.int32)
        tensors[f"{split}_target_mask"] = b.target_mask.to(torch.float32)
        tensors[f"{split}_label"] = b.label.to(torch.int32)
    meta = {"format": DATA_FORMAT, "format_version": FORMAT_VERSION, "prge_version": prge.__version__,
            **{k: manifest[k] for k in IDENTITY if k in manifest},
            "identity_sha256": identity_sha256(manifest),
            "n_train": len(splits["train"]), "n_dev": len(splits.get("dev") or [])}
    io.save_tensors(path, tensors, metadata={"format": "pt", "prge": json.dumps(meta)})
    return meta
