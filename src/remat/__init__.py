"""remat: make PyTorch training fit a memory budget by activation checkpointing, at the least extra time.

    model = remat.auto(model, example_inputs, budget="6GiB")   # profile -> solve -> apply

The layers, each usable on its own: :func:`measure` (exact peak memory of a step), :func:`profile`
(a model as a chain of stages), :func:`solve` / :func:`simulate` / :func:`frontier` (torch-free
planners), :func:`apply` / :func:`remove` (run a plan with the same gradients).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from remat.chain import Profile, Stage
from remat.errors import (
    BudgetError,
    InfeasibleBudgetError,
    PlanError,
    PlanMismatchError,
    ProfileError,
    RematError,
)
from remat.plan import Plan, Prediction, Record, Region
from remat.planners import frontier, parse_budget, register_strategy, solve, strategies
from remat.simulator import simulate
from remat.units import format_bytes, parse_bytes

__version__ = "0.1.0"

__all__ = [
    "BudgetError",
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
    "Stage",
    "apply",
    "auto",
    "format_bytes",
    "frontier",
    "measure",
    "parse_budget",
    "parse_bytes",
    "plan_of",
    "plot_frontier",
    "profile",
    "register_strategy",
    "remove",
    "simulate",
    "solve",
    "strategies",
]

# The torch-using layers load on first use, so that the planners work (and import fast) without torch.
_LAZY = {
    "measure": ("remat.memory", "measure"),
    "MemoryTracker": ("remat.memory", "MemoryTracker"),
    "Measurement": ("remat.memory", "Measurement"),
    "profile": ("remat.profiler", "profile"),
    "apply": ("remat.executor", "apply"),
    "remove": ("remat.executor", "remove"),
    "plan_of": ("remat.executor", "plan_of"),
    "auto": ("remat.autoplan", "auto"),
    "plot_frontier": ("remat.plot", "plot_frontier"),
}

if TYPE_CHECKING:
    from remat.autoplan import auto
    from remat.executor import apply, plan_of, remove
    from remat.memory import Measurement, MemoryTracker, measure
    from remat.plot import plot_frontier
    from remat.profiler import profile


def __getattr__(name: str) -> Any:
    if name == "zoo":
        import importlib

        return importlib.import_module("remat.zoo")
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'remat' has no attribute {name!r}")
