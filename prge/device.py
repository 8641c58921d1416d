"""The on-device training loop: an exported P-RGE program, pre-tokenised data, the stock runtime.

This is what a phone app would do, written in Python against `executorch.runtime` only: no model
code, no transformers, no tokenizer (tests/test_export.py checks `sys.modules` after a run). Per
step the host picks the step's examples (`batch.step_indices`, seeded by (seed, step)), calls

    losses = train_step(batch..., lr, eps, g_prev, key=[seed, step])     # 2q losses

and computes g_i = (L⁺_i − L⁻_i) / 2ε (`estimator.projected_grad`) for the next call. The B
matrices never leave the program; the host holds the step number and the q numbers g.

Run folder (`out_dir`):
    metrics.jsonl            one row per step ({"step","loss","g_abs","seconds"}) and per evaluation
    checkpoints/last/        state.safetensors (the program's raw state: the ± copies and ε, plus g),
                             trainer_state.json (step, seed, lr, eps, program hash, best accuracy),
                             and the adapter of that step (PEFT files): resume from here; written
                             after the first evaluation, at every evaluation and every
                             `checkpoint_every` steps
    checkpoints/best/        the PEFT adapter at the best dev accuracy seen
    adapter/                 the final adapter (PEFT: adapter_config.json + adapter_model.safetensors)
    summary.json

Resuming writes the checkpoint's raw state back into the program (`write_raw`) and continues with
its g and step: the same bits as an uninterrupted run (noise "counter" or "host"; "engine" noise is
not reproducible at all).

The manifest and data helpers live here (not in `prge.export`, which imports the model code) so
that this loop needs nothing but torch, `executorch.runtime` and prge's small pure modules.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

import prge
from prge import estimator as est
from prge import io
from prge.batch import step_indices
from prge.errors import PrgeError
from prge.schedule import check_schedule, lr_at

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
    return manifest


def _short(x) -> str:
    s = repr(x)
    return s if len(s) <= 48 else s[:22] + "…" + s[-22:]


def check_manifest(manifest: dict, data_meta: dict) -> None:
    """Refuse a program whose manifest disagrees with the data (or model) meant for it.

    Compares every identity field present in both (model, tokenizer vocabulary, b, T, K, q, loss,
    label ids, LoRA layers) and raises a PrgeError naming the first difference and the fix.
    `data_meta` is a dataset's metadata (`read_dataset`) or `prge.export.model_meta(model, tok)`.
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


def read_dataset(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a file written by `prge.export.write_dataset`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise PrgeError(f"data file {path} not found", "pass the .data.safetensors file that `prge export` wrote")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = (f.metadata() or {}).get("prge")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise PrgeError(f"{path} is not a readable data file ({e})", "write it again with `prge export`") from None
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


def write_adapter(folder: str | os.PathLike, manifest: dict, lora_a: dict[str, torch.Tensor], b_flat: torch.Tensor) -> Path:
    """Write a PEFT LoRA adapter from the flat clean B (read_state) and the export-time A matrices,
    in exactly the format of `prge.adapters.save_adapter` (the config was taken from it at export)."""
    tensors = {}
    for layer in manifest["layers"]:
        name, (out, r), off = layer["name"], layer["shape"], layer["offset"]
        a_key = f"{PEFT_PREFIX}{name}.lora_A.weight"
        if a_key not in lora_a:
            raise PrgeError(f"the program's A matrices lack {name}", "re-export the program")
        tensors[a_key] = lora_a[a_key]
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b_flat[off:off + out * r].reshape(out, r).clone()
    folder = Path(folder)
    with io.atomic_dir(folder) as tmp:
        io.atomic_write_json(Path(tmp) / ADAPTER_CONFIG, manifest["adapter_config"])
        io.save_tensors(Path(tmp) / ADAPTER_WEIGHTS, tensors)
    return folder


# ------------------------------------------------------------------------------------------------
# the program


class Engine:
    """A loaded program: its methods, called with tensors. Every method is loaded right after the
    program, before any call: loading a method later re-initialises the shared state."""

    def __init__(self, program_path: str | os.PathLike, manifest: dict):
        path = Path(program_path)
        if not path.is_file():
            raise PrgeError(f"program {path} not found", "pass the .pte that `prge export` wrote")
        size = path.stat().st_size
        if manifest.get("program_bytes") not in (None, size):
            raise PrgeError(f"{path} is {size} bytes but its manifest says {manifest['program_bytes']} (truncated or replaced)",
                            "export the program again (the manifest and the .pte are written together)")
        try:
            from executorch.runtime import Runtime

            program = Runtime.get().load_program(path)
            self.methods = {name: program.load_method(name) for name in manifest["methods"]}
        except PrgeError:
            raise
        except Exception as e:
            raise PrgeError(f"the runtime cannot load {path} ({str(e).splitlines()[0] if str(e) else type(e).__name__})",
                            "export the program again") from None
        self._program = program
        self.manifest = manifest

    def __call__(self, method: str, *inputs: torch.Tensor) -> list[torch.Tensor]:
        return list(self.methods[method].execute(list(inputs)))


def _f(x: float) -> torch.Tensor:
    return torch.tensor([x], dtype=torch.float32)


def host_noise(manifest: dict, key: torch.Tensor) -> torch.Tensor:
    """z (q, total) for noise mode "host": the estimator's streams, drawn here."""
    q = manifest["q"]
    parts = [z.reshape(q, -1) for z in est.all_noise(key, q, [tuple(layer["shape"]) for layer in manifest["layers"]])]
    return torch.cat(parts, dim=1)


def _rows(tensors: dict, split: str, idx: list[int] | torch.Tensor) -> list[torch.Tensor]:
    idx = torch.as_tensor(idx, dtype=torch.long)
    out = []
    for f in SPLIT_FIELDS:
        t = tensors[f"{split}_{f}"].index_select(0, idx)
        out.append(t.float() if f == "target_mask" else t.long())
    return out


def evaluate(engine: Engine, tensors: dict, g: torch.Tensor, lr: float, split: str = "dev") -> dict:
    """{"accuracy", "loss", "n"} over a split, with the clean B (pending update folded in).

    Classification: label-word accuracy and CE over the label words; completions: answer-token
    accuracy and per-token CE (as `prge.evaluate`)."""
    m = engine.manifest
    n = tensors[f"{split}_input_ids"].shape[0]
    N = m["eval_batch_size"]
    correct = loss = tokens = 0.0
    counts = torch.zeros(len(m["label_ids"] or [0]))
    for start in range(0, n, N):
        idx = list(range(start, min(start + N, n)))
        k = len(idx)
        idx = idx + [idx[0]] * (N - k)  # the method's batch is static: fill with a repeat, ignore it
        ids, pos, tids, mask, label = _rows(tensors, split, idx)
        if m["label_ids"] is not None:
            scores = engine("evaluate", ids, pos[:, :1].contiguous(), g, _f(lr))[0][:k]
            pred = scores.argmax(-1)
            correct += float((pred == label[:k]).sum())
            counts += torch.bincount(pred, minlength=len(counts)).float()
            lse = torch.logsumexp(scores, -1)
            loss += float((lse - scores.gather(1, label[:k, None]).squeeze(1)).sum())
            tokens += k
        else:
            ce, right = engine("evaluate", ids, pos, tids, mask, g, _f(lr))[:2]
            correct += float(right[:k].sum())
            loss += float(ce[:k].sum())
            tokens += float(mask[:k].sum())
    out = {"accuracy": correct / max(tokens, 1), "loss": loss / max(tokens, 1), "n": n}
    if m["label_ids"] is not None:
        out["label_share"] = (counts / max(n, 1)).tolist()
    return out


# ------------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(folder: Path, engine: Engine, lora_a: dict, step: int, g: torch.Tensor, state: dict, lr: float) -> None:
    """The raw program state (bit-exact resume) + g + step, and the adapter of this step (its pending
    update folded in at `lr`), atomically."""
    raw = engine("read_raw")[0]
    b = engine("read_state", g, _f(lr))[0]
    with io.atomic_dir(folder) as tmp:
        tmp = Path(tmp)
        io.save_tensors(tmp / "state.safetensors", {"raw": raw, "g": g})
        io.atomic_write_json(tmp / "trainer_state.json", {"step": step, **state})
        write_adapter(tmp / "adapter", engine.manifest, lora_a, b)


def load_checkpoint(folder: Path, manifest: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    folder = io.resolve_dir(folder)
    state_file = folder / "trainer_state.json"
    if not state_file.is_file():
        raise PrgeError(f"nothing to resume in {folder} (no trainer_state.json)", "run without --resume to start fresh")
    try:
        state = json.loads(state_file.read_text())
        assert isinstance(state, dict) and isinstance(state["step"], int)
    except (ValueError, AssertionError, KeyError):
        raise PrgeError(f"{state_file} is damaged", "delete the checkpoint folder and start again, or restore it") from None
    tensors = io.load_tensors(folder / "state.safetensors")
    raw, g = tensors.get("raw"), tensors.get("g")
    size = manifest["copies"] * manifest["total"] + 1
    if raw is None or g is None or raw.shape != (size,) or g.shape != (manifest["q"],) or raw.dtype != torch.float32:
        raise PrgeError(f"{folder}/state.safetensors does not hold this program's state "
                        f"(expected raw ({size},) and g ({manifest['q']},))", "resume with the program that wrote it")
    if state.get("program_sha256") not in (None, manifest.get("program_sha256")):
        raise PrgeError(f"the checkpoint in {folder} was written by another program", "resume with the program that wrote it")
    if not torch.isfinite(raw).all():
        raise PrgeError(f"the checkpoint in {folder} holds non-finite values", "restore an earlier checkpoint")
    return raw, g, state


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# the loop


def device_train(program_path: str | os.PathLike, data_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                 steps: int, lr: float, eps: float, seed: int = 0, eval_every: int = 50, resume: bool = False,
                 normalize: bool = False, lr_schedule: str = "constant", progress: bool = True,
                 stop_after: int | None = None, checkpoint_every: int = 25, log=_log) -> dict:
    """Train with the exported program; returns the summary (also written to out_dir/summary.json).

    `normalize` divides each loss difference by the spread of the step's 2q losses instead of by 2ε
    (`estimator.projected_grad`; host-side, the program is the same). `lr_schedule` (`prge.schedule.lr_at`)
    decays the lr over `steps`; the update made from step t's g, applied by call t + 1 (or folded in by
    evaluate / read_state), gets the lr of step t, as in the eager trainer. `stop_after` ends early after
    that step with a checkpoint (tests use it to simulate an interruption). With `resume`, continue
    from out_dir/checkpoints/last exactly. checkpoints/last is written after the before-training
    evaluation, at every evaluation and every `checkpoint_every` steps between them (0: evaluations
    only), so a killed run loses at most that many steps, as in `prge train`.
    """
    if steps < 0 or not eps > 0 or eval_every < 0 or checkpoint_every < 0:
        raise PrgeError(f"bad loop settings steps={steps}, eps={eps}, eval_every={eval_every}, checkpoint_every={checkpoint_every}",
                        "pass --steps >= 0, --eps > 0, --eval-every >= 0, --checkpoint-every >= 0")
    check_schedule(lr_schedule)

    def lr_of(step: int) -> float:  # the lr of the pending update made from step `step`'s g
        return lr_at(lr, lr_schedule, step, steps)
    program_path, out_dir = Path(program_path), Path(out_dir)
    manifest = load_manifest(program_path)
    missing = [m for m in ("train_step", "read_state", "read_raw", "write_raw", "evaluate") if m not in manifest.get("methods", {})]
    if missing:
        raise PrgeError(f"{program_path} lacks the methods {missing} that training needs", "export it with `prge export`")
    tensors, meta = read_dataset(data_path)
    check_manifest(manifest, meta)
    check_data_shapes(tensors, manifest, data_path)
    if normalize and manifest["q"] < 2:
        raise PrgeError("--normalize needs q >= 2 (the spread of one ± pair is not defined)",
                        "export the program with --q 2 or more, or drop --normalize")
    if manifest.get("quantization") and eps < 1e-2:
        warnings.warn(f"eps={eps} with a {manifest['quantization']} base: activation quantisation noise swamps "
                      "L+ - L- at small eps; use eps >= 1e-2", stacklevel=2)
    if manifest["noise"] == "engine":
        log("prge: noise 'engine' draws from the runtime's unseeded randn; this run cannot be reproduced or resumed exactly")
    lora_a = io.load_tensors(lora_a_path(program_path))
    engine = Engine(program_path, manifest)
    q, b = manifest["q"], manifest["batch_size"]
    n_train = tensors["train_input_ids"].shape[0]
    has_dev = "dev_input_ids" in tensors and tensors["dev_input_ids"].shape[0] > 0
    ckpts, metrics = out_dir / "checkpoints", out_dir / "metrics.jsonl"
    out_dir.mkdir(parents=True, exist_ok=True)

    state = {"seed": seed, "lr": lr, "lr_schedule": lr_schedule, "eps": eps, "normalize": normalize,
             "program_sha256": manifest.get("program_sha256"),
             "best_accuracy": -1.0, "best_step": 0, "before": None, "seconds": 0.0}
    if resume:
        raw, g, saved = load_checkpoint(ckpts / "last", manifest)
        if saved.get("seed") != seed:
            raise PrgeError(f"the checkpoint was trained with seed {saved.get('seed')}, not {seed}",
                            f"resume with --seed {saved.get('seed')} (the seed picks the examples and the noise of every step)")
        start = saved.pop("step")
        state.update({k: saved[k] for k in ("best_accuracy", "best_step", "before", "seconds") if k in saved})
        engine("write_raw", raw)
        io.truncate_metrics(metrics, start)
        log(f"resumed from {ckpts / 'last'} at step {start}")
    else:
        g, start = torch.zeros(q), 0
        metrics.unlink(missing_ok=True)
        if has_dev:
            ev = evaluate(engine, tensors, g, lr_of(0))
            state["before"], state["best_accuracy"] = ev["accuracy"], ev["accuracy"]
            io.append_jsonl(metrics, {"step": 0, "split": "dev", **ev})
            log(f"before training: dev accuracy {ev['accuracy']:.4f} (n={ev['n']})")
        save_checkpoint(ckpts / "best", engine, lora_a, 0, g, state, lr_of(0))
        save_checkpoint(ckpts / "last", engine, lora_a, 0, g, state, lr_of(0))  # a kill before the first step keeps the evaluation

    bar = None
    if progress and steps:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=start, desc="device-train", unit="step", dynamic_ncols=True, file=sys.stderr)
    t_loop = time.time() - state["seconds"]
    end = max(start, min(steps, stop_after)) if stop_after else steps  # never below the resumed step
    last_acc = None
    eps_t = _f(eps)
    step = start
    for step in range(start + 1, end + 1):
        t = time.time()
        batch = _rows(tensors, "train", step_indices(n_train, b, seed, step))
        key = torch.tensor([seed, step], dtype=torch.int64)
        extra = [host_noise(manifest, key)] if manifest["noise"] == "host" else []
        losses = engine("train_step", *batch, _f(lr_of(step - 1)), eps_t, g, key, *extra)[0]
        if not torch.isfinite(losses).all():
            if bar is not None:
                bar.close()
            raise PrgeError(f"non-finite loss at step {step} ({losses.tolist()}); the last good checkpoint is kept in {ckpts / 'last'}",
                            "lower --lr or --eps and resume, or start again")
        g = est.projected_grad(losses[:q], losses[q:], eps, normalize)
        loss = float(losses.mean())
        io.append_jsonl(metrics, {"step": step, "loss": loss, "g_abs": float(g.abs().mean()), "seconds": time.time() - t})
        if eval_every and step % eval_every == 0 or step == steps:
            state["seconds"] = time.time() - t_loop
            if has_dev:
                ev = evaluate(engine, tensors, g, lr_of(step))
                last_acc = ev["accuracy"]
                io.append_jsonl(metrics, {"step": step, "split": "dev", **ev})
                if ev["accuracy"] > state["best_accuracy"]:
                    state["best_accuracy"], state["best_step"] = ev["accuracy"], step
                    save_checkpoint(ckpts / "best", engine, lora_a, step, g, state, lr_of(step))
            save_checkpoint(ckpts / "last", engine, lora_a, step, g, state, lr_of(step))
        elif checkpoint_every and step % checkpoint_every == 0 and step < end:
            state["seconds"] = time.time() - t_loop
            save_checkpoint(ckpts / "last", engine, lora_a, step, g, state, lr_of(step))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", dev_acc="-" if last_acc is None else f"{last_acc:.3f}")
    if bar is not None:
        bar.close()
    state["seconds"] = time.time() - t_loop
    if stop_after and end < steps:
        save_checkpoint(ckpts / "last", engine, lora_a, end, g, state, lr_of(end))
        return {"stopped_at": end, "run_dir": str(out_dir)}
    b_final = engine("read_state", g, _f(lr_of(step)))[0]
    write_adapter(out_dir / "adapter", manifest, lora_a, b_final)
    summary = {"program": str(program_path), "model": manifest["model"], "steps": steps, "q": q, "batch_size": b,
               "noise": manifest["noise"], "minutes": state["seconds"] / 60, "dev_before": state["before"],
               "dev_after": last_acc, "best_dev": state["best_accuracy"], "best_step": state["best_step"],
               "adapter": str(out_dir / "adapter"), "best_adapter": str(ckpts / "best" / "adapter"),
               "prge_version": prge.__version__}
    io.atomic_write_json(out_dir / "summary.json", summary)
    log(f"device training done: {steps} steps in {state['seconds'] / 60:.1f} min; dev accuracy "
        f"{state['before'] if state['before'] is not None else float('nan'):.4f} -> "
        f"{last_acc if last_acc is not None else float('nan'):.4f}; adapter (PEFT format): {out_dir / 'adapter'}")
    return summary


def final_b(out_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The B matrices of a finished run's adapter, by module name (for tests and tools)."""
    t = io.load_tensors(Path(out_dir) / "adapter" / ADAPTER_WEIGHTS)
    return {k[len(PEFT_PREFIX):-len(".lora_B.weight")]: v for k, v in t.items() if k.endswith(".lora_B.weight")}

