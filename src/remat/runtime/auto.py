"""``remat.auto``: profile, solve and apply in one call."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from remat.planning.budget import Budget
from remat.planning.plan import Plan
from remat.planning.profile import Profile
from remat.planning.simulate import simulate
from remat.planning.solve import solve
from remat.runtime.executor import apply
from remat.runtime.profiler import profile
from remat.units import format_bytes

__all__ = ["auto"]

log = logging.getLogger("remat")


def auto(
    model: nn.Module,
    example_inputs: Any,
    *,
    budget: Budget,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    strategy: str = "auto",
    stages: Sequence[str] | None = None,
    repeats: int = 3,
    progress: bool = False,
    **options: Any,
) -> nn.Module:
    """Make one training step of ``model`` fit ``budget`` at the least extra time: profile, solve, apply.

    Args:
        model: in training mode; a transformers ``PreTrainedModel`` works as is (pass labels in
            ``example_inputs`` so it returns a loss).
        example_inputs: a batch of the shape you will train on: a tensor, a tuple, or a dict of keyword
            inputs.
        budget: peak bytes of the step: ``"6GiB"``, an int, or a fraction of the no-checkpointing peak.
        loss_fn: ``loss_fn(output) -> scalar`` when the model does not return its loss.
        strategy: ``"auto"`` (optimal), or any name of :func:`remat.strategies`.
        stages: explicit stage names (see :func:`remat.profile`).
        repeats: timed repeats while profiling.
        progress: show a progress bar while profiling.

    Returns:
        The same model, planned in place (:func:`remat.remove` undoes it; :func:`remat.plan_of` gives
        the plan).

    Raises:
        InfeasibleBudgetError: the budget is below the smallest feasible peak (the message says it).

    Hugging Face's own gradient checkpointing is switched off first — remat's plan replaces it, and
    profiling a model that already checkpoints would measure the wrong chain — and ``use_cache`` is
    set to False while planned (restored by :func:`remat.remove`).
    """
    prof = profile(model, example_inputs, loss_fn=loss_fn, stages=stages, repeats=repeats, progress=progress)
    plan = solve(prof, budget, strategy=strategy, **options)
    apply(model, plan)
    _log_summary(prof, plan)
    return model


def _log_summary(prof: Profile, plan: Plan) -> None:
    none = simulate(prof, solve(prof, None, strategy="none"))
    p = plan.prediction
    blocks = [prof.names[k] for k in prof.block_indices()]
    log.info(
        "remat.auto: %d stages (%s%s); budget %s; predicted peak %s vs %s without checkpointing;"
        " +%.1f%% step time (strategy %s, %d regions)",
        len(prof.stages), f"{blocks[0]} .. {blocks[-1]}" if blocks else "no blocks",
        f", {len(blocks)} blocks" if blocks else "", format_bytes(plan.budget_bytes or 0),
        format_bytes(p.peak_bytes), format_bytes(none.peak_bytes), 100 * p.overhead, plan.strategy,
        sum(1 for _ in plan.regions()),
    )
