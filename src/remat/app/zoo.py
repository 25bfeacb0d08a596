"""Built-in models, built from config numbers with random (or meta) weights — never downloaded."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from remat.app.catalog import MODELS, ModelSpec, check_request
from remat.errors import RematError

__all__ = ["MODELS", "Built", "MLPBlock", "build", "linear_stack", "residual_mlp"]


class MLPBlock(nn.Module):
    """``x + fc2(gelu(fc1(x)))``: a residual MLP block."""

    def __init__(self, width: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.fc2(torch.nn.functional.gelu(self.fc1(x))))


def residual_mlp(depth: int = 16, width: int = 1024, hidden: int = 4096, dropout: float = 0.0) -> nn.Sequential:
    """A deep residual MLP as an ``nn.Sequential`` of :class:`MLPBlock` (each block one stage)."""
    return nn.Sequential(*[MLPBlock(width, hidden, dropout) for _ in range(depth)], nn.LayerNorm(width))


def linear_stack(depth: int = 20, width: int = 1024) -> nn.Sequential:
    """The plainest chain: ``depth`` layers of ``Linear(width, width)``."""
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])


@dataclass
class Built:
    """A model with example inputs and its loss, ready for :func:`remat.profile`."""

    name: str
    model: nn.Module
    inputs: Any
    loss_fn: Callable[[Any], torch.Tensor] | None
    description: str


def _factory(spec: ModelSpec) -> Callable[[], nn.Module]:
    if spec.family == "mlp":
        return lambda: residual_mlp(spec.layers, spec.hidden, spec.mlp_hidden)
    config_cls, model_cls = spec.classes

    def make() -> nn.Module:
        try:
            import transformers
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise RematError("remat: this model needs transformers: pip install 'remat[hf]'") from e
        transformers.logging.set_verbosity_error()
        config = getattr(transformers, config_cls)(**spec.config)
        config._attn_implementation = "sdpa"
        return getattr(transformers, model_cls)(config)

    return make


def build(name: str, *, batch: int = 8, seq: int = 512, dtype: str | torch.dtype = "float32",
          device: str = "cpu", seed: int = 0) -> Built:
    """Build a model of the zoo with example inputs; ``device="meta"`` allocates nothing.

    Language models get ``input_ids`` of shape ``(batch, seq)`` and the same ids as labels; the MLP
    gets ``batch * seq`` rows of width 1024 and a mean-square loss.

    Raises:
        RematError: the request is one the model cannot serve (see :func:`remat.app.catalog.check_request`).
    """
    dtype_name = str(dtype).removeprefix("torch.")
    spec = check_request(name, batch=batch, seq=seq, dtype=dtype_name)
    torch_dtype = getattr(torch, dtype_name)
    torch.manual_seed(seed)
    with torch.device(device):
        model = _factory(spec)().to(torch_dtype)
        model.train()
        if spec.vocab is None:
            x = torch.randn(batch * seq, spec.hidden, dtype=torch_dtype)
            return Built(name, model, x, lambda out: out.float().pow(2).mean(), spec.description)
        ids = torch.randint(0, spec.vocab, (batch, seq))
    inputs: dict[str, Any] = {"input_ids": ids, "labels": ids}
    if "bert" not in name:
        inputs["use_cache"] = False
    return Built(name, model, inputs, None, spec.description)
