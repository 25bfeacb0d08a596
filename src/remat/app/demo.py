"""``remat demo``: what activation checkpointing saves and costs on a GPT-2-style model, measured.

One model whose activations dominate its memory (a GPT-2-style config over a long sequence), six ways to
run its training step: no checkpointing, √N segments, every layer checkpointed (Hugging Face's
``gradient_checkpointing_enable``, the usual choice), and remat's optimal plan at √N's and every-layer's
own measured peaks and at the least peak any plan reaches. It prints as it goes: each row of the memory
table as soon as its step is measured (exact peak by :func:`remat.measure`, gradients compared bit for bit with no
checkpointing), then the step times: every way once per round, the order rotated each round (A B C, B C A,
...), medians with the range over the rounds, and remat's time against every-layer's as the median of the
per-round ratios with their range. The headline says whether remat was faster, within noise or slower.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from remat.planning.solve import min_feasible_peak, solve
from remat.units import format_bytes, format_seconds

__all__ = ["cmd_demo"]


def _print(*args: Any, end: str = "\n") -> None:
    print(*args, end=end, flush=True)


@dataclass(frozen=True)
class _Sizes:
    batch: int
    seq: int
    rounds: int
    profile_repeats: int

    @classmethod
    def of(cls, quick: bool) -> _Sizes:
        if quick:
            return cls(batch=1, seq=64, rounds=2, profile_repeats=1)
        return cls(batch=1, seq=256, rounds=7, profile_repeats=2)


class _Table:
    """A table printed row by row (widths fixed up front): numbers right-aligned, text left-aligned."""

    def __init__(self, headers: Sequence[str], widths: Sequence[int], numeric: Sequence[bool]) -> None:
        self.widths = [max(w, len(h)) for h, w in zip(headers, widths)]
        self.numeric = numeric
        self.row(headers)
        _print("  ".join("-" * w for w in self.widths))

    def row(self, values: Sequence[str]) -> None:
        cells = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, self.widths, self.numeric)]
        _print("  ".join(cells).rstrip())


@dataclass
class _Row:
    """One way to run the step, as measured."""

    variant: Any
    predicted: int | None  # remat's predicted peak (plans only)
    peak: int = 0
    equal: bool = False


def _hf_every_layer(model: Any) -> Any:
    """Hugging Face's every-layer checkpointing (non-reentrant), on while the variant runs."""
    from remat.app.compare import Variant

    def enter() -> None:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    return Variant("every layer (transformers' own checkpointing)", enter=enter,
                   exit=model.activation_checkpointing_disable)


def _measure_rows(built: Any, prof: Any) -> dict[str, _Row]:
    """Measure each way's peak and gradients, a row printed as each is measured; remat is planned for
    each peer's measured peak, and for the least peak any plan reaches."""
    from remat.app.compare import Variant, plan_variant

    model = built.model
    none_plan, sqrt_plan = solve(prof, None, strategy="none"), solve(prof, None, strategy="sqrt")
    measure = _Measurer(built)
    rows = {"none": measure(Variant("no checkpointing", plan=None), none_plan.peak_bytes),
            "sqrt": measure(plan_variant(model, sqrt_plan, f"√N segments ({len(list(sqrt_plan.regions()))} regions)"),
                            sqrt_plan.peak_bytes),
            "every": measure(_hf_every_layer(model), None)}
    low = min_feasible_peak(prof)
    for peer, name in (("sqrt", "√N's"), ("every", "every layer's")):
        plan = solve(prof, max(rows[peer].peak, low))  # a peak below remat's least (tiny sizes): planned at the least
        raised = " (raised to remat's least)" if rows[peer].peak < low else ""
        rows[f"at {peer}"] = measure(plan_variant(model, plan, f"remat optimal, budget = {name} peak{raised}"),
                                     plan.peak_bytes)
    least = solve(prof, low)
    label = f"remat optimal, least peak ({format_bytes(least.budget_bytes or 0)})"
    rows["least"] = measure(plan_variant(model, least, label), least.peak_bytes)
    return rows


class _Measurer:
    """Exact peak and gradients of one way (:func:`remat.app.compare.check_variant`), its row printed at once;
    the first way's gradients are the reference."""

    def __init__(self, built: Any) -> None:
        self.built = built
        self.reference: list[Any] = []
        self.table = _Table(["", "measured peak", "predicted", "grads equal"], [50, 13, 10, 11],
                            [False, True, True, False])

    def __call__(self, variant: Any, predicted: int | None) -> _Row:
        import torch

        from remat.app.compare import check_variant

        peak, grads = check_variant(self.built.model, self.built.inputs, variant)
        if not self.reference:
            self.reference.extend(grads)
        row = _Row(variant, predicted, peak, all(torch.equal(a, b) for a, b in zip(grads, self.reference)))
        self.table.row([variant.label, format_bytes(peak), format_bytes(predicted) if predicted else "",
                        "yes" if row.equal else "NO"])
        return row


def _time_rows(built: Any, rows: list[_Row], rounds: int) -> dict[str, list[float]]:
    """Step times of every way, interleaved: one step each per round, the order rotated each round."""
    from remat.app.compare import median_s, time_variants

    variants = [r.variant for r in rows]
    _print(f"\ntiming the {len(variants)} ways interleaved, one step each per round, the order rotated each round,"
           f" {rounds} rounds ", end="")
    times = time_variants(built.model, built.inputs, variants, repeats=rounds, warmup=0,
                          on_round=lambda r: _print(".", end=""))
    _print(" done")
    base = median_s(times[variants[0].label])
    table = _Table(["", "step (median)", "range over rounds", "vs none"], [50, 13, 17, 7],
                   [False, True, True, True])
    for v in variants:
        t = times[v.label]
        table.row([v.label, format_seconds(median_s(t)), f"{format_seconds(min(t))}-{format_seconds(max(t))}",
                   f"{median_s(t) / base:.2f}x"])
    return times


def _against(ours: list[float], peer: list[float]) -> str:
    """remat's time against a peer's, from the per-round ratios, with the verdict their range allows."""
    from remat.app.compare import ratio_spread

    med, lo, hi = ratio_spread(ours, peer)
    verdict = ("faster" if hi < 1 else "SLOWER, outside the noise of this run" if lo > 1
               else "the same within noise (the range contains 1)")
    return f"{med:.2f}x its time (per-round ratios {lo:.2f}-{hi:.2f}, {len(ours)} rounds): {verdict}"


def _headline(rows: dict[str, _Row], times: dict[str, list[float]], fixed: int) -> None:
    """Memory saved, and remat's time against each peer at that peer's own peak."""
    from remat.app.compare import median_s

    def of(key: str) -> list[float]:
        return times[rows[key].variant.label]

    def more(key: str) -> str:
        return f"{100 * (median_s(of(key)) / median_s(of('none')) - 1):+.0f}% step time"

    none, every, least = rows["none"].peak, rows["every"].peak, rows["least"].peak
    _print(f"\n-> checkpointing every layer cuts the peak from {format_bytes(none)} to {format_bytes(every)}"
           f" ({100 * (none - every) / none:.0f}% less, {format_bytes(none - every)}) for {more('every')};"
           f" fixed memory (parameters, gradients), which checkpointing leaves alone: {format_bytes(fixed)}.")
    for peer, name in (("every", "every layer's"), ("sqrt", "√N's")):
        ours = rows[f"at {peer}"]
        raised = " (below remat's least, so planned at that)" if "raised" in ours.variant.label else ""
        _print(f"-> at {name} own peak{raised}, remat ({format_bytes(ours.peak)}) takes"
               f" {_against(of(f'at {peer}'), of(peer))}.")
    _print(f"-> remat's least peak: {format_bytes(least)} ({100 * (none - least) / none:.0f}% less than no"
           f" checkpointing) for {more('least')}.")
    if not all(r.equal for r in rows.values()):
        _print("-> GRADIENTS DIFFER from no checkpointing in some row above")


def _run(sizes: _Sizes, plot: str) -> None:
    from remat.app import zoo
    from remat.app.compare import median_s
    from remat.app.plot import plot_frontier
    from remat.runtime.profiler import profile

    built = zoo.build("gpt2-tiny", batch=sizes.batch, seq=sizes.seq)
    _print(f"model: {built.description}; batch {sizes.batch} x seq {sizes.seq}, float32, dropout on")
    _print("profiling it as a chain of stages to plan it (remat.profile) ...")
    prof = profile(built.model, built.inputs, progress=None, repeats=sizes.profile_repeats)
    none = solve(prof, None, strategy="none")
    activations = format_bytes(none.peak_bytes - prof.fixed_bytes)
    _print(f"{len(prof.stages)} stages; fixed memory {prof.fixed_summary()}; predicted peak without checkpointing"
           f" {format_bytes(none.peak_bytes)}, of which activations and the like {activations}\n")
    rows = _measure_rows(built, prof)
    times = _time_rows(built, list(rows.values()), sizes.rounds)
    _headline(rows, times, prof.fixed_bytes)
    base = median_s(times[rows["none"].variant.label])
    measured = [(r.variant.label.split(",")[-1].strip(), r.peak, median_s(times[r.variant.label]) / base)
                for r in rows.values() if r.variant.plan is not None and r.variant.plan.strategy != "none"]
    plot_frontier(prof, plot, highlight=rows["least"].variant.plan, measured=measured)
    _print(f"\nwrote {plot} (the predicted memory-time frontier; x = measured points)")


def cmd_demo(args: argparse.Namespace) -> int:
    """``remat demo [--quick] [--plot PNG]``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steadier timings when other programs share the cores; given back after
    t_start = time.perf_counter()
    try:
        _run(_Sizes.of(args.quick), args.plot)
    finally:
        torch.set_num_threads(threads)
    _print(f"\ndemo finished in {time.perf_counter() - t_start:.0f} s")
    return 0
