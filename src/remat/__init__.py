"""remat: make PyTorch training fit a memory budget by activation checkpointing, at the least extra time.

    model = remat.auto(model, example_inputs, budget="6GiB")   # profile -> solve -> apply

The layers, each usable on its own: :func:`measure` (exact peak memory of a step), :func:`profile`
(a model as a chain of stages), :func:`solve` / :func:`simulate` / :func:`frontier` (torch-free
planners), :func:`apply` / :func:`remove` (run a plan with the same gradients).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from remat.errors import (
    BudgetError,
    InfeasibleBudgetError,
    PlanError,
    PlanMismatchError,
    ProfileError,
    RematError,
    VerificationError,
)
from remat.planning.budget import Share, parse_budget, share
from remat.planning.plan import Plan, Prediction, Record, Region, Selective
from remat.planning.profile import BlockOption, HeadOption, Profile, Stage
from remat.planning.simulate import simulate
from remat.planning.solve import frontier, solve
from remat.planning.strategies import register_strategy, strategies
from remat.units import format_bytes, parse_bytes

__version__ = "0.1.0"

__all__ = [
    "BlockOption",
    "BudgetError",
    "ChunkedHead",
    "HeadOption",
    "InfeasibleBudgetError",
    "Measurement",
    "MemoryTracker",
    "Plan",
    "PlanError",
    "PlanMismatchError",
    "Prediction",
    "Profile",
    "ProfileError",
    "Record",
    "Region",
    "RematError",
    "Selective",
    "Share",
    "Stage",
    "VerificationError",
    "add_options",
    "apply",
    "auto",
    "available_bytes",
    "broadcast_plan",
    "check_same_plan",
    "format_bytes",
    "frontier",
    "fsdp_profile",
    "measure",
    "optimizer_state_bytes",
    "parse_budget",
    "parse_bytes",
    "plan_for_job",
    "plan_of",
    "plot_frontier",
    "profile",
    "register_strategy",
    "remove",
    "share",
    "simulate",
    "solve",
    "strategies",
]

# The torch-using layers load on first use, so that the planners work (and import fast) without torch.
_LAZY = {
    "measure": ("remat.runtime.measure", "measure"),
    "available_bytes": ("remat.runtime.measure", "available_bytes"),
    "add_options": ("remat.runtime.ops", "add_options"),
    "ChunkedHead": ("remat.runtime.head", "ChunkedHead"),
    "fsdp_profile": ("remat.runtime.distributed", "fsdp_profile"),
    "plan_for_job": ("remat.runtime.distributed", "plan_for_job"),
    "broadcast_plan": ("remat.runtime.distributed", "broadcast_plan"),
    "check_same_plan": ("remat.runtime.distributed", "check_same_plan"),
    "optimizer_state_bytes": ("remat.runtime.optimizer", "optimizer_state_bytes"),
    "MemoryTracker": ("remat.runtime.measure", "MemoryTracker"),
    "Measurement": ("remat.runtime.measure", "Measurement"),
    "profile": ("remat.runtime.profiler", "profile"),
    "apply": ("remat.runtime.executor", "apply"),
    "remove": ("remat.runtime.executor", "remove"),
    "plan_of": ("remat.runtime.executor", "plan_of"),
    "auto": ("remat.runtime.auto", "auto"),
    "plot_frontier": ("remat.app.plot", "plot_frontier"),
}

if TYPE_CHECKING:
    from remat.app.plot import plot_frontier
    from remat.runtime.auto import auto
    from remat.runtime.distributed import broadcast_plan, check_same_plan, fsdp_profile, plan_for_job
    from remat.runtime.executor import apply, plan_of, remove
    from remat.runtime.head import ChunkedHead
    from remat.runtime.measure import Measurement, MemoryTracker, available_bytes, measure
    from remat.runtime.ops import add_options
    from remat.runtime.optimizer import optimizer_state_bytes
    from remat.runtime.profiler import profile


def __dir__() -> list[str]:
    """The public names, the lazily imported ones included (``dir(remat)``, completion in a REPL)."""
    return sorted({*globals(), *__all__})


def __getattr__(name: str) -> Any:
    if name == "zoo":
        import importlib

        return importlib.import_module("remat.app.zoo")
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'remat' has no attribute {name!r}")
