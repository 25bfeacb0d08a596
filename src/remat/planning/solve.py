"""Solving: a profile and a budget in, a checked and simulated :class:`Plan` out. No torch here.

Every plan the planners return is built by :func:`make_plan`, which checks the items against the chain,
simulates them, and fills in what applying the plan needs from the profile (stage names and kinds, the
fingerprint, the input shapes).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from remat.errors import InfeasibleBudgetError, PlanError, RematError
from remat.planning import optimal as _optimal
from remat.planning.budget import Budget, no_checkpointing_peak, parse_budget
from remat.planning.min_peak import min_peak_items
from remat.planning.plan import Item, Plan, validate_items
from remat.planning.profile import Profile
from remat.planning.simulate import simulate
from remat.planning.strategies import Strategy, baselines, check_options, lookup, optimal_strategy
from remat.units import format_bytes

__all__ = ["frontier", "make_plan", "min_feasible_peak", "min_feasible_plan", "solve"]


def make_plan(profile: Profile, items: Sequence[Item], *, strategy: str, budget_bytes: int | None,
              options: dict[str, Any] | None = None) -> Plan:
    """The :class:`Plan` that runs ``items`` on ``profile``: checked, simulated, and carrying the profile's
    stage names and kinds, fingerprint and input shapes.

    Raises:
        PlanError: the items do not cover the chain once, in order, or a region holds a stage that cannot
            be checkpointed (or stages that cannot share a region).
    """
    items = tuple(items)
    st = profile.stages
    validate_items(items, 0, len(st), [s.checkpointable for s in st], [s.joins_previous for s in st])
    return Plan(
        items=items,
        strategy=strategy,
        budget_bytes=budget_bytes,
        prediction=simulate(profile, items),
        stage_names=profile.names,
        fingerprint=profile.fingerprint,
        options=dict(options or {}),
        input_shapes=profile.input_shapes,
        stage_kinds=profile.kinds,
        autocast=str(profile.meta.get("autocast", "")),
        head_chunks=profile.head_chunks,
    ).validate()


def solve(profile: Profile, budget: Budget = None, *, strategy: str | Strategy = "optimal", **options: Any) -> Plan:
    """Plan one training step of ``profile`` within ``budget``.

    Args:
        profile: the chain (from :func:`remat.profile` or :meth:`Profile.from_lists`).
        budget: peak bytes allowed for the whole step (fixed memory and input included): an int of bytes,
            a size such as ``"6GiB"``, a share of the no-checkpointing peak as ``"50%"`` or
            ``share(0.5)`` (or a float in (0, 1)); None for no limit. See docs/budgets.md.
        strategy: ``"optimal"`` (default), ``"auto"``, ``"none"``, ``"every"``, ``"sqrt"``, ``"uniform"``,
            ``"revolve"``, or a callable ``fn(profile, budget_bytes, *, options...) -> items``.
        **options: the strategy's options (``segments=`` for uniform, ``snapshots=`` for revolve,
            ``slots=`` for optimal and auto), checked against its signature.

    Returns:
        A :class:`remat.Plan` whose predicted peak is within the budget.

    Raises:
        InfeasibleBudgetError: no plan of this strategy fits; the message gives the smallest feasible peak.
        BudgetError: the budget is malformed.
        RematError: an unknown strategy, or an option it does not have or of the wrong type.
        PlanError: a (user) strategy returned a malformed plan.

    >>> p = Profile.from_lists([10] * 5, [40] * 4 + [0], [1.0] * 5, [2.0] * 5)
    >>> plan = solve(p, 100)
    >>> plan.peak_bytes <= 100
    True
    """
    if not isinstance(profile, Profile):
        raise RematError(f"remat.solve: expected a remat.Profile, got {type(profile).__name__}")
    budget_bytes = parse_budget(budget, profile)
    if profile.head_options:
        return _solve_heads(profile, budget_bytes, strategy, options)
    name, fn = lookup(strategy)
    check_options(name, fn, options)
    made = fn(profile, budget_bytes, **options)
    try:
        items = tuple(made)
    except TypeError:
        raise PlanError(
            f"remat.solve: strategy {name!r} returned {made!r}; expected a sequence of plan items"
        ) from None
    try:
        plan = make_plan(profile, items, strategy=name, budget_bytes=budget_bytes, options=options)
    except PlanError as e:
        raise PlanError(f"remat.solve: strategy {name!r} made an invalid plan: {e}") from None
    if budget_bytes is not None and plan.peak_bytes > budget_bytes:
        minimum = min_feasible_peak(profile)
        raise InfeasibleBudgetError(
            _infeasible_message(profile, budget_bytes, minimum, name, plan.peak_bytes),
            budget_bytes=budget_bytes,
            min_feasible_bytes=minimum,
        )
    return plan


def _infeasible_message(profile: Profile, budget: int, minimum: int, strategy: str, needed: int) -> str:
    n = len(profile.stages)
    if budget < minimum:
        total = sum(s.xbar_bytes for s in profile.stages)
        kept = max(((s.xbar_bytes, profile.names[i]) for i, s in enumerate(profile.stages) if not s.checkpointable),
                   default=(0, ""))
        few = "" if kept[0] * 2 < total else (
            f" {format_bytes(kept[0])} of the {format_bytes(total)} of activations are kept by {kept[1]}, which"
            " cannot be checkpointed (code between blocks, or a block called several times, such as a shared"
            " layer); name the blocks with stages=[...] if the model has them."
        )
        none = no_checkpointing_peak(profile)
        least = f", {math.ceil(100 * minimum / none)}% of the peak without checkpointing ({format_bytes(none)})"
        return (
            f"remat.solve: budget {format_bytes(budget)} is below the smallest feasible peak"
            f" {format_bytes(minimum)} ({minimum:,} B){least if none > 0 else ''} for this chain of {n} stages"
            f" (fixed memory {format_bytes(profile.fixed_bytes)}). Raise the budget or lower the batch size.{few}"
        )
    return (
        f"remat.solve: strategy '{strategy}' needs {format_bytes(needed)}, above the budget"
        f" {format_bytes(budget)}; strategy 'optimal' fits any budget from {format_bytes(minimum)}."
    )


def _solve_heads(profile: Profile, budget_bytes: int | None, strategy: str | Strategy, options: dict[str, Any]) -> Plan:
    """Note: [Planning the head] A profile with head options (``remat.profile(..., head="chunked")``) is
    solved once per way to run the head, each variant's head stage as measured that way; the fastest plan
    that fits wins, and on a tie the head in fewer chunks (the profile's own, whole, first). Exact: every
    variant is planned by the same strategy on its own measured figures."""
    plans: list[Plan] = []
    refusals: list[InfeasibleBudgetError] = []
    for variant in profile.head_variants():
        try:
            plans.append(solve(variant, budget_bytes, strategy=strategy, **options))
        except InfeasibleBudgetError as e:
            refusals.append(e)
    if plans:
        return min(plans, key=lambda p: p.time_s)  # min keeps the first of equals: fewer chunks
    raise min(refusals, key=lambda e: e.min_feasible_bytes if e.min_feasible_bytes is not None else math.inf)


def min_feasible_peak(profile: Profile) -> int:
    """The smallest peak :func:`solve` can meet, in exact bytes: ``solve(profile, b)`` (strategy
    ``optimal``) returns a plan for every budget ``b`` from it up, and raises
    :class:`remat.InfeasibleBudgetError` below it.

    It is the least simulated peak over the optimal planner's plans (:mod:`remat.planning.min_peak`) and
    the baselines', computed exactly, without the DP's memory slots; with head options, the least over
    the ways to run the head.
    """
    if profile.head_options:
        return min(min_feasible_peak(v) for v in profile.head_variants())
    low, _ = min_peak_items(profile)
    least = min([low, *(simulate(profile, items).peak_bytes for items in baselines(profile, None))])
    return max(least, profile.base_bytes + profile.after_backward_bytes)  # the optimizer's step, whatever the plan


def min_feasible_plan(profile: Profile, slots: int = 500) -> Plan:
    """The fastest plan ``optimal`` finds at the smallest feasible peak (:func:`min_feasible_peak`);
    its ``peak_bytes`` is that peak, and its budget too."""
    if profile.head_options:
        low = min_feasible_peak(profile)
        plans = [min_feasible_plan(v, slots) for v in profile.head_variants()]
        return min((p for p in plans if p.peak_bytes <= low), key=lambda p: p.time_s)
    low = min_feasible_peak(profile)
    items = optimal_strategy(profile, low, slots=slots)
    return make_plan(profile, items, strategy="optimal", budget_bytes=low)


def frontier(profile: Profile, *, slots: int = 500) -> list[Plan]:
    """The Pareto set of (peak bytes, time): from the smallest feasible peak to no checkpointing.

    One DP solve at the no-checkpointing peak gives the optimal cost for every slot count; each distinct
    plan is simulated, and dominated points dropped. Sorted by increasing peak (decreasing time); the
    first point is :func:`min_feasible_plan`. Each plan's budget is its own peak.
    """
    if profile.head_options:
        return _pareto([p for v in profile.head_variants() for p in frontier(v, slots=slots)])
    top = no_checkpointing_peak(profile)
    first = min_feasible_plan(profile, slots)
    found: dict[tuple[Item, ...], Plan] = {first.items: first}
    # Two tables: one spanning the whole range, one finer near the low end where plans change fastest.
    for budget in (top, first.peak_bytes + (top - first.peak_bytes) // 4):
        for items in _dp_frontier(profile, budget, slots):
            if items not in found:
                found[items] = _frontier_point(profile, items)
    for baseline in baselines(profile, None):  # the DP's safe side can miss the exact edge plans
        key = tuple(baseline)
        if key not in found:
            found[key] = _frontier_point(profile, key)
    return _pareto(list(found.values()))


def _pareto(plans: list[Plan]) -> list[Plan]:
    """The plans no other is both smaller and faster than, by increasing peak (stable: on a tie, the first)."""
    points = sorted(plans, key=lambda p: (p.peak_bytes, p.time_s))
    out: list[Plan] = []
    for p in points:
        if not out or p.time_s < out[-1].time_s - 1e-12:
            out.append(p)
    return out


def _dp_frontier(profile: Profile, budget: int, slots: int) -> list[tuple[Item, ...]]:
    """The DP's plans at every slot count up to ``budget`` where its cost drops."""
    table = _optimal.solve_table(profile, max(0, budget - profile.base_bytes), slots)
    costs = table.cost[_optimal.PINNED, 0, -1]
    out: list[tuple[Item, ...]] = []
    last = math.inf
    for m in table.feasible_slots():
        c = float(costs[m])
        if c < last:
            last = c
            out.append(table.items(int(m)))
    return out


def _frontier_point(profile: Profile, items: tuple[Item, ...]) -> Plan:
    peak = simulate(profile, items).peak_bytes
    return make_plan(profile, items, strategy="optimal", budget_bytes=peak)
