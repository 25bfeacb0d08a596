"""remat against what users use today, on the same training step, in one run; writes BENCHMARKS.md.

    make bench            # or: .venv/bin/python benchmarks/compare.py [--quick] [--out BENCHMARKS.md]

For each model, budgets from the smallest feasible peak to the no-checkpointing peak; at each, every
way of running the step is measured side by side (remat.measure for exact peaks; round-robin step
times, medians, as ratios to no checkpointing; gradients compared bit for bit):
  peers: no checkpointing, Hugging Face activation_checkpointing_enable (every layer, and every 2nd
         layer), torch.utils.checkpoint.checkpoint_sequential with sqrt(L) segments (Sequential models);
  remat: every, sqrt, revolve, optimal (= auto), with the simulator's predictions beside the measurements.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch.utils.checkpoint import checkpoint_sequential

import remat
import remat.app.zoo
from remat.app.compare import Variant, plan_variant, run_variants
from remat.planning.solve import min_feasible_plan
from remat.units import format_bytes

ROOT = Path(__file__).resolve().parent.parent
transformers.logging.set_verbosity_error()


@dataclass
class Case:
    name: str
    model: torch.nn.Module
    inputs: object
    loss_fn: object
    hf: bool
    sequential: bool
    description: str


def cases(quick: bool) -> list[Case]:
    torch.manual_seed(0)
    out = []
    s = 64 if quick else 256
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=4 if quick else 8, n_embd=128 if quick else 256, n_head=4, vocab_size=4096, n_positions=1024))
    ids = torch.randint(0, 4096, (2 if quick else 8, s))
    out.append(Case("gpt2-style", gpt2.train(), {"input_ids": ids, "labels": ids, "use_cache": False}, None, True,
                    False, f"GPT-2 config: {gpt2.config.n_layer} layers, hidden {gpt2.config.n_embd}, vocab 4096;"
                    f" batch {ids.shape[0]} x seq {s}; dropout 0.1"))
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=128 if quick else 256, intermediate_size=344 if quick else 688,
        num_hidden_layers=4 if quick else 8, num_attention_heads=4, num_key_value_heads=2, vocab_size=4096,
        max_position_embeddings=1024))
    out.append(Case("llama-style", llama.train(), {"input_ids": ids, "labels": ids, "use_cache": False}, None, True,
                    False, f"Llama config: {llama.config.num_hidden_layers} layers, hidden {llama.config.hidden_size},"
                    f" GQA 4/2, vocab 4096; batch {ids.shape[0]} x seq {s}"))
    depth, width = (6, 128) if quick else (16, 512)
    mlp = remat.app.zoo.residual_mlp(depth, width, 4 * width, dropout=0.1).train()
    x = torch.randn(256 if quick else 1024, width)
    out.append(Case("residual-mlp", mlp, x, lambda o: o.float().pow(2).mean(), False, True,
                    f"nn.Sequential of {depth} residual MLP blocks {width} -> {4 * width} -> {width} + LayerNorm;"
                    f" {x.shape[0]} rows"))
    return out


def peers(case: Case) -> list[Variant]:
    model = case.model
    vs = [Variant("no checkpointing")]
    if case.hf:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable

        def hf(n: int) -> Variant:
            def enter() -> None:
                if n == 1:
                    enable(activation_checkpointing_kwargs={"use_reentrant": False})
                else:
                    enable(activation_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=n)

            return Variant(f"HF checkpointing, every {'' if n == 1 else f'{n}nd '}layer", enter=enter,
                           exit=lambda: disable())

        vs.append(hf(1))
        try:
            import inspect

            if "every_n_layers" in inspect.signature(enable).parameters:
                vs.append(hf(2))
        except (TypeError, ValueError):
            pass
    if case.sequential:
        segments = max(1, round(math.sqrt(len(model))))

        def seq_step() -> None:
            out = checkpoint_sequential(model, segments, case.inputs, use_reentrant=False)
            case.loss_fn(out).backward()

        vs.append(Variant(f"checkpoint_sequential, {segments} segments", step=seq_step))
    return vs


def bench_case(case: Case, points: int, repeats: int) -> dict:
    t0 = time.perf_counter()
    prof = remat.profile(case.model, case.inputs, loss_fn=case.loss_fn, repeats=repeats)
    profile_s = time.perf_counter() - t0
    none = remat.solve(prof, None, strategy="none")
    low = min_feasible_plan(prof).peak_bytes
    budgets = [low + (none.peak_bytes - low) * k // (points - 1) for k in range(points)]
    plans: dict[tuple, remat.Plan] = {}
    chosen: dict[tuple[int, str], remat.Plan | None] = {}
    solve_s = []
    for b in budgets:
        for s in ("every", "sqrt", "revolve", "optimal"):
            t = time.perf_counter()
            try:
                plan = remat.solve(prof, b, strategy=s)
            except remat.InfeasibleBudgetError:
                chosen[(b, s)] = None
                continue
            finally:
                if s == "optimal":
                    solve_s.append(time.perf_counter() - t)
            plan = plans.setdefault(plan.items, plan)
            chosen[(b, s)] = plan
    variants = peers(case)
    labels = {}
    for k, plan in enumerate(plans.values()):
        label = f"remat {plan.strategy} #{k}"
        labels[plan.items] = label
        variants.append(plan_variant(case.model, plan, label))
    res = {r.label: r for r in run_variants(case.model, case.inputs, variants, loss_fn=case.loss_fn,
                                            repeats=repeats)}
    base = res["no checkpointing"]
    noise = _noise(case, repeats)
    return {"case": case, "prof": prof, "none": none, "low": low, "budgets": budgets, "chosen": chosen,
            "labels": labels, "res": res, "peer_labels": [v.label for v in variants if v.plan is None],
            "profile_s": profile_s, "solve_s": statistics.median(solve_s), "base": base, "noise": noise}


def _noise(case: Case, repeats: int) -> float:
    """Spread of the no-checkpointing step time over repeats, as (max - min) / median."""
    r = run_variants(case.model, case.inputs, [Variant("a"), Variant("b")], loss_fn=case.loss_fn, repeats=repeats)
    return abs(r[1].time_ratio - 1.0)


def solver_speed() -> list[tuple[int, float]]:
    import random

    out = []
    for n in (50, 100, 200):
        rng = random.Random(n)
        p = remat.Profile.from_lists(
            [rng.randint(50, 150) * 2**20 for _ in range(n)],
            [rng.randint(200, 600) * 2**20 for _ in range(n - 1)] + [0],
            [rng.uniform(1, 2) for _ in range(n)], [rng.uniform(2, 4) for _ in range(n)],
            fwd_transient_bytes=[2**20] * n, bwd_transient_bytes=[2**20] * n)
        budget = remat.solve(p, None, strategy="none").peak_bytes // 3
        times = []
        for _ in range(3):
            t = time.perf_counter()
            remat.solve(p, budget, strategy="optimal", slots=500)
            times.append(time.perf_counter() - t)
        out.append((n, statistics.median(times)))
    return out


def render(results: list[dict], speed: list[tuple[int, float]], command: str, elapsed: float, png: str) -> str:
    lines = [
        START,
        "",
        f"Generated by `{command}` from a clean checkout ({time.strftime('%Y-%m-%d')}, {elapsed / 60:.1f} min,"
        f" torch {torch.__version__}, transformers {transformers.__version__},"
        f" {platform.processor() or platform.machine()},"
        f" {torch.get_num_threads()} threads). CPU only: this machine has no GPU; `benchmarks/gpu.sh` runs the same"
        " comparison on CUDA.",
        "",
        "Peaks are exact tensor bytes (`remat.measure`, storage tracking). Step times are ratios to no",
        "checkpointing, medians of round-robin runs (order rotated each round) on a shared 2-core machine: the noise",
        "figure per model is the ratio between two identical no-checkpointing variants measured the same way.",
        "`sim` columns are remat's predictions (`remat.simulate`).",
        "",
        f"![memory-time, measured]({png})",
        "",
    ]
    verdicts = []
    for r in results:
        case, res, base = r["case"], r["res"], r["base"]
        lines += [f"### {case.name}", "", case.description, "",
                  f"profiled in {r['profile_s']:.1f} s; optimal solved in {1e3 * r['solve_s']:.1f} ms (median);"
                  f" step without checkpointing {base.time_s * 1e3:.0f} ms, peak {format_bytes(base.peak_bytes)};"
                  f" fixed memory {r['prof'].fixed_summary()}; timing noise {100 * r['noise']:.1f}%", ""]
        head = ["budget", "method", "fits", "sim peak", "measured peak", "<= budget", "sim time", "measured time",
                "grads equal"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        ok_budget, ok_sim_peak, ok_sim_time, beats, below = True, [], [], [], []
        # Checkpointing every layer: Hugging Face's, or (models without it) remat's own `every`.
        every_peak = min((res[lbl].peak_bytes for lbl in r["peer_labels"] if "every layer" in lbl), default=None)
        if every_peak is None:
            every_plans = [p for (b, s), p in r["chosen"].items() if s == "every" and p is not None]
            every_peak = res[r["labels"][every_plans[0].items]].peak_bytes if every_plans else None
        for b in r["budgets"]:
            for lbl in r["peer_labels"]:
                m = res[lbl]
                fits = m.peak_bytes <= b
                yes = "yes" if fits else "no"
                lines.append(f"| {format_bytes(b)} | {lbl} | {yes} | | {format_bytes(m.peak_bytes)} | {yes} | |"
                             f" {m.time_ratio:.2f}x | {'yes' if m.grads_equal else 'NO'} |")
            for s in ("every", "sqrt", "revolve", "optimal"):
                plan = r["chosen"][(b, s)]
                if plan is None:
                    lines.append(f"| {format_bytes(b)} | remat {s} | no | | | | | | |")
                    continue
                m = res[r["labels"][plan.items]]
                within = m.peak_bytes <= b
                ok_budget &= within
                ok_sim_peak.append(abs(m.peak_bytes - plan.peak_bytes) / plan.peak_bytes)
                sim_ratio = plan.time_s / r["none"].time_s
                ok_sim_time.append(abs(m.time_ratio - sim_ratio))
                lines.append(f"| {format_bytes(b)} | remat {s} | yes | {format_bytes(plan.peak_bytes)} |"
                             f" {format_bytes(m.peak_bytes)} | {'yes' if within else '**NO**'} | {sim_ratio:.2f}x |"
                             f" {m.time_ratio:.2f}x | {'yes' if m.grads_equal else 'NO'} |")
                if s == "optimal":
                    for lbl in r["peer_labels"]:
                        p = res[lbl]
                        if p.peak_bytes <= b and lbl != "no checkpointing":
                            beats.append((b, lbl, m.time_ratio, p.time_ratio))
                    if every_peak is not None and b < every_peak:
                        below.append((b, m.time_ratio))
        noise = r["noise"]
        worst_beat = max((o - p for _, _, o, p in beats), default=0.0)
        lines += ["", "Targets:", ""]
        t = [
            ("remat's measured peak <= budget at every point", ok_budget, "all points" if ok_budget else "violated"),
            ("optimal's measured overhead <= every peer's that fits (within the run's noise + 2 points)",
             worst_beat <= noise + 0.02,
             f"worst: optimal {worst_beat * 100:+.1f} points vs the peer (noise {noise * 100:.1f}%)"),
            ("remat fits budgets below every-layer checkpointing's peak", bool(below),
             "; ".join(f"{format_bytes(b)} at {x:.2f}x" for b, x in below[:3]) or "no such budget in range"),
            ("measured peak within 5% of simulated", max(ok_sim_peak) <= 0.05,
             f"max deviation {100 * max(ok_sim_peak):.2f}%"),
            ("measured overhead within 5% of simulated", max(ok_sim_time) <= 0.05,
             f"max |measured - simulated| time ratio {max(ok_sim_time):.3f}, median"
             f" {statistics.median(ok_sim_time):.3f} (timing noise between identical runs {100 * noise:.1f}%)"),
        ]
        for name, met, fig in t:
            lines.append(f"- {'MET' if met else 'MISSED'}: {name} — {fig}")
            verdicts.append((case.name, name, met, fig))
        lines.append("")
    lines += ["### Planner speed", "",
              "`remat.solve(..., strategy='optimal', slots=500)` on random heterogeneous chains"
              " (median of 3; includes the baselines it also simulates):", "", "| stages | time |", "|---|---|"]
    lines += [f"| {n} | {t:.2f} s |" for n, t in speed]
    target = {100: 1.0, 200: 5.0}
    lines += [""] + [f"- {'MET' if t <= target[n] else 'MISSED'}: {n} stages under {target[n]:.0f} s — {t:.2f} s"
                     for n, t in speed if n in target]
    lines += ["", END]
    return "\n".join(lines)


START, END = "<!-- benchmarks/compare.py: start -->", "<!-- benchmarks/compare.py: end -->"


def write_section(out: Path, section: str, start: str = START, end: str = END) -> None:
    """Replace the text from ``start`` to ``end`` in ``out`` by ``section`` (which begins and ends with
    them), keeping the rest of the file; or append the section."""
    text = out.read_text() if out.exists() else "# Benchmarks\n"
    a, b = text.find(start), text.find(end)
    if (a >= 0) != (b >= 0) or (a >= 0 and b < a):
        raise SystemExit(f"{out}: the markers {start!r} and {end!r} are not one pair, in order: mend the file")
    if a >= 0:
        text = text[:a] + section + text[b + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    out.write_text(text)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4.4), dpi=110)
    for ax, r in zip(axes, results):
        res, scale = r["res"], 2**20
        pts = remat.frontier(r["prof"])
        base = r["none"].time_s
        ax.step([p.peak_bytes / scale for p in pts], [p.time_s / base for p in pts], where="post",
                color="tab:green", lw=1.5, label="remat optimal (predicted)")
        for lbl in r["peer_labels"]:
            m = res[lbl]
            ax.scatter([m.peak_bytes / scale], [m.time_ratio], marker="s", s=50, label=lbl)
        opt = [res[r["labels"][p.items]] for (b, s), p in r["chosen"].items() if s == "optimal" and p is not None]
        ax.scatter([m.peak_bytes / scale for m in opt], [m.time_ratio for m in opt], marker="*", s=90,
                   color="tab:green", edgecolor="black", label="remat optimal (measured)", zorder=5)
    finish_figure(fig, path, [(ax, r["case"].name) for ax, r in zip(axes, results)],
                  "measured peak memory (MiB)", "step time / no checkpointing")


def finish_figure(fig: Any, path: Path, titled_axes: list[tuple[Any, str]], xlabel: str, ylabel: str) -> None:
    """Title, label, grid and legend each axis; lay out, save to ``path`` and close ``fig``."""
    import matplotlib.pyplot as plt

    for ax, title in titled_axes:
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    ap.add_argument("--points", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    results = []
    for case in cases(args.quick):
        print(f"== {case.name}", file=sys.stderr, flush=True)
        results.append(bench_case(case, args.points, 2 if args.quick else args.repeats))
    speed = solver_speed()
    out = Path(args.out)
    png = ROOT / "benchmarks" / "frontier.png" if out.name == "BENCHMARKS.md" else out.with_suffix(".png")
    plot(results, png)
    command = "make bench" if not args.quick else "python benchmarks/compare.py --quick"
    link = png.relative_to(out.parent) if png.is_relative_to(out.parent) else png
    write_section(out, render(results, speed, command, time.perf_counter() - t0, str(link)))
    print(f"wrote {out} and {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
