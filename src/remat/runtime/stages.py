"""Stage discovery by watching one forward, and the LayerDrop switch used while profiling.

Note: [Watching one forward]
The model runs once without recording (``torch.no_grad()``; its RNG state and buffers are restored after)
with a hook pair on every submodule and a dispatch mode that logs each op's input and output tensors. That
gives the module call tree and the data flow between calls. The chain of stages is then found top-down:

1. At a call, its *members* are the direct sub-calls the hidden state flows through, in order: a sub-call
   whose first tensor input derives from the previous member's output (through any code between them),
   or, from the second member on, one whose other inputs do (a decoder reading the encoder's output).
   The first member's input derives from the call's own input. Only *eligible* calls are members: a
   module called exactly once in the forward, with parameters (a lone ReLU, Dropout or Flatten is code
   between stages), a tensor as its first input and as its output (more may come with it), and not
   changing its input in place. Of two chains of one length, the one whose links hand the hidden state
   on as the first input wins (a U-Net's time embedding, read by every block, is not its first stage).
2. A member is replaced by its own members (a container such as ResNet's ``layer1``, VGG's
   ``features``, an encoder's stack of blocks) when the call's code after its last member reads nothing
   but that member's output (no residual around the container: a residual block is a stage, not its
   layers) and they form a stack (two of one class, or three of repeated classes, handing the hidden
   state straight on), or some of them are containers too, or it is a container of its own kind running
   blocks the model runs elsewhere too (a U-Net's down, middle and up blocks). A member with a single
   member of its own is replaced by that one's expansion, or by it when the call's own code does not
   touch the hidden state.
3. The root is always expanded, and so is a model that a wrapper hands the root's inputs to and whose
   output it returns as it is (PEFT's ``PeftModel`` → ``LoraModel`` → the base model). The chain is then
   trimmed to the span from the first to the last member of a repeated class written outside ``torch``
   (else leading embeddings are dropped): embeddings before the blocks and a classifier after them stay
   in the prologue and head.
4. A stage may return tensors besides its carry that later stages read (T5's position bias, made by block 0
   and read by every later block), and its output may live on after the next stage has returned (the encoder
   output every decoder block reads, a U-Net's skip connection): it is a stage like any other. What it leaves
   live is measured, not assumed: a region never spans a boundary whose tensor lives on (Note [Tensors that
   live on] in assemble.py), and what a checkpointed stage leaves beyond its output is charged as held (Note
   [Outputs the model keeps]).

5. An ``nn.Sequential`` that would stay one stage (its members form no stack, and it is not a block of a
   stack itself) and only runs its children, each handing its output straight to the next (an ``nn.Sequential``: VGG's
   ``features``, conv, ReLU(inplace=True), conv, ..., MaxPool), is replaced by its *spans*: each child with
   parameters with the children without parameters, in place, or norms after it ("conv (+ BatchNorm) + ReLU
   (+ pool)", the unit torchvision users checkpoint; Note [Spans] in span.py), where some span holds more
   than one child. A lone child of a span is that child.

Code between two stages becomes a glue stage in the profile (Note [Glue] in the profiler).
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import sys
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from remat.errors import ProfileError
from remat.runtime.span import Span, children_of, span_name

__all__ = ["carry_of", "discover", "layerdrop_draws_without_skipping", "split_carry"]


def carry_of(out: Any) -> Any:
    """The tensor a block hands to the next one: itself, or the first element of a tuple/list/dict."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return out[0]
    if isinstance(out, Mapping) and out:
        return next(iter(out.values()))
    return None


def split_carry(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """``(carry, key)``: the block's chained input and where it was passed (0 or a keyword name).

    Called by keyword only, it is the keyword of the forward's first parameter; for a pass-through
    ``forward(*args, **kwargs)`` (PEFT's ``LoraModel``, which hands every keyword to the model it wraps),
    the first tensor keyword, in the order of the call."""
    if args:
        return args[0], 0
    try:
        first = next(iter(inspect.signature(module.forward).parameters.values()))
    except (StopIteration, ValueError, TypeError):
        return None, None
    if first.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
        return next(((v, k) for k, v in kwargs.items() if isinstance(v, torch.Tensor)), (None, None))
    if first.name in kwargs:
        return kwargs[first.name], first.name
    # transformers' models take their hidden state as `inputs_embeds` instead of `input_ids` (a Llava's
    # language model, given the text embeddings with the image features scattered in)
    embeds = kwargs.get("inputs_embeds")
    if first.name == "input_ids" and isinstance(embeds, torch.Tensor):
        return embeds, "inputs_embeds"
    return None, None


# ----------------------------------------------------------------------------------------------------
# LayerDrop while profiling
# ----------------------------------------------------------------------------------------------------


#: What a LayerDrop probability that draws but never skips is, compared with a Python number.
_TINY = 5e-324


class _DrawWithoutSkipping(float):
    """A LayerDrop probability that is the smallest positive number to Python comparisons (``p > 0``,
    ``p == 0``: the model makes its random draw) and 0 to tensors (``torch.rand(()) < p`` is never true:
    no block is skipped)."""

    def __gt__(self, other: Any) -> bool:
        return _TINY > other if isinstance(other, (int, float)) else float(self) > other

    def __ge__(self, other: Any) -> bool:
        return _TINY >= other if isinstance(other, (int, float)) else float(self) >= other

    def __lt__(self, other: Any) -> bool:
        return _TINY < other if isinstance(other, (int, float)) else float(self) < other

    def __le__(self, other: Any) -> bool:
        return _TINY <= other if isinstance(other, (int, float)) else float(self) <= other

    def __eq__(self, other: Any) -> bool:
        return _TINY == other if isinstance(other, (int, float)) else float(self) == other

    def __ne__(self, other: Any) -> bool:
        return not self.__eq__(other)

    def __bool__(self) -> bool:
        return True

    __hash__ = float.__hash__


def _is_layerdrop(name: str, value: Any) -> bool:
    key = name.lower().replace("_", "")
    if "layerdrop" not in key:
        return False
    values = value if isinstance(value, (tuple, list)) else [value]
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1 for v in values)
    return numbers and any(v > 0 for v in values)


def _no_skip(value: Any) -> Any:
    """Positive probabilities replaced; a probability of 0 stays (a model may draw only when it is > 0)."""
    if isinstance(value, (tuple, list)):
        return type(value)(_DrawWithoutSkipping(0.0) if v > 0 else v for v in value)
    return _DrawWithoutSkipping(0.0)


def _attributes(owner: Any) -> list[tuple[str, Any]]:
    """``(name, value)`` of an object's attributes: its ``__dict__`` and its slots (torchtitan's model
    configs are ``@dataclass(slots=True)``: no ``__dict__``)."""
    found = dict(getattr(owner, "__dict__", {}))
    for cls in type(owner).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for name in [slots] if isinstance(slots, str) else slots:
            if name not in ("__dict__", "__weakref__") and name not in found and hasattr(owner, name):
                found[name] = getattr(owner, name)
    return list(found.items())


@contextlib.contextmanager
def layerdrop_draws_without_skipping(model: nn.Module) -> Iterator[None]:
    """While profiling: every LayerDrop probability (an attribute of a module or of its ``config`` whose
    name contains ``layerdrop``/``layer_drop``: transformers' ``config.layerdrop``,
    ``encoder_layerdrop``, a model's own ``self.layerdrop``) is replaced by one that draws but never
    skips. The profile then sees every block and the random draw between blocks (glue, so those blocks
    never share a checkpoint region, and a block skipped in training is a region of its own)."""
    changed: list[tuple[Any, str, Any]] = []
    owners = {id(o): o for m in model.modules() for o in (m, getattr(m, "config", None)) if o is not None}
    for owner in owners.values():
        for name, value in _attributes(owner):
            if _is_layerdrop(name, value):
                changed.append((owner, name, value))
    try:
        for owner, name, value in changed:
            object.__setattr__(owner, name, _no_skip(value))
        yield
    finally:
        for owner, name, value in changed:
            object.__setattr__(owner, name, value)


# ----------------------------------------------------------------------------------------------------
# Recording one forward
# ----------------------------------------------------------------------------------------------------


@dataclass
class _Call:
    name: str
    module: nn.Module
    start: int  # index of its first op
    parent: int = -1  # the call that called it
    end: int = -1  # index after its last op
    children: list[int] = field(default_factory=list)
    carry: int | None = None  # serial of its first tensor input
    extras: list[int] = field(default_factory=list)  # serials of its other tensor inputs
    out: int | None = None  # serial of (the first tensor of) its output
    in_place: bool = False
    more_out: bool = False  # it returns new tensors besides the carry


@dataclass
class _Op:
    ins: tuple[int, ...]
    outs: tuple[int, ...]


class _Recorder(TorchDispatchMode):
    """The call tree (module hooks) and every op's tensors (a dispatch mode), by tensor serial."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.names = {id(m): n for n, m in model.named_modules()}
        self.modules = [m for _, m in model.named_modules()]
        self.calls: list[_Call] = []
        self.ops: list[_Op] = []
        self.counts: dict[int, int] = {}
        self.stack: list[int] = []
        self._serials: dict[int, tuple[int, Any]] = {}
        self._next = itertools.count()
        self._versions: dict[int, int] = {}
        self.root_inputs: list[int] = []
        self.deaths: dict[int, int] = {}  # tensor serial -> ops run before it was freed

    def serial(self, t: torch.Tensor) -> int:
        entry = self._serials.get(id(t))
        if entry is not None and entry[1]() is t:
            return int(entry[0])
        s = next(self._next)
        self._serials[id(t)] = (s, weakref.ref(t, lambda _: self.deaths.__setitem__(s, len(self.ops))))
        return s

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves
        ins = tuple(self.serial(t) for t in leaves((args, kwargs or {})) if isinstance(t, torch.Tensor))
        outs = tuple(self.serial(t) for t in leaves(out) if isinstance(t, torch.Tensor))
        self.ops.append(_Op(ins, outs))
        return out

    def pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.counts[id(module)] = self.counts.get(id(module), 0) + 1
        call = _Call(self.names.get(id(module), "?"), module, len(self.ops))
        carry, _ = split_carry(module, args, kwargs)
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if isinstance(carry, torch.Tensor):
            call.carry = self.serial(carry)
            self._versions[len(self.calls)] = carry._version
        call.extras = [self.serial(t) for t in tensors if t is not carry]
        if self.stack:
            call.parent = self.stack[-1]
            self.calls[call.parent].children.append(len(self.calls))
        self.stack.append(len(self.calls))
        self.calls.append(call)

    def post(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        if not self.stack:
            return
        index = self.stack.pop()
        call = self.calls[index]
        call.end = len(self.ops)
        carry, _ = split_carry(module, args, kwargs)
        if isinstance(carry, torch.Tensor) and index in self._versions:
            call.in_place = carry._version != self._versions[index]
        c = carry_of(out)
        if isinstance(c, torch.Tensor):
            call.out = self.serial(c)
        given = {call.carry, *call.extras}  # handed back (T5's position bias after the first block): no new bytes
        call.more_out = any(t is not c and self.serial(t) not in given
                            for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))

    @contextlib.contextmanager
    def hooked(self) -> Iterator[None]:
        handles = []
        for m in self.modules:
            handles.append(m.register_forward_pre_hook(self.pre, with_kwargs=True))
            handles.append(m.register_forward_hook(self.post, with_kwargs=True, always_call=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def _is_fake(model: nn.Module, tensors: Sequence[torch.Tensor]) -> bool:
    fake = sys.modules.get("torch._subclasses.fake_tensor")  # not imported: there is no fake tensor
    kind = getattr(fake, "FakeTensor", ())
    every = [*tensors, *model.parameters(), *model.buffers()]
    return any(isinstance(t, kind) or t.device.type == "meta" for t in every)


@contextlib.contextmanager
def _state_kept(model: nn.Module, tensors: Sequence[torch.Tensor]) -> Iterator[None]:
    """The model's buffers (BatchNorm statistics) and the RNG state as they were; nothing to keep on a
    fake or meta copy."""
    if _is_fake(model, tensors):
        yield
        return
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({t.device.index or 0 for t in [*tensors, *model.parameters()] if t.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for b, v in buffers:
                    b.copy_(v)


def _record(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Recorder:
    rec = _Recorder(model)
    inputs = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    # The model's own errors propagate as they are: profiling would meet them in its first step too.
    with _state_kept(model, inputs), layerdrop_draws_without_skipping(model), torch.no_grad(), rec.hooked(), rec:
        model(*args, **kwargs)
    rec.root_inputs = [rec.serial(t) for t in inputs]
    return rec


# ----------------------------------------------------------------------------------------------------
# Finding the chain
# ----------------------------------------------------------------------------------------------------


Tags = frozenset[int]


@dataclass
class _Level:
    """What the ops of one call did, seen from its direct sub-calls. Tensors are tagged with the set of
    sub-calls whose output they derive from (-1: the call's input) — a sub-call that *resets* starts a
    new tag on its outputs, the others pass their inputs' tags through like any op."""

    tags_in: dict[int, tuple[Tags, Tags]]  # by sub-call: the tags of its first input, of its other inputs
    reads: list[tuple[int, Tags]]  # (op index, tags it read) for every op outside a resetting sub-call


@dataclass
class _Shape:
    tail_clean: bool  # the code after the last member reads only its output (no residual around them)
    handed: list[bool]  # per pair of consecutive members: no code touches the output in between
    wrapper: bool  # no code of the call itself touches the hidden state


class _Chain:
    def __init__(self, rec: _Recorder) -> None:
        self.rec = rec
        self.eligible = {i for i, c in enumerate(rec.calls) if self._eligible(c)}
        self.kinds: dict[type, int] = {}  # how many calls of each module class the forward made
        for c in rec.calls:
            self.kinds[type(c.module)] = self.kinds.get(type(c.module), 0) + 1

    def _eligible(self, c: _Call) -> bool:
        return (self.rec.counts.get(id(c.module), 0) == 1 and c.carry is not None and c.out is not None
                and not c.in_place and c.end >= 0 and any(True for _ in c.module.parameters()))

    def _walk(self, index: int, start: Sequence[int], resets: set[int], side: Sequence[int] = ()) -> _Level:
        rec, call = self.rec, self.rec.calls[index]
        tag: dict[int, Tags] = {**dict.fromkeys(side, frozenset({-2})), **dict.fromkeys(start, frozenset({-1}))}
        level = _Level({}, [])
        pos = call.start
        for child in call.children:
            c = rec.calls[child]
            self._flow(pos, c.start, tag, level)
            if child in resets:
                extras: Tags = frozenset().union(*(tag.get(e, frozenset()) for e in c.extras))
                level.tags_in[child] = (tag.get(c.carry, frozenset()) if c.carry is not None else frozenset(), extras)
                mine = frozenset({child})
                for op in rec.ops[c.start:c.end]:
                    tag.update(dict.fromkeys(op.outs, mine))
                if c.out is not None:
                    tag[c.out] = mine
            else:
                self._flow(c.start, c.end, tag, level)
            pos = c.end
        self._flow(pos, call.end, tag, level)
        return level

    def _flow(self, lo: int, hi: int, tag: dict[int, Tags], level: _Level) -> None:
        for i in range(lo, hi):
            op = self.rec.ops[i]
            read: Tags = frozenset().union(*(tag[s] for s in op.ins if s in tag))
            if read:
                level.reads.append((i, read))
                tag.update(dict.fromkeys(op.outs, read))

    def members(self, index: int, start: Sequence[int], side: Sequence[int] = ()) -> list[int]:
        """The longest chain of eligible sub-calls of call ``index``: each takes (in its first input, or
        in another one: a decoder block reading the encoder's output) what the one before it returned;
        the first takes the call's input (``start``), or one of its other inputs (``side``: a Llava's images,
        whose tower and projector run before its language model)."""
        children = [c for c in self.rec.calls[index].children if c in self.eligible]
        level = self._walk(index, start, set(children), side)
        # child -> (chain length ending there, links through a first input, previous)
        best: dict[int, tuple[int, int, int | None]] = {}
        for c in children:
            carry, extras = level.tags_in[c]
            options: list[tuple[int, int, int | None]] = [
                (best[d][0] + 1, best[d][1] + (d in carry), d) for d in best if d in carry or d in extras]
            if -1 in carry or -2 in carry:
                options.append((1, int(-1 in carry), None))
            if options:
                best[c] = max(options, key=lambda o: o[:2])
        if not best:
            return []
        end: int | None = max(best, key=lambda c: (best[c][0], best[c][1], c))
        chain = []
        while end is not None:
            chain.append(end)
            end = best[end][2]
        return chain[::-1]

    def expand(self, index: int, spans: bool = True) -> list[int] | None:
        """The members that replace call ``index`` (rule 2), or its spans (rule 5, unless ``spans`` is off:
        a block of a stack is not split into its layers), or None."""
        carry = self.rec.calls[index].carry
        assert carry is not None
        members = self.members(index, [carry], self.rec.calls[index].extras)
        if not members:
            return None
        shape = self._shape(index, [carry], members)
        if not shape.tail_clean:
            return None
        if len(members) == 1:
            return self.expand(members[0]) or ([members[0]] if shape.wrapper else None)
        classes = [type(self.rec.calls[m].module) for m in members]
        stacked = _stack(classes, shape.handed)
        subs = [self.expand(m, spans=not stacked) for m in members]
        plain = all(s is None for s in subs) and not self._holds_blocks(index, members)
        if not stacked and plain:
            return self._spans(index) if spans else None
        return [x for m, s in zip(members, subs) for x in (s if s is not None else [m])]

    def _spans(self, index: int) -> list[int] | None:
        """Rule 5: the call's children as spans (Note [Spans] in span.py), or None. Its children must run in
        order, each handing its output straight to the next, with no code of the call's own around them (an
        ``nn.Sequential``: its children's names are their positions, so a span's name reads as the children it
        holds; a module of another class keeps its stages), and it returns nothing else. Each child with
        parameters but a norm starts a span, which the children without parameters, working in place, or norms
        after it join. At least two spans, one of more than one child, each starting at a child that does not
        change its input in place (the checkpoint's saved input would change); a lone child is itself."""
        calls, call = self.rec.calls, self.rec.calls[index]
        kids = [calls[c] for c in call.children]
        if (not isinstance(call.module, nn.Sequential) or len(kids) < 2 or call.more_out
                or not _straight(call, kids) or any(self.rec.counts.get(id(k.module)) != 1 for k in kids)):
            return None
        params = [j for j, k in enumerate(kids) if any(True for _ in k.module.parameters())]
        firsts = [j for j in params if j == params[0] or _starts_span(kids[j].module)]
        lone = all(b - a == 1 for a, b in zip(firsts, [*firsts[1:], len(kids)]))
        if len(firsts) < 2 or lone or any(kids[j].in_place for j in firsts):
            return None  # one stage, or members the rules above chose not to split
        positions = {id(m): i for i, m in enumerate(children_of(call.module))}
        out = []
        for a, b in zip(firsts, [*firsts[1:], len(kids)]):
            start, stop = positions[id(kids[a].module)], positions[id(kids[b - 1].module)] + 1
            if stop - start != b - a:  # children called in another order than they are registered
                return None
            if b - a == 1:
                out.append(call.children[a])
                continue
            span = Span(call.module, start, stop)
            calls.append(_Call(span_name(call.name, start, stop), span, kids[a].start, index, kids[b - 1].end,
                               carry=kids[a].carry, out=kids[b - 1].out))
            out.append(len(calls) - 1)
        return out

    def _holds_blocks(self, index: int, members: list[int]) -> bool:
        """A container of its own kind (its class called once in the forward) that runs blocks the model runs
        elsewhere too: a U-Net's down, middle and up blocks, each a few residual and attention blocks with
        code between them (the skip connections)."""
        calls, kinds = self.rec.calls, self.kinds
        return kinds.get(type(calls[index].module)) == 1 and any(
            kinds.get(type(calls[m].module), 0) >= 2 and not type(calls[m].module).__module__.startswith("torch.")
            for m in members)

    def _shape(self, index: int, start: Sequence[int], members: list[int]) -> _Shape:
        """How the call's own code touches the hidden state around its members."""
        level = self._walk(index, start, set(members))
        calls = self.rec.calls
        last, after = members[-1], calls[members[-1]].end
        path = {-1, *members}
        tail_clean = all(not ((read & path) - {last}) for i, read in level.reads if i >= after)
        handed = []
        for a, b in zip(members, members[1:]):
            lo, hi = calls[a].end, calls[b].start
            handed.append(all(a not in read for i, read in level.reads if lo <= i < hi))
        wrapper = not any(read & path for _, read in level.reads)
        return _Shape(tail_clean, handed, wrapper)

    def root(self) -> list[int]:
        index, start = 0, self.rec.root_inputs
        members = self.members(index, start)
        while len(members) == 1 and self._wraps(index, members[0]):
            index = members[0]
            members = self.members(index, start)
        classes = [type(self.rec.calls[m].module) for m in members]
        stacked = len(members) > 1 and _stack(classes, self._shape(index, start, members).handed)
        subs = [(m, self.expand(m, spans=not stacked)) for m in members]
        return [x for m, s in subs for x in (s if s is not None else [m])]

    def _wraps(self, outer: int, inner: int) -> bool:
        """Whether call ``outer`` hands the model's own inputs to call ``inner`` and returns its output as
        it is (PEFT's ``PeftModel`` and ``LoraModel`` around the base model): then ``inner`` is the root."""
        calls = self.rec.calls
        return calls[inner].out == calls[outer].out and calls[inner].carry in self.rec.root_inputs


#: Layers that join the span of the layer before them, as a parameterless one does: conv + BatchNorm + ReLU is
#: one unit (the norm reads the conv's output, so checkpointing the conv alone frees nothing).
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def _starts_span(module: nn.Module) -> bool:
    return not isinstance(module, _NORMS)


def _straight(call: _Call, kids: Sequence[_Call]) -> bool:
    """Whether a call only runs its children, each taking (only) what the one before returned: the call's
        input to the first, the last's output returned, and no op of the call's own between them."""
    ends = (call.carry is not None and kids[0].carry == call.carry and kids[-1].out == call.out
            and kids[0].start == call.start and kids[-1].end == call.end)
    return ends and all(not k.extras for k in kids) and all(
        a.out is not None and b.carry == a.out and a.end == b.start for a, b in zip(kids, kids[1:]))


def _stack(classes: Sequence[type], handed: Sequence[bool]) -> bool:
    """A stack of blocks: two members of one class, or three of repeated classes, each handing its output
    straight to the next (not a block's layers, with an activation or a residual add between them)."""
    run = 1
    for (a, b), h in zip(zip(classes, classes[1:]), handed):
        if h and a is b:
            return True
        run = run + 1 if h and classes.count(a) > 1 and classes.count(b) > 1 else 1
        if run >= 3:
            return True
    return False


def _trimmed(calls: Sequence[_Call], chain: list[int]) -> list[int]:
    """From the first to the last member of a repeated class written outside ``torch``, without embeddings
    (rule 3), or without the leading embeddings."""
    classes = [type(calls[i].module) for i in chain]
    own = {k for k in classes if classes.count(k) >= 2 and not k.__module__.startswith("torch.")
           and not issubclass(k, Span)  # spans of torch's layers (VGG's features) are torch's layers
           and not issubclass(k, nn.Embedding)}
    if not own:  # embeddings of token ids save nothing worth recomputing
        lead = next((j for j, i in enumerate(chain) if not isinstance(calls[i].module, nn.Embedding)), len(chain))
        return chain[lead:]
    where = [j for j, k in enumerate(classes) if k in own]
    # an embedding between the stacks (a decoder's, after the encoder) is code between stages too
    return [i for i in chain[where[0]:where[-1] + 1] if not isinstance(calls[i].module, nn.Embedding)]


def discover(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[tuple[str, nn.Module]]:
    """The chain of stages of ``model`` called as ``model(*args, **kwargs)`` (Note [Watching one forward])."""
    rec = _record(model, args, kwargs)
    if not rec.calls or rec.calls[0].module is not model:
        raise ProfileError(f"remat.profile: {type(model).__name__} was not called through Module.__call__")
    chain = _trimmed(rec.calls, _Chain(rec).root())
    if not chain:
        raise ProfileError(
            f"remat.profile: cannot find a chain of stages in {type(model).__name__}: no submodule with"
            " parameters, called once, takes the hidden state from the one before it. Name the blocks in"
            " execution order: remat.profile(model, inputs, stages=['encoder.0', 'encoder.1', ...])."
        )
    return [(rec.calls[i].name, rec.calls[i].module) for i in chain]
