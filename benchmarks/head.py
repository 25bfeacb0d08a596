"""The loss head in chunks (issue 24), measured on CPU.

Part 1, the issue's large-vocabulary GPT-2 shape (4 layers, hidden 128, vocab 32,000, batch 4 x 256): the
least feasible activations (least feasible peak minus parameters and gradients) with the head whole and with
``head="chunked"``; ``remat.auto(..., head="chunked", verify="grads")`` at a budget between the two, its step
measured by PyTorch's MemTracker (one tracker per step, the output held through backward, the larger of two
steps); loss and every gradient against the plain model, dropout on and off.

Part 2, the 3x / 5x activation-memory targets re-measured with the head option, on the GPT-2 and Llama configs
of benchmarks/peers.py (6 layers, hidden 256, vocab 4096, batch 4 x 256) with block options: the least
predicted peak with the head whole and in chunks, and the fastest plan at 3x and 5x less activation memory than
no checkpointing, its peak measured exactly (remat.measure) and its step time against no checkpointing
(round-robin, medians of per-round ratios).

    .venv/bin/python benchmarks/head.py [--part 1|2|both] [--rounds 7]
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers

import remat
from remat.app.compare import Variant, check_variant, plan_variant, ratio_spread, time_variants
from remat.planning.solve import min_feasible_peak

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import build as peers_build  # beside this script

MIB = 2**20
transformers.logging.set_verbosity_error()


def gpt2_large_vocab(dropout: float) -> tuple[torch.nn.Module, dict[str, Any]]:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=32000, n_positions=256,
                                  attn_pdrop=0.0, resid_pdrop=dropout, embd_pdrop=dropout)
    model = transformers.GPT2LMHeadModel(cfg)
    model.config._attn_implementation = "sdpa"
    ids = torch.randint(0, 32000, (4, 256))
    return model.train(), {"input_ids": ids, "labels": ids, "use_cache": False}


def memtracker_peak(model: torch.nn.Module, inputs: dict[str, Any], steps: int = 2) -> int:
    """The loop's peak by MemTracker: one tracker per step, the output held through backward."""
    from torch.distributed._tools.mem_tracker import MemTracker

    def step() -> None:
        out = model(**inputs)
        out.loss.backward()
        del out

    step()
    peaks = []
    for _ in range(steps):
        for p in model.parameters():
            p.grad.zero_()
        ref = MemTracker()
        ref.track_external(model, *[v for v in inputs.values() if isinstance(v, torch.Tensor)])
        with ref:
            step()
        peaks.append(int(ref.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]))
    return max(peaks)


def worst_gap(model: torch.nn.Module, plain: torch.nn.Module, inputs: dict[str, Any]) -> float:
    """The largest difference of the loss and of any gradient, as a share of that tensor's largest value."""
    out = []
    for m in (model, plain):
        m.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        loss = m(**inputs).loss
        loss.backward()
        out.append([loss.detach(), *(p.grad for p in m.parameters())])
    return max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(*out))


def part1() -> None:
    print("## Part 1: GPT-2, 4 layers, hidden 128, vocab 32000, batch 4 x 256 (CPU)")
    model, inputs = gpt2_large_vocab(0.1)
    t0 = time.perf_counter()
    prof = remat.profile(model, inputs, head="chunked")
    fixed = prof.params_bytes + prof.grads_bytes
    none = remat.solve(prof, None, strategy="none").peak_bytes
    whole, chunked = min_feasible_peak(prof.with_head(0)), min_feasible_peak(prof)
    least = remat.planning.solve.min_feasible_plan(prof)
    print(f"profiled in {time.perf_counter() - t0:.0f} s; chunk counts measured: "
          f"{[o.chunks for o in prof.head_options]}")
    print(f"fixed (parameters + gradients) {fixed / MIB:.1f} MiB; no checkpointing {none / MIB:.1f} MiB")
    print(f"least feasible, head whole:   {whole / MIB:.1f} MiB, activations {(whole - fixed) / MIB:.1f} MiB")
    print(f"least feasible, head chunked: {chunked / MIB:.1f} MiB, activations {(chunked - fixed) / MIB:.1f} MiB"
          f" (head in {least.head_chunks} chunks): {(chunked - fixed) / (whole - fixed):.3f} of the whole head's")
    budget = (whole + chunked) // 2
    plain = copy.deepcopy(model)
    remat.auto(model, inputs, budget=budget, head="chunked", verify="grads")
    plan = remat.plan_of(model)
    peak = memtracker_peak(model, inputs)
    print(f"remat.auto(budget={budget:,} B, head='chunked'): head in {plan.head_chunks} chunks, predicted"
          f" {plan.peak_bytes:,} B; MemTracker {peak:,} B ({'within' if peak <= budget else 'OVER'} budget,"
          f" {peak / budget:.4f})")
    print(f"loss and gradients vs the plain model, dropout 0.1: at most {worst_gap(model, plain, inputs):.2e} of"
          " each tensor's largest value")
    for m in (model, plain):
        for d in m.modules():
            if isinstance(d, torch.nn.Dropout):
                d.p = 0.0
    print(f"loss and gradients vs the plain model, dropout off: at most {worst_gap(model, plain, inputs):.2e}")


def part2(rounds: int) -> None:
    print("\n## Part 2: 3x / 5x less activation memory, with the head option (configs of benchmarks/peers.py)")
    torch.set_num_threads(1)
    for name in ("gpt2", "llama"):
        model, inputs, text = peers_build(name)
        fixed = 2 * sum(p.numel() * p.element_size() for p in model.parameters())
        none_peak, _ = check_variant(model, inputs, Variant("no checkpointing"))
        t0 = time.perf_counter()
        prof = remat.profile(model, inputs, head="chunked")
        prof = remat.add_options(prof, model, inputs, repeats=3)
        act = none_peak - fixed
        floors = {k: min_feasible_peak(p) for k, p in (("whole", prof.with_head(0)), ("chunked", prof))}
        print(f"\n### {name}: {text}; profiled with head options and block options in"
              f" {time.perf_counter() - t0:.0f} s")
        print(f"no checkpointing {none_peak / MIB:.2f} MiB, activations {act / MIB:.1f} MiB")
        for k, f in floors.items():
            print(f"least predicted peak, head {k}: {f / MIB:.2f} MiB ({act / max(1, f - fixed):.2f}x less)")
        plans = {}
        for want in (3, 5):
            try:
                plans[want] = remat.solve(prof, fixed + act // want)
            except remat.InfeasibleBudgetError as e:
                print(f"{want}x: infeasible ({str(e).splitlines()[0][:160]})")
        measure_targets(model, inputs, prof, plans, fixed, act, rounds)


def measure_targets(model: torch.nn.Module, inputs: dict[str, Any], prof: remat.Profile, plans: dict[int, Any],
                    fixed: int, act: int, rounds: int) -> None:
    none_time = remat.solve(prof, None, strategy="none").time_s
    variants = [Variant("none"), *(plan_variant(model, p, f"{w}x") for w, p in plans.items())]
    times = time_variants(model, inputs, variants, repeats=rounds, warmup=1)
    for w, p in plans.items():
        peak, _ = check_variant(model, inputs, variants[[v.label for v in variants].index(f"{w}x")])
        ratio, lo, hi = ratio_spread(times[f"{w}x"], times["none"])
        print(f"{w}x: plan head in {p.head_chunks} chunks, {sum(1 for _ in p.regions())} regions; predicted"
              f" {p.peak_bytes / MIB:.2f} MiB, {p.time_s / none_time:.3f}x time; measured {peak / MIB:.2f} MiB"
              f" ({act / max(1, peak - fixed):.2f}x less activation memory), {ratio:.3f}x time [{lo:.3f}-{hi:.3f}]")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="both", choices=["1", "2", "both"])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("remat").setLevel(logging.INFO)
    if args.part in ("1", "both"):
        part1()
    if args.part in ("2", "both"):
        part2(args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
