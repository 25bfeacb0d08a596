"""Run a plan on the real model: nested non-reentrant checkpoint regions, same gradients.

Each block's ``forward`` is replaced (on the instance, so parameters, ``state_dict`` keys and optimizers
are untouched) by a small dispatcher. The model's own loop still calls the blocks one by one:

* a block the plan keeps runs as before;
* the first block of a region runs the whole region ``start … stop-1`` inside
  ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``, following the region's body — inner
  regions are nested checkpoints, which recompute level by level (multi-level recomputation) — and
  returns the region's output;
* the other blocks of the region then receive that output from the model's loop and hand it on
  unchanged, after checking that it is the tensor the region produced and that they received the same
  extra arguments (attention mask, position ids) as the region's first block.

Outside training (``model.eval()`` or ``torch.no_grad()``) every block runs its plain forward.

Note: [BatchNorm under recomputation] A recomputed BatchNorm in training mode would update its running
statistics once more per recomputation. Regions that contain BatchNorm pass a ``context_fn`` whose
recompute context snapshots the running statistics (and ``num_batches_tracked``) on entry and restores
them on exit, so they move exactly once per step. Outputs do not depend on running statistics in
training mode, so recomputed values are unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from remat.errors import PlanError, PlanMismatchError
from remat.planning.plan import Item, Plan, Record, Region
from remat.runtime.model import (
    Extras,
    call_with_carry,
    carry_of,
    extras_of,
    fits_shapes,
    hf_checkpointing_active,
    hf_checkpointing_disable,
    input_shapes,
    input_signature,
    model_signature,
    same_extras,
    split_carry,
)

__all__ = ["apply", "is_applied", "plan_of", "remove"]

log = logging.getLogger("remat")
_STATE = "_remat_state"


@dataclass
class _Stash:
    next: int  # the block expected next
    last: int  # the region's last block
    carry: Any
    out: Any
    extras: Extras


class _RestoreNormStats:
    """Recompute context: running statistics of BatchNorm-like modules are restored on exit."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.modules = modules
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __enter__(self) -> None:
        with torch.no_grad():
            self.saved = [
                (buf, buf.clone())
                for m in self.modules
                for buf in (m.running_mean, m.running_var, m.num_batches_tracked)
                if isinstance(buf, torch.Tensor)
            ]

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for buf, value in self.saved:
                buf.copy_(value)
        self.saved = []


def _norm_context(modules: Sequence[nn.Module]) -> tuple[Any, Any]:
    return contextlib.nullcontext(), _RestoreNormStats(modules)


class _Executor:
    def __init__(self, model: nn.Module, plan: Plan, blocks: dict[int, nn.Module], check_inputs: bool) -> None:
        self.model = model
        self.plan = plan
        self.blocks = blocks
        self.check_inputs = check_inputs
        self.stash: _Stash | None = None
        self.orig: dict[int, Callable[..., Any]] = {}
        self.had_instance_forward: dict[int, Any] = {}
        self.regions: dict[int, Region] = {}
        self.inside: set[int] = set()
        for it in plan.items:
            if isinstance(it, Region):
                self.regions[it.start] = it
                self.inside.update(range(it.start + 1, it.stop))
        self.norms: dict[int, list[nn.Module]] = {
            c: [m for m in mod.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]
            for c, mod in blocks.items()
        }
        self.hook: Any = None
        self.saved_use_cache: Any = None

    # ---- install / uninstall ---------------------------------------------------------------------
    def install(self) -> None:
        for c, mod in self.blocks.items():
            if "forward" in mod.__dict__:
                self.had_instance_forward[c] = mod.__dict__["forward"]
            self.orig[c] = mod.forward
            mod.forward = self._dispatcher(c)
        if self.check_inputs and ":" in self.plan.fingerprint:
            self.hook = self.model.register_forward_pre_hook(self._check_inputs, with_kwargs=True)

    def uninstall(self) -> None:
        for c, mod in self.blocks.items():
            if c in self.had_instance_forward:
                mod.forward = self.had_instance_forward[c]
            else:
                mod.__dict__.pop("forward", None)
        if self.hook is not None:
            self.hook.remove()

    # ---- runtime ------------------------------------------------------------------------------------
    def _check_inputs(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        if self.plan.input_shapes:
            ok = fits_shapes(input_shapes(args, kwargs), [list(s) for s in self.plan.input_shapes])
        else:
            ok = input_signature(args, kwargs) == self.plan.fingerprint.split(":", 1)[1]
        if not ok:
            shapes = [tuple(t.shape) for t in torch.utils._pytree.tree_flatten((args, kwargs))[0]
                      if isinstance(t, torch.Tensor)]
            planned = [tuple(s[0]) for s in self.plan.input_shapes]
            raise PlanMismatchError(
                f"remat: this plan was made for inputs {planned or 'of other shapes'}; this call's {shapes} are"
                " larger or of another dtype, and the plan's memory figures would not hold. Profile and solve"
                " again for these inputs (remat.auto does both), or apply(model, plan, check_inputs=False)"
                " to run it anyway."
            )

    def _context(self, start: int, stop: int) -> Callable[[], tuple[Any, Any]] | None:
        mods = [m for c in range(start, stop) for m in self.norms.get(c, [])]
        return functools.partial(_norm_context, mods) if mods else None

    def _checkpoint(self, region: Region, carry: Any, key: Any, extras: Extras) -> Any:
        def run(h: Any, *eargs: Any, **ekw: Any) -> Any:
            return self._run(region.body, h, key, (eargs, ekw))

        options: dict[str, Any] = {"use_reentrant": False, "preserve_rng_state": True}
        ctx = self._context(region.start, region.stop)
        if ctx is not None:
            options["context_fn"] = ctx
        return checkpoint(run, carry, *extras[0], **options, **extras[1])

    def _run(self, items: Sequence[Item], carry: Any, key: Any, extras: Extras) -> Any:
        out = None
        for it in items:
            if isinstance(it, Record):
                out = call_with_carry(self.orig[it.stage], carry, key, extras)
            else:
                out = self._checkpoint(it, carry, key, extras)
            carry = carry_of(out)
        return out

    def _dispatcher(self, c: int) -> Callable[..., Any]:
        name = self.plan.stage_names[c]

        def forward(*args: Any, **kwargs: Any) -> Any:
            module = self.blocks[c]
            active = module.training and torch.is_grad_enabled()
            if c in self.regions and active:
                carry, key = split_carry(module, args, kwargs)
                extras = extras_of(args, kwargs, key)
                region = self.regions[c]
                out = self._checkpoint(region, carry, key, extras)
                last = region.stop - 1
                self.stash = _Stash(c + 1, last, carry_of(out), out, extras) if last > c else None
                return out
            if c in self.inside and active:
                stash = self.stash
                carry, key = split_carry(module, args, kwargs)
                if stash is None or stash.next != c or carry is not stash.carry:
                    self.stash = None
                    raise PlanMismatchError(
                        f"remat: block {name} is inside a checkpoint region, but the model did not hand it the"
                        " region's output (the model's forward changes the hidden state between blocks, or"
                        " calls the blocks out of order). Profile this model again, or plan with"
                        " strategy='every'."
                    )
                if not same_extras(extras_of(args, kwargs, key), stash.extras):
                    self.stash = None
                    raise PlanMismatchError(
                        f"remat: block {name} received other extra arguments (attention mask, position ids,"
                        " ...) than the first block of its checkpoint region; they cannot share a region."
                        " Profile the model again so that the planner sees where the arguments change."
                    )
                stash.next += 1
                if c == stash.last:
                    self.stash = None
                return stash.out
            return self.orig[c](*args, **kwargs)

        return forward


def state_of(model: nn.Module) -> _Executor:
    ex = getattr(model, _STATE, None)
    if not isinstance(ex, _Executor):
        raise PlanError(f"remat: no plan is applied to this {type(model).__name__}; call remat.apply or remat.auto")
    return ex


def plan_of(model: nn.Module) -> Plan:
    """The plan applied to ``model`` by :func:`apply` or :func:`remat.auto`."""
    return state_of(model).plan


def is_applied(model: nn.Module) -> bool:
    """Whether :func:`apply` has been called on ``model`` (and not undone)."""
    return getattr(model, _STATE, None) is not None


def apply(model: nn.Module, plan: Plan, *, check_inputs: bool = True) -> nn.Module:
    """Make ``model``'s training forward run ``plan``, in place; returns the model.

    Args:
        model: the model the plan's profile was made from (same structure; any device).
        plan: from :func:`remat.solve`.
        check_inputs: raise :class:`PlanMismatchError` when a training call's input shapes differ from
            the profiled ones (the plan's memory figures would not hold).

    Raises:
        PlanMismatchError: the plan was made for another model.
        PlanError: the plan names stages the model does not have.

    Hugging Face models: gradient checkpointing of their own is switched off (remat's plan replaces
    it) and ``config.use_cache`` is set to False while the plan is applied (a cache would be written
    twice by recomputation); :func:`remove` restores both.
    """
    if not isinstance(plan, Plan):
        raise PlanError(f"remat.apply: expected a remat.Plan, got {type(plan).__name__}")
    if is_applied(model):
        remove(model)
    names = plan.stage_names
    block_names = list(names[1:-1])
    blocks: dict[int, nn.Module] = {}
    for c, name in enumerate(block_names, start=1):
        try:
            blocks[c] = model.get_submodule(name)
        except AttributeError:
            raise PlanMismatchError(
                f"remat.apply: the plan names stage {name!r}, which {type(model).__name__} does not have;"
                " this plan was made for another model"
            ) from None
    if plan.fingerprint:
        expected = plan.fingerprint.split(":", 1)[0]
        if model_signature(model, block_names) != expected:
            raise PlanMismatchError(
                f"remat.apply: this plan was made for a model with other parameters (shapes, dtypes or"
                f" trainable flags) than this {type(model).__name__}; profile and solve for this model"
            )
    for region in _regions(plan.items):
        for k in range(region.start, region.stop):
            if k not in blocks:
                raise PlanError(f"remat.apply: region {region.start}..{region.stop - 1} contains stage {k}"
                                f" ({names[k]}), which is not a block and cannot be checkpointed")
    ex = _Executor(model, plan, blocks, check_inputs)
    if hf_checkpointing_active(model):
        log.warning("remat.apply: switching off the model's own gradient checkpointing; the plan replaces it")
        hf_checkpointing_disable(model)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_cache", False):
        ex.saved_use_cache = config.use_cache
        config.use_cache = False
    ex.install()
    object.__setattr__(model, _STATE, ex)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: the model runs its original forward again. Returns the model."""
    ex = getattr(model, _STATE, None)
    if ex is None:
        return model
    ex.uninstall()
    if ex.saved_use_cache is not None:
        setattr(getattr(model, "config"), "use_cache", ex.saved_use_cache)  # noqa: B009, B010
    object.__delattr__(model, _STATE)
    return model


def _regions(items: Sequence[Item]) -> Iterator[Region]:
    for it in items:
        if isinstance(it, Region):
            yield it
            yield from _regions(it.body)
