"""Predict the peak memory and the time of a plan under the chain cost model. No torch here.

The model (docs/cost-model.md): a range of stages ``i … l`` is processed with its input ``x_i`` held by
the caller and the gradient ``y_{l+1}`` (``x_{l+1}`` bytes) arriving from above counted in. The input
of a range is *pinned* (held by the caller: the user's batch, or a checkpoint region's saved input);
the input of every later item is *loose*: a recorded stage that does not save its input frees it. The
optimal planner minimises exactly this model, so its simulated time equals its DP value.

Each item's figures come from :mod:`remat.planning.cost`, the model's one statement (with its Notes
[Outputs at backward], [Side tensors], [Copies in recomputation], [Selective items]); this module walks
a plan's items with it and adds what a prediction carries beyond the model (Note [Safety margin]).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence

from remat.errors import PlanError
from remat.planning.cost import BODY, LOOSE, PINNED, TOP, Costs, exact_costs
from remat.planning.plan import Item, Plan, Prediction, Record, Region, Selective
from remat.planning.profile import Profile

__all__ = ["every_digest", "every_items", "head_recompute", "plan_profile", "safety_bytes", "simulate", "sweep_bytes",
           "with_measured_every"]


def sweep_bytes(profile: Profile, start: int, stop: int) -> int:
    """Peak (above the held input ``x_start``) of an unrecorded pass over stages ``start … stop-1``: at
    stage ``k``, its input and output, its transient, and the side tensors of ``start … k`` (Note [Side
    tensors] in :mod:`remat.planning.cost`)."""
    return int(exact_costs(profile).region.sweep[start, stop])


def _seq(costs: Costs, items: Sequence[Item], reserve: int, context: int = TOP) -> tuple[float, int]:
    """(time, peak above the held input) of ``items``, whose first input is pinned, with ``reserve``
    bytes of incoming gradient; ``context`` TOP for the first pass, BODY inside a region's recomputation.

    Walks the items from the last to the first: the peak of a suffix is needed to know the peak of the
    item before it, which holds its own record (or its region's output) while the suffix runs. Each
    item's figures are the cost model's (:mod:`remat.planning.cost`).
    """
    time_rest, peak_rest = 0.0, 0
    for pos in range(len(items) - 1, -1, -1):
        item = items[pos]
        if isinstance(item, Record):
            step = costs.record.step(item.stage, reserve, PINNED if pos == 0 else LOOSE, context)
        elif isinstance(item, Region):
            body_s, body_peak = _seq(costs, item.body, int(costs.region.output[item.stop]), BODY)
            step = costs.region.step(item.start, item.stop, reserve, body_s, body_peak)
        elif isinstance(item, Selective):
            step = costs.selective.step(item, reserve)
        else:
            raise TypeError(f"simulate: unknown plan item {item!r}")
        time_rest = step.time_s + time_rest + step.time_after_s
        peak_rest = max(step.peak, step.held + peak_rest)
    return time_rest, peak_rest


def safety_bytes(profile: Profile, items: Sequence[Item], peak: int) -> int:
    """What the prediction adds to the chain model's activation ``peak`` of ``items``.

    Note: [Safety margin] A measured profile's predictions are raised by ``safety_fraction`` of the
    activation peak: the chain model extrapolates from the runs the profiler made to plans it never ran.
    One plan it did run: every block its own region, the calibration run (Note [Calibrating
    recomputation]), whose peak above ``base_bytes`` it keeps in ``meta["measured_every_act_bytes"]``
    (unattributed bytes, which the profile adds to the head's residual, already taken out). That plan is
    charged its measured peak, exactly, and no margin: with a margin, a budget set to Hugging Face's
    every-layer checkpointing's own peak would refuse that very schedule; and where the chain model charges
    it more (a BART's encoder output, held by the output to the end of the step and by the region that made
    it until its backward: +78,848 B over the measured 2,444,680 B), the model's figure would put the plan
    above the peer that runs it. Only while the profile's stages are the ones measured (:func:`every_digest`:
    a per-rank FSDP profile, whose blocks carry the unsharded parameters' bytes, keeps the margin), and only
    for a plan run on the device: with measured sizes, or with sizes from a fake copy when the profiler also
    ran the plan on the device (``meta["every_on_device"]``; the fake copy may keep more than the device's
    step, e.g. an attention mask the device's step skips).
    """
    measured = profile.meta.get("measured_every_act_bytes")
    if (isinstance(measured, int) and len(items) == len(profile.stages) and tuple(items) == every_items(profile)
            and profile.meta.get("measured_every_digest") == every_digest(profile)):
        return measured - peak  # the plan ran on the device: its measured peak is exact
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
        items: a plan's items, or a :class:`remat.Plan`: then with the head the plan runs
            (:func:`plan_profile`: a plan whose head is in chunks is simulated with that head's figures).

    Returns:
        A :class:`remat.Prediction`; ``peak_bytes`` includes :attr:`Profile.base_bytes`.

    >>> from remat import Profile, solve
    >>> p = Profile.from_lists([10, 10, 10, 10], [30, 30, 30, 0], [1.0] * 4, [2.0] * 4)
    >>> simulate(p, solve(p, None, strategy="none")).peak_bytes
    120
    """
    if isinstance(items, Plan):
        profile = plan_profile(profile, items)
        items = items.items
    costs = exact_costs(profile)
    total, peak = _seq(costs, items, 0)
    st = profile.stages
    counts = [0] * len(st)
    _forwards(items, counts)
    held = [0] * len(st)
    for pos, it in enumerate(items):
        if isinstance(it, Record):
            held[it.stage] = costs.record.held(it.stage, PINNED if pos == 0 else LOOSE)
        elif isinstance(it, Selective):
            held[it.stage] = costs.selective.option(it).kept
        else:
            held[it.start : it.stop] = costs.region.stage_held(it.start, it.stop)
    fwd = sum(s.fwd_s for s in st)
    bwd = sum(s.bwd_s for s in st)
    recompute = max(0.0, total - fwd - bwd)
    return head_recompute(Prediction(
        peak_bytes=profile.base_bytes + max(peak + safety_bytes(profile, items, peak), profile.after_backward_bytes),
        fwd_s=fwd,
        bwd_s=bwd,
        recompute_s=recompute,
        forwards=tuple(counts),
        held_bytes=tuple(held),
        fixed_bytes=profile.fixed_bytes,
    ), float(profile.meta.get("head_recompute_s", 0.0)))


def head_recompute(p: Prediction, extra_s: float) -> Prediction:
    """A chunked head's own recomputation (its logits, again in backward) reported as recomputation: the
    chain counts the head's measured time as its forward and backward (Profile.with_head)."""
    moved = min(extra_s, p.bwd_s)
    if moved <= 0:
        return p
    return dataclasses.replace(p, bwd_s=p.bwd_s - moved, recompute_s=p.recompute_s + moved)


def plan_profile(profile: Profile, plan: Plan) -> Profile:
    """The profile with the head ``plan`` runs.

    Note: [A plan's head] A plan solved with the head in n chunks (``plan.head_chunks``) runs that head,
    whose figures are one of the profile's ``head_options``; the profile's own head (whole) would predict
    the whole head's logits. So a plan is always simulated with its own head, and a profile that has no
    figures for it is refused rather than answered with another head's."""
    c = plan.head_chunks
    if c is None or c == profile.head_chunks or (c == 0 and profile.head_chunks is None):
        return profile
    have = [o.chunks for o in profile.head_options]
    if c not in have:
        own = "as the model has it" if profile.head_chunks is None else f"in {profile.head_chunks} chunks (0: whole)"
        raise PlanError(f"remat.simulate: the plan runs the head in {c} chunks, and the profile has no figures for"
                        f" that head (its own runs {own}; head options: {have or 'none'}); simulate on the profile"
                        " the plan was solved from (remat.profile(..., head='chunked')) or on profile.with_head(c)")
    return profile.with_head(c)
