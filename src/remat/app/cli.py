"""The ``remat`` command: ``remat demo``, ``remat plan``, ``remat profile``."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from remat.errors import RematError
from remat.planning.profile import Profile
from remat.planning.table import render_table
from remat.units import format_bytes, format_seconds, parse_bytes

OPTIMIZER_STATE_BYTES_PER_PARAM = {"none": 0, "sgd": 4, "adam": 8}


def _print(*args: Any) -> None:
    print(*args, flush=True)


# ---- remat plan / remat profile ------------------------------------------------------------------


def _profile_from_args(args: argparse.Namespace) -> tuple[Profile, str]:
    if getattr(args, "profile", None):
        with open(args.profile) as f:
            prof = Profile.from_json(f.read())
        return prof, f"profile {args.profile} ({len(prof.stages)} stages, {prof.device})"
    if not args.model:
        raise RematError("remat plan: name a model (e.g. gpt2, llama-7b) or pass --profile FILE")
    from remat.app import zoo
    from remat.runtime.profiler import profile

    built = zoo.build(args.model, batch=args.batch, seq=args.seq, dtype=args.dtype, device=args.device)
    t0 = time.perf_counter()
    prof = profile(built.model, built.inputs, loss_fn=built.loss_fn, device=args.device,
                   throughput=args.throughput, progress=sys.stderr.isatty() and not getattr(args, "json", False),
                   repeats=args.repeats)
    where = (f"on meta (no memory used; times estimated for {args.throughput or 'h100'})" if args.device == "meta"
             else f"on {args.device}")
    desc = (f"{args.model}: {built.description}; batch {args.batch} x seq {args.seq}, {args.dtype}; profiled {where}"
            f" in {time.perf_counter() - t0:.1f} s")
    return prof, desc


def _add_optimizer(prof: Profile, optimizer: str) -> Profile:
    per = OPTIMIZER_STATE_BYTES_PER_PARAM[optimizer]
    if not per:
        return prof
    numel = prof.meta.get("params_numel") or 0
    if not numel:
        raise RematError("remat plan: --optimizer needs a profile that records the parameter count")
    return prof.with_extra_fixed(per * int(numel), f"{optimizer} state")


def cmd_plan(args: argparse.Namespace) -> int:
    from remat.planning.simulate import simulate
    from remat.planning.strategies import min_feasible_plan, solve

    prof, desc = _profile_from_args(args)
    prof = _add_optimizer(prof, args.optimizer)
    plan = solve(prof, args.budget, strategy=args.strategy)
    if args.json:
        _print(plan.to_json())
        return 0
    none = simulate(prof, solve(prof, None, strategy="none"))
    every = simulate(prof, solve(prof, None, strategy="every"))
    low = min_feasible_plan(prof)
    _print(desc)
    _print(f"fixed memory: {prof.fixed_summary()}")
    _print(f"peak without checkpointing {format_bytes(none.peak_bytes)}; every block checkpointed"
           f" {format_bytes(every.peak_bytes)} (+{100 * every.overhead:.1f}% time); smallest feasible"
           f" {format_bytes(low.peak_bytes)}")
    _print("")
    _print(str(plan))
    fits = "fits" if plan.peak_bytes <= (plan.budget_bytes or plan.peak_bytes) else "does not fit"
    _print(f"\nverdict: one training step {fits} in {format_bytes(plan.budget_bytes or 0)}: predicted peak"
           f" {format_bytes(plan.peak_bytes)}, step time +{100 * plan.prediction.overhead:.1f}% over no checkpointing")
    if args.frontier:
        from remat.planning.strategies import frontier

        rows = [[format_bytes(p.peak_bytes), format_seconds(p.time_s), f"+{100 * p.prediction.overhead:.1f}%",
                 sum(1 for _ in p.regions()), max(p.prediction.forwards) - 1] for p in frontier(prof)]
        _print("\n" + render_table(["peak", "step", "recompute", "regions", "max recomputations"], rows,
                                   title="the memory-time frontier (optimal plans, smallest peak first):"))
    if args.plot:
        from remat.app.plot import plot_frontier

        plot_frontier(prof, args.plot, highlight=plan)
        _print(f"wrote {args.plot}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    prof, desc = _profile_from_args(args)
    with open(args.output, "w") as f:
        f.write(prof.to_json())
    _print(desc)
    _print(str(prof))
    _print(f"wrote {args.output}")
    return 0


# ---- remat demo -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _section(title: str) -> Iterator[None]:
    _print(f"\n== {title} ==")
    t0 = time.perf_counter()
    yield
    _print(f"({time.perf_counter() - t0:.1f} s)")


def _checkpoint_trade(label: str, model: Any, x: Any, repeats: int) -> None:
    """No checkpointing, torch.utils.checkpoint on every layer, and remat at half the activation
    memory, measured side by side."""
    from torch.utils.checkpoint import checkpoint

    from remat.app.compare import Variant, plan_variant, run_variants
    from remat.planning.simulate import simulate
    from remat.planning.strategies import min_feasible_plan, solve
    from remat.runtime.profiler import profile

    def loss_fn(out: Any) -> Any:
        return out.float().pow(2).mean()

    def every_layer() -> None:
        h = x
        for layer in model:
            h = checkpoint(layer, h, use_reentrant=False)
        loss_fn(h).backward()

    prof = profile(model, x, loss_fn=loss_fn, repeats=2)
    none = simulate(prof, solve(prof, None, strategy="none"))
    every = simulate(prof, solve(prof, None, strategy="every"))
    half = max(prof.base_bytes + (none.peak_bytes - prof.base_bytes) // 2, min_feasible_plan(prof).peak_bytes)
    same = solve(prof, every.peak_bytes)
    small = solve(prof, half)
    variants = [Variant("no checkpointing"), Variant("checkpoint every layer", step=every_layer),
                plan_variant(model, same, "remat optimal, budget = every layer's peak"),
                plan_variant(model, small, f"remat optimal, budget {format_bytes(half)}")]
    res = run_variants(model, x, variants, loss_fn=loss_fn, repeats=repeats)
    rows = [[r.label, format_bytes(r.peak_bytes), format_seconds(r.time_s), f"{r.time_ratio:.2f}x",
             f"{r.plan.time_s / none.time_s:.2f}x" if r.plan else "", "yes" if r.grads_equal else "NO"] for r in res]
    _print(render_table(["", "peak", "step", "time", "predicted", "grads equal"], rows, title=label))
    a, b, c, d = res
    _print(f"-> every layer saves {format_bytes(a.peak_bytes - b.peak_bytes)} for {100 * (b.time_ratio - 1):+.0f}%"
           f" time; remat gets that peak for {100 * (c.time_ratio - 1):+.0f}%, or saves"
           f" {format_bytes(a.peak_bytes - d.peak_bytes)} for {100 * (d.time_ratio - 1):+.0f}%"
           f" (fixed memory, untouched by checkpointing: {format_bytes(prof.fixed_bytes)})")


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from remat.app import zoo
    from remat.app.compare import plan_variant, run_variants
    from remat.planning.simulate import simulate
    from remat.planning.strategies import min_feasible_plan, solve
    from remat.runtime.profiler import profile

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    quick = args.quick
    repeats = 5 if not quick else 1
    t_start = time.perf_counter()
    with _section("1. what checkpointing trades: memory saved, time paid"):
        torch.manual_seed(0)
        width, rows = (1024, 256) if not quick else (128, 32)
        seed_model = zoo.linear_stack(20, width)
        _checkpoint_trade(f"20 x Linear({width}, {width}), batch {rows}", seed_model, torch.randn(rows, width), repeats)
        depth, hidden = (12, 2048) if not quick else (4, 256)
        mlp = zoo.residual_mlp(depth=depth, width=width, hidden=hidden)
        _checkpoint_trade(f"\nresidual MLP: {depth} blocks {width} -> {hidden} -> {width} + LayerNorm, {rows} rows",
                          mlp, torch.randn(rows, width), repeats)

    with _section("2. remat on a GPT-2-style model: every strategy at a few budgets"):
        batch, seq = (4, 128) if not quick else (2, 32)
        built = zoo.build("gpt2-tiny", batch=batch, seq=seq)
        _print(f"model: {built.description}; batch {batch} x seq {seq}, float32, dropout on")
        prof = profile(built.model, built.inputs, progress=True, repeats=repeats)
        none = simulate(prof, solve(prof, None, strategy="none"))
        every = simulate(prof, solve(prof, None, strategy="every"))
        low = min_feasible_plan(prof).peak_bytes
        _print(f"profiled {len(prof.stages)} stages; fixed memory {prof.fixed_summary()}")
        budgets = [("100% of no-ckpt peak", none.peak_bytes), ("70%", int(0.7 * none.peak_bytes)),
                   ("every-layer peak", every.peak_bytes),
                   ("below every-layer", int(low + 0.25 * (every.peak_bytes - low)))]
        strategies = ["none", "every", "sqrt", "revolve", "optimal"]
        plans: dict[tuple[Any, ...], Any] = {}
        table: list[tuple[str, int, str, Any]] = []
        for label, b in budgets:
            for s in strategies:
                try:
                    plan = solve(prof, b, strategy=s)
                except RematError:
                    table.append((label, b, s, None))
                    continue
                plans.setdefault(plan.items, plan)
                table.append((label, b, s, plans[plan.items]))
        none_plan = solve(prof, None, strategy="none")
        plans.pop(none_plan.items, None)
        variants = [plan_variant(built.model, none_plan, "none")]
        variants += [plan_variant(built.model, p, f"plan{k}") for k, p in enumerate(plans.values())]
        results = {r.plan.items: r for r in run_variants(built.model, built.inputs, variants, repeats=repeats)
                   if r.plan is not None}
        lines: list[list[str]] = []
        for label, b, s, plan in table:
            if plan is None:
                lines.append([label, format_bytes(b), s, "no", "-", "-", "-", "-", "-"])
                continue
            r = results[plan.items]
            lines.append([label, format_bytes(b), s, "yes", format_bytes(plan.peak_bytes), format_bytes(r.peak_bytes),
                         f"{plan.time_s / none.time_s:.2f}x", f"{r.time_ratio:.2f}x", "yes" if r.grads_equal else "NO"])
        _print(render_table(["budget", "bytes", "strategy", "fits", "sim peak", "measured peak", "sim time",
                             "measured time", "grads equal"], lines))
        _print("time = step time / no checkpointing (measured: round-robin medians of"
               f" {repeats}); peaks are exact tensor bytes (remat.measure)")
        from remat.app.plot import plot_frontier

        out = args.plot
        optimal = [(lbl, plan) for lbl, _, s, plan in table if s == "optimal" and plan is not None]
        measured = [(f"optimal @ {lbl}", results[plan.items].peak_bytes, results[plan.items].time_ratio)
                    for lbl, plan in optimal[1:]]
        plot_frontier(prof, out, highlight=optimal[-1][1], measured=measured)
        _print(f"wrote {out} (the memory-time frontier; x = measured points)")
    _print(f"\ndemo finished in {time.perf_counter() - t_start:.0f} s")
    return 0


# ---- entry point -----------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    from remat.app import zoo
    from remat.runtime.profiler import THROUGHPUTS

    p = argparse.ArgumentParser(prog="remat", description="Fit PyTorch training into a memory budget by"
                                " activation checkpointing, at the least extra time.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="the main job: measure the trade, then plan a GPT-2-style model")
    d.add_argument("--quick", action="store_true", help="tiny sizes (for tests)")
    d.add_argument("--plot", default="remat-frontier.png", help="where to write the frontier PNG")
    d.set_defaults(func=cmd_demo)

    def model_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("model", nargs="?", help=f"one of {', '.join(zoo.MODELS)}")
        q.add_argument("--batch", type=int, default=8)
        q.add_argument("--seq", type=int, default=1024)
        q.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        q.add_argument("--device", default="meta", help="meta (default: nothing allocated), cpu, or cuda")
        q.add_argument("--throughput", default=None, choices=list(THROUGHPUTS),
                       help="device whose speed estimates times on meta (default h100)")
        q.add_argument("--repeats", type=int, default=3, help="timed repeats on a real device")

    q = sub.add_parser("plan", help="plan one training step of a built-in model or a saved profile")
    model_args(q)
    q.add_argument("--profile", help="a profile.json from `remat profile` instead of a model")
    q.add_argument("--budget", required=True, help="peak memory allowed: 80GiB, 6GB, 750MiB, or 0.5 (share)")
    q.add_argument("--strategy", default="optimal")
    q.add_argument("--optimizer", default="none", choices=list(OPTIMIZER_STATE_BYTES_PER_PARAM),
                   help="count optimizer state as fixed memory (adam: 8 bytes/param, sgd momentum: 4)")
    q.add_argument("--json", action="store_true", help="print the plan as JSON only")
    q.add_argument("--plot", help="write the frontier PNG here")
    q.add_argument("--frontier", action="store_true", help="also print the memory-time frontier")
    q.set_defaults(func=cmd_plan)

    r = sub.add_parser("profile", help="profile a built-in model and save the profile as JSON")
    model_args(r)
    r.add_argument("-o", "--output", required=True)
    r.set_defaults(func=cmd_profile)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if getattr(args, "budget", None) is not None:
        args.budget = _budget_arg(args.budget)
    try:
        return int(args.func(args))
    except (RematError, OSError) as e:
        if args.debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"remat: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _budget_arg(text: str) -> Any:
    """CLI budgets: ``0.5`` or ``50%`` are shares, anything else bytes."""
    t = text.strip()
    if t.endswith("%") or (t.replace(".", "", 1).isdigit() and "." in t):
        return t
    try:
        return parse_bytes(t, what="--budget")
    except RematError:
        return t


if __name__ == "__main__":
    sys.exit(main())
