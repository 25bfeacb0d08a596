"""Per model of the test zoo: budget -> simulated peak, measured peak, gradients equal (CPU).

    .venv/bin/python benchmarks/zoo_table.py
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.models import TupleNet, cnn, hf, mlp

import remat
from remat.planning.solve import min_feasible_plan
from remat.units import format_bytes


def zoo():
    yield "MLP (8 residual blocks, dropout)", *mlp(8, 128), lambda o: o.pow(2).mean()
    yield "CNN with BatchNorm (5 blocks)", cnn(5, 16), torch.randn(8, 3, 16, 16), lambda o: o.pow(2).mean()
    for name in ("gpt2", "llama", "bert"):
        model, inputs = hf(name, batch=4, seq=64)
        yield f"{name} (4 layers, transformers config)", model, inputs, lambda o: o.loss
    yield "tuple outputs + kwargs", TupleNet(6), {"x": torch.randn(8, 16), "mask": torch.ones(8, 32)}, \
        lambda o: o["loss"]


def call(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def main() -> None:
    print("| model | budget | plan | simulated peak | measured peak | <= budget | sim/measured | grads equal |")
    print("|---|---|---|---|---|---|---|---|")
    for label, model, inputs, loss_fn in zoo():
        torch.manual_seed(0)
        ref = copy.deepcopy(model)
        torch.manual_seed(1)
        loss_fn(call(ref, inputs)).backward()
        prof = remat.profile(model, inputs, loss_fn=loss_fn, repeats=1)
        none = remat.solve(prof, None, strategy="none").peak_bytes
        every = remat.solve(prof, None, strategy="every").peak_bytes
        low = min_feasible_plan(prof).peak_bytes
        tensors = [inputs] if isinstance(inputs, torch.Tensor) else [v for v in inputs.values()
                                                                     if isinstance(v, torch.Tensor)]
        for b in sorted({none, (none + every) // 2, every, low}, reverse=True):
            plan = remat.solve(prof, b)
            remat.apply(model, plan)

            def step(model=model, inputs=inputs, loss_fn=loss_fn):
                out = call(model, inputs)  # the loop holds the output through backward, as most do
                loss_fn(out).backward()

            m = remat.measure(step, model=model, inputs=tensors, repeats=0)
            for p in model.parameters():
                p.grad = None
            torch.manual_seed(1)
            step()
            equal = all(torch.equal(a.grad, b_.grad) for a, b_ in zip(ref.parameters(), model.parameters())
                        if a.grad is not None)
            remat.remove(model)
            depth = max(plan.prediction.forwards) - 1
            shape = f"{sum(1 for _ in plan.regions())} regions, depth {depth}"
            print(f"| {label} | {format_bytes(b)} | {shape} | {format_bytes(plan.peak_bytes)} |"
                  f" {format_bytes(m.peak_bytes)} | {'yes' if m.peak_bytes <= b else 'NO'} |"
                  f" {plan.peak_bytes / m.peak_bytes:.4f} | {'yes' if equal else 'NO'} |")


if __name__ == "__main__":
    main()
