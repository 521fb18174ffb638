"""Field validation for every config dataclass of the project, driven by each field's metadata.

    @dataclass
    class OptimConfig:
        section: ClassVar[str] = "optim"
        lr: float = field(default=1e-4, metadata={"help": "...", "gt": 0})
        def __post_init__(self) -> None:
            validate(self)        # optim.lr=-0.1 is out of range: allowed is > 0

`validate` checks each field against its type hint (an int widens to float, a list becomes a
tuple; bool is never a number) and against these metadata keys:

- "choices": the allowed values (None passes for an optional field);
- "gt", "ge", "lt", "le": bounds on a number (None passes);
- "out_of_range": the words after `key=value` when a bound fails (default: "is out of range:
  allowed is >= 1"), e.g. "must be > 0";
- "keep_int": True keeps an int as given in a float field (alpha: 16 stays 16 in written configs);
- "shown": for a mapping field, `shown(key, value) -> str`, how a refused entry's value is
  printed (so that a secret is never echoed).

`at_least(n)` is the metadata of an integer field >= n. `check_field` checks one value that is not
a dataclass field (an entry of a mapping, a field of a union type). `check_keys` refuses an unknown
key with one message for the whole project, with a difflib suggestion. `short_repr` cuts a value
for a message. Plain Python: melora's and the
orchestrator's configs both use it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import operator
import reprlib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from melora.errors import ConfigError

BOUNDS = {  # metadata key -> (test, words); bounds apply to numbers only
    "gt": (operator.gt, ">"),
    "ge": (operator.ge, ">="),
    "lt": (operator.lt, "<"),
    "le": (operator.le, "<="),
}

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 60, 60, 40
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = _REPR.maxfrozenset = 6


def short_repr(value: Any, limit: int = 100) -> str:
    """repr(value) for a message, cut to about `limit` characters without building the whole
    repr (a YAML alias bomb would expand to billions of values); a huge string keeps its start."""
    try:
        text = _REPR.repr(value)
    except (ValueError, RecursionError):  # an int beyond Python's 4300 printable digits
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def at_least(minimum: int) -> dict[str, Any]:
    """Metadata of an integer field >= minimum: "r=0 must be an integer >= 1"."""
    return {"ge": minimum, "out_of_range": f"must be an integer >= {minimum}"}


def field_names(cls: type) -> list[str]:
    """The dataclass's field names, in declaration order."""
    return [f.name for f in dataclasses.fields(cls)]


def unknown_key_message(
    section: str, key: Any, allowed: Sequence[str], *, noun: str = "key"
) -> str:
    """ "unknown key 'optim.lrr' (did you mean 'lr'?); allowed keys in optim: [...]"."""
    dotted = short_repr(f"{section}.{key}" if section else str(key))
    close = difflib.get_close_matches(str(key)[:100], list(allowed), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    where = f"in {section}" if section else "at the top level"
    return f"unknown {noun} {dotted}{hint}; allowed {noun}s {where}: {list(allowed)}"


def check_keys(
    section: str, keys: Iterable[Any], allowed: Sequence[str], *, noun: str = "key"
) -> None:
    """ConfigError (`unknown_key_message`) for the first of `keys` not in `allowed`."""
    for key in keys:
        if key not in allowed:
            raise ConfigError(unknown_key_message(section, key, allowed, noun=noun))


def validate(obj: Any, section: str | None = None, *, skip: tuple[str, ...] = ()) -> None:
    """Check every field of a config dataclass against its type hint and metadata (module doc),
    storing the coerced values; ConfigError naming `<section>.<field>`, the value and what is
    allowed. `section` defaults to the class's `section` ClassVar ('' for the top level)."""
    hints = typing.get_type_hints(type(obj))
    if section is None:
        section = obj.section
    prefix = f"{section}." if section else ""
    for f in dataclasses.fields(obj):
        if f.name in skip:
            continue
        key = prefix + f.name
        meta = f.metadata
        setattr(obj, f.name, check_field(key, getattr(obj, f.name), hints[f.name], meta))


def check_field(key: str, value: Any, hint: Any, meta: Mapping[str, Any]) -> Any:
    """`value` coerced to `hint` and checked against `meta`, as `validate` does for a field."""
    value = coerce(key, value, hint, meta)
    check_value(key, value, meta)
    return value


def check_value(key: str, value: Any, meta: Mapping[str, Any]) -> None:
    """ConfigError when `value` (already of the field's type) is not among the metadata's
    `choices` or breaks one of its bounds; None always passes."""
    if value is None:
        return
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(
            f"{key}={short_repr(value)} is not allowed: choose one of {list(meta['choices'])}"
        )
    for bound, (ok, words) in BOUNDS.items():
        if bound in meta and not ok(value, meta[bound]):
            refusal = meta.get("out_of_range", f"is out of range: allowed is {words} {meta[bound]}")
            raise ConfigError(f"{key}={short_repr(value)} {refusal}")


def coerce(key: str, value: Any, hint: Any, meta: Mapping[str, Any] | None = None) -> Any:
    """`value` checked against `hint` (ints widen to float unless meta 'keep_int'; lists become
    tuples); else ConfigError."""
    meta = meta or {}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return coerce(key, value, inner, meta)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={short_repr(value)} must be true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={short_repr(value)} must be an integer")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value):
            return value if meta.get("keep_int") and isinstance(value, int) else float(value)
        raise ConfigError(f"{key}={short_repr(value)} must be a finite number")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={short_repr(value)} must be a string")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={short_repr(value)} must be a list")
        return tuple(coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
    if origin is dict:
        return _coerce_str_dict(key, value, meta)
    raise TypeError(f"no validation for the type {hint!r} of {key}")  # a bug in the caller


def _coerce_str_dict(key: str, value: Any, meta: Mapping[str, Any]) -> dict[str, str]:
    """A mapping of non-empty string keys to scalars, the values as strings."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}={short_repr(value)} must be a mapping")
    shown = meta.get("shown", lambda _k, v: short_repr(v))
    for k, v in value.items():
        if not isinstance(k, str) or not k or not isinstance(v, (str, int, float, bool)):
            raise ConfigError(
                f"{key}[{short_repr(k)}]={shown(k, v)}: allowed are string keys with string or number values"
            )
    return {k: str(v) for k, v in value.items()}


def _finite(x: int | float) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an int beyond float's range
        return False
