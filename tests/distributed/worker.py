"""Run under ``torchrun --nproc_per_node 2`` (gloo, CPU): remat plans inside FSDP2 and DDP jobs.

Every case builds the same small GPT-like model on each rank, a reference copy without remat and a
planned copy, wrapped the same way; one training step each on this rank's batch; the losses and every
gradient (this rank's shards) are compared bitwise, and a tracked step of the planned model is measured
against the plan's per-rank prediction. Each rank writes its results as JSON to ``<out>/rank<r>.json``.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import remat
from remat.planning.plan import Record, Region
from remat.planning.simulate import simulate
from remat.planning.solve import make_plan
from remat.runtime.distributed import broadcast_plan, check_same_plan, fsdp_profile, plan_for_job

VOCAB, D, HEADS, SEQ, BATCH, DEPTH = 64, 32, 2, 64, 8, 6


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.fc, self.out = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, D)
        x = x + self.drop(self.proj(a))
        return x + self.drop(self.out(F.gelu(self.fc(self.ln2(x)))))


class TinyGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, D), nn.Embedding(SEQ, D)
        self.h = nn.ModuleList(Block() for _ in range(DEPTH))
        self.ln_f, self.head = nn.LayerNorm(D), nn.Linear(D, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        for block in self.h:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def nested_items(n: int) -> tuple[Any, ...]:
    """Stages: prologue 0, blocks 1..n, head n+1. Two regions: 1..3 with 2..3 nested, and 4..n."""
    inner = Region(2, 4, (Record(2), Record(3)))
    return (Record(0), Region(1, 4, (Record(1), inner)), Region(4, n + 1, tuple(Record(k) for k in range(4, n + 1))),
            Record(n + 1))


def one_region_items(n: int) -> tuple[Any, ...]:
    """Every block in one region: its recomputation runs all of them while the last one's backward waits."""
    return (Record(0), Region(1, n + 1, tuple(Record(k) for k in range(1, n + 1))), Record(n + 1))


def sharded(model: nn.Module, how: str) -> nn.Module:
    """FSDP2 as torchtitan lays it out (every block, then the root), or DDP with the given options."""
    if how == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.h:
            fully_shard(block)
        return fully_shard(model)
    options = {"ddp": {}, "ddp-static": {"static_graph": True}, "ddp-unused": {"find_unused_parameters": True}}[how]
    return nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True, **options)


def grads_of(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        out[name] = g.to_local() if hasattr(g, "to_local") else g
    return out


def step(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(1234 + dist.get_rank())  # dropout: the same draws in both models
    loss = model(ids)
    loss.backward()
    return loss.detach()


def bitwise(ref: nn.Module, planned: nn.Module, ids: torch.Tensor) -> dict[str, Any]:
    ref.zero_grad(set_to_none=True)
    planned.zero_grad(set_to_none=True)
    a, b = step(ref, ids), step(planned, ids)
    ga, gb = grads_of(ref), grads_of(planned)
    differ = [n for n in ga if ga[n] is None or gb.get(n) is None or not torch.equal(ga[n], gb[n])]
    return {"loss_equal": bool(torch.equal(a, b)), "grads": len(ga), "grads_differ": differ}


class Setup:
    """This rank's model (built from one seed on every rank), its batch, and its profile (once)."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = TinyGPT()
        self.ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(dist.get_rank()))
        self.profile = remat.profile(self.model, self.ids, repeats=1)
        self.per_rank = fsdp_profile(self.profile, self.model, dist.get_world_size())


def run_case(setup: Setup, name: str, how: str, order: str, plan_of: Callable[[Any], Any]) -> dict[str, Any]:
    """One case: the planned model (apply ``order`` = before/after wrapping) against the reference."""
    profile = setup.per_rank if how == "fsdp" else setup.profile  # DDP: a rank holds the whole model
    plan, ids = plan_of(profile), setup.ids
    ref, planned = sharded(copy.deepcopy(setup.model), how), copy.deepcopy(setup.model)
    if order == "before":
        remat.apply(planned, plan)
        planned = sharded(planned, how)
    else:
        planned = remat.apply(sharded(planned, how), plan)
    result = {"case": name, "how": how, "order": order, **bitwise(ref, planned, ids)}
    regions = list(plan.regions())
    result["multi_block_regions"] = sum(r.stop - r.start > 1 for r in regions)
    result["nested"] = any(isinstance(it, Region) for r in regions for it in r.body)
    m = remat.measure(lambda: step(planned, ids), model=planned, inputs=ids, repeats=0)
    result.update(measured=m.peak_bytes, predicted=simulate(profile, plan).peak_bytes,
                  budget=plan.budget_bytes, strategy=plan.strategy, breakdown=m.breakdown)
    alone = remat.apply(copy.deepcopy(setup.model), plan)  # the same plan on one process, for comparison
    result.update(alone_measured=remat.measure(lambda: step(alone, ids), model=alone, inputs=ids,
                                               repeats=0).peak_bytes,
                  alone_predicted=simulate(setup.profile, plan).peak_bytes)
    return result


def fixed_plan(items_of: Callable[[int], Any]) -> Callable[[Any], Any]:
    def make(profile: Any) -> Any:
        plan = make_plan(profile, items_of(DEPTH), strategy="custom", budget_bytes=None)
        return check_same_plan(plan)

    return make


def budget_plan(share: float) -> Callable[[Any], Any]:
    def make(profile: Any) -> Any:
        from remat.planning.solve import min_feasible_peak, no_checkpointing_peak

        low, high = min_feasible_peak(profile), no_checkpointing_peak(profile)
        return plan_for_job(profile, int(low + share * (high - low)))

    return make


def sqrt_plan(profile: Any) -> Any:
    return broadcast_plan(remat.solve(profile, strategy="sqrt") if dist.get_rank() == 0 else None)


def disagreement(setup: Setup) -> dict[str, Any]:
    """Ranks holding different plans, or profiles of other inputs: every rank raises, none hangs."""
    plan = remat.solve(setup.profile, strategy="sqrt" if dist.get_rank() == 0 else "every")
    out: dict[str, Any] = {"case": "disagreement"}
    try:
        check_same_plan(plan)
        out["plans"] = None
    except remat.PlanMismatchError as e:
        out["plans"] = str(e)
    ids = setup.ids[:, : SEQ // 2] if dist.get_rank() == 1 else setup.ids
    try:
        plan_for_job(remat.profile(setup.model, ids, repeats=1), strategy="sqrt")
        out["profiles"] = None
    except remat.PlanMismatchError as e:
        out["profiles"] = str(e)
    return out


CASES: list[tuple[str, str, str, Callable[[Any], Any]]] = [
    ("fsdp-sqrt-before", "fsdp", "before", sqrt_plan),
    ("fsdp-sqrt-after", "fsdp", "after", sqrt_plan),
    ("fsdp-nested-before", "fsdp", "before", fixed_plan(nested_items)),
    ("fsdp-nested-after", "fsdp", "after", fixed_plan(nested_items)),
    ("fsdp-budget-after", "fsdp", "after", budget_plan(0.3)),
    ("fsdp-one-region-before", "fsdp", "before", fixed_plan(one_region_items)),
    ("ddp-nested-before", "ddp", "before", fixed_plan(nested_items)),
    ("ddp-sqrt-after", "ddp", "after", sqrt_plan),
    ("ddp-static-nested-after", "ddp-static", "after", fixed_plan(nested_items)),
    ("ddp-unused-budget-before", "ddp-unused", "before", budget_plan(0.3)),
]


def auto_after_shard(setup: Setup, mixed: bool) -> dict[str, Any]:
    """torchtitan's order: the model is sharded first, then remat.auto plans it per rank (no fake copy of a sharded
    model: each rank measures its own step), optionally with bf16 parameters (MixedPrecisionPolicy)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    name = f"sharded-auto{'-mixed' if mixed else ''}"
    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    policy = {"mp_policy": bf16} if mixed else {}

    def shard(model: nn.Module) -> nn.Module:
        for block in model.h:
            fully_shard(block, **policy)
        return fully_shard(model, **policy)

    ref, planned = shard(copy.deepcopy(setup.model)), shard(copy.deepcopy(setup.model))
    try:
        remat.auto(planned, setup.ids, budget="80%", repeats=1)
    except Exception:
        return {"case": name, "error": traceback.format_exc()}
    plan = remat.plan_of(planned)
    result = {"case": name, **bitwise(ref, planned, setup.ids), "regions": len(list(plan.regions()))}
    m = remat.measure(lambda: step(planned, setup.ids), model=planned, inputs=setup.ids, repeats=0)
    return {**result, "measured": m.peak_bytes, "predicted": plan.prediction.peak_bytes, "budget": plan.budget_bytes}


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    setup = Setup()
    results: list[dict[str, Any]] = []
    only = os.environ.get("REMAT_CASES")
    for name, how, order, plan_of in CASES:
        if only and name not in only.split(","):
            continue
        try:
            results.append(run_case(setup, name, how, order, plan_of))
        except Exception:
            results.append({"case": name, "error": traceback.format_exc()})
    results.append(disagreement(setup))
    for mixed in (False, True):
        if not only or f"sharded-auto{'-mixed' if mixed else ''}" in only.split(","):
            results.append(auto_after_shard(setup, mixed))
    with open(os.path.join(out_dir, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
