"""Argument checks with one message format: the argument, what it must be, what was given, and the fix.

Every public class and function of the suite validates its arguments with these (before any work is done and
before the user's model is touched), so messages read the same everywhere::

    `every_n_steps` must be an integer >= 1, got 0. HINT: pass e.g. `every_n_steps=100`.

Each check returns the value normalised (an ``int``, a ``float``, a tuple), so callers can store what it returns.
Every message ends with a HINT: the caller's ``fix`` where it gave one, otherwise an example of a valid call.

>>> check_int("epochs", 3, minimum=1)
3
>>> check_real("lr", 0.5, minimum=0.0, minimum_inclusive=False)
0.5
>>> check_choice("mode", "qat", ("qat", "ptq"))
'qat'
>>> check_int("n", 0, minimum=1)
Traceback (most recent call last):
...
lightning_quant.core.errors.QuantizationConfigError: `n` must be an integer >= 1, got 0. HINT: pass e.g. `n=1`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from numbers import Integral
from typing import Any

from lightning_quant.core.errors import QuantizationConfigError

#: Narrowest and widest bit width of a quantization grid (1 is binary: sign times a scale).
MIN_BITS = 1
MAX_BITS = 8

__all__ = [
    "MAX_BITS",
    "MIN_BITS",
    "check_bits",
    "check_bool",
    "check_choice",
    "check_fraction",
    "check_int",
    "check_names",
    "check_real",
    "config_error",
]


def config_error(argument: str, requirement: str, value: Any, fix: str | None = None) -> QuantizationConfigError:
    """The suite's message: ``` `argument` must be <requirement>, got <value>. HINT: <fix>```."""
    hint = f" HINT: {fix}" if fix else ""
    return QuantizationConfigError(f"`{argument}` must be {requirement}, got {value!r}.{hint}")


def check_bool(argument: str, value: object, fix: str | None = None) -> bool:
    """``value`` if it is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise config_error(argument, "True or False", value, fix or f"pass `{argument}=True` or `{argument}=False`.")
    return value


def check_int(
    argument: str,
    value: object,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    allow_none: bool = False,
    integral: bool = False,
    fix: str | None = None,
) -> int | None:
    """``value`` as an int within ``[minimum, maximum]`` (bools are not integers here).

    With ``integral`` any :class:`numbers.Integral` (a numpy integer, say) is accepted too and returned as an int.
    """
    if value is None and allow_none:
        return None
    if minimum is not None and maximum is not None:
        requirement = f"an integer in [{minimum}, {maximum}]"
    elif minimum is not None:
        requirement = f"an integer >= {minimum}"
    elif maximum is not None:
        requirement = f"an integer <= {maximum}"
    else:
        requirement = "an integer"
    if allow_none:
        requirement += " or None"
    example = minimum if minimum is not None else (maximum if maximum is not None else 1)
    fix = fix or f"pass e.g. `{argument}={example}`."
    if isinstance(value, bool) or not isinstance(value, Integral if integral else int):
        raise config_error(argument, requirement, value, fix)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise config_error(argument, requirement, value, fix)
    return int(value)


def check_real(
    argument: str,
    value: object,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    minimum_inclusive: bool = True,
    maximum_inclusive: bool = True,
    allow_none: bool = False,
    fix: str | None = None,
) -> float | None:
    """``value`` as a finite float within the given bounds (ints accepted, bools not)."""
    if value is None and allow_none:
        return None
    low = "" if minimum is None else f"{'>=' if minimum_inclusive else '>'} {minimum}"
    high = "" if maximum is None else f"{'<=' if maximum_inclusive else '<'} {maximum}"
    requirement = (
        "a finite number" + (f" {low}" if low else "") + (" and" if low and high else "") + (f" {high}" if high else "")
    )
    if allow_none:
        requirement += " or None"
    fix = fix or f"pass e.g. `{argument}={_real_example(minimum, maximum, minimum_inclusive, maximum_inclusive)}`."
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise config_error(argument, requirement, value, fix)
    below = minimum is not None and (value < minimum if minimum_inclusive else value <= minimum)
    above = maximum is not None and (value > maximum if maximum_inclusive else value >= maximum)
    if below or above:
        raise config_error(argument, requirement, value, fix)
    return float(value)


def _real_example(minimum: float | None, maximum: float | None, low_inclusive: bool, high_inclusive: bool) -> float:
    """A value the bounds of :func:`check_real` accept, for its default HINT."""
    if minimum is not None and low_inclusive:
        return minimum
    if maximum is not None and high_inclusive:
        return maximum
    if minimum is not None and maximum is not None:
        return (minimum + maximum) / 2
    if minimum is not None:
        return minimum + 1
    return 0.0 if maximum is None else maximum - 1


def check_fraction(argument: str, value: object) -> float:
    """``value`` as a float strictly between 0 and 1 (a share of samples, say)."""
    return check_real(  # type: ignore[return-value]
        argument,
        value,
        minimum=0,
        maximum=1,
        minimum_inclusive=False,
        maximum_inclusive=False,
        fix=f"pass a fraction, e.g. `{argument}=0.1`.",
    )


def check_choice(argument: str, value: object, choices: Iterable[object], fix: str | None = None) -> Any:
    """``value`` if it is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        example = f"pass e.g. `{argument}={choices[0]!r}`." if choices else None
        raise config_error(argument, f"one of {list(choices)}", value, fix or example)
    return value


def check_names(
    argument: str, value: object, *, allow_none: bool = True, allow_string: bool = False
) -> tuple[str, ...] | None:
    """A list of names or ``fnmatch`` patterns as a tuple.

    A bare string is refused (``layers="conv"`` for ``layers=["conv"]`` is a common slip) unless ``allow_string``,
    where it is taken as one pattern.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, str) and allow_string:
        return (value,)
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        example = f"[{value!r}]" if isinstance(value, str) else "['conv*']"
        raise config_error(argument, "a list of layer-name patterns", value, f"pass e.g. `{argument}={example}`.")
    return tuple(value)


def check_bits(argument: str, value: object, *, allow_binary: bool = False, low: int = 2) -> int:
    """``value`` as a bit width in ``[low, MAX_BITS]``, or 1 (binary) where ``allow_binary``.

    Args:
        argument: the user-facing argument name, used in the message.
        value: what the user gave.
        allow_binary: whether 1 (binary: sign times a scale) is allowed.
        low: the smallest multi-bit width allowed.
    """
    fix = f"pass e.g. `{argument}=4`."
    if isinstance(value, bool) or not isinstance(value, int):
        raise config_error(argument, f"an integer number of bits in [{low}, {MAX_BITS}]", value, fix)
    if value == 1 and allow_binary:
        return value
    if not low <= value <= MAX_BITS:
        if value == 1:
            fix = "for binary weights pass `binary_weights=True` (or a LayerSpec with weight_bits=1)."
        raise config_error(argument, f"within [{low}, {MAX_BITS}]", value, fix)
    return value
