"""Does the time model hold? Predicted step-time ratios (plan / no checkpointing) against measured ones.

For each model, one profile; then plans across the memory range (every block its own region, sqrt, and
`optimal` at three budgets between the smallest feasible peak and no checkpointing). The plans' steps
are timed interleaved (none, A, none, B, ... repeated), and each plan's measured ratio is the median of
its time over the median of the no-checkpointing time. Machine noise: the spread (max/min) of the
no-checkpointing step's times is printed beside.

    .venv/bin/python benchmarks/time_model.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import remat
from remat import solve
from remat.planning.solve import min_feasible_plan


def linear_chain() -> tuple[nn.Module, Any, Callable[[Any], torch.Tensor]]:
    """The chain the time model once got wrong: 20 x Linear(1024)."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(20)])
    return model, torch.randn(512, 1024), lambda out: out.pow(2).mean()


def gpt2() -> tuple[nn.Module, Any, Callable[[Any], torch.Tensor]]:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=8, n_embd=256, n_head=8, n_positions=256, vocab_size=1024)
    ids = torch.randint(0, 1024, (4, 256))
    return transformers.GPT2LMHeadModel(cfg), {"input_ids": ids, "labels": ids}, lambda out: out.loss


def _step(model: nn.Module, inputs: Any, loss_fn: Callable[[Any], torch.Tensor]) -> float:
    t = time.perf_counter()
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    loss_fn(out).backward()
    return time.perf_counter() - t


def run(name: str, build: Callable[[], tuple[nn.Module, Any, Callable[[Any], torch.Tensor]]], rounds: int) -> None:
    model, inputs, loss_fn = build()
    prof = remat.profile(model, inputs, loss_fn=loss_fn, repeats=3)
    none = solve(prof, None, strategy="none")
    low = min_feasible_plan(prof).prediction.peak_bytes
    high = none.prediction.peak_bytes
    plans = {"every": solve(prof, None, strategy="uniform", segments=len(prof.block_indices())),
             "sqrt": solve(prof, None, strategy="sqrt")}
    for share in (0.25, 0.5, 0.75):
        plans[f"optimal {share:.0%}"] = solve(prof, int(low + share * (high - low)))
    times: dict[str, list[float]] = {k: [] for k in ["none", *plans]}
    for _ in range(rounds):
        for key, plan in plans.items():
            times["none"].append(_step(model, inputs, loss_fn))
            remat.apply(model, plan)
            times[key].append(_step(model, inputs, loss_fn))
            remat.remove(model)
    base = statistics.median(times["none"])
    print(f"{name}: no checkpointing {base * 1e3:.1f} ms (spread {max(times['none']) / min(times['none']):.2f}x)")
    print(f"  {'plan':14} {'predicted':>9} {'measured':>9} {'error':>7}")
    for key, plan in plans.items():
        pred = 1 + plan.prediction.overhead
        meas = statistics.median(times[key]) / base
        print(f"  {key:14} {pred:9.3f} {meas:9.3f} {pred / meas - 1:+7.1%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)  # a shared machine: one thread per step is steadier
    for name, build in (("20 x Linear(1024)", linear_chain), ("GPT-2 (8 x 256)", gpt2)):
        run(name, build, args.rounds)


if __name__ == "__main__":
    main()
