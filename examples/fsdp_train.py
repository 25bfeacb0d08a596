"""Train a GPT-2-style model with FSDP2 under a per-rank memory budget: plan once, shard, apply, train.

    torchrun --nproc_per_node 2 examples/fsdp_train.py      # (python examples/fsdp_train.py launches that)

Every rank profiles the unsharded model on its own batch; remat turns the profile into per-rank memory
(this rank's shards, FSDP2's unsharded blocks, AdamW's sharded state), rank 0 solves within the budget
and every rank applies that one plan after ``fully_shard``. Then a few AdamW steps, and one step
measured on every rank against the plan's prediction. CPU and gloo here; on GPUs, nccl and ``cuda``.
"""

import os
import subprocess
import sys

import torch
import torch.distributed as dist
import transformers
from torch.distributed.fsdp import fully_shard

import remat
from remat.runtime.distributed import fsdp_profile, plan_for_job

BUDGET = "60%"  # of this rank's peak without checkpointing; a size such as "60GiB" on a GPU


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)  # the same initial weights on every rank
    config = transformers.GPT2Config(n_layer=6, n_embd=64, n_head=4, vocab_size=512, n_positions=128)
    model = transformers.GPT2LMHeadModel(config).train()
    ids = torch.randint(0, 512, (4, 128), generator=torch.Generator().manual_seed(rank))  # this rank's batch
    batch = {"input_ids": ids, "labels": ids}

    profile = fsdp_profile(remat.profile(model, batch), model, world, optimizer="adamw")
    plan = plan_for_job(profile, BUDGET)  # rank 0 solves; every rank gets the same plan

    for block in model.transformer.h:  # torchtitan's layout: every block, then the root
        fully_shard(block)
    fully_shard(model)
    remat.apply(model, plan)  # after sharding (before works too)
    if rank == 0:
        print(plan)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(3):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f}")

    measured = remat.measure(lambda: model(**batch).loss.backward(), model=model, inputs=ids, optimizer=opt,
                             repeats=0)
    peaks: list = [None] * world
    dist.all_gather_object(peaks, measured.peak_bytes)
    if rank == 0:
        for r, peak in enumerate(peaks):
            print(f"rank {r}: measured peak {remat.format_bytes(peak)}, predicted {remat.format_bytes(plan.peak_bytes)}"
                  f" ({plan.peak_bytes / peak - 1:+.1%}), budget {remat.format_bytes(plan.budget_bytes)}")
    dist.destroy_process_group()


if __name__ == "__main__":
    if "LOCAL_RANK" in os.environ:
        main()
    else:  # started with plain python: launch the 2-rank job
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__]
        sys.exit(subprocess.call(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}))
