"""Command-line flags derived from an API function's signature and docstring, so each default, each
choice and each help text lives in one place: the function (litgpt's CLI does this with jsonargparse).

    names = arguments_from(plan, parser, overrides={"tokens": {"type": count}}, choices=CHOICES)
    result = call_with(plan, args, names)

For each parameter ``snake_name`` of the function:
- the flag is ``--snake-name`` (with ``prefix``: ``--prefix-snake-name``);
- the default is the signature's; a parameter without one is required;
- the type comes from the annotation: ``bool`` becomes a switch (``--name`` when the default is False,
  ``--no-name`` when it is True), otherwise the first of ``str``, ``float``, ``int`` that the annotation
  holds (``int | None`` -> int; ``str | Arch`` -> str: what a command line can give);
- the help is the parameter's entry in the docstring's ``Args:`` section, with ````other_param````
  written as its flag and ``(default X)`` added unless the text speaks of its default already;
- ``choices[name]``, when given, is the list of allowed values.
``overrides[name]`` holds ``argparse.add_argument`` keywords that replace the derived ones (a type such as
``count`` that reads 10M, a CLI-only wording), plus two of its own: ``shown_default``, the value a None
default stands for, and ``examples``, how the value may be written, added to the help in parentheses.
"""

from __future__ import annotations

import argparse
import inspect
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def flag(name: str, prefix: str = "") -> str:
    """``grad_checkpointing`` -> ``--grad-checkpointing`` (``--<prefix>-...`` with a prefix)."""
    return "--" + (f"{prefix}-" if prefix else "") + name.replace("_", "-")


def docstring_args(fn: Callable[..., Any]) -> dict[str, str]:
    """The ``Args:`` section of ``fn``'s Google-style docstring: parameter -> text on one line."""
    doc = inspect.getdoc(fn) or ""
    out: dict[str, str] = {}
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Args:") + 1
    except StopIteration:
        return out
    indent, current = None, None
    for line in lines[start:]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if depth == 0:  # the next section (Returns:, Raises:) or prose
            break
        indent = depth if indent is None else indent
        m = re.match(r"(\w+)(?: \([^)]*\))?:\s*(.*)", line.strip())
        if depth == indent and m:
            current = m.group(1)
            out[current] = m.group(2)
        elif current is not None:
            out[current] += " " + line.strip()
    return out


def _cli_type(annotation: Any) -> type:
    """The type a command line gives for this annotation: bool, or the first of str, float, int it holds."""
    union = isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
    args = typing.get_args(annotation) if union else (annotation,)
    for t in (bool, str, float, int):
        if t in args:
            return t
    raise TypeError(f"no command-line type for the annotation {annotation!r}")


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _help(text: str, default: Any, prefix: str, names: Sequence[str]) -> str:
    """A docstring entry as a flag's help: ``param`` as its flag, roles (:class:`X`) as plain X, no final
    period, and ``(default X)`` unless the text speaks of its default."""
    text = re.sub(r":\w+:`~?([\w.]+)`", r"\1", text)
    text = re.sub(r"``(\w+)``", lambda m: flag(m.group(1), prefix) if m.group(1) in names else m.group(1), text)
    text = text.strip().removesuffix(".")
    if default is not None and not isinstance(default, bool) and "default" not in text:
        text = f"{text} (default {_show(default)})" if text else f"default {_show(default)}"
    return text.replace("%", "%%")  # argparse formats help strings with %


def arguments_from(
    fn: Callable[..., Any],
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    choices: Mapping[str, Sequence[Any]] | None = None,
    exclusive: Sequence[Sequence[str]] = (),
    skip: Sequence[str] = (),
    only: Sequence[str] | None = None,
    prefix: str = "",
) -> list[str]:
    """Add one flag per parameter of ``fn`` to ``parser`` (see the module docstring); return the
    parameter names added, in signature order, for :func:`call_with`.

    ``exclusive``: groups of parameters of which at most one may be given (argparse's mutually exclusive
    groups); ``skip``: parameters the command line does not offer; ``only``: offer just these."""
    overrides, choices = overrides or {}, choices or {}
    hints = typing.get_type_hints(fn)
    docs = docstring_args(fn)
    params = [
        p
        for p in inspect.signature(fn).parameters.values()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and p.name not in skip
        and (only is None or p.name in only)
    ]
    unknown = set(overrides) - {p.name for p in params}
    if unknown:
        raise ValueError(f"overrides for parameters {fn.__name__} does not have or offer: {sorted(unknown)}")
    groups: dict[str, Any] = {}
    for names in exclusive:
        group = None
        for name in names:
            groups[name] = group = group or parser.add_mutually_exclusive_group()
    names = [p.name for p in params]
    for p in params:
        extra = dict(overrides.get(p.name, {}))
        default = None if p.default is p.empty else p.default
        shown = extra.pop("shown_default", default)
        examples = extra.pop("examples", None)
        kwargs: dict[str, Any] = {"dest": f"{prefix}_{p.name}" if prefix else p.name, "default": default}
        kind = _cli_type(hints.get(p.name, str))
        text = extra.pop("help", docs.get(p.name, "")).strip().removesuffix(".")
        text = _help(text + (f" ({examples})" if examples else ""), shown, prefix, names)
        if kind is bool:
            kwargs["action"] = "store_false" if default else "store_true"
            opt = flag(("no_" if default else "") + p.name, prefix)
        else:
            kwargs["type"] = kind
            opt = flag(p.name, prefix)
            if p.default is p.empty:
                kwargs["required"] = True
        if p.name in choices:
            kwargs["choices"] = list(choices[p.name])
        if text:
            kwargs["help"] = text
        kwargs.update(extra)
        groups.get(p.name, parser).add_argument(opt, **kwargs)
    return names


def call_with(
    fn: Callable[..., Any], args: argparse.Namespace, names: Sequence[str], prefix: str = ""
) -> Any:
    """Call ``fn`` with the parsed values of the parameters :func:`arguments_from` added, positional
    parameters by position and the others by keyword."""
    sig = inspect.signature(fn).parameters
    value = {n: getattr(args, f"{prefix}_{n}" if prefix else n) for n in names}
    positional = [value.pop(n) for n in names if sig[n].kind is sig[n].POSITIONAL_ONLY]
    return fn(*positional, **value)
