"""The built-in models by name: their shapes, and which requests they can serve. No torch here.

``remat --help`` lists these models, and the CLI refuses a request the model cannot serve (a sequence
past its positions, a tensor larger than PyTorch can hold) before it imports torch or builds anything.
:mod:`remat.app.zoo` builds them. The CLI also takes a user's own model: :func:`parse_model` tells a built-in
name from ``FILE.py:FUNCTION``, ``module:FUNCTION`` and a transformers ``config.json``, whose shape
:func:`config_spec` reads (so that its requests are checked the same way).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from remat.errors import RematError

__all__ = ["DTYPE_BYTES", "MAX_TENSOR_BYTES", "MODELS", "ModelSpec", "check_request", "check_spec", "config_spec",
           "parse_model", "spec_from_config"]

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
        positions_key: the config key that says ``max_positions`` (empty: the family's).
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
    positions_key: str = ""

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
    _llama("llama3-8b", "Llama-3-8B shape: 32 layers, hidden 4096, MLP 14336, GQA 32/8 heads, vocab 128256",
           32, 4096, 14336, 32, 8, 128256, 8192),
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
        raise _unknown_model(name)
    return check_spec(MODELS[name], batch=batch, seq=seq, dtype=dtype)


def check_spec(spec: ModelSpec, *, batch: int, seq: int, dtype: str = "float32") -> ModelSpec:
    """``spec``, if it can run one training step of ``batch`` x ``seq`` in ``dtype`` (see :func:`check_request`)."""
    name = spec.name
    if dtype not in DTYPE_BYTES:
        raise RematError(f"remat: unknown dtype {dtype!r}; use one of {', '.join(DTYPE_BYTES)}")
    if batch < 1 or seq < 1:
        raise RematError(f"remat: --batch {batch} and --seq {seq} must be positive")
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
        key = spec.positions_key or ("n_positions" if spec.family == "gpt2" else "max_position_embeddings")
        raise RematError(f"--seq {seq} is past {name}'s {spec.max_positions} positions (its config's {key});"
                         f" use --seq {spec.max_positions} or less")
    return spec


# ---- a user's own model --------------------------------------------------------------------------------------

#: The keys by which transformers configs give each number of a model's shape, most common first.
CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "hidden": ("hidden_size", "n_embd", "d_model", "dim"),
    "heads": ("num_attention_heads", "n_head", "num_heads", "n_heads"),
    "mlp_hidden": ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "hidden_dim"),
    "vocab": ("vocab_size",),
    "max_positions": ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"),
}

#: What a model argument may be, for error messages.
MODEL_FORMS = "a built-in model, FILE.py:FUNCTION, module:FUNCTION or a transformers config.json"


def parse_model(text: str) -> tuple[str, str, str]:
    """What the model argument names: ``(kind, where, function)``, kind one of ``"builtin"`` (where: the
    name), ``"file"`` (a Python file and the function in it), ``"module"`` (an importable module and the
    function in it) or ``"config"`` (a transformers config.json, or a directory holding one).

    >>> parse_model("gpt2"), parse_model("my_pkg.models:build_small"), parse_model("out/config.json")
    (('builtin', 'gpt2', ''), ('module', 'my_pkg.models', 'build_small'), ('config', 'out/config.json', ''))
    >>> parse_model("./my_model.py")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    remat.errors.RematError: ./my_model.py: name the function that builds the model: ./my_model.py:FUNCTION ...
    """
    if text in MODELS:
        return "builtin", text, ""
    if ":" in text:
        where, _, function = text.rpartition(":")
        if not function or not all(part.isidentifier() for part in function.split(".")):
            raise RematError(f"{text}: after the colon, name the function that builds the model"
                             f" ({where or 'FILE.py'}:FUNCTION)")
        if where.endswith(".py") or os.sep in where or os.path.isfile(where):
            if not os.path.isfile(where):
                why = "is a directory" if os.path.isdir(where) else "no such file"
                raise RematError(f"{text}: {where}: {why}; give a Python file (FILE.py:FUNCTION) or an importable"
                                 " module (module:FUNCTION)")
            return "file", where, function
        if not where or not all(part.isidentifier() for part in where.split(".")):
            raise RematError(f"{text}: {where!r} is neither a Python file nor a module name; give FILE.py:FUNCTION"
                             " or module:FUNCTION")
        return "module", where, function
    if text.endswith(".json") or os.path.isdir(text):
        return "config", text, ""
    if text.endswith(".py"):
        raise RematError(f"{text}: name the function that builds the model: {text}:FUNCTION (it returns the model,"
                         " or (model, inputs); see remat plan --help)")
    raise _unknown_model(text)


def _unknown_model(name: str) -> RematError:
    return RematError(f"remat: unknown model {name!r}; choose one of {', '.join(MODELS)}, or give FILE.py:FUNCTION,"
                      " module:FUNCTION or a transformers config.json (see remat plan --help)")


def config_spec(path: str) -> ModelSpec:
    """The shape of the model a transformers ``config.json`` describes (``path``: the file, or a directory
    holding one), read without torch or transformers so that requests are checked before any work.

    Raises:
        RematError: no such file, not JSON, not a config (no ``model_type``), or no vocabulary size.
    """
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise RematError(f"{path}: {'no config.json in this directory' if os.path.isdir(path) else 'no such file'};"
                         f" give {MODEL_FORMS}")
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RematError(f"{path}: not JSON ({e}); expected a transformers config.json (as"
                         " PretrainedConfig.save_pretrained writes it)") from e
    if isinstance(data, dict) and str(data.get("format")).startswith("remat.Profile"):
        raise RematError(f"{path}: a profile saved by `remat profile`, not a model; plan it with --profile {path}")
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise RematError(f"{path}: no 'model_type', not a transformers config; expected a config.json as"
                         " PretrainedConfig.save_pretrained writes it")
    return spec_from_config(data, path)


def spec_from_config(data: Mapping[str, Any], name: str) -> ModelSpec:
    """The :class:`ModelSpec` of a language model from its transformers config (a dict).

    >>> spec_from_config({"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "vocab_size": 100,
    ...                   "n_positions": 128}, "tiny").max_positions
    128
    """
    found: dict[str, tuple[str, int]] = {}
    for what, keys in CONFIG_KEYS.items():
        for key in keys:
            if isinstance(data.get(key), int) and not isinstance(data.get(key), bool):
                found[what] = (key, int(data[key]))
                break
    for what in ("vocab", "hidden"):
        if what not in found:
            raise RematError(
                f"{name}: a {data.get('model_type')} config without {' or '.join(CONFIG_KEYS[what])}: remat builds"
                " language models from configs (a multimodal config keeps them in text_config); give"
                " FILE.py:FUNCTION that builds the model instead")
    hidden = found["hidden"][1]
    layers = found.get("layers", ("", 0))[1]
    key, positions = found.get("max_positions", ("", None))
    description = f"a {data['model_type']} config: {layers} layers, hidden {hidden}, vocab {found['vocab'][1]}"
    return ModelSpec(name, description, "config", hidden, found.get("mlp_hidden", ("", 4 * hidden))[1],
                     found.get("heads", ("", 0))[1], layers, found["vocab"][1], positions, dict(data), key)
