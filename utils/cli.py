"""Small helpers shared by the command-line scripts."""

from __future__ import annotations

import difflib
import functools
import inspect
import re
import sys
import types
import typing
from collections.abc import Callable, Collection
from typing import NoReturn

import fire
import fire.parser

from pips2.utils.paths import printable
from pips2.utils.procs import error_line, guarded_output, out_of_memory


def die(msg, code: int | None = None) -> NoReturn:
    """Bad flags or input: one line on stderr, exit code 2 (1 for an error of this machine rather than of the
    input: an exception whose `local` is true, such as a checkpoint that memory could not hold; `code` when the
    caller knows it). Control characters are escaped: the line quotes names read from data folders and files,
    which must not drive the terminal (utils/paths.printable)."""
    print(printable(f"error: {msg}"), file=sys.stderr, flush=True)
    sys.exit(code if code is not None else 1 if getattr(msg, "local", False) else 2)


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


def flag_kind(hint) -> tuple[type, bool] | None:
    """The scalar type (int, float, bool or str) a parameter's annotation admits and whether it admits None too;
    None to leave its value alone (unions of several types, tuples, unannotated)."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    scalars = tuple(a for a in args if a is not type(None))
    if len(scalars) == 1 and scalars[0] in (int, float, bool, str):
        return scalars[0], len(scalars) < len(args)
    return None


def _is_fire_flag(tok: str) -> bool:
    """Whether fire takes a token for a flag rather than for the previous flag's value ("-5" is a value)."""
    return tok.startswith("--") or re.match(r"^-[a-zA-Z]", tok) is not None


def raw_values(argv: list[str]) -> dict[str, str]:
    """Each --flag's value as typed, before fire reads it as a Python literal (the last one given wins, as in
    fire): ["--a-b=1", "--c", "2e3"] -> {"a_b": "1", "c": "2e3"}."""
    raw: dict[str, str] = {}
    for i, tok in enumerate(argv):
        if tok == "--":
            break
        if not tok.startswith("--") or len(tok) == 2:
            continue
        name, eq, value = tok[2:].partition("=")
        name = name.replace("-", "_")
        if eq:
            raw[name] = value
        elif i + 1 < len(argv) and not _is_fire_flag(argv[i + 1]):
            raw[name] = argv[i + 1]
        else:
            raw.pop(name, None)  # a bare --flag: fire makes it True
    return raw


def as_text(name: str, value, raw: str | None):
    """A text flag's value as the user typed it: fire reads `--out_dir=2024` as the int 2024, `1e3` as 1000.0 and
    `a,b` as a tuple, which is recovered from raw (the token fire parsed); ValueError naming the flag for a list,
    dict, bool or None, or a value whose text is not known."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float, complex, tuple)) and not isinstance(value, bool) and raw is not None:
        parsed = fire.parser.DefaultParseValue(raw)
        if type(parsed) is type(value) and parsed == value:
            return raw
    raise ValueError(f"--{name} must be text, got {value!r}")


def _checked(name: str, hint, value, raw: str | None, prog: str):
    """One flag's value in the type its annotation asks for, or one line and exit 2."""
    found = flag_kind(hint)
    if found is None:
        return value
    kind, optional = found
    if value is None and optional:
        return value
    if kind is str:
        try:
            return as_text(name, value, raw)
        except ValueError as e:
            die(f"{prog}: {e}")
    if kind is bool and value in (0, 1) and not isinstance(value, float):
        return bool(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        what = {int: "an integer", float: "a number", bool: "True or False"}[kind]
        die(f"{prog}: --{name} must be {what}, got {value!r}")
    return value


def _empty_refused(name: str, value, raw: str | None, empty_ok: bool, prog: str) -> None:
    """One line and exit 2 for a text flag given empty on the command line (`--out_dir=$OUT` with OUT unset), unless
    empty means something for it: an empty path is the current folder, where a job then wrote its outputs."""
    # given on the command line (raw known): `--out_dir=`, `--out_dir "''"` (fire reads '' as the empty text) or
    # white space only
    if isinstance(value, str) and not value.strip() and raw is not None and not empty_ok:
        die(f"{prog}: --{name} is empty (an unset shell variable?); give it a value or leave the flag out")


def checked_types(main: Callable, prog: str, argv: list[str] | None = None,
                  kwarg_hints: dict | None = None, empty_ok: Collection[str] = ()) -> Callable:
    """main behind a check that its int, float, bool and text flags got values of their type: `--S=abc` exits in
    one line naming the flag instead of failing deep inside. Ints pass as floats; 0 and 1 pass as booleans; a
    text flag that fire read as a number or a tuple gets its text back from argv (`--out_dir=2024` is the
    folder "2024"); a text flag given empty is refused unless its default is empty or it is in `empty_ok`.
    kwarg_hints: annotations for the flags main takes as **kwargs."""
    params = inspect.signature(main, eval_str=True).parameters
    raw = raw_values(argv or [])

    def raw_of(name: str) -> str | None:
        if name in raw:
            return raw[name]
        # fire's one-letter abbreviation (check_flags let it through only when it names one parameter)
        return raw.get(name[0]) if name[0] not in params else None

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        bound = inspect.signature(main).bind_partial(*args, **kwargs)
        for name, value in bound.arguments.items():
            param = params[name]
            if param.kind is param.VAR_KEYWORD:
                hints = kwarg_hints or {}
                for key, item in value.items():
                    if key in hints:
                        value[key] = _checked(key, hints[key], item, raw.get(key), prog)
                        _empty_refused(key, value[key], raw.get(key), key in empty_ok, prog)
                continue
            bound.arguments[name] = _checked(name, param.annotation, value, raw_of(name), prog)
            _empty_refused(name, bound.arguments[name], raw_of(name), param.default == "" or name in empty_ok, prog)
        return main(*bound.args, **bound.kwargs)

    return wrapper


def run_fire(main: Callable, prog: str | None = None, argv: list[str] | None = None, kwarg_hints: dict | None = None,
             empty_ok: Collection[str] = ()):
    """fire.Fire(main) with the flags checked first (names, then int/float/bool/text values, no text flag given
    empty unless its default is empty or it is in `empty_ok`): a typo costs one line, not a whole run with default
    settings before fire's own complaint. kwarg_hints: annotations of the flags main takes as **kwargs, to check
    those too."""
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = prog or (sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else main.__module__)
    if any(tok in ("--help", "-h") for tok in argv):  # help is asked for: fire shows it, whatever else is there
        return fire.Fire(main, command=["--help"], name=prog)
    check_flags(main, argv, prog)
    for tok, after in zip(argv, argv[1:], strict=False):  # `--device= cpu`: fire takes cpu for a positional value
        if tok.startswith("--") and tok.endswith("=") and len(tok) > 3 and not _is_fire_flag(after):
            die(f"{prog}: {tok} is empty and {after!r} follows it as a word of its own: write {tok}{after} (no space "
                f"after the =)")
    with guarded_output():  # a reader of the output gone (`| head`): a stop, not a traceback (utils/procs)
        try:
            return fire.Fire(checked_types(main, prog, argv, kwarg_hints, empty_ok), command=argv, name=prog)
        except (MemoryError, RuntimeError) as e:
            if not out_of_memory(e):
                raise
            # this machine's limit (ulimit -v, a cgroup), not a bug: what was done is already saved by the job
            print(printable(f"error: {prog}: out of memory on this machine ({error_line(e)}); a smaller size, fewer "
                            f"points or frames at once, or more memory"), file=sys.stderr, flush=True)
            sys.exit(1)
