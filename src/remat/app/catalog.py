"""The built-in models by name: their shapes, and which requests they can serve. No torch here.

``remat --help`` lists these models, and the CLI refuses a request the model cannot serve (a sequence
past its positions, a tensor larger than PyTorch can hold) before it imports torch or builds anything.
:mod:`remat.app.zoo` builds them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from remat.errors import RematError

__all__ = ["DTYPE_BYTES", "MAX_TENSOR_BYTES", "MODELS", "ModelSpec", "check_request"]

#: PyTorch computes a storage's size in bytes as a signed 64-bit integer.
MAX_TENSOR_BYTES = 2**63 - 1

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

MLP_WIDTH = 1024


@dataclass(frozen=True)
class ModelSpec:
    """One built-in model.

    Attributes:
        name: what the CLI calls it.
        description: one line for people.
        family: ``"gpt2"``, ``"llama"``, ``"bert"`` (transformers models) or ``"mlp"``.
        config: keyword arguments of the transformers config class (empty for the MLP).
        hidden, mlp_hidden, heads, layers: the shape (heads 0 for the MLP).
        vocab: vocabulary size (None for the MLP, which takes ``batch * seq`` rows of width 1024).
        max_positions: the longest sequence the model takes (None: no limit).
    """

    name: str
    description: str
    family: str
    hidden: int
    mlp_hidden: int
    heads: int
    layers: int
    vocab: int | None
    max_positions: int | None
    config: Mapping[str, Any] = field(default_factory=dict)

    @property
    def classes(self) -> tuple[str, str]:
        """The transformers (config class, model class)."""
        return {"gpt2": ("GPT2Config", "GPT2LMHeadModel"), "llama": ("LlamaConfig", "LlamaForCausalLM"),
                "bert": ("BertConfig", "BertForMaskedLM")}[self.family]

    def largest_tensors(self, batch: int, seq: int, dtype: str) -> list[tuple[str, tuple[int, ...], int]]:
        """The largest tensors one training step builds: ``(what, shape, bytes per element)``."""
        item = DTYPE_BYTES[dtype]
        if self.vocab is None:
            return [("the input", (batch * seq, MLP_WIDTH), item),
                    ("an MLP activation", (batch * seq, self.mlp_hidden), item)]
        return [("the logits (float32 in the loss)", (batch, seq, self.vocab), 4),
                ("the attention mask", (batch, seq, seq), item),
                ("an MLP activation", (batch, seq, self.mlp_hidden), item)]


def _gpt2(name: str, description: str, layers: int, hidden: int, heads: int, vocab: int, positions: int) -> ModelSpec:
    config = dict(n_layer=layers, n_embd=hidden, n_head=heads, vocab_size=vocab, n_positions=positions)
    return ModelSpec(name, description, "gpt2", hidden, 4 * hidden, heads, layers, vocab, positions, config)


def _llama(name: str, description: str, layers: int, hidden: int, mlp: int, heads: int, kv_heads: int, vocab: int,
           positions: int) -> ModelSpec:
    config = dict(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=positions)
    return ModelSpec(name, description, "llama", hidden, mlp, heads, layers, vocab, positions, config)


def _bert(name: str, description: str, layers: int, hidden: int, mlp: int, heads: int, vocab: int,
          positions: int) -> ModelSpec:
    config = dict(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
                  vocab_size=vocab, max_position_embeddings=positions)
    return ModelSpec(name, description, "bert", hidden, mlp, heads, layers, vocab, positions, config)


MODELS: dict[str, ModelSpec] = {m.name: m for m in [
    _gpt2("gpt2", "GPT-2 small: 12 layers, hidden 768, vocab 50257", 12, 768, 12, 50257, 1024),
    _gpt2("gpt2-medium", "GPT-2 medium: 24 layers, hidden 1024", 24, 1024, 16, 50257, 1024),
    _gpt2("gpt2-tiny", "GPT-2-style, 8 layers, hidden 256, vocab 8192 (demo size)", 8, 256, 4, 8192, 1024),
    _llama("llama-7b", "Llama-2-7B shape: 32 layers, hidden 4096, MLP 11008, vocab 32000",
           32, 4096, 11008, 32, 32, 32000, 4096),
    _llama("llama-13b", "Llama-2-13B shape: 40 layers, hidden 5120, MLP 13824", 40, 5120, 13824, 40, 40, 32000, 4096),
    _llama("llama-tiny", "Llama-style, 6 layers, hidden 256, GQA 4/2 heads", 6, 256, 688, 4, 2, 8192, 1024),
    _bert("bert-base", "BERT base: 12 layers, hidden 768 (masked-LM loss)", 12, 768, 3072, 12, 30522, 512),
    ModelSpec("mlp", "residual MLP: 16 blocks, width 1024, hidden 4096", "mlp", MLP_WIDTH, 4096, 0, 16, None, None),
]}


def check_request(name: str, *, batch: int, seq: int, dtype: str = "float32") -> ModelSpec:
    """The model called ``name``, if it can run one training step of ``batch`` x ``seq`` in ``dtype``.

    Raises:
        RematError: unknown model or dtype, non-positive sizes, a tensor beyond what PyTorch can hold
            (the figure is in the message), or a sequence longer than the model's positions.

    >>> check_request("gpt2-tiny", batch=8, seq=1024).max_positions
    1024
    >>> check_request("gpt2-tiny", batch=8, seq=2048)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    remat.errors.RematError: --seq 2048 is past gpt2-tiny's 1024 positions (its config's n_positions); ...
    """
    if name not in MODELS:
        raise RematError(f"remat: unknown model {name!r}; choose one of {', '.join(MODELS)}")
    if dtype not in DTYPE_BYTES:
        raise RematError(f"remat: unknown dtype {dtype!r}; use one of {', '.join(DTYPE_BYTES)}")
    if batch < 1 or seq < 1:
        raise RematError(f"remat: --batch {batch} and --seq {seq} must be positive")
    spec = MODELS[name]
    for what, shape, item in spec.largest_tensors(batch, seq, dtype):
        elements = 1
        for n in shape:
            elements *= n
        if elements * item > MAX_TENSOR_BYTES:
            dims = " x ".join(str(n) for n in shape)
            raise RematError(
                f"{name} with --batch {batch} --seq {seq}: {what} would be {dims} = {elements:.3g} elements,"
                f" {elements * item:.3g} bytes, past the largest tensor PyTorch can hold (2^63 - 1 = 9.22e+18"
                " bytes); lower --seq or --batch")
    if spec.max_positions is not None and seq > spec.max_positions:
        key = "n_positions" if spec.family == "gpt2" else "max_position_embeddings"
        raise RematError(f"--seq {seq} is past {name}'s {spec.max_positions} positions (its config's {key});"
                         f" use --seq {spec.max_positions} or less")
    return spec
