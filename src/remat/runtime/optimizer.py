"""Optimizer state: the bytes an optimizer keeps between steps, exactly, before or after it exists.

PyTorch's optimizers create their state lazily, at the first ``step()``; from then on it lives as long as
the optimizer, beside the parameters and gradients. remat counts it as fixed memory.

Note: [What torch.optim allocates] (read from torch 2.13's ``torch/optim/{sgd,adam}.py``, and checked
by the tests against the state real steps create)
- ``SGD``: nothing without momentum; with momentum, ``momentum_buffer``: a clone of the gradient (the
  parameter's shape and dtype), for every parameter that got a gradient.
- ``Adam``, ``AdamW`` (a subclass): ``exp_avg`` and ``exp_avg_sq``, and ``max_exp_avg_sq`` with
  ``amsgrad``: each ``zeros_like(param)`` (the parameter's dtype: bf16 parameters get bf16 state), plus a
  0-d ``step`` tensor per parameter: float32 on the parameter's device with ``capturable`` or ``fused``,
  otherwise on the CPU (float64 if the default dtype is float64, else float32) — on a GPU, the default
  Adam's steps do not take GPU memory. ``foreach`` and ``differentiable`` change how a step computes, not
  what it keeps.
- Only parameters that receive a gradient get state; remat counts every parameter that requires one.

Sizes are storage bytes, as :class:`remat.MemoryTracker` counts them; the CUDA caching allocator rounds
each allocation up to a multiple of 512 bytes on top of that.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from remat.errors import RematError

if TYPE_CHECKING:
    import torch

__all__ = ["OPTIMIZERS", "optimizer_state_bytes", "state_tensors", "unwrap_optimizer"]

#: The optimizers a string can name, each with torch's default options.
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "none": {"kind": "none"},
    "sgd": {"kind": "sgd", "momentum": 0.0},
    "sgd-momentum": {"kind": "sgd", "momentum": 0.9},
    "adam": {"kind": "adam", "amsgrad": False, "capturable": False, "fused": None},
    "adamw": {"kind": "adam", "amsgrad": False, "capturable": False, "fused": None},
}

Spec = Any  # a torch.optim.Optimizer, a name in OPTIMIZERS, or None


def _unique(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for t in tensors:
        seen.setdefault(id(t), t)
    return list(seen.values())


def params_of(params_or_model: Any) -> list[torch.Tensor]:
    import torch

    if params_or_model is None:
        return []
    params: list[torch.Tensor]
    if isinstance(params_or_model, torch.nn.Module):
        params = list(params_or_model.parameters())
    elif isinstance(params_or_model, torch.Tensor):
        params = [params_or_model]
    else:
        params = [p for p in params_or_model if isinstance(p, torch.Tensor)]
    return _unique(p for p in params if p.requires_grad)


def _tensor_bytes(p: torch.Tensor) -> int:
    return p.numel() * p.element_size()


def _predicted(p: torch.Tensor, options: dict[str, Any]) -> list[tuple[int, str]]:
    """``(bytes, device type)`` of each state tensor ``p`` will get (see Note [What torch.optim allocates])."""
    import torch

    kind = options["kind"]
    if kind == "none" or (kind == "sgd" and not options.get("momentum")):
        return []
    if kind == "sgd":
        return [(_tensor_bytes(p), p.device.type)]
    copies = 3 if options.get("amsgrad") else 2
    step_bytes = 4 if options.get("fused") or torch.get_default_dtype() != torch.float64 else 8
    step_device = p.device.type if options.get("capturable") or options.get("fused") else "cpu"
    return [(_tensor_bytes(p), p.device.type)] * copies + [(step_bytes, step_device)]


def _kind_of(optimizer: torch.optim.Optimizer) -> str | None:
    import torch

    if isinstance(optimizer, torch.optim.Adam):
        return "adam"
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd"
    return None


#: Where wrappers keep the optimizer they wrap: accelerate's ``AcceleratedOptimizer`` (``.optimizer``),
#: Lightning's ``LightningOptimizer`` (``._optimizer``).
_WRAPPED = ("optimizer", "_optimizer")


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer a wrapper holds (accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``), through any number of wrappers; anything else (a name, None) as it is."""
    import torch

    for _ in range(8):  # wrappers of wrappers, never a cycle
        if isinstance(optimizer, torch.optim.Optimizer) and _kind_of(optimizer) is not None:
            break
        inner = next((w for w in (getattr(optimizer, n, None) for n in _WRAPPED)
                      if isinstance(w, torch.optim.Optimizer)), None)
        if inner is None:
            break
        optimizer = inner
    return optimizer


def state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors an optimizer's state holds now (one per storage)."""
    import torch

    out: dict[int, torch.Tensor] = {}
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                out.setdefault(id(value), value)
    return list(out.values())


def _storage_bytes(tensors: Iterable[torch.Tensor], device: str | None) -> int:
    seen: dict[int, int] = {}
    keep = []
    for t in tensors:
        if device is not None and t.device.type != device:
            continue
        st = t.untyped_storage()
        keep.append(st)
        seen[id(st)] = st.nbytes()
    return sum(seen.values())


def _device_type(device: Any) -> str | None:
    if device is None:
        return None
    import torch

    return torch.device(device).type


def optimizer_state_bytes(params_or_model: Any, spec: Spec, *, device: Any = None, missing_only: bool = False) -> int:
    """Bytes of optimizer state for these parameters, exactly, whether or not the state exists yet.

    Args:
        params_or_model: a module or an iterable of parameters; only those that require grad count
            (tied parameters once). With an optimizer instance it may be None: all of its parameters;
            otherwise only the optimizer's parameters that are also in it count.
        spec: ``torch.optim.SGD`` (with or without momentum), ``Adam`` or ``AdamW`` (``amsgrad``,
            ``capturable``, ``fused``, ``foreach`` as set in each parameter group), or a name:
            ``"adam"``, ``"adamw"``, ``"sgd"`` (no momentum: no state), ``"sgd-momentum"``, ``"none"``
            (torch's default options). State that exists already is counted as it is (storage bytes), for
            any optimizer; state still to come is predicted from each parameter's size and dtype.
        device: count only state stored on this device type (e.g. ``"cuda"``: the default Adam keeps its
            ``step`` counters on the CPU); None counts all.
        missing_only: count only the state not yet created.

    Returns:
        Bytes (an int).

    Raises:
        RematError: an unknown name, or an optimizer of another class whose state does not exist yet.

    >>> import torch
    >>> lin = torch.nn.Linear(1000, 1000, dtype=torch.bfloat16)   # 1,001,000 parameters in 2 tensors
    >>> optimizer_state_bytes(lin, "adamw")                       # exp_avg, exp_avg_sq (bf16), 2 float32 steps
    4004008
    >>> on_meta = torch.nn.Linear(1000, 1000, dtype=torch.bfloat16, device="meta")
    >>> optimizer_state_bytes(on_meta, "adamw", device="meta")   # beside the parameters; the steps go to the CPU
    4004000
    >>> opt = torch.optim.AdamW(lin.parameters())
    >>> lin(torch.ones(1, 1000, dtype=torch.bfloat16)).sum().backward()
    >>> opt.step()
    >>> sum(t.untyped_storage().nbytes() for t in state_tensors(opt))  # the state a real step made
    4004008
    """
    dev = _device_type(device)
    if spec is None or isinstance(spec, str):
        name = (spec or "none").lower()
        if name not in OPTIMIZERS:
            raise RematError(f"remat.optimizer_state_bytes: unknown optimizer {spec!r}; use an optimizer instance or"
                             f" one of {', '.join(OPTIMIZERS)}")
        return sum(n for p in params_of(params_or_model) for n, d in _predicted(p, OPTIMIZERS[name])
                   if dev is None or d == dev)
    return _instance_state_bytes(params_or_model, spec, dev, missing_only)


def _instance_state_bytes(params_or_model: Any, optimizer: Any, dev: str | None, missing_only: bool) -> int:
    import torch

    optimizer = unwrap_optimizer(optimizer)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise RematError(f"remat.optimizer_state_bytes: expected a torch.optim.Optimizer or a name in"
                         f" {', '.join(OPTIMIZERS)}, got {type(optimizer).__name__}")
    wanted = None if params_or_model is None else {id(p) for p in params_of(params_or_model)}
    existing: list[torch.Tensor] = []
    predicted = 0
    kind = _kind_of(optimizer)
    for group in optimizer.param_groups:
        for p in _unique(group["params"]):
            if not p.requires_grad or (wanted is not None and id(p) not in wanted):
                continue
            state = optimizer.state.get(p)
            if state:
                existing += [v for v in state.values() if isinstance(v, torch.Tensor)]
                continue
            if kind is None:
                raise RematError(
                    f"remat.optimizer_state_bytes: cannot predict the state of {type(optimizer).__name__} before"
                    " its first step (remat knows SGD, Adam and AdamW); run one step first, and its state is"
                    " counted as it is")
            predicted += sum(n for n, d in _predicted(p, {"kind": kind, **group}) if dev is None or d == dev)
    return predicted + (0 if missing_only else _storage_bytes(existing, dev))

