"""Binomial checkpointing for homogeneous chains (Griewank & Walther, ACM TOMS Algorithm 799).

No torch here. ``s`` counts snapshots *including* the one that holds the range's input; ``l`` is the
number of steps. :func:`extra_forwards` is the minimal number of extra forward steps ``t(l, s)``;
:func:`revolve_items` builds the schedule that attains it, as plan items over stages
``start … start+l-1``.
"""

from __future__ import annotations

import functools
import math

from remat.planning.plan import Item, Record, Region

__all__ = ["extra_forwards", "extra_forwards_closed_form", "revolve_items"]

INF = float("inf")


@functools.cache
def _best(l: int, s: int) -> tuple[float, int]:
    """(t(l, s), first split i) by the recurrence ``t(l, s) = min_i [i + t(i, s) + t(l-i, s-1)]``."""
    if l == 1:
        return 0.0, 0
    if s <= 0:
        return INF, 0
    if s == 1:
        return l * (l - 1) / 2, l - 1
    best, arg = INF, 0
    for i in range(1, l):
        rest = _best(l - i, s - 1)[0]
        if rest == INF:
            continue
        v = i + _best(i, s)[0] + rest
        if v < best:
            best, arg = v, i
    return best, arg


def extra_forwards(l: int, s: int) -> float:
    """Minimal extra forward steps to reverse ``l`` steps with ``s`` snapshots (``inf`` if ``s < 1``).

    >>> extra_forwards(10, 1), extra_forwards(10, 3)
    (45.0, 15.0)
    """
    if l < 1:
        raise ValueError(f"extra_forwards: l={l} must be >= 1")
    return _best(l, s)[0]


def extra_forwards_closed_form(l: int, s: int) -> int:
    """``t(l, s) = r*l - beta(s+1, r-1)`` with ``beta(s, r) = C(s+r, s)`` and ``beta(s, r-1) < l <= beta(s, r)``."""
    if l == 1:
        return 0

    def beta(a: int, b: int) -> int:
        return math.comb(a + b, a)

    r = 0
    while beta(s, r) < l:
        r += 1
    return r * l - beta(s + 1, r - 1)


def revolve_items(start: int, l: int, s: int) -> tuple[Item, ...]:
    """The revolve schedule over stages ``start … start+l-1`` with ``s`` snapshots, as plan items."""
    items: list[Item] = []
    while l > 1:
        if s <= 0:
            raise ValueError(f"revolve: {l} steps cannot be reversed with no snapshot")
        i = _best(l, s)[1]
        items.append(Region(start, start + i, revolve_items(start, i, s)))
        start, l, s = start + i, l - i, s - 1
    items.append(Record(start))
    return tuple(items)
