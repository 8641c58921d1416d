"""A training run: set up model + data, loop over steps, evaluate, checkpoint, plot, write adapters.

Reproducibility: everything that varies from step to step is a function of (seed, step) — the
examples of step t (`step_indices`), the noise of step t (keyed by [seed, t]) — and the only state is
the trained tensors (plus Adam's moments for `fo`). A checkpoint therefore holds just those and the
step, and resuming from it continues the exact trajectory of an uninterrupted run.

Run folder layout (`runs/<task>-<method>-<time>/` unless --out):
    config.yaml          the resolved configuration
    metrics.jsonl        one row per step ({"step","loss","g_abs","seconds"}) and per evaluation
    curves.png           training loss and dev accuracy
    checkpoints/last/    PEFT adapter + trainer_state.json (+ optimizer.pt for Adam): resume from here;
                         written after the first evaluations, at every evaluation and every --checkpoint-every steps
    checkpoints/best/    the same, at the best dev accuracy seen: the adapter to use
    summary.json         before/after accuracies, steps, minutes
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from prge import adapters, io
from prge.batch import Encoded, collate, encode, label_word_ids, step_indices
from prge.config import TrainConfig, to_yaml
from prge.errors import PrgeError
from prge.evaluate import evaluate, evaluate_choice, evaluate_generation
from prge.lora import add_lora, count_trainable, lora_layers, trainable_b
from prge.loss import copy_losses
from prge.models import load_model
from prge.schedule import lr_at
from prge.zo import check_finite, mezo_step, prge_step


@dataclass
class Setup:
    cfg: TrainConfig
    model: torch.nn.Module
    tokenizer: object
    train: list[Encoded]
    dev: list[Encoded]
    test: list[Encoded]
    label_ids: torch.Tensor | None  # verbalizer token ids for classification, else None
    params: list[torch.Tensor]  # the tensors being trained
    pad_id: int
    data_name: str
    kind: str = "classification"  # the task's kind (prge.tasks.KINDS), or "completion" for the user's own completions

    @property
    def loss_kind(self) -> str:
        return self.cfg.loss if self.label_ids is not None else "lm"

    def loss_fn(self, batch, copies: int) -> torch.Tensor:
        return copy_losses(self.model, batch, copies, self.label_ids, self.loss_kind)

    def evaluate(self, items: list[Encoded]) -> dict:
        """{"accuracy", "loss", "n", ...}; "accuracy" is the task's primary score (F1 for generation)."""
        if self.kind == "multiple_choice":
            return evaluate_choice(self.model, items, self.pad_id, self.cfg.eval_batch_size)
        if self.kind == "generation":
            return evaluate_generation(self.model, self.tokenizer, items, self.pad_id, self.cfg.eval_batch_size)
        if self.kind not in ("classification", "completion"):
            raise PrgeError(f"cannot evaluate a task of kind {self.kind!r}", "report this as a bug in prge")
        return evaluate(self.model, items, self.pad_id, self.label_ids, self.cfg.eval_batch_size, self.loss_kind)


def load_data(cfg: TrainConfig, tokenizer):
    """(name, kind, train, dev, test, label_words) as Examples, from a built-in task or the user's files."""
    if cfg.train_file:
        from prge.userdata import load_user_data

        words = cfg.label_words
        if isinstance(words, list) and words and all("=" in w for w in words):  # --label-words neg=terrible pos=great
            words = dict(w.split("=", 1) for w in words)
        train, dev, info = load_user_data(cfg.train_file, cfg.eval_file, seed=cfg.seed, template=cfg.template,
                                          label_words=words, tokenizer=tokenizer)
        words = info.get("label_words")
        return Path(cfg.train_file).stem, "classification" if words else "completion", train, dev, dev, words
    from prge.tasks import load_task

    data = load_task(cfg.task, cfg.data_root, seed=cfg.seed, n_train=cfg.n_train, n_dev=cfg.n_dev, n_test=cfg.n_test)
    if cfg.template:
        from prge.tasks import retemplate

        data.train, data.dev, data.test = (retemplate(x, cfg.template, data.task.name) for x in (data.train, data.dev, data.test))
    words = data.task.label_words or None
    if cfg.label_words and words:
        if len(cfg.label_words) != len(words):
            raise PrgeError(f"task {data.task.name} has {len(words)} labels but {len(cfg.label_words)} label words were given",
                            f"give {len(words)} words, in the order of {words}")
        keep = not words[0].startswith(" ")  # WiC: its words follow a newline, no leading space
        words = [w if w.startswith(" ") or keep else " " + w for w in cfg.label_words]
    return data.task.name, data.task.kind, data.train, data.dev, data.test, words


def load_encoded(cfg: TrainConfig, tokenizer, allow_empty: bool = False):
    """(name, kind, train, dev, test, label_ids): `load_data`, tokenized for the model. An empty split is
    an error unless `allow_empty` (evaluation only needs the split it evaluates)."""
    name, kind, train, dev, test, words = load_data(cfg, tokenizer)
    label_ids = torch.tensor(label_word_ids(tokenizer, words), device=cfg.device) if words else None
    enc = dict(tokenizer=tokenizer, max_length=cfg.max_length, label_ids=label_ids.tolist() if label_ids is not None else None,
               truncate=cfg.truncate)
    splits = [encode(x, **enc) if x or not allow_empty else [] for x in (train, dev, test)]
    return (name, kind, *splits, label_ids)


def with_task(s: Setup, task: str) -> Setup:
    """The same model (and adapter) with another built-in task's data: `prge eval --task all`."""
    cfg = dataclasses.replace(s.cfg, task=task, train_file=None, eval_file=None)
    name, kind, train, dev, test, label_ids = load_encoded(cfg, s.tokenizer, allow_empty=True)
    return dataclasses.replace(s, cfg=cfg, train=train, dev=dev, test=test, label_ids=label_ids, data_name=name, kind=kind)


def prepare(cfg: TrainConfig, adapter: str | None = None, data: bool = True) -> Setup:
    """Load model and data, wrap the model (or load `adapter`), and pick the tensors to train.

    `data=False` loads no data (empty splits): `with_task` adds a task's later."""
    cfg.check()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, tok = load_model(cfg.model, cfg.dtype)
    model.to(cfg.device)
    name, kind, train_e, dev_e, test_e, label_ids = load_encoded(cfg, tok) if data else ("", "classification", [], [], [], None)
    if cfg.tune == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        params = [p for p in model.parameters()]
    else:
        if adapter:
            adapters.load_adapter(model, adapter)
        else:
            add_lora(model, cfg.targets, cfg.rank, cfg.alpha, train_a=cfg.tune == "lora", layers=cfg.layers, seed=cfg.seed)
        layers = lora_layers(model).values()
        params = [m.lora_B for m in layers] + ([m.lora_A for m in layers] if cfg.tune == "lora" else [])
        for p in params:
            p.requires_grad_(cfg.method == "fo")
    return Setup(cfg, model, tok, train_e, dev_e, test_e, label_ids, params, tok.pad_token_id, name, kind)


def make_optimizer(s: Setup):
    if s.cfg.method != "fo":
        return None
    cls = torch.optim.Adam if s.cfg.optimizer == "adam" else torch.optim.SGD
    return cls(s.params, lr=s.cfg.lr)


def one_step(s: Setup, batch, step: int, optimizer) -> tuple[float, float]:
    """(mean loss, mean |g|) of one training step of the configured method."""
    c = s.cfg
    lr = lr_at(c.lr, c.lr_schedule, step, c.steps)
    if c.method == "prge":
        r = prge_step(s.model, s.params, s.loss_fn, batch, step, seed=c.seed, q=c.q, eps=c.eps, lr=lr, mode=c.mode,
                      noise=c.noise, normalize=c.normalize)
    elif c.method == "mezo":
        r = mezo_step(s.model, s.params, s.loss_fn, batch, step, seed=c.seed, q=c.q, eps=c.eps, lr=lr, noise=c.noise,
                      normalize=c.normalize)
    else:
        loss = s.loss_fn(batch, 1)
        check_finite(loss.detach(), step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss[0].backward()
        optimizer.step()
        return float(loss[0].detach()), 0.0
    return float(r.losses.mean()), float(r.g.abs().mean())


# ------------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(s: Setup, folder: Path, step: int, state: dict, optimizer) -> None:
    with io.atomic_dir(folder) as tmp:
        tmp = Path(tmp)
        if s.cfg.tune == "full":
            io.save_tensors(tmp / "params.safetensors", {n: p.detach().contiguous() for n, p in s.model.named_parameters()})
        else:
            adapters.save_adapter(s.model, tmp, s.cfg.model)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        io.atomic_write_json(tmp / "trainer_state.json", {"step": step, **state, "config": dataclasses.asdict(s.cfg)})


def load_checkpoint(s: Setup, folder: Path, optimizer) -> dict:
    folder = io.resolve_dir(folder)
    state_file = folder / "trainer_state.json"
    if not state_file.is_file():
        raise PrgeError(f"{folder} is not a prge checkpoint (no trainer_state.json)", "pass a run folder or one of its checkpoints/ folders")
    state = json.loads(state_file.read_text())
    if s.cfg.tune == "full":
        tensors = io.load_tensors(folder / "params.safetensors")
        with torch.no_grad():
            for n, p in s.model.named_parameters():
                p.copy_(tensors[n])
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt"))
    return state


def resolve_resume(path: str) -> tuple[Path, Path]:
    """(run folder, checkpoint folder) from a run folder or a checkpoint folder."""
    p = Path(path)
    if (p / "checkpoints").is_dir():
        return p, io.resolve_dir(p / "checkpoints" / "last")
    if (p / "trainer_state.json").is_file() or Path(str(p) + ".old").is_dir():
        return p.parent.parent, io.resolve_dir(p)
    raise PrgeError(f"nothing to resume at {path}", "pass a run folder (with checkpoints/) or a checkpoint folder")


# ------------------------------------------------------------------------------------------------
# the loop


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(cfg: TrainConfig, stop_after: int | None = None) -> dict:
    """Train as configured; returns the summary. `stop_after` ends early after that step (tests use it
    to simulate an interrupted run)."""
    resume_ckpt = None
    if cfg.resume:
        run_dir, resume_ckpt = resolve_resume(cfg.resume)
        cfg.out = str(run_dir)
    s = prepare(cfg, adapter=str(resume_ckpt) if resume_ckpt and cfg.tune != "full" else None)
    run_dir = Path(cfg.out or f"runs/{s.data_name}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpts, metrics = run_dir / "checkpoints", run_dir / "metrics.jsonl"
    io.atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    optimizer = make_optimizer(s)
    log(f"prge: {cfg.method} ({cfg.mode if cfg.method == 'prge' else cfg.tune}) on {s.data_name}, model {cfg.model}, "
        f"{count_trainable(s.model) if cfg.method == 'fo' else sum(p.numel() for p in s.params):,} trained values, "
        f"{len(s.train)} train / {len(s.dev)} dev / {len(s.test)} test examples -> {run_dir}")

    state = {"best_accuracy": -1.0, "best_step": 0, "before": None, "seconds": 0.0}
    start = 0
    if resume_ckpt:
        state = load_checkpoint(s, resume_ckpt, optimizer)
        start = state.pop("step")
        state.pop("config", None)
        io.truncate_metrics(metrics, start)
        log(f"resumed from {resume_ckpt} at step {start}")
    else:
        metrics.unlink(missing_ok=True)
        t0 = time.time()
        before = s.evaluate(s.test)
        dev0 = s.evaluate(s.dev) if s.dev is not s.test else before
        state["before"] = before["accuracy"]
        state["best_accuracy"], state["best_step"] = dev0["accuracy"], 0
        io.append_jsonl(metrics, {"step": 0, "split": "dev", **dev0})
        log(f"before training: test accuracy {before['accuracy']:.4f} (n={before['n']}), dev {dev0['accuracy']:.4f} "
            f"[{time.time() - t0:.0f} s]")
        save_checkpoint(s, ckpts / "best", 0, state, optimizer)
        save_checkpoint(s, ckpts / "last", 0, state, optimizer)  # a kill before the first step keeps the evaluations

    bar = progress(cfg, start)
    t_loop = time.time() - state["seconds"]
    last_acc = None
    end = max(start, min(cfg.steps, stop_after)) if stop_after else cfg.steps  # never below the resumed step
    for step in range(start + 1, end + 1):
        t = time.time()
        batch = collate([s.train[i] for i in step_indices(len(s.train), cfg.batch_size, cfg.seed, step)], s.pad_id).to(cfg.device)
        loss, g_abs = one_step(s, batch, step, optimizer)
        io.append_jsonl(metrics, {"step": step, "loss": loss, "g_abs": g_abs, "seconds": time.time() - t})
        if cfg.eval_every and step % cfg.eval_every == 0 or step == cfg.steps:
            ev = s.evaluate(s.dev)
            last_acc = ev["accuracy"]
            io.append_jsonl(metrics, {"step": step, "split": "dev", **ev})
            state["seconds"] = time.time() - t_loop
            if ev["accuracy"] > state["best_accuracy"]:
                state["best_accuracy"], state["best_step"] = ev["accuracy"], step
                save_checkpoint(s, ckpts / "best", step, state, optimizer)
            save_checkpoint(s, ckpts / "last", step, state, optimizer)
            plot(metrics, run_dir / "curves.png")
        elif cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < end:
            state["seconds"] = time.time() - t_loop
            save_checkpoint(s, ckpts / "last", step, state, optimizer)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", dev_acc="-" if last_acc is None else f"{last_acc:.3f}")
    if bar is not None:
        bar.close()
    if stop_after and end < cfg.steps:
        state["seconds"] = time.time() - t_loop
        save_checkpoint(s, ckpts / "last", end, state, optimizer)
        return {"stopped_at": end, "run_dir": str(run_dir)}
    return finish(s, run_dir, state, time.time() - t_loop)


def finish(s: Setup, run_dir: Path, state: dict, seconds: float) -> dict:
    cfg = s.cfg
    after = s.evaluate(s.test)
    summary = {"task": s.data_name, "model": cfg.model, "method": cfg.method, "steps": cfg.steps,
               "minutes": seconds / 60, "test_before": state["before"], "test_after_last": after["accuracy"],
               "best_dev": state["best_accuracy"], "best_step": state["best_step"], "n_test": after["n"],
               "adapter": str(run_dir / "checkpoints" / "best")}
    if state["best_step"] != cfg.steps and cfg.tune != "full":
        best = prepare_eval_copy(s, run_dir / "checkpoints" / "best")
        summary["test_after_best"] = best["accuracy"]
    else:
        summary["test_after_best"] = after["accuracy"]
    io.atomic_write_json(run_dir / "summary.json", summary)
    plot(run_dir / "metrics.jsonl", run_dir / "curves.png")
    log(f"test accuracy: before {summary['test_before']:.4f} -> after {summary['test_after_last']:.4f} (last step), "
        f"{summary['test_after_best']:.4f} (best dev checkpoint, step {state['best_step']}); "
        f"{cfg.steps} steps in {seconds / 60:.1f} min")
    log(f"adapter (PEFT format): {summary['adapter']}   metrics: {run_dir / 'metrics.jsonl'}   curves: {run_dir / 'curves.png'}")
    return summary


def prepare_eval_copy(s: Setup, folder: Path) -> dict:
    """Evaluate the test split with the weights of checkpoint `folder`, then restore the current ones."""
    current = [p.detach().clone() for p in trainable_b(s.model)]
    adapters.load_adapter(s.model, io.resolve_dir(folder))  # copies into the existing LoRA layers
    result = s.evaluate(s.test)
    with torch.no_grad():
        for p, c in zip(trainable_b(s.model), current):
            p.copy_(c)
    return result


def progress(cfg: TrainConfig, start: int):
    if not cfg.progress or cfg.steps == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)


def plot(metrics: Path, out: Path) -> None:
    """Loss per step (with a moving average) and dev accuracy, as a PNG."""
    import io as _io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    tr = [r for r in rows if "loss" in r and "split" not in r]
    ev = [r for r in rows if r.get("split") == "dev"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    if tr:
        xs, ys = [r["step"] for r in tr], [r["loss"] for r in tr]
        a.plot(xs, ys, alpha=0.35, lw=0.8, label="step loss")
        w = max(1, len(ys) // 20)
        avg = [sum(ys[max(0, i - w + 1):i + 1]) / len(ys[max(0, i - w + 1):i + 1]) for i in range(len(ys))]
        a.plot(xs, avg, lw=1.5, label=f"moving average ({w})")
        a.legend()
    a.set(xlabel="step", ylabel="training loss", title="loss")
    if ev:
        b.plot([r["step"] for r in ev], [r["accuracy"] for r in ev], marker="o")
    b.set(xlabel="step", ylabel="dev accuracy", title="dev accuracy")
    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    io.atomic_write_bytes(out, buf.getvalue())

