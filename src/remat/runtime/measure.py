"""Exact peak memory and time of one training step, on CPU, CUDA and the meta device.

PyTorch has no allocator counters on CPU, so remat tracks tensor *storages*: a dispatch mode sees every
op's outputs, registers each new storage once (views share it) with its size, and a weak reference on
the storage subtracts it when it is freed. Peak = max live bytes. It is exact and deterministic, and
works the same under the meta device and ``FakeTensorMode`` (no memory is used at all), which is how
remat plans models larger than the machine. On CUDA the allocator's own figures are reported beside it.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from remat.errors import RematError
from remat.planning.table import render_table
from remat.units import format_bytes, format_seconds

log = logging.getLogger("remat")

__all__ = ["Measurement", "MemoryTracker", "available_bytes", "measure", "optimizer_step_bytes"]

CATEGORIES = ("parameters", "gradients", "optimizer", "saved", "other")


# torch.tensor(data) builds its tensor outside dispatch, then passes it through lift_fresh: the output
# shares the input's storage, yet that storage was allocated just now, by the step. (torch.from_numpy and
# torch.as_tensor pass through lift_fresh too, on numpy's memory: a storage torch cannot resize.)
_FRESH = {torch.ops.aten.lift_fresh.default}


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _storage(t: torch.Tensor) -> torch.UntypedStorage | None:
    if type(t) not in _PLAIN:
        local = getattr(t, "_local_tensor", None)  # a DTensor: this rank's shard is what it holds here
        if isinstance(local, torch.Tensor):
            t = local
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):  # sparse, nested, some subclasses
        return None


#: Trackers inside their ``with`` block, told about storages that FSDP2 resizes in place.
_ACTIVE: list[MemoryTracker] = []
#: Modules of FSDP2 that free and re-allocate unsharded parameters by resizing their storage in place
#: (``storage.resize_(0)`` on reshard): no op is dispatched, so their helpers are wrapped while tracking.
_RESIZERS = ("torch.distributed.fsdp._fully_shard._fsdp_param", "torch.distributed.fsdp._fully_shard._fsdp_param_group")
_PATCHED: list[tuple[Any, str, Any]] = []


def _notify_resized(fn: Any) -> Any:
    def wrapper(tensor: torch.Tensor) -> None:
        fn(tensor)
        for tracker in _ACTIVE:
            tracker.resized(tensor)

    wrapper.__wrapped__ = fn  # type: ignore[attr-defined]
    return wrapper


def _watch_resizes(on: bool) -> None:
    """Wrap (or unwrap) FSDP2's ``alloc_storage`` / ``free_storage`` where they are loaded."""
    import sys

    if on and not _PATCHED:
        for name in _RESIZERS:
            module = sys.modules.get(name)
            for attr in ("alloc_storage", "free_storage"):
                fn = getattr(module, attr, None) if module is not None else None
                if fn is not None:
                    _PATCHED.append((module, attr, fn))
                    setattr(module, attr, _notify_resized(fn))
    elif not on:
        while _PATCHED:
            module, attr, fn = _PATCHED.pop()
            setattr(module, attr, fn)


class _Entry:
    __slots__ = ("category", "nbytes")

    def __init__(self, nbytes: int, category: str) -> None:
        self.nbytes = nbytes
        self.category = category


class MemoryTracker(TorchDispatchMode):
    """Live and peak bytes of tensor storages, exactly.

    Storages created by ops while the mode is active are counted from creation to release. Storages
    that existed before must be declared with :meth:`track` (parameters, gradients, inputs); an
    undeclared one reached through a view or an in-place op is not counted (it was allocated before).

    Use :meth:`reset_peak` and :attr:`peak_bytes` to find the peak inside a window.

    >>> with MemoryTracker() as t:
    ...     a = torch.ones(256)          # 1 KiB
    ...     b = a.view(16, 16)           # a view: same storage, not counted again
    ...     del a, b
    >>> t.peak_bytes, t.live_bytes
    (1024, 0)
    """

    def __init__(self, *, count_flops: bool = False) -> None:
        super().__init__()
        self._entries: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._external: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._live_by: dict[str, int] = dict.fromkeys(CATEGORIES, 0)
        self.peak_breakdown: dict[str, int] = dict.fromkeys(CATEGORIES, 0)
        self.count_flops = count_flops
        self.flops = 0.0
        self.bytes_moved = 0
        self.ops = 0
        self._flop_registry: dict[Any, Any] = {}
        if count_flops:
            from torch.utils.flop_counter import flop_registry

            self._flop_registry = flop_registry

    # ---- registration ----------------------------------------------------------------------------
    def track(self, tensors: Iterable[torch.Tensor] | torch.Tensor | None, category: str = "other") -> None:
        """Declare storages that exist already (or re-label known ones: e.g. as ``"saved"``)."""
        if tensors is None:
            return
        if isinstance(tensors, torch.Tensor):
            tensors = [tensors]
        for t in tensors:
            if isinstance(t, torch.Tensor):
                st = _storage(t)
                if st is not None:
                    self._add(st, category, relabel=True)

    def _add(self, st: torch.UntypedStorage, category: str, relabel: bool = False) -> None:
        entry = self._entries.get(st)
        if entry is not None:
            if relabel and entry.category != category:
                self._live_by[entry.category] -= entry.nbytes
                self._live_by[category] += entry.nbytes
                entry.category = category
            return
        nbytes = st.nbytes()
        entry = _Entry(nbytes, category)
        self._entries[st] = entry
        self._external.pop(st, None)
        self.live_bytes += nbytes
        self._live_by[category] += nbytes
        weakref.finalize(st, self._release, entry)
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
            self.peak_breakdown = dict(self._live_by)

    def _release(self, entry: _Entry) -> None:
        self.live_bytes -= entry.nbytes
        self._live_by[entry.category] -= entry.nbytes

    def resized(self, tensor: torch.Tensor) -> None:
        """A storage was resized in place (FSDP2 frees an unsharded parameter with ``resize_(0)`` and
        re-allocates it before the next all-gather): count its new size; a storage first seen growing
        is counted as a parameter from now on."""
        st = _storage(tensor)
        if st is None:
            return
        entry = self._entries.get(st)
        if entry is None:
            if st.nbytes():
                self._add(st, "parameters")
            return
        delta = st.nbytes() - entry.nbytes
        entry.nbytes += delta
        self.live_bytes += delta
        self._live_by[entry.category] += delta
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
            self.peak_breakdown = dict(self._live_by)

    def __enter__(self) -> MemoryTracker:
        _ACTIVE.append(self)
        _watch_resizes(True)
        try:
            return super().__enter__()
        except BaseException:
            self._leave()
            raise

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._leave()

    def _leave(self) -> None:
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        if not _ACTIVE:
            _watch_resizes(False)

    def reserve(self, nbytes: int, category: str = "other") -> Callable[[], None]:
        """Count ``nbytes`` that no tensor holds yet (e.g. optimizer state still to be created) as live,
        until the returned function is called (once; later calls do nothing)."""
        entry = _Entry(nbytes, category)
        self.live_bytes += nbytes
        self._live_by[category] += nbytes
        if self.live_bytes > self.peak_bytes:
            self.peak_bytes = self.live_bytes
            self.peak_breakdown = dict(self._live_by)
        released: list[bool] = []

        def release() -> None:
            if not released:
                released.append(True)
                self._release(entry)

        return release

    def track_model(self, model: torch.nn.Module) -> None:
        """Declare a model's parameters, buffers and (allocated) gradients."""
        self.track(list(model.parameters()), "parameters")
        self.track(list(model.buffers()), "other")
        self.track([p.grad for p in model.parameters() if p.grad is not None], "gradients")

    def mark_saved(self, t: torch.Tensor) -> None:
        """Re-label an activation as saved for backward (parameters and gradients keep their label)."""
        st = _storage(t)
        entry = self._entries.get(st) if st is not None else None
        if entry is not None and entry.category == "other":
            self._live_by["other"] -= entry.nbytes
            self._live_by["saved"] += entry.nbytes
            entry.category = "saved"

    def reset_peak(self) -> None:
        """Start a new window: the peak becomes the current live bytes."""
        self.peak_bytes = self.live_bytes
        self.peak_breakdown = dict(self._live_by)

    def live_breakdown(self) -> dict[str, int]:
        return dict(self._live_by)

    # ---- the mode ----------------------------------------------------------------------------------
    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops += 1
        flat_out = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not flat_out:
            return out
        inputs: list[torch.UntypedStorage] | None = None
        fresh = func in _FRESH
        for t in flat_out:
            st = _storage(t)
            if st is None or st in self._entries or (st in self._external and not fresh):
                continue
            if fresh and st.resizable():  # torch.tensor(data): allocated by torch just now (not numpy's memory)
                self._add(st, "other")
                continue
            if inputs is None:
                inputs = [s for s in (_storage(a) for a in tree_flatten((args, kwargs))[0]
                                      if isinstance(a, torch.Tensor)) if s is not None]
            if any(st is s for s in inputs):
                self._external[st] = True  # a view of, or in-place op on, an undeclared older storage
            else:
                self._add(st, "other")
        if self.count_flops:
            self._count(func, out, args, kwargs, flat_out)
        return out

    def _count(self, func: Any, out: Any, args: Any, kwargs: Any, flat_out: list[torch.Tensor]) -> None:
        fn = self._flop_registry.get(func._overloadpacket)
        if fn is not None:
            try:
                self.flops += float(fn(*args, **kwargs, out_val=out))
            except Exception:
                pass
        moved = sum(t.nbytes for t in flat_out)
        moved += sum(a.nbytes for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor))
        self.bytes_moved += moved


@dataclass(frozen=True)
class Measurement:
    """One training step, measured.

    Attributes:
        peak_bytes: peak live tensor bytes during the step (declared memory included).
        baseline_bytes: live bytes when the step started (parameters, gradients, inputs, ...).
        breakdown: live bytes by category at the moment of the peak: parameters, gradients, optimizer
            (state; only when an optimizer was given), saved (tensors saved for backward), other
            (temporaries, outputs, inputs).
        time_s: median wall time of the timed repeats.
        times_s: every timed repeat.
        device: where the step ran.
        set_to_none: whether gradients were set to None before each run (else zeroed in place and
            counted from the start).
        cuda_peak_bytes, cuda_baseline_bytes: the CUDA allocator's ``max_memory_allocated`` and
            ``memory_allocated`` at the start (None off CUDA; optimizer state still to be created is not in
            them).
        optimizer_state_bytes: optimizer state counted from the start of the step (0 without an optimizer).
        optimizer_state_predicted_bytes: the part of it that did not exist yet, predicted from the
            parameters (see :func:`remat.runtime.optimizer.optimizer_state_bytes`).
    """

    peak_bytes: int
    baseline_bytes: int
    breakdown: dict[str, int]
    time_s: float
    times_s: tuple[float, ...]
    device: str
    warmup: int
    set_to_none: bool
    cuda_peak_bytes: int | None = None
    cuda_baseline_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    optimizer_state_bytes: int = 0
    optimizer_state_predicted_bytes: int = 0

    @property
    def step_bytes(self) -> int:
        """What the step added on top of the baseline at its peak."""
        return self.peak_bytes - self.baseline_bytes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        rows = [[k, format_bytes(v)] for k, v in self.breakdown.items()]
        rows.append(["total", format_bytes(self.peak_bytes)])
        cuda = ""
        if self.cuda_peak_bytes is not None:
            cuda = f"; CUDA allocator peak {format_bytes(self.cuda_peak_bytes)}"
        grads = "set to None" if self.set_to_none else "kept (zeroed in place)"
        state = ""
        if "optimizer" in self.breakdown:
            state = f"; optimizer state {format_bytes(self.optimizer_state_bytes)}"
            if self.optimizer_state_predicted_bytes:
                state += f" ({format_bytes(self.optimizer_state_predicted_bytes)} of it not created yet, predicted)"
        timed = (f"step {format_seconds(self.time_s)} (median of {len(self.times_s)}, {self.warmup} warm-up)"
                 if self.times_s else "step not timed (repeats=0)")
        head = (
            f"remat.Measurement on {self.device}: peak {format_bytes(self.peak_bytes)} (step adds"
            f" {format_bytes(self.step_bytes)}){cuda}; {timed}; gradients {grads}{state}"
        )
        return head + "\n" + render_table(["at peak", "bytes"], rows)


def _sync(device: str) -> None:
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


def _model_device(model: torch.nn.Module | None) -> str:
    if model is not None:
        for p in model.parameters():
            return p.device.type
    return "cpu"


def reset_grads(model: torch.nn.Module | None, set_to_none: bool = False) -> None:
    """Before a measured step: free gradients (``set_to_none``) or zero them in place, kept allocated."""
    if model is None:
        return
    for p in model.parameters():
        if set_to_none:
            p.grad = None
        elif p.grad is not None:
            if p.grad.grad_fn is not None:
                p.grad.detach_()
            else:  # as Optimizer.zero_grad: a view (DDP's gradient_as_bucket_view) cannot be detached in place
                p.grad.requires_grad_(False)
            p.grad.zero_()


def measure(
    step: Callable[[], Any],
    *,
    model: torch.nn.Module | None = None,
    inputs: Iterable[torch.Tensor] | torch.Tensor | None = None,
    optimizer: torch.optim.Optimizer | str | None = None,
    warmup: int = 1,
    repeats: int = 3,
    set_to_none: bool = False,
    device: str | None = None,
) -> Measurement:
    """Measure one training step: exact peak tensor bytes, a breakdown, and the median wall time.

    Args:
        step: runs one step (forward, loss, backward; an optimizer step if you like), ``warmup + 1 + repeats`` times.
        model: its parameters, buffers and gradients are declared as live from the start; gradients are
            reset before each run as ``set_to_none`` says.
        inputs: other tensors that exist before the step and live through it (the batch).
        optimizer: whose state lives through the step, counted from the start: an instance (its state as
            it is; state not created yet is predicted from the parameters), or a name such as ``"adamw"``
            for a step that runs no optimizer (predicted for ``model``). Without it, state that exists
            before the step is not counted.
        warmup: untimed runs first (they also allocate gradients and lazy state such as optimizer state).
        repeats: timed runs (untracked, so the tracker's overhead is not timed); the median is reported.
        set_to_none: False (default): gradients stay allocated and are zeroed in place, so they count
            from the start — the steady state remat plans for. True: they are freed before each run and
            counted as they appear in backward.
        device: where the step runs; inferred from the model (default ``"cpu"``).

    Returns:
        A :class:`Measurement`.

    >>> lin = torch.nn.Linear(128, 128)
    >>> x = torch.randn(32, 128)
    >>> m = measure(lambda: lin(x).sum().backward(), model=lin, inputs=x, repeats=1)
    >>> m.breakdown["parameters"] == m.breakdown["gradients"] == (128 * 128 + 128) * 4
    True
    >>> m = measure(lambda: lin(x).sum().backward(), model=lin, inputs=x, optimizer="adam", repeats=0)
    >>> m.breakdown["optimizer"] == 2 * (128 * 128 + 128) * 4 + 2 * 4  # exp_avg, exp_avg_sq, 2 steps
    True
    """
    _check_measure_args(step, model, optimizer, warmup, repeats)
    device = device or _model_device(model)
    for _ in range(warmup):
        reset_grads(model, set_to_none)
        step()
    reset_grads(model, set_to_none)
    run = _TrackedRun(model, [inputs] if isinstance(inputs, torch.Tensor) else list(inputs or []), optimizer)
    with _CudaPeak(device) as cuda:
        run.run(step)
    times = _timed(step, model, set_to_none, device, repeats)
    breakdown = {k: v for k, v in run.tracker.peak_breakdown.items() if optimizer is not None or k != "optimizer"}
    return Measurement(
        peak_bytes=run.tracker.peak_bytes, baseline_bytes=run.baseline_bytes, breakdown=breakdown,
        time_s=statistics.median(times) if times else float("nan"), times_s=tuple(times), device=device,
        warmup=warmup, set_to_none=set_to_none, cuda_peak_bytes=cuda.peak_bytes,
        cuda_baseline_bytes=cuda.baseline_bytes, optimizer_state_bytes=run.optimizer_bytes,
        optimizer_state_predicted_bytes=run.predicted_bytes,
    )


def _check_measure_args(step: Any, model: Any, optimizer: Any, warmup: int, repeats: int) -> None:
    if not callable(step):
        raise RematError(f"remat.measure: step must be a callable running one training step, got {step!r}")
    if warmup < 0 or repeats < 0:
        raise RematError(f"remat.measure: warmup={warmup} and repeats={repeats} must be >= 0")
    if isinstance(optimizer, str) and model is None:
        raise RematError(f"remat.measure: optimizer={optimizer!r} needs model=: its parameters size the state")


class _CudaPeak:
    """The CUDA allocator's figures around the tracked run (None off CUDA)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda") and torch.cuda.is_available()
        self.baseline_bytes: int | None = None
        self.peak_bytes: int | None = None

    def __enter__(self) -> _CudaPeak:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline_bytes = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self.peak_bytes = torch.cuda.max_memory_allocated()


def _timed(step: Callable[[], Any], model: torch.nn.Module | None, set_to_none: bool, device: str,
           repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        reset_grads(model, set_to_none)
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


class _TrackedRun:
    """One run of the step under a :class:`MemoryTracker`, with what exists before it declared.

    Note: [Optimizer state in a measurement] State tensors that exist are declared as
    ``"optimizer"``; state not created yet is reserved as bytes, predicted from the parameters. If the
    optimizer's ``step()`` creates it during the run, a step pre-hook releases the reservation first, the
    tracker counts the new tensors as they are allocated, and a step post-hook re-labels them: the live
    count never holds the same state twice.
    """

    def __init__(self, model: torch.nn.Module | None, inputs: list[torch.Tensor], optimizer: Any) -> None:
        from remat.runtime.optimizer import optimizer_state_bytes, state_tensors, unwrap_optimizer

        optimizer = unwrap_optimizer(optimizer)  # accelerate's, Lightning's wrapper: the torch optimizer in it
        self.tracker = tracker = MemoryTracker()
        self.model = model
        self.optimizer = optimizer if isinstance(optimizer, torch.optim.Optimizer) else None
        if model is not None:
            tracker.track_model(model)
        tracker.track(inputs, "other")
        before = tracker.live_bytes
        if self.optimizer is not None:
            tracker.track(state_tensors(self.optimizer), "optimizer")
        self.predicted_bytes = optimizer_state_bytes(model, optimizer, missing_only=True) if optimizer else 0
        self._release = tracker.reserve(self.predicted_bytes, "optimizer")
        self.optimizer_bytes = tracker.live_bytes - before
        self.baseline_bytes = tracker.live_bytes
        tracker.reset_peak()

    def _hooks(self) -> list[Any]:
        tracker = self.tracker
        handles = []
        if self.model is not None:
            for p in self.model.parameters():
                if p.requires_grad:
                    handles.append(p.register_post_accumulate_grad_hook(
                        lambda q: tracker.track(q.grad, "gradients")))
        opt = self.optimizer
        if opt is not None and self.predicted_bytes:
            from remat.runtime.optimizer import state_tensors

            handles.append(opt.register_step_pre_hook(lambda *_: self._release()))
            handles.append(opt.register_step_post_hook(
                lambda *_: tracker.track(state_tensors(opt), "optimizer")))
        return handles

    def run(self, step: Callable[[], Any]) -> None:
        def pack(t: torch.Tensor) -> torch.Tensor:
            self.tracker.mark_saved(t)
            return t

        handles = self._hooks()
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), self.tracker:
                step()
        finally:
            for h in handles:
                h.remove()


def available_bytes(device: str) -> int | None:
    """Bytes a new allocation on ``device`` can still get, or None when unknown.

    CUDA: the driver's free memory plus what PyTorch's caching allocator holds unused. CPU: the least of
    the system's available memory (``MemAvailable``), the address-space limit of the process
    (``RLIMIT_AS``) less its current size, and its cgroup's memory limit less its usage.
    """
    if device.startswith("cuda"):
        dev = torch.device(device)
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev))
    if device != "cpu":
        return None
    limits = [v for v in (_mem_available(), _address_space_left(), _cgroup_left()) if v is not None]
    return min(limits) if limits else None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _mem_available() -> int | None:
    text = _read("/proc/meminfo") or ""
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def _address_space_left() -> int | None:
    try:
        import resource
    except ImportError:  # not on this platform
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    statm = _read("/proc/self/statm")
    if soft == resource.RLIM_INFINITY or statm is None:
        return None
    return max(0, soft - int(statm.split()[0]) * resource.getpagesize())


def _cgroup_left() -> int | None:
    limit, usage = _read("/sys/fs/cgroup/memory.max"), _read("/sys/fs/cgroup/memory.current")
    if limit is None or usage is None or limit.strip() == "max":
        return None
    return max(0, int(limit) - int(usage))


def optimizer_step_bytes(params_or_model: Any, spec: Any, *, foreach: bool | None = None) -> int:
    """Bytes the optimizer's ``step()`` allocates above the parameters, gradients and state, and frees before
    it returns (the temporaries of torch's multi-tensor ``foreach`` updates): measured exactly by running a
    copy of the optimizer, same class and parameter groups, on fake tensors of the parameters' shapes,
    dtypes and devices (no memory), a first step to make its state and a second, tracked.

    Note: [The optimizer's step] The step that trains is forward, backward and ``optimizer.step()``; after
    backward the activations are gone, but the parameters, the gradients, the state, what the loop still
    holds (its output) and the step's temporaries are live at once. A budget covers that moment too.

    ``foreach``: the path the real step takes where its groups leave it to torch; default: torch's choice for
    these parameters (on ``meta``, give the target device's: ``True`` for CUDA). Returns 0 for no optimizer
    (or plain SGD without state). An optimizer whose step does not run on fake tensors is charged one copy
    of the parameters, with a warning.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from remat.runtime.optimizer import params_of, state_tensors, unwrap_optimizer

    opt = unwrap_optimizer(spec)
    if isinstance(opt, str) and opt.lower() in ("none", "sgd"):
        return 0  # no state, one fused update per parameter in place
    params = params_of(params_or_model if params_or_model is not None else
                     [p for g in getattr(opt, "param_groups", []) for p in g["params"]])
    if opt is None or not params:
        return 0
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fakes = {id(p): mode.from_tensor(p.detach()).requires_grad_() for p in params}
            grads = [torch.zeros_like(f) for f in fakes.values()]
            for f, g in zip(fakes.values(), grads):
                f.grad = g
            clone = _clone(opt, fakes, _foreach_as_real(params) if foreach is None else foreach)
            clone.step()
            tracker = MemoryTracker()
            tracker.track([*fakes.values(), *grads])
            tracker.track(state_tensors(clone), "optimizer")
            start = tracker.live_bytes
            with tracker:
                clone.step()
            return max(0, tracker.peak_bytes - start)
    except RematError:
        raise
    except Exception as e:  # a step that reads values (Adafactor's RMS), a kernel fakes lack: the safe side
        whole = sum(p.untyped_storage().nbytes() for p in params)
        log.warning("remat: the step of %s does not run on a fake copy of the parameters (%s: %s); its temporaries"
                    " are counted as one copy of the parameters (%d B)",
                    opt if isinstance(opt, str) else type(opt).__name__, type(e).__name__, str(e)[:120], whole)
        return whole


def _foreach_as_real(params: list[torch.Tensor]) -> bool:
    """Whether torch's optimizers take their multi-tensor path on these (real) parameters by default. A fake
    tensor is not of an exact tensor type, so a copy on fakes would take the one-tensor path (smaller
    temporaries): the copy is told which path the real step takes (CUDA: multi-tensor; CPU: one tensor)."""
    from torch.optim.optimizer import _default_to_fused_or_foreach

    return bool(_default_to_fused_or_foreach(params, False, False)[1])


def _clone(opt: Any, fakes: dict[int, Any], foreach: bool) -> Any:
    """The optimizer ``opt`` (or the one a name stands for) over the fake parameters, with its groups' options;
    a group that leaves ``foreach`` to torch gets the path the real step takes."""
    if isinstance(opt, str):
        name = opt.lower()
        cls, options = {"adam": (torch.optim.Adam, {}), "adamw": (torch.optim.AdamW, {}),
                        "sgd-momentum": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
                        "sgd": (torch.optim.SGD, {"lr": 0.1})}.get(name, (None, {}))
        if cls is None:
            raise RematError(f"remat: unknown optimizer {opt!r}")
        return cls(list(fakes.values()), **options, foreach=foreach)
    groups = [{**{k: v for k, v in g.items() if k != "params"},
               "params": [fakes[id(p)] for p in g["params"] if id(p) in fakes]} for g in opt.param_groups]
    for g in groups:
        if "foreach" in g and g["foreach"] is None and not g.get("fused"):
            g["foreach"] = foreach
    return type(opt)([g for g in groups if g["params"]])
