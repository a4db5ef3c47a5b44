"""Values from YAML, JSON, the command line and the form, turned into each field's type.

    from sftlib.config.coerce import COERCERS, WrongType
    COERCERS[float]("3e-4")      # 0.0003: PyYAML (YAML 1.1) reads `3e-4`, without a dot, as a string
    COERCERS[int]("2.0")         # 2
    COERCERS[bool]("yes")        # raises WrongType("true or false")

Every coercer either returns a value of the field's type or raises `WrongType`, whose `expected`
says in words what the field takes; `RunConfig.with_overrides` turns that into a problem naming the
field. Only finite numbers are numbers here: `.inf` and `.nan` are refused with the field named.
"""

from __future__ import annotations

import math
from typing import Any, Mapping


class WrongType(Exception):
    def __init__(self, expected: str):
        self.expected = expected


def as_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise WrongType("text")


def as_int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise WrongType("an integer") from None
    if isinstance(number, float) and math.isfinite(number) and number.is_integer():
        return int(number)
    raise WrongType("an integer")


def as_float(value: Any) -> float:
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):  # PyYAML (YAML 1.1) reads `3e-4`, without a dot, as a string
        try:
            number = float(value.strip())
        except ValueError:
            pass
    if number is None or not math.isfinite(number):
        raise WrongType("a finite number")
    return number


def as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise WrongType("true or false")


def as_optional_int(value: Any) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "")):
        return None
    try:
        return as_int(value)
    except WrongType:
        raise WrongType("an integer or null") from None


def as_str_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):  # "lora,gguf" from a command line or a one-item YAML scalar
        return [x.strip() for x in value.split(",") if x.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(x, str) for x in value):
        return list(value)
    raise WrongType("a list of text")


def as_str_dict(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, Mapping) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        return dict(value)
    raise WrongType("a mapping of text to text")


def as_count_or_fraction(value: Any) -> float | int:
    """`data.eval_size`: keep whole numbers >= 1 as int row counts, fractions as float."""
    number = as_float(value)
    return int(number) if number >= 1 and number.is_integer() else number


def type_ok(value: Any, ftype: Any) -> bool:
    """Whether `value` (set in code, so never coerced) has the field's type."""
    if ftype is bool or isinstance(value, bool):
        return ftype is bool and isinstance(value, bool)
    if ftype == list[str]:
        return isinstance(value, list) and all(isinstance(x, str) for x in value)
    if ftype == dict[str, str]:
        return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
    allowed = {str: str, int: int, float: (int, float), int | None: (int, type(None))}[ftype]
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return isinstance(value, allowed)


EXPECTED = {str: "text", int: "an integer", float: "a finite number", bool: "true or false",
            int | None: "an integer or null", list[str]: "a list of text", dict[str, str]: "a mapping of text to text"}
COERCERS = {str: as_str, int: as_int, float: as_float, bool: as_bool, int | None: as_optional_int,
            list[str]: as_str_list, dict[str, str]: as_str_dict}
