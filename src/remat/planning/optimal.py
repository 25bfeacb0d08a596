"""The optimal persistent schedule of a heterogeneous chain, by dynamic programming. No torch here.

After Beaumont, Eyraud-Dubois, Herrmann, Joly, Shilova (2019), "Optimal checkpointing for
heterogeneous chains" — the recurrence is restated in docs/cost-model.md with the memory terms used by
:mod:`remat.planning.simulate`, so that the DP value equals the simulated time of the plan it returns.

``cost[pinned, i, l, m]`` is the least time to process stages ``i … l`` (forward, then backward) within
``m`` memory slots, the range's input ``x_i`` held outside them — *pinned* (by the caller, or by a
checkpoint region) when ``pinned == PINNED``, *loose* (the output of a recorded stage, which the next
stage may free) when ``pinned == LOOSE`` — and the gradient ``y_{l+1}`` (``x_{l+1}`` slots) counted in::

    record:  cost[p, i, l, m] = uf_i + ub_i + cost[LOOSE, i+1, l, m - keep[p, i]]
                 if m >= max(x_{l+1} + xbar_i + side_i + of_i,  x_i + x_{i+1} + keep[p, i] + ob_i + margin_i,
                             keep[p, i])
                 (i == l: uf_i + ub_i, under the same condition)
    region:  cost[p, i, l, m] = Σ_{k=i}^{j-1} region_s_k + cost[LOOSE, j, l, m - x_j - side_{i,j}]
                                + cost[PINNED, i, j-1, m - hold_{j-1} - copy_{i,j} - side_grad_{i,j}]
                 for j in i+1 … min(l, region_end[i]),  if m >= max(x_{l+1} + sweep[i, j],  x_j + side_{i,j})
    option:  cost[p, i, l, m] = uf_i + ub_i + r_{i,k} + cost[LOOSE, i+1, l, m - kept_{i,k} - side_i]
                 if m >= max(x_{l+1} + kept_{i,k} + side_i + of_{i,k},  body_i,  body_{i,k},  kept_{i,k} + side_i)
                 for each selective option k of block i (i == l: uf_i + ub_i + r_{i,k})
    cost[p, i, l, m] = the smallest of these;  answer: cost[PINNED, 0, L, S]

``side_i`` is stage ``i``'s long-lived side tensors and their gradients, ``side_{i,j}`` (``side_grad_{i,j}``)
the sum over ``i … j-1`` (Note [Side tensors] in :mod:`remat.planning.simulate`); ``keep[p, i]`` is what
``Record(i)`` holds while the rest of the range runs: ``xbar_i + side_i``, less the input it frees when the
input is loose; ``sweep[i, j]`` the peak of the region's unrecorded first pass (side tensors included);
``copy_{i,j} = Σ_{k=i}^{j-1} recompute_copy_k`` what the region's recomputation copies (norm statistics),
charged beside its body as the simulator charges it (Note [Copies in recomputation]);
``region_end[i]`` how far a region starting at ``i`` may reach (checkpointable stages that join).
An option (a :class:`remat.BlockOption`: block ``i`` in its own checkpoint with a selective policy)
keeps ``kept_{i,k}`` bytes and adds ``r_{i,k}`` seconds; ``body_i`` is the peak of its backward, the
record rebuilt (``max(x_{i+1} + xbar_i + of_i + copy_i, x_i + x_{i+1} + xbar_i - released_i + extra_i + ob_i) +
hold_i + side_i``, as :func:`remat.planning.simulate._selective` counts it), never below ``body_{i,k} = x_i +
x_{i+1} + xbar_i - released_i + ob_i + bwd_extra_{i,k} + hold_i + side_i`` (the option's measured backward peak).

Memory is discretised into slots of ``delta = floor(M / slots)`` bytes, where ``M`` is the budget less
:attr:`Profile.base_bytes` (fixed memory, the input, the head's residual); every size is rounded *up* to
whole slots, so a plan the DP calls feasible never exceeds the real budget. One refinement of the
simulator is taken on the safe side: a stage's backward is charged ``margin_i = max(0,
recompute_bwd_extra - output_released)`` whether it runs in the first pass or inside a recomputation, so
the DP may call a plan infeasible that the simulator, which decides, lets through (the ``optimal``
strategy also simulates the baselines and the smallest-peak plan). Time is O(L^3 * slots), vectorised
over the slot axis and the split point ``j``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from remat.planning.plan import Item, Record, Region, Selective
from remat.planning.profile import Profile

__all__ = ["LOOSE", "PINNED", "RECORD", "Table", "solve_table"]

INF = float("inf")
PINNED, LOOSE = 0, 1  # the first index of cost and decision: is the range's input held by the caller?
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
    # side_before[i]: slots of the side tensors of stages before i, which a region i..j-1 holds as side_before[j] - [i]
    side_before: Ints = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

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
                m -= int(self.x[j]) + (int(self.side_before[j] - self.side_before[i]) if self.side_before.size else 0)
                i = j
            pinned = LOOSE


@dataclass(frozen=True)
class _Chain:
    """The chain's sizes in whole slots (rounded up; bytes that are freed or released rounded down)."""

    x: Ints  # x[i]: input of stage i; x[n] = 0, nothing after the head
    xbar: Ints
    side: Ints  # side[i]: stage i's side tensors and their gradients
    side_before: Ints  # side_before[i] = Σ_{k<i} side[k] (n + 1 entries)
    keep: Ints  # keep[pinned, i]
    margin: Ints  # what a backward may need beyond the chain model, on the safe side (module docstring)
    beside: Ints  # beside[i, l]: beside a region i..l's body, what its end holds and the copies it makes
    of: Ints
    ob: Ints
    step_s: Floats  # uf_i + ub_i
    region_s_before: npt.NDArray[np.float64]  # Σ_{k<i} region_s_k: what regions add, per stage
    region_end: Ints  # regions starting at i may end before any j <= region_end[i]
    sweep: Ints  # sweep[i, j]: peak above held x_i of an unrecorded pass over i..j-1
    body: Ints  # body[i]: the peak of a selective option's backward, its record rebuilt
    options: tuple[tuple[_Option, ...], ...]  # per stage, its selective options in slots


@dataclass(frozen=True)
class _Option:
    item: Selective
    kept: int  # slots kept from the first pass to the backward, output and side tensors included
    of: int  # slots above kept during the first pass
    extra_s: float  # recompute_s
    body: int  # slots its backward needs beyond the stage's body: a plain backward plus bwd_extra_bytes


def _up(values: list[int], delta: int) -> Ints:
    return np.array([-(-v // delta) for v in values], dtype=np.int64)


def _down(values: list[int], delta: int) -> Ints:
    return np.array([v // delta for v in values], dtype=np.int64)


def _chain_in_slots(profile: Profile, delta: int) -> _Chain:
    st = profile.stages
    x = _up([s.x_bytes for s in st] + [0], delta)
    xbar = _up([s.xbar_bytes for s in st], delta)
    freed = _down([s.input_freed_bytes for s in st], delta)
    # The simulator charges -released in the first pass and -released + extra inside recomputation;
    # the DP, which does not track which one it is in, charges the larger: max(0, extra - released).
    released = _down([s.output_released_bytes for s in st], delta)
    extra = _up([s.recompute_bwd_extra_bytes for s in st], delta)
    uf = np.array([s.fwd_s for s in st], dtype=np.float32)
    ub = np.array([s.bwd_s for s in st], dtype=np.float32)
    of = _up([s.fwd_transient_bytes for s in st], delta)
    ob = _up([s.bwd_transient_bytes for s in st], delta)
    hold = _up([s.recompute_hold_bytes for s in st], delta)
    side = _up([s.side for s in st], delta)
    plain_backward = x[:-1] + x[1:] + xbar - released + ob
    own_copy = _up([s.recompute_copy_bytes for s in st], delta)  # a selective rebuild copies its norms' statistics
    body = np.maximum(x[1:] + xbar + of + own_copy, plain_backward + extra) + hold + side
    options = tuple(
        tuple(_Option(Selective(i, o.name, o.save), -(-o.kept_bytes // delta) + int(side[i]),
                      -(-o.fwd_transient_bytes // delta), o.recompute_s,
                      int(plain_backward[i] + hold[i] + side[i]) + -(-o.bwd_extra_bytes // delta))
              for o in s.options)
        for i, s in enumerate(st)
    )
    side_before = np.concatenate([[0], np.cumsum(side)]).astype(np.int64)
    return _Chain(
        x=x,
        xbar=xbar,
        side=side,
        side_before=side_before,
        keep=np.stack([xbar + side, xbar + side - freed]),
        margin=np.maximum(0, extra - released),
        beside=hold[None, :] + -(-beside_bytes(profile) // delta),
        of=of,
        ob=ob,
        step_s=uf + ub,
        region_s_before=np.concatenate([[0.0], np.cumsum([s.region_s for s in st])]),
        region_end=region_ends(profile),
        sweep=_sweeps(x, _up([s.fwd_nograd_transient_bytes for s in st], delta), side_before),
        body=body,
        options=options,
    )


def beside_bytes(profile: Profile) -> Ints:
    """``beside[i, l]``: bytes live beside the body of a region over stages ``i … l`` besides what its end
    holds: the copies its recomputation makes and the gradients of its stages' side tensors,
    Σ_{k=i}^{l} (recompute_copy_k + side_grad_k) (zero where ``l < i``)."""
    return _range_sums([s.recompute_copy_bytes + s.side_grad_bytes for s in profile.stages])


def _range_sums(values: list[int]) -> Ints:
    cum = np.concatenate([[0], np.cumsum(values)]).astype(np.int64)
    return np.triu(cum[None, 1:] - cum[:-1, None])


def region_ends(profile: Profile) -> Ints:
    """``end[i]``: a region starting at stage ``i`` may cover stages up to ``end[i] - 1`` (``end[i] == i``:
    stage ``i`` cannot start one) — checkpointable stages that join the stage before them."""
    st = profile.stages
    n = len(st)
    end = np.arange(n)
    for i in range(n):
        j = i
        while j < n and st[j].checkpointable and (j == i or st[j].joins_previous):
            j += 1
        end[i] = j
    return end


def _sweeps(x: Ints, ofn: Ints, side_before: Ints) -> Ints:
    """``sweep[i, j]``: peak above the held ``x_i`` of an unrecorded pass over ``i … j-1``, the side tensors
    of ``i … k`` live at stage ``k``."""
    n = len(ofn)
    sweep = np.zeros((n, n + 1), dtype=np.int64)
    for i in range(n):
        steps = x[i:n] + x[i + 1 : n + 1] + ofn[i:n] + side_before[i + 1 : n + 1] - side_before[i]
        steps[0] -= x[i]  # the pass's own input is held outside the figure
        sweep[i, i + 1 :] = np.maximum.accumulate(steps)
    return sweep


def solve_table(profile: Profile, activation_bytes: int, slots: int = 500) -> Table:
    """Solve the DP for a chain whose activations (all but :attr:`Profile.base_bytes`) get
    ``activation_bytes``, in ``slots`` slots (the table is wider when records free more than they keep)."""
    if activation_bytes < 0:
        raise ValueError("activation_bytes must be >= 0")
    n = len(profile.stages)
    delta = max(1, activation_bytes // max(1, slots))
    budget = activation_bytes // delta
    chain = _chain_in_slots(profile, delta)
    # A record may hold fewer bytes than the input it frees (negative keep): the rest of the range then
    # has more room than the range itself, so the table extends past the budget by the total of such
    # gains (capped at the budget). The answer is still read at slot count ``budget``.
    width = budget + min(budget, int(np.maximum(0, -chain.keep[LOOSE]).sum()))
    dp = _Solver(chain, n, width)
    for l in range(n):
        for i in range(l, -1, -1):
            dp.solve_range(i, l)
    options = tuple(tuple((o.item, o.kept) for o in per) for per in chain.options)
    return Table(cost=dp.cost, decision=dp.decision, delta=delta, slots=budget, x=chain.x, keep=chain.keep,
                 width=width, beside=chain.beside, options=options, side_before=chain.side_before)


class _Solver:
    """The tables of the DP, filled range by range: ranges ending at ``l`` after every range ending
    before ``l``, and for a given ``l`` from ``i = l`` down, so that each range finds what it needs."""

    def __init__(self, chain: _Chain, n: int, width: int) -> None:
        self.chain, self.width = chain, width
        shape = (n, n, width + 1)
        self.cost: Floats = np.full((2, *shape), INF, dtype=np.float32)
        self.decision = np.zeros((2, *shape), dtype=np.int32)
        # rest_after_region[l, j, m] = cost[LOOSE, j, l, m - x_j]: the rest j..l beside a region's output x_j
        self.rest_after_region: Floats = np.full(shape, INF, dtype=np.float32)
        # recompute[i, l, m] = cost[PINNED, i, l, m - beside[i, l]]: a region's body, beside what its end
        # holds and the copies its recomputation makes
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
        x_i, beside = int(self.chain.x[i]), int(self.chain.beside[i, l])
        if x_i <= top:
            self.rest_after_region[l, i, x_i:] = self.cost[LOOSE, i, l, : top + 1 - x_i]
        if beside <= top:
            self.recompute[i, l, beside:] = self.cost[PINNED, i, l, : top + 1 - beside]

    def _best_region(self, i: int, l: int) -> tuple[Floats, npt.NDArray[np.int32]]:
        """Per slot count, the cheapest region ``i … j-1`` followed by ``j … l``, and its ``j`` (0: none).
        The same whether ``x_i`` is pinned or loose: the region holds it."""
        c, top = self.chain, self.width
        region = np.full(top + 1, INF, dtype=np.float32)
        choice = np.zeros(top + 1, dtype=np.int32)
        j_last = min(l, int(c.region_end[i]))
        if j_last < i + 1:
            return region, choice
        js = np.arange(i + 1, j_last + 1)
        sides = c.side_before[js] - c.side_before[i]  # what the region holds beside x_j: its side tensors
        options = self._rest_after(l, i, j_last, sides) + self.recompute[i, i:j_last]  # [j, m]
        options += (c.region_s_before[js] - c.region_s_before[i])[:, None]
        needs = np.minimum(top + 1, np.maximum(c.x[l + 1] + c.sweep[i, js], c.x[js] + sides))
        options += self.below[needs]
        best = np.argmin(options, axis=0)
        region = np.take_along_axis(options, best[None, :], axis=0)[0]
        choice = np.where(np.isfinite(region), js[best], 0).astype(np.int32)
        return region, choice

    def _rest_after(self, l: int, i: int, j_last: int, sides: Ints) -> Floats:
        """``[j, m]``: the rest ``j … l`` beside a region ``i … j-1``'s output and side tensors, for ``j`` in
        ``i+1 … j_last``: ``rest_after_region[l, j, m - sides[j]]`` (``sides`` never decreases in ``j``: one
        shifted slice per run of equal values, few where few stages make side tensors)."""
        rest = self.rest_after_region[l, i + 1 : j_last + 1]
        if sides[-1] == 0:
            return rest
        out = np.full_like(rest, INF)
        cuts = [0, *(np.nonzero(np.diff(sides))[0] + 1).tolist(), len(sides)]
        for a, b in zip(cuts, cuts[1:]):
            d = int(sides[a])
            if d <= self.width:
                out[a:b, d:] = rest[a:b, : self.width + 1 - d]
        return out

    def _best_option(self, i: int, l: int) -> tuple[Floats, npt.NDArray[np.int32]]:
        """Per slot count, the cheapest selective option of stage ``i`` followed by ``i+1 … l``, and its
        decision code (0: none). The same whether ``x_i`` is pinned or loose: the checkpoint holds it."""
        c, top = self.chain, self.width
        best = np.full(top + 1, INF, dtype=np.float32)
        choice = np.zeros(top + 1, dtype=np.int32)
        for k, o in enumerate(c.options[i]):
            needs = max(c.x[l + 1] + o.kept + o.of, int(c.body[i]), o.body, o.kept, 0)
            cost = self._then_rest(i, l, needs, o.kept, np.float32(c.step_s[i] + np.float32(o.extra_s)))
            better = cost < best
            best = np.where(better, cost, best)
            choice = np.where(better, OPTION - k, choice).astype(np.int32)
        return best, choice

    def _record(self, pinned: int, i: int, l: int) -> Floats:
        """Per slot count, the cost of recording stage ``i`` and then processing ``i+1 … l``."""
        c = self.chain
        keep = int(c.keep[pinned, i])
        needs = max(c.x[l + 1] + c.xbar[i] + c.side[i] + c.of[i], c.x[i] + c.x[i + 1] + keep + c.ob[i] + c.margin[i],
                    keep, 0)
        return self._then_rest(i, l, needs, keep, c.step_s[i])

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
