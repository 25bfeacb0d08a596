"""Shared helpers for code that touches models: stage discovery, call conventions, fingerprints."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from remat.errors import ProfileError
from remat.runtime.span import Span, resolve, span_name
from remat.runtime.stages import carry_of as carry_of  # call conventions, defined with stage discovery
from remat.runtime.stages import discover
from remat.runtime.stages import split_carry as split_carry

#: The arguments a block receives besides its chained input: (positional, keyword).
Extras = tuple[tuple[Any, ...], dict[str, Any]]

PROLOGUE = "<prologue>"
HEAD = "<head>"
#: Prefix of the name of a glue stage: "<glue after>transformer.h.3" (code between that block and the next).
GLUE = "<glue after>"


def as_call(example_inputs: Any) -> Extras:
    """``(args, kwargs)`` from a tensor, a tuple/list of positional inputs, or a dict of keyword inputs."""
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def tensors_in(obj: Any) -> list[torch.Tensor]:
    flat, _ = torch.utils._pytree.tree_flatten(obj)
    return [t for t in flat if isinstance(t, torch.Tensor)]


def input_signature(args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
    """Shapes and dtypes of the tensors a model is called with, as a short hash."""
    parts = [f"{tuple(t.shape)}:{t.dtype}" for t in tensors_in((tuple(args), dict(kwargs)))]
    parts += sorted(k for k, v in kwargs.items() if isinstance(v, torch.Tensor))
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


def input_shapes(args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[list[Any]]:
    """``[[name, shape, dtype], ...]`` of the tensors a model is called with, in call order (JSON-able);
    names are ``args[0]``, ``attention_mask``, ``inputs[1]`` (a tensor inside a list), ..."""
    out: list[list[Any]] = []
    for where, value in [*((f"args[{i}]", a) for i, a in enumerate(args)), *kwargs.items()]:
        flat = tensors_in(value)
        for j, t in enumerate(flat):
            name = where if isinstance(value, torch.Tensor) else f"{where}[{j}]"
            out.append([name, list(t.shape), str(t.dtype)])
    return out


def _named(entries: Sequence[Sequence[Any]]) -> dict[str, tuple[list[int], str]]:
    """By name; entries of plans made before inputs were named (``[shape, dtype]``) are named by position."""
    out = {}
    for i, e in enumerate(entries):
        name, shape, dtype = (e[0], e[1], e[2]) if len(e) == 3 else (f"input {i}", e[0], e[1])
        out[str(name)] = (list(shape), str(dtype))
    return out


def _scalar(shape: Sequence[int]) -> bool:
    return all(d == 1 for d in shape)


def describe_input_mismatch(actual: list[list[Any]], planned: list[list[Any]]) -> str:
    """``""`` when a call's inputs are the planned ones or smaller in every dimension (a shorter last
    batch, a shorter sequence: activations then take no more memory than planned); else what differs,
    input by input: missing, extra, larger shape, other dtype.

    One-element tensors are never a difference, planned or not (transformers' ``Trainer`` passes its
    token count ``num_items_in_batch`` as a 0-d tensor): they hold no activations worth a byte count.

    >>> describe_input_mismatch([["input_ids", [2, 32], "torch.int64"], ["num_items_in_batch", [], "torch.int64"]],
    ...                         [["input_ids", [2, 32], "torch.int64"]])
    ''
    """
    if planned and len(planned[0]) == 2:  # a plan from before inputs were named: compare by position
        actual = [[f"input {i}", *e[1:]] for i, e in enumerate(actual)]
    have, want = _named(actual), _named(planned)
    problems = [f"{n} is missing (planned {tuple(s)} {d})" for n, (s, d) in want.items()
                if n not in have and not _scalar(s)]
    problems += [f"{n} was not planned for ({tuple(s)} {d})" for n, (s, d) in have.items()
                 if n not in want and not _scalar(s)]
    for n, (shape, dtype) in have.items():
        if n not in want:
            continue
        pshape, pdtype = want[n]
        if _scalar(shape) and _scalar(pshape):
            continue
        if dtype != pdtype:
            problems.append(f"{n} is {dtype}, planned {pdtype}")
        elif len(shape) != len(pshape) or any(a > b for a, b in zip(shape, pshape)):
            problems.append(f"{n} has shape {tuple(shape)}, larger than the planned {tuple(pshape)}")
    return "; ".join(problems)


#: Prefix that DistributedDataParallel adds to the names of the model it wraps.
DDP_PREFIX = "module."


def unwrap(model: nn.Module) -> nn.Module:
    """The model a ``DistributedDataParallel`` wraps (its ``.module``); any other model as it is."""
    while type(model).__name__ == "DistributedDataParallel":
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def inner_name(model: nn.Module, name: str) -> str:
    """``name`` (a submodule of ``model``) as named inside :func:`unwrap` of it: DDP's prefix dropped."""
    inner = model
    while inner is not unwrap(inner):
        inner = getattr(inner, "module")  # noqa: B009 - a DDP wrapper's model (unwrap checked it is a Module)
        name = name[len(DDP_PREFIX):] if name.startswith(DDP_PREFIX) else name
    return name


def class_name(model: nn.Module) -> str:
    """The model's class, as written: FSDP2's ``fully_shard`` swaps in a class ``FSDP<Name>`` made of
    ``FSDPModule`` and the model's class; that one is named."""
    cls = type(model)
    while any(b.__name__ == "FSDPModule" for b in cls.__bases__):
        rest = [b for b in cls.__bases__ if b.__name__ != "FSDPModule"]
        if not rest:
            break
        cls = rest[0]
    return cls.__qualname__


def model_signature(model: nn.Module, stage_names: Sequence[str]) -> str:
    """Class, parameter names/shapes/dtypes and stage names, as a short hash (device-independent).

    The same for a model, its ``DistributedDataParallel`` wrapper and the model after FSDP2's
    ``fully_shard`` (a DTensor parameter counts by its global shape): one plan serves them all."""
    stage_names = [inner_name(model, n) for n in stage_names]
    model = unwrap(model)
    parts = [class_name(model), *stage_names]
    parts += [f"{n}:{tuple(p.shape)}:{p.dtype}:{p.requires_grad}" for n, p in model.named_parameters()]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


def find_stages(model: nn.Module, stages: Sequence[str] | None, *,
                inputs: Extras | None = None) -> tuple[list[tuple[str, nn.Module]], str]:
    """The model's blocks as ``[(name, module)]`` and how they were found.

    1. ``stages``: names of submodules in execution order (``"explicit"``);
    2. ``nn.Sequential``: its children, nested Sequentials flattened, an in-place child joined to the one
       before it (``"sequential"``);
    3. with ``inputs=(args, kwargs)``: by watching one forward, for any model (``"blocks"``; Note
       [Watching one forward] in ``runtime/stages.py``);
    4. without inputs: the blocks of the largest ``ModuleList`` of one block type (``"blocks"``).
    """
    _check_forward(model)
    if stages is not None:
        return _named_stages(model, stages), "explicit"
    if isinstance(model, nn.Sequential):
        chain = _sequential_stages(model)
        if not chain:
            raise ProfileError(f"remat.profile: every child of this {type(model).__name__} works in place; there is"
                               " no stage to checkpoint")
        return chain, "sequential"
    if inputs is not None:
        return _without_loss_head(discover(model, *inputs)), "blocks"
    return _largest_module_list(model), "blocks"


def _without_loss_head(chain: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """A :class:`remat.ChunkedHead` takes the hidden state and returns the loss: it is the head stage, never
    a block (its chunks are its own checkpoints, Note [Chunked head] in remat.runtime.head)."""
    from remat.runtime.head import ChunkedHead

    return [(n, m) for n, m in chain if not isinstance(m, ChunkedHead)]


def _check_forward(model: nn.Module) -> None:
    """A model whose ``forward`` is not its own (``nn.Module``'s, unimplemented, or a ``LightningModule``'s,
    which only calls that one) is refused with the fix: remat plans a forward."""
    owner = next((c for c in type(model).__mro__ if "forward" in vars(c)), nn.Module)
    lightning = owner.__name__ == "LightningModule" and owner.__module__.split(".")[0] in ("lightning",
                                                                                          "pytorch_lightning")
    if lightning:
        raise ProfileError(
            f"remat.profile: {type(model).__name__} is a LightningModule without a forward of its own, and remat plans"
            " a module's forward. Plan the model its training_step calls with the callback"
            " remat.integrations.lightning.Remat(example_inputs, budget=...) in Trainer(callbacks=[...]), or"
            f" remat.auto({type(model).__name__}.<inner model>, ...), or give {type(model).__name__} a forward"
            " that training_step calls (docs/integrations.md)"
        )
    if owner is nn.Module:
        raise ProfileError(f"remat.profile: {type(model).__name__} has no forward (nn.Module's is not implemented);"
                           " remat plans a module's forward: pass the module whose forward runs the step")


def _named_stages(model: nn.Module, stages: Sequence[str]) -> list[tuple[str, nn.Module]]:
    if isinstance(stages, str) or not stages:
        raise ProfileError(f"remat.profile: stages={stages!r} must be a non-empty list of submodule names")
    out = []
    for name in stages:
        try:
            out.append((name, resolve(model, name)))
        except AttributeError:
            raise ProfileError(
                f"remat.profile: stages names {name!r}, which is not a submodule of"
                f" {type(model).__name__}; pass names from model.named_modules()"
            ) from None
    return out


def _largest_module_list(model: nn.Module) -> list[tuple[str, nn.Module]]:
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= 2:
            kinds = {type(m) for m in mod}
            if len(kinds) == 1:
                size = sum(p.numel() for p in mod.parameters())
                if best is None or size > best[0]:
                    best = (size, name, mod)
    if best is None:
        raise ProfileError(
            f"remat.profile: cannot find a chain of stages in {type(model).__name__}. remat understands"
            " (1) nn.Sequential models, (2) models whose forward runs a ModuleList of same-type blocks"
            " (transformers: GPT-2, Llama, BERT, T5, ViT, ...), and (3) an explicit list:"
            " remat.profile(model, inputs, stages=['encoder.0', 'encoder.1', ...])."
        )
    _, name, mlist = best
    return [(f"{name}.{i}", m) for i, m in enumerate(mlist)]


def _sequential_stages(model: nn.Sequential) -> list[tuple[str, nn.Module]]:
    """A Sequential's children, nested Sequentials flattened. A child that works in place on its input
    (ReLU(inplace=True)) cannot be a checkpointed stage of its own: it joins the stage before it as a span
    (Note [Spans] in span.py: ``0:2`` is children 0 and 1) where that is its sibling, and is otherwise glue
    after it (Note [Glue] in the profiler), as is one the Sequential runs at two places."""
    entries = _flatten_sequential(model, "")
    runs = {id(m): sum(m is e[1] for e in entries) for _, m, _, _, _ in entries}
    chain: list[tuple[str, nn.Module]] = []
    last: tuple[nn.Module, int, int] | None = None  # the previous stage: (its Sequential, start, stop)
    for name, child, parent, pos, container in entries:
        if not getattr(child, "inplace", False):
            chain.append((name, child))
            last = (parent, pos, pos + 1)
        elif last is not None and last[0] is parent and last[2] == pos and runs[id(child)] == 1:
            last = (parent, last[1], pos + 1)
            chain[-1] = (span_name(container, last[1], last[2]), Span(parent, last[1], last[2]))
    return chain


def _flatten_sequential(seq: nn.Sequential, prefix: str) -> list[tuple[str, nn.Module, nn.Module, int, str]]:
    """``(name, module, its Sequential, its position there, the Sequential's name)`` of each leaf child."""
    out: list[tuple[str, nn.Module, nn.Module, int, str]] = []
    for pos, (name, child) in enumerate((n, c) for n, c in seq._modules.items() if c is not None):
        full = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            out.extend(_flatten_sequential(child, full + "."))
        else:
            out.append((full, child, seq, pos, prefix[:-1]))
    return out


def loss_function(loss_fn: Callable[[Any], torch.Tensor] | None) -> Callable[[Any], torch.Tensor]:
    """How to get a scalar loss from the model's output."""
    if loss_fn is not None:
        return loss_fn

    def default(out: Any) -> torch.Tensor:
        loss = getattr(out, "loss", None)
        if loss is None and isinstance(out, Mapping):
            loss = out.get("loss")
        if isinstance(loss, torch.Tensor):
            return loss
        if isinstance(out, torch.Tensor):
            return out if out.dim() == 0 else out.float().sum()
        raise ProfileError(
            f"remat: cannot find a loss in the model's output ({type(out).__name__}); pass loss_fn=,"
            " e.g. loss_fn=lambda out: torch.nn.functional.cross_entropy(out, target), or pass labels"
            " to a transformers model"
        )

    return default


def same_extras(a: Extras, b: Extras) -> bool:
    """Whether two blocks got the same extra arguments (tensors by identity, others by value)."""
    (aa, ak), (ba, bk) = a, b
    if len(aa) != len(ba) or ak.keys() != bk.keys():
        return False
    for x, y in zip([*aa, *ak.values()], [*ba, *(bk[k] for k in ak)]):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if x is not y:
                return False
        else:
            try:
                if x is not y and not bool(x == y):
                    return False
            except Exception:
                return False
    return True


def extras_of(args: tuple[Any, ...], kwargs: dict[str, Any], key: Any) -> Extras:
    if key == 0:
        return args[1:], dict(kwargs)
    rest = dict(kwargs)
    rest.pop(key, None)
    return tuple(args), rest


def call_with_carry(fn: Callable[..., Any], carry: Any, key: Any, extras: Extras) -> Any:
    eargs, ekw = extras
    if key == 0:
        return fn(carry, *eargs, **ekw)
    return fn(*eargs, **{key: carry}, **ekw)
