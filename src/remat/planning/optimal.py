"""The optimal persistent schedule of a heterogeneous chain, by dynamic programming. No torch here.

After Beaumont, Eyraud-Dubois, Herrmann, Joly, Shilova (2019), "Optimal checkpointing for
heterogeneous chains". The figures it tabulates are the cost model's (:mod:`remat.planning.cost`, the
same the simulator adds up), in memory slots, so that the DP value equals the simulated time of the plan
it returns.

``cost[pinned, i, l, m]`` is the least time to process stages ``i … l`` (forward, then backward) within
``m`` memory slots, the range's input ``x_i`` held outside them — *pinned* (by the caller, or by a
checkpoint region) when ``pinned == PINNED``, *loose* (the output of a recorded stage, which the next
stage may free) when ``pinned == LOOSE`` — and the gradient ``y_{l+1}`` (``x_{l+1}`` slots, the range's
*reserve*) counted in. Each item kind gives its own peak ``peak(reserve)``, what it ``holds`` while the
rest of the range runs, and its time::

    item then rest:  cost[p, i, l, m] = time(item) + cost[LOOSE, next, l, m - held(item)]
                         if m >= max(peak(item, x_{l+1}),  held(item))
                         (the item ends the range: time(item), under the same condition)
       Record(i):    next = i + 1; its backward charged as in either context (cost.EITHER)
       Selective(i, k): next = i + 1, for each option k of block i
       Region(i, j): next = j, for j in i+1 … min(l, region_end[i]); time(item) adds the body's
                     cost[PINNED, i, j-1, m - beside[i, j-1]] (what is live beside the body: what its end
                     holds, the copies its recomputation makes, its stages' side gradients)
    cost[p, i, l, m] = the smallest of these;  answer: cost[PINNED, 0, L, S]

Memory is discretised into slots of ``delta = floor(M / slots)`` bytes, where ``M`` is the budget less
:attr:`Profile.base_bytes` (fixed memory, the input, the head's residual); every size is rounded *up* to
whole slots (freed bytes down), so a plan the DP calls feasible never exceeds the real budget. One
refinement of the simulator is taken on the safe side: a stage's backward is charged ``margin_i = max(0,
recompute_bwd_extra - output_released)`` whether it runs in the first pass or inside a recomputation, so
the DP may call a plan infeasible that the simulator, which decides, lets through (the ``optimal``
strategy also simulates the baselines and the smallest-peak plan). Time is O(L^3 * slots), vectorised
over the slot axis and the split point ``j``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from remat.planning.cost import EITHER, LOOSE, PINNED, Costs
from remat.planning.plan import Item, Record, Region, Selective
from remat.planning.profile import Profile

__all__ = ["LOOSE", "PINNED", "RECORD", "Table", "solve_table"]

INF = float("inf")
RECORD = -1  # decision code: record stage i; 0 = infeasible; j > 0 = checkpoint region i..j-1;
# OPTION - k (k >= 0): run stage i with its option k
OPTION = -2

Ints = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float32]


@dataclass
class Table:
    """The solved DP: ``cost[pinned, i, l, m]`` and ``decision[pinned, i, l, m]`` for every range ``i … l``
    and slot count ``m`` (see the module docstring)."""

    cost: Floats
    decision: npt.NDArray[np.int32]
    delta: int
    slots: int
    x: Ints
    keep: Ints  # keep[pinned, i]: slots a record of stage i holds for the rest of the range
    width: int = 0  # the table's last slot index (>= slots when records can free more than they keep)
    # beside[i, l]: slots live beside the body of a region i..l while it recomputes (hold_l + copy_{i,l+1})
    beside: Ints = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))
    # options[i]: per option of stage i, (the Selective item that runs it, the slots it keeps)
    options: tuple[tuple[tuple[Selective, int], ...], ...] = ()
    # held[i, j]: slots a region i..j-1 holds while the rest runs (its output x_j and its side tensors)
    held: Ints = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))

    def feasible_slots(self) -> Ints:
        """Slot counts at which the whole chain is feasible."""
        n = self.cost.shape[1]
        return np.nonzero(np.isfinite(self.cost[PINNED, 0, n - 1, : self.slots + 1]))[0]

    def items(self, m: int) -> tuple[Item, ...]:
        """The plan for the whole chain within ``m`` slots."""
        n = self.cost.shape[1]
        return self._items(PINNED, 0, n - 1, m)

    def _items(self, pinned: int, i: int, l: int, m: int) -> tuple[Item, ...]:
        out: list[Item] = []
        while True:
            choice = int(self.decision[pinned, i, l, m])
            if choice == 0:
                raise AssertionError(f"no feasible decision for stages {i}..{l} in {m} slots")
            if choice <= RECORD:
                item: Item = Record(i)
                keep = int(self.keep[pinned, i])
                if choice < RECORD:
                    item, keep = self.options[i][OPTION - choice]
                out.append(item)
                if i == l:
                    return tuple(out)
                m = min(self.width, m - keep)
                i += 1
            else:  # a region i..j-1, then the rest from j
                j = choice
                out.append(Region(i, j, self._items(PINNED, i, j - 1, m - int(self.beside[i, j - 1]))))
                m -= int(self.held[i, j]) if self.held.size else int(self.x[j])
                i = j
            pinned = LOOSE


def solve_table(profile: Profile, activation_bytes: int, slots: int = 500) -> Table:
    """Solve the DP for a chain whose activations (all but :attr:`Profile.base_bytes`) get
    ``activation_bytes``, in ``slots`` slots (the table is wider when records free more than they keep)."""
    if activation_bytes < 0:
        raise ValueError("activation_bytes must be >= 0")
    n = len(profile.stages)
    delta = max(1, activation_bytes // max(1, slots))
    budget = activation_bytes // delta
    costs = Costs.of(profile, delta)
    keep = costs.record.keep
    # A record may hold fewer bytes than the input it frees (negative keep): the rest of the range then
    # has more room than the range itself, so the table extends past the budget by the total of such
    # gains (capped at the budget). The answer is still read at slot count ``budget``.
    width = budget + min(budget, int(np.maximum(0, -keep[LOOSE]).sum()))
    dp = _Solver(costs, n, width)
    for l in range(n):
        for i in range(l, -1, -1):
            dp.solve_range(i, l)
    options = tuple(tuple((o.item, o.kept) for o in per) for per in costs.selective.options)
    return Table(cost=dp.cost, decision=dp.decision, delta=delta, slots=budget, x=costs.sizes.x, keep=keep,
                 width=width, beside=costs.region.beside, options=options, held=costs.region.held)


class _Solver:
    """The tables of the DP, filled range by range: ranges ending at ``l`` after every range ending
    before ``l``, and for a given ``l`` from ``i = l`` down, so that each range finds what it needs."""

    def __init__(self, costs: Costs, n: int, width: int) -> None:
        self.costs, self.width = costs, width
        self.reserve = costs.sizes.x  # reserve[l + 1]: the gradient arriving at a range that ends at l
        self.step_s: Floats = (costs.record.fwd_s.astype(np.float32) + costs.record.bwd_s.astype(np.float32))
        shape = (n, n, width + 1)
        self.cost: Floats = np.full((2, *shape), INF, dtype=np.float32)
        self.decision = np.zeros((2, *shape), dtype=np.int32)
        # rest_after_region[l, j, m] = cost[LOOSE, j, l, m - x_j]: the rest j..l beside a region's output x_j
        self.rest_after_region: Floats = np.full(shape, INF, dtype=np.float32)
        # recompute[i, l, m] = cost[PINNED, i, l, m - beside[i, l]]: a region's body, beside what its end
        # holds, the copies its recomputation makes and its stages' side gradients
        self.recompute: Floats = np.full(shape, INF, dtype=np.float32)
        # below[t, m] is INF for m < t, 0 from t on: adding below[threshold] masks too-small slot counts
        ms = np.arange(width + 1)
        self.below: Floats = np.where(ms[None, :] < np.arange(width + 2)[:, None], INF, 0.0).astype(np.float32)

    def solve_range(self, i: int, l: int) -> None:
        """Fill ``cost[:, i, l]`` and ``decision[:, i, l]``; then the shifted copies later ranges read."""
        region, region_choice = self._best_region(i, l)
        option, option_choice = self._best_option(i, l)
        better = option < region
        region = np.where(better, option, region)
        region_choice = np.where(better, option_choice, region_choice)
        for pinned in (PINNED, LOOSE):
            record = self._record(pinned, i, l)
            better = region < record
            self.cost[pinned, i, l] = np.where(better, region, record)
            self.decision[pinned, i, l] = np.where(better, region_choice, np.where(np.isfinite(record), RECORD, 0))
        top = self.width
        x_i, beside = int(self.costs.region.output[i]), int(self.costs.region.beside[i, l])
        if x_i <= top:
            self.rest_after_region[l, i, x_i:] = self.cost[LOOSE, i, l, : top + 1 - x_i]
        if beside <= top:
            self.recompute[i, l, beside:] = self.cost[PINNED, i, l, : top + 1 - beside]

    def _best_region(self, i: int, l: int) -> tuple[Floats, npt.NDArray[np.int32]]:
        """Per slot count, the cheapest region ``i … j-1`` followed by ``j … l``, and its ``j`` (0: none).
        The same whether ``x_i`` is pinned or loose: the region holds it."""
        r, top = self.costs.region, self.width
        region = np.full(top + 1, INF, dtype=np.float32)
        choice = np.zeros(top + 1, dtype=np.int32)
        j_last = min(l, int(r.end[i]))
        if j_last < i + 1:
            return region, choice
        js = np.arange(i + 1, j_last + 1)
        held = r.held[i, js]
        options = self._rest_after(l, i, j_last, held - r.output[js]) + self.recompute[i, i:j_last]  # [j, m]
        options += (r.region_s_before[js] - r.region_s_before[i])[:, None]
        needs = np.minimum(top + 1, np.maximum(self.reserve[l + 1] + r.sweep[i, js], held))
        options += self.below[needs]
        best = np.argmin(options, axis=0)
        region = np.take_along_axis(options, best[None, :], axis=0)[0]
        choice = np.where(np.isfinite(region), js[best], 0).astype(np.int32)
        return region, choice

    def _rest_after(self, l: int, i: int, j_last: int, beyond: Ints) -> Floats:
        """``[j, m]``: the rest ``j … l`` beside a region ``i … j-1``, for ``j`` in ``i+1 … j_last``:
        ``rest_after_region[l, j, m - beyond[j]]``, where ``beyond`` is what the region holds besides its
        output (its side tensors; never decreasing in ``j``: one shifted slice per run of equal values, few
        where few stages make side tensors, none in a chain without them)."""
        rest = self.rest_after_region[l, i + 1 : j_last + 1]
        if not beyond.any():
            return rest
        out = np.full_like(rest, INF)
        cuts = [0, *(np.nonzero(np.diff(beyond))[0] + 1).tolist(), len(beyond)]
        for a, b in zip(cuts, cuts[1:]):
            d = int(beyond[a])
            if d <= self.width:
                out[a:b, d:] = rest[a:b, : self.width + 1 - d]
        return out

    def _best_option(self, i: int, l: int) -> tuple[Floats, npt.NDArray[np.int32]]:
        """Per slot count, the cheapest selective option of stage ``i`` followed by ``i+1 … l``, and its
        decision code (0: none). The same whether ``x_i`` is pinned or loose: the checkpoint holds it."""
        top = self.width
        best = np.full(top + 1, INF, dtype=np.float32)
        choice = np.zeros(top + 1, dtype=np.int32)
        for k, o in enumerate(self.costs.selective.options[i]):
            needs = max(int(self.reserve[l + 1]) + o.forward, o.body, o.kept, 0)
            cost = self._then_rest(i, l, needs, o.kept, np.float32(self.step_s[i] + np.float32(o.recompute_s)))
            better = cost < best
            best = np.where(better, cost, best)
            choice = np.where(better, OPTION - k, choice).astype(np.int32)
        return best, choice

    def _record(self, pinned: int, i: int, l: int) -> Floats:
        """Per slot count, the cost of recording stage ``i`` and then processing ``i+1 … l``."""
        rec = self.costs.record
        keep = rec.held(i, pinned)
        needs = max(rec.peak(i, int(self.reserve[l + 1]), pinned, EITHER), keep, 0)
        return self._then_rest(i, l, needs, keep, self.step_s[i])

    def _then_rest(self, i: int, l: int, needs: int, keep: int, step_s: np.float32) -> Floats:
        """Per slot count ``m >= needs``: ``step_s`` plus the cost of ``i+1 … l`` in ``m - keep`` slots."""
        top = self.width
        record = np.full(top + 1, INF, dtype=np.float32)
        if needs > top:
            return record
        if i == l:
            record[needs:] = step_s
            return record
        # record[m] = cost[LOOSE, i+1, l, min(top, m - keep)] + uf_i + ub_i, for m >= needs
        rest = self.cost[LOOSE, i + 1, l]
        if needs - keep <= top:
            record[needs : top + 1 - max(0, -keep)] = rest[needs - keep : top + 1 - max(0, keep)]
        record[max(needs, top + 1 + min(0, keep)) :] = rest[top]
        record[needs:] += step_s
        return record
