"""The policy of a selective option: which op outputs a block's checkpoint keeps (PyTorch's selective
activation checkpointing). Used by :mod:`remat.runtime.regions` to run a
:class:`remat.planning.plan.Selective` item, and by :mod:`remat.runtime.ops` to measure one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

__all__ = ["SavePolicy", "selective_contexts"]


class SavePolicy:
    """The SAC policy of an option: ``MUST_SAVE`` for the ops in ``save`` (``"aten.mm.default"``: every
    call; ``"aten.mm.default#2"``: the third call), ``PREFER_RECOMPUTE`` for the rest. Calls are counted
    from the block's start: one policy per checkpoint (see :func:`selective_contexts`)."""

    def __init__(self, save: Sequence[str]) -> None:
        self.every = frozenset(s for s in save if "#" not in s)
        self.some = frozenset(s for s in save if "#" in s)
        self.counts: dict[tuple[bool, str], int] = defaultdict(int)

    def __call__(self, ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        name = str(func)
        key = (bool(getattr(ctx, "is_recompute", False)), name)
        n = self.counts[key]
        self.counts[key] = n + 1
        if name in self.every or f"{name}#{n}" in self.some:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE


def selective_contexts(save: Sequence[str]) -> tuple[Any, Any]:
    """``(forward, recompute)`` contexts of a checkpoint that keeps the outputs of the ops in ``save``."""
    return create_selective_checkpoint_contexts(SavePolicy(save))
