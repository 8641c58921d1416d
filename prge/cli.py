"""The `prge` command: a thin layer over `prge.run.train`, `prge.run.evaluate` and `prge.run.adapters`.

    prge train [--config run.yaml] [--option value ...]   fine-tune (no arguments: the embedded default)
    prge eval  --adapter runs/x/checkpoints/best          accuracy of a model or an adapter
    prge merge --adapter DIR --out DIR                    fold an adapter into a plain HF model
    prge tasks                                            list the built-in tasks
    prge export --out X.pte [--option value ...]           the P-RGE step as an ExecuTorch program + its data
    prge device-train --program X.pte --out DIR           train with that program in the stock runtime

Every `prge train` option is a field of `prge.config.TrainConfig`; its help text lives there.
Errors in the input print one line, `error: <problem> — <fix>`, and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import warnings

from prge.errors import PrgeError
from prge.zo.schedule import LR_SCHEDULES

DEFAULT_JOB = ("With no options, `prge train` runs the embedded default: SmolLM2-135M-Instruct on SST-2 with "
               "P-RGE (dual forwarding, q = 4), printing test accuracy before and after and where the adapter went.")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(p: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    from prge.config import fields

    for f in fields():
        if only is not None and f.name not in only:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f.metadata["help"]  # a help text that explains its default itself is not given a second one
        if "(default" not in text and default is not None:
            text = f"{text} (default: {_shown(default)})"
        kw = {"help": text, "default": argparse.SUPPRESS, "dest": f.name}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        tp = str(f.type)
        if tp == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif tp.startswith("list"):
            kw["nargs"] = "+"
            kw["type"] = int if "int" in tp else str
        elif "int" in tp:
            kw["type"] = int
        elif "float" in tp:
            kw["type"] = float
        if f.name == "template":
            kw["type"] = unescape
        p.add_argument(_flag(f.name), **kw)


def unescape(text: str) -> str:
    """A template typed in a shell: the two characters \\n are a newline and \\t a tab (as in the help's
    examples), since a shell's quotes keep them literal; a YAML config's "\\n" is already a newline."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _shown(default) -> str:
    """A default as a user would type it: on/off for switches, space-separated lists."""
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, list):
        return " ".join(map(str, default))
    return str(default)


def build_config(args: argparse.Namespace, builtin_lr: bool = True):
    """The TrainConfig of a command: --config, then the flags given, then (a run's) saved config;
    with `builtin_lr`, a built-in model's own lr where neither gives one (not for `prge eval`, which trains nothing)."""
    from prge.config import TrainConfig, load_yaml

    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                   if hasattr(args, f.name) and (getattr(args, f.name) is not None or "None" in str(f.type))})
    if values.get("resume"):
        values = resume_values(values)
    if builtin_lr and "lr" not in values:  # a built-in model may need another lr than the default (prge.models.builtin)
        from prge.models.builtin import builtin_lr

        lr = builtin_lr(values.get("model", TrainConfig().model))
        if lr is not None:
            from prge.log import say

            say(f"prge: --lr {lr:g}, {values['model']}'s default (pass --lr to choose another)")
            values["lr"] = lr
    try:
        return TrainConfig(**values)
    except TypeError as e:
        raise PrgeError(f"bad configuration: {e}", "see `prge train --help`") from None


def resume_values(values: dict) -> dict:
    """A resumed run takes its saved config; options given now (e.g. more --steps) override it."""
    from prge.config import load_yaml
    from prge.run.train import resolve_resume

    run_dir, _ = resolve_resume(values["resume"])
    saved = load_yaml(str(run_dir / "config.yaml"), sealed=True) if (run_dir / "config.yaml").is_file() else {}
    saved.update(values)
    return saved


def cmd_train(args) -> int:
    from prge.run.train import run

    run(build_config(args))
    return 0


def cmd_eval(args) -> int:
    import json

    from prge.run.train import prepare

    cfg = build_config(args, builtin_lr=False)
    if args.adapter and not hasattr(args, "model"):
        cfg.model = adapter_base(args.adapter) or cfg.model
    # evaluation needs no gradients; without an adapter the LoRA B is zero, i.e. the plain model
    cfg = dataclasses.replace(cfg, method="prge", tune="lora-fa")
    if cfg.task.strip().lower() == "all" and not cfg.train_file:
        from prge.run.suite import eval_all

        eval_all(cfg, args.adapter, args.split, args.json)
        return 0
    from prge.run.evaluate import describe

    s = prepare(cfg, adapter=args.adapter)
    result = {"model": cfg.model, "adapter": args.adapter, "data": s.data_name}
    for split in args.split:
        r = s.evaluate({"dev": s.dev, "test": s.test, "train": s.train}[split])
        result[split] = r
        print(f"{split}: {describe(r)}")
    if args.json:
        print(json.dumps(result))
    return 0


def adapter_base(folder: str) -> str | None:
    import json
    from pathlib import Path

    p = Path(folder) / "adapter_config.json"
    if not p.is_file():
        raise PrgeError(f"{folder} has no adapter_config.json", "pass a folder written by `prge train` or PEFT")
    return json.loads(p.read_text()).get("base_model_name_or_path")


def cmd_merge(args) -> int:
    from prge.run.adapters import merge_to_folder
    from prge.models.load import load_model

    base = args.model or adapter_base(args.adapter)
    if not base:
        raise PrgeError("the adapter does not name its base model", "pass --model")
    model, tok = load_model(base, args.dtype)
    merge_to_folder(model, tok, args.adapter, args.out)
    print(f"merged model written to {args.out}")
    return 0


# options of `prge train` that shape an exported program or its data
EXPORT_FIELDS = ("model", "task", "data_root", "train_file", "eval_file", "template", "label_words", "q", "batch_size",
                 "loss", "rank", "alpha", "targets", "layers", "n_train", "n_dev", "max_length", "truncate", "seed",
                 "threads", "steps", "lr", "eps", "lr_schedule", "eval_every", "checkpoint_every", "normalize", "lora_a",
                 "lora_a_rows", "readout", "readout_steps", "readout_lr", "readout_rows")


def cmd_export(args) -> int:
    import dataclasses as dc
    from pathlib import Path

    from prge.config import TrainConfig
    from prge.engine.export import export_program
    from prge.engine.formats import QUANTIZED_DEFAULT_EPS, READOUT_DEFAULTS, RUN_DEFAULTS, write_dataset
    from prge.log import say
    from prge.run.train import prepare

    cfg = dc.replace(build_config(args), method="prge", tune="lora-fa", dtype="float32")
    default_eps = getattr(args, "eps", None) is None and cfg.eps == TrainConfig().eps  # not given, not in --config
    if args.quantize != "none" and default_eps and cfg.eps < QUANTIZED_DEFAULT_EPS:  # what trains it best, measured
        say(f"prge export: recording eps {QUANTIZED_DEFAULT_EPS:g} as the device run's default for a {args.quantize} base "
            "(its activation rounding adds noise to L+ - L-; pass --eps to choose another)")
        cfg = dc.replace(cfg, eps=QUANTIZED_DEFAULT_EPS)
    s = prepare(cfg, adapter=args.adapter)
    from prge.zo import readout

    if readout.get(s.model) is not None:  # fitted on the features of this adapter's model: stale once the device trains
        say(f"prge export: the label readout in {args.adapter} is not carried into the program; `prge device-train` fits "
            "its own after its steps, as `prge train` does (--readout 0 turns that off)")
        readout.attach(s.model, None)
    K = 1 if s.label_ids is not None else max(len(e.answer_ids) for e in s.train + s.dev)
    out = Path(args.out)
    if out.suffix != ".pte":
        raise PrgeError(f"--out {out} should end in .pte", "pass e.g. --out sst2.pte")
    say(f"prge export: {cfg.model}, {s.data_name}, q={cfg.q}, b={cfg.batch_size}, T={cfg.max_length}, K={K}, "
        f"loss={s.loss_kind}, noise={args.noise}, quantize={args.quantize or 'none'}"
        + (f", {args.ranks} ranks" if args.ranks > 1 else "") + f" -> {out}")
    manifest = export_program(s.model, s.tokenizer, s.label_ids, q=cfg.q, batch_size=cfg.batch_size,
                              max_length=cfg.max_length, answer_slots=K, loss=s.loss_kind, noise=args.noise,
                              quantize=None if args.quantize == "none" else args.quantize, out_path=out, model_name=cfg.model,
                              eval_batch_size=args.eval_batch_size, log=say, ranks=args.ranks,
                              run_defaults={k: getattr(cfg, k) for k in RUN_DEFAULTS + READOUT_DEFAULTS})
    data = out.with_suffix(".data.safetensors")
    write_dataset(data, s, manifest)
    launcher = f"torchrun --nproc-per-node {args.ranks} -m prge" if args.ranks > 1 else "prge"
    print(f"program: {out} (+ {out.name}.json manifest, {out.name}.adapter.safetensors)\ndata: {data} "
          f"({len(s.train)} train, {len(s.dev)} dev examples)\nnext: {launcher} device-train --program {out} --out runs/device")
    return 0


def device_run_options(args, keys: tuple[str, ...] | None = None) -> dict:
    """The device run's options (`keys`, default the loop's): each given flag, else what the program was
    exported with (manifest "run_defaults"), else `prge train`'s default."""
    from prge.config import TrainConfig
    from prge.engine.formats import RUN_DEFAULTS, load_manifest

    recorded = load_manifest(args.program).get("run_defaults") or {}
    defaults = TrainConfig()
    return {k: getattr(args, k) if getattr(args, k) is not None else recorded.get(k, getattr(defaults, k))
            for k in keys or RUN_DEFAULTS}


def device_readout_options(args):
    """The device run's label readout settings, chosen as `device_run_options` chooses the others."""
    from prge.engine.formats import READOUT_DEFAULTS
    from prge.engine.runtime import ReadoutSettings

    v = device_run_options(args, READOUT_DEFAULTS)
    return ReadoutSettings(v["readout"], v["readout_steps"], v["readout_lr"], v["readout_rows"])


def cmd_device_train(args) -> int:
    from pathlib import Path

    from prge.engine.formats import check_eps, load_manifest
    from prge.engine.runtime import check_loop_settings, check_readout_settings, device_train

    data = args.data or str(Path(args.program).with_suffix(".data.safetensors"))
    opts = device_run_options(args)
    check_loop_settings(**opts)  # before either loop starts (the native one included)
    check_eps(load_manifest(args.program), opts["eps"])
    ro = device_readout_options(args)
    check_readout_settings(ro)
    if getattr(args, "native", False):
        from prge.engine.native import native_train

        native_train(args.program, data, args.out, resume=args.resume, weight_cache=args.weight_cache, readout=ro, **opts)
        return 0
    device_train(args.program, data, args.out, resume=args.resume, progress=args.progress, weight_cache=args.weight_cache,
                 readout=ro, **opts)
    return 0


def cmd_tasks(args) -> int:
    from prge.data.tasks import TASKS

    for t in TASKS.values():
        print(f"{t.name:12s} {t.kind:15s} {t.description}")
        words = f" -> {' / '.join(repr(w) for w in t.label_words)}" if t.label_words else ""
        print(f"{'':28s}template {t.template!r}{words}")
    return 0


class Parser(argparse.ArgumentParser):
    """argparse with prge's one-line errors: `error: <problem> — <fix>`, exit status 2."""

    def error(self, message: str):
        print(f"error: {message} — see `{self.prog} --help`", file=sys.stderr)
        sys.exit(2)


def parser() -> argparse.ArgumentParser:
    from prge.config import TrainConfig

    train_defaults = TrainConfig()  # device-train's loop settings default to prge train's
    p = Parser(prog="prge", description="P-RGE: fine-tune LLMs with forward passes only (arXiv 2409.15520).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="fine-tune a model", description=DEFAULT_JOB + " Options override a --config YAML file.")
    t.add_argument("--config", help="YAML file of options (any option below, e.g. `q: 8`)")
    add_config_flags(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="accuracy of a model or adapter on a task or your data",
                       description="Evaluate the base model, or a PEFT adapter on it (--adapter). Takes the data options of `prge train`; "
                                   "--task all evaluates every built-in task and prints one table (tasks without data here are listed, not run).")
    e.add_argument("--adapter", help="adapter folder (e.g. runs/<run>/checkpoints/best); default: the plain model")
    e.add_argument("--split", nargs="+", default=["test"], choices=["dev", "test", "train"], help="splits to evaluate (default: test)")
    e.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    e.add_argument("--config", help="YAML file of options")
    add_config_flags(e)
    e.set_defaults(func=cmd_eval)

    m = sub.add_parser("merge", help="fold an adapter into the base weights and save a plain HF model")
    m.add_argument("--adapter", required=True, help="adapter folder")
    m.add_argument("--out", required=True, help="output folder for the merged model and tokenizer")
    m.add_argument("--model", help="base model (default: the one named in adapter_config.json)")
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype to load and save in (default: float32)")
    m.set_defaults(func=cmd_merge)

    x = sub.add_parser(
        "export", help="export the whole P-RGE step as an ExecuTorch program (+ the pre-tokenised data)",
        description="Trace the model with MP-LoRA into one .pte whose train_step method rebuilds B, applies the last "
                    "update, draws new noise, writes the 2q perturbed copies and returns the 2q losses, all inside "
                    "the graph; the stock ExecuTorch runtime (XNNPACK) runs it. Shapes are fixed here: q, "
                    "--batch-size and --max-length cannot change later. Also writes X.pte.json (the manifest), "
                    "X.pte.adapter.safetensors (the frozen A matrices) and X.data.safetensors (train and dev "
                    "examples tokenised and padded for this program). Takes the model and data options of `prge train`.")
    x.add_argument("--out", required=True, help="the program file to write (X.pte)")
    x.add_argument("--noise", default="counter", choices=["counter", "host", "engine"],
                   help="counter: hash noise keyed by (seed, step), identical to eager training, reproducible; "
                        "host: z is an input drawn by the host (bit-exact with eager); engine: the runtime's "
                        "unseeded randn (NOT reproducible, cannot resume exactly) (default: counter)")
    x.add_argument("--quantize", default="none", choices=["none", "8da4w", "8da8w"],
                   help="quantise the frozen base linears (int8 dynamic activations, int4 group-32 weights with HQQ scales or "
                        "int8 per-channel weights; LoRA B stays float32; eps at least 1e-2 with 8da8w, 3e-2 with 8da4w): 8da8w for "
                        "memory and speed, 8da4w for memory only (it loses accuracy, README 'Quantised programs'), or "
                        "none: a float32 base (default: none)")
    x.add_argument("--eval-batch-size", type=int, default=None, help="rows of the evaluate method (default: 2·q·batch size)")
    x.add_argument("--ranks", type=int, default=1,
                   help="export one rank's program of an engine fleet: run it with `torchrun --nproc-per-node N -m prge "
                        "device-train` and N = --ranks processes, each evaluating q/N of the --q queries (the ranks exchange "
                        "only the 2q losses, every rank applies the update from all q); 1: a one-process program, which "
                        "the C++ runner also takes (default: 1)")
    x.add_argument("--adapter", help="start from this PEFT adapter (its A and B) instead of a fresh LoRA")
    x.add_argument("--config", help="YAML file of options")
    add_config_flags(x, only=EXPORT_FIELDS)
    x.set_defaults(func=cmd_export)

    d = sub.add_parser(
        "device-train", help="train with an exported program in the stock ExecuTorch runtime",
        description="The on-device loop: only executorch.runtime, torch tensors and the pre-tokenised data (no model "
                    "code, no tokenizer). Per step the host picks the examples, calls train_step and computes "
                    "g = (L+ - L-)/2eps from the 2q losses. Writes metrics.jsonl, checkpoints/{last,best}/, the "
                    "final PEFT adapter in OUT/adapter and summary.json. A program exported with --ranks N runs under "
                    "`torchrun --nproc-per-node N -m prge device-train ...` (or --nnodes M with a rendezvous endpoint): "
                    "each rank evaluates its share of the queries, rank 0 evaluates and writes.")
    d.add_argument("--program", required=True, help="the .pte written by `prge export`")
    d.add_argument("--data", help="the data file written by `prge export` (default: the program's X.data.safetensors)")
    d.add_argument("--out", required=True, help="run folder")
    run_help = "default: the program's (what `prge export` recorded), else prge train's {}"
    d.add_argument("--steps", type=int, help="training steps (total, also when resuming); " + run_help.format(train_defaults.steps))
    d.add_argument("--lr", type=float, help="learning rate; " + run_help.format(train_defaults.lr))
    d.add_argument("--lr-schedule", choices=list(LR_SCHEDULES),
                   help="constant, or a linear / cosine decay from --lr towards 0 over --steps; " + run_help.format(train_defaults.lr_schedule))
    d.add_argument("--eps", type=float, help="perturbation scale (at least the program's min_eps: 1e-2 with an 8da8w base, 3e-2 with 8da4w); " + run_help.format(train_defaults.eps))
    d.add_argument("--seed", type=int, help="picks every step's examples and noise; " + run_help.format(train_defaults.seed))
    d.add_argument("--eval-every", type=int, help="evaluate on dev and checkpoint every N steps (0: only at the end); "
                   + run_help.format(train_defaults.eval_every))
    d.add_argument("--checkpoint-every", type=int,
                   help="also write checkpoints/last every N steps between evaluations, so a killed run resumes "
                        "losing at most N steps (0: only at evaluations); " + run_help.format(train_defaults.checkpoint_every))
    d.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="divide each loss difference by the spread (std) of the step's 2q losses instead of by 2eps (q >= 2); "
                        + run_help.format("off" if not train_defaults.normalize else "on"))
    d.add_argument("--resume", action="store_true", help="continue exactly from OUT/checkpoints/last")
    d.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show a progress bar (default: on)")
    d.add_argument("--weight-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="let the program's methods share one copy of XNNPACK's packed weights instead of one each "
                        "(less memory, same results; also for --native); default: on")
    d.add_argument("--native", action="store_true",
                   help="run the C++ trainer (native/, built with cmake against the executorch wheel's runtime on first use) "
                        "instead of the Python loop: same steps, losses, checkpoints and adapter; it fits the label readout "
                        "itself with the program's readout_step method (a program exported without it: in Python "
                        "after the binary)")
    d.add_argument("--readout", type=int,
                   help="rank of the label readout fitted after the steps, as prge train fits it, on the untrained model "
                        "and on the best checkpoint, the better on dev kept (the program's features method gives the "
                        "hidden states; its readout_step method, or the host for a program without it, trains it in "
                        "seconds; it is written into OUT/checkpoints/best/adapter); 0: off; " + run_help.format("64 for classification programs"))
    d.add_argument("--readout-steps", type=int, help="the readout's zeroth-order steps; " + run_help.format(train_defaults.readout_steps))
    d.add_argument("--readout-lr", type=float, help="the readout's learning rate; " + run_help.format(train_defaults.readout_lr))
    d.add_argument("--readout-rows", type=int, help="training rows the readout reads; " + run_help.format(train_defaults.readout_rows))
    d.set_defaults(func=cmd_device_train)

    ts = sub.add_parser("tasks", help="list the built-in tasks")
    ts.set_defaults(func=cmd_tasks)
    return p


def quiet_imports() -> None:
    """transformers imports torchao when it is installed, which prints loader noise we cannot act on."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", message=".*is an Enum subclass.*")
    import logging

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    quiet_imports()
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a flag argparse refused (2, its one line already printed)
        return e.code if isinstance(e.code, int) else 2
    if not getattr(args, "command", None):
        parser().print_help()
        return 0
    try:
        return args.func(args)
    except PrgeError as e:
        if not getattr(e, "quiet", False):  # distributed runs: an error all ranks found is printed by rank 0 only
            print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system refused (full disk, permissions, a path that cannot be created)
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or e}{where} — check the path, its permissions and the free space, then run again "
              "(a training run resumes with --resume)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is intact (resume with --resume <run folder>)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
