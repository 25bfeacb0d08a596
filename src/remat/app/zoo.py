"""Built-in models, built from config numbers with random (or meta) weights — never downloaded."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

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


def _hf(config_cls: str, model_cls: str, cfg: dict[str, Any]) -> Callable[..., nn.Module]:
    def make() -> nn.Module:
        try:
            import transformers
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise RematError("remat: this model needs transformers: pip install 'remat[hf]'") from e
        transformers.logging.set_verbosity_error()
        config = getattr(transformers, config_cls)(**cfg)
        config._attn_implementation = "sdpa"
        return getattr(transformers, model_cls)(config)

    return make


# name -> (factory, vocab size or None for the MLP, description)
MODELS: dict[str, tuple[Callable[..., nn.Module], int | None, str]] = {
    "gpt2": (_hf("GPT2Config", "GPT2LMHeadModel", dict(n_layer=12, n_embd=768, n_head=12, n_positions=4096)),
             50257, "GPT-2 small: 12 layers, hidden 768, vocab 50257"),
    "gpt2-medium": (_hf("GPT2Config", "GPT2LMHeadModel", dict(n_layer=24, n_embd=1024, n_head=16, n_positions=4096)),
                    50257, "GPT-2 medium: 24 layers, hidden 1024"),
    "gpt2-tiny": (_hf("GPT2Config", "GPT2LMHeadModel", dict(n_layer=8, n_embd=256, n_head=4, n_positions=1024,
                                                             vocab_size=8192)),
                  8192, "GPT-2-style, 8 layers, hidden 256, vocab 8192 (demo size)"),
    "llama-7b": (_hf("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=4096, intermediate_size=11008,
                                                             num_hidden_layers=32, num_attention_heads=32,
                                                             num_key_value_heads=32, vocab_size=32000,
                                                             max_position_embeddings=4096)),
                 32000, "Llama-2-7B shape: 32 layers, hidden 4096, MLP 11008, vocab 32000"),
    "llama-13b": (_hf("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=5120, intermediate_size=13824,
                                                              num_hidden_layers=40, num_attention_heads=40,
                                                              num_key_value_heads=40, vocab_size=32000,
                                                              max_position_embeddings=4096)),
                  32000, "Llama-2-13B shape: 40 layers, hidden 5120, MLP 13824"),
    "llama-tiny": (_hf("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=256, intermediate_size=688,
                                                               num_hidden_layers=6, num_attention_heads=4,
                                                               num_key_value_heads=2, vocab_size=8192,
                                                               max_position_embeddings=1024)),
                   8192, "Llama-style, 6 layers, hidden 256, GQA 4/2 heads"),
    "bert-base": (_hf("BertConfig", "BertForMaskedLM", dict(max_position_embeddings=4096)), 30522,
                  "BERT base: 12 layers, hidden 768 (masked-LM loss)"),
    "mlp": (lambda: residual_mlp(16, 1024, 4096), None, "residual MLP: 16 blocks, width 1024, hidden 4096"),
}


def build(name: str, *, batch: int = 8, seq: int = 512, dtype: str | torch.dtype = "float32",
          device: str = "cpu", seed: int = 0) -> Built:
    """Build a model of the zoo with example inputs; ``device="meta"`` allocates nothing.

    Language models get ``input_ids`` of shape ``(batch, seq)`` and the same ids as labels; the MLP
    gets ``batch * seq`` rows of width 1024 and a mean-square loss.
    """
    if name not in MODELS:
        raise RematError(f"remat: unknown model {name!r}; choose one of {', '.join(MODELS)}")
    if batch < 1 or seq < 1:
        raise RematError(f"remat: batch={batch} and seq={seq} must be positive")
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if not isinstance(torch_dtype, torch.dtype):
        raise RematError(f"remat: unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    factory, vocab, description = MODELS[name]
    torch.manual_seed(seed)
    with torch.device(device):
        model = factory().to(torch_dtype)
        model.train()
        if vocab is None:
            x = torch.randn(batch * seq, 1024, dtype=torch_dtype)
            return Built(name, model, x, lambda out: out.float().pow(2).mean(), description)
        ids = torch.randint(0, vocab, (batch, seq))
    inputs: dict[str, Any] = {"input_ids": ids, "labels": ids}
    if "bert" not in name:
        inputs["use_cache"] = False
    return Built(name, model, inputs, None, description)
