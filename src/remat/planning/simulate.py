"""Predict the peak memory and the time of a plan under the chain cost model. No torch here.

The model (docs/cost-model.md): a range of stages ``i … l`` is processed with its input ``x_i`` held by
the caller and the gradient ``y_{l+1}`` (``x_{l+1}`` bytes) arriving from above counted in. The input
of a range is *pinned* (held by the caller: the user's batch, or a checkpoint region's saved input);
the input of every later item is *loose*: a recorded stage that does not save its input frees it. The
optimal planner minimises exactly this model, so its simulated time equals its DP value.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from typing import NamedTuple

from remat.planning.plan import Item, Plan, Prediction, Record, Region, Selective
from remat.planning.profile import Profile

__all__ = ["every_digest", "every_items", "safety_bytes", "simulate", "sweep_bytes", "with_measured_every"]


def sweep_bytes(profile: Profile, start: int, stop: int) -> int:
    """Peak (above the held input ``x_start``) of an unrecorded pass over stages ``start … stop-1``: at
    stage ``k``, its input and output, its transient, and the side tensors of ``start … k`` (Note [Side
    tensors])."""
    st = profile.stages
    best, sides = 0, 0
    for k in range(start, stop):
        held_in = st[k].x_bytes if k > start else 0
        sides += st[k].side
        best = max(best, held_in + profile.output_bytes(k) + st[k].fwd_nograd_transient_bytes + sides)
    return best


def _seq(profile: Profile, items: Sequence[Item], reserve: int, top: bool = True) -> tuple[float, int]:
    """(time, peak above the held input) of ``items``, whose first input is pinned, with ``reserve``
    bytes of incoming gradient; ``top`` for the first pass, False inside a region's recomputation.

    Walks the items from the last to the first: the peak of a suffix is needed to know the peak of the
    item before it, which holds its own record (or its region's output) while the suffix runs.
    """
    time_rest, peak_rest = 0.0, 0
    for pos in range(len(items) - 1, -1, -1):
        item = items[pos]
        if isinstance(item, Record):
            step = _record(profile, item.stage, reserve, pinned=pos == 0, top=top)
        elif isinstance(item, Region):
            step = _region(profile, item, reserve)
        elif isinstance(item, Selective):
            step = _selective(profile, item, reserve)
        else:
            raise TypeError(f"simulate: unknown plan item {item!r}")
        time_rest = step.time_s + time_rest + step.time_after_s
        peak_rest = max(step.peak, step.held + peak_rest)
    return time_rest, peak_rest


class _Step(NamedTuple):
    """One item's figures: its time before and after the items that follow it (a region's recomputation
    runs after their backward), its own peak above the held input, and what it holds while the items
    after it run (their peak adds to it)."""

    time_s: float
    peak: int
    held: int
    time_after_s: float = 0.0


def _record(profile: Profile, i: int, reserve: int, *, pinned: bool, top: bool) -> _Step:
    """``Record(i)``: the recording forward, then (after the rest) its backward.

    Note: [Outputs at backward] A stage that does not save its own output no longer holds it when its
    backward runs (``output_released_bytes``). Inside a recomputed region a stage's backward may need
    more than in the first pass (measured on GPT-2 blocks: the recomputation's last tensors are still
    live); the profile measures that per stage (``recompute_bwd_extra_bytes``) and it is charged there.

    Note: [Side tensors] A stage's long-lived side tensors (a skip connection, an encoder output, a
    position bias: ``side_bytes``) and their gradients (``side_grad_bytes``) are charged as held from the
    stage's forward to its backward, whatever the plan does to the stages that read them: a record keeps
    them beside ``xbar``, a region's first pass makes and keeps those of all its stages, and a region's
    recomputation makes them again (its records keep them) while the gradients that arrived from their
    readers are live beside it. Conservative and plan-independent: the chain DPs stay chain DPs.
    """
    s = profile.stages[i]
    keep = s.xbar_bytes + s.side - (0 if pinned else s.input_freed_bytes)  # a loose input it does not save is freed
    forward = reserve + s.xbar_bytes + s.side + s.fwd_transient_bytes
    extra = 0 if top else s.recompute_bwd_extra_bytes
    backward = (s.x_bytes + profile.output_bytes(i) + keep - s.output_released_bytes + extra
                + s.bwd_transient_bytes)
    return _Step(s.fwd_s + s.bwd_s, max(forward, backward), keep)


def _region(profile: Profile, item: Region, reserve: int) -> _Step:
    """``Region(i, j, body)``: an unrecorded sweep over ``i … j-1`` keeping ``x_j``; after the rest, the
    body recomputes from ``x_i`` with the gradient ``y_j`` (``x_j`` bytes) as its reserve.

    Note: [Copies in recomputation] Before a region's blocks run again, their norms' running statistics
    are copied (``recompute_copy_bytes``), and the copies are released only after the last block has
    run: a long region holds all of them at once (the profile's calibration, every block its own region,
    sees one block's copies only). They are live in the body's forwards, gone by its backwards; the body
    is charged them throughout, like ``recompute_hold``: on the safe side, by the copies when the body
    peaks in a backward, because the DPs charge them so (a reserve that depends on where the region
    starts is not a term of their tables) and must agree with this simulator.

    The first pass makes the side tensors of the region's stages and keeps them with ``x_j``; the body,
    which runs after every reader's backward, makes them again and is charged their gradients beside it
    (Note [Side tensors]).
    """
    i, j = item.start, item.stop
    st = profile.stages
    sweep = reserve + sweep_bytes(profile, i, j)
    x_j = profile.output_bytes(j - 1)
    time_body, peak_body = _seq(profile, item.body, x_j, False)
    peak_body += st[j - 1].recompute_hold_bytes + sum(st[k].recompute_copy_bytes + st[k].side_grad_bytes
                                                      for k in range(i, j))
    time_sweep = sum(st[k].region_s for k in range(i, j))
    return _Step(time_sweep, max(sweep, peak_body), x_j + sum(st[k].side for k in range(i, j)), time_body)


def _selective(profile: Profile, item: Selective, reserve: int) -> _Step:
    """``Selective(i, option)``: a recording forward that keeps the option's bytes (its output and the
    outputs of the ops it saves); the checkpoint holds the block's input. After the rest, the block is
    recomputed (its record rebuilt, as in a one-block region's body) and its backward runs.

    Note: [Selective items] The backward side is the one-block region's body, ``Record(i)`` inside a
    recomputation with the gradient ``y_{i+1}`` as its reserve, plus ``recompute_hold_i``: the record is
    whole again while the backward runs (its rebuild holds the copies of its norms' statistics, Note
    [Copies in recomputation]), and never below a plain record's backward plus the option's
    measured ``bwd_extra_bytes`` (a recomputation under a policy can hold more at once than a recording
    forward). Time: one recorded forward, the backward, and the option's ``recompute_s``.
    """
    i = item.stage
    s = profile.stages[i]
    option = s.option(item.option)
    x_out = profile.output_bytes(i)
    forward = reserve + option.kept_bytes + s.side + option.fwd_transient_bytes
    rebuild = x_out + s.xbar_bytes + s.fwd_transient_bytes + s.recompute_copy_bytes  # its norms' statistics
    plain_backward = s.x_bytes + x_out + s.xbar_bytes - s.output_released_bytes + s.bwd_transient_bytes
    backward = plain_backward + max(s.recompute_bwd_extra_bytes, option.bwd_extra_bytes)
    body = max(rebuild, backward) + s.recompute_hold_bytes + s.side  # Note [Side tensors]
    return _Step(s.fwd_s + s.bwd_s + option.recompute_s, max(forward, body), option.kept_bytes + s.side)


def safety_bytes(profile: Profile, items: Sequence[Item], peak: int) -> int:
    """What the prediction adds to the chain model's activation ``peak`` of ``items``.

    Note: [Safety margin] A measured profile's predictions are raised by ``safety_fraction`` of the
    activation peak: the chain model extrapolates from the runs the profiler made to plans it never ran.
    One plan it did run: every block its own region, the calibration run (Note [Calibrating
    recomputation]), whose peak above ``base_bytes`` it keeps in ``meta["measured_every_act_bytes"]``
    (unattributed bytes, which the profile adds to the head's residual, already taken out). That plan is
    charged its measured peak, or the model's where higher, and no margin: with a margin, a budget set
    to Hugging Face's every-layer checkpointing's own peak would refuse that very schedule. Only while the
    profile's stages are the ones measured (:func:`every_digest`: a per-rank FSDP profile, whose blocks
    carry the unsharded parameters' bytes, keeps the margin), and only for a plan run on the device: with
    measured sizes, or with sizes from a fake copy when the profiler also ran the plan on the device
    (``meta["every_on_device"]``), where the measured peak alone is charged (the fake copy may keep more
    than the device's step, e.g. an attention mask the device's step skips).
    """
    measured = profile.meta.get("measured_every_act_bytes")
    if (isinstance(measured, int) and len(items) == len(profile.stages) and tuple(items) == every_items(profile)
            and profile.meta.get("measured_every_digest") == every_digest(profile)):
        # Sizes from a fake copy (which may keep more: a mask the device's step skips) with this plan run on the
        # device: its measured peak is exact.
        return measured - peak if profile.meta.get("every_on_device") else max(0, measured - peak)
    return math.ceil(profile.safety_fraction * max(0, peak))


def every_digest(profile: Profile) -> str:
    """What the every-block plan's peak above ``base_bytes`` depends on: the stages' byte figures and the
    head's residual. A profile changed after it was measured (sharded per rank, edited, loaded from an
    older file) no longer matches the digest kept with its measured peak, and keeps the margin."""
    fields: list[tuple[int | bool, ...]] = [
        (s.x_bytes, s.xbar_bytes, s.fwd_transient_bytes, s.fwd_nograd_transient_bytes, s.bwd_transient_bytes,
         s.input_freed_bytes, s.output_released_bytes, s.recompute_bwd_extra_bytes, s.recompute_hold_bytes,
         s.recompute_copy_bytes, s.checkpointable) for s in profile.stages]
    if any(s.side for s in profile.stages):  # only then: a profile saved before side tensors keeps its digest
        fields = [(*f, s.side_bytes, s.side_grad_bytes) for f, s in zip(fields, profile.stages)]
    return hashlib.sha1(repr((fields, profile.head_residual_bytes)).encode()).hexdigest()


def with_measured_every(profile: Profile) -> Profile:
    """``profile`` with its every-block run's measured peak (``meta["measured_every_peak_bytes"]``, as the
    profiler left it) kept above ``base_bytes`` beside :func:`every_digest` (Note [Safety margin])."""
    peak = profile.meta.get("measured_every_peak_bytes")
    measured_sizes = (profile.meta.get("sizes") == "measured" or profile.meta.get("every_on_device") is True) \
        and profile.device != "meta"
    if not isinstance(peak, int) or not measured_sizes or "measured_every_act_bytes" in profile.meta:
        return profile  # nothing measured on the device, or already kept (then base_bytes may have grown)
    meta = {**profile.meta, "measured_every_act_bytes": peak - profile.base_bytes,
            "measured_every_digest": every_digest(profile)}
    return dataclasses.replace(profile, meta=meta)


def every_items(profile: Profile) -> tuple[Item, ...]:
    """The plan with every checkpointable stage its own region (the ``every`` strategy's)."""
    return tuple(Region(k, k + 1, (Record(k),)) if s.checkpointable else Record(k)
                 for k, s in enumerate(profile.stages))


def _forwards(items: Sequence[Item], counts: list[int]) -> None:
    for it in items:
        if isinstance(it, Selective):
            counts[it.stage] += 2  # the first pass and the (partial) recomputation
        elif isinstance(it, Record):
            counts[it.stage] += 1
        else:
            for k in range(it.start, it.stop):
                counts[k] += 1
            _forwards(it.body, counts)


def simulate(profile: Profile, items: Sequence[Item] | Plan) -> Prediction:
    """Predict peak bytes and time (forward, recompute, backward) of running ``items`` on ``profile``.

    Args:
        profile: the chain.
        items: a plan's items (or a :class:`remat.Plan`).

    Returns:
        A :class:`remat.Prediction`; ``peak_bytes`` includes :attr:`Profile.base_bytes`.

    >>> from remat import Profile, solve
    >>> p = Profile.from_lists([10, 10, 10, 10], [30, 30, 30, 0], [1.0] * 4, [2.0] * 4)
    >>> simulate(p, solve(p, None, strategy="none")).peak_bytes
    120
    """
    if isinstance(items, Plan):
        items = items.items
    total, peak = _seq(profile, items, 0)
    st = profile.stages
    counts = [0] * len(st)
    _forwards(items, counts)
    held = [0] * len(st)
    for pos, it in enumerate(items):
        if isinstance(it, Record):
            held[it.stage] = st[it.stage].xbar_bytes + st[it.stage].side - (st[it.stage].input_freed_bytes
                                                                             if pos > 0 else 0)
        elif isinstance(it, Selective):
            held[it.stage] = st[it.stage].option(it.option).kept_bytes + st[it.stage].side
        else:
            for k in range(it.start, it.stop):
                held[k] = st[k].side
            held[it.stop - 1] += profile.output_bytes(it.stop - 1)
    fwd = sum(s.fwd_s for s in st)
    bwd = sum(s.bwd_s for s in st)
    recompute = max(0.0, total - fwd - bwd)
    return Prediction(
        peak_bytes=profile.base_bytes + max(peak + safety_bytes(profile, items, peak), profile.after_backward_bytes),
        fwd_s=fwd,
        bwd_s=bwd,
        recompute_s=recompute,
        forwards=tuple(counts),
        held_bytes=tuple(held),
        fixed_bytes=profile.fixed_bytes,
    )
