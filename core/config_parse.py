"""How core/config.py reads YAML values and `key=value` overrides into its dataclasses.

Nothing here knows the config's sections: every function takes the dataclass (or an
instance of it) to work on, so core/config.py imports this module and not the reverse.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterator
from typing import Any, Literal

import yaml

from core.errors import ConfigError


def yaml_problem(exc: yaml.YAMLError, text: str) -> tuple[int, int, str]:
    """(line, column, problem) of a YAML error in `text`: 1-based, as editors count, and the
    problem on one line, so that a ConfigError built from it stays one line."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        opened = exc.context_mark
        # An unclosed bracket is reported where the text ends; where it opened is what to fix.
        if exc.problem and exc.context and opened is not None and mark is not None and opened.line != mark.line:
            problem += f" ({exc.context} opened at line {opened.line + 1}, column {opened.column + 1})"
        line, column = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        return line, column, " ".join(problem.split())
    if isinstance(exc, yaml.reader.ReaderError):
        # A character YAML refuses (a NUL, a control character): a position, not a mark.
        position = min(max(exc.position, 0), len(text))
        line = text.count("\n", 0, position) + 1
        column = position - (text.rfind("\n", 0, position) + 1) + 1
        character = exc.character if isinstance(exc.character, int) else ord(exc.character[:1] or b"\0")
        return line, column, f"character #x{character:04x}: {exc.reason}"
    return 1, 1, " ".join(str(exc).split()) or type(exc).__name__


def parse_yaml_value(text: str, dotted: str, source: str) -> Any:
    """One value written in YAML (an override, or one part of a comma-separated one)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        _, column, problem = yaml_problem(exc, text)
        raise ConfigError(f"config key '{dotted}' ({source}): {text.strip()!r} is not valid YAML "
                          f"(column {column}: {problem})") from None


def leaf_fields(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field]]:
    """(dotted key, field) of every knob of `cls`, its sections' knobs in place of the sections."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from leaf_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f


def all_keys(cls: type) -> list[str]:
    return [dotted for dotted, _ in leaf_fields(cls)]


def unknown_key_message(root: type, dotted: str, source: str) -> str:
    """Why `dotted` is refused. A root dataclass names the keys it no longer has, with where they
    went, in its `MOVED_KEYS` (a class attribute): a file or an override written before the move
    learns the new name, not that its key is unknown."""
    moved = getattr(root, "MOVED_KEYS", {})
    if dotted in moved:
        return f"config key '{dotted}' is now '{moved[dotted]}' ({source})"
    close = difflib.get_close_matches(dotted, all_keys(root), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown config key '{dotted}' ({source}){hint}"


def build(cls: type, raw: dict[str, Any], source: str, prefix: str = "", root: type | None = None) -> Any:
    """An instance of dataclass `cls` from a mapping of its keys (sections nested)."""
    root = root or cls
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(unknown_key_message(root, dotted, source))
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{dotted}' ({source}) must be a mapping of keys")
            kwargs[key] = build(hint, value, source, prefix=f"{dotted}.", root=root)
        else:
            kwargs[key] = coerce(value, hint, dotted, source)
    return cls(**kwargs)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return " or ".join(repr(choice) for choice in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))


def finite(value: float, dotted: str, source: str) -> float:
    """No knob takes an infinite or NaN number: `train.beta=inf` would train on NaN losses."""
    if not math.isfinite(value):
        raise ConfigError(f"config key '{dotted}' ({source}) must be a finite number; got {value}")
    return value


def _number(value: float | str) -> float | None:
    """`value` as a float, or None for a string that is no number (a word)."""
    if isinstance(value, float):
        return value
    try:
        return float(value)
    except ValueError:
        return None


# Past 2**53 floats skip whole numbers (1e23 is read as 99999999999999991611392), so a
# number written in float notation beyond it may not be the one the person typed.
EXACT_FLOAT_INTS = 2**53


def whole_number(number: float, written: float | str, dotted: str, source: str) -> int:
    """An int knob given in float notation (`4.0`, or `1e3`, which YAML 1.1 reads as a string):
    taken only when it is a whole number that a float holds exactly, so nothing is rounded."""
    finite(number, dotted, source)
    if not number.is_integer():
        raise ConfigError(f"config key '{dotted}' ({source}) must be a whole number (int); got {written!r}")
    if abs(number) > EXACT_FLOAT_INTS:
        raise ConfigError(f"config key '{dotted}' ({source}) must be int; got {written!r}, in float notation beyond "
                          "2**53, where floats no longer hold every whole number: write it in digits")
    return int(number)


def coerce(value: Any, hint: Any, dotted: str, source: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        # YAML 1.1 reads a bare on/off as a boolean.
        if isinstance(value, bool) and {"on", "off"} <= set(choices):
            value = "on" if value else "off"
        if value not in choices:
            raise ConfigError(f"config key '{dotted}' ({source}) must be one of "
                              f"{', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin is list:
        # A YAML list, or a comma-separated string on the command line (temperatures=0.6,1.0).
        (item_hint,) = typing.get_args(hint)
        if isinstance(value, str):
            # Names stay strings as written (a column may be called `1` or `true`).
            value = [part.strip() if item_hint is str else parse_yaml_value(part, dotted, source)
                     for part in value.split(",") if part.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"config key '{dotted}' ({source}) must be a list; got {type(value).__name__} {value!r}")
        return [coerce(item, item_hint, f"{dotted}[{i}]", source) for i, item in enumerate(value)]
    if origin is dict:
        # A YAML mapping, or `name:weight,name:weight` on the command line.
        if isinstance(value, str):
            pairs = [part.split(":", 1) for part in value.split(",") if part.strip()]
            if any(len(pair) != 2 for pair in pairs):
                raise ConfigError(f"config key '{dotted}' ({source}) must look like name:value,name:value; got {value!r}")
            value = {k.strip(): parse_yaml_value(v, f"{dotted}.{k.strip()}", source) for k, v in pairs}
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{dotted}' ({source}) must be a mapping; got {type(value).__name__} {value!r}")
        key_hint, value_hint = typing.get_args(hint)
        return {coerce(k, key_hint, f"{dotted} key", source): coerce(v, value_hint, f"{dotted}.{k}", source)
                for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        # A number or a word (`float | Literal["auto"]`): the first reading that fits.
        for option in options[:-1]:
            try:
                return coerce(value, option, dotted, source)
            except ConfigError:
                pass
        try:
            return coerce(value, options[-1], dotted, source)
        except ConfigError:
            if len(options) == 1:
                raise
        words = " or ".join(_describe(option) for option in options)
        raise ConfigError(f"config key '{dotted}' ({source}) must be {words}; got {value!r}") from None
    # bool is an int in Python; a `true` given for a number is a mistake.
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return finite(float(value), dotted, source)
    # YAML 1.1 reads `1e-5` (no dot) as a string; it is a float to any reader.
    number = _number(value) if isinstance(value, (float, str)) else None
    if hint is float and number is not None:
        return finite(number, dotted, source)
    if hint is int and number is not None:
        return whole_number(number, value, dotted, source)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise ConfigError(f"config key '{dotted}' ({source}) must be {hint.__name__}; "
                      f"got {type(value).__name__} {value!r}")


def apply_override(config: Any, item: str) -> None:
    """Set one `key=value` of the command line on `config` (a root config instance)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override '{item}' must look like key=value (for example train.beta=0.2)")
    source = "command line"
    if key not in all_keys(type(config)):
        raise ConfigError(unknown_key_message(type(config), key, source))
    *parents, leaf = key.split(".")
    section: Any = config
    for part in parents:
        section = getattr(section, part)
    hint = typing.get_type_hints(type(section))[leaf]
    value = _override_value(item, text, hint)
    if hint is str and not isinstance(value, str):
        value = text  # `run=123` or `name=true` are strings when a string is expected
    if typing.get_origin(hint) in (types.UnionType, typing.Union) and value is not None:
        options = [a for a in typing.get_args(hint) if a is not type(None)]  # `key=null` stays None
        if len(options) == 1:
            hint = options[0]
    if typing.get_origin(hint) in (list, dict) and not isinstance(value, (list, dict)):
        value = text  # `temperatures=0.6,1.0` reads as a string; coerce splits it
    setattr(section, leaf, coerce(value, hint, key, source))


def _takes_text(hint: Any) -> bool:
    """Whether a knob of type `hint` reads an override's text when it is not valid YAML: a
    string knob (`model.name=@org/x`), or a list or mapping, whose comma-separated parts
    coerce parses one by one."""
    options = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) in (
        types.UnionType, typing.Union) else [hint]
    return any(option is str or typing.get_origin(option) in (list, dict) for option in options)


def _override_value(item: str, text: str, hint: Any) -> Any:
    if not text.strip():
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        if _takes_text(hint):
            return text
        _, column, problem = yaml_problem(exc, text)
        raise ConfigError(f"override '{item.strip()}' is not valid YAML: column {column} of its value: "
                          f"{problem}") from None
