"""Budgets: what a user writes, turned into bytes. No torch here.

One meaning per type (docs/budgets.md has the table):

* an int — including numpy integers and 0-d integer tensors, anything :func:`operator.index` accepts —
  is bytes;
* a string is a size (``"6GiB"``, ``"6GB"``, ``"750MiB"``), a percentage of the no-checkpointing peak
  (``"50%"``, ``"150%"``), or a bare number read as Python reads it: ``"1024"`` is bytes like ``1024``,
  ``"0.5"`` a share like ``0.5``, ``"1.5"`` refused like ``1.5``;
* :func:`share` (``share(0.5)``, ``share(Fraction(2, 3))``, ``share(1.5)``) is a share of the
  no-checkpointing peak, of any size;
* a float is a share of the no-checkpointing peak, and only in (0, 1): ``80e9`` was meant as bytes and
  ``1.5`` perhaps as 150%, so a float of 1 or more is refused with both readings in the message;
* None is no limit.

Anything else (a bool, a Fraction, a Decimal, a float tensor) is refused. Every refusal is a
:class:`remat.BudgetError` that names the value and the fix.
"""

from __future__ import annotations

import math
import numbers
import operator
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import SupportsIndex, Union

from remat.errors import BudgetError
from remat.planning.plan import Record
from remat.planning.profile import Profile
from remat.planning.simulate import simulate
from remat.units import format_bytes, parse_bytes

__all__ = ["Budget", "Share", "absolute_bytes", "no_checkpointing_peak", "parse_budget", "share"]

_FIX = "give bytes as an int or a size like '6GiB', or a share of the no-checkpointing peak as '50%' or share(0.5)"


@dataclass(frozen=True)
class Share:
    """A budget as a share of the peak without checkpointing: ``Share(Fraction(1, 2))`` is half of it.

    Made by :func:`share`; ``fraction`` is exact.
    """

    fraction: Fraction

    def __str__(self) -> str:
        return f"{float(self.fraction) * 100:g}% of the no-checkpointing peak"


def share(value: float | Fraction | str) -> Share:
    """A budget that is ``value`` times the peak without checkpointing (any size: 1.5 is 150%).

    ``value`` is a positive number (int, float, :class:`fractions.Fraction`, a numpy number) or a decimal
    string; a float is read as the decimal it prints as (``0.6`` is exactly 3/5).

    >>> share(0.5)
    Share(fraction=Fraction(1, 2))

    Raises:
        BudgetError: the value is not a positive finite number.
    """
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise BudgetError(f"share({value!r}): expected a positive number like 0.5 or Fraction(1, 2)")
    try:
        if isinstance(value, str):
            fraction = Fraction(value.strip())
        elif isinstance(value, numbers.Rational):
            fraction = Fraction(value.numerator, value.denominator)
        else:
            fraction = Fraction(repr(float(value)))
    except (ValueError, OverflowError, ZeroDivisionError, TypeError):
        raise BudgetError(f"share({value!r}): expected a positive finite number like 0.5") from None
    if fraction <= 0:
        raise BudgetError(f"share({value!r}) must be above 0")
    return Share(fraction)


Budget = Union[int, SupportsIndex, str, float, Share, None]  # noqa: UP007 - a runtime alias, for 3.10
"""What :func:`remat.solve` accepts as a budget."""


def no_checkpointing_peak(profile: Profile) -> int:
    """Predicted peak of a step that stores everything (strategy ``none``): what shares are shares of."""
    return simulate(profile, tuple(Record(k) for k in range(len(profile.stages)))).peak_bytes


class _NeedsProfile(Exception):
    """A share of the no-checkpointing peak was asked for without a profile."""


def absolute_bytes(budget: Budget) -> int | None:
    """The budget's bytes when they do not depend on a profile; None for a share or no limit.

    >>> absolute_bytes("1KiB"), absolute_bytes(2048), absolute_bytes("50%"), absolute_bytes(None)
    (1024, 2048, None, None)
    """
    try:
        return parse_budget(budget, None)
    except _NeedsProfile:
        return None


def parse_budget(budget: Budget, profile: Profile | None) -> int | None:
    """Bytes from a budget (see the module docstring; the table is in docs/budgets.md). None: no limit.

    >>> p = Profile.from_lists([10] * 4, [40] * 3 + [0], [1.0] * 4, [2.0] * 4)
    >>> parse_budget("1KiB", p), parse_budget(100, p), parse_budget("50%", p), parse_budget(share(0.5), p)
    (1024, 100, 75, 75)

    Raises:
        BudgetError: the budget is malformed, negative, or a float of 1 or more.
    """
    if budget is None:
        return None
    if isinstance(budget, Share):
        return _of_peak(budget.fraction, profile)
    if isinstance(budget, bool):
        raise BudgetError(f"budget {budget!r} is a bool; {_FIX}")
    if isinstance(budget, str):
        return _parse_text(budget, profile)
    if isinstance(budget, Fraction):
        raise BudgetError(f"budget {budget!r} is a Fraction; for a share write share({budget!r}) or a percentage")
    if isinstance(budget, float):
        return _parse_float(budget, repr(budget), "a float", profile)
    try:
        count = operator.index(budget)
    except TypeError:
        pass
    else:
        if count < 0:
            raise BudgetError(f"budget {budget!r} is negative; {_FIX}")
        return count
    if isinstance(budget, numbers.Real):  # a float of another type (numpy.float32)
        return _parse_float(float(budget), repr(budget), "a float", profile)
    raise BudgetError(f"budget {budget!r} ({type(budget).__name__}) is not a budget; {_FIX}")


_BARE_INT = re.compile(r"^[0-9]+$")
_BARE_NUMBER = re.compile(r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$")


def _parse_text(budget: str, profile: Profile | None) -> int:
    text = budget.strip()
    if text.endswith("%"):
        try:
            percent = Fraction(text[:-1].strip())
        except (ValueError, ZeroDivisionError):
            raise BudgetError(f"budget {budget!r} is not a percentage like '50%'") from None
        if percent <= 0:
            raise BudgetError(f"budget {budget!r} must be above 0%; {_FIX}")
        return _of_peak(percent / 100, profile)
    if _BARE_INT.match(text):
        return int(text)
    if _BARE_NUMBER.match(text):
        return _parse_float(float(text), repr(budget), "a decimal number", profile)
    return parse_bytes(text, what="budget")


def _parse_float(value: float, shown: str, kind: str, profile: Profile | None) -> int:
    """A float (or a decimal string) is a share in (0, 1); 1 or more is refused with both readings."""
    if not math.isfinite(value) or value <= 0:
        raise BudgetError(f"budget {shown} must be a positive finite number; {_FIX}")
    if value >= 1:
        as_share = f"'{value * 100:g}%' or share({value!r})" if value < 100 else "'50%' or share(0.5)"
        as_bytes = format_bytes(value) if value >= 1024 else f"{value:g} B"
        raise BudgetError(
            f"budget {shown} is {kind}: as bytes it would be {as_bytes}, as a share {value:g} × the"
            f" no-checkpointing peak; pass int({value!r}) or a size like '6GiB' for bytes, or {as_share} for"
            " a share"
        )
    return _of_peak(Fraction(repr(float(value))), profile)


def _of_peak(fraction: Fraction, profile: Profile | None) -> int:
    if profile is None:
        raise _NeedsProfile
    return math.floor(fraction * no_checkpointing_peak(profile))
