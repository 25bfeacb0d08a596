"""remat in a distributed job (``torchrun``): per-rank memory under FSDP2, and one plan for every rank.

Note: [Per-rank memory under FSDP2] With ``fully_shard`` on every block and on the root (torchtitan's
layout), a rank holds for the whole step its shards of the parameters and gradients (each parameter
split along its first dimension, padded to a multiple of the world size), and the root's parameters
unsharded from the first forward to the end of backward with their unsharded gradients. Around a
block, FSDP2 adds:

- forward (first pass or recomputation): the block's unsharded parameters ``U_b``, all-gathered
  before it runs and freed after (remat reshards a recomputed block at once, Note [FSDP2 in
  recomputation] in ``regions.py``);
- backward: ``U_b`` again, its unsharded gradients (``U_b``), the previous block's parameters
  (prefetched: ``U_{b-1}``) and the reduce-scatter buffer of the block whose backward ran before
  (``U_{b+1}``, kept until the next reduce-scatter);
- the head's backward: the last block's parameters, prefetched.

A recomputed region ending with block b runs its blocks again while ``U_b``, ``U_{b-1}`` and the
reduce-scatter buffer ``U_{b+1}`` are live: the terms of block b's backward, which follows at once and
needs them too, plus its gradients. They are not charged twice (as ``recompute_hold_bytes``): with blocks
of one size the backward's peak covers the recomputation's. Measured on 2 ranks (tests/distributed):
predictions 0.5% to 3% above the measured per-rank peaks, never below.

:func:`fsdp_profile` adds these terms to a :class:`~remat.planning.profile.Profile` of the model
(profiled with one rank's batch, unsharded: on a device, or on ``meta`` for a model no single device
holds); plans and predictions made from it are per rank.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from remat.errors import InfeasibleBudgetError, PlanError, PlanMismatchError, ProfileError, RematError
from remat.planning.budget import Budget
from remat.planning.plan import Plan
from remat.planning.profile import Profile, Stage
from remat.runtime.model import inner_name, unwrap
from remat.runtime.span import resolve

__all__ = ["ShardSizes", "broadcast_plan", "check_same_plan", "fsdp_profile", "fsdp_sizes", "plan_for_job"]


@dataclass(frozen=True)
class ShardSizes:
    """Parameter bytes of a model sharded by FSDP2 over ``world_size`` ranks, per rank.

    Attributes:
        world_size: ranks sharing the parameters.
        block_bytes: unsharded parameter bytes of each block (what an all-gather allocates), by stage name.
        root_bytes: unsharded bytes of the parameters outside every block (the root's group).
        sharded_bytes: this rank's shards of every parameter, padded as FSDP2 pads them.
        sharded_grad_bytes: the same for the parameters that are trained (their gradients' shards).
    """

    world_size: int
    block_bytes: dict[str, int]
    root_bytes: int
    sharded_bytes: int
    sharded_grad_bytes: int


def _param_bytes(p: torch.Tensor, world_size: int) -> tuple[int, int]:
    """(this rank's shard, the unsharded all-gather output) of a parameter, in bytes. A DTensor's shape
    is its global shape, so a sharded model gives the same figures as the model before sharding."""
    shape = tuple(p.shape)
    rows = shape[0] if shape else 1
    rest = math.prod(shape[1:]) if len(shape) > 1 else 1
    shard = math.ceil(rows / world_size) * rest * p.element_size()
    return shard, shard * world_size


def fsdp_sizes(model: nn.Module, stage_names: Sequence[str], world_size: int) -> ShardSizes:
    """Per-rank parameter bytes when every block named in ``stage_names`` (those that are submodules of
    ``model``) and the root are each ``fully_shard``-ed over ``world_size`` ranks.

    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 10))  # float32
    >>> sizes = fsdp_sizes(model, ["0"], 4)        # block "0"; the rest is the root's
    >>> sizes.block_bytes["0"] == (64 * 64 + 64) * 4, sizes.root_bytes == (12 * 64 + 12) * 4  # 10 rows pad to 12
    (True, True)
    >>> sizes.sharded_bytes == (16 * 64 + 16 + 3 * 64 + 3) * 4
    True
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ProfileError(f"remat: world_size={world_size!r} must be an int >= 1 (the number of ranks)")
    inner = unwrap(model)
    seen: set[int] = set()
    block_bytes: dict[str, int] = {}
    for name in stage_names:
        try:
            block = resolve(inner, inner_name(model, name))
        except AttributeError:
            continue  # the prologue, glue or head: not a module
        params = [p for p in block.parameters() if id(p) not in seen]
        seen.update(id(p) for p in params)
        block_bytes[name] = sum(_param_bytes(p, world_size)[1] for p in params)
    unique = {id(p): p for p in inner.parameters()}.values()
    root = sum(_param_bytes(p, world_size)[1] for p in unique if id(p) not in seen)
    sharded = sum(_param_bytes(p, world_size)[0] for p in unique)
    sharded_grads = sum(_param_bytes(p, world_size)[0] for p in unique if p.requires_grad)
    return ShardSizes(world_size, block_bytes, root, sharded, sharded_grads)


def fsdp_profile(profile: Profile, model: nn.Module, world_size: int, *, optimizer: Any = None) -> Profile:
    """The per-rank profile of ``model`` under FSDP2 over ``world_size`` ranks (Note [Per-rank memory
    under FSDP2]).

    Args:
        profile: from :func:`remat.profile` on the model before sharding (or on ``device="meta"``), with
            one rank's batch.
        model: that model, or the same model after ``fully_shard`` (its parameters' global shapes are read).
        world_size: ranks in the data-parallel group that shards the parameters.
        optimizer: count this rank's shards of the optimizer state as fixed memory: a name (``"adamw"``)
            or an optimizer class, as :func:`remat.runtime.optimizer.optimizer_state_bytes` takes.

    Returns:
        A profile whose fixed memory is this rank's shards (and the root's unsharded parameters and
        gradients, labelled in ``fixed_summary()``) and whose blocks carry FSDP2's unsharded parameters,
        gradients and buffers; plans solved on it fit each rank's budget. ``meta["fsdp"]`` records the
        sizes used.
    """
    if profile.meta.get("fsdp"):
        raise ProfileError("remat.fsdp_profile: this profile is per rank already; pass the profile of the"
                           " unsharded model")
    sizes = fsdp_sizes(model, profile.names, world_size)
    whole = sum(_param_bytes(p, 1)[1] for p in {id(p): p for p in unwrap(model).parameters()}.values())
    if profile.params_bytes < whole:
        raise ProfileError(
            f"remat.fsdp_profile: the profile holds {profile.params_bytes:,} B of parameters, fewer than the model's"
            f" {whole:,} B: it was made on a sharded model. Profile the model before fully_shard (or on"
            " device='meta'): a profile of the sharded model sees FSDP2's hooks as code between the blocks,"
            " which no region may span"
        )
    grads = sizes.sharded_grad_bytes if profile.grads_bytes else 0
    fixed = profile.fixed_bytes - profile.params_bytes - profile.grads_bytes + sizes.sharded_bytes + grads
    meta = {**profile.meta, "fsdp": {"world_size": world_size, "block_bytes": sizes.block_bytes,
                                     "root_bytes": sizes.root_bytes, "sharded_bytes": sizes.sharded_bytes}}
    out = dataclasses.replace(profile, stages=_fsdp_stages(profile, sizes), fixed_bytes=max(0, fixed),
                              params_bytes=sizes.sharded_bytes, grads_bytes=grads, meta=meta)
    out = out.with_extra_fixed(2 * sizes.root_bytes, "root parameters and gradients unsharded")
    if optimizer is not None:
        from remat.runtime.optimizer import optimizer_state_bytes

        full = optimizer_state_bytes(unwrap(model), optimizer)
        trained = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()
                      if p.requires_grad)
        out = out.with_extra_fixed(math.ceil(full * sizes.sharded_grad_bytes / max(1, trained)),
                                   "optimizer state (this rank's shards)")
    return out


def _fsdp_stages(profile: Profile, sizes: ShardSizes) -> tuple[Stage, ...]:
    """The stages with FSDP2's transient bytes added (Note [Per-rank memory under FSDP2])."""
    blocks = [i for i, s in enumerate(profile.stages) if s.kind == "block"]
    u = [sizes.block_bytes.get(profile.stages[i].name, 0) for i in blocks]
    stages = list(profile.stages)
    for pos, i in enumerate(blocks):
        s, here = stages[i], u[pos]
        prefetched = u[pos - 1] if pos > 0 else 0
        reduce_buffer = u[pos + 1] if pos + 1 < len(blocks) else 0
        stages[i] = dataclasses.replace(
            s,
            fwd_transient_bytes=s.fwd_transient_bytes + here,
            fwd_nograd_transient_bytes=s.fwd_nograd_transient_bytes + here,
            bwd_transient_bytes=s.bwd_transient_bytes + 2 * here + prefetched + reduce_buffer,
        )
    if blocks:
        head = stages[-1]
        stages[-1] = dataclasses.replace(head, bwd_transient_bytes=head.bwd_transient_bytes + u[-1])
    return tuple(stages)


# ---- one plan for the job -------------------------------------------------------------------------------
def _dist() -> Any:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RematError("remat: torch.distributed is not initialised; call torch.distributed.init_process_group"
                         " first (torchrun sets up the environment it reads)")
    return dist


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def broadcast_plan(plan: Plan | None, *, src: int = 0, group: Any = None) -> Plan:
    """The plan of rank ``src``, on every rank of ``group`` (a collective: every rank calls it; ranks other
    than ``src`` may pass None). If ``src`` passes something else than a plan, every rank raises."""
    dist = _dist()
    payload: list[Any] = [None]
    if dist.get_rank() == src:
        payload[0] = plan.to_json() if isinstance(plan, Plan) else {"error": type(plan).__name__}
    dist.broadcast_object_list(payload, src=src, group=group)
    got = payload[0]
    if isinstance(got, dict):
        raise PlanError(f"remat.broadcast_plan: rank {src} passed {got['error']}, not a remat.Plan; make the plan"
                        f" on rank {src} (remat.solve) before broadcasting it")
    return Plan.from_json(got)


def check_same_plan(plan: Plan, *, group: Any = None) -> Plan:
    """Raise :class:`PlanMismatchError` on every rank unless every rank of ``group`` holds this same plan
    (the same items for the same model and inputs); returns the plan. A collective: every rank calls it."""
    dist = _dist()
    if not isinstance(plan, Plan):
        raise PlanError(f"remat.check_same_plan: expected a remat.Plan, got {type(plan).__name__}")
    mine = (_digest(_schedule_text(plan)), plan.fingerprint)
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    _raise_on_disagreement(everyone, "plans", "the same plan (make it once and broadcast it: remat.broadcast_plan)")
    return plan


def _schedule_text(plan: Plan) -> str:
    """The plan's schedule and what it was made for, as text (budget, timings and strategy left out)."""
    d = plan.to_dict()
    return repr([d.get("items"), d.get("stage_names"), plan.fingerprint])


def _raise_on_disagreement(values: Sequence[Any], what: str, fix: str) -> None:
    groups: dict[str, list[int]] = {}
    for rank, value in enumerate(values):
        groups.setdefault(repr(value), []).append(rank)
    if len(groups) > 1:
        parts = "; ".join(f"ranks {ranks} hold {value}" for value, ranks in groups.items())
        raise PlanMismatchError(f"remat: the ranks' {what} differ ({parts}); every rank must run {fix}")


def plan_for_job(profile: Profile, budget: Budget = None, *, strategy: str = "optimal", src: int = 0,
                 group: Any = None, **options: Any) -> Plan:
    """One plan for every rank: the ranks' profiles must be of the same model and inputs (else every rank
    raises :class:`PlanMismatchError`, naming the ranks), rank ``src`` solves, and every rank gets its plan.
    An error solving (an infeasible budget) is raised on every rank. A collective: every rank calls it."""
    dist = _dist()
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, (profile.fingerprint, list(profile.input_shapes)), group=group)
    _raise_on_disagreement(everyone, "profiles (model fingerprint, input shapes)",
                           "the same model on batches of the same shapes")
    plan: Plan | None = None
    failure: list[Any] = [None]
    if dist.get_rank() == src:
        from remat.planning.solve import solve

        try:
            plan = solve(profile, budget, strategy=strategy, **options)
        except Exception as e:  # every rank must hear of it, or the others wait in the broadcast
            failure[0] = (type(e).__name__, str(e), getattr(e, "budget_bytes", None),
                          getattr(e, "min_feasible_bytes", None))
    dist.broadcast_object_list(failure, src=src, group=group)
    if failure[0] is not None:
        name, message, budget_bytes, minimum = failure[0]
        text = f"remat.plan_for_job: rank {src} could not plan: {name}: {message}"
        if name == InfeasibleBudgetError.__name__:
            raise InfeasibleBudgetError(text, budget_bytes=budget_bytes, min_feasible_bytes=minimum)
        raise RematError(text)
    return broadcast_plan(plan, src=src, group=group)
