"""Lightning: plan the model a ``LightningModule``'s ``training_step`` calls, for the length of ``fit``.

A ``LightningModule`` usually has no ``forward`` of its own: Lightning calls ``training_step``, which calls
the model the module holds (``self.model(**batch).loss``). remat plans a module's forward, so the callback
plans that inner model, with the optimizer ``configure_optimizers`` made counted in the budget::

    import lightning as L
    from remat.integrations.lightning import Remat

    trainer = L.Trainer(max_steps=100, callbacks=[Remat(example_batch, budget="6GiB")])
    trainer.fit(lit_module, dataloader)

The plan is made in ``on_fit_start`` (after ``configure_optimizers``, on the device Lightning chose) and
removed in ``teardown``; ``callback.plan`` keeps it. Planning leaves the random number generators as they
were, so a run with the callback draws the same dropout masks as one without.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from remat.errors import RematError
from remat.planning.plan import Plan
from remat.runtime.auto import auto
from remat.runtime.executor import plan_of, remove
from remat.runtime.optimizer import unwrap_optimizer

try:
    from lightning.pytorch import Callback
except ImportError:  # the standalone package of older releases
    from pytorch_lightning import Callback  # type: ignore[assignment]

__all__ = ["Remat"]


class Remat(Callback):
    """Plan the model a ``LightningModule``'s ``training_step`` calls, for the length of ``Trainer.fit``.

    Args:
        example_inputs: one batch as the inner model is called with it, in the form :func:`remat.auto`
            takes (a tensor, a tuple of positional inputs, a dict of keyword inputs), or a ``DataLoader``
            whose first batch is that. Moved to the module's device.
        budget: peak bytes of the inner model's step, as in :func:`remat.auto` (``"6GiB"``, ``"70%"``).
        module: where the inner model is, as a submodule name of the ``LightningModule`` (``"model"``,
            ``"net.backbone"``); None: its one child with trainable parameters.
        optimizer: ``"trainer"`` (default): the state of the optimizer ``configure_optimizers`` returned
            counts in the budget (the one holding the inner model's parameters); or an optimizer name or
            instance, or None, as :func:`remat.auto` takes it.
        **options: passed to :func:`remat.auto` (``loss_fn``, ``strategy``, ``stages``, ``verify``, ...).
            Without ``loss_fn``, the inner model's output has to carry its loss (transformers' ``.loss``).
    """

    def __init__(self, example_inputs: Any, *, budget: Any, module: str | None = None,
                 optimizer: Any = "trainer", **options: Any) -> None:
        super().__init__()
        self.example_inputs, self.budget, self.module, self.optimizer = example_inputs, budget, module, optimizer
        self.options = options
        self.plan: Plan | None = None
        self._planned: nn.Module | None = None

    def on_fit_start(self, trainer: Any, pl_module: nn.Module) -> None:
        target = inner_model(pl_module, self.module)
        device = next(iter(target.parameters())).device
        optimizer = _optimizer_of(trainer, target) if self.optimizer == "trainer" else self.optimizer
        # The generators as they were: a DataLoader's iterator draws its base seed, and profiling runs dropout.
        # auto plans the training step whatever mode Lightning left the module in (modes restored after).
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            inputs = _moved(_first_batch(self.example_inputs), device)
            auto(target, inputs, budget=self.budget, optimizer=optimizer, **self.options)
        self.plan, self._planned = plan_of(target), target

    def teardown(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        if self._planned is not None:
            remove(self._planned)
            self._planned = None


def inner_model(pl_module: nn.Module, name: str | None) -> nn.Module:
    """The submodule ``name`` of ``pl_module``, or its one child with trainable parameters."""
    if name is not None:
        try:
            return pl_module.get_submodule(name)
        except AttributeError:
            children = [n for n, _ in pl_module.named_children()]
            raise RematError(f"remat.integrations.lightning.Remat: module={name!r} is not a submodule of"
                             f" {type(pl_module).__name__}; its children are {children}") from None
    trained = [(n, m) for n, m in pl_module.named_children() if any(p.requires_grad for p in m.parameters())]
    if len(trained) != 1:
        names = [n for n, _ in trained]
        raise RematError(
            f"remat.integrations.lightning.Remat: {type(pl_module).__name__} has {len(trained)} children with"
            f" trainable parameters ({names}); name the model training_step calls: Remat(..., module='model')")
    return trained[0][1]


def _first_batch(example: Any) -> Any:
    if isinstance(example, torch.utils.data.DataLoader):
        return next(iter(example))
    return example


def _moved(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, Mapping):  # transformers' BatchEncoding is a Mapping, not a dict
        inputs = dict(inputs)
    return torch.utils._pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, inputs)


def _optimizer_of(trainer: Any, model: nn.Module) -> Any:
    """The trainer's optimizer holding the model's parameters (None if none does)."""
    params = {id(p) for p in model.parameters() if p.requires_grad}
    found = [o for o in trainer.optimizers
             if any(id(p) in params for g in unwrap_optimizer(o).param_groups for p in g["params"])]
    if len(found) > 1:
        raise RematError(
            f"remat.integrations.lightning.Remat: {len(found)} optimizers hold the model's parameters; pass the one"
            " whose state the budget must hold: Remat(..., optimizer=...)")
    return found[0] if found else None
