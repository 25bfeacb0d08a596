"""Hugging Face transformers models: their own gradient checkpointing and their KV cache.

Both are switched off while a plan is applied — remat's plan replaces the model's checkpointing, and a
cache would be written twice by recomputation — and restored by :func:`remat.remove`. This is the one
place that knows about them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

log = logging.getLogger("remat")

__all__ = ["HFState", "cache_off", "checkpointing_active", "disable_checkpointing", "prepare", "restore"]


@dataclass
class HFState:
    """What :func:`prepare` changed, for :func:`restore`: each config whose ``use_cache`` it switched off,
    with its value."""

    use_cache: list[tuple[Any, Any]] = field(default_factory=list)


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
    return _switch_cache_off(model)


def _switch_cache_off(model: nn.Module) -> HFState:
    state = HFState()
    for config in _caching_configs(model):
        state.use_cache.append((config, config.use_cache))
        config.use_cache = False
    return state


def _caching_configs(model: nn.Module) -> list[Any]:
    """The configs with ``use_cache`` on: the model's and its submodules' (an encoder-decoder's stacks
    hold copies of their own, which their forwards read)."""
    found: dict[int, Any] = {}
    for m in model.modules():
        config = getattr(m, "config", None)
        if config is not None and getattr(config, "use_cache", False):
            found.setdefault(id(config), config)
    return list(found.values())


@contextlib.contextmanager
def cache_off(model: nn.Module) -> Iterator[None]:
    """``use_cache`` off for a while (profiling): a planned model runs without the cache, so the step to
    profile is the one without it (the cache's keys and values would count as held activations)."""
    state = _switch_cache_off(model)
    try:
        yield
    finally:
        restore(model, state)


def restore(model: nn.Module, state: HFState) -> None:
    for config, value in state.use_cache:
        config.use_cache = value
