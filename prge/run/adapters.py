"""LoRA adapters in PEFT's on-disk format, and merging them into the base model.

We write and read exactly what `peft` writes (`adapter_config.json` + `adapter_model.safetensors`
with keys `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`), so an adapter trained here
loads with `peft.PeftModel.from_pretrained(base, folder)` — and into vLLM, TGI, llama.cpp's
converter... — and an adapter trained with PEFT loads here, without prge being needed at inference
and without peft being needed here (peft is only a test dependency).

An MP-LoRA layer at inference is plain LoRA: y = W x + (alpha / r) · B A x with the clean B, which
is PEFT's LoRA with `use_rslora=False`. Shapes match PEFT's too: A is (r, in) and B is (out, r)
for nn.Linear *and* for GPT-2's Conv1D (PEFT's `fan_in_fan_out` only transposes the base weight, not
A or B). What MP-LoRA cannot represent (per-module ranks or alphas, DoRA, rsLoRA scaling, trained
biases, extra saved modules, inits that rewrite the base weights) is refused on load with a
PrgeError rather than loaded into something that predicts differently.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from prge.errors import PrgeError
from prge.io import atomic_dir, atomic_write_json, load_tensors, resolve_dir, save_tensors, verify_dir
from prge.zo import readout
from prge.zo.lora import MPLoRALinear, in_out, add_lora, lora_layers

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"  # PEFT before safetensors became the default
READOUT_NAME = readout.SIDECAR  # marks the LM head's LoRA as prge's label readout (`prge.zo.readout`)
PREFIX = "base_model.model."  # PeftModel.base_model (LoraModel) .model (the HF model)

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
# init_lora_weights values that only set A and B. The others (pissa, olora, corda, loftq, lora_ga,
# mica) also rewrite the base weights when PEFT loads the adapter, so the adapter is only correct
# on top of that rewritten base.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
_FIX_WITH_PEFT = ("merge it with peft (`PeftModel.from_pretrained(base, folder).merge_and_unload()`), "
                  "save that, and use it as the base model")


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def _number(x: float) -> int | float:
    """PEFT types lora_alpha as int; write an int when it is one so the config looks like PEFT's."""
    return int(x) if float(x).is_integer() else float(x)


def save_adapter(model: nn.Module, folder: str | os.PathLike, base_name_or_path: str | None = None) -> Path:
    """Write the model's LoRA layers (their clean B) as a PEFT LoRA adapter in `folder`.

    `target_modules` lists the exact wrapped module names, so PEFT wraps exactly those modules
    (PEFT matches a listed name exactly before it tries suffixes) even when training covered only
    some layers. The two files are written into an `atomic_dir` and swapped in together: a crash
    never leaves new weights next to an old config (e.g. a different rank), which would load into
    garbage or fail far from the cause. The folder is replaced as a whole, so keep nothing else in it.
    """
    layers = lora_layers(model)
    if not layers:
        raise PrgeError("the model has no LoRA layers to save", "add them with prge.zo.lora.add_lora (or load an adapter) first")
    ranks = {m.rank for m in layers.values()}
    alphas = {m.alpha for m in layers.values()}
    if len(ranks) > 1 or len(alphas) > 1:
        raise PrgeError(f"LoRA layers have different ranks {sorted(ranks)} or alphas {sorted(alphas)}",
                        "use one rank and alpha for every layer (add_lora does)")
    rank, alpha = ranks.pop(), alphas.pop()
    if base_name_or_path is None:
        base_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name_or_path,
        "revision": None,
        "r": rank,
        "lora_alpha": _number(alpha),
        "target_modules": sorted(layers),
        "exclude_modules": None,
        "lora_dropout": 0.0,
        "bias": "none",
        # PEFT sets this per layer anyway (with a warning when it disagrees with the module type);
        # true when any target is GPT-2's Conv1D, as peft's own save of such a model says.
        "fan_in_fan_out": any(_is_conv1d(m.base) for m in layers.values()),
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    tensors = {}
    for name, m in layers.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().cpu()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().cpu()
    ro, sidecar = readout.get(model), None
    if ro is not None:
        sidecar = readout.add_to_peft(ro, head_name(model), model.get_output_embeddings().weight.shape[0], config, tensors, PREFIX)
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        atomic_write_json(tmp / CONFIG_NAME, config)
        save_tensors(tmp / WEIGHTS_NAME, tensors)
        if sidecar:
            atomic_write_json(tmp / READOUT_NAME, sidecar)
    return folder


def head_name(model: nn.Module) -> str:
    head = model.get_output_embeddings()
    for name, m in model.named_modules():
        if m is head:
            return name
    raise PrgeError("the model's LM head is not one of its modules", "report this as a bug in prge")


def _split_readout(config: dict, pairs: dict, folder: Path, model: nn.Module):
    """(pairs without the label readout's, the readout or None): the readout is the LM head's LoRA when
    prge's READOUT_NAME file names it; rank_pattern / alpha_pattern may then name that module only."""
    path = folder / READOUT_NAME
    if not path.is_file():
        return pairs, None
    try:
        side = json.loads(path.read_text())
        head, ids = side["module"], torch.tensor(side["label_ids"], dtype=torch.long)
        a, b = pairs[head]
    except (OSError, ValueError, KeyError, TypeError):
        raise PrgeError(f"{path} does not match the adapter's weights", "save the adapter again") from None
    r = a.shape[0]
    if config.get("rank_pattern") != {head: r} or config.get("alpha_pattern") not in ({head: r}, {head: float(r)}):
        raise PrgeError(f"the adapter in {folder} has a label readout on {head} but its rank_pattern / alpha_pattern "
                        "are not that module's rank", "save the adapter again")
    if head != head_name(model) or b.shape != (model.get_output_embeddings().weight.shape[0], r) \
            or a.shape[1] != model.get_output_embeddings().weight.shape[1] or float(b.abs().sum()) != float(b[ids].abs().sum()):
        raise PrgeError(f"the label readout in {folder} does not fit this model's LM head (or is not zero outside its label rows)",
                        "load it onto the base model it was trained on")
    return {k: v for k, v in pairs.items() if k != head}, readout.Readout(a, ids, b[ids])


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise PrgeError(f"{folder} has no {CONFIG_NAME}", "pass the folder of a LoRA adapter saved by prge or by peft's save_pretrained")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PrgeError(f"{path} is not readable JSON ({e})", "save the adapter again") from e
    if not isinstance(config, dict):
        raise PrgeError(f"{path} is not a JSON object", "save the adapter again")
    return config


def _check_config(config: dict, folder: Path) -> tuple[int, float]:
    """(r, lora_alpha), or a PrgeError naming the first setting MP-LoRA cannot reproduce."""
    where = f"the adapter in {folder}"
    if config.get("peft_type") != "LORA":
        raise PrgeError(f"{where} is a {config.get('peft_type')!r} adapter, not LoRA", "only LoRA adapters can be loaded")
    refusals = [
        ("use_dora", config.get("use_dora"), "DoRA's magnitude vector has no MP-LoRA equivalent"),
        ("use_rslora", config.get("use_rslora"), "rsLoRA scales by alpha/sqrt(r), MP-LoRA by alpha/r"),
        ("rank_pattern", config.get("rank_pattern"), "MP-LoRA uses one rank for every layer"),
        ("alpha_pattern", config.get("alpha_pattern"), "MP-LoRA uses one alpha for every layer"),
        ("bias", config.get("bias") not in (None, "none"), "trained biases are not part of MP-LoRA"),
        ("lora_bias", config.get("lora_bias"), "LoRA biases are not part of MP-LoRA"),
        ("modules_to_save", config.get("modules_to_save"), "fully trained modules are not part of MP-LoRA"),
        ("trainable_token_indices", config.get("trainable_token_indices"), "trained token embeddings are not part of MP-LoRA"),
        ("layer_replication", config.get("layer_replication"), "replicated layers are not part of MP-LoRA"),
        ("target_parameters", config.get("target_parameters"), "LoRA on bare parameters is not part of MP-LoRA"),
        ("alora_invocation_tokens", config.get("alora_invocation_tokens"), "activated LoRA is not part of MP-LoRA"),
        ("use_qalora", config.get("use_qalora"), "QA-LoRA is not part of MP-LoRA"),
        ("use_bdlora", config.get("use_bdlora"), "block-diagonal LoRA is not part of MP-LoRA"),
        ("init_lora_weights", config.get("init_lora_weights", True) not in _PLAIN_INITS,
         f"init_lora_weights={config.get('init_lora_weights')!r} rewrites the base weights when peft loads it"),
    ]
    for key, value, why in refusals:
        if value:
            raise PrgeError(f"{where} sets {key} ({why})", _FIX_WITH_PEFT)
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        raise PrgeError(f"{where} has no valid r / lora_alpha (got {r!r} / {alpha!r})", "save the adapter again")
    return r, float(alpha)


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / WEIGHTS_NAME).is_file():
        return load_tensors(folder / WEIGHTS_NAME)
    if (folder / LEGACY_WEIGHTS_NAME).is_file():
        return torch.load(folder / LEGACY_WEIGHTS_NAME, map_location="cpu", weights_only=True)
    raise PrgeError(f"{folder} has no {WEIGHTS_NAME}", "the adapter folder is incomplete; save the adapter again")


def _pairs(tensors: dict[str, torch.Tensor], folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name: (A, B)} from the file's keys. The file, not target_modules, says which modules
    carry LoRA: target_modules may be suffixes, exact names, a regex or "all-linear", and PEFT itself
    loads exactly the modules the weights name."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    other = []
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            other.append(key)
        else:
            found.setdefault(m["module"], {})[m["ab"]] = t
    if other:
        raise PrgeError(f"the adapter in {folder} holds weights that are not plain LoRA A/B matrices: {sorted(other)[:3]}",
                        _FIX_WITH_PEFT)
    if not found:
        raise PrgeError(f"the adapter in {folder} holds no LoRA weights", "save the adapter again")
    half = [name for name, ab in found.items() if len(ab) != 2]
    if half:
        raise PrgeError(f"the adapter in {folder} has lora_A without lora_B (or the reverse) for {half[:3]}", "save the adapter again")
    return {name: (ab["A"], ab["B"]) for name, ab in found.items()}


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> list[str]:
    """Load a PEFT LoRA adapter (ours or peft's) into `model` as MP-LoRA layers; returns their names.

    On a model without LoRA layers, they are added with `add_lora` (exact module names). On a model
    that already has LoRA layers on exactly the adapter's modules with its rank and alpha (e.g. one
    set up for training with `copies`), A and B are copied into them, so resuming keeps that setup.
    lora_dropout is ignored (it only acts in training). Everything is checked before the model is
    touched, so a refused adapter leaves the model as it was.
    """
    folder = resolve_dir(folder)
    if not folder.is_dir():
        raise PrgeError(f"adapter folder {folder} does not exist", "pass the folder given to save_adapter / save_pretrained")
    verify_dir(folder)  # its SHA256SUMS, when prge wrote it
    config = _read_config(folder)
    has_readout = (folder / READOUT_NAME).is_file()  # its rank/alpha patterns are checked by _split_readout
    rank, alpha = _check_config({**config, "rank_pattern": {}, "alpha_pattern": {}} if has_readout else config, folder)
    pairs, ro = _split_readout(config, _pairs(_read_weights(folder), folder), folder, model)

    modules = dict(model.named_modules())
    missing = sorted(n for n in pairs if n not in modules)
    if missing:
        base = config.get("base_model_name_or_path")
        raise PrgeError(f"the adapter in {folder} targets modules this model does not have, e.g. {missing[0]!r}",
                        f"load it onto the base model it was trained on{f' ({base})' if base else ''}")
    for name, (a, b) in pairs.items():
        module = modules[name]
        base_module = module.base if isinstance(module, MPLoRALinear) else module
        d_in, d_out = in_out(base_module)
        if tuple(a.shape) != (rank, d_in) or tuple(b.shape) != (d_out, rank):
            raise PrgeError(f"the adapter's {name} has A {tuple(a.shape)} and B {tuple(b.shape)}, but r={rank} and the "
                            f"module is {d_in} -> {d_out} (expected A {(rank, d_in)}, B {(d_out, rank)})",
                            "load it onto the base model it was trained on")

    existing = lora_layers(model)
    if existing:
        if set(existing) != set(pairs) or any(m.rank != rank or m.alpha != alpha for m in existing.values()):
            raise PrgeError("the model already has LoRA layers that differ from the adapter's modules, rank or alpha",
                            "load the adapter onto a fresh base model")
        names = list(existing)
    else:
        names = add_lora(model, targets=sorted(pairs), rank=rank, alpha=alpha)
        if set(names) != set(pairs):  # a top-level exact name can also match a nested leaf
            raise PrgeError(f"the adapter's module names matched {len(names)} modules, expected {len(pairs)}",
                            "load it onto the base model it was trained on")
    layers = lora_layers(model)
    with torch.no_grad():
        for name in names:
            m, (a, b) = layers[name], pairs[name]
            m.lora_A.copy_(a)
            m.lora_B.copy_(b)
            m.copies.copy_(m.lora_B.expand_as(m.copies))  # "copies" start as the clean B (see set_copies)
    readout.attach(model, ro)
    return names


def merge(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer into its base weight (W += alpha/r · B A) and put the base module back.

    The result is a plain Hugging Face model: it saves, loads and exports like the original, with
    no LoRA overhead. The product is formed in float32 and rounded once into the weight's dtype.
    A layer whose weight is shared with another module (an LM head tied to the embeddings) is
    refused: merging into it would change the embeddings too. A label readout (`prge.zo.readout`) is
    folded into the head's label rows; a head tied to the embeddings is untied first (the merged model
    stores its own head: vocab × hidden more values on disk).
    """
    layers = lora_layers(model)
    shared = _shared_weights(model)
    for name, m in layers.items():
        if id(m.base.weight) in shared:
            raise PrgeError(f"cannot merge LoRA on {name}: its weight is tied to another module",
                            "train LoRA on layers whose weights are not tied (e.g. not lm_head with tied embeddings)")
    ro = readout.get(model)
    if ro is not None:  # the label readout is LoRA on the head's label rows: W_L += B A
        head = model.get_output_embeddings()
        if id(head.weight) in shared:  # tied to the input embeddings: the merged model gets a head of its own
            head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
            model.config.tie_word_embeddings = False
            if getattr(model.config, "get_text_config", None):
                model.config.get_text_config().tie_word_embeddings = False
        w = head.weight
        with torch.no_grad():
            w[ro.label_ids] = (w[ro.label_ids].float() + ro.b.float() @ ro.a.float()).to(w.dtype)
        readout.attach(model, None)
    with torch.no_grad():
        for name, m in layers.items():
            w = m.base.weight
            delta = m.scale * (m.lora_B.float() @ m.lora_A.float())  # (out, in)
            if _is_conv1d(m.base):  # Conv1D stores (in, out)
                delta = delta.T
            w.copy_((w.float() + delta.to(w.device)).to(w.dtype))
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], m.base)
    return model


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of parameters reachable under more than one module name (tied weights)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, n in seen.items() if n > 1}


def merge_to_folder(base_model: nn.Module, tokenizer, adapter_folder: str | os.PathLike,
                    out_folder: str | os.PathLike) -> nn.Module:
    """Load `adapter_folder` into `base_model`, merge, and save model (+ tokenizer, if given) to
    `out_folder` as an ordinary Hugging Face folder, atomically: a crash leaves the previous
    `out_folder` (or none), never a half-written model. Returns the merged model."""
    load_adapter(base_model, adapter_folder)
    model = merge(base_model)
    with atomic_dir(out_folder) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return model
