"""Selective options per block: what each op of a block keeps and costs, and a few ways to run the block
in its own checkpoint keeping some op outputs (PyTorch's selective activation checkpointing, SAC).

Note: [Block options]
1. The inputs of every block are captured by forward pre-hooks in one forward of the model without
   autograd and with a Hugging Face model's KV cache off, as a plan runs it (a cache is state outside a
   block's arguments: run alone again and again, a block would grow it and backward through the graph
   of an earlier run); a captured tensor still part of a graph (one the model cached from an earlier
   forward) is replaced by a detached leaf. Each run of the block is its own forward on these inputs,
   the hidden state a new leaf. Identical blocks (same class, parameter shapes, argument shapes and
   values, and the same ops with the same sizes in one recording forward) are profiled once and share
   their options. A block that cannot be measured alone (no tensor
   hidden state, different ops in two identical forwards, a failure run alone or in a checkpoint) gets
   no options, with a warning and its reason in the profile's ``meta["options_skipped"]``.
2. A block's recording forward runs under :class:`OpRecorder`: per op (the ops SAC's policy sees, in the
   same order), the bytes of the storages it creates, its time, FLOPs and bytes moved, whether it drew
   random numbers (the generator's state moved: attention with ``dropout_p=0`` draws none), works in
   place, returns a view, or has its output written in place later, and how much of its output
   autograd saves (``saved_tensors_hooks`` attribute each saved storage to the op that made it).
3. An op may be saved only if it creates new memory and is neither random (a saved random op would
   shift the random draws of the ops recomputed after it: every random op is recomputed, in order, from
   the restored RNG state), in place, a view, written in place later (SAC refuses a cached output that
   changed), nor the maker of what the block returns: code after the block may write that in place
   (``x *= 2``, ``ReLU(inplace=True)``: SAC would then raise in backward) or free it (the chain model
   lets the next stage release its input; a cached output would stay live). Candidates: SAC's usual
   policy (matmuls and attention), matmuls only, and greedy cuts of the savable ops ranked by recompute
   seconds per byte (a roofline estimate from FLOPs and bytes moved: the same ranking from every
   profile, where measured op times on a shared machine differ).
4. Each candidate is run as it will run in a plan — the block in a non-reentrant checkpoint with the
   policy, recomputed to its end (early stop off) — under :class:`remat.MemoryTracker` (the bytes it
   keeps, its forward peak, exact), and timed against the block's plain forward and backward,
   interleaved with a plain one-block checkpoint (each extra: its share of the plain run's time in the
   same round, the order rotated each round; times the plain block's fastest run). Identical blocks
   are measured once over their pooled share of rounds (``repeats`` per block, at most
   :data:`POOLED_ROUNDS` times ``repeats``). An option's ``recompute_s`` is the time of the ops it
   recomputes plus the policy's overhead, one figure per block: the median over every option and round
   (see :func:`_block_options`); each op's time is its share of the recorded forward (its fastest
   recorded run over all ops') times the plain forward timed in the same rounds, so that a machine
   loaded while the ops were recorded does not inflate it. The region's figure, measured the same way,
   replaces the block's ``fwd_region_s`` (``region_times``), so that the planner weighs regions and
   options on one scale. Dominated options are dropped. These figures are then put on the profile's
   scale: multiplied by the block's forward and backward in the profile over the plain block's run
   alone (:func:`_time_scale`; with estimated profile times, that maps them onto the estimate). A block
   alone and the whole steps of a profile run at different speeds with the machine's load; the ratio
   does not, so a profile made on a loaded machine no longer finds options and regions cheap beside
   records.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only
from torch.utils.checkpoint import SAC_IGNORED_OPS, checkpoint, noop_context_fn, set_checkpoint_early_stop
from torch.utils.weak import WeakIdKeyDictionary

from remat.errors import ProfileError
from remat.planning.profile import BlockOption, Profile, Stage
from remat.runtime import hf
from remat.runtime.measure import MemoryTracker
from remat.runtime.model import as_call, carry_of, find_stages, split_carry, tensors_in
from remat.runtime.policy import SavePolicy, selective_contexts
from remat.runtime.regions import suspended
from remat.runtime.step import autocast_for, training

log = logging.getLogger("remat")

__all__ = ["SAC_OPS", "OpRecord", "SavePolicy", "add_options", "block_ops", "candidates", "selective_contexts"]

#: The ops PyTorch's usual SAC policy saves: matmuls and attention.
MATMUL_OPS = frozenset({"aten.mm.default", "aten.addmm.default", "aten.bmm.default", "aten.baddbmm.default"})
SAC_OPS = MATMUL_OPS | frozenset({
    "aten._scaled_dot_product_flash_attention_for_cpu.default",
    "aten._scaled_dot_product_flash_attention.default",
    "aten._scaled_dot_product_efficient_attention.default",
    "aten._scaled_dot_product_cudnn_attention.default",
    "aten.convolution.default",
})


@dataclass
class OpRecord:
    """One op of a block's forward, as :class:`OpRecorder` saw it."""

    name: str  # "aten.addmm.default"
    occurrence: int  # its calls before this one in the block's forward
    out_bytes: int  # bytes of the storages it created
    time_s: float  # the fastest of the timed runs
    random: bool  # it drew random numbers (the generator moved)
    inplace: bool
    view: bool  # it created no storage but returned tensors (a view or an in-place result)
    mutated: bool = False  # an in-place op wrote into its output later
    escapes: bool = False  # its output is (part of) the block's output: code after the block may free or write it
    saved_bytes: int = 0  # bytes of its output autograd saved
    flops: float = 0.0
    moved_bytes: int = 0  # bytes of its inputs and outputs

    def estimate_s(self, flops_per_s: float = 5e10, bytes_per_s: float = 1e10, overhead_s: float = 5e-6) -> float:
        """A roofline estimate of its time: deterministic, to rank ops (measured times rank by noise too)."""
        return self.flops / flops_per_s + self.moved_bytes / bytes_per_s + overhead_s

    @property
    def key(self) -> str:
        return f"{self.name}#{self.occurrence}"

    @property
    def savable(self) -> bool:
        return self.out_bytes > 0 and not (self.random or self.inplace or self.view or self.mutated or self.escapes)


def _generator_states(tensors: Sequence[torch.Tensor]) -> tuple[Any, ...]:
    """What tells whether an op drew random numbers: the CPU generator's state, and each CUDA device's."""
    cuda = sorted({t.device.index or 0 for t in tensors if t.is_cuda})
    return (torch.random.get_rng_state(), *(torch.cuda.get_rng_state(d) for d in cuda))


def _moved(a: Any, b: Any) -> bool:
    return any(not torch.equal(x, y) for x, y in zip(a, b))


def _storage(t: torch.Tensor) -> Any:
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def _flops(func: Any, args: Any, kwargs: Any, out: Any) -> float:
    from torch.utils.flop_counter import flop_registry

    fn = flop_registry.get(func._overloadpacket)
    if fn is None:
        return 0.0
    try:
        return float(fn(*args, **kwargs, out_val=out))
    except Exception:  # a shape the counter does not handle: counted as moving bytes only
        return 0.0


class OpRecorder(TorchDispatchMode):
    """Lists the ops of a forward with their new bytes, time and flags (Note [Block options], 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[OpRecord] = []
        self.producer: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.counts: dict[str, int] = defaultdict(int)
        self.saved: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in SAC_IGNORED_OPS:
            return func(*args, **kwargs)
        in_tensors = tensors_in((args, kwargs))
        seeded = torch.Tag.nondeterministic_seeded in func.tags
        before = _generator_states(in_tensors) if seeded else ()
        cuda = any(t.is_cuda for t in in_tensors)
        if cuda:  # an op's time, not its launch's
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = func(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        name = str(func)
        inputs = {id(s) for s in map(_storage, in_tensors) if s is not None}
        out_tensors = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        outs = [s for s in map(_storage, out_tensors) if s is not None]
        fresh = {id(s): s for s in outs if id(s) not in inputs and s not in self.producer}
        inplace = bool(func._schema.is_mutable)
        rec = OpRecord(name, self.counts[name], sum(s.nbytes() for s in fresh.values()), elapsed,
                       seeded and _moved(before, _generator_states(in_tensors)), inplace, bool(outs) and not fresh,
                       flops=_flops(func, args, kwargs, out),
                       moved_bytes=sum(t.nbytes for t in in_tensors) + sum(t.nbytes for t in out_tensors))
        self.counts[name] += 1
        for s in fresh.values():
            self.producer[s] = len(self.ops)
        if inplace:
            for s in outs:
                if s in self.producer:
                    self.ops[self.producer[s]].mutated = True
        self.ops.append(rec)
        return out

    def returned(self, out: Any) -> None:
        """Mark the ops whose outputs the block returns (Note [Block options], 3)."""
        for t in tree_flatten(out)[0]:
            s = _storage(t) if isinstance(t, torch.Tensor) else None
            if s is not None and s in self.producer:
                self.ops[self.producer[s]].escapes = True

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        """A ``saved_tensors_hooks`` pack: credit the saved storage to the op that made it, once."""
        s = _storage(t)
        if s is not None and s in self.producer and s not in self.saved:
            self.saved[s] = True
            self.ops[self.producer[s]].saved_bytes += s.nbytes()
        return t


# ---- one block ---------------------------------------------------------------------------------------


@dataclass
class _BlockCall:
    module: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def fresh(self) -> tuple[tuple[Any, ...], dict[str, Any], torch.Tensor]:
        """The captured call with a new leaf hidden state that requires grad."""
        carry, key = split_carry(self.module, self.args, self.kwargs)
        if not isinstance(carry, torch.Tensor):
            raise ProfileError(f"remat.add_options: block {type(self.module).__name__} does not take a tensor"
                               " hidden state; it cannot have selective options")
        x = carry.detach().clone().requires_grad_(carry.is_floating_point())
        if key == 0:
            return (x, *self.args[1:]), dict(self.kwargs), x
        return tuple(self.args), {**self.kwargs, key: x}, x


def _forward(call: _BlockCall, args: tuple[Any, ...], kwargs: dict[str, Any],
             context_fn: Callable[[], tuple[Any, Any]] | None) -> Any:
    """The block's forward: plain, or in a non-reentrant checkpoint with ``context_fn``."""
    if context_fn is None:
        return call.module(*args, **kwargs)
    return checkpoint(call.module, *args, use_reentrant=False, context_fn=context_fn, **kwargs)


def _backward(call: _BlockCall, x: torch.Tensor, y: torch.Tensor, grad: torch.Tensor) -> Any:
    """The gradients of ``y`` (seeded with ``grad``) for the hidden state ``x`` and the block's parameters."""
    wrt = [x, *(p for p in call.module.parameters() if p.requires_grad)]
    return torch.autograd.grad(y, wrt, grad, allow_unused=True)


def _grad_step(call: _BlockCall, context_fn: Callable[[], tuple[Any, Any]] | None,
               sync: Callable[[], None] = lambda: None) -> float:
    """The block's forward and backward (plain, or in a checkpoint with ``context_fn``); no ``.grad``
    is touched (``autograd.grad``). Returns the seconds of the forward."""
    args, kwargs, x = call.fresh()
    sync()
    start = time.perf_counter()
    out = _forward(call, args, kwargs, context_fn)
    sync()
    forward = time.perf_counter() - start
    y = carry_of(out)
    _backward(call, x, y, torch.ones_like(y))
    return forward


def block_ops(call: _BlockCall, repeats: int) -> list[OpRecord]:
    """The ops of the block's recording forward (times: the fastest of ``repeats`` runs)."""
    runs: list[list[OpRecord]] = []
    for _ in range(max(1, repeats)):
        args, kwargs, _x = call.fresh()
        rec = OpRecorder()
        with rec, torch.autograd.graph.saved_tensors_hooks(rec.pack, lambda t: t):
            out = call.module(*args, **kwargs)
        rec.returned(out)
        del out
        runs.append(rec.ops)
    first = runs[0]
    if any([o.key for o in r] != [o.key for o in first] for r in runs):
        raise ProfileError(f"remat.add_options: block {type(call.module).__name__} ran different ops in two"
                           " identical forwards; it cannot have selective options")
    for k, op in enumerate(first):
        op.time_s = min(r[k].time_s for r in runs)
    return first


def _compact(chosen: Sequence[OpRecord], ops: Sequence[OpRecord]) -> tuple[str, ...]:
    """``save`` entries: an op's bare name when every call of it is chosen, ``name#k`` otherwise."""
    keys = {o.key for o in chosen}
    out: list[str] = []
    for name in dict.fromkeys(o.name for o in chosen):
        calls = [o.key for o in ops if o.name == name]
        out += [name] if all(c in keys for c in calls) else [c for c in calls if c in keys]
    return tuple(out)


def candidates(ops: Sequence[OpRecord], cuts: Sequence[float] = (0.25, 0.5, 0.75)) -> dict[str, tuple[str, ...]]:
    """Named save sets (Note [Block options], 3), distinct and non-empty."""
    savable = [o for o in ops if o.savable]
    out = {
        "sac": _compact([o for o in savable if o.name in SAC_OPS], ops),
        "matmul": _compact([o for o in savable if o.name in MATMUL_OPS], ops),
    }
    ranked = sorted(savable, key=lambda o: o.estimate_s() / o.out_bytes, reverse=True)
    total = sum(o.out_bytes for o in ranked)
    for share in cuts:
        taken, size = [], 0
        for o in ranked:
            if size >= share * total:
                break
            taken.append(o)
            size += o.out_bytes
        out[f"cut{round(100 * share)}"] = _compact(taken, ops)
    seen: set[frozenset[str]] = set()
    unique = {}
    for name, save in out.items():
        if save and frozenset(save) not in seen:
            seen.add(frozenset(save))
            unique[name] = save
    return unique


@dataclass(frozen=True)
class _Measured:
    """An option as measured on one block: raw bytes (the plain record's too) and seconds."""

    name: str
    save: tuple[str, ...]
    kept_bytes: int
    fwd_transient_bytes: int
    recompute_s: float
    bwd_extra_bytes: int = 0  # the block's backward peak above a plain record's


def _kept(call: _BlockCall, save: tuple[str, ...] | None) -> tuple[int, int, int]:
    """``(kept, forward peak above kept, backward peak)`` of the block: plain (``save`` None) or in a
    checkpoint with the option's policy, measured by storage tracking (the input is not counted). The
    backward peak is the highest live total while the block's backward runs (its recomputation
    included), the gradient of its output and what the first pass kept counted in."""
    args, kwargs, x = call.fresh()
    with MemoryTracker() as t, set_checkpoint_early_stop(False):  # recomputed to the end, as a plan does
        out = _forward(call, args, kwargs, None if save is None else _context_fn(save))
        kept, peak = t.live_bytes, t.peak_bytes
        y = carry_of(out)
        grad = torch.ones_like(y)
        t.reset_peak()
        grads = _backward(call, x, y, grad)
        backward = t.peak_bytes
    del out, y, grad, grads
    return kept, peak - kept, backward


def _context_fn(save: tuple[str, ...]) -> Callable[[], tuple[Any, Any]]:
    return lambda: selective_contexts(save)


#: The name under which :func:`_extra_times` reports a plain checkpoint of the block (a one-block region).
REGION = "<region>"
#: The name under which it reports the plain block's forward alone (the same rounds).
FORWARD = "<forward>"


def _extra_times(call: _BlockCall, saves: dict[str, tuple[str, ...]], repeats: int) -> dict[str, list[float]]:
    """Per-round samples: under ``""`` the plain block's forward and backward, under :data:`FORWARD` its
    forward alone (the same run), under :data:`REGION` and each option's name the block's forward and
    backward with it less the plain run of the same round, as a share of that plain run. ``repeats``
    rounds, the order rotated each round, one untimed round first. Recomputation runs to the block's end
    (early stop off), as a plan's does."""
    runs: list[tuple[str, Callable[[], tuple[Any, Any]] | None]] = [("", None), (REGION, noop_context_fn)]
    runs += [(name, _context_fn(save)) for name, save in saves.items()]
    times: dict[str, list[float]] = defaultdict(list)
    forwards: list[float] = []
    on_cuda = [*call.module.parameters(), *tensors_in((call.args, call.kwargs))]
    sync = torch.cuda.synchronize if any(t.is_cuda for t in on_cuda) else (lambda: None)
    with set_checkpoint_early_stop(False):
        for rep in range(max(1, repeats) + 1):
            k = rep % len(runs)  # rotated: no run always follows the same one
            for name, fn in [*runs[k:], *runs[:k]]:
                sync()
                start = time.perf_counter()
                forward = _grad_step(call, fn, sync)
                sync()
                if rep:
                    times[name].append(time.perf_counter() - start)
                    if not name:
                        forwards.append(forward)
    plain = times[""]
    # Shares of the plain run of the same round: the machine's load changes between rounds, and shares
    # of one round do not.
    return {"": plain, FORWARD: [f / p for f, p in zip(forwards, plain)],
            **{name: [(t - p) / p for t, p in zip(times[name], plain)] for name, _ in runs[1:]}}


def _pareto(measured: list[_Measured], record_kept: int) -> list[_Measured]:
    """Options no other option (nor the plain record: ``record_kept`` bytes, no extra time) dominates."""
    keep = []
    for o in measured:
        if o.kept_bytes >= record_kept:
            continue
        if any(p is not o and p.kept_bytes <= o.kept_bytes and p.recompute_s <= o.recompute_s
               and (p.kept_bytes, p.recompute_s) != (o.kept_bytes, o.recompute_s) for p in measured):
            continue
        keep.append(o)
    return sorted(keep, key=lambda o: o.kept_bytes)


@dataclass(frozen=True)
class _BlockFigures:
    record_kept: int  # bytes a plain record keeps, measured as the options' are
    region_s: float  # what a one-block region adds, measured as the options' times are
    options: list[_Measured]
    plain_s: float  # the plain block's forward and backward, measured the same way


def saved_keys(save: Sequence[str], ops: Sequence[OpRecord]) -> frozenset[str]:
    """The ``name#k`` keys of the calls a save set keeps (a bare name: every call of the op)."""
    names = set(save)
    return frozenset(o.key for o in ops if o.key in names or o.name in names)


def _block_options(call: _BlockCall, repeats: int, cuts: Sequence[float], rounds: int | None = None,
                   ) -> _BlockFigures:
    """The block's Pareto options, with the plain record's bytes and a region's time beside them.

    An option's time is the time of the ops it recomputes plus the policy's overhead, one figure for
    the block: the median, over every option and timed round, of measured time less recomputed ops'
    time. Measured option times differ from each other by less than a shared machine's noise (one
    attention op); the sum keeps an option that saves more ops never slower than one that saves fewer.
    The ops' times, recorded in runs of their own, are used as shares of the plain forward timed in the
    same rounds as the options (a loaded machine can stretch the recorded runs many times over). A
    region's time is measured, never below the plain forward (every op must run again). ``rounds``:
    timed rounds of the options (``repeats`` when None)."""
    ops = block_ops(call, repeats)
    saves = candidates(ops, cuts)
    record_kept, _, record_bwd = _kept(call, None)
    shares = _extra_times(call, saves, repeats if rounds is None else rounds)
    base = min(shares[""])  # the plain block's fastest run
    forward = base * statistics.median(shares[FORWARD])
    keys = {name: saved_keys(save, ops) for name, save in saves.items()}
    per_op_s = forward / max(1e-12, sum(o.time_s for o in ops))
    recomputed = {name: per_op_s * sum(o.time_s for o in ops if o.key not in keys[name]) for name in saves}
    # The policy's overhead, pooled over every option and round: one median of many samples (each a
    # difference of two runs on a shared machine) rather than a median of per-option medians of few.
    pooled = [base * x - recomputed[n] for n in saves for x in shares[n]]
    overhead = max(0.0, statistics.median(pooled)) if pooled else 0.0
    measured = []
    for name, save in saves.items():
        kept, transient, backward = _kept(call, save)
        measured.append(_Measured(name, save, kept, transient, recomputed[name] + overhead,
                                  max(0, backward - record_bwd)))
    region_s = max(base * statistics.median(shares[REGION]), forward)
    return _BlockFigures(record_kept, region_s, _pareto(measured, record_kept), base)


# ---- the model -----------------------------------------------------------------------------------------


def _detached(value: Any) -> Any:
    """``value`` with each tensor that is part of an autograd graph (a non-leaf: a tensor cached by the model
    from an earlier forward with autograd) replaced by a detached leaf that requires grad as it did. A
    block run twice on it would otherwise backward through that graph twice (Note [Block options], 1)."""

    def leaf(t: torch.Tensor) -> torch.Tensor:
        if t.grad_fn is None:
            return t
        return t.detach().requires_grad_(t.requires_grad)

    return tree_map_only(torch.Tensor, leaf, value)


def _capture(model: nn.Module, example_inputs: Any, blocks: Sequence[tuple[str, nn.Module]]) -> dict[str, _BlockCall]:
    """Each block's first call in one forward of the model without autograd (Note [Block options], 1)."""
    calls: dict[str, _BlockCall] = {}
    handles = []
    for name, mod in blocks:

        def hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], name: str = name) -> None:
            if name not in calls:
                calls[name] = _BlockCall(m, tuple(_detached(args)), dict(_detached(kwargs)))

        handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
    args, kwargs = as_call(example_inputs)
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return calls


def _signature(call: _BlockCall) -> str:
    """Same for blocks that run the same ops on the same sizes: class, structure, parameters, arguments,
    and the ops of one recording forward with their sizes (two blocks of one class can run different
    ops: a Swin block with a shifted window rolls its input and masks its attention)."""
    m = call.module
    parts = [type(m).__qualname__, repr(m)]
    parts += [f"{o.key}:{o.out_bytes}:{o.saved_bytes}:{o.savable}" for o in block_ops(call, 1)]
    parts += [f"{n}:{tuple(p.shape)}:{p.dtype}:{p.requires_grad}" for n, p in m.named_parameters()]
    for where, value in [*enumerate(call.args), *call.kwargs.items()]:
        tensors = tensors_in(value)
        shown = [f"{tuple(t.shape)}:{t.dtype}" for t in tensors] if tensors else [repr(value)]
        parts.append(f"{where}={shown}")
    return hashlib.sha1("|".join(parts).encode()).hexdigest()


class _Untouched:
    """Restores the RNG and the modules' buffers (running statistics) after the options are measured."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.buffers = [b for m in modules for b in m.buffers()]
        self.devices = sorted({b.device.index or 0 for m in modules for b in m.parameters() if b.is_cuda})
        self.saved: list[torch.Tensor] = []
        self.rng: Any = None

    def __enter__(self) -> None:
        self.saved = [b.detach().clone() for b in self.buffers]
        self.rng = torch.random.fork_rng(devices=self.devices)
        self.rng.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.rng.__exit__(*exc)
        with torch.no_grad():
            for b, v in zip(self.buffers, self.saved):
                b.copy_(v)


def _time_scale(stage: Stage, fig: _BlockFigures) -> float | None:
    """The factor from the block's own runs to the profile's times (Note [Block options], 4): its forward
    and backward in the profile over the same, run alone; None without both figures."""
    if stage.fwd_s <= 0 or stage.bwd_s <= 0 or fig.plain_s <= 0:
        return None
    return (stage.fwd_s + stage.bwd_s) / fig.plain_s


def _scales(stages: Sequence[Stage], figs: dict[int, _BlockFigures]) -> dict[int, float]:
    """Each block's time scale; the median of all where a block's own is missing or more than 2x off it
    (a backward window that holds the glue's after the block, a time at the floor)."""
    own = {i: _time_scale(stages[i], fig) for i, fig in figs.items()}
    known = [v for v in own.values() if v is not None]
    if not known:
        return dict.fromkeys(figs, 1.0)
    mid = statistics.median(known)
    return {i: v if v is not None and mid / 2 <= v <= 2 * mid else mid for i, v in own.items()}


def _figures_of(call: _BlockCall, name: str, repeats: int, cuts: Sequence[float], rounds: int | None = None,
                ) -> _BlockFigures | str:
    """The block's figures, or why it cannot have options (said once, as a warning): the block takes no
    tensor hidden state, runs different ops in two identical forwards, or cannot run alone on its captured
    inputs or in a checkpoint (it reads or writes state outside its arguments)."""
    try:
        return _block_options(call, repeats, cuts, rounds)
    except Exception as e:  # any failure of the block run alone leaves it without options, said why
        first = (str(e).strip().splitlines() or [""])[0]
        reason = first if isinstance(e, ProfileError) else f"running it alone raised {type(e).__name__}: {first}"
        log.warning("remat.add_options: block %s (%s) gets no selective options (plans keep or recompute it"
                    " whole): %s", name, type(call.module).__name__, reason)
        return reason


#: Identical blocks share one measurement of their options, timed over their pooled share of rounds:
#: ``repeats`` per block, up to this many times ``repeats``.
POOLED_ROUNDS = 4


def _measured(prof: Profile, calls: dict[str, _BlockCall], names: Sequence[str], repeats: int,
              cuts: Sequence[float]) -> tuple[dict[int, _BlockFigures], dict[str, str], int]:
    """Per stage index, the figures of its block (identical blocks measured once); per block name, why it
    has none; how many blocks were measured."""
    index = {name: i for i, name in enumerate(prof.names)}
    signatures: dict[str, str] = {}
    for name in names:
        i = index.get(name)
        if i is None or not prof.stages[i].checkpointable or name not in calls:
            continue
        try:
            signatures[name] = _signature(calls[name])
        except Exception:  # _figures_of says why the block cannot run alone
            signatures[name] = name
    group = Counter(signatures.values())
    shared: dict[str, _BlockFigures | str] = {}
    skipped: dict[str, str] = {}
    figs: dict[int, _BlockFigures] = {}
    for name, sig in signatures.items():
        if sig not in shared:
            rounds = repeats * min(group[sig], POOLED_ROUNDS)
            shared[sig] = _figures_of(calls[name], name, repeats, cuts, rounds)
        fig = shared[sig]
        if isinstance(fig, str):
            skipped[name] = fig
        else:
            figs[index[name]] = fig
    return figs, skipped, len(shared)


def add_options(prof: Profile, model: nn.Module, example_inputs: Any, *, stages: Sequence[str] | None = None,
                repeats: int = 5, cuts: Sequence[float] = (0.25, 0.5, 0.75), region_times: bool = True,
                autocast: Any = None) -> Profile:
    """``prof`` with selective options on its blocks (:attr:`remat.Stage.options`), measured on ``model``.

    Args:
        prof: the model's profile (from :func:`remat.profile` with the same ``stages``).
        model, example_inputs: as given to :func:`remat.profile`; the model is left as it was (its
            parameters' ``.grad``, buffers and the RNG untouched). A Hugging Face model runs without its
            KV cache, as a plan runs it.
        stages: explicit block names, as given to :func:`remat.profile`.
        repeats: timed rounds per figure (interleaved; Note [Block options], 4).
        cuts: the greedy cuts to try, as shares of the block's savable bytes.
        region_times: also set each block's ``fwd_region_s`` from the same runs as its options' times
            (a plain one-block checkpoint against the plain block), so that the planner compares
            regions and options on one scale.
        autocast: as given to :func:`remat.profile`; blocks run under it with its cache off, as a
            planned model runs (Note [The step that runs] in :mod:`remat.runtime.step`).

    Each option's ``kept_bytes`` is the stage's ``xbar_bytes`` less what the option saves over a plain
    record, both measured the same way (Note [Block options], 4). A block that cannot have options (no
    tensor hidden state, different ops in two identical forwards, or a failure when run alone on its
    captured inputs) keeps ``options=()``, with a warning; ``meta["options_skipped"]`` says why, per block.

    Raises:
        ProfileError: ``repeats`` below 1.
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ProfileError(f"remat.add_options: repeats={repeats!r} must be a positive int (timed runs per figure)")
    blocks, _ = find_stages(model, stages, inputs=as_call(example_inputs))
    ac = autocast_for(model, autocast, "remat.add_options")
    with suspended(model), hf.cache_off(model), _Untouched([model]), training(model), \
            ac.forward() if ac is not None else contextlib.nullcontext():
        calls = _capture(model, example_inputs, blocks)
        figs, skipped, profiled = _measured(prof, calls, [name for name, _ in blocks], repeats, cuts)
    scales = _scales(prof.stages, figs)
    new = list(prof.stages)
    for i, fig in figs.items():
        s, scale = new[i], scales[i]
        options = tuple(BlockOption(o.name, o.save, max(0, s.xbar_bytes - (fig.record_kept - o.kept_bytes)),
                                    o.recompute_s * scale, o.fwd_transient_bytes, o.bwd_extra_bytes)
                        for o in fig.options)
        new[i] = dataclasses.replace(s, options=options, fwd_region_s=fig.region_s * scale if region_times
                                     else s.fwd_region_s)
    meta = {**prof.meta, "options_profiled_blocks": profiled, "options_skipped": skipped,
            "options_time_scale": {prof.stages[i].name: round(v, 4) for i, v in scales.items()}}
    return dataclasses.replace(prof, stages=tuple(new), meta=meta)
