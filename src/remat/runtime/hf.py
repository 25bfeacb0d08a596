"""Hugging Face transformers models: their own gradient checkpointing and their KV cache.

Both are switched off while a plan is applied — remat's plan replaces the model's checkpointing, and a
cache would be written twice by recomputation — and restored by :func:`remat.remove`. This is the one
place that knows about them.

Note: [Planned transformers models]
While a plan is applied, on every module of the model that has them (the model and its inner
``PreTrainedModel`` stacks; a PEFT wrapper forwards to them):

- ``gradient_checkpointing_enable`` / ``activation_checkpointing_enable`` do nothing but log one line.
  transformers' ``Trainer`` calls them in ``train()`` when ``TrainingArguments(gradient_checkpointing=True)``,
  after ``remat.auto``: both schedules would run at once (every block recomputed on top of the plan's
  recomputation: block 0's MLP ran 9 times in 3 steps instead of 6), slower and with a peak the plan never
  predicted. The plan already fits the budget, so the request is met; ``remat.remove`` restores the methods.
- ``save_pretrained`` writes the user's own ``use_cache`` into ``config.json``, not the ``False`` the plan
  sets while planned (a checkpoint saved during training would otherwise load with the cache off).

Both are instance attributes set over the class's methods (picklable objects, so a planned model still
deep-copies and pickles), removed by :func:`restore`.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

log = logging.getLogger("remat")

__all__ = ["HFState", "cache_off", "checkpointing_active", "disable_checkpointing", "prepare", "restore", "users_cache"]

_SAVE = "save_pretrained"

#: The methods that enable transformers' own checkpointing (the second is the name from transformers 5.x on).
ENABLE = ("gradient_checkpointing_enable", "activation_checkpointing_enable")


@dataclass
class HFState:
    """What :func:`prepare` changed, for :func:`restore`: each config whose ``use_cache`` it switched off,
    with its value; each ``(module, method name, its own attribute or None)`` it set over a method (Note
    [Planned transformers models])."""

    use_cache: list[tuple[Any, Any]] = field(default_factory=list)
    methods: list[tuple[nn.Module, str, Any]] = field(default_factory=list)


class _CheckpointingDeclined:
    """A planned model's ``gradient_checkpointing_enable``: remat's plan is the model's checkpointing."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        log.warning("remat: %s() ignored: this model runs a remat plan, which already checkpoints it within its"
                    " budget (both at once would recompute twice); remat.remove(model) restores it", self.name)


class _SaveWithOwnCache:
    """A planned model's ``save_pretrained``: the configs' ``use_cache`` as the user set them while saving."""

    def __init__(self, module: nn.Module, state: HFState, own: Any) -> None:
        self.module, self.state, self.own = module, state, own

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        save = self.own if self.own is not None else getattr(type(self.module), _SAVE).__get__(self.module)
        planned = [(config, config.use_cache) for config, _ in self.state.use_cache]
        try:
            for config, value in self.state.use_cache:
                config.use_cache = value
            return save(*args, **kwargs)
        finally:
            for config, value in planned:
                config.use_cache = value


def _set_over(state: HFState, module: nn.Module, name: str, value: Any) -> None:
    state.methods.append((module, name, module.__dict__.get(name)))
    module.__dict__[name] = value


def _guard_methods(model: nn.Module, state: HFState) -> None:
    """Note [Planned transformers models]."""
    for m in model.modules():
        cls = type(m)
        for name in ENABLE:
            if callable(getattr(cls, name, None)):
                _set_over(state, m, name, _CheckpointingDeclined(name))
        if state.use_cache and callable(getattr(cls, _SAVE, None)):
            _set_over(state, m, _SAVE, _SaveWithOwnCache(m, state, m.__dict__.get(_SAVE)))


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
    """Switch off the model's own checkpointing and its cache, and keep them off while planned (Note
    [Planned transformers models]); returns what to restore."""
    disable_checkpointing(model, caller)
    state = _switch_cache_off(model)
    _guard_methods(model, state)
    return state


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
    for module, name, own in reversed(state.methods):
        if own is None:
            module.__dict__.pop(name, None)
        else:
            module.__dict__[name] = own
    state.methods.clear()


@contextlib.contextmanager
def users_cache(state: HFState) -> Iterator[bool]:
    """The configs' ``use_cache`` as the user set them while inside (a planned model keeps it off); yields
    whether any differs from the planned value."""
    planned = [(config, config.use_cache) for config, _ in state.use_cache]
    try:
        for config, value in state.use_cache:
            config.use_cache = value
        yield any(value != was for (_, value), (_, was) in zip(state.use_cache, planned))
    finally:
        for config, value in planned:
            config.use_cache = value


@contextlib.contextmanager
def fakes_with_values_run_as_on_device(known: Callable[[Any], bool]) -> Iterator[None]:
    """Note: [Masks on a fake copy] transformers takes its tracing path on fake tensors
    (``is_tracing(tensor)`` is true for a FakeTensor): an attention mask that is all ones, which the
    device's step skips (``padding_mask.all()``: no mask, sdpa's fast path), is built in 4-D on a fake copy
    and saved by every attention (a BART 4+4: 32 KiB more per encoder layer, a least 1.9% above the
    device's). While a fake copy runs, a fake tensor whose values the copy mirrors (``known``; Note [Falling
    back per op]) is not tracing to transformers: the check reads its values and the copy takes the device's
    path. A fake tensor without values still is."""
    utils = sys.modules.get("transformers.utils.import_utils")
    original = getattr(utils, "is_fake_tensor", None)
    if original is None:
        yield
        return

    def is_fake_tensor(tensor: Any) -> bool:
        return bool(original(tensor)) and not known(tensor)

    utils.is_fake_tensor = is_fake_tensor  # type: ignore[union-attr]
    try:
        yield
    finally:
        utils.is_fake_tensor = original  # type: ignore[union-attr]
