"""Apply a plan to a model: checks that the plan is this model's, then installs its regions.

The regions are run by :class:`remat.runtime.regions.Runner` through module hooks (see Note [The
region protocol] there): parameters, ``state_dict`` keys and optimizers are untouched, the model's own
loop still calls every block through ``Module.__call__``, and a planned model deep-copies and pickles
like any model. Outside autograd recording (``torch.no_grad()``, inference) blocks run as they are.

Note: [Eval mode] A plan checkpoints every forward that records autograd, in training or evaluation
mode alike: a step that records keeps what the plan keeps, so the budget holds in both (evaluation
mode keeps less: no dropout masks). Gradients are the same as the plain model's in both modes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from remat.errors import PlanError, PlanMismatchError
from remat.planning.plan import Plan
from remat.runtime import head, hf
from remat.runtime.model import describe_input_mismatch, inner_name, input_shapes, model_signature, unwrap
from remat.runtime.regions import Runner
from remat.runtime.span import resolve
from remat.runtime.step import Autocast

__all__ = ["applied_state", "apply", "is_applied", "plan_of", "remove"]

_STATE = "_remat_state"


class _Applied:
    """What :func:`apply` installed: the plan, its runner, what it changed on a transformers model."""

    def __init__(self, plan: Plan, runner: Runner, hf_state: hf.HFState,
                 undo_head: Callable[[], None] | None = None) -> None:
        self.plan, self.runner, self.hf_state, self.undo_head = plan, runner, hf_state, undo_head


class _InputCheck:
    """Root pre-hook: a recording call under another autocast than planned, or (``inputs``) with larger inputs
    (or other dtypes) than planned, is refused."""

    def __init__(self, plan: Plan, inputs: bool = True) -> None:
        self.plan, self.inputs = plan, inputs  # inputs False: only the autocast is checked

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not torch.is_grad_enabled():
            return
        state = _state(module)  # the plan's own runner: profiling suspends it and may run another on top
        if state is not None and state.runner.suspended:
            return
        _check_autocast(module, self.plan)
        if not self.inputs or not self.plan.input_shapes:
            return
        what = describe_input_mismatch(input_shapes(args, kwargs), [list(s) for s in self.plan.input_shapes])
        if what:
            raise PlanMismatchError(
                f"remat: this call's inputs differ from the ones the plan was made for: {what}. The plan's memory"
                " figures hold for the planned inputs or smaller ones of the same dtypes. Profile and solve again"
                " for these inputs (remat.auto does both), or apply(model, plan, check_inputs=False) to run anyway."
            )


def _check_autocast(module: nn.Module, plan: Plan) -> None:
    """A recording call runs under the autocast the plan was made for (Note [The step that runs] in
    :mod:`remat.runtime.step`): autocast's cast copies are part of what the plan holds."""
    param = next(iter(module.parameters()), None)
    now = Autocast.current(param.device.type if param is not None else "cpu")
    if (str(now) if now is not None else "") == plan.autocast:
        return
    ran = f"under torch.autocast ({now})" if now is not None else "without autocast"
    made = f"for autocast {plan.autocast}" if plan.autocast else "without autocast"
    fix = (f"remat.auto(..., autocast={now.dtype}) or call remat.auto inside the autocast block" if now is not None
           else "remat.auto(..., autocast=False)")
    raise PlanMismatchError(
        f"remat: this call runs {ran}, but the plan was made {made}: the step's memory (autocast keeps cast copies of"
        f" the weights) is not what the plan predicts. Profile and solve again as the step runs: {fix}"
    )


def _state(model: nn.Module) -> _Applied | None:
    state = unwrap(model).__dict__.get(_STATE)
    return state if isinstance(state, _Applied) else None


def applied_state(model: nn.Module) -> _Applied | None:
    """What :func:`apply` installed on ``model`` (None if no plan is applied)."""
    return _state(model)


def plan_of(model: nn.Module) -> Plan:
    """The plan applied to ``model`` by :func:`apply` or :func:`remat.auto`."""
    state = _state(model)
    if state is None:
        raise PlanError(f"remat: no plan is applied to this {type(model).__name__}; call remat.apply or remat.auto")
    return state.plan


def is_applied(model: nn.Module) -> bool:
    """Whether :func:`apply` has been called on ``model`` (and not undone)."""
    return _state(model) is not None


def _blocks(model: nn.Module, plan: Plan) -> dict[int, nn.Module]:
    blocks: dict[int, nn.Module] = {}
    for k in plan.block_indices():
        name = plan.stage_names[k]
        try:
            blocks[k] = resolve(unwrap(model), inner_name(model, name))
        except AttributeError:
            raise PlanMismatchError(
                f"remat.apply: the plan names stage {name!r}, which {type(model).__name__} does not have;"
                " this plan was made for another model"
            ) from None
    for region in plan.regions():
        for k in range(region.start, region.stop):
            if k not in blocks:
                raise PlanError(f"remat.apply: region {region.start}..{region.stop - 1} contains stage {k}"
                                f" ({plan.stage_names[k]}), which is not a block and cannot be checkpointed")
    return blocks


def _check_model(model: nn.Module, plan: Plan, blocks: dict[int, nn.Module]) -> None:
    if not plan.fingerprint:
        raise PlanMismatchError(
            "remat.apply: this plan has no fingerprint, so nothing shows it was made for this model; pass"
            " check_model=False to apply it anyway (its memory figures then hold only if it is this model's)"
        )
    expected = plan.fingerprint.split(":", 1)[0]
    if model_signature(model, [plan.stage_names[k] for k in sorted(blocks)]) != expected:
        raise PlanMismatchError(
            f"remat.apply: this plan was made for a model with other parameters (shapes, dtypes or"
            f" trainable flags) than this {type(model).__name__}; profile and solve for this model"
        )


def apply(model: nn.Module, plan: Plan, *, check_inputs: bool = True, check_model: bool = True) -> nn.Module:
    """Make ``model``'s recording forward run ``plan``, in place; returns the model.

    Args:
        model: the model the plan's profile was made from (same structure; any device).
        plan: from :func:`remat.solve` (or :meth:`Plan.from_json`).
        check_inputs: raise :class:`PlanMismatchError` when a recording call's inputs are larger than
            the profiled ones or of other dtypes (the plan's memory figures would not hold).
        check_model: check the plan's fingerprint against the model; a plan without one is applied
            only with ``check_model=False``.

    Raises:
        PlanMismatchError: the plan was made for another model.
        PlanError: the plan is malformed or names stages the model does not have.

    Hugging Face models: gradient checkpointing of their own is switched off (remat's plan replaces
    it) and ``config.use_cache`` is set to False while the plan is applied; :func:`remove` restores both.

    A plan with ``head_chunks`` runs the model's head that way (Note [Chunked head] in
    :mod:`remat.runtime.head`): a transformers causal LM called with labels then returns its loss and
    ``logits=None``; :func:`remove` restores the head.
    """
    if not isinstance(model, nn.Module):
        raise PlanError(f"remat.apply: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(plan, Plan):
        raise PlanError(f"remat.apply: expected a remat.Plan, got {type(plan).__name__}")
    plan.validate()
    if is_applied(model):
        remove(model)
    blocks = _blocks(model, plan)
    if check_model:
        _check_model(model, plan, blocks)
    target = unwrap(model)  # DistributedDataParallel calls the model it wraps: the plan goes there
    undo_head = head.install(target, plan.head_chunks) if plan.head_chunks is not None else None
    hf_state = hf.prepare(target, "remat.apply")
    runner = Runner(target, blocks, plan.items, plan.stage_names).install()
    target.register_forward_pre_hook(_InputCheck(plan, check_inputs), with_kwargs=True, prepend=True)
    object.__setattr__(target, _STATE, _Applied(plan, runner, hf_state, undo_head))
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply`: the model runs its original forward again. Returns the model."""
    state = _state(model)
    if state is None:
        return model
    state.runner.uninstall()
    target = unwrap(model)
    for hook_id, hook in list(target._forward_pre_hooks.items()):
        if isinstance(hook, _InputCheck):
            del target._forward_pre_hooks[hook_id]
            target._forward_pre_hooks_with_kwargs.pop(hook_id, None)
    hf.restore(target, state.hf_state)
    if state.undo_head is not None:
        state.undo_head()
    target.__dict__.pop(_STATE, None)
    return model
