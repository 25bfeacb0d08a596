"""The planning layer: torch-free, exact against exhaustive search, never over budget."""

import math
import subprocess
import sys
from functools import cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from remat import (
    BudgetError,
    InfeasibleBudgetError,
    Plan,
    PlanError,
    Profile,
    ProfileError,
    Record,
    Region,
    RematError,
    frontier,
    register_strategy,
    simulate,
    solve,
    strategies,
)
from remat.planning import optimal as _optimal
from remat.planning.revolve import extra_forwards, extra_forwards_closed_form, revolve_items
from remat.planning.strategies import min_feasible_plan

BASELINES = ["none", "every", "sqrt", "uniform", "revolve"]


def chain(n, seed=0, **kw):
    import random

    rng = random.Random(seed)
    return Profile.from_lists(
        [rng.randint(1, 12) for _ in range(n)],
        [rng.randint(1, 30) for _ in range(n - 1)] + [0],
        [rng.uniform(0.5, 2.0) for _ in range(n)],
        [rng.uniform(1.0, 4.0) for _ in range(n)],
        fwd_transient_bytes=[rng.randint(0, 5) for _ in range(n)],
        fwd_nograd_transient_bytes=[rng.randint(0, 5) for _ in range(n)],
        bwd_transient_bytes=[rng.randint(0, 8) for _ in range(n)],
        fixed_bytes=kw.get("fixed", 7),
    )


# ---- exhaustive reference -------------------------------------------------------------------------


def all_plans(i, l):
    """Every plan of the DP's space for stages i..l: Record(i)+rest, or Region(i..j-1)+rest (j <= l),
    the region's body any plan of i..j-1. Regions nest freely."""

    @cache
    def plans(i, l):
        out = []
        if i == l:
            return ((Record(i),),)
        for rest in plans(i + 1, l):
            out.append((Record(i), *rest))
        for j in range(i + 1, l + 1):
            for body in plans(i, j - 1):
                for rest in plans(j, l):
                    out.append((Region(i, j, body), *rest))
        return tuple(out)

    return plans(i, l)


def exhaustive(profile, budget):
    best = None
    for items in all_plans(0, len(profile.stages) - 1):
        pred = simulate(profile, items)
        if pred.peak_bytes <= budget and (best is None or pred.time_s < best[0] - 1e-12):
            best = (pred.time_s, items)
    return best


chains = st.integers(min_value=2, max_value=6).flatmap(
    lambda n: st.builds(
        lambda x, xb, uf, ub, of, ofn, ob, fr, fixed: Profile.from_lists(
            x, [*xb[: n - 1], 0], uf, ub, fwd_transient_bytes=of, fwd_nograd_transient_bytes=ofn,
            bwd_transient_bytes=ob, fixed_bytes=fixed,
        ).__class__(
            stages=tuple(
                s.__class__(**{**s.__dict__, "input_freed_bytes": min(f, s.x_bytes) if 0 < k < n - 1 else 0})
                for k, (s, f) in enumerate(zip(Profile.from_lists(
                    x, [*xb[: n - 1], 0], uf, ub, fwd_transient_bytes=of, fwd_nograd_transient_bytes=ofn,
                    bwd_transient_bytes=ob).stages, fr))
            ),
            fixed_bytes=fixed,
        ),
        st.lists(st.integers(1, 12), min_size=n, max_size=n),
        st.lists(st.integers(0, 30), min_size=n, max_size=n),
        st.lists(st.floats(0.1, 3.0), min_size=n, max_size=n),
        st.lists(st.floats(0.1, 6.0), min_size=n, max_size=n),
        st.lists(st.integers(0, 6), min_size=n, max_size=n),
        st.lists(st.integers(0, 6), min_size=n, max_size=n),
        st.lists(st.integers(0, 9), min_size=n, max_size=n),
        st.lists(st.integers(0, 12), min_size=n, max_size=n),
        st.integers(0, 20),
    )
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(profile=chains, share=st.floats(0.0, 1.0))
def test_optimal_equals_exhaustive_search(profile, share):
    """Sizes are small ints, so one memory slot is one byte: the DP is exact and must match."""
    none = simulate(profile, solve(profile, None, strategy="none")).peak_bytes
    low = min(simulate(profile, items).peak_bytes for items in all_plans(0, len(profile.stages) - 1))
    budget = int(low + share * (none - low))
    ref = exhaustive(profile, budget)
    assert ref is not None
    plan = solve(profile, budget, strategy="optimal")
    assert plan.peak_bytes <= budget
    assert plan.time_s == pytest.approx(ref[0], rel=1e-6, abs=1e-9)


def test_optimal_on_seven_stages_equals_exhaustive():
    for seed in range(4):
        p = chain(7, seed)
        none = simulate(p, solve(p, None, strategy="none")).peak_bytes
        for share in (0.0, 0.3, 0.7):
            low = min_feasible_plan(p).peak_bytes
            budget = int(low + share * (none - low))
            ref = exhaustive(p, budget)
            assert ref is not None
            assert solve(p, budget).time_s == pytest.approx(ref[0], rel=1e-6)


def test_min_feasible_is_the_exhaustive_minimum():
    for seed in range(6):
        p = chain(6, seed)
        low = min(simulate(p, items).peak_bytes for items in all_plans(0, 5))
        assert min_feasible_plan(p).peak_bytes == low


def test_dp_value_equals_simulated_time_of_its_plan():
    p = chain(30, 3)
    p = Profile(stages=p.stages, fixed_bytes=p.fixed_bytes)
    none = simulate(p, solve(p, None, strategy="none")).peak_bytes
    act = none - p.base_bytes
    table = _optimal.solve_table(p, act, 400)
    checked = 0
    for m in table.feasible_slots()[::7]:
        items = table.items(int(m))
        pred = simulate(p, items)
        assert pred.time_s == pytest.approx(float(table.cost[0, 0, -1, m]), rel=1e-5)
        assert pred.peak_bytes - p.base_bytes <= m * table.delta  # rounding up never under-counts
        checked += 1
    assert checked > 5


# ---- revolve ------------------------------------------------------------------------------------


def test_revolve_recurrence_matches_closed_form():
    for l in range(1, 101):
        for s in range(1, 11):
            assert extra_forwards(l, s) == extra_forwards_closed_form(l, s), (l, s)


@pytest.mark.parametrize(("l", "s"), [(1, 1), (2, 1), (7, 2), (20, 3), (55, 4), (100, 10)])
def test_revolve_plan_recomputes_exactly_t(l, s):
    p = Profile.from_lists([1] * (l + 1), [1] * l + [0], [1.0] * (l + 1), [1.0] * (l + 1))
    items = (*revolve_items(0, l, s), Record(l))
    pred = simulate(p, items)
    assert sum(pred.forwards) - (l + 1) == extra_forwards(l, s)
    plan = solve(p, None, strategy="revolve", snapshots=s)
    assert sum(plan.prediction.forwards) - (l + 1) == extra_forwards(l, s)


# ---- every strategy, every budget -----------------------------------------------------------------


@pytest.mark.parametrize("strategy", [*BASELINES, "optimal", "auto"])
@pytest.mark.parametrize("seed", range(5))
def test_strategy_peak_is_within_budget_or_refused(strategy, seed):
    p = chain(12, seed)
    none = simulate(p, solve(p, None, strategy="none")).peak_bytes
    low = min_feasible_plan(p).peak_bytes
    for budget in (none, (low + none) // 2, low, low - 1):
        try:
            plan = solve(p, budget, strategy=strategy)
        except InfeasibleBudgetError as e:
            assert e.min_feasible_bytes == low
            assert strategy != "optimal" or budget < low
            continue
        assert plan.peak_bytes <= budget
        assert plan.prediction == simulate(p, plan.items)


@pytest.mark.parametrize("seed", range(8))
def test_optimal_is_never_slower_than_any_baseline_at_the_same_budget(seed):
    p = chain(16, seed)
    none = simulate(p, solve(p, None, strategy="none")).peak_bytes
    low = min_feasible_plan(p).peak_bytes
    for k in range(6):
        budget = low + (none - low) * k // 5
        best = solve(p, budget).time_s
        for s in BASELINES:
            try:
                other = solve(p, budget, strategy=s)
            except InfeasibleBudgetError:
                continue
            assert best <= other.time_s + 1e-9, (s, budget)


def test_frontier_is_monotone_and_spans_min_to_none():
    p = chain(20, 1)
    pts = frontier(p)
    none = simulate(p, solve(p, None, strategy="none"))
    assert len(pts) >= 3
    assert pts[0].peak_bytes == min_feasible_plan(p).peak_bytes
    assert pts[-1].peak_bytes <= none.peak_bytes and pts[-1].time_s == pytest.approx(none.time_s)
    for a, b in zip(pts, pts[1:]):
        assert a.peak_bytes < b.peak_bytes
        assert a.time_s > b.time_s


def test_infeasible_budget_message_names_budget_minimum_and_fix():
    p = Profile.from_lists([2**30] * 4, [3 * 2**30] * 3 + [0], [1.0] * 4, [1.0] * 4, fixed_bytes=2**31)
    with pytest.raises(InfeasibleBudgetError) as e:
        solve(p, "3GiB")
    msg = str(e.value)
    assert "3.00 GiB" in msg and "smallest feasible peak" in msg and "Raise the budget" in msg
    assert e.value.min_feasible_bytes > 3 * 2**30


def test_strategy_that_does_not_fit_points_to_optimal():
    p = chain(10, 2)
    every = solve(p, None, strategy="every").peak_bytes
    low = min_feasible_plan(p).peak_bytes
    if low < every:
        with pytest.raises(InfeasibleBudgetError, match="strategy 'every' needs"):
            solve(p, every - 1, strategy="every")


def test_bad_inputs_raise_clear_errors():
    p = chain(4)
    with pytest.raises(RematError, match="unknown strategy 'fastest'"):
        solve(p, None, strategy="fastest")
    with pytest.raises(BudgetError, match="'lots'"):
        solve(p, "lots")
    with pytest.raises(RematError, match=r"expected a remat\.Profile"):
        solve([1, 2, 3], "1GiB")
    with pytest.raises(ProfileError, match="empty"):
        Profile(stages=())
    with pytest.raises(ProfileError, match="x_bytes=-1"):
        Profile.from_lists([-1, 1], [1, 0], [1.0, 1.0], [1.0, 1.0])
    with pytest.raises(ProfileError, match="xbar_bytes has 1 entries"):
        Profile.from_lists([1, 1], [1], [1.0, 1.0], [1.0, 1.0])
    with pytest.raises(RematError, match="segments"):
        solve(p, None, strategy="uniform", segments=0)


def test_user_strategies_are_registered_and_validated():
    p = chain(6)

    @register_strategy("first-half")
    def first_half(profile, budget_bytes):
        n = len(profile.stages)
        h = (n - 1) // 2
        return (Region(0, h, tuple(Record(k) for k in range(h))), *(Record(k) for k in range(h, n)))

    assert "first-half" in strategies()
    assert solve(p, None, strategy="first-half").strategy == "first-half"
    with pytest.raises(PlanError, match="cannot be checkpointed"):
        def everything(prof, b):
            n = len(prof.stages)
            return (Region(0, n, tuple(Record(k) for k in range(n))),)

        solve(p, None, strategy=everything)
    with pytest.raises(PlanError, match="expected stage 1"):
        solve(p, None, strategy=lambda prof, b: (Record(0), Record(2)))


def test_plan_and_profile_round_trip_through_json():
    p = chain(9, 4)
    q = Profile.from_json(p.to_json())
    assert q == p
    plan = solve(p, (min_feasible_plan(p).peak_bytes + simulate(p, solve(p, None, strategy="none")).peak_bytes) // 2)
    again = Plan.from_json(plan.to_json())
    assert again.items == plan.items and again.prediction == plan.prediction
    text = str(plan)
    assert "checkpoint" in text and "total" in text and "predicted peak" in text
    assert "stage" in str(p)


def test_chain_with_unjoinable_stages_never_regions_across_them():
    base = chain(8, 5)
    stages = list(base.stages)
    stages[4] = stages[4].__class__(**{**stages[4].__dict__, "joins_previous": False})
    p = Profile(stages=tuple(stages), fixed_bytes=base.fixed_bytes)
    for s in ["every", "sqrt", "revolve", "optimal"]:
        plan = solve(p, min_feasible_plan(p).peak_bytes, strategy=s) if s == "optimal" else solve(p, None, strategy=s)
        for region in plan.regions():
            assert not (region.start < 4 < region.stop), (s, region)


def test_planning_layer_imports_no_torch():
    code = (
        "import sys; import remat; from remat import solve, simulate, frontier, Profile;"
        "p = Profile.from_lists([1,2,3], [4,5,0], [1.,1.,1.], [1.,1.,1.]); solve(p, None); frontier(p);"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_long_chains_solve_with_auto():
    p = chain(170, 7)
    none = simulate(p, solve(p, None, strategy="none")).peak_bytes
    plan = solve(p, int(0.6 * none), strategy="auto")
    assert plan.peak_bytes <= int(0.6 * none)
    assert math.isfinite(plan.time_s)
