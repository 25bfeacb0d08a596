"""``remat demo``: what checkpointing trades, then every strategy on a GPT-2-style model.

It prints as it goes: a line saying what is being measured, then each table row as soon as it is
measured. Step times come first, round-robin over every way of running the step (one dot per round,
see :func:`remat.app.compare.time_variants`); then, row by row, the exact peak and the gradient check.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from remat.errors import RematError
from remat.planning.solve import min_feasible_peak, solve
from remat.units import format_bytes, format_seconds

__all__ = ["cmd_demo"]

STRATEGIES = ("none", "every", "sqrt", "revolve", "optimal")


def _print(*args: Any, end: str = "\n") -> None:
    print(*args, end=end, flush=True)


@dataclass(frozen=True)
class _Sizes:
    repeats: int
    width: int
    rows: int
    depth: int
    hidden: int
    batch: int
    seq: int

    @classmethod
    def of(cls, quick: bool) -> _Sizes:
        if quick:
            return cls(repeats=1, width=128, rows=32, depth=4, hidden=256, batch=2, seq=32)
        return cls(repeats=5, width=1024, rows=256, depth=12, hidden=2048, batch=4, seq=128)


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


@contextlib.contextmanager
def _section(title: str) -> Iterator[None]:
    _print(f"\n== {title} ==")
    t0 = time.perf_counter()
    yield
    _print(f"({time.perf_counter() - t0:.1f} s)")


def _time_all(model: Any, inputs: Any, variants: Sequence[Any], repeats: int, loss_fn: Any = None) -> dict[str, float]:
    """Median step time of each variant, round-robin, with one dot per round."""
    from remat.app.compare import median_s, time_variants

    _print(f"timing {len(variants)} ways to run the step, round-robin, {repeats} round{'s' * (repeats != 1)} ", end="")
    times = time_variants(model, inputs, variants, loss_fn=loss_fn, repeats=repeats,
                          on_round=lambda r: _print(".", end=""))
    _print(" done")
    return {label: median_s(t) for label, t in times.items()}


class _Checker:
    """Exact peak and gradient check of each variant, the first one's gradients the reference."""

    def __init__(self, model: Any, inputs: Any, loss_fn: Any = None) -> None:
        self.model, self.inputs, self.loss_fn = model, inputs, loss_fn
        self.reference: list[Any] | None = None
        self.done: dict[str, tuple[int, bool]] = {}

    def __call__(self, variant: Any) -> tuple[int, bool]:
        import torch

        from remat.app.compare import check_variant

        if variant.label not in self.done:
            peak, grads = check_variant(self.model, self.inputs, variant, loss_fn=self.loss_fn)
            if self.reference is None:
                self.reference = grads
            self.done[variant.label] = peak, all(torch.equal(a, b) for a, b in zip(grads, self.reference))
        return self.done[variant.label]


# ---- 1. what checkpointing trades --------------------------------------------------------------------


def _trade_variants(model: Any, x: Any, loss_fn: Any) -> tuple[list[Any], Any, float]:
    """No checkpointing, torch.utils.checkpoint on every layer, and remat at two budgets; the profile."""
    from torch.utils.checkpoint import checkpoint

    from remat.app.compare import Variant, plan_variant
    from remat.runtime.profiler import profile

    def every_layer() -> None:
        h = x
        for layer in model:
            h = checkpoint(layer, h, use_reentrant=False)
        loss_fn(h).backward()

    prof = profile(model, x, loss_fn=loss_fn, repeats=2)
    none = solve(prof, None, strategy="none")
    every = solve(prof, None, strategy="every")
    half = max(prof.base_bytes + (none.peak_bytes - prof.base_bytes) // 2, min_feasible_peak(prof))
    variants = [Variant("no checkpointing", plan=None), Variant("checkpoint every layer", step=every_layer),
                plan_variant(model, solve(prof, every.peak_bytes), "remat optimal, budget = every layer's peak"),
                plan_variant(model, solve(prof, half), f"remat optimal, budget {format_bytes(half)}")]
    return variants, prof, none.time_s


def _checkpoint_trade(label: str, model: Any, x: Any, repeats: int) -> None:
    """Measure the four ways of :func:`_trade_variants` side by side, a row as each is measured."""
    def loss_fn(out: Any) -> Any:
        return out.float().pow(2).mean()

    _print(f"{label}: profiling the chain to plan it (remat.profile)")
    variants, prof, none_s = _trade_variants(model, x, loss_fn)
    times = _time_all(model, x, variants, repeats, loss_fn)
    base = times[variants[0].label]
    check = _Checker(model, x, loss_fn)
    table = _Table(["", "peak", "step", "time", "predicted", "grads equal"],
                   [max(len(v.label) for v in variants), 10, 8, 5, 9, 11], [False, True, True, True, False, False])
    peaks, ratios = [], []
    for v in variants:
        peak, equal = check(v)
        peaks.append(peak)
        ratios.append(times[v.label] / base)
        predicted = f"{v.plan.time_s / none_s:.2f}x" if v.plan else ""
        table.row([v.label, format_bytes(peak), format_seconds(times[v.label]), f"{ratios[-1]:.2f}x", predicted,
                   "yes" if equal else "NO"])
    _print(f"-> every layer saves {format_bytes(peaks[0] - peaks[1])} for {100 * (ratios[1] - 1):+.0f}%"
           f" time; remat gets that peak for {100 * (ratios[2] - 1):+.0f}%, or saves"
           f" {format_bytes(peaks[0] - peaks[3])} for {100 * (ratios[3] - 1):+.0f}%"
           f" (fixed memory, untouched by checkpointing: {format_bytes(prof.fixed_bytes)})")


def _trade_section(sizes: _Sizes) -> None:
    import torch

    from remat.app import zoo

    torch.manual_seed(0)
    w, rows = sizes.width, sizes.rows
    _checkpoint_trade(f"20 x Linear({w}, {w}), batch {rows}", zoo.linear_stack(20, w), torch.randn(rows, w),
                      sizes.repeats)
    mlp = zoo.residual_mlp(depth=sizes.depth, width=w, hidden=sizes.hidden)
    _checkpoint_trade(f"\nresidual MLP: {sizes.depth} blocks {w} -> {sizes.hidden} -> {w} + LayerNorm, {rows} rows",
                      mlp, torch.randn(rows, w), sizes.repeats)


# ---- 2. every strategy on a GPT-2-style model -------------------------------------------------------------


def _plan_grid(prof: Any) -> list[tuple[str, int, str, Any]]:
    """(budget label, budget bytes, strategy, plan or None when it does not fit) for every pair."""

    none = solve(prof, None, strategy="none").peak_bytes
    every = solve(prof, None, strategy="every").peak_bytes
    low = min_feasible_peak(prof)
    budgets = [("100% of no-ckpt peak", none), ("70%", int(0.7 * none)), ("every-layer peak", every),
               ("below every-layer", int(low + 0.25 * (every - low)))]
    plans: dict[Any, Any] = {}
    grid: list[tuple[str, int, str, Any]] = []
    for label, b in budgets:
        for s in STRATEGIES:
            try:
                plan = solve(prof, b, strategy=s)
            except RematError:
                grid.append((label, b, s, None))
                continue
            grid.append((label, b, s, plans.setdefault(plan.items, plan)))
    return grid


def _grid_rows(built: Any, prof: Any, grid: list[tuple[str, int, str, Any]], repeats: int) -> dict[Any, Any]:
    """Time every distinct plan, then print a row per (budget, strategy) as its plan is measured."""
    from remat.app.compare import Result, plan_variant

    distinct = {plan.items: plan for *_, plan in grid if plan is not None}
    none_plan = solve(prof, None, strategy="none")
    variants = {none_plan.items: plan_variant(built.model, none_plan, "none")}
    variants.update({k: plan_variant(built.model, p, f"plan{n}") for n, (k, p) in enumerate(distinct.items())
                     if k not in variants})
    times = _time_all(built.model, built.inputs, list(variants.values()), repeats)
    base, none_s = times["none"], none_plan.time_s
    check = _Checker(built.model, built.inputs)
    check(variants[none_plan.items])  # the gradients every plan must reproduce
    table = _Table(["budget", "bytes", "strategy", "fits", "sim peak", "measured peak", "sim time", "measured time",
                    "grads equal"], [20, 10, 8, 4, 10, 10, 5, 5, 3], [False, True] + [False] * 7)
    results: dict[Any, Result] = {}
    for label, b, s, plan in grid:
        if plan is None:
            table.row([label, format_bytes(b), s, "no", "-", "-", "-", "-", "-"])
            continue
        if plan.items not in results:
            v = variants[plan.items]
            peak, equal = check(v)
            t = times[v.label]
            results[plan.items] = Result(v.label, peak, t, t / base, equal, plan, {})
        r = results[plan.items]
        table.row([label, format_bytes(b), s, "yes", format_bytes(plan.peak_bytes), format_bytes(r.peak_bytes),
                   f"{plan.time_s / none_s:.2f}x", f"{r.time_ratio:.2f}x", "yes" if r.grads_equal else "NO"])
    return results


def _strategy_section(sizes: _Sizes, plot: str) -> None:
    from remat.app import zoo
    from remat.app.plot import plot_frontier
    from remat.runtime.profiler import profile

    built = zoo.build("gpt2-tiny", batch=sizes.batch, seq=sizes.seq)
    _print(f"model: {built.description}; batch {sizes.batch} x seq {sizes.seq}, float32, dropout on")
    prof = profile(built.model, built.inputs, progress=None, repeats=sizes.repeats)
    _print(f"profiled {len(prof.stages)} stages; fixed memory {prof.fixed_summary()}")
    grid = _plan_grid(prof)
    results = _grid_rows(built, prof, grid, sizes.repeats)
    _print("time = step time / no checkpointing (measured: round-robin medians of"
           f" {sizes.repeats}); peaks are exact tensor bytes (remat.measure)")
    optimal = [(label, plan) for label, _, s, plan in grid if s == "optimal" and plan is not None]
    measured = [(f"optimal @ {label}", results[plan.items].peak_bytes, results[plan.items].time_ratio)
                for label, plan in optimal[1:]]
    plot_frontier(prof, plot, highlight=optimal[-1][1], measured=measured)
    _print(f"wrote {plot} (the memory-time frontier; x = measured points)")


def cmd_demo(args: argparse.Namespace) -> int:
    """``remat demo [--quick] [--plot PNG]``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, os.cpu_count() or 1))  # every core; given back after
    sizes = _Sizes.of(args.quick)
    t_start = time.perf_counter()
    try:
        with _section("1. what checkpointing trades: memory saved, time paid"):
            _trade_section(sizes)
        with _section("2. remat on a GPT-2-style model: every strategy at a few budgets"):
            _strategy_section(sizes, args.plot)
    finally:
        torch.set_num_threads(threads)
    _print(f"\ndemo finished in {time.perf_counter() - t_start:.0f} s")
    return 0
