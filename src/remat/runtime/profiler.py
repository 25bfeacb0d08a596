"""Profile a model as a chain of stages: per-stage sizes (exact) and times (measured or estimated).

One training step is run with hooks at every stage boundary — forward pre/post hooks on the blocks,
tensor hooks on the gradients that flow between them — while :class:`remat.MemoryTracker` counts live
bytes. The live bytes and window peaks at the boundaries give each stage's numbers in the cost model
(docs/cost-model.md). Timed runs repeat the step without the tracker and report medians. On the meta
device nothing is allocated or timed: times are estimated from FLOPs and bytes moved against a
throughput figure for the target device.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import statistics
import sys
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from remat.errors import ProfileError, RematError
from remat.planning.plan import Item, Record, Region
from remat.planning.profile import Profile, Stage
from remat.planning.simulate import simulate
from remat.runtime.measure import MemoryTracker, reset_grads
from remat.runtime.model import (
    GLUE,
    HEAD,
    PROLOGUE,
    as_call,
    carry_of,
    extras_of,
    find_stages,
    input_shapes,
    input_signature,
    loss_function,
    model_signature,
    same_extras,
    split_carry,
    tensors_in,
)
from remat.runtime.regions import Runner, suspended

__all__ = ["THROUGHPUTS", "Throughput", "profile"]

MIN_TIME_S = 1e-7


@dataclass(frozen=True)
class Throughput:
    """What a device achieves, for estimating times on the meta device: per op,
    ``max(flops / flops_per_s, bytes / bytes_per_s)``."""

    flops_per_s: float
    bytes_per_s: float


#: Achievable rates (about 60% of peak dense bf16 FLOP/s and 80% of memory bandwidth on GPUs).
THROUGHPUTS: dict[str, Throughput] = {
    "h200": Throughput(0.6 * 989e12, 0.8 * 4.8e12),
    "h100": Throughput(0.6 * 989e12, 0.8 * 3.35e12),
    "a100": Throughput(0.6 * 312e12, 0.8 * 2.0e12),
    "l4": Throughput(0.6 * 121e12, 0.8 * 0.3e12),
    "cpu": Throughput(1e11, 2e10),
}


class _Tracked(MemoryTracker):
    """The tracker, plus a roofline time estimate per op."""

    def __init__(self, throughput: Throughput | None) -> None:
        super().__init__(count_flops=throughput is not None)
        self.throughput = throughput
        self.est_s = 0.0

    def _count(self, func: Any, out: Any, args: Any, kwargs: Any, flat_out: list[torch.Tensor]) -> None:
        f0, b0 = self.flops, self.bytes_moved
        super()._count(func, out, args, kwargs, flat_out)
        assert self.throughput is not None
        self.est_s += max((self.flops - f0) / self.throughput.flops_per_s,
                          (self.bytes_moved - b0) / self.throughput.bytes_per_s)


@dataclass
class _Event:
    label: str  # start, pre, post, bwd_head, bwd, end
    index: int
    t: Any
    live: int = 0
    peak: int = 0
    flops: float = 0.0
    est_s: float = 0.0
    ops: int = 0  # ops run in the window that ends here


def _ref(storage: Any) -> Any:
    try:
        return weakref.ref(storage)
    except TypeError:
        return None


def _dead(ref: Any) -> bool:
    return ref is not None and ref() is None


class _Timeline:
    """Hooks at stage boundaries that log (time, live bytes, window peak) as the step runs."""

    def __init__(self, blocks: Sequence[nn.Module], tracker: _Tracked | None, cuda: bool) -> None:
        self.blocks = blocks
        self.tracker = tracker
        self.cuda = cuda
        self.events: list[_Event] = []
        self.x_bytes: list[int | None] = [None] * len(blocks)
        self.head_x_bytes = 0
        self.joins: list[bool] = [False] * len(blocks)
        self.shapes: list[tuple[int, ...] | None] = [None] * len(blocks)
        self._extras: list[Any] = [None] * len(blocks)
        self._prev_ids: tuple[int, int, bool] | None = None
        self._handles: list[Any] = []
        self._ran: set[int] = set()
        self._ops_seen = 0
        # Glue (code between blocks k-1 and k): whether block k-1's input and output storages were
        # freed by the time block k starts, and the bytes of block k-1's output.
        self._in_ref: list[Any] = [None] * len(blocks)
        self._in_version: list[Any] = [None] * len(blocks)
        self._out_ref: list[Any] = [None] * len(blocks)
        self.out_bytes: list[int] = [0] * len(blocks)
        self.in_freed_by_glue: list[bool] = [False] * len(blocks)
        self.out_freed_by_glue: list[bool] = [False] * len(blocks)
        self._done: set[int] = set()
        # Which storages each window saved for backward: "prologue", block k, or ("after", k).
        self.window: Any = "prologue"
        self.saved_by: dict[Any, set[int]] = {}
        self.carry_storage: list[int | None] = [None] * len(blocks)
        self.out_storage: list[int | None] = [None] * len(blocks)
        self.pinned: set[int] = set()
        self._last_out: Any = lambda: None
        self.output_held = False  # the last block's output still live at the end of the step

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            self.saved_by.setdefault(self.window, set()).add(id(t.untyped_storage()))
        except (RuntimeError, NotImplementedError):
            pass
        return t

    def mark(self, label: str, index: int = -1) -> None:
        if label == "end":
            self.output_held = self._last_out() is not None
        if self.cuda:
            t: Any = torch.cuda.Event(enable_timing=True)
            t.record()
        else:
            t = time.perf_counter()
        ev = _Event(label, index, t)
        tr = self.tracker
        if tr is not None:
            ev.live, ev.peak = tr.live_bytes, tr.peak_bytes
            ev.flops, ev.est_s = tr.flops, tr.est_s
            ev.ops, self._ops_seen = tr.ops - self._ops_seen, tr.ops
            tr.reset_peak()
            tr.flops, tr.est_s = 0.0, 0.0
        self.events.append(ev)

    def __enter__(self) -> _Timeline:
        for k, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(self._pre(k), with_kwargs=True))
            self._handles.append(block.register_forward_hook(self._post(k)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _pre(self, k: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if k in self._ran:  # a recomputation in backward, not the forward being profiled
                return
            self._ran.add(k)
            self.mark("pre", k)
            self.window = k
            carry, key = split_carry(module, args, kwargs)
            if not isinstance(carry, torch.Tensor):
                raise ProfileError(
                    f"remat.profile: stage {k} ({type(module).__name__}) did not receive a tensor as its first"
                    f" argument (got {type(carry).__name__}); remat chains blocks through their first input"
                )
            self.x_bytes[k] = carry.untyped_storage().nbytes()
            self.carry_storage[k] = id(carry.untyped_storage())
            if k > 0:
                self.in_freed_by_glue[k - 1] = _dead(self._in_ref[k - 1])
                self.out_freed_by_glue[k - 1] = _dead(self._out_ref[k - 1])
            self._in_ref[k] = _ref(carry.untyped_storage())
            self._in_version[k] = (weakref.ref(carry), carry._version)
            self.shapes[k] = tuple(carry.shape)
            extras = extras_of(args, kwargs, key)
            prev = self._prev_ids
            handed = prev is not None and (id(carry) == prev[0] if prev[2] else id(carry) == prev[1])
            if k > 0 and (k - 1) not in self._ran:
                raise ProfileError(
                    f"remat.profile: stage {k - 1} ({type(self.blocks[k - 1]).__name__}) did not run before stage {k}"
                    f" ({type(module).__name__}) in the profiled step (a block"
                    " skipped at run time, e.g. LayerDrop, or a conditional branch). Profile with every block"
                    " running (e.g. config.layerdrop=0 while profiling): the profile then sees the random draw"
                    " between blocks and plans them in separate regions, which a skipped block does not break."
                )
            self.joins[k] = k > 0 and handed and same_extras(extras, self._extras[k - 1])
            self._extras[k] = extras
            if carry.requires_grad and torch.is_grad_enabled():
                carry.register_hook(lambda g: self.mark("bwd", k))

        return hook

    def _post(self, k: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if k in self._done:
                return
            self._done.add(k)
            if self._in_version[k] is not None and self._in_version[k][0]() is not None:
                carry_ref, version = self._in_version[k]
                if carry_ref()._version != version:
                    raise ProfileError(
                        f"remat.profile: stage {k} ({type(module).__name__}) modifies its input in place, so it"
                        " cannot be checkpointed on its own; leave it out of stages=[...] (it then runs as code"
                        " between the stages around it), or make it not in place"
                    )
            self.mark("post", k)
            self.window = ("after", k)
            c = carry_of(out)
            self._prev_ids = (id(out), id(c), isinstance(out, torch.Tensor))
            if isinstance(c, torch.Tensor):
                self.out_storage[k] = id(c.untyped_storage())
                self.out_bytes[k] = c.untyped_storage().nbytes()
                self._out_ref[k] = _ref(c.untyped_storage())
            if k == len(self.blocks) - 1 and isinstance(c, torch.Tensor):
                self.head_x_bytes = c.untyped_storage().nbytes()
                self._last_out = weakref.ref(c.untyped_storage())
                if c.requires_grad and torch.is_grad_enabled():
                    c.register_hook(lambda g: self.mark("bwd_head", k))

        return hook

    # ---- reading the log -----------------------------------------------------------------------
    def last_input_freed(self) -> int:
        """Bytes of the last block's input released once it has run: nobody saved them (the block, its
        producer, or the code between them) and they are not the model's input."""
        n = len(self.blocks)
        sid = self.carry_storage[n - 1]
        if sid is None or sid in self.pinned:
            return 0
        windows = [n - 1, n - 2 if n >= 2 else "prologue", ("after", n - 2)]
        if any(sid in self.saved_by.get(w, ()) for w in windows):
            return 0
        return self.x_bytes[n - 1] or 0

    def output_released(self, k: int) -> bool:
        """Whether block k's output is gone by its backward: block k did not save it (k = -1: the
        prologue, whose output is block 0's input), and it is not the model's input."""
        sid = self.carry_storage[0] if k < 0 else self.out_storage[k]
        saved = self.saved_by.get("prologue" if k < 0 else k, ())
        return sid is not None and sid not in self.pinned and sid not in saved

    def check(self, names: Sequence[str]) -> None:
        order = [e.index for e in self.events if e.label == "pre"]
        if order != list(range(len(self.blocks))):
            ran = ", ".join(names[i] for i in order[:8])
            raise ProfileError(
                f"remat.profile: the stages did not each run once, in order, in one forward (ran: {ran}"
                f"{', ...' if len(order) > 8 else ''}; expected {len(self.blocks)} stages {names[0]} ..."
                f" {names[-1]}). Pass stages=[...] in execution order, or use a model whose blocks run once."
            )

    def durations(self) -> dict[tuple[str, int], float]:
        """Seconds of the window that ends at each event, keyed by (label, index)."""
        if self.cuda:
            torch.cuda.synchronize()
        out = {}
        for a, b in zip(self.events, self.events[1:]):
            dt = a.t.elapsed_time(b.t) / 1e3 if self.cuda else b.t - a.t
            out[(b.label, b.index)] = dt
        return out

    def by_key(self) -> dict[tuple[str, int], tuple[_Event, _Event]]:
        """(previous event, event) for each event."""
        return {(b.label, b.index): (a, b) for a, b in zip(self.events, self.events[1:])}


def _progress(enabled: bool, total: int) -> Callable[[str], None]:
    state = {"n": 0}
    interactive = enabled and sys.stderr.isatty()

    def tick(what: str) -> None:
        state["n"] += 1
        if not enabled:
            return
        n = state["n"]
        bar = "#" * int(24 * n / total)
        line = f"remat.profile [{bar:<24}] {n}/{total} {what}"
        if interactive:
            sys.stderr.write("\r" + line.ljust(72) + ("\n" if n == total else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    return tick


@contextlib.contextmanager
def _preserved(model: nn.Module, cuda: bool) -> Iterator[None]:
    """Leave the model as profiling found it: gradients, buffers (BatchNorm statistics), RNG state."""
    grads = {p: (p.grad.detach().clone() if p.grad is not None else None) for p in model.parameters()}
    buffers = {b: b.detach().clone() for b in model.buffers()}
    devices = [torch.cuda.current_device()] if cuda else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for p, g in grads.items():
                    p.grad = g
                for b, v in buffers.items():
                    b.copy_(v)


@contextlib.contextmanager
def _flash_attention_on_meta() -> Iterator[None]:
    """Note: [Attention on meta] On the meta device ``scaled_dot_product_attention`` takes its math path,
    which materialises the (seq x seq) attention matrix; GPUs run a fused (flash) kernel that keeps only
    the output and a log-sum-exp. To plan for a GPU, the meta profile routes attention to PyTorch's fused
    CPU flash kernel, whose meta implementation has the same memory behaviour. The function is swapped
    for the profile's duration (a function mode would not reach the recomputation in backward)."""
    original = torch.nn.functional.scaled_dot_product_attention

    def sdpa(query: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if query.device.type == "meta":
            return _flash(query, *args, **kwargs)
        return original(query, *args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def _flash(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
           dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
           enable_gqa: bool = False) -> torch.Tensor:
    # Grouped-query attention: fused kernels read the shared key/value heads without copying them, and
    # the meta kernel of the fused CPU op only needs the query's shape, so keys and values pass as they are.
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = None if is_causal else attn_mask
    out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal or (attn_mask is None and query.shape[-2] == key.shape[-2]),
        attn_mask=attn_mask if attn_mask is not None and attn_mask.dtype != torch.bool else None, scale=scale,
    )[0]
    return out


def _fake_copy(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
               stack: contextlib.ExitStack) -> tuple[nn.Module, tuple[Any, ...], dict[str, Any]]:
    """A copy of the model whose parameters are fake meta tensors, and fake inputs; enters the modes.

    Note: [Why FakeTensorMode] Plain meta tensors fail on data-dependent checks (``.item()``) that
    models run, e.g. transformers' packed-sequence detection; under FakeTensorMode such code takes its
    tracing path. Sizes, and so every byte count, are the same.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=False)
    fake_model = copy.deepcopy(model)
    # One fake tensor per real one, so tied weights stay tied and an input passed twice is one storage.
    memo: dict[int, Any] = {}

    def fake(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        if id(t) not in memo:
            f = mode.from_tensor(t.detach().to("meta"))
            memo[id(t)] = nn.Parameter(f, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else f
        return memo[id(t)]

    for mod in fake_model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[name] = fake(p)
        for name, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[name] = fake(b)
    args = torch.utils._pytree.tree_map(fake, args)
    kwargs = torch.utils._pytree.tree_map(fake, kwargs)
    stack.enter_context(mode)
    stack.enter_context(_flash_attention_on_meta())
    return fake_model, args, kwargs


@contextlib.contextmanager
def _every_block_checkpointed(model: nn.Module, blocks: Sequence[nn.Module], names: Sequence[str]) -> Iterator[None]:
    """Run the model with every block its own checkpoint region (for calibration, see _assemble)."""
    n = len(blocks)
    items: tuple[Item, ...] = (Record(0), *(Region(k, k + 1, (Record(k),)) for k in range(1, n + 1)), Record(n + 1))
    runner = Runner(model, dict(enumerate(blocks, start=1)), items, (PROLOGUE, *names, HEAD))
    runner.install()
    try:
        yield
    finally:
        runner.uninstall()


def _to_device(obj: Any, device: str) -> Any:
    return torch.utils._pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, obj)


def profile(
    model: nn.Module,
    example_inputs: Any,
    *,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    stages: Sequence[str] | None = None,
    device: str | None = None,
    warmup: int = 1,
    repeats: int = 3,
    throughput: Throughput | str | None = None,
    progress: bool = False,
) -> Profile:
    """Profile one training step of ``model`` as a chain of stages.

    Stages are found as (1) ``stages=[names]``, (2) the children of an ``nn.Sequential`` (nested ones
    flattened), or (3) the blocks of the largest ``ModuleList`` of one block type (transformers). What
    runs before the first block is the prologue stage, what runs after the last one — loss included —
    the head stage; neither is checkpointed.

    Args:
        model: in training mode (dropout active, as when training).
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs
            (e.g. ``{"input_ids": ids, "labels": ids}`` for a transformers model).
        loss_fn: ``loss_fn(output) -> scalar``; by default ``output.loss`` (transformers with labels),
            a scalar output itself, or ``output.sum()``.
        stages: explicit submodule names, in execution order.
        device: ``"meta"`` to profile without allocating (a meta copy of the model is made if needed;
            times are estimated); default: where the model is.
        warmup, repeats: untimed runs first, then timed runs (medians).
        throughput: for estimated times: a :class:`Throughput` or a name in :data:`THROUGHPUTS`
            (default ``"h100"`` on meta). Given on a real device, FLOPs are counted too.
        progress: show a progress bar on stderr.

    Returns:
        A :class:`remat.Profile`. ``profile.meta["measured_peak_bytes"]`` is the exact peak of the
        profiled step.

    Raises:
        ProfileError: no chain can be found, or the stages do not run once each, in order.
    """
    if not isinstance(model, nn.Module):
        raise ProfileError(f"remat.profile: model must be a torch.nn.Module, got {type(model).__name__}")
    args, kwargs = as_call(example_inputs)
    params = list(model.parameters())
    model_device = params[0].device.type if params else "cpu"
    device = device or model_device
    meta = device == "meta"
    if device != model_device and not meta:
        raise ProfileError(
            f"remat.profile: the model is on {model_device} but device={device!r}; move the model first,"
            " or pass device='meta' to profile without allocating"
        )
    with contextlib.ExitStack() as stack:
        stack.enter_context(suspended(model))  # a planned model is profiled as the plain model
        if meta:
            model, args, kwargs = _fake_copy(model, args, kwargs, stack)
        else:
            args, kwargs = _to_device(args, device), _to_device(kwargs, device)
            stack.enter_context(_preserved(model, cuda=device.startswith("cuda")))
        prof = _profile(model, args, kwargs, loss_fn=loss_fn, stages=stages, device=device, warmup=warmup,
                        repeats=repeats, throughput=throughput, progress=progress)
    return _check_accounting(prof)


#: How far above the measured peak the predicted no-checkpointing peak may be (see _check_accounting).
ACCOUNTING_TOLERANCE = 0.03
#: Bytes the chain model may miss (counted as live through the whole step): this share of the peak, or
#: this many bytes on a small model (a scalar loss, a seed gradient, a boolean mask).
UNATTRIBUTED_TOLERANCE = 0.01
UNATTRIBUTED_FLOOR_BYTES = 4096


def _check_accounting(prof: Profile) -> Profile:
    """Note: [Every byte accounted] The profile measured the true peak of the step it profiled; the
    chain model, run with nothing checkpointed, must predict at least that peak (else a plan could
    exceed its budget) and at most 3% more (else plans waste budget). A few bytes the model cannot place
    in a stage (at most 1% of the peak, or 4 KiB: a scalar loss, a seed gradient) are counted as live
    through the whole step, which is safe for every plan; more than that is refused."""
    measured = int(prof.meta.get("measured_peak_bytes", 0))
    if measured <= 0:
        return prof
    predicted = simulate(prof, tuple(Record(k) for k in range(len(prof.stages)))).peak_bytes
    missing = measured - predicted
    if 0 < missing <= max(measured * UNATTRIBUTED_TOLERANCE, UNATTRIBUTED_FLOOR_BYTES):
        meta = {**prof.meta, "unattributed_bytes": missing}
        return dataclasses.replace(prof, head_residual_bytes=prof.head_residual_bytes + missing, meta=meta)
    if missing > 0 or predicted > measured * (1 + ACCOUNTING_TOLERANCE):
        where = "went unaccounted" if missing > 0 else "were counted twice"
        raise ProfileError(
            f"remat.profile: the chain model predicts a peak of {predicted:,} B without checkpointing, but the"
            f" profiled step measured {measured:,} B ({predicted / measured - 1:+.2%}): bytes {where} between"
            f" the stages {', '.join(prof.names[:4])}{' ...' if len(prof.names) > 4 else ''}. remat cannot plan"
            " this model safely as it is; name its blocks with stages=[...] so that each stage is one module"
            " the hidden state flows through."
        )
    return prof


def _profile(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *,
             loss_fn: Callable[[Any], torch.Tensor] | None, stages: Sequence[str] | None, device: str,
             warmup: int, repeats: int, throughput: Throughput | str | None, progress: bool) -> Profile:
    meta = device == "meta"
    if isinstance(throughput, str):
        if throughput not in THROUGHPUTS:
            raise RematError(f"remat.profile: unknown throughput {throughput!r}; use one of {', '.join(THROUGHPUTS)}")
        throughput = THROUGHPUTS[throughput]
    if meta and throughput is None:
        throughput = THROUGHPUTS["h100"]
    cuda = device.startswith("cuda")

    pairs, how = find_stages(model, stages)
    names = [n for n, _ in pairs]
    blocks = [m for _, m in pairs]
    get_loss = loss_function(loss_fn)
    timed_repeats = 0 if meta else repeats
    tick = _progress(progress, warmup + 3 + 3 * timed_repeats)

    def train_step(tl: _Timeline) -> None:
        # The output is held through backward, as in `out = model(x); loss_fn(out).backward()`: the
        # logits of a language model stay live, so the plan holds for loops that keep them.
        tl.mark("start")
        out = model(*args, **kwargs)
        loss = get_loss(out)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ProfileError(f"remat.profile: the loss must be a scalar tensor, got {type(loss).__name__}")
        loss.backward()
        tl.mark("end")
        del out, loss

    def nograd_step(tl: _Timeline) -> None:
        with torch.no_grad():
            tl.mark("start")
            model(*args, **kwargs)
            tl.mark("end")

    def tracked(step: Callable[[_Timeline], None], every: bool = False) -> _Timeline:
        tracker = _Tracked(throughput)
        tracker.track_model(model)
        tracker.track(tensors_in((args, kwargs)), "other")
        reset_grads(model)
        with contextlib.ExitStack() as stack:
            if every:
                stack.enter_context(_every_block_checkpointed(model, blocks, names))
            tl = stack.enter_context(_Timeline(blocks, tracker, False))
            stack.enter_context(tracker)
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(tl.pack, lambda t: t))
            tl.pinned = {id(t.untyped_storage()) for t in tensors_in((args, kwargs))}
            step(tl)
        tl.check(names)
        return tl

    for _ in range(warmup):
        with _Timeline(blocks, None, False) as tl:
            train_step(tl)
        tl.check(names)
        tick("warm-up")
    full = tracked(train_step)
    tick("memory, recording")
    nograd = tracked(nograd_step)
    tick("memory, no recording")
    recomputed = tracked(train_step, every=True)
    tick("memory, recomputing")

    timed: list[dict[tuple[str, int], float]] = []
    timed_ng: list[dict[tuple[str, int], float]] = []
    timed_every: list[dict[tuple[str, int], float]] = []
    for _ in range(timed_repeats):
        reset_grads(model)
        with _Timeline(blocks, None, cuda) as tl:
            train_step(tl)
        timed.append(tl.durations())
        tick("timing, recording")
        with _Timeline(blocks, None, cuda) as tl:
            nograd_step(tl)
        timed_ng.append(tl.durations())
        tick("timing, no recording")
        reset_grads(model)
        with _every_block_checkpointed(model, blocks, names), _Timeline(blocks, None, cuda) as tl:
            train_step(tl)
        timed_every.append(tl.durations())
        tick("timing, recomputing")

    if meta:
        # Estimated windows stand in for timed ones.
        timed = [{(b.label, b.index): b.est_s for b in full.events}]
        timed_ng = [{(b.label, b.index): b.est_s for b in nograd.events}]
        timed_every = [{(b.label, b.index): b.est_s for b in recomputed.events}]

    def med(runs: list[dict[tuple[str, int], float]], key: tuple[str, int]) -> float:
        vals = [r[key] for r in runs if key in r]
        return max(MIN_TIME_S, statistics.median(vals)) if vals else 0.0

    storages = {id(s): s for s in (t.untyped_storage() for t in tensors_in((args, kwargs)))}
    shapes = input_shapes(args, kwargs)
    return _assemble(
        input_shapes_of=shapes,
        model=model,
        inputs_bytes=sum(s.nbytes() for s in storages.values()),
        names=names,
        how=how,
        full=full,
        nograd=nograd,
        recomputed=recomputed,
        timed=timed,
        timed_ng=timed_ng,
        timed_every=timed_every,
        med=med,
        device=device,
        repeats=timed_repeats,
        fingerprint=f"{model_signature(model, names)}:{input_signature(args, kwargs)}",
    )


def _backward_windows(tl: _Timeline, n: int) -> dict[int, tuple[_Event, _Event]]:
    """(start event, end event) of each stage's backward window, by block index (-1: the prologue).

    Each "bwd" event ends one block's backward; the last window ("end") holds the backward of the block
    whose input needs no gradient (and so has no hook), if there is one, else the prologue's.
    """
    order = [e for e in tl.events if e.label in ("bwd_head", "bwd", "end")]
    lowest = min((e.index for e in order if e.label == "bwd"), default=n)
    return {(e.index if e.label == "bwd" else lowest - 1): (prev, e) for prev, e in zip(order, order[1:])}


def _with_glue(stages: list[Stage], full: _Timeline, ev: dict[tuple[str, int], tuple[_Event, _Event]],
               ev_ng: dict[tuple[str, int], tuple[_Event, _Event]], timed: list[dict[tuple[str, int], float]],
               timed_ng: list[dict[tuple[str, int], float]],
               med: Callable[[list[dict[tuple[str, int], float]], tuple[str, int]], float],
               names: Sequence[str]) -> list[Stage]:
    """Note: [Glue] Code the model runs between two blocks (an activation in place, a residual add in
    the parent's forward, a random draw for LayerDrop, a flatten) is a stage of its own, kind "glue": its
    bytes are counted, and since it is not a module it is never checkpointed, so the blocks around it
    never share a region (a recomputation runs the blocks of a region back to back). Its backward runs
    between the two blocks' backward and is counted in the earlier block's backward window."""
    out = [stages[0]]
    for k in range(len(names)):
        block = stages[k + 1]
        nxt = ev.get(("pre", k + 1))
        if nxt is None or nxt[1].ops == 0:
            out.append(block)
            continue
        post, pre = nxt
        x_in = full.x_bytes[k] or 0
        freed_in = x_in if full.in_freed_by_glue[k] else 0
        freed_out = full.out_bytes[k] if full.out_freed_by_glue[k] else 0
        ng = ev_ng.get(("pre", k + 1))
        glue = Stage(
            name=f"{GLUE}{names[k]}",
            x_bytes=full.out_bytes[k],
            xbar_bytes=max(0, pre.live - post.live + freed_in + freed_out),
            fwd_s=med(timed, ("pre", k + 1)),
            bwd_s=0.0,
            fwd_nograd_s=med(timed_ng, ("pre", k + 1)),
            fwd_transient_bytes=max(0, pre.peak - pre.live),
            fwd_nograd_transient_bytes=max(0, ng[1].peak - ng[1].live) if ng else 0,
            kind="glue",
            checkpointable=False,
            joins_previous=False,
            fwd_flops=pre.flops,
            input_freed_bytes=min(freed_out, full.out_bytes[k]),
        )
        # The glue's record is still live when the window holding both backwards starts: the chain model
        # frees it at the glue's own backward, so the block's backward peak carries it.
        out.append(dataclasses.replace(block, input_freed_bytes=freed_in, output_released_bytes=0,
                                       bwd_transient_bytes=block.bwd_transient_bytes + glue.xbar_bytes))
        out.append(glue)
    out.append(stages[-1])
    for i in range(1, len(out)):  # a block after glue never shares a region with the block before
        if out[i - 1].kind == "glue" and out[i].joins_previous:
            out[i] = dataclasses.replace(out[i], joins_previous=False)
    return out


def _assemble(*, model: nn.Module, inputs_bytes: int, input_shapes_of: list[list[Any]], names: list[str],
              how: str, full: _Timeline, nograd: _Timeline, recomputed: _Timeline,
              timed: list[dict[tuple[str, int], float]], timed_ng: list[dict[tuple[str, int], float]],
              timed_every: list[dict[tuple[str, int], float]],
              med: Callable[[list[dict[tuple[str, int], float]], tuple[str, int]], float],
              device: str, repeats: int, fingerprint: str) -> Profile:
    n = len(names)
    ev = full.by_key()
    ev_ng = nograd.by_key()
    start = full.events[0]
    stages: list[Stage] = []

    bwd: dict[int, tuple[float, int]] = {}
    for k, (prev, e) in _backward_windows(full, n).items():
        x_in = full.x_bytes[k] if k >= 0 else inputs_bytes
        # May be negative: the gradient for the input can reuse the incoming gradient's memory.
        ob = max(-(x_in or 0), e.peak - prev.live - (x_in or 0))
        bwd[k] = (med(timed, (e.label, e.index)), ob)

    # Prologue: from the start to the first block.
    _, pre0 = ev[("pre", 0)]
    stages.append(Stage(
        name=PROLOGUE,
        x_bytes=inputs_bytes,
        xbar_bytes=max(0, pre0.live - start.live),
        fwd_s=med(timed, ("pre", 0)),
        bwd_s=bwd.get(-1, (0.0, 0))[0],
        fwd_nograd_s=med(timed_ng, ("pre", 0)),
        fwd_transient_bytes=max(0, pre0.peak - pre0.live),
        fwd_nograd_transient_bytes=max(0, ev_ng[("pre", 0)][1].peak - ev_ng[("pre", 0)][1].live),
        bwd_transient_bytes=bwd.get(-1, (0.0, 0))[1],
        output_released_bytes=(full.x_bytes[0] or 0) if full.output_released(-1) else 0,
        kind="prologue",
        checkpointable=False,
        joins_previous=False,
        fwd_flops=pre0.flops,
    ))
    last_freed = full.last_input_freed()
    # Note: [Calibrating recomputation] In a run with every block its own checkpoint region, the
    # backward window of block k holds its recomputation and its backward. What was live at its start
    # beyond the chain model's figure (recompute_hold_bytes: e.g. the region's first-pass output, still
    # referenced) and what the window rose above the model's figure for it (recompute_bwd_extra_bytes)
    # are kept per block, and charged whenever the block ends, or runs inside, a recomputed region.
    windows = _backward_windows(recomputed, n)
    rec_window = {k: (prev.live, e.peak) for k, (prev, e) in windows.items() if k >= 0}
    for k in range(n):
        before, after = ev[("post", k)]
        # Bytes released between this block's end and the next block's start: its input, if unsaved.
        nxt = ev.get(("pre", k + 1))
        if nxt is not None:
            freed = min(max(0, after.live - nxt[1].live), full.x_bytes[k] or 0)
        else:
            freed = last_freed
        ng_after = ev_ng[("post", k)][1]
        x_k = full.x_bytes[k] or 0
        stages.append(Stage(
            name=names[k],
            x_bytes=x_k,
            xbar_bytes=max(0, after.live - before.live),
            fwd_s=med(timed, ("post", k)),
            bwd_s=bwd.get(k, (0.0, 0))[0],
            fwd_nograd_s=med(timed_ng, ("post", k)),
            fwd_transient_bytes=max(0, after.peak - after.live),
            fwd_nograd_transient_bytes=max(0, ng_after.peak - ng_after.live),
            bwd_transient_bytes=bwd.get(k, (0.0, 0))[1],
            kind="block",
            checkpointable=True,
            joins_previous=full.joins[k],
            fwd_flops=after.flops,
            input_freed_bytes=freed,
            output_released_bytes=(
                (full.x_bytes[k + 1] or 0) if k + 1 < n else full.head_x_bytes
            ) if full.output_released(k) else 0,
        ))

    # Head: from the last block's output through the loss, and back to the last block's output grad.
    head_end = ("bwd_head", n - 1) if ("bwd_head", n - 1) in ev else ("end", -1)
    last_post, head_ev = ev[head_end]
    # The head's window opens at the last block's post-hook, before the last block's unsaved input is
    # released: measure from the live bytes without it.
    head_start = last_post.live - last_freed
    residual = max(0, head_ev.live - head_start - full.head_x_bytes) if head_end[0] == "bwd_head" else 0
    # A model output that the training loop holds (a Sequential's last activation) lives to the end of
    # the step: it belongs to the residual, not to the last block's record (released at its backward).
    held = full.head_x_bytes if full.output_held and n > 0 and stages[-1].xbar_bytes >= full.head_x_bytes else 0
    if held:
        stages[-1] = dataclasses.replace(stages[-1], xbar_bytes=stages[-1].xbar_bytes - held, output_released_bytes=0)
    for k in range(n):
        if k not in rec_window:
            continue
        st = stages[k + 1]
        start_live, peak = rec_window[k]
        # The chain model's live bytes when region k's recomputation starts, in the calibration run:
        # base (with what the head leaves), the prologue's record, the outputs of regions 0..k-1 (the
        # inputs of 1..k), and the gradient y_{k+1}.
        out_k = (full.x_bytes[k + 1] or 0) if k + 1 < n else full.head_x_bytes
        expected = (recomputed.events[0].live + residual + held + stages[0].xbar_bytes
                    + sum(full.x_bytes[m] or 0 for m in range(1, k + 1)) + out_k)
        hold = max(0, start_live - expected)
        model_rise = max(st.xbar_bytes + st.fwd_transient_bytes,
                         st.x_bytes + st.xbar_bytes - st.output_released_bytes + st.bwd_transient_bytes)
        # Time: in the every-region run, block k's forward window is its unrecorded first pass and its
        # backward window its recomputation plus backward; a region adds both, less one recorded forward
        # and the backward that any plan pays.
        _, e = windows[k]
        first = med(timed_every, ("post", k))
        rec_and_bwd = med(timed_every, (e.label, e.index))
        region_s = max(MIN_TIME_S, first + rec_and_bwd - st.fwd_s - st.bwd_s) if timed_every else None
        stages[k + 1] = dataclasses.replace(st, recompute_hold_bytes=hold,
                                            recompute_bwd_extra_bytes=max(0, peak - start_live - model_rise),
                                            fwd_region_s=region_s)
    head_fwd_ng = med(timed_ng, ("end", -1))
    head_total = med(timed, head_end)  # the head's forward and backward, back to back
    head_fwd = min(head_fwd_ng, head_total) if head_fwd_ng else head_total / 3
    stages.append(Stage(
        name=HEAD,
        x_bytes=full.head_x_bytes,
        xbar_bytes=0,
        fwd_s=head_fwd,
        bwd_s=max(MIN_TIME_S, head_total - head_fwd),
        fwd_nograd_s=head_fwd_ng,
        bwd_transient_bytes=max(-full.head_x_bytes, head_ev.peak - head_start - full.head_x_bytes - residual),
        kind="head",
        checkpointable=False,
        joins_previous=False,
        fwd_flops=head_ev.flops,
    ))
    stages = _with_glue(stages, full, ev, ev_ng, timed, timed_ng, med, names)
    params_bytes = sum(p.untyped_storage().nbytes() for p in {id(p): p for p in model.parameters()}.values())
    grads_bytes = sum(p.grad.untyped_storage().nbytes() for p in model.parameters() if p.grad is not None)
    peak = max(e.peak for e in full.events)
    return Profile(
        stages=tuple(stages),
        fixed_bytes=start.live - inputs_bytes,
        params_bytes=params_bytes,
        grads_bytes=grads_bytes,
        device=device,
        repeats=repeats,
        fingerprint=fingerprint,
        head_residual_bytes=residual + held,
        input_shapes=tuple(input_shapes_of),
        safety_fraction=0.002,
        meta={
            "model": type(model).__name__,
            "detected": how,
            "measured_peak_bytes": peak,
            "carry_shapes": [list(s) if s else None for s in full.shapes],
            "flops": sum(e.flops for e in full.events),
            "params_numel": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
            "estimated_times": device == "meta",
        },
    )
