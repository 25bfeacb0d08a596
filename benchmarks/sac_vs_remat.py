"""Selective checkpointing (SAC) against remat with per-block options, on a small GPT-2 config.

    .venv/bin/python benchmarks/sac_vs_remat.py [--layers 6] [--hidden 128] [--batch 4] [--seq 256] [--repeats 7]
                                                [--threads 1]

Ways of running the same training step, side by side:
  peers: no checkpointing; every block checkpointed (Hugging Face gradient checkpointing, non-reentrant);
         every block checkpointed with a SAC policy that saves the outputs of mm/addmm/bmm/attention
         (``create_selective_checkpoint_contexts`` as the checkpoint's ``context_fn``);
  remat: ``optimal`` at the SAC peer's measured peak, at the every-block peer's, and midway between them,
         with the blocks' selective options (remat.runtime.ops.add_options) and without them (on the same
         time figures).
Peaks by remat.measure (exact storage tracking; PyTorch's MemTracker agrees on these models); step times
round-robin (A B C …, the order rotated each round), reported as the median of per-round ratios to no
checkpointing, with the interquartile range of those ratios as the noise, and the ratio of the fastest
runs (noise on a shared machine only adds time); gradients compared bit for bit with no checkpointing's.
One intra-op thread by default: on a loaded machine a multi-threaded op waits for its slowest thread.
"pred" and "pred MiB" are remat's predictions, for the peers too (as remat plans: every block a region;
every block with the SAC option that saves the same ops as the peer's policy).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import time

import torch
import transformers
from torch.utils.checkpoint import create_selective_checkpoint_contexts

import remat
from remat.app.compare import Variant, check_variant, plan_variant, time_variants
from remat.planning.plan import Record, Region, Selective
from remat.planning.solve import make_plan
from remat.runtime.ops import add_options

transformers.logging.set_verbosity_error()
MIB = 2**20
SAC_POLICY = [
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
]


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, dict[str, object]]:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=args.layers, n_embd=args.hidden, n_head=args.heads, vocab_size=4096,
                                  n_positions=1024, attn_pdrop=0.0, resid_pdrop=0.1, embd_pdrop=0.1)
    model = transformers.GPT2LMHeadModel(cfg)
    model.config._attn_implementation = "sdpa"
    ids = torch.randint(0, 4096, (args.batch, args.seq))
    return model.train(), {"input_ids": ids, "labels": ids, "use_cache": False}


def hf_variant(model: torch.nn.Module, label: str, **kwargs: object) -> Variant:
    """Every block checkpointed by the model's own (Hugging Face) gradient checkpointing."""
    def enter() -> None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False, **kwargs})

    def leave() -> None:
        model.gradient_checkpointing_disable()

    return Variant(label, enter=enter, exit=leave)


def describe(plan: remat.Plan) -> str:
    def count(items: tuple, kind: type) -> int:
        return sum(isinstance(it, kind) + (count(it.body, kind) if isinstance(it, Region) else 0) for it in items)

    options = sorted({it.option for it in _walk(plan.items) if isinstance(it, Selective)})
    return f"{count(plan.items, Region)} regions, {count(plan.items, Selective)} selective {options or ''}"


def _walk(items: tuple) -> list:
    out = []
    for it in items:
        out.append(it)
        if isinstance(it, Region):
            out += _walk(it.body)
    return out


def ratios(times: dict[str, list[float]], base: str) -> dict[str, tuple[float, float, float]]:
    """Per variant: (median, 25th, 75th percentile) of its per-round step time over the base's."""
    out = {}
    for label, ts in times.items():
        r = sorted(t / b for t, b in zip(ts, times[base]))
        q = statistics.quantiles(r, n=4) if len(r) > 1 else [r[0]] * 3
        out[label] = (statistics.median(r), q[0], q[2])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, inputs = build(args)
    print(f"GPT-2 config: {args.layers} layers, hidden {args.hidden}, batch {args.batch} x seq {args.seq};"
          f" torch {torch.__version__}, {torch.get_num_threads()} threads")
    peers = [Variant("no checkpointing"), hf_variant(model, "every block"),
             hf_variant(model, "every block + SAC",
                        context_fn=functools.partial(create_selective_checkpoint_contexts, SAC_POLICY))]
    peaks, ref = {}, None
    for v in peers:
        peaks[v.label], grads = check_variant(model, inputs, v)
        ref = ref if ref is not None else grads
        equal = all(torch.equal(a, b) for a, b in zip(grads, ref))
        print(f"  {v.label:<34} peak {peaks[v.label] / MIB:8.2f} MiB  gradients equal: {equal}")
    prof = remat.profile(model, inputs, repeats=3)
    t0 = time.perf_counter()
    prof_o = add_options(prof, model, inputs, repeats=3)
    print(f"profiled; options in {time.perf_counter() - t0:.1f} s:")
    block = prof_o.stages[prof_o.block_indices()[0]]
    for o in block.options:
        print(f"  {o.name:<7} keeps {o.kept_bytes / MIB:6.2f} MiB of a record's {block.xbar_bytes / MIB:.2f} MiB,"
              f" recompute {1e3 * o.recompute_s:.2f} ms (region {1e3 * block.region_s:.2f} ms); saves {list(o.save)}")
    # Without options, on the same time figures (add_options also measures each block's region time).
    bare = dataclasses.replace(prof_o, stages=tuple(dataclasses.replace(s, options=()) for s in prof_o.stages))
    plans = {}
    # Between the two peers' peaks: a point neither peer offers.
    peaks["midway"] = (peaks["every block + SAC"] + peaks["every block"]) // 2
    for at in ("every block + SAC", "midway", "every block"):
        for label, p in (("remat+options", prof_o), ("remat", bare)):
            try:
                plans[f"{label} @ {at}"] = remat.solve(p, peaks[at])
            except remat.InfeasibleBudgetError as e:
                print(f"  {label} @ {at}: {e}")
    variants = peers + [plan_variant(model, plan, label) for label, plan in plans.items()]
    report(model, inputs, variants, peaks, plans, peer_plans(prof_o), args.repeats, ref)
    print(f"total {time.perf_counter() - start:.0f} s")


def peer_plans(prof: remat.Profile) -> dict[str, remat.Plan]:
    """The peers as remat plans, for remat's prediction of their times (and no checkpointing's)."""
    out = {"no checkpointing": remat.solve(prof, None, strategy="none"),
           "every block": remat.solve(prof, None, strategy="every")}
    blocks = set(prof.block_indices())
    names = {o.name for i in blocks for o in prof.stages[i].options}
    if "sac" in names:
        items = [Selective(i, "sac", prof.stages[i].option("sac").save) if i in blocks else Record(i)
                 for i in range(len(prof.stages))]
        out["every block + SAC"] = make_plan(prof, items, strategy="sac", budget_bytes=None)
    return out


def report(model: torch.nn.Module, inputs: dict[str, object], variants: list[Variant], peaks: dict[str, int],
           plans: dict[str, remat.Plan], peers: dict[str, remat.Plan], repeats: int, ref: list[torch.Tensor]) -> None:
    for label in plans:
        v = next(v for v in variants if v.label == label)
        peaks[label], grads = check_variant(model, inputs, v)
        v.info["equal"] = all(torch.equal(a, b) for a, b in zip(grads, ref))
    times = time_variants(model, inputs, variants, repeats=repeats)
    r = ratios(times, variants[0].label)
    fastest = {label: min(ts) / min(times[variants[0].label]) for label, ts in times.items()}
    none_s = peers["no checkpointing"].time_s
    base_ms = 1e3 * statistics.median(times[variants[0].label])
    print(f"\nstep times: {repeats} rounds, round-robin; no checkpointing {base_ms:.0f} ms (median)."
          " ratio = median of per-round ratios [25th-75th percentile]; pred = remat's predicted ratio")
    print(f"{'variant':<40} {'peak MiB':>9} {'pred MiB':>9} {'ratio':>6} {'noise':>15} {'fastest':>7} {'pred':>6}"
          "  grads  fits  plan")
    for v in variants:
        plan = plans.get(v.label)
        med, lo, hi = r[v.label]
        modelled = plan or peers.get(v.label)
        pred_peak = f"{modelled.peak_bytes / MIB:9.2f}" if modelled else f"{'':>9}"
        pred_ratio = f"{modelled.time_s / none_s:6.3f}" if modelled else f"{'':>6}"
        equal = v.info.get("equal", "-") if plan else "-"
        fits = "-" if plan is None or plan.budget_bytes is None else str(peaks[v.label] <= plan.budget_bytes)
        print(f"{v.label:<40} {peaks[v.label] / MIB:9.2f} {pred_peak} {med:6.3f} [{lo:6.3f}-{hi:6.3f}]"
              f" {fastest[v.label]:7.3f} {pred_ratio}"
              f"  {equal!s:<5}  {fits:<5} {describe(plan) if plan else ''}")


if __name__ == "__main__":
    main()
