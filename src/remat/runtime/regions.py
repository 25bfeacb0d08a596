"""Checkpoint regions entered and left by module hooks, so the model's own loop drives every block.

Note: [The region protocol]
Rule 1. A schedule (the items of a plan) is installed as a forward pre-hook and a forward hook on each
    block and a pre-hook and an always-called hook on the root model. The hooks are objects of
    module-level classes that hold the :class:`Runner`: ``copy.deepcopy`` of the model copies them
    with it (an independent planned copy), and ``pickle``/``torch.save`` store them.
Rule 2. The model calls its blocks through ``Module.__call__``, so FSDP2's hooks (unshard, reshard)
    and users' hooks fire, in the first pass and in recomputation alike.
Rule 3. Before block k runs, the innermost open frame (or the plan's top level) says which item
    comes next. Each region starting at k is entered: a non-reentrant checkpoint frame
    (``torch.utils.checkpoint``'s generator, as PyTorch's composable ``checkpoint`` uses) is opened
    with block k's arguments, and the region's body becomes the current items. After block k, each
    region ending at k is left.
Rule 4. Inside an open region the model must call the region's blocks in order, each one receiving
    the previous block's output (the same tensor, not modified in place) and the same extra
    arguments, and the code between them must save nothing for backward: a recomputation runs the
    blocks back to back. Anything else raises :class:`PlanMismatchError` naming the block — never a
    silent difference. Random draws between blocks are allowed: the RNG state before each block is
    stored and restored when the block is recomputed.
Rule 5. Recomputation (in backward) calls the region's blocks back to back with the region's body as
    the current items: nested regions are entered again (multi-level recomputation).
Rule 6. When the root forward returns, no region may be open (a block skipped at the end of a region,
    an early exit): the frames are closed and :class:`PlanMismatchError` names the block that was
    not called.
Rule 7. Nothing happens while autograd does not record (``torch.no_grad()``, inference) or while the
    runner is suspended (profiling a planned model measures the plain model).
Rule 8. A :class:`remat.planning.plan.Selective` item is a one-block region whose checkpoint runs
    with the item's policy (PyTorch's selective checkpointing): the outputs of the ops it names are
    kept from the first pass, the block's other ops are recomputed before its backward. In the first
    pass of an enclosing region it is a plain one-block region: that pass keeps nothing for the block's
    backward, and a policy's cache would stay alive, unused, until the first pass's graph is freed
    (the enclosing checkpoint needs the same nesting in its first pass and in its recomputation).

Rule 9. Autocast's cache of cast weights is off while a planned model's recording forward runs (the
    root's hooks switch it off and back), and the checkpoints, which record the flag when a region is
    entered, keep it off in recomputation. With the cache on, a cast copy that no op saves (a linear's
    bias) would stay alive until the caller's autocast block exits: in a region's first pass, although
    the region keeps nothing for backward, and in a recorded block, past the forward, though nothing
    reads it. Without it, every cast copy lives exactly as long as the ops that saved it, which is what
    the profile measured (:class:`remat.runtime.step.Step` runs the step the same way) and the plan counts.

Note: [torch.compile] The hooks are hidden from dynamo, so each one breaks the graph: under a whole
compiled model (``torch.compile(model)``, ``model.compile()``, transformers' ``torch_compile=True``) the
model's loop falls back to Python around them and each block's forward is compiled as a frame of its
own. A recomputation must run those very graphs (checkpoint counts and compares the tensors each pass
saves), but torch's checkpoint runs it with dynamo off. So the block pre-hook is skipped by dynamo
without switching it off (``recursive=False``): it reads the callback dynamo runs frames with
(``None`` in eager code), the region entered there keeps it, and its recomputation calls the blocks
with that callback on again: the same frames, guards and cached graphs as the first pass, nested
regions entered again included. Compiled blocks (``block.compile()``) switch dynamo on themselves and
run the same graph in both passes whatever the callback. Should a recomputation still save more tensors
than its first pass (a guard that failed in between, so another graph ran), checkpoint's error is raised
as :class:`PlanMismatchError` naming the fix: compile the blocks.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch._C._dynamo.eval_frame import get_eval_frame_callback, set_eval_frame
from torch.utils.checkpoint import (
    CheckpointError,
    _checkpoint_without_reentrant_generator,
    get_device_states,
    set_device_states,
)

from remat.errors import PlanMismatchError
from remat.planning.plan import Item, Record, Region, Selective, item_span
from remat.runtime.model import Extras, call_with_carry, carry_of, extras_of, same_extras, split_carry
from remat.runtime.policy import selective_contexts
from remat.runtime.span import SpanHook, hook_ends
from remat.runtime.stages import layerdrop_draws_without_skipping

__all__ = ["Runner", "recompute_copy_bytes", "runner_of", "suspended"]

_ATTR = "_remat_runner"


def _norms(block: nn.Module) -> list[nn.Module]:
    """The BatchNorm-like modules of a block whose running statistics a recomputation would move."""
    return [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]


def _norm_stats(norm: nn.Module) -> list[torch.Tensor]:
    return [buf for buf in (norm.running_mean, norm.running_var, norm.num_batches_tracked)
            if isinstance(buf, torch.Tensor)]


def recompute_copy_bytes(block: nn.Module) -> int:
    """Bytes a recomputation of ``block`` copies before it runs and holds until its region has run
    again: its norms' running statistics (:class:`_RestoreNormStats`)."""
    return sum(buf.numel() * buf.element_size() for m in _norms(block) for buf in _norm_stats(m))


class _RestoreNormStats:
    """Recompute context: running statistics of BatchNorm-like modules are restored on exit, so they
    move exactly once per step however often a block is recomputed (pytorch#96136)."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.modules = modules
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __enter__(self) -> None:
        with torch.no_grad():
            self.saved = [(buf, buf.clone()) for m in self.modules for buf in _norm_stats(m)]

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for buf, value in self.saved:
                buf.copy_(value)
        self.saved = []


def _rng_state(carry: Any) -> tuple[torch.Tensor, Any]:
    devices = get_device_states(carry) if isinstance(carry, torch.Tensor) and carry.device.type != "cpu" else None
    return torch.get_rng_state(), devices


def _set_rng_state(state: tuple[torch.Tensor, Any]) -> None:
    cpu, devices = state
    torch.set_rng_state(cpu)
    if devices is not None:
        set_device_states(*devices)


def _no_saving_between_blocks(name: str) -> Callable[[torch.Tensor], Any]:
    def pack(t: torch.Tensor) -> Any:
        raise PlanMismatchError(
            f"remat: code between blocks saved a tensor for backward inside a checkpoint region (after block"
            f" {name}); a recomputation runs the blocks back to back and would not redo it. Profile the model"
            " again (the profile then keeps these blocks in separate regions), or move that code into a block."
        )

    return pack


def _reshard(block: nn.Module) -> None:
    """Note: [FSDP2 in recomputation] FSDP2 does not reshard a block after a forward that runs during
    backward, so a recomputed region would hold every one of its blocks' unsharded parameters until
    their backward. A block recomputed before the region's last one is resharded at once (its backward
    all-gathers it again): a rank then holds the unsharded parameters of the block that runs, as in
    the first pass (docs/distributed.md)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    module_type = getattr(fsdp, "FSDPModule", None)
    if module_type is None:
        return
    # a span (Note [Spans]) is no FSDP unit; the children it runs may be
    units = [block] if isinstance(block, module_type) else [m for m in block.modules() if isinstance(m, module_type)]
    for unit in units:
        unit.reshard()


def _passed_on(carry: Any, handed: Any) -> bool:
    """Whether ``carry`` is ``handed``, or an autograd alias of it made by a hook between the blocks (FSDP2's
    pre-forward passes a block's inputs through an identity ``autograd.Function``): same memory, shape
    and strides, and its ``grad_fn`` takes ``handed``'s as an input."""
    if carry is handed:
        return True
    if not isinstance(carry, torch.Tensor) or not isinstance(handed, torch.Tensor) or carry.grad_fn is None:
        return False
    same = (carry.data_ptr() == handed.data_ptr() and carry.shape == handed.shape
            and carry.stride() == handed.stride() and carry.dtype == handed.dtype)
    return same and any(fn is handed.grad_fn for fn, _ in carry.grad_fn.next_functions)


@dataclass
class _Frame:
    """One level of the schedule being executed: an open region's first pass, or its recomputation."""

    region: Region
    next: int  # the block expected next
    gen: Any = None  # the checkpoint generator (first pass only)
    key: Any = None
    extras: Extras | None = None
    handed: Any = None  # what the previous block returned, and its version
    handed_version: int = -1
    guard: Any = None  # the saved-tensors guard between two blocks of the region
    rng: dict[int, tuple[torch.Tensor, Any]] = field(default_factory=dict)

    @property
    def first_pass(self) -> bool:
        return self.gen is not None


def _item_at(items: Sequence[Item], k: int) -> Item | None:
    return next((it for it in items if item_span(it)[0] <= k < item_span(it)[1]), None)


class Runner:
    """Runs a schedule on a model's blocks through hooks (see Note [The region protocol])."""

    def __init__(self, model: nn.Module, blocks: dict[int, nn.Module], items: Sequence[Item],
                 names: Sequence[str]) -> None:
        self.model = model
        self.blocks = blocks
        self.items = tuple(items)
        self.names = tuple(names)
        self.suspended = False
        self.cache_was: dict[int, bool] = {}  # per thread: autocast's cache flag before the root forward (Rule 9)
        self.previous: Runner | None = None
        self.frames: list[_Frame] = []
        self.norms = {k: _norms(mod) for k, mod in blocks.items()}

    # ---- install ----------------------------------------------------------------------------------
    def install(self) -> Runner:
        # No RemovableHandles are kept (they hold weak references, which neither copy nor pickle):
        # uninstall finds the hooks by their classes.
        for k, mod in self.blocks.items():
            mod.register_forward_pre_hook(_BlockPre(self, k), with_kwargs=True)
            mod.register_forward_hook(_BlockPost(self, k))
        self.model.register_forward_pre_hook(_RootPre(self))
        self.model.register_forward_hook(_RootPost(self), always_call=True)
        self.previous = self.model.__dict__.get(_ATTR)  # a plan suspended while this one calibrates
        object.__setattr__(self.model, _ATTR, self)
        return self

    def uninstall(self) -> None:
        self.reset()
        ends = [end for block in self.blocks.values() for end in hook_ends(block)]  # a span's: Note [Spans]
        for mod in {id(m): m for m in [self.model, *ends]}.values():
            _remove_hooks(mod, self)
        if self.previous is not None:
            object.__setattr__(self.model, _ATTR, self.previous)
        else:
            self.model.__dict__.pop(_ATTR, None)

    def __getstate__(self) -> dict[str, Any]:
        # Frames hold generators (a step in flight); a copy or a pickle starts between steps.
        return {**self.__dict__, "frames": [], "cache_was": {}}

    @property
    def active(self) -> bool:
        return not self.suspended and torch.is_grad_enabled()

    # ---- hooks --------------------------------------------------------------------------------------
    def before_block(self, k: int, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                     dynamo: Any = None) -> None:
        """Block ``k`` is about to run; ``dynamo``: the callback dynamo runs frames with (Note [torch.compile])."""
        if not self.active:
            return
        top = self.frames[-1] if self.frames else None
        if top is not None:
            self._check_order(top, k)
            if top.first_pass and k > top.region.start:
                self._check_hand_off(top, k, module, args, kwargs)
            if k > top.region.start:
                self._rng_before(top, k, args, kwargs, module)
        items = top.region.body if top is not None else self.items
        item = _item_at(items, k)
        if isinstance(item, Region) and item.start != k:
            self._mismatch(f"block {self.names[k]} is inside checkpoint region {self._span(item)}, whose first"
                           f" block {self.names[item.start]} did not run before it (skipped or called out of order)")
        while isinstance(item, Region):
            self._enter(item, module, args, kwargs, dynamo)
            item = _item_at(item.body, k)
        if isinstance(item, Selective):  # a one-block region whose checkpoint keeps the option's outputs (Rule 8)
            in_first_pass = bool(self.frames) and self.frames[-1].first_pass
            self._enter(Region(k, k + 1, (Record(k),)), module, args, kwargs, dynamo,
                        save=None if in_first_pass else item.save)

    def after_block(self, k: int, out: Any) -> None:
        if not self.active:
            return
        while self.frames and self.frames[-1].first_pass and self.frames[-1].region.stop - 1 == k:
            frame = self.frames.pop()
            with contextlib.suppress(StopIteration):
                next(frame.gen)
        for frame in self.frames:
            if frame.region.start <= k < frame.region.stop:
                frame.next = k + 1
        top = self.frames[-1] if self.frames else None
        if top is not None and top.first_pass and k + 1 < top.region.stop:
            top.handed = carry_of(out)
            top.handed_version = top.handed._version if isinstance(top.handed, torch.Tensor) else -1
            top.guard = torch.autograd.graph.saved_tensors_hooks(_no_saving_between_blocks(self.names[k]),
                                                                 lambda t: t)
            top.guard.__enter__()

    def before_model(self) -> None:
        self.reset()  # a forward that raised midway left nothing behind
        if self.active:  # Rule 9; the flag is per thread, and so is what is restored
            self.cache_was[threading.get_ident()] = torch.is_autocast_cache_enabled()
            torch.set_autocast_cache_enabled(False)

    def after_model(self) -> None:
        """Root forward returned (or raised): no region may stay open (Rule 6); autocast's cache back (Rule 9)."""
        was = self.cache_was.pop(threading.get_ident(), None)
        if was is not None:
            torch.set_autocast_cache_enabled(was)
        open_frames = [f for f in self.frames if f.first_pass]
        if not open_frames:
            return
        frame = open_frames[-1]
        self.reset()
        if sys.exc_info()[0] is None:
            self._mismatch(f"the model's forward returned while checkpoint region {self._span(frame.region)} was"
                           f" open: block {self.names[frame.next]} was not called (skipped, or an early exit)")

    # ---- regions ------------------------------------------------------------------------------------
    def _enter(self, region: Region, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
               dynamo: Any = None, save: tuple[str, ...] | None = None) -> None:
        _, key = split_carry(module, args, kwargs)
        extras = extras_of(args, kwargs, key)
        mods = [m for c in range(region.start, region.stop) for m in self.norms.get(c, [])]
        context_fn = _context_fn(mods, save)
        options = {"context_fn": context_fn} if context_fn is not None else {}
        rng: dict[int, tuple[torch.Tensor, Any]] = {}
        gen = _checkpoint_without_reentrant_generator(
            _Recompute(self, region, key, rng, dynamo), True, *_generator_flags(**options), *args, **kwargs
        )
        next(gen)
        self.frames.append(_Frame(region, region.start, gen=gen, key=key, extras=extras, rng=rng))

    def recompute(self, region: Region, key: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                  rng: dict[int, tuple[torch.Tensor, Any]], dynamo: Any = None) -> None:
        """Run the region's blocks back to back, its body as the schedule (Rule 5); under ``dynamo``, the
        callback the first pass ran them with (Note [torch.compile])."""
        module = self.blocks[region.start]
        carry, _ = split_carry(module, args, kwargs)
        extras = extras_of(args, kwargs, key)
        depth = len(self.frames)
        self.frames.append(_Frame(region, region.start, rng=rng))
        try:
            for k in range(region.start, region.stop):
                if k > region.start and k in rng:
                    _set_rng_state(rng[k])
                out = self._call_block(k, carry, key, extras, dynamo)
                carry = carry_of(out)
                if k < region.stop - 1:
                    _reshard(self.blocks[k])
        finally:
            self._close(depth)

    def _call_block(self, k: int, carry: Any, key: Any, extras: Extras, dynamo: Any) -> Any:
        if dynamo is None:
            return call_with_carry(self.blocks[k], carry, key, extras)
        try:
            return call_with_carry(_Under(dynamo, self.blocks[k]), carry, key, extras)
        except CheckpointError as e:
            raise PlanMismatchError(
                f"remat: block {self.names[k]} of this compiled model saved other tensors in recomputation than in"
                f" the first pass ({str(e).splitlines()[0]}): a compiled graph was not run again. Compile the blocks"
                " rather than the whole model: block.compile() for each block of the plan (remat.plan_of(model)"
                ".stage_names names them), before or after remat.auto."
            ) from e

    def _rng_before(self, top: _Frame, k: int, args: tuple[Any, ...], kwargs: dict[str, Any],
                    module: nn.Module) -> None:
        if top.first_pass:
            state = _rng_state(split_carry(module, args, kwargs)[0])
            for frame in self.frames:
                if frame.first_pass and frame.region.start < k < frame.region.stop:
                    frame.rng[k] = state

    # ---- checks -------------------------------------------------------------------------------------
    def _check_order(self, top: _Frame, k: int) -> None:
        if k != top.next:
            expected = self.names[top.next]
            self._mismatch(f"block {self.names[k]} was called while checkpoint region {self._span(top.region)}"
                           f" expected block {expected} (a block skipped or called out of order, e.g. LayerDrop)")

    def _check_hand_off(self, top: _Frame, k: int, module: nn.Module, args: tuple[Any, ...],
                        kwargs: dict[str, Any]) -> None:
        if top.guard is not None:
            guard, top.guard = top.guard, None
            guard.__exit__(None, None, None)
        carry, key = split_carry(module, args, kwargs)
        prev = self.names[k - 1]
        if not _passed_on(carry, top.handed):
            self._mismatch(f"block {self.names[k]} did not receive block {prev}'s output, but they share checkpoint"
                           f" region {self._span(top.region)}: the model's code between them changes the hidden state")
        if isinstance(carry, torch.Tensor) and carry._version != top.handed_version:
            self._mismatch(f"block {prev}'s output was modified in place before block {self.names[k]} ran, but they"
                           f" share checkpoint region {self._span(top.region)}")
        if key != top.key or top.extras is None or not same_extras(extras_of(args, kwargs, key), top.extras):
            self._mismatch(f"block {self.names[k]} received other extra arguments (attention mask, position ids,"
                           f" ...) than block {self.names[top.region.start]}, the first of its checkpoint region")

    def _mismatch(self, what: str) -> None:
        self.reset()
        raise PlanMismatchError(
            f"remat: {what}. The plan no longer matches what the model runs: profile and solve again (remat.auto"
            " does both) so that these blocks are planned in separate regions."
        )

    def _span(self, region: Region) -> str:
        return f"{self.names[region.start]}..{self.names[region.stop - 1]}"

    # ---- cleanup ------------------------------------------------------------------------------------
    def _close(self, depth: int) -> None:
        """Pop frames above ``depth``: guards exited, open generators closed, innermost first."""
        while len(self.frames) > depth:
            frame = self.frames.pop()
            if frame.guard is not None:
                frame.guard.__exit__(None, None, None)
                frame.guard = None
            if frame.gen is not None:
                frame.gen.close()

    def reset(self) -> None:
        self._close(0)


class _Both:
    """Two context managers entered as one (a selective policy's recompute mode and the norm statistics)."""

    def __init__(self, first: Any, second: Any) -> None:
        self.first, self.second = first, second

    def __enter__(self) -> None:
        self.first.__enter__()
        try:
            self.second.__enter__()
        except BaseException:
            self.first.__exit__(*sys.exc_info())
            raise

    def __exit__(self, *exc: Any) -> None:
        try:
            self.second.__exit__(*exc)
        finally:
            self.first.__exit__(*exc)


def _context_fn(mods: Sequence[nn.Module], save: tuple[str, ...] | None) -> Callable[[], tuple[Any, Any]] | None:
    """A region's checkpoint contexts: a :class:`remat.planning.plan.Selective` item's policy (Note [Block
    options] in :mod:`remat.runtime.ops`), and norm statistics restored after each recomputation."""
    if not mods and save is None:
        return None

    def make() -> tuple[Any, Any]:
        if save is None:
            forward, recompute = contextlib.nullcontext(), contextlib.nullcontext()
        else:
            forward, recompute = selective_contexts(save)
        # Norm statistics are saved and restored outside the selective recompute mode: its clone and copy
        # are not ops the policy cached in the forward.
        return forward, (_Both(_RestoreNormStats(mods), recompute) if mods else recompute)

    return make


def _generator_flags(context_fn: Callable[[], tuple[Any, Any]] | None = None) -> tuple[Any, ...]:
    """Positional flags of ``_checkpoint_without_reentrant_generator`` after ``preserve_rng_state``:
    context_fn, determinism_check, debug, early_stop. Early stop is off: a recomputation stopped early
    would leave the nested regions it entered open."""
    from torch.utils.checkpoint import noop_context_fn

    return (context_fn or noop_context_fn, "default", False, False)


class _Recompute:
    """The function a region's checkpoint frame calls to recompute it (a picklable callable)."""

    def __init__(self, runner: Runner, region: Region, key: Any, rng: dict[int, tuple[torch.Tensor, Any]],
                 dynamo: Any = None) -> None:
        self.runner, self.region, self.key, self.rng, self.dynamo = runner, region, key, rng, dynamo

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        self.runner.recompute(self.region, self.key, args, kwargs, self.rng, self.dynamo)


class _Under:
    """A block called with dynamo's callback on (Note [torch.compile]): this frame starts with dynamo off
    (checkpoint recomputes with it off), the block's frames then run as they did in the first pass."""

    def __init__(self, callback: Any, block: nn.Module) -> None:
        self.callback, self.block = callback, block

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        prior = set_eval_frame(self.callback)
        try:
            return self.block(*args, **kwargs)
        finally:
            set_eval_frame(prior)


@torch.compiler.disable
def _before_block(hook: _BlockPre, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                  dynamo: Any) -> None:
    hook.runner.before_block(hook.k, module, args, kwargs, dynamo)


def _block_pre(hook: _BlockPre, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    # Skipped by dynamo, but run with its callback on (Note [torch.compile]): only C functions and the
    # disabled _before_block are called here, so no frame of remat's is compiled.
    _before_block(hook, module, args, kwargs, get_eval_frame_callback())


class _BlockPre:
    def __init__(self, runner: Runner, k: int) -> None:
        self.runner, self.k = runner, k

    __call__ = torch.compiler.disable(_block_pre, recursive=False)


class _BlockPost:
    def __init__(self, runner: Runner, k: int) -> None:
        self.runner, self.k = runner, k

    @torch.compiler.disable
    def __call__(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        self.runner.after_block(self.k, out)


class _RootPre:
    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    @torch.compiler.disable
    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.runner.before_model()


class _RootPost:
    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    @torch.compiler.disable
    def __call__(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        self.runner.after_model()


def _remove_hooks(mod: nn.Module, runner: Runner) -> None:
    kinds = (_BlockPre, _BlockPost, _RootPre, _RootPost)
    for hooks, extras in ((mod._forward_pre_hooks, (mod._forward_pre_hooks_with_kwargs,)),
                          (mod._forward_hooks, (mod._forward_hooks_with_kwargs, mod._forward_hooks_always_called))):
        for hook_id, hook in list(hooks.items()):
            hook = hook.hook if isinstance(hook, SpanHook) else hook
            if isinstance(hook, kinds) and hook.runner is runner:
                del hooks[hook_id]
                for extra in extras:
                    extra.pop(hook_id, None)


def runner_of(model: nn.Module) -> Runner | None:
    runner = model.__dict__.get(_ATTR)
    return runner if isinstance(runner, Runner) else None


@contextlib.contextmanager
def suspended(model: nn.Module, *, layerdrop: bool = True) -> Iterator[None]:
    """Run the plain model while profiling: a schedule installed is suspended (profiling a planned model),
    and (``layerdrop``) LayerDrop draws without skipping (every block runs; the draw between blocks is seen)."""
    runner = runner_of(model)
    with layerdrop_draws_without_skipping(model) if layerdrop else contextlib.nullcontext():
        if runner is None:
            yield
            return
        was, runner.suspended = runner.suspended, True
        try:
            yield
        finally:
            runner.suspended = was
