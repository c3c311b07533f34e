"""Command-line flags derived from a function's signature and docstring (lorakit.cli.arguments), and
``lorakit plan`` built that way: the flags it had, the API's defaults and choices, the same plan."""

from __future__ import annotations

import argparse
import inspect
import json

import pytest

from lorakit.cli.arguments import arguments_from, call_with, docstring_args
from lorakit.cli.main import build_parser, main
from lorakit.planner.plan import CHOICES, plan
from lorakit.planner.plan_report import to_json


def toy(
    name: str,
    *,
    size: int | None = None,
    rate: float = 0.5,
    kind: str = "a",
    fast: bool = True,
    verbose: bool = False,
    hidden: int = 3,
) -> dict:
    """Do a toy thing.

    Args:
        name: what to call it.
        size: how big, in ``rate`` units
            (default: as big as it gets).
        rate: how fast it goes.
        kind: which kind.
        fast: go fast.
        verbose: say more. 100% of it.

    Returns:
        what it was given.
    """
    return dict(name=name, size=size, rate=rate, kind=kind, fast=fast, verbose=verbose)


def toy_parser(**kw) -> tuple[argparse.ArgumentParser, list[str]]:
    parser = argparse.ArgumentParser(prog="toy")
    return parser, arguments_from(toy, parser, choices={"kind": ("a", "b")}, skip=("hidden",), **kw)


def test_docstring_args_reads_entries_and_continuations():
    docs = docstring_args(toy)
    assert docs["size"] == "how big, in ``rate`` units (default: as big as it gets)."
    assert set(docs) == {"name", "size", "rate", "kind", "fast", "verbose"}  # stops at Returns:


def test_flags_defaults_types_switches_and_choices():
    parser, names = toy_parser()
    assert names == ["name", "size", "rate", "kind", "fast", "verbose"]
    args = parser.parse_args(["--name", "x"])
    assert call_with(toy, args, names) == toy("x")  # every default is the signature's
    argv = ["--name", "x", "--size", "7", "--rate", "2", "--kind", "b", "--no-fast", "--verbose"]
    args = parser.parse_args(argv)
    assert call_with(toy, args, names) == toy("x", size=7, rate=2.0, kind="b", fast=False, verbose=True)
    for bad in (["--size", "7"], ["--name", "x", "--kind", "c"], ["--name", "x", "--hidden", "1"]):
        with pytest.raises(SystemExit):  # required, choices, skipped
            parser.parse_args(bad)


def test_help_from_the_docstring_with_flags_and_defaults():
    parser, _ = toy_parser()
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["size"] == "how big, in --rate units (default: as big as it gets)"
    assert helps["rate"] == "how fast it goes (default 0.5)"
    assert helps["kind"] == "which kind (default a)"
    assert helps["fast"] == "go fast" and "--no-fast" in parser.format_help()
    assert helps["verbose"] == "say more. 100%% of it"  # argparse's own % escaping
    assert "100% of it" in parser.format_help()


def test_overrides_prefix_exclusive_and_unknown_names():
    parser = argparse.ArgumentParser(prog="toy")
    names = arguments_from(
        toy, parser, {"size": {"type": lambda s: int(s) * 10, "examples": "1, 2", "shown_default": 9}},
        only=("name", "size", "rate"), exclusive=[("size", "rate")], prefix="t",
    )
    args = parser.parse_args(["--t-name", "x", "--t-size", "2"])
    assert call_with(toy, args, names, prefix="t") == toy("x", size=20)
    shown = " ".join(parser.format_help().split())
    assert "how big, in --t-rate units (default: as big as it gets) (1, 2)" in shown
    with pytest.raises(SystemExit):
        parser.parse_args(["--t-name", "x", "--t-size", "2", "--t-rate", "1"])
    with pytest.raises(ValueError, match="nope"):
        arguments_from(toy, argparse.ArgumentParser(), {"nope": {}})


# What `lorakit plan --help` listed before its flags were derived from plan()'s signature.
PLAN_FLAGS = (
    "--model --tokens --dataset-rows --seq-len --epochs --method --r --targets --gpu --gpus --gpu-table "
    "--price-per-hour --mfu --benefit-per-month --horizon-months --micro-batch --precision "
    "--no-grad-checkpointing --attention --optimizer --distributed --adapters-per-base --task-complexity "
    "--json --report --calibrate --calibrate-steps"
).split()


def plan_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["plan"]


def test_plan_help_lists_every_flag_it_listed_and_the_api_defaults_and_choices(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    shown = capsys.readouterr().out
    assert all(f"{flag} " in shown or f"{flag}\n" in shown for flag in PLAN_FLAGS)
    actions = {a.dest: a for a in plan_parser()._actions}
    for name, p in inspect.signature(plan).parameters.items():
        if name in ("serving_hours_per_month", "task"):
            assert name not in actions  # not offered on the command line
            continue
        want = None if p.default is p.empty else p.default
        assert actions[name].default == want, name
        assert actions[name].choices == (list(CHOICES[name]) if name in CHOICES else None), name


def test_plan_cli_gives_the_plan_of_the_api(capsys):
    argv = ["--model", "tiny-llama", "--dataset-rows", "2k", "--seq-len", "128", "--method", "dora",
            "--targets", "q_proj,o_proj", "--no-grad-checkpointing", "--mfu", "0.5", "--json"]
    assert main(["plan", *argv]) == 0
    got = json.loads(capsys.readouterr().out)
    want = plan("tiny-llama", dataset_rows=2000, seq_len=128, method="dora", targets=["q_proj", "o_proj"],
                grad_checkpointing=False, mfu=0.5)
    assert got == json.loads(to_json(want))
