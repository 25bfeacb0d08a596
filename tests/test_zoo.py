"""Acceptance zoo: every architecture in tests/zoo_models.py, profiled without ``stages=``, planned at
three budgets across its feasible range and run. The planned model must give the plain model's loss,
gradients and buffers bit for bit (same inputs, same RNG seed, dropout on) in no more than the budget,
or refuse with a :class:`remat.RematError` whose message says what it could not handle. Any other
exception, or any silent difference, fails.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import re
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import remat
from remat import InfeasibleBudgetError, Profile, RematError, simulate, solve
from remat.planning.plan import Selective
from remat.planning.solve import min_feasible_plan

from .zoo_models import ZOO, filed_reproducer

SEED = 1234
BUDGETS = ["min_feasible", "midpoint", "just_below_none"]

#: Models remat may refuse, each with why and what its refusal must say. Every other model must be
#: profiled without ``stages=`` and planned at every budget: a refusal fails the test.
UNSUPPORTED: dict[str, tuple[str, str]] = {}


# ----------------------------------------------------------------------------------------------------
# Running a step
# ----------------------------------------------------------------------------------------------------


def _seed(seed: int = SEED) -> None:
    """The same random stream for the plain and the planned run: dropout, stochastic depth, LayerDrop
    (torch) and SpecAugment masks (numpy, in wav2vec2)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def _forward_backward(model: nn.Module, inputs: Any, loss_fn: Callable[[Any], torch.Tensor],
                      seed: int = SEED) -> torch.Tensor:
    _seed(seed)
    loss = loss_fn(_call(model, inputs))
    loss.backward()
    return loss.detach()


def _step(model: nn.Module, inputs: Any, loss_fn: Callable[[Any], torch.Tensor], seed: int = SEED) -> torch.Tensor:
    for p in model.parameters():
        p.grad = None
    return _forward_backward(model, inputs, loss_fn, seed)


def _tensors(inputs: Any) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]


def _diff(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"shape/dtype {tuple(a.shape)}:{a.dtype} vs {tuple(b.shape)}:{b.dtype}"
    if not a.is_floating_point():
        return f"{int((a != b).sum())} of {a.numel()} elements differ"
    d = (a.double() - b.double()).abs()
    return (f"max |diff| {d.max().item():.3g} (max |value| {a.double().abs().max().item():.3g}),"
            f" {int((d > 0).sum())} of {a.numel()} elements differ")


def _assert_same_state(plain: nn.Module, planned: nn.Module, what: str, *, grads: bool = True) -> None:
    """Every parameter (and its gradient) and every buffer bitwise equal; all differences listed."""
    bad = []
    for (n, p), (_, q) in zip(plain.named_parameters(), planned.named_parameters()):
        if not torch.equal(p, q):
            bad.append(f"parameter {n}: {_diff(p, q)}")
        if grads:
            if (p.grad is None) != (q.grad is None):
                bad.append(f"gradient of {n}: plain {'None' if p.grad is None else 'set'},"
                           f" planned {'None' if q.grad is None else 'set'}")
            elif p.grad is not None and not torch.equal(p.grad, q.grad):
                bad.append(f"gradient of {n}: {_diff(p.grad, q.grad)}")
    for (n, b), (_, c) in zip(plain.named_buffers(), planned.named_buffers()):
        if not torch.equal(b, c):
            bad.append(f"buffer {n}: {_diff(b, c)}")
    assert not bad, f"{what}: {len(bad)} differences; " + "; ".join(bad[:6]) + (" ..." if len(bad) > 6 else "")


def _assert_same_loss(ref: torch.Tensor, got: torch.Tensor, what: str) -> None:
    assert torch.equal(ref, got), f"{what}: loss differs: plain {ref.item()!r}, planned {got.item()!r}"


# ----------------------------------------------------------------------------------------------------
# The zoo, each model profiled once per worker
# ----------------------------------------------------------------------------------------------------


@dataclass
class Entry:
    name: str
    model: nn.Module  # a copy made before profiling and planning; tests copy it again
    inputs: Any
    loss_fn: Callable[[Any], torch.Tensor]
    profile: Profile | None
    error: BaseException | None
    error_trace: str


_ENTRIES: dict[str, Entry] = {}


def _entry(name: str) -> Entry:
    if name not in _ENTRIES:
        model, inputs, loss_fn = ZOO[name]()
        pristine = copy.deepcopy(model)
        prof, err, trace = None, None, ""
        _seed()
        try:
            prof = remat.profile(model, inputs, loss_fn=loss_fn, repeats=1)
        except Exception as e:  # judged by the tests: only a RematError with a clear message is acceptable
            err, trace = e, traceback.format_exc()
        _ENTRIES[name] = Entry(name, pristine, inputs, loss_fn, prof, err, trace)
    return _ENTRIES[name]


@pytest.fixture(scope="module", params=list(ZOO))
def zoo(request: pytest.FixtureRequest) -> Entry:
    return _entry(request.param)


SIZE = re.compile(r"\d(\.\d+)? ?(B|KiB|MiB|GiB|bytes)\b")


def _assert_clear_refusal(err: BaseException, entry: Entry, trace: str = "") -> None:
    """A refusal is acceptable only as a RematError that names the call and something the user can act
    on: the model's class, a submodule or stage, or a size in bytes."""
    trace = trace or "".join(traceback.format_exception(err))
    if not isinstance(err, RematError):
        pytest.fail(f"{entry.name}: {type(err).__name__} (not a remat.RematError): {err}\n{trace}")
    msg = str(err)
    assert msg.startswith("remat"), f"{entry.name}: {type(err).__name__} message does not name the call: {msg!r}"
    model = entry.model
    # the model's class and its own block classes (torch.nn's generic names such as Sequential do not count)
    long_names = {type(m).__name__ for m in model.modules() if not type(m).__module__.startswith("torch.")}
    long_names |= {n for n, _ in model.named_modules() if "." in n or len(n) >= 3}
    short_names = {n for n, _ in model.named_modules() if n and n not in long_names}
    named = re.compile(r"(['\"]|\b(block|stage|module|layer) )(" + "|".join(map(re.escape, short_names or {"~"}))
                       + r")(['\"]|\b)")
    useful = any(n in msg for n in long_names) or named.search(msg) is not None or SIZE.search(msg) is not None
    assert useful, (f"{entry.name}: {type(err).__name__} names neither the model, a submodule nor a size: {msg!r}")


def _refused(err: BaseException, entry: Entry, trace: str = "") -> None:
    """Only a model listed in UNSUPPORTED may refuse, clearly and for its documented reason."""
    trace = trace or "".join(traceback.format_exception(err))
    if entry.name not in UNSUPPORTED:
        pytest.fail(f"{entry.name} must plan, but remat refused: {type(err).__name__}: {err}\n{trace}")
    _assert_clear_refusal(err, entry, trace)
    why, pattern = UNSUPPORTED[entry.name]
    assert re.search(pattern, str(err)), f"{entry.name} ({why}) refused for another reason: {err}"


def _profile(entry: Entry) -> Profile | None:
    """The profile, or None after checking that profiling refused clearly."""
    if entry.error is not None:
        _refused(entry.error, entry, entry.error_trace)
        return None
    assert entry.name not in UNSUPPORTED, f"{entry.name} is listed as unsupported but was profiled: remove it"
    return entry.profile


def _range(prof: Profile) -> tuple[int, int]:
    """(smallest feasible peak, no-checkpointing peak)."""
    none = simulate(prof, solve(prof, None, strategy="none")).peak_bytes
    low = min_feasible_plan(prof).peak_bytes
    return low, none


def _budget(prof: Profile, where: str) -> tuple[int, int]:
    low, none = _range(prof)
    budget = {
        "min_feasible": low,
        "midpoint": (low + none) // 2,
        "just_below_none": max(low, none - max(1, (none - low) // 100)),
    }[where]
    return budget, low


def _stages(prof: Profile) -> str:
    return f"{len(prof.stages)} stages {list(prof.names)}"


# ----------------------------------------------------------------------------------------------------
# The tests
# ----------------------------------------------------------------------------------------------------


def test_profile_predicts_its_own_peak_without_checkpointing(zoo: Entry) -> None:
    prof = _profile(zoo)
    if prof is None:
        return
    predicted = simulate(prof, solve(prof, None, strategy="none")).peak_bytes
    measured = prof.meta["measured_peak_bytes"]
    assert measured <= predicted <= 1.03 * measured, (
        f"{zoo.name}: predicted no-checkpointing peak {predicted} B vs the profile's measured {measured} B"
        f" ({(predicted - measured) / measured:+.2%}); {_stages(prof)}")


@pytest.mark.parametrize("where", BUDGETS)
def test_plan_gives_the_same_step_within_the_budget(zoo: Entry, where: str) -> None:
    prof = _profile(zoo)
    if prof is None:
        return
    budget = low = None
    try:
        budget, low = _budget(prof, where)
        plan = solve(prof, budget)
        assert plan.peak_bytes <= budget, (plan.peak_bytes, budget)
        plain, planned = copy.deepcopy(zoo.model), copy.deepcopy(zoo.model)
        remat.apply(planned, plan)
        what = f"{zoo.name} at {where} budget {budget} B ({_stages(prof)})"
        ref = _step(plain, zoo.inputs, zoo.loss_fn)
        got = _step(planned, zoo.inputs, zoo.loss_fn)
        _assert_same_loss(ref, got, what)
        _assert_same_state(plain, planned, what)

        def step() -> None:
            _forward_backward(planned, zoo.inputs, zoo.loss_fn)

        measured = remat.measure(step, model=planned, inputs=_tensors(zoo.inputs), repeats=0).peak_bytes
        assert measured <= budget, (f"{what}: measured peak {measured} B > budget {budget} B"
                                    f" (predicted {plan.peak_bytes} B, {measured - budget:+d} B)")
    except RematError as e:
        if isinstance(e, InfeasibleBudgetError) and budget is not None and low is not None and budget >= low:
            pytest.fail(f"{zoo.name}: solve refused budget {budget} B although the smallest feasible peak is"
                        f" {low} B: {e}")
        _refused(e, zoo)


_WITH_OPTIONS: dict[str, Profile] = {}


def _with_cheap_options(entry: Entry, prof: Profile) -> Profile:
    """The profile with block options (:func:`remat.add_options`), their times cut to a tenth of a
    region's so that the planner takes them wherever they save memory: what is checked is how they run
    and what they hold, not whether they pay."""
    if entry.name not in _WITH_OPTIONS:
        from remat.runtime.ops import add_options

        model = copy.deepcopy(entry.model)
        with_options = add_options(prof, model, entry.inputs, repeats=1, cuts=(0.5,))
        _WITH_OPTIONS[entry.name] = dataclasses.replace(with_options, stages=tuple(
            dataclasses.replace(s, options=tuple(dataclasses.replace(o, recompute_s=0.1 * s.region_s)
                                                 for o in s.options)) for s in with_options.stages))
    return _WITH_OPTIONS[entry.name]


def test_plan_with_block_options_gives_the_same_step_within_the_budget(zoo: Entry) -> None:
    """As remat.auto(block_options=True) plans: options on every block that can have them, planned at the
    midpoint budget; the same loss, gradients and buffers bit for bit, and no more than the budget."""
    prof = _profile(zoo)
    if prof is None:
        return
    budget, _ = _budget(prof, "midpoint")
    prof = _with_cheap_options(zoo, prof)
    plan = solve(prof, budget)
    plain, planned = copy.deepcopy(zoo.model), copy.deepcopy(zoo.model)
    remat.apply(planned, plan)
    chosen = [it.describe() for it in plan.items if isinstance(it, Selective)]
    what = f"{zoo.name} with options {chosen} at budget {budget} B ({_stages(prof)})"
    _assert_same_loss(_step(plain, zoo.inputs, zoo.loss_fn), _step(planned, zoo.inputs, zoo.loss_fn), what)
    _assert_same_state(plain, planned, what)
    measured = remat.measure(lambda: _forward_backward(planned, zoo.inputs, zoo.loss_fn), model=planned,
                             inputs=_tensors(zoo.inputs), repeats=0).peak_bytes
    assert measured <= budget, (f"{what}: measured peak {measured} B > budget {budget} B"
                                f" (predicted {plan.peak_bytes} B, {measured - budget:+d} B)")
    exact = simulate(dataclasses.replace(prof, safety_fraction=0.0), plan.items).peak_bytes
    assert measured <= exact, f"{what}: measured peak {measured} B > the prediction without margin {exact} B"


def test_two_adamw_steps_give_the_same_parameters(zoo: Entry) -> None:
    prof = _profile(zoo)
    if prof is None:
        return
    try:
        budget, _ = _budget(prof, "midpoint")
        plan = solve(prof, budget)
        plain, planned = copy.deepcopy(zoo.model), copy.deepcopy(zoo.model)
        remat.apply(planned, plan)
        for model in (plain, planned):
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
            for k in range(2):
                opt.zero_grad(set_to_none=True)
                _forward_backward(model, zoo.inputs, zoo.loss_fn, seed=SEED + k)
                opt.step()
        _assert_same_state(plain, planned, f"{zoo.name} after two AdamW steps ({_stages(prof)})")
    except RematError as e:
        _refused(e, zoo)


def test_the_least_feasible_peak_named_plans_when_given_back_in_bytes(zoo: Entry) -> None:
    """A share budget too low names the least feasible peak (InfeasibleBudgetError.min_feasible_bytes); given back
    as a byte budget (sized on a fake copy, Note [A least that holds]) it plans, and the planned step's check holds."""
    if _profile(zoo) is None:
        return
    model = copy.deepcopy(zoo.model)
    with pytest.raises(InfeasibleBudgetError) as info:
        remat.auto(model, zoo.inputs, budget="1%", loss_fn=zoo.loss_fn, repeats=0, throughput="cpu", verify=False)
    least = info.value.min_feasible_bytes
    assert least is not None and f"({least:,} B)" in str(info.value)
    remat.auto(model, zoo.inputs, budget=least, loss_fn=zoo.loss_fn, repeats=0, throughput="cpu")  # sizes only
    assert remat.plan_of(model).prediction.peak_bytes <= least


def test_filed_reproducer_with_explicit_stages_and_one_uniform_segment() -> None:
    """The filed bug: stages=['0', '2'] around an in-place LeakyReLU, one uniform segment over both."""
    model, x, loss_fn = filed_reproducer()
    entry = Entry("filed_reproducer[stages=0,2]", copy.deepcopy(model), x, loss_fn, None, None, "")
    try:
        _seed()
        prof = remat.profile(model, x, loss_fn=loss_fn, repeats=1, stages=["0", "2"])
        plan = solve(prof, None, strategy="uniform", segments=1)
        plain, planned = copy.deepcopy(entry.model), copy.deepcopy(entry.model)
        remat.apply(planned, plan)
        ref = _step(plain, x, loss_fn)
        got = _step(planned, x, loss_fn)
        _assert_same_loss(ref, got, entry.name)
        _assert_same_state(plain, planned, entry.name)
    except RematError as e:
        _refused(e, entry)


def test_the_zoo_is_large_enough() -> None:
    assert len(ZOO) >= 20
