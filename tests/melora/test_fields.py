"""melora.fields, the one validator of every config section: types, choices, bounds and the
project's unknown-key message, each refusal naming the dotted field, the value and what is
allowed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import pytest

from melora.errors import ConfigError
from melora.fields import at_least, check_field, check_keys, validate


@dataclass
class Section:
    section: ClassVar[str] = "part"
    n: int = field(default=1, metadata=at_least(1))
    scale: float = field(default=1.0, metadata={"gt": 0, "le": 10})
    kind: str = field(default="a", metadata={"choices": ("a", "b")})
    width: float = field(default=2, metadata={"gt": 0, "keep_int": True})

    def __post_init__(self) -> None:
        validate(self)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "part.n=0 must be an integer >= 1"),
        ({"n": True}, "part.n=True must be an integer"),
        ({"n": 1.0}, "part.n=1.0 must be an integer"),
        ({"scale": 0}, "part.scale=0.0 is out of range: allowed is > 0"),
        ({"scale": 11}, "part.scale=11.0 is out of range: allowed is <= 10"),
        ({"scale": float("nan")}, "part.scale=nan must be a finite number"),
        ({"kind": "c"}, r"part.kind='c' is not allowed: choose one of \['a', 'b'\]"),
    ],
)
def test_validate_names_the_field_the_value_and_what_is_allowed(kwargs, message) -> None:
    with pytest.raises(ConfigError, match=f"^{message}$"):
        Section(**kwargs)


def test_validate_coerces_as_declared() -> None:
    s = Section(scale=3, width=4)
    assert (s.scale, type(s.scale)) == (3.0, float)
    assert (s.width, type(s.width)) == (4, int)  # keep_int


def test_check_field_is_validate_for_one_value() -> None:
    assert check_field("sweep.asha.grace_period", 5, int, at_least(1)) == 5
    with pytest.raises(
        ConfigError, match=r"^sweep.asha.reduction_factor=1 must be an integer >= 2$"
    ):
        check_field("sweep.asha.reduction_factor", 1, int, at_least(2))


def test_check_keys_suggests_the_closest_key() -> None:
    with pytest.raises(
        ConfigError,
        match=r"^unknown key 'part.scal' \(did you mean 'scale'\?\); allowed keys in part: \['n', 'scale'\]$",
    ):
        check_keys("part", ["n", "scal"], ["n", "scale"])
