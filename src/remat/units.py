"""Byte quantities: parse human strings at the edges, format them for people. No torch here."""

from __future__ import annotations

import math
import operator
import re

from remat.errors import BudgetError

__all__ = ["format_bytes", "format_seconds", "parse_bytes"]

_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | str, *, what: str = "size") -> int:
    """Parse a byte count: an int (or anything :func:`operator.index` takes: numpy integers, 0-d integer
    tensors), or a string such as ``"6GiB"``, ``"6GB"``, ``"750MiB"``, ``"1024"``.

    Binary units (KiB, MiB, GiB, TiB and the bare K, M, G, T) are powers of 1024; decimal units (KB, MB,
    GB, TB) are powers of 1000, as on a GPU's spec sheet.

    Raises:
        BudgetError: the value is negative, not a number, or has an unknown unit.

    >>> parse_bytes("1.5GiB")
    1610612736
    >>> parse_bytes("6GB")
    6000000000
    """
    if isinstance(value, bool):
        raise BudgetError(f"{what} {value!r} is a bool; give bytes as an int or a string like '6GiB'")
    if not isinstance(value, str):
        try:
            count = operator.index(value)
        except TypeError:
            count = None
        if count is not None:
            if count < 0:
                raise BudgetError(f"{what} {value!r} is negative; give a positive number of bytes")
            return count
        raise BudgetError(f"{what} {value!r} is neither an int nor a string like '6GiB'")
    match = _PATTERN.match(value)
    if match is None:
        raise BudgetError(f"{what} {value!r} is not a size; write it like '6GiB', '6GB' or '750MiB'")
    number, unit = float(match.group(1)), match.group(2).lower()
    if unit not in _UNITS:
        known = "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"
        raise BudgetError(f"{what} {value!r} has unknown unit {match.group(2)!r}; use one of {known}")
    return math.floor(number * _UNITS[unit])


def format_bytes(n: float) -> str:
    """``1536 -> '1.50 KiB'``; bytes in binary units with three significant figures.

    >>> format_bytes(6 * 2**30)
    '6.00 GiB'
    >>> format_bytes(512)
    '512 B'
    """
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{sign}{n / scale:.2f} {unit}"
    return f"{sign}{int(n)} B"


def format_seconds(s: float) -> str:
    """``0.0123 -> '12.3 ms'``.

    >>> format_seconds(0.0123)
    '12.3 ms'
    """
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} us"
