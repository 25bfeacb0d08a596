"""One training step, written once: the model called on its inputs under the step's contexts, the loss,
backward, with the output held through backward. Profiling, verification, block options and the
benchmarks all run this :class:`Step`.

Note: [The step that runs]
Rule 1. A step runs in training mode. A model whose root is in evaluation mode (``from_pretrained``
    leaves it so) is switched to training mode while it is profiled or checked, and its modules' modes
    are restored after (:func:`training`): the step a loop trains with has dropout on, and dropout's
    masks are part of its memory. A model whose root trains keeps each submodule's own mode (a frozen
    BatchNorm stays in evaluation mode).
Rule 2. The output is held through backward, as in ``out = model(x); loss_fn(out).backward()``: the
    logits of a language model stay live.
Rule 3. Under autocast (:class:`Autocast`) the forward and the loss run inside ``torch.autocast``, and
    backward outside it, as the PyTorch AMP recipe writes a step. The model runs with autocast's cache
    of cast weights off, as a planned model runs (Rule 9 of Note [The region protocol] in
    :mod:`remat.runtime.regions`): each cast copy lives as long as the ops that saved it. The step leaves
    its block after the loss and drops what autocast cached there, even when it runs inside a caller's
    own open block (whose exit would not).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from remat.errors import ProfileError, RematError
from remat.runtime.model import as_call, loss_function, tensors_in

__all__ = ["Autocast", "Step", "autocast_for", "autocast_of", "training"]


@dataclass(frozen=True)
class Autocast:
    """``torch.autocast(device_type, dtype)`` around a step's forward and loss, its cache off."""

    device_type: str
    dtype: torch.dtype

    def __str__(self) -> str:
        return f"{self.device_type}:{str(self.dtype).removeprefix('torch.')}"

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        """The forward's block; on leaving it what autocast cached is dropped, as a loop's block exit does
        (also when this block is nested in an open one of the caller's, whose exit would not drop it)."""
        try:
            with torch.autocast(self.device_type, dtype=self.dtype, cache_enabled=False):
                yield
        finally:
            torch.clear_autocast_cache()

    def backward(self) -> contextlib.AbstractContextManager[Any]:
        return torch.autocast(self.device_type, enabled=False)

    @staticmethod
    def current(device_type: str) -> Autocast | None:
        """The autocast open for ``device_type`` now (the caller's ``with torch.autocast(...)`` block)."""
        if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
            return None  # the meta device has no autocast
        return Autocast(device_type, torch.get_autocast_dtype(device_type))


def autocast_of(autocast: Any, device_type: str, call: str) -> Autocast | None:
    """The autocast a step runs under: ``None`` (the block open now, if any), ``False`` (none), a dtype
    (``torch.bfloat16``, ``"bfloat16"``) on the model's device, or an :class:`Autocast`."""
    if autocast is None:
        return Autocast.current(device_type)
    if autocast is False:
        return None
    if isinstance(autocast, Autocast):
        return autocast
    dtype = getattr(torch, autocast, None) if isinstance(autocast, str) else autocast
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype == torch.float32:
        raise RematError(
            f"{call}: autocast={autocast!r}; pass the dtype the step's forward runs in under torch.autocast"
            " (torch.bfloat16 or torch.float16), False for none, or leave it out to use the autocast block"
            " open when this is called"
        )
    return Autocast(device_type, dtype)


def autocast_for(model: nn.Module, autocast: Any, call: str) -> Autocast | None:
    """:func:`autocast_of` on the device of ``model``'s parameters."""
    param = next(iter(model.parameters()), None) if isinstance(model, nn.Module) else None
    return autocast_of(autocast, param.device.type if param is not None else "cpu", call)


@contextlib.contextmanager
def training(model: nn.Module) -> Iterator[bool]:
    """Training mode while inside, for a model whose root is in evaluation mode; each module's own mode
    is restored after (Note [The step that runs], Rule 1). Yields whether the mode was switched."""
    if not isinstance(model, nn.Module) or model.training:
        yield False
        return
    modes = [(m, m.training) for m in model.modules()]
    model.train()
    try:
        yield True
    finally:
        for m, mode in modes:
            m.training = mode


@dataclass
class Step:
    """One training step of ``model`` on ``args``/``kwargs`` (Note [The step that runs])."""

    model: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    get_loss: Callable[[Any], torch.Tensor]
    autocast: Autocast | None = None

    @classmethod
    def of(cls, model: nn.Module, example_inputs: Any, loss_fn: Callable[[Any], torch.Tensor] | None = None,
           autocast: Autocast | None = None) -> Step:
        args, kwargs = as_call(example_inputs)
        return cls(model, args, kwargs, loss_function(loss_fn), autocast)

    @property
    def inputs(self) -> list[torch.Tensor]:
        return tensors_in((self.args, self.kwargs))

    def forward_context(self) -> contextlib.AbstractContextManager[Any]:
        return self.autocast.forward() if self.autocast is not None else contextlib.nullcontext()

    def backward_context(self) -> contextlib.AbstractContextManager[Any]:
        return self.autocast.backward() if self.autocast is not None else contextlib.nullcontext()

    def forward(self) -> tuple[Any, torch.Tensor]:
        """The model's output and its scalar loss (checked), under the step's forward contexts."""
        with self.forward_context():
            out = self.model(*self.args, **self.kwargs)
            loss = self.get_loss(out)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ProfileError(f"remat: the loss must be a scalar tensor, got {got}; pass loss_fn= that reduces the"
                               " model's output to one number (e.g. lambda out: out.mean())")
        return out, loss

    def backward(self, loss: torch.Tensor) -> None:
        with self.backward_context():
            loss.backward()

    def __call__(self) -> torch.Tensor:
        """Forward, loss and backward, the output held until backward is done; returns the loss, detached."""
        out, loss = self.forward()
        self.backward(loss)
        del out
        return loss.detach()

    @contextlib.contextmanager
    def nograd_context(self) -> Iterator[None]:
        """A forward without recording, as a checkpoint region's first pass runs it."""
        with torch.no_grad(), self.forward_context():
            yield
