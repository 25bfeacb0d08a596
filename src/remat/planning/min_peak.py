"""The smallest peak any schedule of a chain can reach, in exact bytes. No torch here.

The optimal planner's DP (:mod:`remat.planning.optimal`) rounds sizes up to whole memory slots, so the
smallest budget it calls feasible can sit a few slots above the smallest peak a plan really has (a CNN
profile showed 1,438,031 B where a plan of 1,371,338 B existed). Finding the smallest peak needs no
slots: the simulator's peak of a sequence of items is a max of terms, each item's own peak and what it
holds plus the peak of the items after it, and those parts are independent. So with

    peak[p, i, l]: the least peak above the held input of processing stages i … l (input pinned when
                   p == PINNED, loose when p == LOOSE), the gradient y_{l+1} counted in,

the recurrence, mirroring :func:`remat.planning.simulate._seq` term by term, is::

    record:  max(x_{l+1} + xbar_i + side_i + of_i,
                 x_i + x_{i+1} + keep[p, i] - released_i + extra_i [l < L] + ob_i,
                 keep[p, i] + peak[LOOSE, i+1, l] [i < l])
    region:  max(x_{l+1} + sweep(i, j),  x_j + side_{i,j} + peak[LOOSE, j, l],
                 peak[PINNED, i, j-1] + hold_{j-1} + copy_{i,j} + side_grad_{i,j})
             for j in i+1 … min(l, region_end[i])
    peak[p, i, l] = the smaller of the two

where ``extra_i`` (a backward inside a recomputation) is charged exactly where the simulator charges it:
in every range but the top-level ranges ``i … L``, because region bodies never end at ``L``;
``copy_{i,j}`` is what the region's recomputation copies (Σ recompute_copy_k over its stages);
``keep[p, i]`` includes the stage's side tensors and their gradients ``side_i``, ``side_{i,j}`` and
``side_grad_{i,j}`` sum them over the region (Note [Side tensors] in :mod:`remat.planning.simulate`). The plans it
ranges over are the optimal DP's: regions nest freely, never end at the end of their range, and hold
only checkpointable stages that join. O(L^3) exact integer arithmetic, vectorised over ``j``.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from remat.planning.optimal import LOOSE, PINNED, RECORD, beside_bytes, region_ends
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


def _sizes(profile: Profile) -> dict[str, Ints]:
    st = profile.stages
    n = len(st)

    def arr(values: list[int]) -> Ints:
        return np.array(values, dtype=np.int64)

    x = arr([s.x_bytes for s in st] + [0])  # x[n] = 0: nothing after the head
    xbar = arr([s.xbar_bytes for s in st])
    side = arr([s.side for s in st])
    side_before = np.concatenate([[0], np.cumsum(side)]).astype(np.int64)
    ofn = arr([s.fwd_nograd_transient_bytes for s in st])
    sweep = np.zeros((n, n + 1), dtype=np.int64)  # sweep[i, j]: peak above x_i of an unrecorded i..j-1
    for i in range(n):
        steps = x[i : n] + x[i + 1 : n + 1] + ofn[i:n] + side_before[i + 1 :] - side_before[i]
        steps[0] -= x[i]  # the pass's own input is held outside the figure
        sweep[i, i + 1 :] = np.maximum.accumulate(steps)
    return {
        "x": x,
        "xbar": xbar,
        "side_before": side_before,
        "keep": np.stack([xbar + side, xbar + side - arr([s.input_freed_bytes for s in st])]),
        "side": side,
        "of": arr([s.fwd_transient_bytes for s in st]),
        "ob": arr([s.bwd_transient_bytes for s in st]),
        "released": arr([s.output_released_bytes for s in st]),
        "extra": arr([s.recompute_bwd_extra_bytes for s in st]),
        "hold": arr([s.recompute_hold_bytes for s in st]),
        "sweep": sweep,
        "region_end": region_ends(profile),
    }


def _solve(profile: Profile) -> tuple[Ints, npt.NDArray[np.int32]]:
    """``peak[p, i, l]`` for every range, and ``choice[p, i, l]``: RECORD, or ``j`` for a region i..j-1."""
    n = len(profile.stages)
    s = _sizes(profile)
    x, keep, hold, sweep, region_end = s["x"], s["keep"], s["hold"], s["sweep"], s["region_end"]
    beside = beside_bytes(profile)  # beside[i, l]: a region i..l's copies and side gradients beside its body
    side_before = s["side_before"]
    # A record's own peak: its forward (plus the range's reserve x_{l+1}), or its backward.
    forward = (s["xbar"] + s["side"] + s["of"]).tolist()
    backward = (x[:n] + x[1:] + keep - s["released"] + s["ob"]).tolist()  # [p][i], extra not included
    extra, keeps, xs = s["extra"].tolist(), keep.tolist(), x.tolist()
    peak = np.zeros((2, n, n), dtype=np.int64)
    choice = np.zeros((2, n, n), dtype=np.int32)
    for l in range(n):
        reserve = xs[l + 1]
        in_body = l < n - 1  # only region bodies end before the head; their backwards pay extra_i
        for i in range(l, -1, -1):
            j_last = min(l, int(region_end[i]))
            best_region, best_j = None, 0
            if j_last >= i + 1:
                js = np.arange(i + 1, j_last + 1)
                held = x[js] + side_before[js] - side_before[i]  # the region's output and side tensors
                regions = np.maximum(np.maximum(reserve + sweep[i, js], held + peak[LOOSE, js, l]),
                                     peak[PINNED, i, i:j_last] + hold[i:j_last] + beside[i, i:j_last])
                k = int(np.argmin(regions))
                best_region, best_j = int(regions[k]), i + 1 + k
            rest = int(peak[LOOSE, i + 1, l]) if i < l else 0
            for p in (PINNED, LOOSE):
                own = max(reserve + forward[i], backward[p][i] + (extra[i] if in_body else 0))
                record = max(own, keeps[p][i] + rest)
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
