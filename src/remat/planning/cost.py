"""The cost model, in one place: what each kind of plan item costs in memory and in time. No torch here.

docs/cost-model.md states the model; this module is its only statement. :class:`Costs` holds a profile's
figures in one unit — exact bytes for the simulator (:mod:`.simulate`) and the least-peak DP
(:mod:`.min_peak`), whole memory slots for the optimal DP (:mod:`.optimal`) — and one object per item
kind, which gives that kind's figures:

* its *own peak*: the most it needs at once while it runs (its forward, and its backward or its
  recomputation), above the range's held input and counting the gradient ``reserve`` that arrives from
  above (a region's sweep and a record's forward peak with it);
* what it *holds* while the items after it run (their peak adds to it);
* its *time*.

Per stage and per range the figures are precomputed arrays (``record.forward[i]``, ``region.sweep[i, j]``),
so the DPs index and vectorise over them, and :meth:`RecordCost.step` and its kin read them for one item.
The simulator walks a plan's items and adds up their :class:`Step`; the optimal DP tabulates the same
figures per range and memory slot (an item's own peak is its threshold, what it holds the shift of the
rest's table); the least-peak DP minimises them. A new item kind (an offloaded record, a chunked head) is
one class here, read by each of them.

Note: [One cost model] The three readers once carried their own copies of these formulas, kept in step
only by review. Here each term is written once over :class:`Sizes`, whose figures are exact bytes or, for
the optimal DP, slots: sizes rounded up and freed bytes rounded down, so a plan that fits in slots fits in
bytes. What the readers still differ in is stated as a *context*: a record's backward inside a region's
recomputation can need more than in the first pass (``recompute_bwd_extra_bytes``); the simulator and the
least-peak DP know which one runs (:data:`TOP`, :data:`BODY`), the optimal DP's tables do not and take the
larger (:data:`EITHER`, on the safe side).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from remat.planning.plan import Selective
from remat.planning.profile import BlockOption, Profile, Stage

__all__ = ["BODY", "EITHER", "LOOSE", "PINNED", "TOP", "Costs", "OptionCost", "RecordCost", "RegionCost",
           "SelectiveCost", "Sizes", "Step", "exact_costs"]

Ints = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]

PINNED, LOOSE = 0, 1  # is the range's input held by the caller (the user's batch, a region's saved input)?
TOP, BODY, EITHER = 0, 1, 2  # where a record's backward runs: first pass, a region's recomputation, unknown


class Step(NamedTuple):
    """One item's figures: its time before and after the items that follow it (a region's recomputation
    runs after their backward), its own peak, and what it holds while the items after it run."""

    time_s: float
    peak: int
    held: int
    time_after_s: float = 0.0


@dataclass(frozen=True)
class Sizes:
    """A chain's byte figures as per-stage arrays in one unit: ``unit == 1`` exact bytes; otherwise memory
    slots of ``unit`` bytes, sizes rounded up and bytes that are freed or released rounded down."""

    unit: int
    x: Ints  # x[i]: the input of stage i (its gradient the same); x[n] = 0, nothing after the head
    xbar: Ints  # what a recording stage keeps: output and saved tensors
    side: Ints  # long-lived side tensors and their gradients (Note [Side tensors])
    side_before: Ints  # side_before[i] = Σ_{k<i} side[k]; n + 1 entries
    of: Ints  # a recording forward's transient
    ofn: Ints  # an unrecorded forward's transient
    ob: Ints  # a backward's transient
    freed: Ints  # input_freed: a loose input the stage does not save
    released: Ints  # output_released: gone by the stage's backward
    extra: Ints  # recompute_bwd_extra: what a backward needs beyond the above inside a recomputation
    hold: Ints  # recompute_hold: live while a region ending with the stage is recomputed
    copy: Ints  # recompute_copy: what a recomputation copies for the stage (its norms' statistics)
    beside_before: Ints  # Σ_{k<i} (recompute_copy_k + side_grad_k) in bytes: a range's sum is rounded once

    @classmethod
    def from_profile(cls, profile: Profile, unit: int = 1) -> Sizes:
        st = profile.stages

        def up(values: Sequence[int]) -> Ints:
            return np.array([-(-v // unit) for v in values], dtype=np.int64)

        def down(values: Sequence[int]) -> Ints:
            return np.array([v // unit for v in values], dtype=np.int64)

        side = up([s.side for s in st])
        return cls(
            unit=unit,
            x=up([s.x_bytes for s in st] + [0]),
            xbar=up([s.xbar_bytes for s in st]),
            side=side,
            side_before=_before(side),
            of=up([s.fwd_transient_bytes for s in st]),
            ofn=up([s.fwd_nograd_transient_bytes for s in st]),
            ob=up([s.bwd_transient_bytes for s in st]),
            freed=down([s.input_freed_bytes for s in st]),
            released=down([s.output_released_bytes for s in st]),
            extra=up([s.recompute_bwd_extra_bytes for s in st]),
            hold=up([s.recompute_hold_bytes for s in st]),
            copy=up([s.recompute_copy_bytes for s in st]),
            beside_before=_before(np.array([s.recompute_copy_bytes + s.side_grad_bytes for s in st], dtype=np.int64)),
        )

    def up(self, nbytes: Ints) -> Ints:
        """Bytes in this unit, rounded up."""
        return -(-nbytes // self.unit)


def _before(values: Ints) -> Ints:
    """Prefix sums with a leading 0: ``out[i] = Σ_{k<i} values[k]``."""
    return np.concatenate([[0], np.cumsum(values)]).astype(np.int64)


class RecordCost:
    """``Record(i)``: stage ``i`` runs recording; its record lives until its backward.

    * forward: ``reserve + xbar_i + side_i + of_i``;
    * backward: ``x_i + x_{i+1} + keep_i - released_i + ob_i``, plus ``extra_i`` inside a recomputation
      (Note [Outputs at backward]);
    * holds ``keep_i = xbar_i + side_i``, less the input it frees when the input is loose;
    * time: ``fwd_s + bwd_s``.

    Note: [Outputs at backward] A stage that does not save its own output no longer holds it when its
    backward runs (``output_released_bytes``). Inside a recomputed region a stage's backward may need
    more than in the first pass (measured on GPT-2 blocks: the recomputation's last tensors are still
    live); the profile measures that per stage (``recompute_bwd_extra_bytes``) and it is charged there.

    Note: [Side tensors] A stage's long-lived side tensors (a skip connection, an encoder output, a
    position bias: ``side_bytes``) and their gradients (``side_grad_bytes``) are charged as held from the
    stage's forward to its backward, whatever the plan does to the stages that read them: a record keeps
    them beside ``xbar``, a selective item beside its option's bytes, a region's first pass makes and keeps
    those of all its stages, and a region's recomputation makes them again (its records keep them) while
    the gradients that arrived from their readers are live beside it. Conservative and plan-independent:
    the chain DPs stay chain DPs.
    """

    def __init__(self, s: Sizes, stages: Sequence[Stage]) -> None:
        self.forward: Ints = s.xbar + s.side + s.of  # [i], above the reserve
        self.keep: Ints = np.stack([s.xbar + s.side, s.xbar + s.side - s.freed])  # [pinned, i]
        plain = s.x[:-1] + s.x[1:] + self.keep - s.released + s.ob
        # [context, pinned, i]. EITHER: the larger of TOP and BODY, never below the record with its output
        # (with unequal rounding of extra and released, max(0, extra - released) is the safe margin).
        either = plain + s.released + np.maximum(0, s.extra - s.released)
        self.backward: Ints = np.stack([plain, plain + s.extra, either])
        self.fwd_s = np.array([st.fwd_s for st in stages], dtype=np.float64)
        self.bwd_s = np.array([st.bwd_s for st in stages], dtype=np.float64)
        self._forward: list[int] = self.forward.tolist()
        self._keep: list[list[int]] = self.keep.tolist()
        self._backward: list[list[list[int]]] = self.backward.tolist()
        self._time = [st.fwd_s + st.bwd_s for st in stages]

    def peak(self, i: int, reserve: int, pinned: int, context: int) -> int:
        """The record's own peak: its forward with the reserve, or its backward."""
        return max(reserve + self._forward[i], self._backward[context][pinned][i])

    def held(self, i: int, pinned: int) -> int:
        return self._keep[pinned][i]

    def time_s(self, i: int) -> float:
        return self._time[i]

    def step(self, i: int, reserve: int, pinned: int, context: int) -> Step:
        return Step(self._time[i], self.peak(i, reserve, pinned, context), self.held(i, pinned))


class RegionCost:
    """``Region(i, j, body)``: an unrecorded first pass over ``i … j-1`` keeping its output ``x_j``; after the
    items that follow it, the body recomputes from ``x_i`` with the gradient ``y_j`` (``x_j``) as its reserve.

    * sweep (the first pass): ``reserve + max_{i<=k<j} (x_k [k > i] + x_{k+1} + ofn_k + Σ_{n=i}^{k} side_n)``;
    * holds ``x_j + Σ_{n=i}^{j-1} side_n`` (the output and the side tensors its stages made);
    * body: its own peak, plus ``hold_{j-1}`` and ``Σ_{n=i}^{j-1} (copy_n + side_grad_n)`` beside it;
    * time: ``Σ_{k=i}^{j-1} region_s_k`` for the first pass, the body's after the items that follow.

    ``end[i]``: a region starting at ``i`` covers stages before ``end[i]`` at most (checkpointable stages
    that join the one before them; ``end[i] == i``: none).

    Note: [Copies in recomputation] Before a region's blocks run again, their norms' running statistics
    are copied (``recompute_copy_bytes``), and the copies are released only after the last block has
    run: a long region holds all of them at once (the profile's calibration, every block its own region,
    sees one block's copies only). They are live in the body's forwards, gone by its backwards; the body
    is charged them throughout, like ``recompute_hold``: on the safe side, by the copies when the body
    peaks in a backward, because a reserve that depends on where the region starts is not a term of the
    DPs' tables.

    The first pass makes the side tensors of the region's stages and keeps them with ``x_j``; the body,
    which runs after every reader's backward, makes them again and is charged their gradients beside it
    (Note [Side tensors]).
    """

    def __init__(self, s: Sizes, stages: Sequence[Stage]) -> None:
        n = len(stages)
        k = np.arange(n)
        after = k[None, :] >= k[:, None]  # [i, k]: stage k is in a pass that starts at i
        steps = (s.x[:n] + s.x[1:] + s.ofn + s.side_before[1:])[None, :] - s.side_before[:n, None]
        steps -= np.diag(s.x[:n])  # the pass's own input is held outside the figure
        low = np.iinfo(np.int64).min // 4
        self.sweep: Ints = np.zeros((n, n + 1), dtype=np.int64)  # [i, j], above the reserve and x_i
        self.sweep[:, 1:] = np.where(after, np.maximum.accumulate(np.where(after, steps, low), axis=1), 0)
        self.held: Ints = s.x[None, :] + s.side_before[None, :] - s.side_before[:n, None]  # [i, j]
        # beside[i, l]: beside the body of a region over i … l, rounded up once per range
        self.beside: Ints = s.hold[None, :] + s.up(np.triu(s.beside_before[None, 1:] - s.beside_before[:-1, None]))
        self.output: Ints = s.x  # output[j]: x_j, the region's output and its body's reserve
        self.region_s = [st.region_s for st in stages]
        self.region_s_before: Floats = np.concatenate([[0.0], np.cumsum(self.region_s)])
        self.side = s.side
        self.end = _region_ends(stages)

    def time_s(self, i: int, j: int) -> float:
        """What the first pass adds to the step (the body's time is its items')."""
        return sum(self.region_s[k] for k in range(i, j))

    def step(self, i: int, j: int, reserve: int, body_time_s: float, body_peak: int) -> Step:
        """The region's figures, given its body's time and own peak (with ``output[j]`` as its reserve)."""
        body = body_peak + int(self.beside[i, j - 1])
        return Step(self.time_s(i, j), max(reserve + int(self.sweep[i, j]), body), int(self.held[i, j]), body_time_s)

    def stage_held(self, i: int, j: int) -> list[int]:
        """Per stage ``i … j-1``, what it leaves live at the end of the first pass."""
        out = [int(v) for v in self.side[i:j]]
        out[-1] += int(self.output[j])
        return out


def _region_ends(stages: Sequence[Stage]) -> Ints:
    n = len(stages)
    end = np.arange(n)
    for i in range(n):
        j = i
        while j < n and stages[j].checkpointable and (j == i or stages[j].joins_previous):
            j += 1
        end[i] = j
    return end


@dataclass(frozen=True)
class OptionCost:
    """One selective option of a block, in the unit of its :class:`Sizes`."""

    item: Selective
    kept: int  # held from the first pass to the backward: the option's bytes and the stage's side tensors
    forward: int  # the first pass's peak above the reserve
    body: int  # the recomputation and backward's peak
    recompute_s: float


class SelectiveCost:
    """``Selective(i, option)``: a recording forward that keeps the option's bytes; the checkpoint holds the
    block's input. After the items that follow, the block is recomputed (its record rebuilt, as in a
    one-block region's body) and its backward runs.

    * forward: ``reserve + kept_o + side_i + of_o``;
    * body: ``max(x_{i+1} + xbar_i + of_i + copy_i,  x_i + x_{i+1} + xbar_i - released_i + ob_i +
      max(extra_i, bwd_extra_o)) + hold_i + side_i``;
    * holds ``kept_o + side_i``;
    * time: ``fwd_s + bwd_s + recompute_s_o``.

    Note: [Selective items] The backward side is the one-block region's body, ``Record(i)`` inside a
    recomputation with the gradient ``y_{i+1}`` as its reserve, plus ``recompute_hold_i``: the record is
    whole again while the backward runs (its rebuild holds the copies of its norms' statistics, Note
    [Copies in recomputation]), and never below a plain record's backward plus the option's measured
    ``bwd_extra_bytes`` (a recomputation under a policy can hold more at once than a recording forward).
    """

    def __init__(self, s: Sizes, stages: Sequence[Stage]) -> None:
        self.stages = stages
        rebuild: list[int] = (s.x[1:] + s.xbar + s.of + s.copy).tolist()  # the record rebuilt
        plain: list[int] = (s.x[:-1] + s.x[1:] + s.xbar - s.released + s.ob).tolist()  # a plain record's backward
        extra: list[int] = s.extra.tolist()
        beside: list[int] = (s.hold + s.side).tolist()
        side: list[int] = s.side.tolist()

        def cost(i: int, o: BlockOption) -> OptionCost:
            kept = -(-o.kept_bytes // s.unit) + side[i]
            body = max(rebuild[i], plain[i] + max(extra[i], -(-o.bwd_extra_bytes // s.unit))) + beside[i]
            forward = kept + -(-o.fwd_transient_bytes // s.unit)
            return OptionCost(Selective(i, o.name, o.save), kept, forward, body, o.recompute_s)

        self.options = tuple(tuple(cost(i, o) for o in st.options) for i, st in enumerate(stages))
        self.time_s = [st.fwd_s + st.bwd_s for st in stages]

    def option(self, item: Selective) -> OptionCost:
        """The figures of the item's option (:class:`remat.PlanError` when the stage has none so named)."""
        for o in self.options[item.stage]:
            if o.item.option == item.option:
                return o
        self.stages[item.stage].option(item.option)  # raises, naming the options the stage has
        raise AssertionError("unreachable")

    def step(self, item: Selective, reserve: int) -> Step:
        o = self.option(item)
        return Step(self.time_s[item.stage] + o.recompute_s, max(reserve + o.forward, o.body), o.kept)


@dataclass(frozen=True)
class Costs:
    """The cost model of one profile in one unit: its sizes and one object per item kind."""

    sizes: Sizes
    record: RecordCost
    region: RegionCost
    selective: SelectiveCost

    @classmethod
    def of(cls, profile: Profile, unit: int = 1) -> Costs:
        s = Sizes.from_profile(profile, unit)
        st = profile.stages
        return cls(s, RecordCost(s, st), RegionCost(s, st), SelectiveCost(s, st))


_EXACT: dict[int, Costs] = {}


def exact_costs(profile: Profile) -> Costs:
    """``Costs.of(profile)`` in exact bytes, made once per profile object (profiles are immutable; the
    simulator is called many times on one profile by the strategies, the frontier and the tests)."""
    key = id(profile)
    costs = _EXACT.get(key)
    if costs is None:
        costs = _EXACT[key] = Costs.of(profile)
        weakref.finalize(profile, _EXACT.pop, key, None)
    return costs

