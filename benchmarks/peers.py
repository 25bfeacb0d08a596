"""remat against every peer at the peer's own measured peak, on a GPT-2-style and a Llama-style model.

    .venv/bin/python benchmarks/peers.py [--models gpt2,llama] [--repeats 9] [--stability 5]
                                         [--compile aot_eager_decomp_partition] [--out BENCHMARKS.md]

Peers (every one on the same training step, side by side):
  no checkpointing; Hugging Face checkpointing of every layer and of every 2nd layer (non-reentrant);
  every layer with a SAC policy that saves the outputs of mm/addmm/bmm/attention
  (``create_selective_checkpoint_contexts`` as the checkpoint's ``context_fn``);
  torch.compile with ``torch._functorch.config.activation_memory_budget`` at 1.0, 0.5 and 0.1 (the min-cut
  partitioner; backend ``aot_eager_decomp_partition`` by default, ``--compile inductor`` compiles C++).
remat: ``remat.solve`` with the blocks' selective options (``remat.add_options``) at each peer's measured
peak, and midway between neighbouring peaks.

Memory. Eager variants: ``remat.measure`` (exact tensor storage bytes). A compiled step runs its graphs
only without a dispatch mode, so its peak is measured in a child process as the rise of the resident set
(``/proc/self/clear_refs`` resets the high-water mark) with glibc's mmap threshold fixed at 64 KiB, so that
every tensor is mapped on allocation and unmapped on release; the child measures eager no checkpointing the
same way and the difference to ``remat.measure``'s exact figure (fixed memory and allocator slack) is added
to each compiled peak. Time. Round-robin rounds (the order rotated each round), one intra-op thread; each
timed step follows an untimed one of the same variant (``--warmup``); ratios are medians of per-round
ratios to no checkpointing, with their interquartile range; "noise" is the interquartile range of a second,
identical no-checkpointing variant. remat against a peer, side by side: remat's plan at the peer's peak and
the peer timed alone, alternately (``--pair-repeats`` rounds); the median of per-round ratios remat / peer
with a confidence interval of at least 90% (order statistics; none below 5 rounds); "faster" or "slower"
only when the interval excludes 1, else "within noise".
Budgets that give one plan share one timed variant. Gradients: bitwise equality with no
checkpointing for eager variants; the largest absolute difference for compiled ones (decompositions change
rounding and dropout's random stream).
Stability: ``--stability N`` profiles N more times and solves at the same budgets; each plan is priced on
the first profile, so "spread" is the largest relative difference in predicted time between plans.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from compare import finish_figure, write_section  # benchmarks/compare.py, beside this script
from torch.utils.checkpoint import create_selective_checkpoint_contexts

import remat
from remat.app.compare import Variant, check_variant, plan_variant, time_variants
from remat.planning.min_peak import min_peak_items
from remat.planning.plan import Region, Selective
from remat.runtime.measure import reset_grads
from remat.runtime.ops import add_options

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20
BUDGETS = (1.0, 0.5, 0.1)
SAC_POLICY = [
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
]
transformers.logging.set_verbosity_error()


def build(name: str) -> tuple[torch.nn.Module, dict[str, Any], str]:
    torch.manual_seed(0)
    ids = torch.randint(0, 4096, (4, 256))
    if name == "gpt2":
        cfg = transformers.GPT2Config(n_layer=6, n_embd=256, n_head=4, vocab_size=4096, n_positions=1024,
                                      attn_pdrop=0.0, resid_pdrop=0.1, embd_pdrop=0.1)
        model: torch.nn.Module = transformers.GPT2LMHeadModel(cfg)
        text = "GPT-2 config: 6 layers, hidden 256, 4 heads, vocab 4096, dropout 0.1; batch 4 x seq 256"
    elif name == "llama":
        cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=6,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=4096,
                                       max_position_embeddings=1024)
        model = transformers.LlamaForCausalLM(cfg)
        text = "Llama config: 6 layers, hidden 256, MLP 688, GQA 4/2, vocab 4096; batch 4 x seq 256"
    else:
        raise SystemExit(f"peers.py: unknown model {name!r} (gpt2, llama)")
    model.config._attn_implementation = "sdpa"
    return model.train(), {"input_ids": ids, "labels": ids, "use_cache": False}, text


# ---- peers -----------------------------------------------------------------------------------------------

def hf_variant(model: Any, label: str, every: int = 1, **kwargs: Any) -> Variant:
    """Hugging Face activation checkpointing of every ``every``-th layer (layers 0, every, 2 every, ...)."""
    def enter() -> None:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False, **kwargs},
                                              every_n_layers=every)

    return Variant(label, enter=enter, exit=model.activation_checkpointing_disable)


def compile_backend(budget: float, backend: str) -> Any:
    """A torch.compile backend that partitions with ``activation_memory_budget = budget``."""
    import torch._functorch.config as functorch_config
    from torch._dynamo.backends.registry import lookup_backend

    inner = lookup_backend(backend)

    def compile_with_budget(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
        with functorch_config.patch(activation_memory_budget=budget, enable_autograd_cache=False):
            return inner(gm, example_inputs)

    return compile_with_budget


def compile_variant(model: torch.nn.Module, inputs: dict[str, Any], budget: float, backend: str) -> Variant:
    """``model`` compiled with a memory budget. On a copy of it: the other variants change the model (remat's
    plans, Hugging Face's flags), which would fail the compiled code's guards and, past dynamo's recompile
    limit, run the step eagerly."""
    own = copy.deepcopy(model)
    compiled = torch.compile(own, backend=compile_backend(budget, backend))

    def step() -> None:
        compiled(**inputs).loss.backward()

    return Variant(f"torch.compile, memory budget {budget}", enter=lambda: reset_grads(own), step=step,
                   info={"model": own})


def eager_step(model: torch.nn.Module, inputs: dict[str, Any]) -> None:
    model(**inputs).loss.backward()


# ---- compiled peaks, in a child process ---------------------------------------------------------------

def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss_rise(fn: Any) -> int:
    """How far the resident set rises above its level at the start while ``fn`` runs."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_bytes("VmRSS")
    fn()
    return _status_bytes("VmHWM") - base


def child_compile_peaks(name: str, backend: str) -> None:
    """Print, as JSON, the resident-set rise of eager no checkpointing and of each compiled budget's step,
    and the largest gradient difference of each compiled step to eager (same seed)."""
    torch.set_num_threads(1)
    model, inputs, _ = build(name)
    params = [p for p in model.parameters() if p.requires_grad]

    def grads_of(step: Any) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=False)
        torch.manual_seed(0)
        step()
        return [p.grad.detach().clone() for p in params]

    def rise(step: Any, module: torch.nn.Module) -> int:
        out = []
        for _ in range(3):
            step()
            module.zero_grad(set_to_none=False)
            out.append(rss_rise(step))
            module.zero_grad(set_to_none=False)
        return min(out)

    eager = functools.partial(eager_step, model, inputs)
    ref = grads_of(eager)
    out: dict[str, Any] = {"eager": rise(eager, model), "budgets": {}, "max_grad_diff": {}}
    for b in BUDGETS:
        v = compile_variant(model, inputs, b, backend)
        assert v.step is not None
        own = v.info["model"]
        own.zero_grad(set_to_none=False)
        torch.manual_seed(0)
        v.step()
        got = [p.grad.detach().clone() for p in own.parameters() if p.requires_grad]
        out["max_grad_diff"][str(b)] = max(float((a - r).abs().max()) for a, r in zip(got, ref))
        out["budgets"][str(b)] = rise(v.step, own)
    print(json.dumps(out))


def compile_peaks(name: str, backend: str) -> dict[str, Any]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run([sys.executable, __file__, "--child-compile-peaks", name, "--compile", backend],
                          env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"peers.py: the compiled peers failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- remat ------------------------------------------------------------------------------------------------

def profiled(model: torch.nn.Module, inputs: dict[str, Any], repeats: int) -> remat.Profile:
    prof = remat.profile(model, inputs, repeats=repeats, progress=False)
    return add_options(prof, model, inputs, repeats=repeats)


def peer_plans(prof: remat.Profile) -> dict[str, remat.Plan]:
    """The eager peers as remat plans, for remat's prediction of their peaks and times."""
    from remat.planning.plan import Record
    from remat.planning.solve import make_plan

    blocks = prof.block_indices()
    out = {"no checkpointing": remat.solve(prof, None, strategy="none"),
           "HF every layer": remat.solve(prof, None, strategy="every")}
    items2 = [Region(i, i + 1, (Record(i),)) if i in blocks[::2] else Record(i) for i in range(len(prof.stages))]
    out["HF every 2nd layer"] = make_plan(prof, items2, strategy="every2", budget_bytes=None)
    # remat's "sac" option saves what the peer's policy saves among the ops it may save (not random, in
    # place or views), so the prediction is of nearly, not exactly, the peer's schedule.
    if all(any(o.name == "sac" for o in prof.stages[i].options) for i in blocks):
        items = [Selective(i, "sac", prof.stages[i].option("sac").save) if i in blocks else Record(i)
                 for i in range(len(prof.stages))]
        out["HF every layer + SAC"] = make_plan(prof, items, strategy="sac", budget_bytes=None)
    return out


def describe(plan: remat.Plan) -> str:
    regions = selective = 0
    options: set[str] = set()
    stack = list(plan.items)
    while stack:
        it = stack.pop()
        if isinstance(it, Region):
            regions += 1
            stack += it.body
        elif isinstance(it, Selective):
            selective += 1
            options.add(it.option)
    return f"{regions} regions" + (f", {selective} selective ({', '.join(sorted(options))})" if selective else "")


# ---- one model -----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Point:
    label: str
    peak: int
    ratio: tuple[float, float, float] = (0.0, 0.0, 0.0)  # median, 25th, 75th percentile
    pred_ratio: float | None = None
    pred_peak: int | None = None
    grads: str = ""
    plan: remat.Plan | None = None
    at: str = ""  # for remat: the peer whose peak (or the midpoint) is its budget
    peer: bool = True
    alias: str = ""  # for remat: the label of the variant timed for its plan (budgets may share one)


def ratios(times: dict[str, list[float]], base: str, again: str) -> dict[str, tuple[float, float, float]]:
    """Per variant: the median and quartiles over rounds of its time over the round's base, the mean of the
    two identical no-checkpointing variants (one noisy base sample would shift every ratio); ``again``'s
    own ratio is to ``base`` alone, its spread the run's noise."""
    out = {}
    bases = [(a + b) / 2 for a, b in zip(times[base], times[again])]
    for label, ts in times.items():
        r = sorted(t / b for t, b in zip(ts, times[base] if label == again else bases))
        q = statistics.quantiles(r, n=4) if len(r) > 1 else [r[0]] * 3
        out[label] = (statistics.median(r), q[0], q[2])
    return out


def bench_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    model, inputs, text = build(name)
    fixed = 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    print(f"== {name}: {text}", file=sys.stderr, flush=True)
    eager = [Variant("no checkpointing"), Variant("no checkpointing, again"),
             hf_variant(model, "HF every layer"), hf_variant(model, "HF every 2nd layer", every=2),
             hf_variant(model, "HF every layer + SAC",
                        context_fn=functools.partial(create_selective_checkpoint_contexts, SAC_POLICY))]
    points: dict[str, Point] = {}
    ref: list[torch.Tensor] | None = None
    for v in eager:
        peak, grads = check_variant(model, inputs, v)
        ref = grads if ref is None else ref
        points[v.label] = Point(v.label, peak, grads=str(all(torch.equal(a, b) for a, b in zip(grads, ref))))
    compiled = compile_peaks(name, args.compile)
    offset = points["no checkpointing"].peak - compiled["eager"]
    compiled_variants = [compile_variant(model, inputs, b, args.compile) for b in BUDGETS]
    for b, v in zip(BUDGETS, compiled_variants):
        points[v.label] = Point(v.label, compiled["budgets"][str(b)] + offset,
                                grads=f"max diff {compiled['max_grad_diff'][str(b)]:.1e}")
    print(f"   peers measured ({time.perf_counter() - t0:.0f} s); profiling", file=sys.stderr, flush=True)
    t1 = time.perf_counter()
    prof = profiled(model, inputs, args.profile_repeats)
    profile_s = time.perf_counter() - t1
    none_s = remat.solve(prof, None, strategy="none").time_s
    for label, plan in peer_plans(prof).items():
        points[label].pred_ratio, points[label].pred_peak = plan.time_s / none_s, plan.peak_bytes
    budgets = budgets_at_peers(points)
    assert ref is not None
    remat_variants, alias = remat_points(model, inputs, remat_plans(prof, budgets), none_s, ref, points)
    variants = eager + compiled_variants + remat_variants
    for v in compiled_variants:  # compile outside the timed rounds
        assert v.step is not None
        v.step()
    model.zero_grad(set_to_none=True)
    print(f"   timing {len(variants)} variants x {args.repeats} rounds", file=sys.stderr, flush=True)
    times = time_variants(model, inputs, variants, repeats=args.repeats, warmup=args.warmup)
    times.update({label: times[of] for label, of in alias.items()})
    for label, r in ratios(times, "no checkpointing", "no checkpointing, again").items():
        points[label].ratio = r
    by_label = {v.label: v for v in variants}
    pairs = {p.label: head_to_head(model, inputs, by_label[alias[q.label]], by_label[p.label], args)
             for p in points.values() if p.peer and not p.label.startswith("no checkp")
             for q in points.values() if q.at == f"= {p.label}"}
    stability = plan_stability(model, inputs, prof, budgets, args) if args.stability else []
    return {"name": name, "text": text, "points": points, "fixed": fixed, "budgets": budgets, "prof": prof,
            "none_ms": 1e3 * statistics.median(times["no checkpointing"]), "profile_s": profile_s,
            "stability": stability, "stability_n": args.stability, "seconds": time.perf_counter() - t0,
            "none_s": none_s, "pairs": pairs, "floor": min_peak_items(prof)[0]}


def remat_points(model: torch.nn.Module, inputs: dict[str, Any], plans: dict[str, tuple[remat.Plan, str]],
                 none_s: float, ref: list[torch.Tensor], points: dict[str, Point],
                 ) -> tuple[list[Variant], dict[str, str]]:
    """remat's points (added to ``points``) and one variant per distinct schedule: budgets that give the same
    plan share its measurements (the rounds are not spent timing one schedule several times). Returns the
    variants and, per point, the label of the variant that runs its plan."""
    variants: dict[Any, Variant] = {}
    checked: dict[str, tuple[int, str]] = {}
    alias: dict[str, str] = {}
    for label, (plan, at) in plans.items():
        v = variants.get(plan.items)
        if v is None:
            v = variants[plan.items] = plan_variant(model, plan, label)
            peak, grads = check_variant(model, inputs, v)
            checked[v.label] = peak, str(all(torch.equal(a, b) for a, b in zip(grads, ref)))
        alias[label] = v.label
        peak, same = checked[v.label]
        points[label] = Point(label, peak, pred_ratio=plan.time_s / none_s, pred_peak=plan.peak_bytes, plan=plan,
                              at=at, peer=False, grads=same, alias=v.label)
    return list(variants.values()), alias


def budgets_at_peers(points: dict[str, Point]) -> dict[str, int]:
    """Each peer's measured peak (no checkpointing excluded), and the midpoints between neighbours."""
    peers = sorted((p.peak, p.label) for p in points.values() if p.peer and not p.label.startswith("no checkp"))
    out = {f"= {label}": peak for peak, label in peers}
    for (lo, a), (hi, b) in zip(peers, peers[1:]):
        if hi - lo > MIB:
            out[f"between {a} and {b}"] = (lo + hi) // 2
    return out


def remat_plans(prof: remat.Profile, budgets: dict[str, int]) -> dict[str, tuple[remat.Plan, str]]:
    out: dict[str, tuple[remat.Plan, str]] = {}
    for at, b in budgets.items():
        try:
            plan = remat.solve(prof, b)
        except remat.InfeasibleBudgetError as e:
            print(f"   remat at {at}: {e}", file=sys.stderr)
            continue
        out[f"remat {at}"] = (plan, at)
    return out


def head_to_head(model: torch.nn.Module, inputs: dict[str, Any], ours: Variant, peer: Variant,
                 args: argparse.Namespace) -> tuple[float, float, float]:
    """remat's step time over the peer's, the two timed alone and alternately (A B, B A, ...): the median of
    per-round ratios and its confidence interval of at least 90% (:func:`median_ci`)."""
    print(f"   side by side: {ours.label} / {peer.label}", file=sys.stderr, flush=True)
    times = time_variants(model, inputs, [ours, peer], repeats=args.pair_repeats, warmup=args.warmup)
    return median_ci([a / b for a, b in zip(times[ours.label], times[peer.label])])


def plan_stability(model: torch.nn.Module, inputs: dict[str, Any], prof: remat.Profile, budgets: dict[str, int],
                   args: argparse.Namespace) -> list[tuple[str, int, float]]:
    """Per budget: (label, how many of the profiles give the first profile's plan, the spread of predicted
    time, on the first profile, between the plans)."""
    print(f"   profiling {args.stability} more times", file=sys.stderr, flush=True)
    others = [profiled(model, inputs, args.profile_repeats) for _ in range(args.stability)]
    out = []
    for at, b in budgets.items():
        try:
            first = remat.solve(prof, b)
            plans = [remat.solve(p, b) for p in others]
        except remat.InfeasibleBudgetError:
            continue
        same = sum(p.items == first.items for p in plans)
        # On the first profile; a plan with an option that profile does not list (options are pruned by
        # measured times) is priced on its own profile.
        priced = []
        for p in plans:
            try:
                priced.append(remat.simulate(prof, p.items).time_s)
            except remat.PlanError:
                priced.append(p.time_s)
        spread = (max(priced + [first.time_s]) - min(priced + [first.time_s])) / first.time_s
        out.append((at, same, spread))
    return out


# ---- report ------------------------------------------------------------------------------------------------

def median_ci(values: list[float], level: float = 0.90) -> tuple[float, float, float]:
    """The median of ``values`` and a distribution-free confidence interval for it of at least ``level``
    (order statistics: the number of values below the true median is Binomial(n, 1/2)); NaN bounds when
    there are too few values for that level (fewer than 5 at 90%)."""
    x = sorted(values)
    n = len(x)
    if not x:
        return (float("nan"),) * 3

    def cdf(k: int) -> float:  # P(Binomial(n, 1/2) <= k)
        return sum(math.comb(n, i) for i in range(k + 1)) / 2**n

    js = [k for k in range((n + 1) // 2) if cdf(k) <= (1 - level) / 2]
    if not js:
        return statistics.median(x), float("nan"), float("nan")
    return statistics.median(x), x[max(js)], x[n - 1 - max(js)]


def noise_of(r: dict[str, Any]) -> float:
    med, lo, hi = r["points"]["no checkpointing, again"].ratio
    return max(abs(med - 1.0), (hi - lo) / 2)


def render(r: dict[str, Any]) -> list[str]:
    pts: dict[str, Point] = r["points"]
    act_none = pts["no checkpointing"].peak - r["fixed"]
    noise = noise_of(r)
    lines = [f"### {r['name']}", "", f"{r['text']}. Parameters and gradients {r['fixed'] / MIB:.2f} MiB; no"
             f" checkpointing {r['none_ms']:.0f} ms per step (median); timing noise ±{noise:.3f} (the spread of an"
             f" identical no-checkpointing variant); profiled with options in {r['profile_s']:.0f} s.", "",
             "| variant | peak MiB | activations | step time [25th-75th] | predicted | error | gradients | plan |",
             "|---|---|---|---|---|---|---|---|"]
    for p in sorted(pts.values(), key=lambda p: (-p.peak, p.peer)):
        act = max(1, p.peak - r["fixed"])
        med, lo, hi = p.ratio
        pred = f"{p.pred_ratio:.3f}" if p.pred_ratio is not None else ""
        err = f"{100 * (p.pred_ratio / med - 1):+.1f}%" if p.pred_ratio is not None else ""
        label = p.label if p.peer else f"**{p.label}**"
        lines.append(f"| {label} | {p.peak / MIB:.2f} | {act / MIB:.1f} MiB ({act_none / act:.2f}x less) |"
                     f" {med:.3f} [{lo:.3f}-{hi:.3f}] | {pred} | {err} | {p.grads} |"
                     f" {describe(p.plan) if p.plan else ''} |")
    lines += ["", "| peer | its peak | its time | remat's peak | remat's time | memory | remat / peer, side by side"
              " [90% CI] | time |", "|---|---|---|---|---|---|---|---|"]
    for p in pts.values():
        if p.peer and not p.label.startswith("no checkp"):
            m = next((q for q in pts.values() if q.at == f"= {p.label}"), None)
            if m is None:
                lines.append(f"| {p.label} | {p.peak / MIB:.2f} | {p.ratio[0]:.3f} | infeasible | | MISSED | | |")
                continue
            med, lo, hi = r["pairs"][p.label]
            verdict = ("faster" if hi < 1 else "MISSED: slower" if lo > 1 else "within noise (met)" if lo <= 1 <= hi
                       else "too few rounds")
            lines.append(f"| {p.label} | {p.peak / MIB:.2f} | {p.ratio[0]:.3f} | {m.peak / MIB:.2f} |"
                         f" {m.ratio[0]:.3f} | {'met' if m.peak <= p.peak else 'MISSED'} |"
                         f" {med:.3f} [{lo:.3f}-{hi:.3f}] | {verdict} |")
    lines += ["", *targets(r, act_none), ""]
    return lines


def targets(r: dict[str, Any], act_none: int) -> list[str]:
    ours = [p for p in r["points"].values() if not p.peer]
    out = []
    floor = act_none / max(1, r["floor"] - r["fixed"])
    for limit, want in ((1.10, 3.0), (1.20, 5.0)):
        within = [act_none / max(1, p.peak - r["fixed"]) for p in ours if p.ratio[0] <= limit]
        best = f"{max(within):.2f}x less" if within else f"none at <= {limit:.2f}x"
        out.append(f"- {'met' if within and max(within) >= want else 'MISSED'}: {want:.0f}x less activation"
                   f" memory at <= {limit:.2f}x step time — best measured remat point: {best}; remat's least"
                   f" predicted peak (regions and records, whatever the time, margin included):"
                   f" {r['floor'] / MIB:.2f} MiB ({floor:.2f}x less)")
    # One error per timed plan: budgets that share a plan share its measurement.
    errs = list({p.alias or p.label: abs(p.pred_ratio / p.ratio[0] - 1) for p in r["points"].values()
                 if p.pred_ratio is not None}.values())
    out.append(f"- {'met' if max(errs) <= 0.10 else 'MISSED'}: predicted step time within 10% of measured —"
               f" largest error {100 * max(errs):.1f}%, median {100 * statistics.median(errs):.1f}%"
               f" (timing noise ±{100 * noise_of(r):.1f}%)")
    if r["stability"]:
        n = r["stability_n"]
        worst = max(s[2] for s in r["stability"])
        same = ", ".join(f"{s[1]}" for s in r["stability"])
        out.append(f"- {'met' if worst <= 0.02 else 'MISSED'}: the same plan (or one within 2% predicted time)"
                   f" from repeated profiles — plans equal to the first profile's, per budget: {same} of"
                   f" {n if n else '?'}; largest spread of predicted time {100 * worst:.2f}%")
    return out


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.4 * len(results), 4.8), dpi=110, squeeze=False)
    for ax, r in zip(axes[0], results):
        front = remat.frontier(r["prof"])
        ax.step([p.peak_bytes / MIB for p in front], [p.time_s / r["none_s"] for p in front], where="post",
                color="tab:green", lw=1.2, label="remat frontier (predicted)")
        for p in r["points"].values():
            if p.label == "no checkpointing, again":
                continue
            med, lo, hi = p.ratio
            style = dict(marker="s", s=40) if p.peer else dict(marker="*", s=90, color="tab:green",
                                                                  edgecolor="black", zorder=5)
            ax.errorbar([p.peak / MIB], [med], yerr=[[med - lo], [hi - med]], fmt="none", ecolor="gray", lw=0.8)
            ax.scatter([p.peak / MIB], [med], label=p.label if p.peer else None, **style)
        ax.scatter([], [], marker="*", s=90, color="tab:green", edgecolor="black", label="remat (measured)")
    finish_figure(fig, path, [(ax, r["name"]) for ax, r in zip(axes[0], results)], "peak memory (MiB)",
                  "step time / no checkpointing (median, IQR)")


START, END = "<!-- benchmarks/peers.py: start -->", "<!-- benchmarks/peers.py: end -->"


def write(results: list[dict[str, Any]], args: argparse.Namespace, elapsed: float, out: Path) -> None:
    png = ROOT / "benchmarks" / "peers.png"
    plot(results, png)
    command = (f".venv/bin/python benchmarks/peers.py --models {args.models} --repeats {args.repeats}"
               f" --warmup {args.warmup} --pair-repeats {args.pair_repeats} --profile-repeats {args.profile_repeats}"
               f" --stability {args.stability} --compile {args.compile}")
    lines = [START, "", f"Generated by `{command}` ({time.strftime('%Y-%m-%d')}, {elapsed / 60:.1f} min, torch"
             f" {torch.__version__}, one intra-op thread, CPU). Peaks: exact"
             " bytes for eager variants, the resident-set rise (calibrated on eager no checkpointing) for compiled"
             " ones; times: medians of per-round ratios to the mean of the two no-checkpointing variants;"
             " **bold**: remat with block options.",
             "", f"![peers]({os.path.relpath(png, out.parent)})", ""]
    for r in results:
        lines += render(r)
    lines.append(END)
    write_section(out, "\n".join(lines), START, END)
    print("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="gpt2,llama")
    ap.add_argument("--repeats", type=int, default=9, help="timed rounds")
    ap.add_argument("--profile-repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before each timed one")
    ap.add_argument("--pair-repeats", type=int, default=12, help="rounds of remat against each peer, alone")
    ap.add_argument("--stability", type=int, default=5, help="further profiles for the plan-stability check")
    ap.add_argument("--compile", default="aot_eager_decomp_partition")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    ap.add_argument("--child-compile-peaks", metavar="MODEL", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_compile_peaks:
        child_compile_peaks(args.child_compile_peaks, args.compile)
        return 0
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    results = []
    for name in args.models.split(","):
        results.append(bench_model(name, args))
        print("\n".join(render(results[-1])), flush=True)  # kept should a later model fail
    write(results, args, time.perf_counter() - t0, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
