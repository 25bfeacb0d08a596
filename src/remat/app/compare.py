"""Measure several ways of running the same training step side by side: peak, time, gradients.

Used by ``remat demo`` and ``benchmarks/compare.py``. Times are measured round-robin, the order rotated
each round (A B C, B C A, ...), and reported as medians relative to the first variant, so that machine
noise hits all alike; peaks come from :func:`remat.measure` (exact); gradients are compared bit for bit
with the first variant's.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from remat.planning.plan import Plan
from remat.runtime.executor import apply, remove
from remat.runtime.measure import measure, reset_grads
from remat.runtime.step import Step

__all__ = ["Result", "Variant", "check_variant", "median_s", "plan_variant", "ratio_spread", "run_variants",
           "time_variants"]


@dataclass
class Variant:
    """One way to run the step: ``enter()`` before, ``exit()`` after, and optionally its own ``step``."""

    label: str
    enter: Callable[[], None] = lambda: None
    exit: Callable[[], None] = lambda: None
    step: Callable[[], Any] | None = None
    plan: Plan | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Result:
    label: str
    peak_bytes: int
    time_s: float
    time_ratio: float
    grads_equal: bool
    plan: Plan | None
    info: dict[str, Any]


def plan_variant(model: nn.Module, plan: Plan, label: str | None = None) -> Variant:
    """A variant that runs ``plan`` (applied on enter, removed on exit)."""
    def enter() -> None:
        apply(model, plan)

    def leave() -> None:
        remove(model)

    return Variant(label or plan.strategy, enter=enter, exit=leave, plan=plan)


class _Step:
    """The training step of ``model`` on ``example_inputs`` (:class:`remat.runtime.step.Step`: the output held
    through backward), and its gradient-bearing parameters."""

    def __init__(self, model: nn.Module, example_inputs: Any, loss_fn: Callable[[Any], torch.Tensor] | None) -> None:
        self.step = Step.of(model, example_inputs, loss_fn)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.inputs = self.step.inputs

    def __call__(self) -> None:
        self.step()


def check_variant(model: nn.Module, example_inputs: Any, variant: Variant, *,
                  loss_fn: Callable[[Any], torch.Tensor] | None = None, seed: int = 0,
                  ) -> tuple[int, list[torch.Tensor]]:
    """One variant's exact peak (:func:`remat.measure`) and the gradients of one seeded step."""
    default = _Step(model, example_inputs, loss_fn)
    step = variant.step or default
    variant.enter()
    try:
        reset_grads(model)
        torch.manual_seed(seed)
        step()
        grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in default.params]
        peak = measure(step, model=model, inputs=default.inputs, warmup=0, repeats=0).peak_bytes
    finally:
        variant.exit()
    return peak, grads


def time_variants(model: nn.Module, example_inputs: Any, variants: Sequence[Variant], *,
                  loss_fn: Callable[[Any], torch.Tensor] | None = None, repeats: int = 5, warmup: int = 0,
                  on_round: Callable[[int], None] | None = None) -> dict[str, list[float]]:
    """Step times of every variant, round-robin: ``repeats`` rounds, the order rotated each round. Each
    timed step follows ``warmup`` untimed steps of the same variant (a training loop's steady state: the
    allocator then holds what this variant's step needs, not what the previous variant left)."""
    default = _Step(model, example_inputs, loss_fn)
    times: dict[str, list[float]] = {v.label: [] for v in variants}
    for r in range(repeats):
        # Rotate the order each round, so that no variant always follows the same one (a variant that
        # frees a lot of memory can speed up or slow down the next one's allocations).
        k = r % len(variants)
        for v in [*variants[k:], *variants[:k]]:
            step = v.step or default
            v.enter()
            try:
                for _ in range(warmup):
                    reset_grads(model)
                    step()
                reset_grads(model)
                t0 = time.perf_counter()
                step()
                times[v.label].append(time.perf_counter() - t0)
            finally:
                v.exit()
        if on_round is not None:
            on_round(r)
    return times


def median_s(times: Sequence[float]) -> float:
    """The median of ``times`` (NaN when there are none)."""
    return statistics.median(times) if times else float("nan")


def ratio_spread(times: Sequence[float], against: Sequence[float]) -> tuple[float, float, float]:
    """The per-round ratios ``times[r] / against[r]`` of two variants timed in the same rounds
    (:func:`time_variants`): their median, least and greatest (NaN when there are none)."""
    ratios = sorted(a / b for a, b in zip(times, against))
    if not ratios:
        return (float("nan"),) * 3
    return statistics.median(ratios), ratios[0], ratios[-1]


def run_variants(model: nn.Module, example_inputs: Any, variants: Sequence[Variant], *,
                 loss_fn: Callable[[Any], torch.Tensor] | None = None, repeats: int = 5, seed: int = 0,
                 ) -> list[Result]:
    """Run every variant: exact peak, median step time (round-robin), gradients vs the first variant."""
    ref: list[torch.Tensor] | None = None
    peaks: dict[str, int] = {}
    equal: dict[str, bool] = {}
    for v in variants:
        peaks[v.label], grads = check_variant(model, example_inputs, v, loss_fn=loss_fn, seed=seed)
        if ref is None:
            ref = grads
        equal[v.label] = all(torch.equal(a, b) for a, b in zip(grads, ref))
        del grads
    times = time_variants(model, example_inputs, variants, loss_fn=loss_fn, repeats=repeats)
    base = median_s(times[variants[0].label])
    out = []
    for v in variants:
        t = median_s(times[v.label])
        out.append(Result(v.label, peaks[v.label], t, t / base, equal[v.label], v.plan, v.info))
    return out
