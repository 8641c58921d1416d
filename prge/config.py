"""The training configuration: one dataclass whose fields carry their own help text.

The CLI builds its flags from these fields (`prge train --help` prints the help below), a YAML file
can set any of them (`prge train --config run.yaml`; flags override the file), and the resolved
config is written beside every run as `config.yaml`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from prge.errors import PrgeError
from prge.zo.schedule import LR_SCHEDULES, check_schedule


def opt(default, help: str, choices=None):
    meta = {"help": help}
    if choices:
        meta["choices"] = choices
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # what to train
    model: str = opt("smollm2-135m", "built-in name (smollm2-135m), a local model folder, or a Hugging Face hub id")
    task: str = opt("sst2", "built-in task (see `prge tasks`; `prge eval` also takes `all`), ignored when --train-file is given")
    data_root: str | None = opt(None, "folder holding the task data (default: $PRGE_DATA, else ../shared/data)")
    train_file: str | None = opt(None, "your own training data: .jsonl or .csv with prompt/completion, messages, or text/label rows")
    eval_file: str | None = opt(None, "your own evaluation data (default: a seeded 10%% of --train-file)")
    template: str | None = opt(None, "prompt template: for text/label rows {text} is the row's text (default \"{text}\"); for a built-in classification task it replaces the task's template and names its fields, e.g. \"Review: {sentence}\\nSentiment:\" for sst2; on the command line \\n is a newline and \\t a tab (see `prge tasks`)")
    label_words: list[str] | None = opt(None, "label words in label order, or name=word pairs (a leading space is added): for text/label rows (a row's label is its word, e.g. A or positive, its index, or its name), or to replace a built-in task's words")
    # method
    method: str = opt("prge", "prge: parallel queries in one batched forward; mezo: sequential queries; fo: backprop", ["prge", "mezo", "fo"])
    mode: str = opt("dual", "prge only: dual = one forward of 2q·b rows; single = two forwards of q·b rows", ["dual", "single"])
    tune: str = opt("lora-fa", "what is trained: lora-fa (B only, A frozen), lora (A and B; fo only), full (every weight; mezo or fo)", ["lora-fa", "lora", "full"])
    optimizer: str = opt("adam", "fo only: the backprop optimizer", ["sgd", "adam"])
    q: int = opt(4, "zeroth-order queries per step (perturbation directions)")
    batch_size: int = opt(4, "examples per step (each query sees the same b examples; the forward batch is 2·q·b)")
    steps: int = opt(300, "training steps (about 10 minutes for the default job on a 2-core CPU)")
    lr: float = opt(3e-3, "learning rate (the built-in gemma3-270m defaults to 1e-4: it diverges at 1e-3); zeroth-order runs with more --steps need a lower lr, about 3e-3 * (300 / steps)^(2/3) (e.g. 7e-4 at 1700 steps)")
    lr_schedule: str = opt("constant", "learning-rate schedule over --steps: constant, or a linear / cosine decay from --lr towards 0", list(LR_SCHEDULES))
    eps: float = opt(1e-2, "zeroth-order perturbation scale ε")
    normalize: bool = opt(False, "zeroth-order: divide each loss difference by the spread (std) of the step's 2q losses instead of by 2ε (needs q >= 2)")
    loss: str = opt("class", "lm: next-token CE over the vocabulary on the answer tokens; class: CE over the label words (classification only)", ["lm", "class"])
    noise: str = opt("counter", "counter: hash-based noise keyed by (seed, step), identical in eager and engine; torch: torch.Generator (eager only, faster for --tune full)", ["counter", "torch"])
    # LoRA
    rank: int = opt(16, "LoRA rank r")
    alpha: float = opt(32.0, "LoRA alpha (the update is scaled by alpha/r)")
    targets: list[str] | None = opt(None, "module names to wrap (default: q,k,v,o,gate,up,down projections, or the family's equivalents); fewer modules learn faster only where their gradient is more coherent than the rest's, which depends on the task (q_proj k_proj on SST-2 from its earlier prompt: ~3x over the first 50 steps at a 10x lr, then no faster; docs/optimiser.md)")
    layers: list[int] | None = opt(None, "only wrap modules in these decoder layers (default: all); the top layers alone learn less than all of them (SST-2 from its earlier prompt, backprop: top 4 80.3%%, top 8 83.1%%, all 86.1%%; P-RGE on the top 15 at --lr 1e-2: 82.6%%, its best zeroth-order figure; docs/optimiser.md section 8)")
    lora_a: str = opt("random", "the frozen LoRA A: random (seeded Kaiming, as PEFT), activations (the top-r principal directions of each wrapped module's inputs over --lora-a-rows training rows: forward passes only; its A x is ~35x larger, so use about 1/30 of the lr; predicted 1.0-1.6x faster per step on SST-2, COPA, RTE and a user's skill set, measured 1.2-1.3x on SST-2: docs/optimiser.md), or a .safetensors file of A matrices")
    lora_a_rows: int = opt(256, "training rows whose activations choose A with --lora-a activations (one forward each)")
    readout: int | None = opt(None, "rank r of the label readout fitted after the steps on the best checkpoint (and on the untrained model where the best checkpoint is past step 0: the better on dev is kept, which costs one more forward per row): a correction B (A h) of the label words' logits, A the top-r whitened principal directions of the final hidden state h over --readout-rows training rows, B trained zeroth-order on those cached features (one forward per row, then --readout-steps steps of small products: seconds); it teaches what h already holds but the head does not read out, e.g. answering by letter (copa4 24.5 -> 56.5%%, copa2 48 -> 90.5%% in 2-5 minutes; it cannot teach what h lacks: docs/optimiser.md section 7); saved in the adapter as LoRA on lm_head; `prge device-train` fits it the same way after its steps. Default: 64 for classification tasks (label words) under prge or mezo with the class loss, else off; 0 turns it off")
    readout_steps: int = opt(10000, "zeroth-order steps of the readout on its cached features (16 rows and --q queries each; the best dev accuracy among its evaluations every 250 steps, B = 0 included, is kept)")
    readout_lr: float = opt(1e-2, "learning rate of the readout's steps (its inputs are whitened, so one value suits every model and task measured)")
    readout_rows: int = opt(1000, "training rows whose final hidden states the readout is trained on (one forward each)")
    # data shape
    n_train: int | None = opt(None, "training examples sampled (seeded) from the task's train pool (default: 1000, or fewer where the task has fewer; see the README's task table)")
    n_dev: int | None = opt(None, "held-out dev examples used for periodic evaluation and best-checkpoint selection (default: 500, or what the task has left)")
    n_test: int | None = opt(None, "cap on test examples (default: the whole test split)")
    max_length: int = opt(256, "longest prompt+answer in tokens")
    truncate: str = opt("left", "over-long prompts: left = drop tokens from the prompt's start; error = refuse", ["left", "error"])
    # run
    eval_every: int = opt(50, "evaluate on dev every N steps (0: only at the start and the end)")
    checkpoint_every: int = opt(25, "also write checkpoints/last every N steps between evaluations, so a killed run resumes losing at most N steps (0: only at evaluations)")
    eval_batch_size: int = opt(32, "examples per evaluation forward")
    seed: int = opt(0, "seed for data sampling, LoRA A initialisation, and noise")
    dtype: str = opt("float32", "model weights dtype (keep float32 for zeroth-order on CPU)", ["float32", "bfloat16", "float16"])
    device: str = opt("cpu", "torch device for eager training (cpu, cuda, cuda:1, mps)")
    threads: int | None = opt(None, "torch CPU threads (default: torch's choice)")
    out: str | None = opt(None, "run folder (default: runs/<task>-<method>-<time>)")
    resume: str | None = opt(None, "a run folder or checkpoint folder to continue exactly from")
    progress: bool = opt(True, "show a progress bar")
    # more than one process (torchrun -m prge train ...; see the README's "More than one machine")
    parallel: str = opt("queries", "torchrun runs: how the ranks split a step: queries (rank r evaluates q/W of the queries on the whole batch; the same trajectory as one process) or data (every rank evaluates all q queries on batch-size/W of the step's examples and the losses are averaged: for batches larger than one machine takes)", choices=["queries", "data"])
    check_every: int = opt(50, "torchrun runs: every N steps the ranks compare a checksum of B and stop with an error naming the step if they differ (0: only at the end)")
    dist_timeout: float = opt(600.0, "torchrun runs: seconds a rank waits for the others (to connect, and at each exchange) before stopping with an error")

    def check(self) -> "TrainConfig":
        check_types(self)
        if self.q < 1:
            raise PrgeError(f"q (queries per step) must be >= 1, got {self.q}", "pass --q 1 or more")
        if not self.eps > 0:
            raise PrgeError(f"eps (perturbation scale) must be > 0, got {self.eps}", "pass e.g. --eps 1e-2")
        if self.batch_size < 1 or self.steps < 0:
            raise PrgeError("batch size must be >= 1 and steps >= 0", "fix --batch-size / --steps")
        check_schedule(self.lr_schedule)
        if self.checkpoint_every < 0 or self.eval_every < 0:
            raise PrgeError("--checkpoint-every and --eval-every must be >= 0", "pass 0 to turn them off, or a number of steps")
        if self.normalize and self.q < 2 and self.method != "fo":
            raise PrgeError("--normalize needs q >= 2 (the spread of one ± pair is not defined)", "pass --q 2 or more, or drop --normalize")
        if self.tune == "lora" and self.method != "fo":
            raise PrgeError("--tune lora trains A too, which only backprop does here", "use --tune lora-fa with prge/mezo, or --method fo")
        if self.lora_a != "random" and self.tune == "full":
            raise PrgeError(f"--lora-a {self.lora_a} chooses LoRA's A, but --tune full trains no LoRA",
                            "drop --lora-a, or use --tune lora-fa")
        if self.lora_a not in ("random", "activations") and not self.lora_a.endswith(".safetensors"):
            raise PrgeError(f"--lora-a {self.lora_a!r} is not random, activations or a .safetensors file",
                            "pass --lora-a random, --lora-a activations or --lora-a path/to/a.safetensors")
        if self.readout and self.tune == "full":
            raise PrgeError(f"--readout {self.readout} adds a low-rank readout beside LoRA, but --tune full trains no LoRA",
                            "drop --readout (or pass --readout 0), or use --tune lora-fa")
        if self.readout is not None and self.readout < 0 or self.readout_steps < 0 or self.readout_rows < 1:
            raise PrgeError(f"--readout must be >= 0, --readout-steps >= 0 and --readout-rows >= 1 (got {self.readout}, "
                            f"{self.readout_steps}, {self.readout_rows})", "pass e.g. --readout 64 --readout-steps 10000 --readout-rows 1000")
        if self.lora_a_rows < 1:
            raise PrgeError(f"--lora-a-rows must be >= 1, got {self.lora_a_rows}", "pass e.g. --lora-a-rows 256")
        if self.tune == "full" and self.method == "prge":
            raise PrgeError("P-RGE perturbs copies of the LoRA B matrices; it does not do full-parameter training",
                            "use --method mezo --tune full, or --tune lora-fa")
        for name, low, strict in DOMAINS:
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, float) and not math.isfinite(v) or (v <= low if strict else v < low):
                bound = f"> {low}" if strict else f">= {low}"
                raise PrgeError(f"{_flag(name)} must be a finite number {bound}, got {v}", f"pass {_flag(name)} with a value {bound}")
        if self.seed >= 2**63:
            raise PrgeError(f"--seed must be below 2^63, got {self.seed}", "pass a smaller seed")
        if self.layers is not None and any(i < 0 for i in self.layers):
            raise PrgeError(f"--layers takes decoder layer indices >= 0, got {self.layers}", "pass e.g. --layers 0 1")
        return self


# (field, bound, strict): numbers outside these domains make no sense and are refused by `check`
DOMAINS = (("q", 1, False), ("batch_size", 1, False), ("steps", 0, False), ("lr", 0, False), ("eps", 0, True), ("readout_lr", 0, True),
           ("rank", 1, False), ("alpha", 0, True), ("n_train", 1, False), ("n_dev", 0, False), ("n_test", 1, False),
           ("max_length", 2, False), ("eval_every", 0, False), ("checkpoint_every", 0, False), ("eval_batch_size", 1, False),
           ("seed", 0, False), ("threads", 1, False))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_types(cfg: "TrainConfig") -> None:
    """Each option holds a value of its declared type (a YAML file can hold anything), else a PrgeError."""
    for f in fields():
        v, tp = getattr(cfg, f.name), str(f.type)
        if v is None and "None" in tp:
            continue
        if tp.startswith("list"):
            item = int if "int" in tp else str
            ok = isinstance(v, list) and all(isinstance(x, item) and not isinstance(x, bool) for x in v)
            if f.name == "label_words" and isinstance(v, dict):  # {label name: word}, from Python or YAML
                ok = all(isinstance(k, (str, int)) and not isinstance(k, bool) and isinstance(w, str) for k, w in v.items())
            want = f"a list of {'integers' if item is int else 'strings'}" + (" (or a mapping of label: word)" if f.name == "label_words" else "")
        elif tp.startswith("bool"):
            ok, want = isinstance(v, bool), "true or false"
        elif tp.startswith("int"):
            ok, want = isinstance(v, int) and not isinstance(v, bool), "an integer"
        elif tp.startswith("float"):
            ok, want = isinstance(v, (int, float)) and not isinstance(v, bool), "a number"
        else:
            ok, want = isinstance(v, str), "a string"
        if ok and "choices" in f.metadata and v not in f.metadata["choices"]:
            what = f.name.replace("_", " ")  # "unknown lr schedule 'exp'", as the schedule module says it
            raise PrgeError(f"unknown {what} {v!r}: {f.name} must be one of {', '.join(f.metadata['choices'])}",
                            f"fix {_flag(f.name)}")
        if not ok:
            raise PrgeError(f"{f.name} must be {want}, got {v!r}"[:300], f"fix {_flag(f.name)} (see `prge train --help`)")


def fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(TrainConfig))


def load_yaml(path: str, sealed: bool = False) -> dict:
    """Options from a YAML file. `sealed`: a run folder's config.yaml, whose SHA-256 line (when present)
    must match; a --config file may be a copied and edited one, so its line is only a comment."""
    p = Path(path)
    if not p.is_file():
        raise PrgeError(f"config file {path} not found", "pass an existing YAML file to --config")
    from prge.io import text_lines

    text = "".join(text_lines(p))
    if sealed:
        check_seal(text, path)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise PrgeError(f"{path}: not valid YAML ({str(e).splitlines()[0]})", "fix the file") from None
    if not isinstance(data, dict):
        raise PrgeError(f"{path}: expected a mapping of option: value", "write one `option: value` per line")
    if any(not isinstance(k, str) for k in data):
        raise PrgeError(f"{path}: option names must be words, got {sorted(map(repr, data))[:5]}", "write one `option: value` per line")
    known = {f.name for f in fields()}
    unknown = sorted(set(k.replace("-", "_") for k in data) - known)
    if unknown:
        raise PrgeError(f"{path}: unknown options {unknown}", "see `prge train --help` for the option names")
    return coerce({k.replace("-", "_"): v for k, v in data.items()}, path)


def coerce(values: dict, where: str = "config") -> dict:
    """Numbers written as YAML strings become numbers: YAML 1.1 reads `lr: 1e-3` as the string "1e-3"."""
    types = {f.name: str(f.type) for f in fields()}
    out = dict(values)
    for k, v in values.items():
        tp = types.get(k, "")
        if isinstance(v, str) and ("float" in tp or "int" in tp) and not tp.startswith("list"):
            try:
                out[k] = int(v) if tp.startswith("int") else float(v)
            except ValueError:
                raise PrgeError(f"{where}: {k} must be a number, got {v!r}"[:300],
                                f"write e.g. {k}: {'4' if tp.startswith('int') else '0.001'}") from None
    return out


SEAL = "# sha256 of the lines above: "


def to_yaml(cfg: TrainConfig) -> str:
    """The run folder's config.yaml; its last line is the SHA-256 of the lines above it, so a damaged
    file is refused on --resume instead of silently training with another value."""
    body = yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
    return f"{body}{SEAL}{hashlib.sha256(body.encode()).hexdigest()}\n"


def check_seal(text: str, path: str) -> None:
    """A config written by prge (with its SHA-256 line) must still match it; hand-written ones have no line."""
    head, sep, tail = text.rpartition(SEAL)
    if not sep:
        return
    if tail.strip() != hashlib.sha256(head.encode()).hexdigest():
        raise PrgeError(f"{path} is damaged or was edited: its SHA-256 differs from the one prge recorded in its last line",
                        "restore it (or, to change an option, give it on the command line; if you edited the file on "
                        "purpose, delete its last line)")
