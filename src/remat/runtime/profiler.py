"""Profile a model as a chain of stages: per-stage sizes (exact) and times (measured or estimated).

One training step is run with hooks at every stage boundary (:mod:`remat.runtime.timeline`) while
:class:`remat.MemoryTracker` counts live bytes; :mod:`remat.runtime.assemble` turns the windows between
the boundaries into each stage's numbers in the cost model (docs/cost-model.md). Timed runs repeat the
step without the tracker and report medians.

Note: [Memory-safe profiling] Sizes do not need real memory: the step runs on a fake copy of the model
(FakeTensorMode, meta storages), with every byte counted exactly. On a real device remat first runs that
fake step, and runs the model itself only as far as it fits (``limit_bytes``, by default 90% of the
memory the device has free): the whole step when its peak fits (sizes then measured for real, and
checked against the fake ones' model); otherwise only runs with every block checkpointed and runs
without recording, for times; and when even those would not fit, times are estimated. On the meta
device nothing is allocated or timed: times are estimated from FLOPs and bytes moved against a
throughput figure for the target device.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import functools
import gc
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from remat.errors import ProfileError, RematError
from remat.planning.plan import Item, Record, Region
from remat.planning.profile import HeadOption, Profile
from remat.planning.simulate import every_items, simulate, with_measured_every
from remat.runtime import hf
from remat.runtime.assemble import Runs, Times, assemble
from remat.runtime.distributed import fsdp_profile
from remat.runtime.head import chunk_counts, head_site, set_chunks
from remat.runtime.measure import available_bytes, reset_grads
from remat.runtime.model import (
    HEAD,
    PROLOGUE,
    as_call,
    find_stages,
    input_shapes,
    input_signature,
    loss_function,
    model_signature,
    tensors_in,
)
from remat.runtime.regions import Runner, recompute_copy_bytes, suspended
from remat.runtime.step import Autocast, Step, autocast_for, training
from remat.runtime.timeline import THROUGHPUTS, Key, Run, Throughput, Timeline, Tracked

log = logging.getLogger("remat")

__all__ = ["PROFILE_MARGIN", "SIZES", "THROUGHPUTS", "Throughput", "preserved", "profile"]

#: How sizes are found: "measured" (the whole step runs on the device), "fake" (a fake copy of the
#: model; only runs that fit are made on the device, for times), "auto" (measured when it fits).
SIZES = ("auto", "measured", "fake")
#: The share of the device's free memory a profiling run may use by default (allocator overhead).
PROFILE_MARGIN = 0.9


class _Progress:
    """A progress bar on stderr (tqdm), one tick per run of the step."""

    def __init__(self, enabled: bool | None, total: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc="remat.profile", unit="run", leave=False,
                        disable=False if enabled else None if enabled is None else True)

    def __call__(self, what: str) -> None:
        self.bar.set_postfix_str(what, refresh=False)
        self.bar.update(1)

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()


@contextlib.contextmanager
def preserved(model: nn.Module, cuda: bool) -> Iterator[None]:
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

    from torch._subclasses.fake_tensor import FakeTensor

    def sdpa(query: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if query.device.type == "meta" or isinstance(query, FakeTensor):
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


@dataclass
class _Fake:
    """A copy of a model whose parameters and buffers are fake meta tensors, with fake inputs, and the
    modes to run it in (:meth:`running`).

    Note: [Why FakeTensorMode] Plain meta tensors fail on data-dependent checks (``.item()``) that
    models run, e.g. transformers' packed-sequence detection; under FakeTensorMode such code takes its
    tracing path. Sizes, and so every byte count, are the same.
    """

    model: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    mode: Any
    autocast: Autocast | None = None

    @classmethod
    def of(cls, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], device: str,
           autocast: Autocast | None) -> _Fake:
        """On ``device="meta"`` the copy plans for another device; else its tensors keep their device (so
        that code which branches on it runs as on the device), and real tensors the step uses besides
        its inputs (a target in ``loss_fn``) are faked as they come."""
        from remat.runtime.fakemode import FallbackFakeMode

        to_meta = device == "meta"
        # Ops a fake copy cannot run fall back one by one (Note [Falling back per op]): the mode mirrors
        # the values of the real tensors it fakes.
        mode = FallbackFakeMode(allow_non_fake_inputs=not to_meta, to_meta=to_meta)
        # One fake tensor per real one, so tied weights stay tied and an input passed twice is one
        # storage; the copy takes them from the memo, so no real parameter is copied.
        memo: dict[int, Any] = {}

        def fake(t: Any) -> Any:
            if not isinstance(t, torch.Tensor):
                return t
            if id(t) not in memo:
                f = mode.from_tensor(t.detach().to("meta") if to_meta else t.detach())
                memo[id(t)] = nn.Parameter(f, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else f
                mode.borrow(memo[id(t)], t)
            return memo[id(t)]

        for t in (*model.parameters(), *model.buffers()):
            fake(t)
        for mod in model.modules():  # plain tensor attributes (a lookup table) too: nothing real is copied
            for v in vars(mod).values():
                if isinstance(v, torch.Tensor):
                    fake(v)
        fake_model = copy.deepcopy(model, dict(memo))
        args = torch.utils._pytree.tree_map(fake, args)
        kwargs = torch.utils._pytree.tree_map(fake, kwargs)
        return cls(fake_model, args, kwargs, mode, autocast)

    @contextlib.contextmanager
    def running(self, flash: bool) -> Iterator[None]:
        """Run the copy; ``flash``: attention as a GPU runs it (Note [Attention on meta]), not as a CPU."""
        # An op that fails on fake tensors is handled by the caller (measured or refused clearly): torch's
        # own error log of it would only repeat the traceback.
        torch_log = logging.getLogger("torch._subclasses.fake_tensor")
        level = torch_log.level
        torch_log.setLevel(logging.CRITICAL)
        try:
            with self.mode, _flash_attention_on_meta() if flash else contextlib.nullcontext(), \
                    hf.fakes_with_values_run_as_on_device(lambda t: self.mode.value(t) is not None):
                yield
        finally:
            torch_log.setLevel(level)


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
    model: nn.Module, example_inputs: Any, *, loss_fn: Callable[[Any], torch.Tensor] | None = None,
    stages: Sequence[str] | None = None, device: str | None = None, sizes: str = "auto", limit_bytes: int | None = None,
    warmup: int = 1, repeats: int = 3, throughput: Throughput | str | None = None, progress: bool | None = False,
    world_size: int | None = None, autocast: Any = None, head: str = "keep",
) -> Profile:
    """Profile one training step of ``model`` as a chain of stages.

    Stages are found as ``stages=[names]``, or by watching one forward (:func:`remat.runtime.model.find_stages`).
    What runs before the first block is the prologue stage, what runs after the last one (the loss
    included) the head stage; code between two blocks is a glue stage. None of them is checkpointed.

    Args:
        model: profiled in training mode whatever its mode, as it trains (Note [The step that runs]).
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs
            (e.g. ``{"input_ids": ids, "labels": ids}`` for a transformers model).
        loss_fn: ``loss_fn(output) -> scalar``; by default ``output.loss`` (transformers with labels),
            a scalar output itself, or ``output.sum()``.
        stages: explicit submodule names, in execution order.
        device: ``"meta"``: without allocating (a fake copy; times estimated); default: the model's.
        sizes: ``"auto"`` (default): measured on the device when the step without checkpointing fits in
            ``limit_bytes``, else from a fake copy; ``"measured"``: run the whole step on the device;
            ``"fake"``: never (see Note [Memory-safe profiling] in this module).
        limit_bytes: the most memory a profiling run may use on the device; default 90% of what it has
            free (:func:`remat.runtime.measure.available_bytes`).
        warmup, repeats: untimed runs, then timed runs (medians); ``repeats=0`` needs ``throughput``.
        throughput: for estimated times: a :class:`Throughput` or a name in :data:`THROUGHPUTS`
            (default ``"h100"`` on meta). Given on a real device, FLOPs are counted too.
        progress: a progress bar on stderr; None: when stderr is a terminal.
        world_size: plan one rank of FSDP2 over this many ranks (docs/distributed.md): the profile of
            the model before sharding, made per rank by :func:`remat.runtime.distributed.fsdp_profile`.
        autocast: the forward's dtype under ``torch.autocast`` (``torch.bfloat16``); default: the block
            open now, if any; False: none (Note [The step that runs] in :mod:`remat.runtime.step`).
        head: ``"keep"`` (default): the model's head as it is. ``"chunked"``: the head is also measured
            with its output projection and loss in 1, 2, 4, ... checkpointed chunks of tokens
            (``Profile.head_options``), for :func:`remat.solve` to choose with the blocks' plan (a
            transformers causal LM or a :class:`remat.ChunkedHead`; Note [Chunked head] in
            :mod:`remat.runtime.head`: a planned chunked head returns the loss and ``logits=None``).

    Returns:
        A :class:`remat.Profile`. ``meta["measured_peak_bytes"]`` is the exact peak of the profiled step
        (on the fake copy when ``meta["sizes"] == "fake"``); ``meta["times"]`` says where times come from.

    Raises:
        ProfileError: no chain can be found, or the stages do not run once each, in order.
    """
    tp, device = _checked(model, device=device, sizes=sizes, repeats=repeats, throughput=throughput)
    if head == "chunked" and world_size:
        raise RematError("remat.profile: head='chunked' with world_size= is not planned yet; profile with head='keep'")
    with contextlib.ExitStack() as stack:
        chunked = stack.enter_context(head_site(model, example_inputs, loss_fn, head, "remat.profile"))
        real, fake = _steps(model, example_inputs, stack, loss_fn, _autocast(model, autocast, device), stages, device,
                            sizes)
        tick = stack.enter_context(_Progress(progress, 3 + warmup + 3 * repeats))
        prof = _profile(real, fake, loss_fn=loss_fn, stages=stages, device=device, sizes=sizes,
                        limit_bytes=limit_bytes, warmup=warmup, repeats=repeats, throughput=tp, tick=tick,
                        head=chunked)
    prof = with_measured_every(_check_accounting(prof))
    return fsdp_profile(prof, model, world_size) if world_size else prof


def _autocast(model: nn.Module, autocast: Any, device: str) -> Autocast | None:
    """The step's autocast (:func:`remat.runtime.step.autocast_of`); not modelled on the meta device."""
    ac = autocast_for(model, autocast, "remat.profile")
    if ac is not None and device == "meta":
        raise RematError(
            f"remat.profile: the step runs under autocast ({ac}), which the meta device does not run (its tensors"
            " are cast by no autocast); profile on the device the model trains on, or give the model the dtype"
            " it computes in (--dtype bfloat16 in the CLI)"
        )
    return ac


def _checked(model: nn.Module, *, device: str | None, sizes: str, repeats: int,
             throughput: Throughput | str | None) -> tuple[Throughput | None, str]:
    """The throughput and device of a profile call, after checking its arguments."""
    if not isinstance(model, nn.Module):
        raise ProfileError(f"remat.profile: model must be a torch.nn.Module, got {type(model).__name__}")
    if hf.checkpointing_active(model):
        raise ProfileError(
            "remat.profile: the model checkpoints itself (transformers' gradient checkpointing is on), so its"
            " profile would not be the step a plan runs; call model.gradient_checkpointing_disable() first"
            " (remat.auto and remat.apply switch it off for you)"
        )
    if sizes not in SIZES:
        raise RematError(f"remat.profile: sizes={sizes!r}; use one of {', '.join(map(repr, SIZES))}")
    tp = _throughput(throughput)
    device = _device_of(model, device)
    if device != "meta" and repeats < 1 and tp is None:
        raise RematError(
            f"remat.profile: repeats={repeats} times nothing; pass repeats >= 1, or throughput=... (e.g. 'h100')"
            " to estimate times from FLOPs"
        )
    return tp, device


def _steps(model: nn.Module, example_inputs: Any, stack: contextlib.ExitStack,
           loss_fn: Callable[[Any], torch.Tensor] | None, autocast: Autocast | None, stages: Sequence[str] | None,
           device: str, sizes: str) -> tuple[Callable[[Sequence[str] | None], _Step] | None, _Fake | None]:
    """How to make the step on the device, given its stages (None on meta), and the fake copy (None when
    sizes are measured), in training mode; the model is left as profiling found it when ``stack`` closes."""
    if stack.enter_context(training(model)):
        log.info("remat.profile: %s is in evaluation mode; profiled in training mode, as it trains (its modes are"
                 " restored after)", type(model).__name__)
    args, kwargs = as_call(example_inputs)
    stack.enter_context(suspended(model))  # a planned model is profiled as the plain model
    stack.enter_context(hf.cache_off(model))  # as a plan runs it
    real = None
    if device != "meta":
        args, kwargs = _to_device(args, device), _to_device(kwargs, device)
        stack.enter_context(preserved(model, cuda=device.startswith("cuda")))
        real = functools.partial(_Step.of, model, args, kwargs, loss_fn, autocast)
    if _sharded(model) and (device == "meta" or sizes == "fake"):
        raise ProfileError(
            f"remat.profile: {type(model).__name__} is sharded by FSDP2 (fully_shard), and a sharded model has no"
            f" fake copy{' on meta' if device == 'meta' else ''}: profile it on its device (sizes='auto' or"
            " 'measured': each rank measures its own step), or profile the model before fully_shard with"
            " world_size=N (docs/distributed.md)"
        )
    fake = (_Fake.of(model, args, kwargs, device, autocast) if (device == "meta" or sizes != "measured")
            and not _sharded(model) else None)
    return real, fake


def _sharded(model: nn.Module) -> bool:
    """Whether FSDP2 shards the model (a fake copy cannot be made of it: its parameters' storages are resized to
    nothing between uses, and FSDP2 refuses a deep copy): it is then profiled on its device, per rank."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    module_type = getattr(fsdp, "FSDPModule", None)
    return module_type is not None and any(isinstance(m, module_type) for m in model.modules())


def _throughput(throughput: Throughput | str | None) -> Throughput | None:
    if isinstance(throughput, str):
        if throughput not in THROUGHPUTS:
            raise RematError(f"remat.profile: unknown throughput {throughput!r}; use one of {', '.join(THROUGHPUTS)}")
        return THROUGHPUTS[throughput]
    return throughput


def _device_of(model: nn.Module, device: str | None) -> str:
    params = list(model.parameters())
    model_device = params[0].device.type if params else "cpu"
    device = device or model_device
    if device not in (model_device, "meta"):
        raise ProfileError(
            f"remat.profile: the model is on {model_device} but device={device!r}; move the model first,"
            " or pass device='meta' to profile without allocating"
        )
    return device


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



@dataclass
class _Step(Step):
    """One training step of a model (:class:`remat.runtime.step.Step`), and the blocks whose boundaries are
    watched."""

    names: list[str] = field(default_factory=list)
    blocks: list[nn.Module] = field(default_factory=list)
    how: str = ""
    real: bool = True  # False on a fake copy: nothing is allocated, so nothing to hand back between runs

    @classmethod
    def of(cls, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],  # type: ignore[override]
           loss_fn: Callable[[Any], torch.Tensor] | None, autocast: Autocast | None,
           stages: Sequence[str] | None) -> _Step:
        pairs, how = find_stages(model, stages, inputs=(args, kwargs))
        return cls(model, args, kwargs, loss_function(loss_fn), autocast, names=[n for n, _ in pairs],
                   blocks=[m for _, m in pairs], how=how)

    def train(self, tl: Timeline) -> None:
        # The output is held through backward, as in `out = model(x); loss_fn(out).backward()`: the
        # logits of a language model stay live, so the plan holds for loops that keep them.
        tl.mark("start")
        out, loss = self.forward()
        self.backward(loss)
        tl.mark("end")
        del out, loss

    def nograd(self, tl: Timeline) -> None:
        with self.nograd_context():
            tl.mark("start")
            out = self.model(*self.args, **self.kwargs)
            loss = self.get_loss(out)  # what the loss keeps: Note [What the fake copy misses]
            tl.mark("end")
            del out, loss

    def run(self, kind: str, tracker: Tracked | None = None, cuda: bool = False, trim: bool = True) -> Timeline:
        """One run: ``kind`` is "full" (recording), "nograd", or "every" (every block its own region).

        ``trim``: first hand freed CPU memory back to the system. Not before a timed run: its allocations
        would then fault in fresh pages, which a training loop's steps do not (measured on a Llama config:
        the profiled windows summed to 1.45x the plain step's time, and checkpointing's overhead was
        under-predicted by a quarter)."""
        if trim:
            self.hand_back(cuda)
        reset_grads(self.model)
        with contextlib.ExitStack() as stack:
            if kind == "every":
                stack.enter_context(_every_block_checkpointed(self.model, self.blocks, self.names))
            tl = stack.enter_context(Timeline(self.blocks, tracker, cuda))
            if tracker is not None:
                tracker.track_model(self.model)
                tracker.track(tensors_in((self.args, self.kwargs)), "other")
                stack.enter_context(tracker)
                stack.enter_context(torch.autograd.graph.saved_tensors_hooks(tl.pack, lambda t: t))
                tl.pinned = {id(t.untyped_storage()) for t in tensors_in((self.args, self.kwargs))}
            (self.nograd if kind == "nograd" else self.train)(tl)
        tl.check(self.names)
        return tl

    def hand_back(self, cuda: bool) -> None:
        """Hand memory freed by earlier runs back to the system (real CPU runs only)."""
        if self.real and not cuda:
            _return_free_memory()

    def device_type(self) -> str:
        return next(iter(self.model.parameters()), torch.empty(0)).device.type

    def tracked(self, kind: str, throughput: Throughput | None) -> Run:
        return Run(self.run(kind, Tracked(throughput)), len(self.names))

    def inputs_bytes(self) -> int:
        storages = {id(s): s for s in (t.untyped_storage() for t in tensors_in((self.args, self.kwargs)))}
        return sum(s.nbytes() for s in storages.values())


def _return_free_memory() -> None:
    """Hand memory freed by the last run back to the system before the next one (glibc keeps freed
    blocks below 32 MiB in its heap, and runs of different shapes fragment it: without this, a CPU
    profile's resident memory grew to 1.7x the step's on a GPT-2 config)."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc
        return None


_LIBC = _glibc()


def _profile(make_real: Callable[[Sequence[str] | None], _Step] | None, fake: _Fake | None, *,
             loss_fn: Callable[[Any], torch.Tensor] | None, stages: Sequence[str] | None, device: str, sizes: str,
             limit_bytes: int | None, warmup: int, repeats: int, throughput: Throughput | None,
             tick: _Progress, head: bool = False) -> Profile:
    limit = limit_bytes if limit_bytes is not None or device == "meta" else _default_limit(device)
    estimate = throughput or THROUGHPUTS["cpu" if device == "cpu" else "h100"]
    step, runs, real = _sized(make_real, fake, sizes=sizes, limit=limit, limited=limit_bytes is not None,
                              loss_fn=loss_fn, stages=stages, throughput=throughput, estimate=estimate,
                              warmup=warmup, device=device, tick=tick)
    groups = _identical_blocks(step, runs)
    kinds = _timed_kinds(step, runs, real, limit, repeats)
    times = (_measured_times(real, runs, kinds, groups, warmup, repeats, tick) if real is not None and "nograd" in kinds
             else _estimated_times(runs, groups))
    every_peak = _every_on_device(real, step, limit) if real is not None and repeats >= 1 else None
    nograd_gap = _nograd_gap(real, step, runs, limit) if real is not None else 0
    build = _assembler(step, real, times, device, repeats)
    prof = build(runs, times)
    if head:
        timing = _Timing(real, kinds if "nograd" in kinds else (), groups, warmup, repeats, tick)
        running = fake.running(device == "meta" or device.startswith("cuda")) if fake is not None and step is not real \
            else contextlib.nullcontext()
        with running:
            prof = _with_head_options(prof, build, step, runs, times, timing, throughput if step is real else estimate)
    prof = _with_device_gap(prof, every_peak, nograd_gap)
    if every_peak is None:
        return prof
    meta = {**prof.meta, "measured_every_peak_bytes": every_peak, "every_on_device": True}
    return dataclasses.replace(prof, meta=meta)


def _with_device_gap(prof: Profile, every_peak: int | None, nograd_gap: int) -> Profile:
    """Note: [What the fake copy misses] An op's kernel on the device may keep more than its fake kernel says:
    torch's CPU kernel for ``mse_loss`` returns the scalar loss in the storage of its elementwise losses (8 KiB
    on a DiT), its meta kernel in 4 bytes; a loop holds the loss through backward. Two runs on the device say
    by how much the fake copy falls short: the step without recording, its loss included (:func:`_nograd_gap`),
    and the every-block plan where it fits the limit (its measured peak against the fake copy's figure for
    it, without margin). The larger difference is charged as live through the whole step, for every plan
    (the head's residual, and each head option's). On the DiT, 8,188 B had put plans planned on the fake
    copy up to 7,286 B over their prediction, past the 0.2% margin. What only a backward kernel keeps is seen
    by the every-block run alone: where that run does not fit the limit, a shortfall of that kind is left to
    ``auto``'s check of the planned step, which reports it (VerificationError), never silently."""
    gap = nograd_gap
    if every_peak is not None:
        exact = dataclasses.replace(prof, safety_fraction=0.0, head_options=())
        gap = max(gap, every_peak - simulate(exact, every_items(exact)).peak_bytes)
    if gap <= 0:
        return prof
    options = tuple(dataclasses.replace(o, residual_bytes=o.residual_bytes + gap) for o in prof.head_options)
    return dataclasses.replace(prof, head_residual_bytes=prof.head_residual_bytes + gap, head_options=options,
                               meta={**prof.meta, "device_gap_bytes": gap})


def _timed_kinds(step: _Step, runs: Runs, real: _Step | None, limit: int | None, repeats: int) -> tuple[str, ...]:
    """The kinds of run timed on the device: all when the step's sizes were measured there, else those that
    fit (none: times are estimated)."""
    if real is None or repeats < 1:
        return ()
    if step is real:
        return ("full", "nograd", "every")
    return tuple(kind for kind, run in (("nograd", runs.nograd), ("every", runs.every))
                 if limit is None or run.peak <= limit)


def _assembler(step: _Step, real: _Step | None, times: Times, device: str,
               repeats: int) -> Callable[[Runs, Times], Profile]:
    """:func:`assemble` with the step's figures beside its runs and times."""
    params = {id(p): p for p in step.model.parameters()}.values()
    return functools.partial(
        assemble,
        params_bytes=sum(p.untyped_storage().nbytes() for p in params),
        grads_bytes=sum(p.grad.untyped_storage().nbytes() for p in params if p.grad is not None),
        fingerprint=f"{model_signature(step.model, step.names)}:{input_signature(step.args, step.kwargs)}",
        device=device, repeats=0 if times.source == "estimated" else repeats,
        input_shapes=input_shapes(step.args, step.kwargs),
        meta={"model": type(step.model).__name__, "detected": step.how, "sizes": "measured" if step is real else "fake",
              "params_numel": sum(p.numel() for p in params), "estimated_times": times.source == "estimated",
              **({"autocast": str(step.autocast)} if step.autocast is not None else {})},
    )


@dataclass
class _Timing:
    """How the profile timed its runs: on ``real``, the run kinds timed (none: estimated), and the rest."""

    real: _Step | None
    kinds: tuple[str, ...]
    groups: dict[int, list[int]]
    warmup: int
    repeats: int
    tick: _Progress


def _with_head_options(prof: Profile, build: Callable[[Runs, Times], Profile], step: _Step, runs: Runs,
                       times: Times, timing: _Timing, throughput: Throughput | None) -> Profile:
    """Note: [Measuring the head's options] The profile ran with the head whole; for each chunk count
    (:func:`remat.runtime.head.chunk_counts`) the step runs recording again with the head in that many
    chunks, tracked (and timed as the profile's recording runs were), and is assembled with the profile's
    other runs: its head stage and residual, checked against that run's peak (Note [Every byte accounted]),
    are a :class:`HeadOption`. Only the head changes between them; the blocks' figures are the profile's."""
    models = {id(s.model): s.model for s in (step, timing.real) if s is not None}.values()
    options = []
    try:
        for c in chunk_counts(step.model):
            for m in models:
                set_chunks(m, c)
            variant = dataclasses.replace(runs, full=step.tracked("full", throughput))
            timing.tick(f"head in {c} chunks")
            variant_prof = _check_accounting(build(variant, _head_times(variant, times, timing)))
            options.append(HeadOption(c, variant_prof.stages[-1], variant_prof.head_residual_bytes))
    finally:
        for m in models:
            set_chunks(m, 0)
    return dataclasses.replace(prof, head_chunks=0, head_options=tuple(options))


def _head_times(runs: Runs, times: Times, timing: _Timing) -> Times:
    """The times of a run with the head in chunks: its recording runs timed as the profile's were (its
    unrecorded runs are the profile's: the head is never in a checkpoint region)."""
    kinds = tuple(k for k in timing.kinds if k != "nograd")
    if timing.real is None or not kinds:
        return _estimated_times(runs, timing.groups)
    timed = _measured_times(timing.real, runs, kinds, timing.groups, timing.warmup, timing.repeats, timing.tick)
    return dataclasses.replace(timed, nograd=times.nograd, source=times.source)


def _every_on_device(real: _Step, step: _Step, limit: int | None) -> int | None:
    """Note: [The every-block plan on the device] With sizes from a fake copy, the one schedule the profiler
    runs whole, every block its own region, is also run on the device, tracked and stopped the moment its
    live bytes pass the limit (:class:`_Capped`; the fake copy may keep a little more than the device's
    step, e.g. a mask the device skips, so its figure alone would not say whether it fits). The second of
    two runs (the first allocates the gradients, as a loop's steady state has them) gives the plan's exact
    peak, so a budget at that peak (Hugging Face's every-layer checkpointing's own) plans that schedule
    however sizes were found (Note [Safety margin] in remat.planning.simulate)."""
    if step is real or not step.names:
        return None
    peak = None
    for _ in range(2):
        tl = _capped_run(real, "every", limit)
        if tl is None:
            log.info("remat.profile: the every-block plan passed the limit on the device; its peak is the fake copy's")
            return None
        peak = Run(tl, len(real.names)).peak  # over all its windows (the timeline resets the tracker's at each)
    return peak


def _capped_run(real: _Step, kind: str, limit: int | None) -> Timeline | None:
    """One tracked run of ``kind`` on the device, stopped the moment its live bytes pass ``limit`` (None then)."""
    tracker = _Capped(limit)
    try:
        return real.run(kind, tracker, cuda=real.device_type() == "cuda")
    except Exception as e:
        if not tracker.over and not isinstance(e, torch.OutOfMemoryError):
            raise
        return None


def _nograd_gap(real: _Step, step: _Step, runs: Runs, limit: int | None) -> int:
    """How many bytes more than the fake copy the step without recording holds on the device, at any boundary
    or window peak (Note [What the fake copy misses]); 0 with sizes measured on the device, or where that run
    would pass the limit (it is the smallest run of the step: every plan's first pass holds at least as much)."""
    if step is real or (limit is not None and runs.nograd.peak > limit):
        return 0
    tl = _capped_run(real, "nograd", limit)
    fake = runs.nograd.tl.events
    if tl is None or [(e.label, e.index) for e in tl.events] != [(e.label, e.index) for e in fake]:
        return 0  # another path ran (a branch on a value): nothing to compare
    # Above each run's start: the device's model may not hold its gradients yet (they are reset between runs).
    d, f = tl.events[0].live, fake[0].live
    return max(0, *(max(a.live - d - (b.live - f), a.peak - d - (b.peak - f)) for a, b in zip(tl.events[1:], fake[1:])))


class _Capped(Tracked):
    """A tracker that stops the run (raises from the op that allocated) once live bytes pass ``limit``."""

    def __init__(self, limit: int | None) -> None:
        super().__init__(None)
        self.limit, self.over = limit, False

    def _add(self, st: torch.UntypedStorage, category: str, relabel: bool = False) -> None:
        super()._add(st, category, relabel)
        if self.limit is not None and self.live_bytes > self.limit and not self.over:
            self.over = True
            raise RematError(f"remat.profile: a run passed the limit of {self.limit:,} B on the device; stopped")


def _default_limit(device: str) -> int | None:
    free = available_bytes(device)
    return None if free is None else int(PROFILE_MARGIN * free)


def _sized(make_real: Callable[[Sequence[str] | None], _Step] | None, fake: _Fake | None, *, sizes: str,
           limit: int | None, limited: bool, loss_fn: Callable[[Any], torch.Tensor] | None,
           stages: Sequence[str] | None, throughput: Throughput | None, estimate: Throughput, warmup: int,
           device: str, tick: _Progress) -> tuple[_Step, Runs, _Step | None]:
    """The step whose sizes the profile reports (the fake copy's unless the real step fits, see Note
    [Memory-safe profiling]), its tracked runs, and the step on the device (None on meta). Stages are found
    on the fake copy, so that the model itself runs nothing that does not fit."""
    if fake is not None:
        flash = device == "meta" or device.startswith("cuda")
        try:
            with fake.running(flash):
                step = dataclasses.replace(_Step.of(fake.model, fake.args, fake.kwargs, loss_fn, fake.autocast, stages),
                                           real=False)
                step.run("full")  # steady state: gradients allocated, lazy buffers made
                full = step.tracked("full", estimate)
                tick("sizes, recording (fake)")
                fits = make_real is not None and sizes == "auto" and (limit is None or full.peak <= limit)
                runs = None if fits else _runs(step, full, estimate, tick)
        except RematError:
            raise
        except Exception as e:  # an op without a fake kernel, Python branching on a tensor's value
            _unfakeable(e, refuse=make_real is None or sizes == "fake" or limited)
        else:
            real = dataclasses.replace(make_real(step.names), how=step.how) if make_real is not None else None
            if runs is not None:
                return step, runs, real
            assert real is not None
            return (*_measured_sizes(real, throughput, warmup, tick), real)
    assert make_real is not None
    real = make_real(stages)
    return (*_measured_sizes(real, throughput, warmup, tick), real)


def _unfakeable(e: Exception, *, refuse: bool) -> None:
    """The step does not run on a fake copy: refuse clearly, or say that it is measured on the device."""
    if refuse:
        raise ProfileError(
            f"remat.profile: the step does not run on a fake copy of the model ({type(e).__name__}:"
            f" {str(e).strip().splitlines()[0][:200] if str(e).strip() else 'no message'}), so its sizes cannot"
            " be found without running the whole step, which may not fit (a budget or limit_bytes was given);"
            " profile on the device with sizes='measured' if the step without checkpointing fits"
        ) from e
    log.warning("remat.profile: the step does not run on a fake copy of the model (%s); measuring it on the"
                " device, which needs the memory of the step without checkpointing", type(e).__name__)


def _measured_sizes(real: _Step, throughput: Throughput | None, warmup: int, tick: _Progress) -> tuple[_Step, Runs]:
    for _ in range(warmup):
        real.run("full")
        tick("warm-up")
    full = real.tracked("full", throughput)
    tick("sizes, recording")
    return real, _runs(real, full, throughput, tick)


def _runs(step: _Step, full: Run, throughput: Throughput | None, tick: _Progress) -> Runs:
    nograd = step.tracked("nograd", throughput)
    tick("sizes, no recording")
    every = step.tracked("every", throughput)
    tick("sizes, recomputing")
    return Runs(full=full, nograd=nograd, every=every, names=step.names, inputs_bytes=step.inputs_bytes(),
                copies=[recompute_copy_bytes(b) for b in step.blocks])


def _identical_blocks(step: _Step, runs: Runs) -> dict[int, list[int]]:
    """Blocks of one structure, on inputs of one shape, that did the same work (Note [Pooled timings])."""
    groups: dict[Any, list[int]] = {}
    for k, block in enumerate(step.blocks):
        glue = runs.full.glue.get(k)
        signature = (
            tuple(type(m).__name__ for m in block.modules()),
            tuple((tuple(p.shape), p.dtype, p.requires_grad) for p in block.parameters()),
            runs.full.tl.shapes[k], runs.full.block[k].rise, runs.full.block[k].end.ops,
            glue.end.ops if glue is not None else 0,
        )
        groups.setdefault(signature, []).append(k)
    return {k: group for group in groups.values() for k in group}


def _backward_keys(run: Run) -> dict[int, Key]:
    return {k: w.key for k, w in run.backward.items()}


def _estimated_times(runs: Runs, groups: dict[int, list[int]]) -> Times:
    def est(run: Run) -> list[dict[Key, float]]:
        return [{(e.label, e.index): e.est_s for e in run.tl.events}]

    return Times(est(runs.full), est(runs.nograd), est(runs.every), groups, _backward_keys(runs.full),
                 _backward_keys(runs.every), source="estimated")


def _measured_times(step: _Step, runs: Runs, kinds: tuple[str, ...], groups: dict[int, list[int]], warmup: int,
                    repeats: int, tick: _Progress) -> Times:
    """Medians of timed runs of each kind, interleaved (full, nograd, every, full, ...)."""
    cuda = step.device_type() == "cuda"
    step.hand_back(cuda)
    # Untimed, untrimmed: the allocator then holds what every kind of run needs, as in a training loop's
    # steady state. (Freed memory is not handed back until timing is over: the interleaved kinds reach a
    # steady heap after this warm-up.)
    for _ in range(warmup):
        for kind in kinds:
            step.run(kind, cuda=cuda, trim=False)
        if "full" not in kinds:  # with "full", the sizing runs' warm-up was counted
            tick("warm-up")
    timed: dict[str, list[dict[Key, float]]] = {kind: [] for kind in ("full", "nograd", "every")}
    for _ in range(repeats):
        for kind in kinds:
            timed[kind].append(step.run(kind, cuda=cuda, trim=False).durations())
            tick(f"timing, {kind}")
    step.hand_back(cuda)
    source = ("measured" if "full" in kinds else "measured, every block checkpointed" if "every" in kinds
              else "measured forwards; backward estimated")
    return Times(timed["full"], timed["nograd"], timed["every"], groups, _backward_keys(runs.full),
                 _backward_keys(runs.every), source=source)
