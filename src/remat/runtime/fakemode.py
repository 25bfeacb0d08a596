"""The fake copy's tensor mode: FakeTensorMode, falling back per op where it cannot run one.

Note: [Falling back per op] A fake copy (Note [Memory-safe profiling] in the profiler) runs every op on
meta storages. Two kinds of op do not run there:

- an op whose meta kernel refuses what its device kernel runs (``aten._grouped_mm`` in float32: the meta
  kernel checks CUDA's dtype rules, the CPU kernel takes float32 — the MoE layers of Qwen3-MoE, Mixtral,
  Jamba). It runs on the device, on real tensors of the inputs' shapes, dtypes and strides (their values
  where known, else zeros), and its outputs come back as fresh fake tensors of the sizes the device
  allocated; the tracker counts them as it counts any op's outputs. Only the op's own inputs and outputs
  are real, for the op's duration.
- an op whose output depends on values (``.item()``, ``nonzero``, a Python ``if`` on a tensor: M2M100's
  LayerDrop draw, masks checked for padding). The mode keeps the *values* of small tensors (a mirror):
  the real model's parameters, buffers and inputs as they are (never written), and the outputs of ops
  whose inputs all have values, computed on the device, while each output is at most
  :data:`MIRROR_TENSOR_BYTES` and all of them together at most :data:`MIRROR_TOTAL_BYTES`. Such an op
  runs on the values and gives the value the real step would. An op that writes into a tensor whose
  values are not all known makes the tensor's values unknown; a value-dependent op on a tensor without
  values fails as before (the profiler refuses clearly, or measures on the device where it may).

The mirror needs real tensors (a model on the meta device has none): there, value-dependent ops fail.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
)
from torch.utils import _pytree as pytree
from torch.utils._mode_utils import no_dispatch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["MIRROR_TENSOR_BYTES", "MIRROR_TOTAL_BYTES", "FallbackFakeMode"]

#: The largest op output whose values the mirror keeps (an attention mask of a small batch, token ids).
MIRROR_TENSOR_BYTES = 1 << 20
#: The most bytes of values the mirror holds at once.
MIRROR_TOTAL_BYTES = 64 << 20
#: The most bytes an op run on the device may allocate for its inputs and outputs (zeros of the fakes'
#: layouts and what it returns): past that the op is refused as before, and the profiler says so.
FALLBACK_BYTES = 256 << 20


class FallbackFakeMode(FakeTensorMode):
    """FakeTensorMode with the per-op fallbacks of Note [Falling back per op]. ``to_meta``: the fakes are
    on the meta device (planning for another device); values and fallbacks then run on the CPU."""

    def __init__(self, *, allow_non_fake_inputs: bool, to_meta: bool) -> None:
        super().__init__(allow_non_fake_inputs=allow_non_fake_inputs)
        self.to_meta = to_meta
        self._values: WeakIdKeyDictionary = WeakIdKeyDictionary()  # fake tensor -> real tensor of its values
        self._stale: WeakIdKeyDictionary = WeakIdKeyDictionary()  # fake storages written without values
        self._borrowed: set[int] = set()  # data pointers of the real model's storages: never written
        self.mirror_bytes = 0
        #: Ops run on the device (name -> count), and ops run on values, for the profiler's log.
        self.fallbacks: dict[str, int] = {}

    # ---- values ------------------------------------------------------------------------------------
    def borrow(self, fake: torch.Tensor, real: torch.Tensor) -> None:
        """``fake`` mirrors ``real``, a tensor of the real model or its inputs (read, never written)."""
        if real.device.type == "meta" or real.is_sparse:
            return
        self._values[fake] = real.detach()
        self._borrowed.add(real.untyped_storage().data_ptr())

    def value(self, t: Any) -> Any:
        """The real tensor holding ``t``'s values, ``t`` itself if it is real, or None if unknown."""
        if not self.is_our_fake(t):
            return t
        v = self._values.get(t)
        if v is None or t.untyped_storage() in self._stale:
            return None
        return v

    def _keep(self, fake: torch.Tensor, real: torch.Tensor) -> None:
        if fake in self._values:
            return
        nbytes = real.untyped_storage().nbytes()
        self._values[fake] = real
        self.mirror_bytes += nbytes

        def release() -> None:
            self.mirror_bytes -= nbytes

        weakref.finalize(real, release)

    # ---- dispatch ----------------------------------------------------------------------------------
    def dispatch(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        try:
            out = super().dispatch(func, types, args, kwargs)
        except (DataDependentOutputException, DynamicOutputShapeException) as e:
            return self._fallback(func, args, kwargs, e, values_only=True)
        except (RuntimeError, NotImplementedError) as e:  # a meta kernel that refuses, or none
            return self._fallback(func, args, kwargs, e, values_only=False)
        if out is not NotImplemented:
            self._mirror(func, args, kwargs, out)
        return out

    def _real(self, x: Any, zeros: bool) -> Any:
        """``x`` for an op run on the device: a fake's values (or zeros of its layout), a meta device the CPU."""
        if isinstance(x, torch.device) and x.type == "meta":
            return torch.device("cpu")
        if not isinstance(x, torch.Tensor):
            return x
        v = self.value(x)
        if v is None and zeros:
            v = torch.zeros_like(x, device="cpu" if x.device.type == "meta" else x.device)
        return v

    def _fallback(self, func: Any, args: Any, kwargs: Any, error: Exception, *, values_only: bool) -> Any:
        """Run ``func`` on the device (Note [Falling back per op]); re-raise ``error`` where it cannot."""
        flat, spec = pytree.tree_flatten((args, kwargs))
        known = all(self.value(a) is not None for a in flat if isinstance(a, torch.Tensor))
        size = sum(a.numel() * a.element_size() for a in flat if isinstance(a, torch.Tensor))
        if (values_only and not known) or torch.Tag.inplace_view in func.tags or 2 * size > FALLBACK_BYTES:
            raise error
        written = {id(w) for w in _written(func, args, kwargs)}
        with no_dispatch():
            real = [self._real(a, zeros=True) for a in flat]
            # Never write the real model's or the inputs' values: an op that writes a borrowed tensor writes a
            # copy, and the fake's values are stale from then on.
            for i, a in enumerate(flat):
                if id(a) in written and isinstance(real[i], torch.Tensor) and self._owned(a) is None:
                    real[i] = real[i].clone()
                    if self.is_our_fake(a):
                        self._stale[a.untyped_storage()] = True
            r_args, r_kwargs = pytree.tree_unflatten(real, spec)
            try:
                with _rng_kept(func):
                    out = func(*r_args, **r_kwargs)
            except Exception:
                raise error from None
        by_id = {id(r): f for r, f in zip(real, flat) if isinstance(r, torch.Tensor)}
        inputs = {r.untyped_storage().data_ptr() for r in real if isinstance(r, torch.Tensor) and r.numel()}
        name = str(func.overloadpacket.__name__)
        self.fallbacks[name] = self.fallbacks.get(name, 0) + 1

        def wrap(r: Any) -> Any:
            if not isinstance(r, torch.Tensor):
                return r
            if id(r) in by_id:  # an op that returns its (written) input
                return by_id[id(r)]
            if r.numel() and r.untyped_storage().data_ptr() in inputs:  # a view of an input: not a fresh tensor
                raise error
            fake = self.fake_tensor_converter.from_real_tensor(self, r.to("meta") if self.to_meta else r)
            if known:
                self._keep(fake, r)
            return fake

        return pytree.tree_map(wrap, out)

    def _mirror(self, func: Any, args: Any, kwargs: Any, out: Any) -> None:
        """Run ``func`` on the values of its inputs too, where all are known and its outputs are small."""
        written = _written(func, args, kwargs)
        flat = pytree.tree_leaves((args, kwargs))
        fakes = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        size = sum(t.numel() * t.element_size() for t in fakes)
        ok = (
            fakes and size <= MIRROR_TENSOR_BYTES and self.mirror_bytes + size <= MIRROR_TOTAL_BYTES
            and all(self.value(a) is not None for a in flat if isinstance(a, torch.Tensor))
            and not any(self._owned(w) is None for w in written)
        )
        if ok:
            with no_dispatch():
                real = [self._real(a, zeros=False) for a in flat]
                r_args, r_kwargs = pytree.tree_unflatten(real, pytree.tree_flatten((args, kwargs))[1])
                try:
                    with _rng_kept(func):
                        r_out = func(*r_args, **r_kwargs)
                except Exception:
                    ok = False
        if not ok:
            for w in written:
                if self.is_our_fake(w):
                    self._stale[w.untyped_storage()] = True
            return
        reals = [t for t in pytree.tree_leaves(r_out) if isinstance(t, torch.Tensor)]
        if len(reals) == len(fakes):
            for f, r in zip(fakes, reals):
                if self.is_our_fake(f) and r.device.type != "meta":
                    self._keep(f, r)

    def _owned(self, t: Any) -> Any:
        """The values of a tensor an op writes into, if the mirror may write them (not the real model's)."""
        if not self.is_our_fake(t):
            return None
        v = self.value(t)
        return None if v is None or v.untyped_storage().data_ptr() in self._borrowed else v


def _written(func: Any, args: Any, kwargs: Any) -> list[torch.Tensor]:
    """The tensors an op writes into (in-place and ``out=`` arguments), from its schema."""
    out: list[torch.Tensor] = []
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            v = args[i] if i < len(args) else kwargs.get(a.name)
            out += [t for t in pytree.tree_leaves(v) if isinstance(t, torch.Tensor)]
    return out


@contextlib.contextmanager
def _rng_kept(func: Any) -> Iterator[None]:
    """A random op run on values draws without moving the generator the real step draws from."""
    if torch.Tag.nondeterministic_seeded not in func.tags:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        yield
