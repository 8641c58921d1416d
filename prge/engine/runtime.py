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

The file formats (manifest, data, adapter) are `prge.engine.formats`; like it, this loop needs
nothing but torch, `executorch.runtime` and prge's small pure modules (not the model code).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import prge
from prge.config import TrainConfig
from prge.zo import estimator as est
from prge.zo import readout
from prge import io
from prge.data.batch import step_indices
from prge.engine.formats import (METHODS, SPLIT_FIELDS, check_data_shapes, check_eps, check_manifest, check_manifest_fields,
                                  identity_sha256, load_manifest, lora_a_path, manifest_path, read_dataset, verify_program,
                                  write_adapter)
from prge.errors import PrgeError
from prge.log import say
from prge.run import loop
from prge.run.loop import Plan
from prge.run.lock import run_lock
from prge.zo.schedule import check_schedule, lr_at

# ------------------------------------------------------------------------------------------------
# the program


class Engine:
    """A loaded program: its methods, called with tensors. Every method the loop calls is loaded right
    after the program, before any call: loading a method later re-initialises the shared state. The
    label readout's `features` method (`LATER`) is loaded only by the host step after the loop (`load`),
    which then writes the state it needs back: loaded with the others it would hold its planned
    activation memory through the whole run.

    The program is loaded from its path, so the runtime memory-maps it (from bytes it would keep a
    second, private copy). With `weight_cache`, XNNPACK's methods share one packed copy of the
    weights instead of one each (`prge.engine.native.set_weight_cache`; needs cmake and a C++
    compiler once, else the cache stays off; the option is global: it stays on for programs loaded
    later in the process). A program that describes itself (constant method
    `get_identity_sha256`) must carry its manifest's identity hash."""

    def __init__(self, program_path: str | os.PathLike, manifest: dict, weight_cache: bool = False, log=say):
        path = Path(program_path)
        if not path.is_file():
            raise PrgeError(f"program {path} not found", "pass the .pte that `prge export` wrote")
        verify_program(path, manifest)
        self.weight_cache = False
        if weight_cache:
            from prge.engine import native

            self.weight_cache = native.set_weight_cache(True, log=log)
        try:
            from executorch.runtime import Runtime

            program = Runtime.get().load_program(path)
            identity = None
            if "get_identity_sha256" in program.method_names:
                identity = program.load_method("get_identity_sha256").execute([])[0]
            self.methods = {name: program.load_method(name) for name in manifest["methods"] if name not in LATER}
        except PrgeError:
            raise
        except Exception as e:
            raise PrgeError(f"the runtime cannot load {path} ({str(e).splitlines()[0] if str(e) else type(e).__name__})",
                            "export the program again") from None
        if identity is not None and identity != identity_sha256(manifest):
            raise PrgeError(f"{path} does not match its manifest {manifest_path(path)} (identity hash {identity[:12]} vs "
                            f"{identity_sha256(manifest)[:12]}): one of them was replaced",
                            "export the program again (the manifest and the .pte are written together)")
        self._program = program
        self.manifest = manifest

    def load(self, method: str) -> None:
        """Load one of the `LATER` methods. It re-initialises the program's state: write it after this."""
        if method not in self.methods:
            self.methods[method] = self._program.load_method(method)

    def __call__(self, method: str, *inputs: torch.Tensor) -> list[torch.Tensor]:
        return list(self.methods[method].execute(list(inputs)))


LATER = ("features", "readout_step")  # methods `Engine` loads only when asked (`Engine.load`); readout_step: the C++ runner's


def scalar(x: float) -> torch.Tensor:
    """A float input of shape (1,) (lr, ε), as the program's methods take them."""
    return torch.tensor([x], dtype=torch.float32)


def host_noise(manifest: dict, key: torch.Tensor) -> torch.Tensor:
    """z (q, total) for noise mode "host": the estimator's streams, drawn here."""
    q = manifest["q"]
    parts = [z.reshape(q, -1) for z in est.all_noise(key, q, [tuple(layer["shape"]) for layer in manifest["layers"]])]
    return torch.cat(parts, dim=1)


def split_rows(tensors: dict, split: str, idx: list[int] | torch.Tensor) -> list[torch.Tensor]:
    """The rows `idx` of a split of the program's data, as train_step / evaluate take them."""
    idx = torch.as_tensor(idx, dtype=torch.long)
    out = []
    for f in SPLIT_FIELDS:
        t = tensors[f"{split}_{f}"].index_select(0, idx)
        out.append(t.float() if f == "target_mask" else t.long())
    return out


def static_batches(n: int, size: int):
    """(k, indices) for rows 0..n-1 in batches of exactly `size`, as a method with a static batch takes
    them: the last batch is filled with repeats of its first row, whose outputs past k are ignored."""
    for start in range(0, n, size):
        idx = list(range(start, min(start + size, n)))
        yield len(idx), idx + [idx[0]] * (size - len(idx))


def evaluate(engine: Engine, tensors: dict, g: torch.Tensor, lr: float, split: str = "dev") -> dict:
    """{"accuracy", "loss", "n"} over a split, with the clean B (pending update folded in).

    Classification: label-word accuracy and CE over the label words; completions: answer-token
    accuracy and per-token CE (as `prge.run.evaluate`)."""
    m = engine.manifest
    n = tensors[f"{split}_input_ids"].shape[0]
    N = m["eval_batch_size"]
    correct = loss = tokens = 0.0
    counts = torch.zeros(len(m["label_ids"] or [0]))
    for k, idx in static_batches(n, N):
        ids, pos, tids, mask, label = split_rows(tensors, split, idx)
        if m["label_ids"] is not None:
            scores = engine("evaluate", ids, pos[:, :1].contiguous(), g, scalar(lr))[0][:k]
            pred = scores.argmax(-1)
            correct += float((pred == label[:k]).sum())
            counts += torch.bincount(pred, minlength=len(counts)).float()
            lse = torch.logsumexp(scores, -1)
            loss += float((lse - scores.gather(1, label[:k, None]).squeeze(1)).sum())
            tokens += k
        else:
            ce, right = engine("evaluate", ids, pos, tids, mask, g, scalar(lr))[:2]
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
    b = engine("read_state", g, scalar(lr))[0]
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
    io.verify_dir(folder)
    try:
        state = json.loads(state_file.read_text())
        assert isinstance(state, dict) and isinstance(state["step"], int)
    except (ValueError, AssertionError, KeyError):
        raise PrgeError(f"{state_file} is damaged", "delete the checkpoint folder and start again, or restore it") from None
    tensors = io.load_tensors(folder / "state.safetensors")
    raw, g = tensors.get("raw"), tensors.get("g")
    size = manifest.get("raw_size", manifest["copies"] * manifest["total"] + 1)
    if raw is None or g is None or raw.shape != (size,) or g.shape != (manifest["q"],) or raw.dtype != torch.float32:
        raise PrgeError(f"{folder}/state.safetensors does not hold this program's state "
                        f"(expected raw ({size},) and g ({manifest['q']},))", "resume with the program that wrote it")
    if state.get("program_sha256") not in (None, manifest.get("program_sha256")):
        raise PrgeError(f"the checkpoint in {folder} was written by another program", "resume with the program that wrote it")
    if not torch.isfinite(raw).all():
        raise PrgeError(f"the checkpoint in {folder} holds non-finite values", "restore an earlier checkpoint")
    return raw, g, state


# ------------------------------------------------------------------------------------------------
# the engine stepper and the run


class EngineStepper:
    """`prge.run.loop.Stepper` over the exported program: the host keeps the step and the q values of g.

    The update made from step t's g is applied by call t + 1 (or folded in by evaluate / read_state)
    with the lr of step t, as in the eager trainer."""

    def __init__(self, engine: Engine, tensors: dict, lora_a: dict, *, seed: int, lr: float, lr_schedule: str,
                 eps: float, steps: int, normalize: bool, log=say):
        self.engine, self.tensors, self.lora_a, self.log = engine, tensors, lora_a, log
        self.m = engine.manifest
        self.seed, self.lr, self.lr_schedule, self.eps, self.steps, self.normalize = seed, lr, lr_schedule, eps, steps, normalize
        self.g = torch.zeros(self.m["q"])
        self.n_train = tensors["train_input_ids"].shape[0]
        self.has_dev = "dev_input_ids" in tensors and tensors["dev_input_ids"].shape[0] > 0
        self.last = Path("checkpoints") / "last"  # named in the non-finite-loss error; device_train sets the real path

    def lr_of(self, step: int) -> float:
        """The lr of the pending update made from step `step`'s g."""
        return lr_at(self.lr, self.lr_schedule, step, self.steps)

    def identity(self) -> dict:
        """What a checkpoint records so that a resume can refuse another seed or program."""
        return {"seed": self.seed, "lr": self.lr, "lr_schedule": self.lr_schedule, "eps": self.eps,
                "normalize": self.normalize, "program_sha256": self.m.get("program_sha256")}

    def start(self) -> tuple[dict | None, dict | None]:
        if not self.has_dev:
            return None, None
        ev = evaluate(self.engine, self.tensors, self.g, self.lr_of(0))
        self.log(f"before training: dev accuracy {ev['accuracy']:.4f} (n={ev['n']})")
        return ev, ev

    def step(self, step: int) -> tuple[float, float]:
        q = self.m["q"]
        batch = split_rows(self.tensors, "train", step_indices(self.n_train, self.m["batch_size"], self.seed, step))
        key = torch.tensor([self.seed, step], dtype=torch.int64)
        extra = [host_noise(self.m, key)] if self.m["noise"] == "host" else []
        losses = self.engine("train_step", *batch, scalar(self.lr_of(step - 1)), scalar(self.eps), self.g, key, *extra)[0]
        if not torch.isfinite(losses).all():
            raise PrgeError(f"non-finite loss at step {step} ({losses.tolist()}); the last good checkpoint is kept in {self.last}",
                            "lower --lr or --eps and resume, or start again")
        self.g = est.projected_grad(losses[:q], losses[q:], self.eps, self.normalize)
        return float(losses.mean()), float(self.g.abs().mean())

    def evaluate(self, step: int) -> dict | None:
        return evaluate(self.engine, self.tensors, self.g, self.lr_of(step)) if self.has_dev else None

    def save(self, folder: Path, step: int, state: dict) -> None:
        save_checkpoint(folder, self.engine, self.lora_a, step, self.g, {**self.identity(), **state}, self.lr_of(step))

    def load(self, folder: Path) -> dict:
        raw, g, saved = load_checkpoint(folder, self.m)
        if saved.get("seed") != self.seed:
            raise PrgeError(f"the checkpoint was trained with seed {saved.get('seed')}, not {self.seed}",
                            f"resume with --seed {saved.get('seed')} (the seed picks the examples and the noise of every step)")
        self.engine("write_raw", raw)
        self.g = g
        return saved

    def final_b(self, step: int) -> torch.Tensor:
        """The clean B after `step`, its pending update folded in, flattened in manifest order."""
        return self.engine("read_state", self.g, scalar(self.lr_of(step)))[0]


# ------------------------------------------------------------------------------------------------
# the label readout: a host step after the loop


@dataclass
class ReadoutSettings:
    """`prge train`'s --readout options (and defaults), for the device: rank None is the default rank
    where the program can fit a readout, 0 is off."""
    rank: int | None = TrainConfig.readout
    steps: int = TrainConfig.readout_steps
    lr: float = TrainConfig.readout_lr
    rows: int = TrainConfig.readout_rows

    def resolved(self, manifest: dict, program_path) -> int:
        """The rank this run fits: the program needs its `features` method (`prge export` adds it to
        classification programs with loss "class"; programs exported before it existed lack it)."""
        can = "features" in manifest.get("methods", {}) and isinstance(manifest.get("readout"), dict)
        if self.rank is None:
            return readout.DEFAULT_RANK if can else 0
        if self.rank and not can:
            raise PrgeError(f"--readout {self.rank} needs the program's features method, which {program_path} lacks "
                            "(it is exported for classification programs with --loss class)",
                            "export the program again with this prge, or pass --readout 0")
        return self.rank


def device_features(engine: Engine, tensors: dict, split: str, rows: int, g: torch.Tensor, lr: float) -> readout.Features:
    """The first `rows` rows of a split through the program's `features` method: the readout's inputs."""
    m = engine.manifest
    n, N = min(rows, tensors[f"{split}_input_ids"].shape[0]), m["eval_batch_size"]
    base, hs = [], []
    for k, idx in static_batches(n, N):
        ids, pos = split_rows(tensors, split, idx)[:2]
        scores, h = engine("features", ids, pos[:, :1].contiguous(), g, scalar(lr))
        base.append(scores[:k])
        hs.append(h[:k])
    return readout.Features(torch.cat(hs), tensors[f"{split}_label"][:n].long(), torch.cat(base))


def fit_readout(engine: Engine, tensors: dict, lora_a: dict, best: Path, settings: ReadoutSettings, rank: int, *, seed: int,
                eps: float, lr_of, log=say) -> dict:
    """The label readout (`prge.zo.readout`) on the best checkpoint, as `prge train` fits it after its
    steps: the program's `features` method gives the hidden states of the first `rows` training rows and of
    the dev rows, and `readout.fit_features` (the eager trainer's own function) fits it on the host; where
    the best checkpoint is past step 0 this is done on the untrained state too (loading `features` leaves
    the program in it) before the checkpoint's state is written (`write_raw`), and the better on dev is
    kept (`readout.keep_untrained`). The best checkpoint's adapter is rewritten with the readout on the LM
    head (PEFT), with B = 0 where the untrained state won. Returns the summary's "readout" entry."""
    m = engine.manifest
    raw, g, state = load_checkpoint(best, m)
    engine.load("features")  # before the state is written: loading re-initialises it (the untrained state)
    n_dev = tensors["dev_input_ids"].shape[0] if "dev_input_ids" in tensors else 0
    t0 = time.time()

    def fit_here(g: torch.Tensor, lr_b: float, where: str) -> readout.Fit:
        train = device_features(engine, tensors, "train", settings.rows, g, lr_b)
        dev = device_features(engine, tensors, "dev", n_dev, g, lr_b) if n_dev else train
        fit = readout.fit_features(train, dev, torch.tensor(m["label_ids"]), rank=rank, steps=settings.steps, lr=settings.lr,
                                   q=m["q"], eps=eps, seed=seed, cap=m["readout"].get("softcap"))
        log(f"label readout (rank {fit.readout.rank}) on {where}: dev {fit.dev_before:.4f} -> {fit.dev_after:.4f} "
            f"(best of {settings.steps} steps at step {fit.best_step})")
        return fit

    untrained = b0 = None
    if state["step"] > 0:
        g0 = torch.zeros_like(g)
        b0 = engine("read_state", g0, scalar(0.0))[0]
        untrained = fit_here(g0, 0.0, "the untrained state")
    engine("write_raw", raw)
    lr_b = lr_of(state["step"])
    fit = fit_here(g, lr_b, f"the best checkpoint (step {state['step']})")
    b, step = engine("read_state", g, scalar(lr_b))[0], state["step"]
    steps_s = fit.seconds_steps + (untrained.seconds_steps if untrained is not None else 0.0)
    if readout.keep_untrained(fit, untrained):
        log(f"keeping the readout on the untrained state (dev {untrained.dev_after:.4f} > {fit.dev_after:.4f}): "
            "the best checkpoint's adapter gets B = 0")
        fit, b, step = untrained, b0, 0
    fit = dataclasses.replace(fit, seconds_features=time.time() - t0 - steps_s, seconds_steps=steps_s)
    write_adapter(io.resolve_dir(best) / "adapter", m, lora_a, b, readout=fit.readout)
    log(f"label readout kept: dev {fit.dev_before:.4f} -> {fit.dev_after:.4f}; features {fit.seconds_features:.0f} s, "
        f"steps {steps_s:.1f} s")
    return readout.summary_entry(fit, settings.steps, step, untrained.dev_after if untrained is not None else None)


def check_readout_settings(settings: ReadoutSettings) -> None:
    for name, v, low in (("readout", settings.rank, 0), ("readout_steps", settings.steps, 0), ("readout_rows", settings.rows, 1)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < low):
            raise PrgeError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {v!r}"[:200], f"pass --{name.replace('_', '-')} {max(low, 1)} or more")
    if not (isinstance(settings.lr, (int, float)) and math.isfinite(settings.lr) and settings.lr > 0):
        raise PrgeError(f"--readout-lr must be a finite number > 0, got {settings.lr!r}"[:200], "pass e.g. --readout-lr 1e-2")


def check_loop_settings(**settings) -> None:
    """A device run's settings (from flags, or from the program's recorded run_defaults) are numbers in
    their domain: integers >= 0, a finite lr >= 0, a finite eps > 0, a bool normalize."""
    for name, v in settings.items():
        flag = "--" + name.replace("_", "-")
        if name in ("steps", "seed", "eval_every", "checkpoint_every"):
            ok, want = isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63, "an integer >= 0"
        elif name in ("lr", "eps"):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 if name == "eps" else v >= 0)
            want = "a finite number " + ("> 0" if name == "eps" else ">= 0")
        elif name == "normalize":
            ok, want = isinstance(v, bool), "on or off"
        else:
            ok, want = isinstance(v, str), "a string"
        if not ok:
            raise PrgeError(f"{flag} must be {want}, got {v!r}"[:200], f"pass {flag} (or re-export the program if it recorded this value)")


def device_train(program_path: str | os.PathLike, data_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                 steps: int, lr: float, eps: float, seed: int = 0, eval_every: int = 50, resume: bool = False,
                 normalize: bool = False, lr_schedule: str = "constant", progress: bool = True,
                 stop_after: int | None = None, checkpoint_every: int = 25, weight_cache: bool = True,
                 readout: ReadoutSettings | None = None, log=say) -> dict:
    """Train with the exported program; returns the summary (also written to out_dir/summary.json).

    After the last step the label readout (`readout`, default: `prge train`'s) is fitted as a host step
    (`fit_readout`) on the untrained model and on the best checkpoint, the better on dev written into
    that checkpoint's adapter (`readout.keep_untrained`).
    `normalize` divides each loss difference by the spread of the step's 2q losses instead of by 2ε
    (`estimator.projected_grad`; host-side, the program is the same). `lr_schedule` (`prge.zo.schedule.lr_at`)
    decays the lr over `steps`. `stop_after` ends early after that step with a checkpoint (tests use
    it to simulate an interruption). With `resume`, continue from out_dir/checkpoints/last exactly.
    `weight_cache` shares XNNPACK's packed weights between the program's methods (`Engine`).
    Cadence, checkpoints and resume are `prge.run.loop`'s, as in `prge train`.
    """
    check_loop_settings(steps=steps, lr=lr, eps=eps, seed=seed, eval_every=eval_every, checkpoint_every=checkpoint_every,
                        normalize=normalize, lr_schedule=lr_schedule)
    check_schedule(lr_schedule)
    readout = readout or ReadoutSettings()
    check_readout_settings(readout)
    program_path, out_dir = Path(program_path), Path(out_dir)
    manifest = load_manifest(program_path)
    check_manifest_fields(manifest, manifest_path(program_path))
    readout_rank = readout.resolved(manifest, program_path)
    missing = [m for m in METHODS if m not in manifest.get("methods", {})]
    if missing:
        raise PrgeError(f"{program_path} lacks the methods {missing} that training needs", "export it with `prge export`")
    tensors, meta = read_dataset(data_path)
    check_manifest(manifest, meta)
    check_data_shapes(tensors, manifest, data_path)
    if normalize and manifest["q"] < 2:
        raise PrgeError("--normalize needs q >= 2 (the spread of one ± pair is not defined)",
                        "export the program with --q 2 or more, or drop --normalize")
    check_eps(manifest, eps)
    if manifest["noise"] == "engine":
        log("prge: noise 'engine' draws from the runtime's unseeded randn; this run cannot be reproduced or resumed exactly")
    lora_a = io.load_tensors(lora_a_path(program_path))
    started = out_dir.is_dir() and any(out_dir.iterdir())  # a run stopped before its first checkpoint left files
    run = {"steps": steps, "lr": lr, "eps": eps, "seed": seed, "eval_every": eval_every, "resume": resume, "normalize": normalize,
           "lr_schedule": lr_schedule, "progress": progress, "stop_after": stop_after, "checkpoint_every": checkpoint_every,
           "readout": readout, "readout_rank": readout_rank}
    if manifest.get("ranks", 1) == 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:  # one process
        with run_lock(out_dir, log=log):
            return _device_run(program_path, out_dir, manifest, tensors, lora_a, **run, log=log, started=started,
                               weight_cache=weight_cache)
    import torch.distributed as dist

    from prge.engine import fleet

    fleet.check_world(manifest, program_path)  # a fleet program alone, or a one-process program under torchrun

    settings = {k: v for k, v in run.items() if k not in ("progress", "resume", "readout")}
    settings["readout"] = vars(readout)
    share = fleet.join(manifest, io.tensors_sha256(tensors), settings)
    try:
        rank0 = share.rank == 0
        run["resume"] = fleet.resume_decision(share, resume, out_dir / "checkpoints" / "last", started, log)
        with run_lock(out_dir, log=log) if rank0 else contextlib.nullcontext():
            return _device_run(program_path, out_dir, manifest, tensors, lora_a, **run, log=log if rank0 else (lambda m: None),
                               started=started and rank0, weight_cache=weight_cache, share=share)
    finally:
        dist.destroy_process_group()


def _device_run(program_path: Path, out_dir: Path, manifest: dict, tensors: dict, lora_a: dict, *, steps, lr, eps, seed,
                eval_every, resume, normalize, lr_schedule, progress, stop_after, checkpoint_every, log, started,
                weight_cache=True, share=None, readout: ReadoutSettings | None = None, readout_rank: int = 0) -> dict | None:
    """`device_train` after its checks, with the run folder locked (by rank 0 of a fleet, `share`,
    which alone writes; the other ranks return None)."""
    stepper = EngineStepper(Engine(program_path, manifest, weight_cache=weight_cache, log=log), tensors, lora_a, seed=seed, lr=lr, lr_schedule=lr_schedule,
                            eps=eps, steps=steps, normalize=normalize, log=log)
    stepper.last = out_dir / "checkpoints" / "last"
    rank0 = share is None or share.rank == 0
    plan = Plan(steps, eval_every, checkpoint_every, progress and rank0, "device-train", stop_after, record=rank0)
    last = out_dir / "checkpoints" / "last"
    if resume and not io.resolve_dir(last).is_dir() and started:
        log(f"prge: {out_dir} was stopped before its first checkpoint; starting again at step 0")
        resume = False
    if share is not None:
        from prge.engine.fleet import FleetStepper

        stepper = FleetStepper(stepper, share)
        log(f"prge: device-train on {share.world} processes x {manifest['q'] // share.world} of {manifest['q']} queries -> {out_dir}")
    state = loop.train(stepper, plan, out_dir, last if resume else None, log=log)
    if share is not None:
        stepper.check(state["end"])
        stepper = stepper.inner
        if not rank0:
            return None
    if state["stopped"]:
        return {"stopped_at": state["end"], "run_dir": str(out_dir)}
    write_adapter(out_dir / "adapter", manifest, lora_a, stepper.final_b(state["end"]))
    last_acc = state["last_accuracy"]
    summary = {"program": str(program_path), "model": manifest["model"], "steps": steps, "q": manifest["q"],
               "batch_size": manifest["batch_size"], "noise": manifest["noise"], "seed": seed, "minutes": state["seconds"] / 60,
               "dev_before": state["before"], "dev_after": last_acc, "best_dev": state["best_accuracy"],
               "best_step": state["best_step"], "adapter": str(out_dir / "adapter"),
               "best_adapter": str(out_dir / "checkpoints" / "best" / "adapter"), "prge_version": prge.__version__}
    if readout_rank:
        summary["readout"] = fit_readout(stepper.engine, tensors, lora_a, out_dir / "checkpoints" / "best", readout, readout_rank,
                                         seed=seed, eps=eps, lr_of=stepper.lr_of, log=log)
        summary["minutes"] += summary["readout"]["minutes"]
    io.atomic_write_json(out_dir / "summary.json", summary)
    log(f"device training done: {steps} steps in {state['seconds'] / 60:.1f} min; dev accuracy "
        f"{state['before'] if state['before'] is not None else float('nan'):.4f} -> "
        f"{last_acc if last_acc is not None else float('nan'):.4f}; adapter (PEFT format): {out_dir / 'adapter'}")
    return summary
