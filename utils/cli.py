"""Small helpers shared by the command-line scripts."""

from __future__ import annotations

import difflib
import functools
import inspect
import sys
import types
import typing
from collections.abc import Callable
from typing import NoReturn

import fire


def die(msg) -> NoReturn:
    """Bad flags or input: one line on stderr, exit code 2."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


def parse_hw(value, name: str = "size") -> tuple[int, int]:
    """An (H, W) flag as fire hands it over: "512,896", (512, 896) or [512, 896]."""
    parts = value.split(",") if isinstance(value, str) else value
    try:
        h, w = (int(v) for v in parts)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be H,W (two integers), got {value!r}") from None
    return h, w


def aliased(name: str, value, alias: str, alias_value):
    """A flag given by its name or by the authors' alias for it; ValueError when both are given and differ."""
    if value is not None and alias_value is not None and value != alias_value:
        raise ValueError(f"--{name}={value} and its alias --{alias}={alias_value} disagree; give one of them")
    return alias_value if value is None else value


def _flag_names(argv: list[str]) -> list[str]:
    """The names of the --flags in a command line, up to fire's own `--` separator ("--a-b=1" -> "a_b")."""
    names = []
    for tok in argv:
        if tok == "--":
            break
        if tok.startswith("--") and len(tok) > 2:
            names.append(tok[2:].split("=", 1)[0].replace("-", "_"))
    return names


def check_flags(main: Callable, argv: list[str], prog: str) -> None:
    """Exit in one line if a --flag of argv names no parameter of main (fire would only say so after main ran)."""
    params = inspect.signature(main).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return  # main checks its own flags
    for name in _flag_names(argv):
        if name in ("help", "h") or name in params:
            continue
        if name.startswith("no") and name[2:] in params:  # fire's --noflag for a boolean
            continue
        if len(name) == 1 and sum(p.startswith(name) for p in params) == 1:  # fire's one-letter abbreviation
            continue
        near = difflib.get_close_matches(name, list(params), n=1)
        hint = f"; did you mean --{near[0]}?" if near else ""
        die(f"{prog}: unknown flag --{name}{hint} (--help lists the flags)")


def _kind(hint) -> tuple[type, bool] | None:
    """The scalar type (int, float or bool) a parameter's annotation admits and whether it admits None too; None
    to leave its value alone (strings, tuples, unannotated)."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    scalars = tuple(a for a in args if a is not type(None))
    if len(scalars) == 1 and scalars[0] in (int, float, bool):
        return scalars[0], len(scalars) < len(args)
    return None


def checked_types(main: Callable, prog: str) -> Callable:
    """main behind a check that its int, float and bool flags got values of their type: `--S=abc` exits in one
    line naming the flag instead of failing deep inside. Ints pass as floats; 0 and 1 pass as booleans."""
    params = inspect.signature(main, eval_str=True).parameters

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        bound = inspect.signature(main).bind_partial(*args, **kwargs)
        for name, value in bound.arguments.items():
            found = _kind(params[name].annotation)
            if found is None or params[name].kind is params[name].VAR_KEYWORD:
                continue
            kind, optional = found
            if value is None and optional:
                continue
            if kind is bool and value in (0, 1) and not isinstance(value, float):
                bound.arguments[name] = bool(value)
            elif kind is float and isinstance(value, int) and not isinstance(value, bool):
                bound.arguments[name] = float(value)
            elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                what = {int: "an integer", float: "a number", bool: "True or False"}[kind]
                die(f"{prog}: --{name} must be {what}, got {value!r}")
        return main(*bound.args, **bound.kwargs)

    return wrapper


def run_fire(main: Callable, prog: str | None = None, argv: list[str] | None = None):
    """fire.Fire(main) with the flags checked first (names, then int/float/bool values): a typo costs one line,
    not a whole run with default settings before fire's own complaint."""
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = prog or (sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else main.__module__)
    if any(tok in ("--help", "-h") for tok in argv):  # help is asked for: fire shows it, whatever else is there
        return fire.Fire(main, command=["--help"], name=prog)
    check_flags(main, argv, prog)
    return fire.Fire(checked_types(main, prog), command=argv, name=prog)
