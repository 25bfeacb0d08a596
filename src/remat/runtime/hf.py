"""Hugging Face transformers models: their own gradient checkpointing and their KV cache.

Both are switched off while a plan is applied — remat's plan replaces the model's checkpointing, and a
cache would be written twice by recomputation — and restored by :func:`remat.remove`. This is the one
place that knows about them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

log = logging.getLogger("remat")

__all__ = ["HFState", "cache_off", "checkpointing_active", "disable_checkpointing", "prepare", "restore"]


@dataclass
class HFState:
    """What :func:`prepare` changed, for :func:`restore`."""

    use_cache: Any = None


def checkpointing_active(model: nn.Module) -> bool:
    """Whether a transformers model has its own activation (gradient) checkpointing switched on."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def _checkpointing_disable(model: nn.Module) -> None:
    for name in ("activation_checkpointing_disable", "gradient_checkpointing_disable"):
        fn = getattr(model, name, None)
        if fn is not None:
            fn()
            return


def disable_checkpointing(model: nn.Module, caller: str) -> None:
    """Switch off the model's own checkpointing, saying so."""
    if checkpointing_active(model):
        log.warning("%s: switching off the model's own gradient checkpointing; remat's plan replaces it", caller)
        _checkpointing_disable(model)


def prepare(model: nn.Module, caller: str) -> HFState:
    """Switch off the model's own checkpointing and its cache; returns what to restore."""
    disable_checkpointing(model, caller)
    state = HFState()
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_cache", False):
        state.use_cache, config.use_cache = config.use_cache, False
    return state


@contextlib.contextmanager
def cache_off(model: nn.Module) -> Iterator[None]:
    """``use_cache`` off for a while (profiling): a planned model runs without the cache, so the step to
    profile is the one without it (the cache's keys and values would count as held activations)."""
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "use_cache", False):
        yield
        return
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = True


def restore(model: nn.Module, state: HFState) -> None:
    if state.use_cache is not None:
        model.config.use_cache = state.use_cache  # type: ignore[union-attr]
