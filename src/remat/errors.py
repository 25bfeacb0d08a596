"""The one error hierarchy of remat: every message names the call, the value, and the fix."""

from __future__ import annotations

__all__ = [
    "BudgetError",
    "InfeasibleBudgetError",
    "PlanError",
    "PlanMismatchError",
    "ProfileError",
    "RematError",
    "VerificationError",
]


class RematError(Exception):
    """Base class of every error remat raises on purpose."""


class BudgetError(RematError, ValueError):
    """A budget that cannot be parsed or is out of range."""


class InfeasibleBudgetError(RematError):
    """The budget is below the smallest peak any schedule of this chain can reach.

    Attributes:
        budget_bytes: the budget asked for.
        min_feasible_bytes: the smallest peak remat can reach for this chain, exact to the byte: a budget of
            it is met, one byte less is not (None if unknown).
    """

    def __init__(self, message: str, *, budget_bytes: int, min_feasible_bytes: int | None) -> None:
        super().__init__(message)
        self.budget_bytes = budget_bytes
        self.min_feasible_bytes = min_feasible_bytes


class ProfileError(RematError):
    """The model cannot be turned into a chain of stages, or profiling it failed."""


class PlanError(RematError, ValueError):
    """A plan that is malformed: stages missing, out of order, or not checkpointable."""


class PlanMismatchError(RematError):
    """A plan applied to a model or input shapes it was not made for."""


class VerificationError(RematError):
    """A planned step, run once to check it (``remat.auto(..., verify=...)``), exceeded its budget or
    gave other gradients than the plain model."""
