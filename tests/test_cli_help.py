"""`--help` states each option's default exactly once (never "(default: X) (default: None)")."""

import argparse
import re

import pytest

from prge.cli import parser

DEFAULT = re.compile(r"\(default\b|\bdefault:", re.I)


def subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def option_helps(p: argparse.ArgumentParser):
    for a in p._actions:
        if a.option_strings and a.help and a.help is not argparse.SUPPRESS and a.dest != "help":
            yield a, a.help % {**vars(a), "prog": p.prog} if "%(" in a.help else a.help


@pytest.mark.parametrize("name", ["train", "eval", "export", "device-train", "merge", "tasks"])
def test_each_default_is_printed_once(name):
    p = subcommands()[name]
    for action, text in option_helps(p):
        n = len(DEFAULT.findall(text))
        assert n <= 1, f"prge {name} {action.option_strings[0]}: default stated {n} times: {text!r}"
        assert "default: None" not in text, f"prge {name} {action.option_strings[0]}: {text!r}"
        if action.default not in (None, False, argparse.SUPPRESS) or action.dest in {"steps", "lr", "q"}:
            assert n == 1, f"prge {name} {action.option_strings[0]} has a default but its help does not state it: {text!r}"
    # and the rendered page (what users read) has no option line with two defaults either
    page = p.format_help()
    for block in re.split(r"\n(?=  -)", page):
        assert len(DEFAULT.findall(block)) <= 1, block


def test_train_options_state_their_defaults():
    page = " ".join(subcommands()["train"].format_help().split())
    for text in ("(default: 4)", "(default: 300)", "(default: prge)", "(default: on)", "(default: lora-fa)"):
        assert text in page


def test_a_template_typed_in_a_shell_gets_its_newlines():
    """`--template "Review: {sentence}\\nSentiment:"` in bash passes a backslash and an n; the help's own
    example must mean a newline, as it does in a YAML config."""
    from prge.cli import build_config

    args = parser().parse_args(["train", "--task", "sst2", "--template", "Review: {sentence}\\nSentiment:\\t"])
    assert build_config(args).template == "Review: {sentence}\nSentiment:\t"
