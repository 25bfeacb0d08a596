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
from remat.runtime.model import as_call, loss_function, tensors_in

__all__ = ["Result", "Variant", "plan_variant", "run_variants"]


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


def run_variants(model: nn.Module, example_inputs: Any, variants: Sequence[Variant], *,
                 loss_fn: Callable[[Any], torch.Tensor] | None = None, repeats: int = 5, seed: int = 0,
                 ) -> list[Result]:
    """Run every variant: exact peak, median step time (round-robin), gradients vs the first variant."""
    args, kwargs = as_call(example_inputs)
    get_loss = loss_function(loss_fn)
    params = [p for p in model.parameters() if p.requires_grad]
    inputs = tensors_in((args, kwargs))

    def default_step() -> None:
        out = model(*args, **kwargs)
        get_loss(out).backward()

    ref: list[torch.Tensor] | None = None
    peaks: dict[str, int] = {}
    equal: dict[str, bool] = {}
    for v in variants:
        step = v.step or default_step
        v.enter()
        try:
            reset_grads(model)
            torch.manual_seed(seed)
            step()
            grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
            if ref is None:
                ref = grads
            equal[v.label] = all(torch.equal(a, b) for a, b in zip(grads, ref))
            del grads
            peaks[v.label] = measure(step, model=model, inputs=inputs, warmup=0, repeats=0).peak_bytes
        finally:
            v.exit()
    times: dict[str, list[float]] = {v.label: [] for v in variants}
    for r in range(repeats):
        # Rotate the order each round, so that no variant always follows the same one (a variant that
        # frees a lot of memory can speed up or slow down the next one's allocations).
        k = r % len(variants)
        for v in [*variants[k:], *variants[:k]]:
            step = v.step or default_step
            v.enter()
            try:
                reset_grads(model)
                t0 = time.perf_counter()
                step()
                times[v.label].append(time.perf_counter() - t0)
            finally:
                v.exit()
    base = statistics.median(times[variants[0].label]) if repeats else float("nan")
    out = []
    for v in variants:
        t = statistics.median(times[v.label]) if repeats else float("nan")
        out.append(Result(v.label, peaks[v.label], t, t / base, equal[v.label], v.plan, v.info))
    return out
