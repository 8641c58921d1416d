"""The `prge` command: a thin layer over `prge.train`, `prge.evaluate` and `prge.adapters`.

    prge train [--config run.yaml] [--option value ...]   fine-tune (no arguments: the embedded default)
    prge eval  --adapter runs/x/checkpoints/best          accuracy of a model or an adapter
    prge merge --adapter DIR --out DIR                    fold an adapter into a plain HF model
    prge tasks                                            list the built-in tasks

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

DEFAULT_JOB = ("With no options, `prge train` runs the embedded default: SmolLM2-135M-Instruct on SST-2 with "
               "P-RGE (dual forwarding, q = 4), printing test accuracy before and after and where the adapter went.")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(p: argparse.ArgumentParser) -> None:
    from prge.config import fields

    for f in fields():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw = {"help": f"{f.metadata['help']} (default: {default})", "default": argparse.SUPPRESS, "dest": f.name}
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
        p.add_argument(_flag(f.name), **kw)


def build_config(args: argparse.Namespace):
    from prge.config import TrainConfig, load_yaml

    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)})
    if values.get("resume"):
        values = resume_values(values)
    try:
        return TrainConfig(**values)
    except TypeError as e:
        raise PrgeError(f"bad configuration: {e}", "see `prge train --help`") from None


def resume_values(values: dict) -> dict:
    """A resumed run takes its saved config; options given now (e.g. more --steps) override it."""
    from prge.config import load_yaml
    from prge.train import resolve_resume

    run_dir, _ = resolve_resume(values["resume"])
    saved = load_yaml(str(run_dir / "config.yaml"))
    saved.update(values)
    return saved


def cmd_train(args) -> int:
    from prge.train import run

    run(build_config(args))
    return 0


def cmd_eval(args) -> int:
    import json

    from prge.train import prepare

    cfg = build_config(args)
    if args.adapter and not hasattr(args, "model"):
        cfg.model = adapter_base(args.adapter) or cfg.model
    # evaluation needs no gradients; without an adapter the LoRA B is zero, i.e. the plain model
    cfg = dataclasses.replace(cfg, method="prge", tune="lora-fa")
    s = prepare(cfg, adapter=args.adapter)
    result = {"model": cfg.model, "adapter": args.adapter, "data": s.data_name}
    for split in args.split:
        r = s.evaluate({"dev": s.dev, "test": s.test, "train": s.train}[split])
        result[split] = r
        print(f"{split}: accuracy {r['accuracy']:.4f}  loss {r['loss']:.4f}  (n={r['n']})")
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
    from prge.adapters import merge_to_folder
    from prge.models import load_model

    base = args.model or adapter_base(args.adapter)
    if not base:
        raise PrgeError("the adapter does not name its base model", "pass --model")
    model, tok = load_model(base, args.dtype)
    merge_to_folder(model, tok, args.adapter, args.out)
    print(f"merged model written to {args.out}")
    return 0


def cmd_tasks(args) -> int:
    from prge.tasks import TASKS

    for t in TASKS.values():
        print(f"{t.name:12s} {t.kind:15s} {t.description}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prge", description="P-RGE: fine-tune LLMs with forward passes only (arXiv 2409.15520).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="fine-tune a model", description=DEFAULT_JOB + " Options override a --config YAML file.")
    t.add_argument("--config", help="YAML file of options (any option below, e.g. `q: 8`)")
    add_config_flags(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="accuracy of a model or adapter on a task or your data",
                       description="Evaluate the base model, or a PEFT adapter on it (--adapter). Takes the data options of `prge train`.")
    e.add_argument("--adapter", help="adapter folder (e.g. runs/<run>/checkpoints/best); default: the plain model")
    e.add_argument("--split", nargs="+", default=["test"], choices=["dev", "test", "train"], help="splits to evaluate")
    e.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    e.add_argument("--config", help="YAML file of options")
    add_config_flags(e)
    e.set_defaults(func=cmd_eval)

    m = sub.add_parser("merge", help="fold an adapter into the base weights and save a plain HF model")
    m.add_argument("--adapter", required=True, help="adapter folder")
    m.add_argument("--out", required=True, help="output folder for the merged model and tokenizer")
    m.add_argument("--model", help="base model (default: the one named in adapter_config.json)")
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="dtype to load and save in")
    m.set_defaults(func=cmd_merge)

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
    args = parser().parse_args(argv)
    if not getattr(args, "command", None):
        parser().print_help()
        return 0
    try:
        return args.func(args)
    except PrgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is intact (resume with --resume <run folder>)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
