"""Strategies: one signature, registered by name, with typed options. No torch here.

A strategy is ``fn(profile, budget_bytes, *, option=default, ...) -> items``: ``budget_bytes`` is an int
or None (no limit), and the keyword-only parameters are its options, typed by their annotations.
:func:`remat.solve` looks the strategy up, checks the options against its signature, runs it, and checks
and simulates the plan it returns (:mod:`remat.planning.solve`).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from remat.errors import RematError
from remat.planning import optimal as _optimal
from remat.planning.budget import Budget as Budget  # moved there; still importable from here
from remat.planning.budget import parse_budget as parse_budget
from remat.planning.min_peak import min_peak_items
from remat.planning.plan import Item, Record, Region
from remat.planning.profile import Profile
from remat.planning.revolve import revolve_items
from remat.planning.simulate import every_items, simulate

__all__ = [
    "AUTO_MAX_EXACT_STAGES",
    "Strategy",
    "StrategyOption",
    "baselines",
    "check_options",
    "lookup",
    "optimal_strategy",
    "register_strategy",
    "runs",
    "strategies",
    "strategy_options",
]

Strategy = Callable[..., Sequence[Item]]

_REGISTRY: dict[str, Strategy] = {}
_ALIASES: dict[str, str] = {}

#: Chains longer than this are solved by ``auto`` with fewer memory slots (see :func:`_auto`).
AUTO_MAX_EXACT_STAGES = 160


# ---- the registry -------------------------------------------------------------------------------


def register_strategy(name: str, *aliases: str, replace: bool = False) -> Callable[[Strategy], Strategy]:
    """Register ``fn(profile, budget_bytes, *, options...) -> items`` under ``name`` (and aliases).

    The keyword-only parameters of ``fn`` are its options; their annotations are checked when
    :func:`remat.solve` passes them.

    Raises:
        RematError: ``name`` or an alias is taken (by a strategy or an alias) and ``replace`` is False.
    """
    for key in (name, *aliases):
        taken = key in _REGISTRY or key in _ALIASES
        if taken and not replace:
            owner = _ALIASES.get(key, key)
            raise RematError(
                f"remat.register_strategy: {key!r} is already taken by strategy {owner!r};"
                " pick another name, or pass replace=True to replace it"
            )

    def deco(fn: Strategy) -> Strategy:
        _ALIASES.pop(name, None)
        _REGISTRY[name] = fn
        for a in aliases:
            _REGISTRY.pop(a, None)
            _ALIASES[a] = name
        return fn

    return deco


def strategies() -> list[str]:
    """Names of the registered strategies."""
    return list(_REGISTRY)


def lookup(strategy: str | Strategy) -> tuple[str, Strategy]:
    """``(name, fn)`` of a registered strategy (by name or alias), or of a callable."""
    if callable(strategy):
        return getattr(strategy, "__name__", "custom"), strategy
    key = _ALIASES.get(strategy, strategy)
    if key not in _REGISTRY:
        raise RematError(
            f"remat.solve: unknown strategy {strategy!r}; choose one of {', '.join(_REGISTRY)} or pass a callable"
        )
    return key, _REGISTRY[key]


# ---- options ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StrategyOption:
    """One option of a strategy: a keyword-only parameter of its function."""

    name: str
    type: Any  # the annotation (Any when there is none)
    default: Any  # inspect.Parameter.empty when required

    @property
    def type_name(self) -> str:
        return _type_name(self.type)

    def describe(self) -> str:
        """``'segments (int, default 2)'``."""
        if self.default is inspect.Parameter.empty:
            return f"{self.name} ({self.type_name}, required)"
        return f"{self.name} ({self.type_name}, default {self.default!r})"


def strategy_options(strategy: str | Strategy) -> tuple[tuple[StrategyOption, ...], bool]:
    """The options a strategy declares, and whether it takes any other keyword too (``**kwargs``).

    >>> [o.describe() for o in strategy_options("uniform")[0]]
    ['segments (int, default 2)']
    """
    _, fn = lookup(strategy)
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or an extension: nothing to check against
        return (), True
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # annotations that do not resolve: the names are still checked
        hints = {}
    options: list[StrategyOption] = []
    positional, open_ended = 0, False
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            open_ended = True
        elif p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and positional < 2:
            positional += 1  # profile, budget_bytes
        elif p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
            options.append(StrategyOption(p.name, hints.get(p.name, Any), p.default))
    return tuple(options), open_ended


def check_options(name: str, fn: Strategy, options: dict[str, Any]) -> None:
    """Check ``options`` against what the strategy declares.

    Raises:
        RematError: an option the strategy does not have (the message lists the valid ones), a value of
            the wrong type, or a required option missing.
    """
    declared, open_ended = strategy_options(fn)
    by_name = {o.name: o for o in declared}
    valid = ", ".join(o.describe() for o in declared) or "none (it takes no options)"
    for key, value in options.items():
        if key not in by_name:
            if open_ended:
                continue
            raise RematError(f"remat.solve: strategy {name!r} has no option {key!r}; valid options: {valid}")
        option = by_name[key]
        if not _accepts(option.type, value):
            raise RematError(
                f"remat.solve: strategy {name!r}: option {key}={value!r} must be {option.type_name}"
                f" ({type(value).__name__} given)"
            )
    for option in declared:
        if option.default is inspect.Parameter.empty and option.name not in options:
            raise RematError(f"remat.solve: strategy {name!r} needs option {option.describe()}")


def _accepts(hint: Any, value: Any) -> bool:
    """Whether ``value`` fits the annotation ``hint``; annotations other than classes, unions and
    None (generics, protocols) are not checked."""
    if hint is Any:
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(hint))
    if hint is None or hint is type(None):
        return value is None
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _type_name(hint: Any) -> str:
    if hint is Any:
        return "any type"
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in typing.get_args(hint))
    if hint is None or hint is type(None):
        return "None"
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


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


def _positive(name: str, option: str, value: int) -> None:
    if value < 1:
        raise RematError(f"remat.solve: strategy {name!r}: option {option}={value!r} must be a positive int")


# ---- strategies ---------------------------------------------------------------------------------


@register_strategy("none", "store_all")
def _none(profile: Profile, budget_bytes: int | None) -> Sequence[Item]:
    """Store everything: PyTorch's default."""
    return tuple(Record(k) for k in range(len(profile.stages)))


@register_strategy("every", "all")
def _every(profile: Profile, budget_bytes: int | None) -> Sequence[Item]:
    """Every checkpointable stage its own region (Hugging Face ``gradient_checkpointing_enable``)."""
    return every_items(profile)


@register_strategy("uniform")
def _uniform(profile: Profile, budget_bytes: int | None, *, segments: int = 2) -> Sequence[Item]:
    """``segments`` equal checkpoint regions per run of blocks."""
    _positive("uniform", "segments", segments)
    return _with_runs(profile, lambda a, b: _segments(a, b, segments))


@register_strategy("sqrt", "chen")
def _sqrt(profile: Profile, budget_bytes: int | None) -> Sequence[Item]:
    """About sqrt(L) equal segments (Chen et al. 2016; ``checkpoint_sequential``)."""
    return _with_runs(profile, lambda a, b: _segments(a, b, max(1, round(math.sqrt(b - a)))))


@register_strategy("revolve", "binomial")
def _revolve(profile: Profile, budget_bytes: int | None, *, snapshots: int | None = None) -> Sequence[Item]:
    """Binomial checkpointing; with no ``snapshots`` given, the fastest count that fits the budget."""
    if snapshots is not None:
        _positive("revolve", "snapshots", snapshots)
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
def optimal_strategy(profile: Profile, budget_bytes: int | None, *, slots: int = 500) -> Sequence[Item]:
    """Least-time persistent schedule under the byte budget (Beaumont et al. 2019), multi-level.

    Note: [Discretisation] The DP rounds every size up to whole slots, which is safe but loses up to
    about one slot per term of a peak. So the table is solved for a budget inflated by ``L / slots``
    (at most 50%), and the candidate plans are read from the largest slot count down, each simulated
    with exact bytes, until one fits the real budget (the one at ``slots * delta <= budget`` always
    does). The fixed baselines (none, every, sqrt, revolve) are simulated too, and the fastest plan
    that fits is returned, so ``optimal`` is never slower than a baseline at the same budget. With block
    options, the DP's plan without them is read too, so options never make a plan slower. When the DP
    finds none that fits, the plan of least peak (:mod:`remat.planning.min_peak`, exact bytes) is tried
    too: so every budget from the smallest peak up is met.
    """
    if budget_bytes is None:
        return _none(profile, None)
    _positive("optimal", "slots", slots)
    candidates: list[tuple[float, int, tuple[Item, ...]]] = []

    def consider(items: Sequence[Item]) -> None:
        pred = simulate(profile, items)
        if pred.peak_bytes <= budget_bytes:
            candidates.append((pred.time_s, pred.peak_bytes, tuple(items)))

    dp_items = _dp_items(profile, budget_bytes, slots)
    if dp_items is not None:
        consider(dp_items)
    for baseline in baselines(profile, budget_bytes):
        consider(baseline)
    # The DP over-charges on the safe side, so the fastest table plan that fits can lose to one the table
    # without options reads first, or to the least-peak plan below: options never make a plan slower.
    bare_items = dp_items
    if any(s.options for s in profile.stages):
        bare = dataclasses.replace(profile, stages=tuple(dataclasses.replace(s, options=()) for s in profile.stages))
        bare_items = _dp_items(bare, budget_bytes, slots)
        if bare_items is not None:
            consider(bare_items)
    if not candidates or bare_items is None:  # at the very edge, the DP's safe side can miss what the
        consider(min_peak_items(profile)[1])  # simulator allows
    if not candidates:
        return _none(profile, None)  # solve() reports it as infeasible
    return min(candidates, key=lambda c: (c[0], c[1]))[2]


def _dp_items(profile: Profile, budget_bytes: int, slots: int) -> tuple[Item, ...] | None:
    """The DP's fastest plan that fits ``budget_bytes`` when simulated (see the Note above), or None."""
    act = int((budget_bytes - profile.base_bytes) / (1 + profile.safety_fraction))
    if act < 0:
        return None
    n = len(profile.stages)
    table = _optimal.solve_table(profile, int(act * (1 + min(0.5, n / max(1, slots)))), slots)
    exact_top = act // table.delta
    for m in table.feasible_slots()[::-1]:
        items = table.items(int(m))
        if simulate(profile, items).peak_bytes <= budget_bytes:
            return items
        if m <= exact_top:
            return None
    return None


def baselines(profile: Profile, budget_bytes: int | None) -> list[Sequence[Item]]:
    """The plans of none, every, sqrt and revolve (fitted to ``budget_bytes``)."""
    return [_none(profile, None), _every(profile, None), _sqrt(profile, None), _revolve(profile, budget_bytes)]


@register_strategy("auto")
def _auto(profile: Profile, budget_bytes: int | None, *, slots: int = 500) -> Sequence[Item]:
    """``optimal``; for chains longer than 160 stages, with slots cut so that L^3 * slots stays within
    what ``optimal`` solves in about a second at 160 stages (and never fewer than 50)."""
    _positive("auto", "slots", slots)
    n = len(profile.stages)
    if n > AUTO_MAX_EXACT_STAGES:
        slots = max(50, int(slots * (AUTO_MAX_EXACT_STAGES / n) ** 3))
    return optimal_strategy(profile, budget_bytes, slots=slots)


# ---- transitional -------------------------------------------------------------------------------
# solve, frontier and min_feasible_plan moved to remat.planning.solve, which imports this module; they
# stay importable from here until every caller imports them from there. This lazy import is a cycle
# (tests/test_architecture.py names it): remove it once no caller needs it.
