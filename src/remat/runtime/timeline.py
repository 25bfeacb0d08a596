"""What one profiled run of a training step looked like: boundary events and the windows between them.

:class:`Timeline` puts hooks at every stage boundary — forward pre/post hooks on the blocks, tensor hooks
on the gradients that flow between them — and logs (time, live bytes, window peak, FLOPs) at each, while
:class:`remat.MemoryTracker` counts live bytes. :class:`Run` reads such a log as typed windows: the
prologue, each block's forward, the code between two blocks, each block's backward, and the head.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from remat.errors import ProfileError
from remat.runtime.measure import MemoryTracker
from remat.runtime.model import carry_of, extras_of, same_extras, split_carry

__all__ = ["THROUGHPUTS", "Event", "Key", "Lingering", "Run", "Throughput", "Timeline", "Tracked", "Window"]

#: A window's name in a log: (label of the event that ends it, block index).
Key = tuple[str, int]
#: Who saved a tensor for backward: "prologue", block k, or ("after", k): the code after block k.
Saver = str | int | tuple[str, int]

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


class Tracked(MemoryTracker):
    """The tracker, plus a roofline time estimate per op."""

    def __init__(self, throughput: Throughput | None) -> None:
        super().__init__(count_flops=throughput is not None)
        self.throughput = throughput
        self.est_s = 0.0
        #: The window being run: the index of the event that will end it (Timeline.mark sets it).
        self.epoch = 0
        self._born: dict[int, int] = {}  # live entry -> the epoch it was allocated in
        self._carried: set[int] = set()  # live entries that were a block's input or output
        #: Storages freed during the run: (epoch allocated, epoch freed, bytes), block inputs and outputs aside.
        self.freed: list[tuple[int, int, int]] = []

    def _add(self, st: torch.UntypedStorage, category: str, relabel: bool = False) -> None:
        super()._add(st, category, relabel)
        entry = self._entries.get(st)
        if entry is not None and id(entry) not in self._born:
            self._born[id(entry)] = self.epoch

    def carry(self, t: torch.Tensor) -> None:
        """``t`` is a block's input or output: its release is no lingering (Note [Lingering bytes])."""
        entry = self._entries.get(t.untyped_storage())
        if entry is not None:
            self._carried.add(id(entry))

    def _release(self, entry: Any) -> None:
        super()._release(entry)
        born = self._born.pop(id(entry), None)
        if id(entry) in self._carried:
            self._carried.discard(id(entry))
        elif born is not None:
            self.freed.append((born, self.epoch, entry.nbytes))

    def _count(self, func: Any, out: Any, args: Any, kwargs: Any, flat_out: list[torch.Tensor]) -> None:
        f0, b0 = self.flops, self.bytes_moved
        super()._count(func, out, args, kwargs, flat_out)
        assert self.throughput is not None
        self.est_s += max((self.flops - f0) / self.throughput.flops_per_s,
                          (self.bytes_moved - b0) / self.throughput.bytes_per_s)


@dataclass
class Event:
    label: str  # start, pre, post, bwd_head, bwd, end
    index: int
    t: Any
    live: int = 0
    peak: int = 0
    flops: float = 0.0
    est_s: float = 0.0
    ops: int = 0  # ops run in the window that ends here


def _sides(out: Any, inputs: Any) -> list[tuple[Any, int]]:
    """The tensors a block returned besides its carry that it made (not one of its inputs handed back, as T5's
    blocks return the position bias they were given): (storage reference, bytes), each storage once."""
    carry = carry_of(out)
    given = {id(t.untyped_storage()) for t in torch.utils._pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)}
    if isinstance(carry, torch.Tensor):
        given.add(id(carry.untyped_storage()))
    found: dict[int, tuple[Any, int]] = {}
    for t in torch.utils._pytree.tree_leaves(out):
        if isinstance(t, torch.Tensor) and id(t.untyped_storage()) not in given:
            found.setdefault(id(t.untyped_storage()), (_ref(t.untyped_storage()), t.untyped_storage().nbytes()))
    return list(found.values())


def _ref(storage: Any) -> Any:
    try:
        return weakref.ref(storage)
    except TypeError:
        return None


def _dead(ref: Any) -> bool:
    return ref is not None and ref() is None


class Timeline:
    """Hooks at stage boundaries that log (time, live bytes, window peak) as the step runs."""

    def __init__(self, blocks: Sequence[nn.Module], tracker: Tracked | None, cuda: bool) -> None:
        self.blocks = blocks
        self.tracker = tracker
        self.cuda = cuda
        self.events: list[Event] = []
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
        # Whether block k's input was freed by the time block k + 2 starts (Note [Tensors that live on]).
        self.in_freed_after_next: list[bool] = [True] * len(blocks)
        self.out_freed_by_glue: list[bool] = [False] * len(blocks)
        self._done: set[int] = set()
        # Which storages each window saved for backward: "prologue", block k, or ("after", k).
        self.window: Saver = "prologue"
        self.saved_by: dict[Saver, set[int]] = {}
        self.carry_storage: list[int | None] = [None] * len(blocks)
        self.out_storage: list[int | None] = [None] * len(blocks)
        self.pinned: set[int] = set()
        self._last_out: Any = lambda: None
        self.output_held = False  # the last block's output still live at the end of the step
        # The head's backward: the bytes of the gradient it gave the last block (an expanded scalar for a
        # sum, smaller than the output), and whether the output was gone by then.
        self.head_grad_bytes = 0
        self.output_gone_at_head_grad = False
        # Per block: the new tensors it returned besides its carry (Note [Side tensors] in the cost model), as
        # (storage reference, bytes); and, at the end of the step, the bytes of those still alive.
        self.sides: list[list[tuple[Any, int]]] = [[] for _ in blocks]
        self.sides_at_end: list[int] = [0] * len(blocks)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            self.saved_by.setdefault(self.window, set()).add(id(t.untyped_storage()))
        except (RuntimeError, NotImplementedError):
            pass
        return t

    def mark(self, label: str, index: int = -1) -> None:
        if label == "end":
            self.output_held = self._last_out() is not None
            self.sides_at_end = [sum(n for ref, n in side if ref is not None and ref() is not None)
                                 for side in self.sides]
        if self.cuda:
            t: Any = torch.cuda.Event(enable_timing=True)
            t.record()
        else:
            t = time.perf_counter()
        ev = Event(label, index, t)
        tr = self.tracker
        if tr is not None:
            ev.live, ev.peak = tr.live_bytes, tr.peak_bytes
            ev.flops, ev.est_s = tr.flops, tr.est_s
            ev.ops, self._ops_seen = tr.ops - self._ops_seen, tr.ops
            tr.reset_peak()
            tr.flops, tr.est_s = 0.0, 0.0
            tr.epoch = len(self.events) + 1
        self.events.append(ev)

    def __enter__(self) -> Timeline:
        for k, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(self._pre(k), with_kwargs=True))
            self._handles.append(block.register_forward_hook(self._post(k), with_kwargs=True))
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
            if isinstance(self.tracker, Tracked):
                self.tracker.carry(carry)
            self.carry_storage[k] = id(carry.untyped_storage())
            if k > 0:
                self.in_freed_by_glue[k - 1] = _dead(self._in_ref[k - 1])
            if k > 1:
                self.in_freed_after_next[k - 2] = _dead(self._in_ref[k - 2])
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
        def hook(module: nn.Module, args: Any, kwargs: dict[str, Any], out: Any) -> None:
            if k in self._done:
                return
            self._done.add(k)
            self.sides[k] = _sides(out, (args, kwargs))
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
                if isinstance(self.tracker, Tracked):
                    self.tracker.carry(c)
                self._out_ref[k] = _ref(c.untyped_storage())
            if k == len(self.blocks) - 1 and isinstance(c, torch.Tensor):
                self.head_x_bytes = c.untyped_storage().nbytes()
                self._last_out = weakref.ref(c.untyped_storage())
                if c.requires_grad and torch.is_grad_enabled():
                    c.register_hook(self._head_done)

        return hook

    def _head_done(self, grad: torch.Tensor) -> None:
        """The gradient of the last block's output has arrived: the head's backward is done."""
        self.head_grad_bytes = grad.untyped_storage().nbytes()
        self.output_gone_at_head_grad = self._last_out() is None
        self.mark("bwd_head", len(self.blocks) - 1)

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

    def freed_by_glue(self, k: int) -> tuple[int, int]:
        """Bytes of block k's input and of its output that the code after it released."""
        return ((self.x_bytes[k] or 0) if self.in_freed_by_glue[k] else 0,
                self.out_bytes[k] if self.out_freed_by_glue[k] else 0)

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

    def durations(self) -> dict[Key, float]:
        """Seconds of the window that ends at each event, keyed by (label, index)."""
        if self.cuda:
            torch.cuda.synchronize()
        out = {}
        for a, b in zip(self.events, self.events[1:]):
            dt = a.t.elapsed_time(b.t) / 1e3 if self.cuda else b.t - a.t
            out[(b.label, b.index)] = dt
        return out


@dataclass(frozen=True)
class Window:
    """What the step did between two boundary events."""

    start: Event
    end: Event

    @property
    def key(self) -> Key:
        return (self.end.label, self.end.index)

    @property
    def rise(self) -> int:
        """Live bytes gained over the window."""
        return self.end.live - self.start.live

    @property
    def transient(self) -> int:
        """How far the window's peak rose above the live bytes at its end."""
        return max(0, self.end.peak - self.end.live)


class Run:
    """A logged run of the step over ``n`` blocks, read as windows by what ran in them."""

    def __init__(self, tl: Timeline, n: int) -> None:
        ev = {(b.label, b.index): Window(a, b) for a, b in zip(tl.events, tl.events[1:])}
        self.tl = tl
        self.start = tl.events[0]
        self.peak = max(e.peak for e in tl.events)
        self.prologue = ev[("pre", 0)]
        self.block = [ev[("post", k)] for k in range(n)]
        #: glue[k]: the code the model runs between block k and block k + 1.
        self.glue = {k: ev[("pre", k + 1)] for k in range(n - 1)}
        #: backward[k]: block k's backward window (-1: the prologue's).
        self.backward = backward_windows(tl, n)
        self.head_has_grad = ("bwd_head", n - 1) in ev
        #: The head: from the last block's output through the loss, and back (recording runs).
        self.head = ev[("bwd_head", n - 1)] if self.head_has_grad else ev[("end", -1)]
        self._index = {id(e): i for i, e in enumerate(tl.events)}
        self._lingering = _lingering(tl, self._index[id(self.block[-1].end)] if n else 0)

    def lingering(self, w: Window) -> Lingering:
        """What window ``w`` of the forward leaves to a later one to free, and what earlier ones left to it."""
        i = self._index[id(w.end)]
        own, live, freed = self._lingering
        return Lingering(own.get(i, 0), live.get(i, 0), freed.get(i, 0))


@dataclass(frozen=True)
class Lingering:
    """Note: [Lingering bytes] A tensor a forward window allocates, keeps past its end and a later forward
    window frees (before the head) is no part of the window's record: it is not kept to the backward. BLOOM's
    attention computes its scores in the code before its output projection and frees them when it returns,
    after the projection: counted as kept by the code before, they were counted twice (+5% to +22% over the
    measured peak). Such bytes are the window's transient and every later window's until the one that frees
    them. Block inputs and outputs are not lingering: their release is counted as such (input_freed_bytes,
    output_released_bytes)."""

    own: int = 0  # allocated in this window, freed by a later forward window
    live: int = 0  # allocated in an earlier window, freed in this one or a later one
    freed: int = 0  # allocated in an earlier window, freed in this one


def _lingering(tl: Timeline, last: int) -> tuple[dict[int, int], dict[int, int], dict[int, int]]:
    """Lingering bytes (Note [Lingering bytes]) by forward window (the index of the event that ends it)."""
    own: dict[int, int] = {}
    live: dict[int, int] = {}
    freed: dict[int, int] = {}
    for born, died, nbytes in getattr(tl.tracker, "freed", ()):
        if not 1 <= born < died <= last:
            continue
        own[born] = own.get(born, 0) + nbytes
        freed[died] = freed.get(died, 0) + nbytes
        for k in range(born + 1, died + 1):
            live[k] = live.get(k, 0) + nbytes
    return own, live, freed


def backward_windows(tl: Timeline, n: int) -> dict[int, Window]:
    """Each stage's backward window, by block index (-1: the prologue).

    Each "bwd" event ends one block's backward; the last window ("end") holds the backward of the block
    whose input needs no gradient (and so has no hook), if there is one, else the prologue's.
    """
    order = [e for e in tl.events if e.label in ("bwd_head", "bwd", "end")]
    lowest = min((e.index for e in order if e.label == "bwd"), default=n)
    return {(e.index if e.label == "bwd" else lowest - 1): Window(prev, e) for prev, e in zip(order, order[1:])}
