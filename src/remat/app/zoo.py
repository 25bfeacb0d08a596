"""Built-in models, built from config numbers with random (or meta) weights — never downloaded; and the
user's own models that the CLI takes (:func:`user_model`): a function that builds one, or a transformers config."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map_only

from remat.app.catalog import MODELS, ModelSpec, check_request, check_spec, config_spec, parse_model, spec_from_config
from remat.errors import RematError

__all__ = ["BUILD_ARGS", "MODELS", "Built", "MLPBlock", "UserModel", "build", "linear_stack", "residual_mlp",
           "user_model"]


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
    shapes: str = field(default="")  # what one step runs on, e.g. "batch 8 x seq 1024, float32"


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
            return Built(name, model, x, lambda out: out.float().pow(2).mean(), spec.description,
                         f"batch {batch} x seq {seq}, {dtype_name}")
        ids = torch.randint(0, spec.vocab, (batch, seq))
    inputs: dict[str, Any] = {"input_ids": ids, "labels": ids}
    if "bert" not in name:
        inputs["use_cache"] = False
    return Built(name, model, inputs, None, spec.description, f"batch {batch} x seq {seq}, {dtype_name}")


# ---- the user's own model -------------------------------------------------------------------------------------

#: What remat passes, by name, to a model function that names it as a parameter.
BUILD_ARGS = ("batch", "seq", "dtype", "device")


@dataclass
class UserModel:
    """A model named on the command line by ``FILE.py:FUNCTION``, ``module:FUNCTION`` or a transformers
    config; made by :func:`user_model`, which checks everything that can be checked before building it."""

    text: str
    function: Callable[..., Any] | None = None
    takes: frozenset[str] = frozenset()
    spec: ModelSpec | None = None
    config: Any = None

    def build(self, *, batch: int, seq: int, dtype: str, device: str, given: Collection[str] = ()) -> Built:
        """The model and its inputs, made under ``torch.device(device)`` (on meta nothing is allocated).
        ``given``: the options given on the command line (``"batch"``, ``"seq"``, ``"dtype"``); one that
        the model would not use is refused, not ignored.

        Raises:
            RematError: the function raised, returned something else than a model, ``(model, inputs)`` or
                ``(model, inputs, loss_fn)``, or its model cannot serve the request.
        """
        torch.manual_seed(0)
        if self.function is None:
            assert self.spec is not None
            with torch.device(device):
                model = _from_config(self.text, self.config).to(getattr(torch, dtype))
            model.train()
            inputs = _token_inputs(self.text, model, batch=batch, seq=seq, dtype=dtype, device=device)
            return Built(self.text, model, inputs, None, self.spec.description, f"batch {batch} x seq {seq}, {dtype}")
        values = {"batch": batch, "seq": seq, "dtype": getattr(torch, dtype), "device": device}
        with torch.device(device):
            result = _call(self.text, self.function, {k: values[k] for k in self.takes})
        model, inputs, loss_fn = _unpacked(self.text, result)
        ignored = [k for k in ("batch", "seq") if k in given and k not in self.takes and inputs is not None]
        if ignored:
            flags = ", ".join(f"--{k}" for k in ignored)
            raise RematError(f"{self.text} returns its own inputs and has no {' or '.join(ignored)} parameter:"
                             f" {flags} would be ignored; drop {flags}, or give the function that parameter")
        cast = getattr(torch, dtype) if "dtype" in given and "dtype" not in self.takes else None
        model, inputs = _placed(self.text, model, inputs, device=device, cast=cast)
        if inputs is None:
            inputs = _token_inputs(self.text, model, batch=batch, seq=seq, dtype=dtype, device=device)
            shapes = f"batch {batch} x seq {seq}, {_dtype_of(model)}"
        else:
            shapes = f"{_describe_inputs(inputs)}; parameters {_dtype_of(model)}"
        model.train()
        n = sum(p.numel() for p in model.parameters())
        size = f"{n / 1e6:,.1f}M" if n >= 1e6 else f"{n:,}"
        return Built(self.text, model, inputs, loss_fn, f"{type(model).__name__}, {size} parameters", shapes)


def user_model(text: str, *, batch: int, seq: int, dtype: str) -> UserModel:
    """The user's model named by ``text`` (see :func:`remat.app.catalog.parse_model`), checked before any
    work: a config's requests (as a built-in's), transformers' support for it; a function's file or module
    imported, the function found, and its parameters ones remat can give (:data:`BUILD_ARGS`).

    Raises:
        RematError: one line naming ``text``, what is wrong and the fix.
    """
    kind, where, name = parse_model(text)
    if kind == "builtin":
        raise RematError(f"{text} is a built-in model: build it with remat.app.zoo.build")
    if kind == "config":
        spec = check_spec(config_spec(where), batch=batch, seq=seq, dtype=dtype)
        return UserModel(text, spec=spec, config=_causal_lm_config(spec))
    function = _load_function(text, kind, where, name)
    return UserModel(text, function=function, takes=_takes(text, function))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _load_function(text: str, kind: str, where: str, name: str) -> Callable[..., Any]:
    """Import ``where`` (a file or a module) and find the function ``name`` in it (dots: attributes)."""
    try:
        module = _import_file(where) if kind == "file" else _import_module(where)
    except ModuleNotFoundError as e:
        if e.name and where.startswith(e.name) and kind == "module":
            raise RematError(f"{text}: no module named {e.name!r} (remat imports from the current directory and"
                             " the installed packages; give the file instead: path/to/file.py:FUNCTION)") from e
        raise RematError(f"{text}: importing {where} failed: {_first_line(e)}") from e
    except (Exception, SystemExit) as e:  # a script that parses its own arguments exits when imported
        hint = " (does it run a script when imported? put that under `if __name__ == '__main__':`)" if isinstance(
            e, SystemExit) else ""
        raise RematError(f"{text}: importing {where} failed: {_first_line(e)}{hint}") from e
    found: Any = module
    for part in name.split("."):
        found = getattr(found, part, None)
        if found is None:
            names = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                           and getattr(v, "__module__", None) == module.__name__)
            raise RematError(f"{text}: {where} has no {name!r}; it defines {', '.join(names) or 'no functions'}")
    if not callable(found):
        raise RematError(f"{text}: {name} is a {type(found).__name__}, not a function that builds the model")
    return found


def _import_file(path: str) -> Any:
    """Import a Python file as a module (not as ``__main__``), its directory on ``sys.path`` for its imports,
    ``sys.argv`` holding only its path meanwhile."""
    path = os.path.abspath(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    name = stem if stem.isidentifier() and stem not in sys.modules else f"_remat_model_{abs(hash(path))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise RematError(f"{path}: cannot be imported as Python")
    if os.path.dirname(path) not in sys.path:
        sys.path.insert(0, os.path.dirname(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    argv, sys.argv = sys.argv, [path]  # a script that parses its arguments when imported sees none, not remat's
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    finally:
        sys.argv = argv
    return module


def _import_module(name: str) -> Any:
    """Import a module as ``python -m`` would find it: the current directory first."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    return importlib.import_module(name)


def _takes(text: str, function: Callable[..., Any]) -> frozenset[str]:
    """Which of :data:`BUILD_ARGS` ``function`` names (all of them with ``**kwargs``); a parameter remat
    cannot give (no default, not one of them) is refused."""
    try:
        params = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):  # a builtin or a C function: call it without arguments
        return frozenset()
    kinds = inspect.Parameter
    named = (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)
    needed = [p.name for p in params if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
              and not (p.name in BUILD_ARGS and p.kind in named)]
    if needed:
        raise RematError(f"{text}: the function needs {', '.join(needed)}, which remat cannot give: it passes"
                         f" {', '.join(BUILD_ARGS)} by name to a function that names them; give the others defaults")
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return frozenset(BUILD_ARGS)
    return frozenset(p.name for p in params if p.name in BUILD_ARGS and p.kind in named)


def _call(text: str, function: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    try:
        return function(**kwargs)
    except Exception as e:
        raise RematError(f"{text} raised {_first_line(e)} (--debug shows the traceback)") from e


def _unpacked(text: str, result: Any) -> tuple[nn.Module, Any, Callable[[Any], torch.Tensor] | None]:
    """``(model, inputs or None, loss_fn or None)`` from what a model function returned."""
    form = "return the model, (model, inputs) or (model, inputs, loss_fn)"
    if isinstance(result, nn.Module):
        return result, None, None
    if not isinstance(result, (tuple, list)) or len(result) not in (2, 3):
        what = f"a {type(result).__name__} of {len(result)}" if isinstance(result, (tuple, list)) else (
            f"a {type(result).__name__}")
        raise RematError(f"{text} returned {what}; {form}")
    model, inputs, loss_fn = (*result, None)[:3]
    if not isinstance(model, nn.Module):
        raise RematError(f"{text} returned a {type(model).__name__} where the model goes (first); {form}")
    if loss_fn is not None and not callable(loss_fn):
        raise RematError(f"{text} returned a {type(loss_fn).__name__} as loss_fn; it is called as"
                         " loss_fn(output) -> a scalar tensor")
    if not any(isinstance(t, torch.Tensor) for t in tree_leaves(inputs)):
        raise RematError(f"{text} returned inputs without a tensor ({type(inputs).__name__}); inputs are a tensor,"
                         " a tuple of positional inputs or a dict of keyword inputs")
    return model, inputs, loss_fn


def _placed(text: str, model: nn.Module, inputs: Any, *, device: str,
            cast: torch.dtype | None) -> tuple[nn.Module, Any]:
    """The model and the inputs' tensors on ``device``, and in ``cast`` (floating point ones) if given."""
    try:
        model = model.to(device) if cast is None else model.to(device, cast)
        inputs = tree_map_only(torch.Tensor, lambda t: t.to(device, cast if t.is_floating_point() else None), inputs)
    except (RuntimeError, NotImplementedError) as e:  # e.g. a model made on meta, asked for on the CPU
        raise RematError(f"{text}: its model or inputs cannot be put on {device} ({_first_line(e)}); make them on"
                         " the device remat passes (it calls the function under `with torch.device(device)`)") from e
    return model, inputs


def _token_inputs(text: str, model: nn.Module, *, batch: int, seq: int, dtype: str, device: str) -> dict[str, Any]:
    """``batch`` x ``seq`` random token ids (and the same as labels) for a transformers language model,
    whose config's positions and sizes are checked as a built-in's."""
    to_dict = getattr(getattr(model, "config", None), "to_dict", None)
    data = to_dict() if callable(to_dict) else {}
    if not isinstance(data.get("vocab_size"), int):
        raise RematError(f"{text} returned a {type(model).__name__} without inputs, and remat makes inputs only for"
                         " transformers language models (token ids); return (model, inputs)")
    spec = check_spec(spec_from_config(data, text), batch=batch, seq=seq, dtype=dtype)
    assert spec.vocab is not None
    ids = torch.randint(0, spec.vocab, (batch, seq), device=device)
    inputs: dict[str, Any] = {"input_ids": ids, "labels": ids}
    if "use_cache" in inspect.signature(model.forward).parameters:
        inputs["use_cache"] = False
    return inputs


def _describe_inputs(inputs: Any) -> str:
    """``'inputs input_ids 8x1024 int64, labels 8x1024 int64'``: the tensors a step runs on."""
    items = inputs.items() if isinstance(inputs, dict) else [("", t) for t in tree_leaves(inputs)]
    parts = [f"{k} {'x'.join(map(str, t.shape)) or 'scalar'} {str(t.dtype).removeprefix('torch.')}".strip()
             for k, t in items if isinstance(t, torch.Tensor)]
    return "inputs " + ", ".join(parts[:4]) + (f" and {len(parts) - 4} more" if len(parts) > 4 else "")


def _dtype_of(model: nn.Module) -> str:
    dtypes = [p.dtype for p in model.parameters() if p.is_floating_point()]
    return str(max(set(dtypes), key=dtypes.count)).removeprefix("torch.") if dtypes else "no floating parameters"


def _causal_lm_config(spec: ModelSpec) -> Any:
    """The transformers config of ``spec`` (read from its config.json), if transformers builds a causal LM
    from it."""
    try:
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RematError(f"{spec.name}: a transformers config needs transformers: pip install 'remat[hf]'") from e
    transformers.logging.set_verbosity_error()
    model_type = spec.config["model_type"]
    try:
        config = transformers.AutoConfig.for_model(**spec.config)
    except ValueError as e:
        raise RematError(f"{spec.name}: model_type {model_type!r} is not one transformers {transformers.__version__}"
                         " knows; upgrade transformers, or give FILE.py:FUNCTION that builds the model") from e
    except Exception as e:
        raise RematError(f"{spec.name}: transformers cannot read this config: {_first_line(e)}") from e
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise RematError(f"{spec.name}: transformers has no causal language model for a {model_type} config"
                         " (AutoModelForCausalLM); give FILE.py:FUNCTION that builds the model and its inputs")
    return config


def _from_config(text: str, config: Any) -> nn.Module:
    """AutoModelForCausalLM from ``config``, random weights (nothing downloaded)."""
    import transformers

    try:
        return transformers.AutoModelForCausalLM.from_config(config)
    except Exception as e:
        raise RematError(f"{text}: transformers cannot build this model: {_first_line(e)}") from e
