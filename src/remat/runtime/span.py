"""Stages that span consecutive children of a container: a layer with the activation and pool after it.

Note: [Spans]
A conv alone cannot usefully be a stage of VGG's ``features``: the ``ReLU(inplace=True)`` after it modifies
its output and saves it for backward, so checkpointing the conv frees nothing, and a pool has no parameters
to be a stage of its own. The unit torchvision users checkpoint is "conv + ReLU (+ pool)": consecutive
children of one container, each handing its output to the next. A :class:`Span` is that unit as a stage,
named ``<container>.<first>:<stop>`` (Python's slice of the container's children: ``features.0:3`` is
``features.0``, ``features.1`` and ``features.2``), which :func:`resolve` turns back into the span, so plans
keep plain names and round-trip through JSON.

A span is not a submodule of the model (the model's parameters, ``state_dict`` and fingerprint are as they
were); it holds the children it spans, so ``span.modules()`` finds their norms (their statistics are copied
around a recomputation, :func:`remat.runtime.regions.recompute_copy_bytes`) and ``span.parameters()`` their
weights. Hooks on it are hooks on its ends: a forward pre-hook goes on its first child, a forward hook on its
last (:class:`SpanHook`, which hands the hook the span as its module), so the profiler's
:class:`remat.runtime.timeline.Timeline` marks its boundaries and a :class:`remat.runtime.regions.Runner`
enters its checkpoint region before the first child and leaves it after the last, with the in-place
activation and the pool inside. Calling a span (a recomputation) calls its children in order, through
``Module.__call__``, so those hooks fire as in the model's own forward.

The span's first child must not modify its input in place (a checkpoint's saved input would change):
discovery starts a span at a child with parameters, never at an in-place activation, and the profiler
refuses a stage that changes its input.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["Span", "SpanHook", "children_of", "hook_ends", "resolve", "span_name"]


def span_name(container: str, start: int, stop: int) -> str:
    """``features.0:3``: children ``start`` up to (not including) ``stop`` of submodule ``container``."""
    return f"{container}.{start}:{stop}" if container else f"{start}:{stop}"


class Span(nn.Module):
    """Children ``start:stop`` of ``container`` run in order, as one stage (Note [Spans])."""

    def __init__(self, container: nn.Module, start: int, stop: int) -> None:
        super().__init__()
        children = children_of(container)
        if not 0 <= start < stop <= len(children):
            raise ValueError(f"a span {start}:{stop} of a {type(container).__name__} with {len(children)} children")
        self.parts = nn.ModuleList(children[start:stop])
        self.start, self.stop = start, stop

    def forward(self, x: Any) -> Any:
        for part in self.parts:
            x = part(x)
        return x

    def register_forward_pre_hook(self, hook: Callable[..., Any], *, prepend: bool = False,
                                  with_kwargs: bool = False) -> RemovableHandle:
        return self.parts[0].register_forward_pre_hook(SpanHook(self, hook), prepend=prepend, with_kwargs=with_kwargs)

    def register_forward_hook(self, hook: Callable[..., Any], *, prepend: bool = False,
                              with_kwargs: bool = False, always_call: bool = False) -> RemovableHandle:
        return self.parts[-1].register_forward_hook(SpanHook(self, hook), prepend=prepend, with_kwargs=with_kwargs,
                                                    always_call=always_call)


def _call_hook(wrapper: SpanHook, module: nn.Module, *rest: Any) -> Any:
    return wrapper.hook(wrapper.span, *rest)


class SpanHook:
    """A hook of a span, on one of its ends: called with the span as its module (a picklable callable).
    Skipped by dynamo without switching it off, as the region's own hooks are (Note [torch.compile] in
    regions.py)."""

    def __init__(self, span: Span, hook: Callable[..., Any]) -> None:
        self.span, self.hook = span, hook

    __call__ = torch.compiler.disable(_call_hook, recursive=False)


def children_of(container: nn.Module) -> list[nn.Module]:
    """A container's children by position, as its forward may call them: a module registered twice (one
    ``ReLU`` at two places of a Sequential) counts twice, unlike ``named_children()``."""
    return [m for m in container._modules.values() if m is not None]


def hook_ends(block: nn.Module) -> list[nn.Module]:
    """The modules a block's hooks are registered on: a span's first and last children, else the block."""
    return [block.parts[0], block.parts[-1]] if isinstance(block, Span) else [block]


def resolve(model: nn.Module, name: str) -> nn.Module:
    """The submodule ``name`` of ``model``, or the :class:`Span` it names (``features.0:3``); raises
    ``AttributeError`` as ``get_submodule`` does."""
    container, _, last = name.rpartition(".")
    if ":" not in last:
        return model.get_submodule(name)
    start, _, stop = last.partition(":")
    if not (start.isdigit() and stop.isdigit()):
        raise AttributeError(f"{name!r} is not a span: expected <container>.<start>:<stop>")
    parent = model.get_submodule(container) if container else model
    try:
        return Span(parent, int(start), int(stop))
    except ValueError as e:
        raise AttributeError(f"{name!r}: {e}") from None
