"""Planners: one signature, registered by name. No torch here.

A strategy is ``fn(profile, budget_bytes, **options) -> items`` where ``budget_bytes`` is an int or
None (no limit). :func:`solve` parses the budget, runs the strategy, checks the plan, simulates it,
and refuses a plan whose predicted peak exceeds the budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from remat.errors import BudgetError, InfeasibleBudgetError, RematError
from remat.planning import optimal as _optimal
from remat.planning.plan import Item, Plan, Record, Region, validate_items
from remat.planning.profile import Profile
from remat.planning.revolve import revolve_items
from remat.planning.simulate import simulate
from remat.units import format_bytes, parse_bytes

__all__ = [
    "Budget",
    "frontier",
    "min_feasible_plan",
    "parse_budget",
    "register_strategy",
    "solve",
    "strategies",
]

Budget = int | str | float | None
Strategy = Callable[..., Sequence[Item]]

_REGISTRY: dict[str, Strategy] = {}
_ALIASES: dict[str, str] = {}

#: Chains longer than this are solved by ``auto`` with fewer memory slots (see :func:`_auto`).
AUTO_MAX_EXACT_STAGES = 160


def register_strategy(name: str, *aliases: str) -> Callable[[Strategy], Strategy]:
    """Register ``fn(profile, budget_bytes, **options) -> items`` under ``name`` (and aliases)."""

    def deco(fn: Strategy) -> Strategy:
        _REGISTRY[name] = fn
        for a in aliases:
            _ALIASES[a] = name
        return fn

    return deco


def strategies() -> list[str]:
    """Names of the registered strategies."""
    return list(_REGISTRY)


def _lookup(strategy: str | Strategy) -> tuple[str, Strategy]:
    if callable(strategy):
        return getattr(strategy, "__name__", "custom"), strategy
    key = _ALIASES.get(strategy, strategy)
    if key not in _REGISTRY:
        raise RematError(
            f"remat.solve: unknown strategy {strategy!r}; choose one of {', '.join(_REGISTRY)} or pass a callable"
        )
    return key, _REGISTRY[key]


# ---- the chain's structure --------------------------------------------------------------------


def runs(profile: Profile) -> list[tuple[int, int]]:
    """Maximal ranges ``[a, b)`` of stages that may share checkpoint regions."""
    out: list[tuple[int, int]] = []
    st = profile.stages
    i = 0
    while i < len(st):
        if not st[i].checkpointable:
            i += 1
            continue
        j = i + 1
        while j < len(st) and st[j].checkpointable and st[j].joins_previous:
            j += 1
        out.append((i, j))
        i = j
    return out


def _with_runs(profile: Profile, fill: Callable[[int, int], Sequence[Item]]) -> tuple[Item, ...]:
    """Records for every stage outside a run, ``fill(a, b)`` for each run ``[a, b)``."""
    items: list[Item] = []
    pos = 0
    for a, b in runs(profile):
        items.extend(Record(k) for k in range(pos, a))
        items.extend(fill(a, b))
        pos = b
    items.extend(Record(k) for k in range(pos, len(profile.stages)))
    return tuple(items)


def _segments(a: int, b: int, count: int) -> list[Item]:
    n = b - a
    count = max(1, min(count, n))
    bounds = [a + (n * k) // count for k in range(count + 1)]
    return [Region(s, e, tuple(Record(k) for k in range(s, e))) for s, e in zip(bounds, bounds[1:]) if e > s]


# ---- strategies ---------------------------------------------------------------------------------


@register_strategy("none", "store_all")
def _none(profile: Profile, budget_bytes: int | None) -> Sequence[Item]:
    """Store everything: PyTorch's default."""
    return tuple(Record(k) for k in range(len(profile.stages)))


@register_strategy("every", "all")
def _every(profile: Profile, budget_bytes: int | None) -> Sequence[Item]:
    """Every checkpointable stage its own region (Hugging Face ``gradient_checkpointing_enable``)."""
    return _with_runs(profile, lambda a, b: _segments(a, b, b - a))


@register_strategy("uniform")
def _uniform(profile: Profile, budget_bytes: int | None, *, segments: int = 2) -> Sequence[Item]:
    """``segments`` equal checkpoint regions per run of blocks."""
    if isinstance(segments, bool) or not isinstance(segments, int) or segments < 1:
        raise RematError(f"remat.solve: segments={segments!r} must be a positive int")
    return _with_runs(profile, lambda a, b: _segments(a, b, segments))


@register_strategy("sqrt", "chen")
def _sqrt(profile: Profile, budget_bytes: int | None) -> Sequence[Item]:
    """About sqrt(L) equal segments (Chen et al. 2016; ``checkpoint_sequential``)."""
    return _with_runs(profile, lambda a, b: _segments(a, b, max(1, round(math.sqrt(b - a)))))


@register_strategy("revolve", "binomial")
def _revolve(profile: Profile, budget_bytes: int | None, *, snapshots: int | None = None) -> Sequence[Item]:
    """Binomial checkpointing; with no ``snapshots`` given, the fastest count that fits the budget."""
    if snapshots is not None:
        return _with_runs(profile, lambda a, b: revolve_items(a, b - a, snapshots))
    longest = max((b - a for a, b in runs(profile)), default=1)
    best: tuple[float, int, Sequence[Item]] | None = None
    fallback: tuple[int, Sequence[Item]] | None = None
    for s in range(1, longest + 1):

        def fill(a: int, b: int, s: int = s) -> Sequence[Item]:
            return revolve_items(a, b - a, s)

        items = _with_runs(profile, fill)
        pred = simulate(profile, items)
        if budget_bytes is None or pred.peak_bytes <= budget_bytes:
            key = (pred.time_s, pred.peak_bytes, items)
            if best is None or key[:2] < best[:2]:
                best = key
        if fallback is None or pred.peak_bytes < fallback[0]:
            fallback = (pred.peak_bytes, items)
    if best is not None:
        return best[2]
    assert fallback is not None
    return fallback[1]  # solve() reports it as infeasible


@register_strategy("optimal", "rotor", "dp")
def _optimal_strategy(profile: Profile, budget_bytes: int | None, *, slots: int = 500) -> Sequence[Item]:
    """Least-time persistent schedule under the byte budget (Beaumont et al. 2019), multi-level.

    Note: [Discretisation] The DP rounds every size up to whole slots, which is safe but loses up to
    about one slot per term of a peak. So the table is solved for a budget inflated by ``L / slots``
    (at most 50%), and the candidate plans are read from the largest slot count down, each simulated
    with exact bytes, until one fits the real budget (the one at ``slots * delta <= budget`` always
    does). The fixed baselines (none, every, sqrt, revolve) are simulated too, and the fastest plan
    that fits is returned, so ``optimal`` is never slower than a baseline at the same budget.
    """
    if budget_bytes is None:
        return _none(profile, None)
    candidates: list[tuple[float, int, Sequence[Item]]] = []

    def consider(items: Sequence[Item]) -> None:
        pred = simulate(profile, items)
        if pred.peak_bytes <= budget_bytes:
            candidates.append((pred.time_s, pred.peak_bytes, tuple(items)))

    act = int((budget_bytes - profile.base_bytes) / (1 + profile.safety_fraction))
    if act >= 0:
        n = len(profile.stages)
        table = _optimal.solve_table(profile, int(act * (1 + min(0.5, n / max(1, slots)))), slots)
        exact_top = act // table.delta
        for m in table.feasible_slots()[::-1]:
            items = table.items(int(m))
            pred = simulate(profile, items)
            if pred.peak_bytes <= budget_bytes:
                candidates.append((pred.time_s, pred.peak_bytes, items))
                break
            if m <= exact_top:
                break
    for baseline in _baselines(profile, budget_bytes):
        consider(baseline)
    if not candidates:  # at the very edge, the DP's safe side can miss what the simulator allows
        consider(min_feasible_plan(profile, slots).items)
    if not candidates:
        return _none(profile, None)  # solve() reports it as infeasible
    return min(candidates, key=lambda c: (c[0], c[1]))[2]


def _baselines(profile: Profile, budget_bytes: int | None) -> list[Sequence[Item]]:
    return [_none(profile, None), _every(profile, None), _sqrt(profile, None), _revolve(profile, budget_bytes)]


@register_strategy("auto")
def _auto(profile: Profile, budget_bytes: int | None, *, slots: int = 500) -> Sequence[Item]:
    """``optimal``; for chains longer than 160 stages, with slots cut so that L^3 * slots stays within
    what ``optimal`` solves in about a second at 160 stages (and never fewer than 50)."""
    n = len(profile.stages)
    if n > AUTO_MAX_EXACT_STAGES:
        slots = max(50, int(slots * (AUTO_MAX_EXACT_STAGES / n) ** 3))
    return _optimal_strategy(profile, budget_bytes, slots=slots)


# ---- budgets ------------------------------------------------------------------------------------


def parse_budget(budget: Budget, profile: Profile) -> int | None:
    """Bytes from a budget: an int of bytes, a string (``"6GiB"``, ``"6GB"``, ``"750MiB"``, ``"50%"``),
    or a fraction in (0, 1] of the no-checkpointing peak. None means no limit."""
    if budget is None:
        return None
    if isinstance(budget, float):
        return _fraction(budget, budget, profile)
    if isinstance(budget, str):
        text = budget.strip()
        if text.endswith("%"):
            try:
                return _fraction(float(text[:-1]) / 100, budget, profile)
            except ValueError:
                raise BudgetError(f"budget {budget!r} is not a percentage like '50%'") from None
        try:
            value = float(text)
        except ValueError:
            return parse_bytes(text, what="budget")
        if "." in text:
            return _fraction(value, budget, profile)
        return parse_bytes(text, what="budget")
    return parse_bytes(budget, what="budget")


def _fraction(value: float, original: object, profile: Profile) -> int:
    if not (0 < value <= 1):
        raise BudgetError(
            f"budget {original!r} is a fraction outside (0, 1]; give a share of the no-checkpointing peak"
            " like 0.5, or bytes like '6GiB'"
        )
    peak = simulate(profile, _none(profile, None)).peak_bytes
    return int(value * peak)


# ---- solve ---------------------------------------------------------------------------------------


def solve(profile: Profile, budget: Budget = None, *, strategy: str | Strategy = "optimal", **options: Any) -> Plan:
    """Plan one training step of ``profile`` within ``budget``.

    Args:
        profile: the chain (from :func:`remat.profile` or :meth:`Profile.from_lists`).
        budget: peak bytes allowed for the whole step (fixed memory and input included): an int, a string
            such as ``"6GiB"``, or a fraction in (0, 1] of the no-checkpointing peak; None for no limit.
        strategy: ``"optimal"`` (default), ``"auto"``, ``"none"``, ``"every"``, ``"sqrt"``, ``"uniform"``,
            ``"revolve"``, or a callable ``fn(profile, budget_bytes, **options) -> items``.
        **options: passed to the strategy (``segments=`` for uniform, ``snapshots=`` for revolve,
            ``slots=`` for optimal).

    Returns:
        A :class:`remat.Plan` whose predicted peak is within the budget.

    Raises:
        InfeasibleBudgetError: no plan of this strategy fits; the message gives the smallest feasible peak.
        BudgetError: the budget is malformed.

    >>> p = Profile.from_lists([10] * 5, [40] * 4 + [0], [1.0] * 5, [2.0] * 5)
    >>> plan = solve(p, 100)
    >>> plan.peak_bytes <= 100
    True
    """
    if not isinstance(profile, Profile):
        raise RematError(f"remat.solve: expected a remat.Profile, got {type(profile).__name__}")
    budget_bytes = parse_budget(budget, profile)
    name, fn = _lookup(strategy)
    items = tuple(fn(profile, budget_bytes, **options))
    checkpointable = [s.checkpointable for s in profile.stages]
    validate_items(items, 0, len(profile.stages), checkpointable, [s.joins_previous for s in profile.stages])
    pred = simulate(profile, items)
    plan = Plan(
        items=items,
        strategy=name,
        budget_bytes=budget_bytes,
        prediction=pred,
        stage_names=profile.names,
        fingerprint=profile.fingerprint,
        options=dict(options),
        input_shapes=tuple(profile.meta.get("input_shapes", ())),
    )
    if budget_bytes is not None and pred.peak_bytes > budget_bytes:
        best = min_feasible_plan(profile)
        raise InfeasibleBudgetError(
            _infeasible_message(profile, budget_bytes, best.peak_bytes, name, pred.peak_bytes),
            budget_bytes=budget_bytes,
            min_feasible_bytes=best.peak_bytes,
        )
    return plan


def _infeasible_message(profile: Profile, budget: int, minimum: int, strategy: str, needed: int) -> str:
    n = len(profile.stages)
    if budget < minimum:
        return (
            f"remat.solve: budget {format_bytes(budget)} is below the smallest feasible peak"
            f" {format_bytes(minimum)} for this chain of {n} stages (fixed memory"
            f" {format_bytes(profile.fixed_bytes)}). Raise the budget or lower the batch size."
        )
    return (
        f"remat.solve: strategy '{strategy}' needs {format_bytes(needed)}, above the budget"
        f" {format_bytes(budget)}; strategy 'optimal' fits any budget from {format_bytes(minimum)}."
    )


def min_feasible_plan(profile: Profile, slots: int = 500) -> Plan:
    """The plan with the smallest peak remat finds: the optimal DP's smallest feasible slot count
    (solved twice, the second time finer around the first answer) or a baseline, whichever is lower."""
    best_items: Sequence[Item] = _none(profile, None)
    best = simulate(profile, best_items).peak_bytes
    for items in _baselines(profile, None):
        peak = simulate(profile, items).peak_bytes
        if peak < best:
            best, best_items = peak, items
    budget = simulate(profile, _none(profile, None)).peak_bytes
    for _ in range(2):
        act = budget - profile.base_bytes
        table = _optimal.solve_table(profile, act, slots)
        feasible = table.feasible_slots()
        if len(feasible) == 0:
            break
        items = table.items(int(feasible[0]))
        budget = simulate(profile, items).peak_bytes
        if budget < best:
            best, best_items = budget, items
    pred = simulate(profile, best_items)
    return Plan(tuple(best_items), "optimal", pred.peak_bytes, pred, profile.names, profile.fingerprint)


# ---- frontier ------------------------------------------------------------------------------------


def frontier(profile: Profile, *, slots: int = 500) -> list[Plan]:
    """The Pareto set of (peak bytes, time): from the smallest feasible peak to no checkpointing.

    One DP solve at the no-checkpointing peak gives the optimal cost for every slot count; each distinct
    plan is simulated, and dominated points dropped. Sorted by increasing peak (decreasing time).
    """
    none_items = _none(profile, None)
    top = simulate(profile, none_items).peak_bytes
    low = min_feasible_plan(profile, slots).peak_bytes
    plans: dict[tuple[Item, ...], Plan] = {}
    # Two tables: one spanning the whole range, one finer near the low end where plans change fastest.
    for budget in (top, low + (top - low) // 4):
        act = budget - profile.base_bytes
        table = _optimal.solve_table(profile, act, slots)
        costs = table.cost[0, 0, -1]
        last = math.inf
        for m in table.feasible_slots():
            c = float(costs[m])
            if c >= last:
                continue
            last = c
            items = table.items(int(m))
            if items not in plans:
                pred = simulate(profile, items)
                plans[items] = Plan(items, "optimal", pred.peak_bytes, pred, profile.names, profile.fingerprint)
    for baseline in _baselines(profile, None):  # the DP's safe side can miss the exact edge plans
        key = tuple(baseline)
        if key not in plans:
            pred = simulate(profile, key)
            plans[key] = Plan(key, "optimal", pred.peak_bytes, pred, profile.names, profile.fingerprint)
    pts = sorted(plans.values(), key=lambda p: (p.peak_bytes, p.time_s))
    out: list[Plan] = []
    for p in pts:
        if not out or p.time_s < out[-1].time_s - 1e-12:
            out.append(p)
    return out
