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

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from prge import io
from prge.run import adapters
from prge.data.batch import Encoded, collate, encode, label_word_ids, step_indices
from prge.config import TrainConfig, to_yaml
from prge.errors import PrgeError
from prge.log import say
from prge.run import loop
from prge.run.evaluate import evaluate, evaluate_choice, evaluate_generation
from prge.run.loop import Plan
from prge.run.lock import LOCK_NAME, run_lock
from prge.run.plot import plot
from prge.zo.lora import add_lora, count_trainable, lora_layers, trainable_b
from prge.zo import readout
from prge.zo.loss import copy_losses
from prge.models.load import load_model
from prge.zo.schedule import lr_at
from prge.zo.step import check_finite, mezo_step, prge_step


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
    kind: str = "classification"  # the task's kind (prge.data.tasks.KINDS), or "completion" for the user's own completions
    share: object = None  # this process's queries of a torchrun run (`prge.run.dist.Share`), else None
    readout_rank: int = 0  # the label readout fitted after the last step on the best checkpoint (`prge.zo.readout`), 0: none
    readout_summary: dict | None = None  # summary.json's "readout" entry, once fitted (`readout.summary_entry`)

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
        from prge.data.userdata import load_user_data

        words = cfg.label_words
        if isinstance(words, list) and words and all("=" in w for w in words):  # --label-words neg=terrible pos=great
            words = dict(w.split("=", 1) for w in words)
            if len(words) < len(cfg.label_words):
                raise PrgeError(f"--label-words names a label twice ({' '.join(cfg.label_words)})", "give each label name once")
        elif isinstance(words, list) and any("=" in w for w in words):
            raise PrgeError(f"--label-words mixes name=word pairs and plain words ({' '.join(words)}), which is ambiguous",
                            "give either name=word for every label, or the words alone in label order")
        train, dev, info = load_user_data(cfg.train_file, cfg.eval_file, seed=cfg.seed, template=cfg.template,
                                          label_words=words, tokenizer=tokenizer)
        words = info.get("label_words")
        test = dev
        if cfg.n_test is not None and cfg.n_test < len(dev):  # --n-test caps the evaluation file's test use too
            from prge.data.sampling import seeded_sample

            test, _ = seeded_sample(dev, cfg.n_test, cfg.seed, what="evaluation rows")
        return Path(cfg.train_file).stem, "classification" if words else "completion", train, dev, test, words
    from prge.data.tasks import load_task

    data = load_task(cfg.task, cfg.data_root, seed=cfg.seed, n_train=cfg.n_train, n_dev=cfg.n_dev, n_test=cfg.n_test)
    if cfg.template:
        from prge.data.tasks import retemplate

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
            choose_a(cfg, model, train_e, tok.pad_token_id)
        layers = lora_layers(model).values()
        params = [m.lora_B for m in layers] + ([m.lora_A for m in layers] if cfg.tune == "lora" else [])
        for p in params:
            p.requires_grad_(cfg.method == "fo")
    return Setup(cfg, model, tok, train_e, dev_e, test_e, label_ids, params, tok.pad_token_id, name, kind,
                 readout_rank=readout_rank(cfg, name, kind, label_ids) if data else 0)


def readout_rank(cfg: TrainConfig, name: str, kind: str, label_ids) -> int:
    """The label readout's rank this run fits: --readout, or by default 64 where it applies (see its --help)."""
    applies = label_ids is not None and kind == "classification" and cfg.tune == "lora-fa" and cfg.loss == "class"
    if cfg.readout is None:
        return readout.DEFAULT_RANK if applies and cfg.method in ("prge", "mezo") else 0
    if cfg.readout and not applies:
        raise PrgeError(f"--readout {cfg.readout} trains a readout of the label words' logits, but {name} is not a classification "
                        f"task with label words trained with --loss class",
                        "drop --readout, or train a task with label words (--label-words for your text/label rows) with --loss class")
    return cfg.readout


def choose_a(cfg: TrainConfig, model, train: list[Encoded], pad_id: int) -> None:
    """Replace the random A with the one `--lora-a` asks for (`prge.zo.subspace`)."""
    if cfg.lora_a == "random":
        return
    from prge.zo import subspace

    if cfg.lora_a == "activations":
        rows = train[:cfg.lora_a_rows]
        if not rows:
            raise PrgeError("--lora-a activations needs training rows", "give training data, or use --lora-a random")
        n = cfg.eval_batch_size
        batches = (collate(rows[i:i + n], pad_id).to(cfg.device) for i in range(0, len(rows), n))
        t0 = time.time()
        subspace.set_a(model, subspace.activation_basis(model, batches, cfg.rank))
        say(f"prge: A from the activations of {len(rows)} training rows ({len(rows)} row-forwards, {time.time() - t0:.0f} s)")
    else:
        subspace.set_a(model, subspace.load_a(cfg.lora_a), where=cfg.lora_a)


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
                      noise=c.noise, normalize=c.normalize, share=s.share)
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
    io.verify_dir(folder)
    try:
        state = json.loads(state_file.read_text())
        assert isinstance(state, dict) and isinstance(state["step"], int)
    except (ValueError, AssertionError, KeyError):
        raise PrgeError(f"{state_file} is damaged", "resume from another checkpoint (checkpoints/best) or start again") from None
    if s.cfg.tune == "full":
        tensors = io.load_tensors(folder / "params.safetensors")
        with torch.no_grad():
            for n, p in s.model.named_parameters():
                p.copy_(tensors[n])
    if optimizer is not None:
        try:
            optimizer.load_state_dict(torch.load(folder / "optimizer.pt"))
        except Exception as e:  # missing, truncated or not a state dict of this optimizer
            raise PrgeError(f"{folder / 'optimizer.pt'} cannot be loaded ({str(e).splitlines()[0] if str(e) else type(e).__name__})",
                            "resume from another checkpoint (checkpoints/best) or start again") from None
    return state


def resolve_resume(path: str) -> tuple[Path, Path | None]:
    """(run folder, checkpoint folder) from a run folder or a checkpoint folder; the checkpoint is None
    for a run folder whose run was stopped before its first checkpoint."""
    p = Path(path)
    last = io.resolve_dir(p / "checkpoints" / "last")
    if (p / "checkpoints").is_dir() and last.is_dir():
        io.verify_dir(last)  # a damaged checkpoint is refused before the model is loaded
        return p, last
    if ((p / "config.yaml").is_file() or (p / LOCK_NAME).is_file()) and not last.is_dir():
        return p, None  # killed before its first checkpoint: nothing was trained yet, so it starts again at step 0
    if (p / "trainer_state.json").is_file() or Path(str(p) + ".old").is_dir():
        io.verify_dir(io.resolve_dir(p))
        return p.parent.parent, io.resolve_dir(p)
    raise PrgeError(f"nothing to resume at {path}", "pass a run folder (with checkpoints/) or a checkpoint folder")


# ------------------------------------------------------------------------------------------------
# the eager stepper and the run


class EagerStepper:
    """`prge.run.loop.Stepper` over the model in PyTorch: prge, mezo or fo steps on `Setup`."""

    def __init__(self, s: Setup):
        self.s = s
        self.optimizer = make_optimizer(s)

    def start(self) -> tuple[dict, dict]:
        s, t0 = self.s, time.time()
        before = s.evaluate(s.test)
        dev0 = s.evaluate(s.dev) if s.dev is not s.test else before
        say(f"before training: test accuracy {before['accuracy']:.4f} (n={before['n']}), dev {dev0['accuracy']:.4f} "
            f"[{time.time() - t0:.0f} s]")
        return before, dev0

    def step(self, step: int) -> tuple[float, float]:
        s, c = self.s, self.s.cfg
        idx = step_indices(len(s.train), c.batch_size, c.seed, step)
        if s.share is not None:  # a data-parallel torchrun rank takes its share of the step's examples
            idx = s.share.rows(idx)
        batch = collate([s.train[i] for i in idx], s.pad_id).to(c.device)
        return one_step(s, batch, step, self.optimizer)

    def evaluate(self, step: int) -> dict:
        return self.s.evaluate(self.s.dev)

    def save(self, folder: Path, step: int, state: dict) -> None:
        save_checkpoint(self.s, folder, step, state, self.optimizer)

    def load(self, folder: Path) -> dict:
        return load_checkpoint(self.s, folder, self.optimizer)


def run(cfg: TrainConfig, stop_after: int | None = None, base=None) -> dict:
    """Train as configured; returns the summary. `stop_after` ends early after that step (tests use it
    to simulate an interrupted run). `base`, a function of the model, changes the frozen base in place
    after it is loaded (`benchmarks/quantized.py train-eager` quantises it as a device program's is).
    The run folder is locked for the run (`prge.run.lock`). Under torchrun with more than one process,
    `prge.run.dist` runs it."""
    from prge.run import dist

    if dist.launched():
        if base is not None:
            raise PrgeError("a changed base is for one process", "run it without torchrun")
        return dist.run(cfg, stop_after)
    resume_ckpt = None
    if cfg.resume:
        run_dir, resume_ckpt = resolve_resume(cfg.resume)
        cfg.out = str(run_dir)
    with contextlib.ExitStack() as held:
        if cfg.out:  # locked before anything is loaded or written
            held.enter_context(run_lock(cfg.out, log=say))
        if cfg.resume and resume_ckpt is None:
            say(f"prge: {cfg.out} was stopped before its first checkpoint; starting again at step 0")
        s = prepare(cfg, adapter=str(resume_ckpt) if resume_ckpt and cfg.tune != "full" else None)
        if base is not None:
            base(s.model)
        run_dir = Path(cfg.out or f"runs/{s.data_name}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}")
        if not cfg.out:
            held.enter_context(run_lock(run_dir, log=say))
        io.atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
        stepper = EagerStepper(s)
        say(f"prge: {cfg.method} ({cfg.mode if cfg.method == 'prge' else cfg.tune}) on {s.data_name}, model {cfg.model}, "
            f"{count_trainable(s.model) if cfg.method == 'fo' else sum(p.numel() for p in s.params):,} trained values, "
            f"{len(s.train)} train / {len(s.dev)} dev / {len(s.test)} test examples -> {run_dir}")
        plan = Plan(cfg.steps, cfg.eval_every, cfg.checkpoint_every, cfg.progress, "train", stop_after)
        state = loop.train(stepper, plan, run_dir, resume_ckpt, log=say,
                           on_eval=lambda step, ev: plot(run_dir / "metrics.jsonl", run_dir / "curves.png"))
        if state["stopped"]:
            return {"stopped_at": state["end"], "run_dir": str(run_dir)}
        return finish(s, run_dir, state, state["seconds"])


def finish(s: Setup, run_dir: Path, state: dict, seconds: float) -> dict:
    """Evaluate the test split after training, write summary.json and the curves, print the result."""
    cfg = s.cfg
    after = s.evaluate(s.test)
    summary = {"task": s.data_name, "model": cfg.model, "method": cfg.method, "steps": cfg.steps,
               "minutes": seconds / 60, "test_before": state["before"], "test_after_last": after["accuracy"],
               "test_loss_before": state.get("before_loss"), "test_loss_after_last": after["loss"],
               "best_dev": state["best_accuracy"], "best_step": state["best_step"], "n_test": after["n"],
               "adapter": str(run_dir / "checkpoints" / "best")}
    best = after
    if s.readout_rank:
        best = fit_readout(s, run_dir / "checkpoints" / "best")
        summary["readout"] = s.readout_summary
        summary["minutes"] += summary["readout"]["minutes"]
    elif state["best_step"] != cfg.steps and cfg.tune != "full":
        best = prepare_eval_copy(s, run_dir / "checkpoints" / "best")
    summary["test_after_best"], summary["test_loss_after_best"] = best["accuracy"], best["loss"]
    completion = s.kind == "completion"
    if completion:  # per-token answer loss: its exp is the answer perplexity
        for k in ("before", "after_last", "after_best"):
            loss = summary[f"test_loss_{k}"]
            summary[f"test_perplexity_{k}"] = math.exp(loss) if loss is not None and loss < 700 else None
    io.atomic_write_json(run_dir / "summary.json", summary)
    plot(run_dir / "metrics.jsonl", run_dir / "curves.png")
    what = "token accuracy" if completion else "accuracy"
    say(f"test {what}: before {_num(summary['test_before'])} -> after {_num(summary['test_after_last'])} (last step), "
        f"{_num(summary['test_after_best'])} (best dev checkpoint, step {state['best_step']}"
        f"{'; its readout fitted on the untrained model, B = 0' if summary.get('readout', {}).get('checkpoint_step') == 0 and state['best_step'] else ''}); "
        f"{cfg.steps} steps in {seconds / 60:.1f} min")
    if completion:
        say(f"test answer loss: before {_num(summary['test_loss_before'])} -> after {_num(summary['test_loss_after_last'])} "
            f"(last), {_num(summary['test_loss_after_best'])} (best); perplexity {_num(summary['test_perplexity_before'], 2)} -> "
            f"{_num(summary['test_perplexity_after_last'], 2)} (last), {_num(summary['test_perplexity_after_best'], 2)} (best)")
    say(f"adapter (PEFT format): {summary['adapter']}   metrics: {run_dir / 'metrics.jsonl'}   curves: {run_dir / 'curves.png'}")
    return summary


def _num(x, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def fit_readout(s: Setup, best: Path) -> dict:
    """After the LoRA steps: fit the label readout (`prge.zo.readout`) on the best dev checkpoint's model
    and, where that checkpoint is past step 0, on the untrained model too; keep the better on dev
    (`readout.keep_untrained`), write it into the best checkpoint (with B = 0 where the untrained model
    won) and evaluate the test split with it; the model keeps those weights.

    The readout's own dev selection includes B = 0, so the checkpoint's dev accuracy never drops. It comes
    after the LoRA steps because a LoRA step changes the hidden states the readout reads: fitted first,
    the readout amplifies that change (measured: copa2 dev 90.5% fell to 47.5% in 4 LoRA steps)."""
    c = s.cfg
    have = io.resolve_dir(best).is_dir()
    state = json.loads((io.resolve_dir(best) / "trainer_state.json").read_text()) if have else {}
    step = state.pop("step", 0)
    state.pop("config", None)

    def fit_here(where: str) -> readout.Fit:
        readout.attach(s.model, None)
        fit = readout.fit(s.model, s.train[:c.readout_rows], s.dev, s.pad_id, s.label_ids, rank=s.readout_rank,
                          steps=c.readout_steps, lr=c.readout_lr, q=c.q, eps=c.eps, seed=c.seed, eval_batch_size=c.eval_batch_size)
        say(f"label readout (rank {fit.readout.rank}, {fit.readout.b.numel()} values) on {where}: dev "
            f"{fit.dev_before:.4f} -> {fit.dev_after:.4f} (best of {c.readout_steps} steps at step {fit.best_step}); features of "
            f"{fit.rows} training + {len(s.dev)} dev rows {fit.seconds_features:.0f} s, steps {fit.seconds_steps:.1f} s")
        return fit

    def zero_b() -> None:
        with torch.no_grad():
            for p in trainable_b(s.model):
                p.zero_()

    untrained = None
    if have and step > 0:
        zero_b()
        untrained = fit_here("the untrained model")
    if have:
        adapters.load_adapter(s.model, io.resolve_dir(best))  # the best B (and any readout of an earlier, killed finish)
    fit = fit_here(f"the best checkpoint (step {step})")
    if untrained is not None:
        both = {"seconds_features": fit.seconds_features + untrained.seconds_features,
                "seconds_steps": fit.seconds_steps + untrained.seconds_steps}
        if readout.keep_untrained(fit, untrained):
            say(f"keeping the readout on the untrained model (dev {untrained.dev_after:.4f} > {fit.dev_after:.4f}): "
                "the best checkpoint's B is set to 0")
            zero_b()
            fit, step = untrained, 0
        fit = dataclasses.replace(fit, **both)
    readout.attach(s.model, fit.readout)
    s.readout_summary = readout.summary_entry(fit, c.readout_steps, step, untrained.dev_after if untrained is not None else None)
    if have:
        save_checkpoint(s, best, step, state, None)
    return s.evaluate(s.test)


def prepare_eval_copy(s: Setup, folder: Path) -> dict:
    """Evaluate the test split with the weights of checkpoint `folder`, then restore the current ones."""
    current = [p.detach().clone() for p in trainable_b(s.model)]
    adapters.load_adapter(s.model, io.resolve_dir(folder))  # copies into the existing LoRA layers
    result = s.evaluate(s.test)
    with torch.no_grad():
        for p, c in zip(trainable_b(s.model), current):
            p.copy_(c)
    return result
