"""The smallest peak any schedule of a chain can reach, in exact bytes. No torch here.

The optimal planner's DP (:mod:`remat.planning.optimal`) rounds sizes up to whole memory slots, so the
smallest budget it calls feasible can sit a few slots above the smallest peak a plan really has (a CNN
profile showed 1,438,031 B where a plan of 1,371,338 B existed). Finding the smallest peak needs no
slots: the simulator's peak of a sequence of items is a max of terms, each item's own peak and what it
holds plus the peak of the items after it, and those parts are independent. So with

    peak[p, i, l]: the least peak above the held input of processing stages i … l (input pinned when
                   p == PINNED, loose when p == LOOSE), the gradient y_{l+1} counted in,

the recurrence over the cost model's figures (:mod:`remat.planning.cost`, in exact bytes: the ones the
simulator adds up) is::

    record:  max(peak_own(Record(i), reserve x_{l+1}),  held(Record(i)) + peak[LOOSE, i+1, l] [i < l])
    region:  max(x_{l+1} + sweep[i, j],  held(Region(i, j)) + peak[LOOSE, j, l],
                 peak[PINNED, i, j-1] + beside[i, j-1])
             for j in i+1 … min(l, region_end[i])
    peak[p, i, l] = the smaller of the two

where a record's backward is charged as inside a recomputation (``recompute_bwd_extra``) exactly where
the simulator charges it: in every range but the top-level ranges ``i … L``, because region bodies never
end at ``L``; ``beside[i, j-1]`` is what is live beside a region's body (what its end holds, the copies
its recomputation makes, its stages' side gradients). The plans it ranges over are the optimal DP's:
regions nest freely, never end at the end of their range, and hold only checkpointable stages that join.
O(L^3) exact integer arithmetic, vectorised over ``j``.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from remat.planning.cost import BODY, LOOSE, PINNED, TOP, exact_costs
from remat.planning.optimal import RECORD
from remat.planning.plan import Item, Record, Region
from remat.planning.profile import Profile

__all__ = ["min_peak_items"]

Ints = npt.NDArray[np.int64]


def min_peak_items(profile: Profile) -> tuple[int, tuple[Item, ...]]:
    """``(peak_bytes, items)``: the smallest peak of the optimal planner's plans for ``profile`` (fixed
    memory and input included, as :func:`remat.simulate` counts it) and a plan that has it.

    Among plans of equal peak it prefers, range by range, recording a stage to starting a region, and a
    shorter region to a longer one (fewer recomputations), but it does not minimise time.

    >>> p = Profile.from_lists([10, 10, 10, 10], [30, 30, 30, 0], [1.0] * 4, [2.0] * 4)
    >>> min_peak_items(p)[0]
    70
    """
    n = len(profile.stages)
    peak, choice = _solve(profile)
    items = _items(choice, PINNED, 0, n - 1)
    top = int(peak[PINNED, 0, n - 1])
    return profile.base_bytes + top + _safety(profile, top), items


def _safety(profile: Profile, peak: int) -> int:
    return math.ceil(profile.safety_fraction * max(0, peak))


def _solve(profile: Profile) -> tuple[Ints, npt.NDArray[np.int32]]:
    """``peak[p, i, l]`` for every range, and ``choice[p, i, l]``: RECORD, or ``j`` for a region i..j-1."""
    n = len(profile.stages)
    costs = exact_costs(profile)
    rec, reg = costs.record, costs.region
    x = reg.output
    xs = x.tolist()
    peak = np.zeros((2, n, n), dtype=np.int64)
    choice = np.zeros((2, n, n), dtype=np.int32)
    for l in range(n):
        reserve = xs[l + 1]
        context = BODY if l < n - 1 else TOP  # only region bodies end before the head
        for i in range(l, -1, -1):
            j_last = min(l, int(reg.end[i]))
            best_region, best_j = None, 0
            if j_last >= i + 1:
                js = np.arange(i + 1, j_last + 1)
                regions = np.maximum(np.maximum(reserve + reg.sweep[i, js], reg.held[i, js] + peak[LOOSE, js, l]),
                                     peak[PINNED, i, i:j_last] + reg.beside[i, i:j_last])
                k = int(np.argmin(regions))
                best_region, best_j = int(regions[k]), i + 1 + k
            rest = int(peak[LOOSE, i + 1, l]) if i < l else 0
            for p in (PINNED, LOOSE):
                record = max(rec.peak(i, reserve, p, context), rec.held(i, p) + rest)
                if best_region is not None and best_region < record:
                    peak[p, i, l], choice[p, i, l] = best_region, best_j
                else:
                    peak[p, i, l], choice[p, i, l] = record, RECORD
    return peak, choice


def _items(choice: npt.NDArray[np.int32], pinned: int, i: int, l: int) -> tuple[Item, ...]:
    out: list[Item] = []
    while i <= l:
        j = int(choice[pinned, i, l])
        if j == RECORD:
            out.append(Record(i))
            i += 1
        else:
            out.append(Region(i, j, _items(choice, PINNED, i, j - 1)))
            i = j
        pinned = LOOSE
    return tuple(out)
