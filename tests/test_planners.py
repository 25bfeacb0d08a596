"""The planning layer: torch-free, exact against exhaustive search, never over budget."""

import dataclasses
import inspect
import math
import random
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
from remat.planning.min_peak import min_peak_items
from remat.planning.plan import Prediction
from remat.planning.profile import Stage
from remat.planning.revolve import extra_forwards, extra_forwards_closed_form, revolve_items
from remat.planning.solve import make_plan, min_feasible_peak, min_feasible_plan
from remat.planning.strategies import strategy_options
from remat.units import format_bytes

BASELINES = ["none", "every", "sqrt", "uniform", "revolve"]


def chain(n, seed=0, **kw):
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


def allowed(profile, items):
    """Whether every region of ``items`` holds only checkpointable stages that join the one before."""
    st = profile.stages
    for it in items:
        if isinstance(it, Region):
            if not all(st[k].checkpointable and (k == it.start or st[k].joins_previous)
                       for k in range(it.start, it.stop)):
                return False
            if not allowed(profile, it.body):
                return False
    return True


def plans_of(profile):
    """Every plan of the DP's space that the chain allows (regions over checkpointable stages only)."""
    return [items for items in all_plans(0, len(profile.stages) - 1) if allowed(profile, items)]


def exhaustive(profile, budget, plans=None):
    best = None
    for items in plans if plans is not None else all_plans(0, len(profile.stages) - 1):
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


def test_optimal_equals_exhaustive_with_recomputation_holds_and_copies():
    """A region's body is charged what its end holds and what its recomputation copies (norm statistics
    of every stage in it) in the DP exactly as in the simulator: one slot is one byte, so they agree."""
    charged = 0
    for seed in range(4):
        rng = random.Random(seed)
        base = chain(6, seed)
        p = Profile(stages=tuple(dataclasses.replace(s, recompute_hold_bytes=rng.randint(0, 3),
                                                     recompute_copy_bytes=rng.randint(0, 6) if s.checkpointable else 0)
                                 for s in base.stages), fixed_bytes=base.fixed_bytes)
        plain = Profile(stages=tuple(dataclasses.replace(s, recompute_copy_bytes=0) for s in p.stages),
                        fixed_bytes=p.fixed_bytes)
        long_region = (Record(0), Region(1, 5, tuple(Record(k) for k in range(1, 5))), Record(5))
        copies = sum(s.recompute_copy_bytes for s in p.stages[1:5])
        assert simulate(p, long_region).peak_bytes <= simulate(plain, long_region).peak_bytes + copies
        charged += simulate(p, long_region).peak_bytes > simulate(plain, long_region).peak_bytes
        none = simulate(p, solve(p, None, strategy="none")).peak_bytes
        low = min(simulate(p, items).peak_bytes for items in all_plans(0, 5))
        assert min_feasible_plan(p).peak_bytes == low
        for share in (0.0, 0.4, 0.8):
            budget = int(low + share * (none - low))
            ref = exhaustive(p, budget)
            assert ref is not None
            assert solve(p, budget).time_s == pytest.approx(ref[0], rel=1e-6)
    assert charged > 0


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


def test_infeasible_share_budget_says_what_share_is_the_least():
    """A user asked for '50%' and read only MiB figures: the message names the no-checkpointing peak the
    share is of, and the least feasible share."""
    p = Profile.from_lists([2**30] * 4, [3 * 2**30] * 3 + [0], [1.0] * 4, [1.0] * 4, fixed_bytes=2**31)
    with pytest.raises(InfeasibleBudgetError) as e:
        solve(p, "50%")
    none = solve(p, None, strategy="none").peak_bytes
    least = -(-100 * e.value.min_feasible_bytes // none)
    assert f"{least}% of the peak without checkpointing ({format_bytes(none)})" in str(e.value)
    assert solve(p, f"{least}%").peak_bytes <= none * least / 100


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
    with pytest.raises(PlanError, match=r"plan item 1 \(record 2\) starts at stage 2: stage 1 missing"):
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


# ---- glue: a non-checkpointable stage between blocks -------------------------------------------------


def with_glue(profile, glue, joins=()):
    """``profile`` with stage ``glue`` made code between blocks (never checkpointed), and the stages in
    ``joins`` unable to share a region with the stage before them."""
    stages = list(profile.stages)
    stages[glue] = dataclasses.replace(stages[glue], kind="glue", checkpointable=False)
    for k in joins:
        stages[k] = dataclasses.replace(stages[k], joins_previous=False)
    return dataclasses.replace(profile, stages=tuple(stages))


glue_chains = chains.filter(lambda p: len(p.stages) >= 4).flatmap(
    lambda p: st.builds(
        with_glue, st.just(p), st.integers(1, len(p.stages) - 2),
        st.sets(st.integers(1, len(p.stages) - 1), max_size=1),
    )
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(profile=glue_chains, share=st.floats(0.0, 1.0))
def test_optimal_equals_exhaustive_search_with_glue_in_the_middle(profile, share):
    plans = plans_of(profile)
    none = simulate(profile, solve(profile, None, strategy="none")).peak_bytes
    low = min(simulate(profile, items).peak_bytes for items in plans)
    assert min_feasible_peak(profile) == low
    budget = int(low + share * (none - low))
    ref = exhaustive(profile, budget, plans)
    plan = solve(profile, budget, strategy="optimal")
    assert plan.peak_bytes <= budget
    assert plan.time_s == pytest.approx(ref[0], rel=1e-6, abs=1e-9)
    glue = profile.kinds.index("glue")
    for s in [*BASELINES, "optimal"]:
        try:
            made = solve(profile, budget, strategy=s)
        except InfeasibleBudgetError:
            continue
        assert all(not (r.start <= glue < r.stop) for r in made.regions()), (s, made.items)


def test_glue_stages_are_never_checkpointable():
    with pytest.raises(ProfileError, match="a glue stage cannot be checkpointed"):
        Stage("between", 1, 1, 1.0, 1.0, kind="glue")
    with pytest.raises(ProfileError, match="a head stage cannot be checkpointed"):
        Stage("<head>", 1, 1, 1.0, 1.0, kind="head")
    p = Profile.from_lists([4] * 6, [9] * 5 + [0], [1.0] * 6, [1.0] * 6,
                           kinds=["prologue", "block", "glue", "block", "block", "head"])
    assert [s.checkpointable for s in p.stages] == [False, True, False, True, True, False]
    assert p.block_indices() == (1, 3, 4)
    plan = solve(p, None, strategy="every")
    assert plan.block_indices() == (1, 3, 4) and plan.stage_kinds == p.kinds
    assert [(r.start, r.stop) for r in plan.regions()] == [(1, 2), (3, 4), (4, 5)]


# ---- the true minimum ---------------------------------------------------------------------------------


def large_chain(n, seed, sides=False):
    """A chain with real-model-sized numbers (so one DP memory slot is many bytes) and every term the
    profiler measures: freed inputs, released outputs, recomputation extras, a head residual, safety;
    ``sides``: long-lived side tensors and their gradients on about a third of the stages."""
    rng = random.Random(seed)
    p = Profile.from_lists(
        [rng.randint(1_000, 120_000) for _ in range(n)],
        [rng.randint(0, 300_000) for _ in range(n - 1)] + [0],
        [rng.uniform(0.1, 2.0) for _ in range(n)],
        [rng.uniform(0.1, 3.0) for _ in range(n)],
        fwd_transient_bytes=[rng.randint(0, 50_000) for _ in range(n)],
        fwd_nograd_transient_bytes=[rng.randint(0, 50_000) for _ in range(n)],
        bwd_transient_bytes=[rng.randint(0, 80_000) for _ in range(n)],
    )
    stages = [
        dataclasses.replace(
            s,
            input_freed_bytes=rng.randint(0, s.x_bytes) if 0 < k < n - 1 else 0,
            output_released_bytes=rng.randint(0, 10_000),
            recompute_bwd_extra_bytes=rng.randint(0, 30_000),
            recompute_hold_bytes=rng.randint(0, 20_000),
            recompute_copy_bytes=rng.randint(0, 4_000) if s.checkpointable else 0,
            joins_previous=rng.random() > 0.1,
            checkpointable=s.checkpointable and rng.random() > 0.1,
            side_bytes=rng.randint(1, 60_000) if sides and k < n - 1 and rng.random() < 0.35 else 0,
            side_grad_bytes=rng.randint(0, 60_000) if sides and k < n - 1 and rng.random() < 0.2 else 0,
        )
        for k, s in enumerate(p.stages)
    ]
    return Profile(stages=tuple(stages), fixed_bytes=rng.randint(0, 10**6), safety_fraction=0.002,
                   head_residual_bytes=rng.randint(0, 5_000))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(2, 40), seed=st.integers(0, 10**6), sides=st.booleans())
def test_min_feasible_peak_is_exact_in_bytes(n, seed, sides):
    """The smallest feasible peak is exact, not within a memory slot: ``solve(p, low)`` returns a plan
    (peaking at exactly ``low``), ``solve(p, low - 1)`` raises and reports ``low``, and the infeasible
    message, min_feasible_plan and the frontier's first point all say ``low`` (with side tensors too)."""
    p = large_chain(n, seed, sides)
    low = min_feasible_peak(p)
    assert solve(p, low).peak_bytes == low
    with pytest.raises(InfeasibleBudgetError) as e:
        solve(p, low - 1)
    assert e.value.min_feasible_bytes == low
    assert remat_bytes(low) in str(e.value)
    assert min_feasible_plan(p).peak_bytes == low


def remat_bytes(n):
    from remat import format_bytes

    return format_bytes(n)


@pytest.mark.parametrize("sides", [False, True])
def test_min_peak_dp_matches_the_simulator_and_the_exhaustive_minimum(sides):
    for seed in range(8):
        p = large_chain(6, seed, sides)
        peak, items = min_peak_items(p)
        assert simulate(p, items).peak_bytes == peak
        assert peak == min(simulate(p, it).peak_bytes for it in plans_of(p))


def test_min_feasible_is_below_what_the_slotted_dp_finds():
    """The filed bug: the smallest budget the DP's slots could see sat above plans that exist."""
    lower = 0
    for seed in range(12):
        p = large_chain(30, seed)
        act = simulate(p, solve(p, None, strategy="none")).peak_bytes - p.base_bytes
        table = _optimal.solve_table(p, act, 500)
        slotted = simulate(p, table.items(int(table.feasible_slots()[0]))).peak_bytes
        low = min_feasible_peak(p)
        assert low <= slotted
        lower += low < slotted
    assert lower > 0


def test_frontier_starts_at_the_true_minimum():
    p = large_chain(25, 3)
    pts = frontier(p)
    assert pts[0].peak_bytes == min_feasible_peak(p)
    assert all(a.peak_bytes < b.peak_bytes and a.time_s > b.time_s for a, b in zip(pts, pts[1:]))


# ---- plans are built in one place ---------------------------------------------------------------------


def test_every_plan_carries_the_profile_facts():
    """solve, min_feasible_plan and frontier build plans alike: input shapes (so a smaller last batch is
    accepted on apply), stage names and kinds, fingerprint."""
    base = chain(8, 2)
    shapes = (((8, 64), "torch.float32"), ((8,), "torch.int64"))
    p = dataclasses.replace(base, input_shapes=shapes, fingerprint="abc:def")
    plans = [solve(p, None), solve(p, min_feasible_peak(p)), min_feasible_plan(p), *frontier(p)]
    for plan in plans:
        assert plan.input_shapes == shapes
        assert plan.stage_names == p.names and plan.stage_kinds == p.kinds
        assert plan.fingerprint == "abc:def"
        assert plan.prediction == simulate(p, plan.items)
        assert Plan.from_json(plan.to_json()) == plan


def test_make_plan_validates():
    p = chain(5)
    with pytest.raises(PlanError, match=r"plan item 0 \(region 0..4\) contains stage 4, which cannot be"):
        make_plan(p, (Region(0, 5, tuple(Record(k) for k in range(5))),), strategy="x", budget_bytes=None)
    plan = make_plan(p, tuple(Record(k) for k in range(5)), strategy="x", budget_bytes=7, options={"a": 1})
    assert plan.budget_bytes == 7 and plan.options == {"a": 1} and plan.strategy == "x"


def test_profile_input_shapes_are_a_field_and_read_from_legacy_meta():
    p = dataclasses.replace(chain(4), input_shapes=[[[8, 64], "torch.float32"]])
    assert p.input_shapes == (((8, 64), "torch.float32"),)
    assert Profile.from_json(p.to_json()) == p
    legacy = p.to_dict()
    del legacy["input_shapes"]
    legacy["meta"] = {"input_shapes": [[[8, 64], "torch.float32"]]}
    assert Profile.from_dict(legacy).input_shapes == p.input_shapes


def test_legacy_plan_without_kinds_infers_them():
    names = ("<prologue>", "h.0", "h.1", "<head>")
    plan = Plan((Record(0), Region(1, 3, (Record(1), Record(2))), Record(3)), "every", None,
                Prediction(0, 0.0, 0.0, 0.0, (), (), 0), names)
    assert plan.stage_kinds == ("prologue", "block", "block", "head")
    assert plan.block_indices() == (1, 2)
    assert plan.validate() is plan


# ---- typed options -------------------------------------------------------------------------------------


def test_a_misspelt_option_lists_the_valid_ones():
    p = chain(6)
    with pytest.raises(RematError) as e:
        solve(p, None, strategy="uniform", segmnts=2)
    assert str(e.value) == (
        "remat.solve: strategy 'uniform' has no option 'segmnts'; valid options: segments (int, default 2)"
    )
    with pytest.raises(RematError, match=r"strategy 'none' has no option 'slots'; valid options: none"):
        solve(p, None, strategy="none", slots=3)
    with pytest.raises(RematError, match=r"snapshots \(int \| None, default None\)"):
        solve(p, None, strategy="revolve", snapshot=3)
    with pytest.raises(RematError, match=r"option segments='2' must be int \(str given\)"):
        solve(p, None, strategy="uniform", segments="2")
    with pytest.raises(RematError, match=r"option slots=2.5 must be int"):
        solve(p, 100, strategy="optimal", slots=2.5)
    with pytest.raises(RematError, match=r"option snapshots=True must be int \| None"):
        solve(p, None, strategy="revolve", snapshots=True)
    assert solve(p, None, strategy="revolve", snapshots=None).strategy == "revolve"


def test_every_registered_strategy_declares_typed_options():
    for name in strategies():
        options, _ = strategy_options(name)
        for o in options:
            assert o.default is not inspect.Parameter.empty and o.type_name != "any type", (name, o)


def test_user_strategy_options_are_checked_and_duplicates_refused():
    p = chain(6)

    def halves(profile, budget_bytes, *, cut: int = 2):
        n = len(profile.stages)
        return (Region(0, cut, tuple(Record(k) for k in range(cut))), *(Record(k) for k in range(cut, n)))

    register_strategy("halves-test", "halves-alias")(halves)
    assert solve(p, None, strategy="halves-alias", cut=3).items[0] == Region(0, 3, (Record(0), Record(1), Record(2)))
    with pytest.raises(RematError, match="has no option 'cutt'; valid options: cut"):
        solve(p, None, strategy="halves-test", cutt=3)
    with pytest.raises(RematError, match="'halves-test' is already taken by strategy 'halves-test'"):
        register_strategy("halves-test")(halves)
    with pytest.raises(RematError, match="'halves-alias' is already taken by strategy 'halves-test'"):
        register_strategy("other-test", "halves-alias")(halves)
    with pytest.raises(RematError, match="'optimal' is already taken"):
        register_strategy("optimal")(halves)
    register_strategy("halves-test", replace=True)(lambda prof, b: tuple(Record(k) for k in range(len(prof))))
    assert solve(p, None, strategy="halves-test").regions is not None
    assert not list(solve(p, None, strategy="halves-test").regions())

    def open_ended(profile, budget_bytes, **anything):
        return tuple(Record(k) for k in range(len(profile.stages)))

    assert solve(p, None, strategy=open_ended, whatever=1).options == {"whatever": 1}


def test_a_strategy_may_return_any_iterable_of_items_but_nothing_else():
    p = chain(4)
    assert solve(p, None, strategy=lambda prof, b: (Record(k) for k in range(4))).items == tuple(map(Record, range(4)))
    with pytest.raises(PlanError, match=r"strategy '<lambda>' returned None; expected a sequence of plan items"):
        solve(p, None, strategy=lambda prof, b: None)
    with pytest.raises(PlanError, match=r"plan item 0: 0 is not a remat.Record or remat.Region"):
        solve(p, None, strategy=lambda prof, b: [0, 1, 2, 3])


def test_the_every_block_plan_is_charged_its_measured_peak_while_the_profile_is_the_one_measured():
    """Note [Safety margin]: the calibration run's measured peak replaces the model's figure and the margin for
    that one plan, below the model's figure too, and is dropped once the stages change (a per-rank profile)."""
    from remat.planning.simulate import with_measured_every

    p = Profile.from_lists([1000, 4000, 4000, 4000, 4000], [8000, 8000, 8000, 8000, 0], [1.0] * 5, [2.0] * 5,
                           kinds=["prologue", "block", "block", "block", "head"])
    p = dataclasses.replace(p, safety_fraction=0.002)
    every = solve(p, None, strategy="every").items
    halves = solve(p, None, strategy="uniform", segments=2).items
    raw = simulate(dataclasses.replace(p, safety_fraction=0.0), every).peak_bytes
    assert simulate(p, every).peak_bytes > raw  # no measurement: the margin
    for measured in (raw - 100, raw, raw + 100):
        q = with_measured_every(dataclasses.replace(p, device="cpu", meta={"measured_every_peak_bytes": measured,
                                                                           "sizes": "measured"}))
        assert simulate(q, every).peak_bytes == measured
        assert simulate(q, halves).peak_bytes == simulate(p, halves).peak_bytes  # other plans keep it
        changed = dataclasses.replace(q, stages=(q.stages[0], dataclasses.replace(q.stages[1], x_bytes=3000),
                                                 *q.stages[2:]))
        assert simulate(changed, every).peak_bytes == simulate(dataclasses.replace(changed, meta={}), every).peak_bytes
    measured_at = dataclasses.replace(p, device="cpu", meta={"measured_every_peak_bytes": raw, "sizes": "measured"})
    assert solve(with_measured_every(measured_at), raw).time_s == simulate(p, every).time_s
    # Sizes from a fake copy, or kept once already (fixed memory may have grown since): nothing changes.
    for meta in ({"measured_every_peak_bytes": raw, "sizes": "fake"},):
        assert with_measured_every(dataclasses.replace(p, device="cpu", meta=meta)).meta == meta
    kept = with_measured_every(measured_at)
    assert with_measured_every(dataclasses.replace(kept, fixed_bytes=kept.fixed_bytes + 5000)).meta == kept.meta


# ---- long-lived side tensors (Note [Side tensors] in remat.planning.cost) ----------------------------------


def with_sides(profile, side, grad):
    """``profile`` with stage k making ``side[k]`` bytes of side tensors (a skip connection, an encoder output)
    whose gradients take ``grad[k]``; the head makes none."""
    n = len(profile.stages)
    stages = tuple(dataclasses.replace(s, side_bytes=side[k] if k < n - 1 else 0,
                                       side_grad_bytes=grad[k] if k < n - 1 and side[k] else 0)
                   for k, s in enumerate(profile.stages))
    return dataclasses.replace(profile, stages=stages)


sparse = st.one_of(st.just(0), st.integers(1, 12))
side_chains = st.one_of(chains, glue_chains).flatmap(
    lambda p: st.builds(with_sides, st.just(p), st.lists(sparse, min_size=len(p), max_size=len(p)),
                        st.lists(st.integers(0, 8), min_size=len(p), max_size=len(p)))
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(profile=side_chains, share=st.floats(0.0, 1.0))
def test_optimal_and_least_peak_equal_exhaustive_search_with_side_tensors(profile, share):
    """One slot is one byte: the DP's value is the exhaustive optimum and its plan's simulated time, and the
    least-peak DP finds the exhaustive least peak, with side tensors charged over their producers' lives."""
    plans = plans_of(profile)
    low = min(simulate(profile, items).peak_bytes for items in plans)
    assert min_feasible_peak(profile) == low
    peak, items = min_peak_items(profile)
    assert simulate(profile, items).peak_bytes == peak >= low
    none = simulate(profile, solve(profile, None, strategy="none")).peak_bytes
    budget = int(low + share * (none - low))
    ref = exhaustive(profile, budget, plans)
    act = budget - profile.base_bytes
    table = _optimal.solve_table(profile, act, slots=max(1, act))
    assert table.delta == 1
    pred = simulate(profile, table.items(act))
    assert pred.peak_bytes <= budget
    assert pred.time_s == pytest.approx(float(table.cost[_optimal.PINNED, 0, -1, act]), rel=1e-5)
    assert pred.time_s == pytest.approx(ref[0], rel=1e-5, abs=1e-9)
    assert solve(profile, budget).time_s == pytest.approx(ref[0], rel=1e-6, abs=1e-9)


def test_optimal_with_selective_options_and_side_tensors_equals_exhaustive_search():
    """A Selective item keeps its side tensors beside the option's bytes in its forward, while the rest
    runs, and in its body: the DP and the simulator agree with exhaustive search over Record, Selective and
    Region items."""
    from remat.planning.plan import Selective
    from remat.planning.profile import BlockOption

    def plans(st_, i, l):
        heads = [Record(i), *(Selective(i, o.name, o.save) for o in st_[i].options)]
        out = [(h,) for h in heads] if i == l else [(h, *r) for h in heads for r in plans(st_, i + 1, l)]
        for j in range(i + 1, l + 1):
            if all(st_[k].checkpointable for k in range(i, j)):
                out += [(Region(i, j, b), *r) for b in plans(st_, i, j - 1) for r in plans(st_, j, l)]
        return out

    chose = 0
    for seed in range(10):
        rng = random.Random(seed)
        base = with_sides(chain(5, seed), [rng.choice([0, 0, 3, 9]) for _ in range(5)],
                          [rng.randint(0, 4) for _ in range(5)])
        p = dataclasses.replace(base, stages=tuple(
            dataclasses.replace(s, options=(BlockOption("o", ("aten.mm.default",), rng.randint(1, max(1, s.xbar_bytes)),
                                                        0.3 * s.fwd_s, rng.randint(0, 4), rng.randint(0, 3)),))
            if s.checkpointable else s for s in base.stages))
        preds = [(simulate(p, items), items) for items in plans(p.stages, 0, 4)]
        low = min(pred.peak_bytes for pred, _ in preds)
        none = simulate(p, solve(p, None, strategy="none")).peak_bytes
        for share in (0.0, 0.3, 0.7):
            budget = int(low + share * (none - low))
            ref = min(pred.time_s for pred, _ in preds if pred.peak_bytes <= budget)
            act = budget - p.base_bytes
            table = _optimal.solve_table(p, act, slots=max(1, act))
            items = table.items(act)
            assert simulate(p, items).peak_bytes <= budget
            assert float(table.cost[_optimal.PINNED, 0, -1, act]) == pytest.approx(ref, rel=1e-5)
            assert simulate(p, items).time_s == pytest.approx(ref, rel=1e-5)
            chose += any(isinstance(it, Selective) and p.stages[it.stage].side for it in items)
    assert chose > 0


def zeros(n, **lists):
    """A chain of ``n`` stages (the last the head) where every figure is 0 but those given, so that the one
    term a test checks sets the peak."""
    plain = {"fwd_transient_bytes", "fwd_nograd_transient_bytes", "bwd_transient_bytes", "side_bytes",
             "side_grad_bytes", "xbar_bytes", "x_bytes"}
    p = Profile.from_lists(lists.get("x_bytes", [0] * n), lists.get("xbar_bytes", [0] * n), [1.0] * n, [1.0] * n,
                           **{k: v for k, v in lists.items() if k in plain - {"x_bytes", "xbar_bytes"}})
    extra = {k: v for k, v in lists.items() if k not in plain}
    return dataclasses.replace(p, stages=tuple(dataclasses.replace(s, **{k: v[i] for k, v in extra.items()})
                                               for i, s in enumerate(p.stages)))


ALL = (Record(0), Record(1), Record(2), Record(3))
REGION = (Region(0, 2, (Record(0), Record(1))), Record(2), Record(3))


@pytest.mark.parametrize(("term", "lists", "items", "peak"), [
    # Record's forward: xbar + side + of = 0 + (5 + 2) + 3; its backward 7, what it holds 7.
    ("record forward", {"side_bytes": [0, 5, 0, 0], "side_grad_bytes": [0, 2, 0, 0],
                        "fwd_transient_bytes": [0, 3, 0, 0]}, ALL, 10),
    # Record's backward: keep (side 7) + ob 4; its forward 7.
    ("record backward", {"side_bytes": [0, 5, 0, 0], "side_grad_bytes": [0, 2, 0, 0],
                         "bwd_transient_bytes": [0, 4, 0, 0]}, ALL, 11),
    # Record 0 holds its side 7 while the head's forward peaks at 10.
    ("record held", {"side_bytes": [5, 0, 0, 0], "side_grad_bytes": [2, 0, 0, 0],
                     "fwd_transient_bytes": [0, 0, 0, 10]}, ALL, 17),
    # A loose record frees its input and still holds its side: record 1 holds xbar 0 + side 7 - freed 6 = 1
    # while the head's forward peaks at 10 (its own forward is 7).
    ("loose record held", {"x_bytes": [0, 6, 0, 0], "side_bytes": [0, 5, 0, 0], "side_grad_bytes": [0, 2, 0, 0],
                           "input_freed_bytes": [0, 6, 0, 0], "fwd_transient_bytes": [0, 0, 0, 10]}, ALL, 11),
    # Sweep at stage 1: the side of stage 0 made before it (3), its own (4), its transient 10.
    ("sweep", {"side_bytes": [3, 4, 0, 0], "fwd_nograd_transient_bytes": [0, 10, 0, 0]}, REGION, 17),
    # Sweep at stage 0: its own side 3 and transient 10 (stage 1 adds 4 but no transient).
    ("sweep own", {"side_bytes": [3, 4, 0, 0], "fwd_nograd_transient_bytes": [10, 0, 0, 0]}, REGION, 13),
    # After the region: the sides of stages 0 and 1 (3 + 4) held while the head peaks at 10.
    ("region held", {"side_bytes": [3, 4, 0, 0], "fwd_transient_bytes": [0, 0, 0, 10]}, REGION, 17),
    # The body: its records keep the recomputed sides (2 + 3, gradients here) and the region's side gradients
    # (2 + 3) are charged beside it: 10; the sweep and what the region holds are 5.
    ("body gradients", {"side_grad_bytes": [2, 3, 0, 0]}, REGION, 10),
    # The body's record 1 peaks in its backward (9 + side 4) with record 0's side 3 held: 16.
    ("body records", {"side_bytes": [3, 4, 0, 0], "bwd_transient_bytes": [0, 9, 0, 0]}, REGION, 16),
])
def test_each_side_tensor_term_is_charged(term, lists, items, peak):
    """Hand-computed peaks, each set by one term of Note [Side tensors]: dropping the term lowers it."""
    p = zeros(4, **lists)
    assert simulate(p, items).peak_bytes == peak, term
    assert min_peak_items(p)[0] <= peak


def test_selective_items_keep_their_side_tensors():
    """``Selective(1)`` with an option keeping 4 bytes, the stage's side 5: its forward is 4 + 5 + of, it holds
    9 while the rest runs, and its body (rebuild, backward) adds the side."""
    from remat.planning.plan import Selective
    from remat.planning.profile import BlockOption

    def case(option_of=0, head_of=0, ob=0):
        p = zeros(3, side_bytes=[0, 5, 0], fwd_transient_bytes=[0, 0, head_of], bwd_transient_bytes=[0, ob, 0])
        stages = list(p.stages)
        stages[1] = dataclasses.replace(stages[1], options=(BlockOption("o", ("aten.mm.default",), 4, 0.5, option_of),))
        p = dataclasses.replace(p, stages=tuple(stages))
        return simulate(p, (Record(0), Selective(1, "o", ("aten.mm.default",)), Record(2)))

    assert case(option_of=10).peak_bytes == 19  # forward: kept 4 + side 5 + 10
    assert case(head_of=20).peak_bytes == 29  # held 9 while the head peaks at 20
    assert case(ob=30).peak_bytes == 35  # body: backward 30 + side 5
    assert case().held_bytes == (0, 9, 0)


def test_held_bytes_and_digest_count_side_tensors():
    p = zeros(4, x_bytes=[0, 0, 6, 1], xbar_bytes=[2, 2, 2, 0], side_bytes=[3, 4, 1, 0], side_grad_bytes=[1, 0, 0, 0])
    assert simulate(p, ALL).held_bytes == (2 + 4, 2 + 4, 2 + 1, 0)
    assert simulate(p, REGION).held_bytes == (4, 4 + 6, 2 + 1, 0)  # the region's stages hold their sides
    from remat.planning.simulate import every_digest

    plain = zeros(4, x_bytes=[0, 0, 6, 1], xbar_bytes=[2, 2, 2, 0])
    legacy = [(s.x_bytes, s.xbar_bytes, s.fwd_transient_bytes, s.fwd_nograd_transient_bytes, s.bwd_transient_bytes,
               s.input_freed_bytes, s.output_released_bytes, s.recompute_bwd_extra_bytes, s.recompute_hold_bytes,
               s.recompute_copy_bytes, s.checkpointable) for s in plain.stages]
    import hashlib

    assert every_digest(plain) == hashlib.sha1(repr((legacy, 0)).encode()).hexdigest()  # saved digests still match
    assert every_digest(p) != every_digest(dataclasses.replace(p, stages=(
        dataclasses.replace(p.stages[0], side_grad_bytes=2), *p.stages[1:])))


def test_the_exact_cost_model_is_made_once_per_profile_and_dropped_with_it():
    """Note [One cost model]: the simulator reads the exact figures of a profile from one Costs object, kept
    while the profile lives (the strategies simulate many plans of one profile) and not after."""
    import gc

    from remat.planning import cost

    p = chain(12, 3)
    simulate(p, solve(p, None, strategy="every"))
    kept = cost.exact_costs(p)
    assert cost.exact_costs(p) is kept
    key = id(p)
    assert cost._EXACT[key] is kept
    del p, kept
    gc.collect()
    assert key not in cost._EXACT
