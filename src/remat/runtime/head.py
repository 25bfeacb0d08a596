"""The loss head in chunks: the output projection and the cross-entropy over chunks of tokens, each chunk
checkpointed, so that a language model's logits are never all live (``head="chunked"``).

Note: [Chunked head]
For a language model the largest activations are not in the blocks but in the head: the logits (tokens x
vocabulary), their fp32 copy in the loss, its log-softmax and their gradients. Checkpointing the blocks cannot
touch them. A chunked head runs the projection and the loss over ``chunks`` slices of the tokens, each under
``torch.utils.checkpoint`` (non-reentrant): a chunk's forward keeps only its input (a view of the hidden
states, which the head's input holds anyway) and its loss sum; its backward computes the chunk's logits again
and frees them before the next chunk's. So no more than one chunk's logits are live, at the cost of one more
projection in backward (torchtune's chunked cross-entropy chunks the loss only; Liger's fused linear
cross-entropy and Apple's Cut Cross-Entropy fuse projection and loss in kernels of their own; here it is
plain PyTorch, and the planner chooses the number of chunks with the blocks' plan, on measured figures).

Rule 1. The loss is what transformers computes: labels shifted for a causal LM (the label of token t+1 at t,
    the last position ignored) or ``shift_labels`` as given, ``ignore_index`` (-100) left out, the sum of the
    fp32 cross-entropy divided by the number of tokens not ignored, or by ``num_items_in_batch`` when the
    Trainer passes it (gradient accumulation).
Rule 2. It is summed in another order (per chunk, then over chunks), so loss and gradients equal the whole
    head's to floating-point tolerance, not bit for bit (``verify="grads"`` says which comparison it made).
Rule 3. Full logits are never built, so they are not returned: a transformers model's output has the loss
    and ``logits=None``. Called without labels (generation, evaluation of logits) the model runs as it is.
Rule 4. ``chunks=0`` is the whole head, not checkpointed: the model's own forward for a transformers model
    (bitwise), one projection and one loss for a :class:`ChunkedHead`.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import inspect
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from remat.errors import RematError

__all__ = ["HEADS", "ChunkedHead", "chunk_counts", "chunked_cross_entropy", "chunked_heads", "final_norm", "head_site",
           "install", "set_chunks", "uninstall", "whole_heads"]

#: What ``head=`` accepts: the model's head as it is, or the head in chunks the planner chooses.
HEADS = ("keep", "chunked")
#: The most chunks the profiler measures, and the fewest tokens a chunk has (below, a chunk's matmul is
#: small enough that its launch costs more than its logits save).
MAX_CHUNKS = 64
MIN_CHUNK_TOKENS = 16
IGNORE_INDEX = -100


def _loss_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
              ignore_index: int, norm: nn.Module | None = None) -> torch.Tensor:
    """One chunk: its hidden states normalised (the model's final norm, when it runs in the chunks), its
    logits, upcast to fp32 as transformers' loss does, and the sum of their cross-entropy."""
    if norm is not None:
        hidden = norm(hidden)
    logits = F.linear(hidden, weight, bias)
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          labels: torch.Tensor, *, chunks: int, ignore_index: int = IGNORE_INDEX,
                          shift: bool = False, num_items_in_batch: Any = None,
                          norm: nn.Module | None = None) -> torch.Tensor:
    """The mean cross-entropy of ``F.linear(norm(hidden), weight, bias)`` against ``labels``, over ``chunks``
    checkpointed chunks of tokens (Note [Chunked head]; ``chunks=0``: whole, not checkpointed).

    Args:
        hidden: ``(..., hidden)``, one row per token.
        weight, bias: the output projection's (``(vocab, hidden)``, ``(vocab,)`` or None).
        labels: one per token (``hidden.shape[:-1]``); ``ignore_index`` ones are left out.
        shift: a causal LM's labels: token t is scored against label t+1, the last one ignored.
        num_items_in_batch: divide the sum by this instead of the count of tokens not ignored.
        norm: a per-token norm applied to each chunk's hidden states first (Note [The final norm in the
            chunks]); None: the hidden states are the projection's input.
    """
    if shift:
        labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).to(h.device)
    if y.shape[0] != h.shape[0]:
        raise RematError(f"remat: the chunked head got {h.shape[0]} tokens of hidden states but {y.shape[0]} labels"
                         f" (hidden {tuple(hidden.shape)}, labels {tuple(labels.shape)}); give one label per token")
    if chunks == 0:
        total = _loss_sum(h, weight, bias, y, ignore_index, norm)
    else:
        parts = [checkpoint(_loss_sum, hc, weight, bias, yc, ignore_index, norm, use_reentrant=False)
                 for hc, yc in zip(torch.tensor_split(h, chunks), torch.tensor_split(y, chunks), strict=True)]
        total = functools.reduce(torch.add, parts)
    if num_items_in_batch is None:
        return total / (y != ignore_index).sum()
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


@dataclass
class _Seen:
    """What the head saw on its last call with labels, to choose the chunk counts to measure."""

    tokens: int = 0
    vocab: int = 0
    hidden_bytes: int = 0  # of the head's input, all tokens


class ChunkedHead(nn.Module):
    """An output projection and its cross-entropy, in chunks of tokens (Note [Chunked head]): the head of a
    model that is not a transformers causal LM, which ``remat.auto(..., head="chunked")`` then plans.

        self.head = remat.ChunkedHead(nn.Linear(hidden, vocab, bias=False))   # in __init__
        return self.head(hidden_states, labels)                               # in forward: the loss

    Args:
        linear: the projection to the vocabulary (an ``nn.Linear``; it may be shared, e.g. tied to an
            embedding's weight).
        chunks: how many chunks (0: whole, not checkpointed); the planner sets it when it plans the head.
        ignore_index: labels left out of the loss.
        shift: labels of a causal LM given unshifted (token t scored against label t+1).

    ``forward(hidden, labels, num_items_in_batch=None)`` returns the mean loss over tokens not ignored (or
    the sum over ``num_items_in_batch``), never the logits.
    """

    def __init__(self, linear: nn.Linear, *, chunks: int = 8, ignore_index: int = IGNORE_INDEX,
                 shift: bool = False) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise RematError(f"remat.ChunkedHead: linear must be a torch.nn.Linear, got {type(linear).__name__}")
        self.linear = linear
        self.chunks = _checked_chunks(chunks, "remat.ChunkedHead")
        self.ignore_index, self.shift = ignore_index, shift
        self.seen = _Seen()

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        self.seen = _Seen(labels.numel(), self.linear.out_features, hidden.numel() * hidden.element_size())
        return chunked_cross_entropy(hidden, self.linear.weight, self.linear.bias, labels, chunks=self.chunks,
                                     ignore_index=self.ignore_index, shift=self.shift,
                                     num_items_in_batch=num_items_in_batch)

    def extra_repr(self) -> str:
        return f"chunks={self.chunks}, ignore_index={self.ignore_index}, shift={self.shift}"


def _checked_chunks(chunks: Any, where: str) -> int:
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 0:
        raise RematError(f"{where}: chunks={chunks!r} must be an int >= 0 (0: the whole head, not checkpointed)")
    return chunks


# ---- a transformers causal LM ------------------------------------------------------------------------------------

_FORWARD = "forward"


class _CausalLMForward:
    """A transformers causal LM's forward with its head in chunks, installed as the instance's ``forward``
    (Note [Chunked head]): the model's own forward runs with ``lm_head`` passing its input through and no
    labels, so that it returns the hidden states the projection would take; the chunked loss runs on them.
    A plain object (not a module): parameters, ``state_dict`` and the module tree are untouched, and a
    deep copy (the profiler's fake copy) copies it bound to the copied model."""

    def __init__(self, model: nn.Module, chunks: int) -> None:
        self.model, self.chunks, self.seen = model, chunks, _Seen()

    def original(self) -> Callable[..., Any]:
        forward: Callable[..., Any] = type(self.model).forward.__get__(self.model)
        return forward

    @property
    def __signature__(self) -> inspect.Signature:
        """The model's own signature (the Trainer reads it to keep dataset columns and pass loss kwargs)."""
        return inspect.signature(self.original())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        original = self.original()
        if args:  # by name from here on (labels may come by position)
            kwargs = {**inspect.signature(original).bind_partial(*args).arguments, **kwargs}
        labels = kwargs.pop("labels", None)
        if labels is None:
            return original(**kwargs)
        head = self.model.lm_head
        assert isinstance(head, nn.Linear)  # checked when installed (causal_lm)
        tokens = labels.numel()
        self.seen = _Seen(tokens, head.out_features, tokens * head.in_features * head.weight.element_size())
        if self.chunks == 0:
            return original(labels=labels, **kwargs)
        keep = kwargs.get("logits_to_keep", 0)
        if not (isinstance(keep, int) and keep == 0):
            raise RematError(f"remat: logits_to_keep={keep!r} with labels, and the head in chunks scores every token;"
                             " call the model without logits_to_keep, or remat.remove(model) first")
        norm = None if _wants_hidden_states(self.model, kwargs) else final_norm(self.model)
        with _passing_through(head, norm):
            out = original(**kwargs)
        hidden = out.logits  # what lm_head received (before the final norm when it runs in the chunks)
        shift_labels = kwargs.get("shift_labels")
        loss = chunked_cross_entropy(
            hidden, head.weight, head.bias, labels if shift_labels is None else shift_labels, chunks=self.chunks,
            ignore_index=kwargs.get("ignore_index", IGNORE_INDEX), shift=shift_labels is None,
            num_items_in_batch=kwargs.get("num_items_in_batch"), norm=norm)
        return _without_logits(out, loss)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@contextlib.contextmanager
def _passing_through(*modules: nn.Module | None) -> Iterator[None]:
    """Each of ``modules`` (None: none) returns its input while inside."""
    passing = [m for m in modules if m is not None]
    for m in passing:
        m.forward = _identity
    try:
        yield
    finally:
        for m in passing:
            m.__dict__.pop(_FORWARD, None)


def _wants_hidden_states(lm: nn.Module, kwargs: dict[str, Any]) -> bool:
    """The call returns the hidden states (their last one is the final norm's output, which the chunks
    would not build): the final norm then runs before the chunks, as the model has it."""
    return bool(kwargs.get("output_hidden_states", getattr(getattr(lm, "config", None), "output_hidden_states", False)))


def _without_logits(out: Any, loss: torch.Tensor) -> Any:
    """The model's output with the chunked loss and ``logits=None`` (Rule 3: no full logits were built)."""
    if not hasattr(out, "items"):
        raise RematError(f"remat: the chunked head needs the model to return a transformers ModelOutput, got"
                         f" {type(out).__name__}; call it with return_dict=True")
    fields = {k: v for k, v in out.items() if k not in ("loss", "logits")}
    return type(out)(loss=loss, logits=None, **fields)


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM in ``model`` (itself, or inside a wrapper such as PEFT's) whose head can
    run in chunks.

    Raises:
        RematError: there is none, or it is one the chunked head would compute otherwise than the model
            (the message says why).
    """
    found = [m for m in model.modules() if _looks_causal(m)]
    if len(found) != 1:
        raise RematError(_not_applicable(model, found))
    lm = found[0]
    why = _refusal(lm)
    if why:
        raise RematError(f"remat: head='chunked' does not apply to {type(lm).__name__}: {why}. Use head='keep'"
                         " (the default), or give the model a remat.ChunkedHead")
    return lm


def _looks_causal(m: nn.Module) -> bool:
    name = type(m).__name__
    return hasattr(m, "lm_head") and hasattr(type(m), "loss_function") and name.endswith(("ForCausalLM",
                                                                                          "LMHeadModel"))


def _not_applicable(model: nn.Module, found: list[nn.Module]) -> str:
    what = (f"it holds {len(found)} causal LMs ({', '.join(type(m).__name__ for m in found)}); remat plans one head"
            if found else "it is neither a transformers causal LM (a *ForCausalLM or *LMHeadModel, whose loss is"
            " computed from labels) nor a model with a remat.ChunkedHead")
    return (f"remat: head='chunked' does not apply to {type(model).__name__}: {what}. Use head='keep' (the default),"
            " or put the output projection and the loss in a remat.ChunkedHead(nn.Linear(hidden, vocab))")


def _refusal(lm: nn.Module) -> str:
    """Why the chunked head would compute otherwise than ``lm``'s forward ("" when it would not)."""
    head = lm.lm_head
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        return (f"its lm_head is a {type(head).__name__}, not a torch.nn.Linear (an adapter or a quantised layer"
                " computes its logits its own way)")
    if head._forward_hooks or head._forward_pre_hooks:
        return "its lm_head has forward hooks (accelerate's offloading, an adapter), which the chunks would bypass"
    loss = getattr(lm.loss_function, "__name__", "")
    if loss != "ForCausalLMLoss":
        return f"its loss_function is {loss or type(lm.loss_function).__name__}, not transformers' ForCausalLMLoss"
    return _forward_refusal(type(lm))


def _forward_refusal(cls: type) -> str:
    """Note: [Reading the forward] The chunks replace what the model's forward does from ``logits =
    self.lm_head(...)`` to its loss; a model that changes its logits in between (Gemma 2's final soft-capping,
    Cohere's logit scale) would be computed otherwise, so its forward is read (ast) and refused then."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))  # type: ignore[attr-defined]
    except (OSError, TypeError, SyntaxError):
        return "its forward's source cannot be read to check that it computes its loss from lm_head's logits alone"
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.FunctionDef) else []
    at = next((i for i, st in enumerate(body) if _assigns_lm_head(st)), None)
    if at is None:
        return "its forward does not compute `logits = self.lm_head(...)`"
    for st in body[at + 1:]:
        for node in ast.walk(st):
            targets = (node.targets if isinstance(node, ast.Assign)
                       else [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
            if any(isinstance(t, ast.Name) and t.id == "logits" for t in targets):
                return (f"its forward changes the logits after lm_head (`{ast.unparse(node).splitlines()[0]}`), which"
                        " the chunks would not")
    return ""


def _assigns_lm_head(st: ast.stmt) -> bool:
    if not (isinstance(st, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "logits" for t in st.targets)):
        return False
    call = st.value
    return (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "lm_head"
            and isinstance(call.func.value, ast.Name) and call.func.value.id == "self")


# ---- the final norm in the chunks ---------------------------------------------------------------------------------


def final_norm(lm: nn.Module) -> nn.Module | None:
    """The causal LM's final norm when it can run inside the chunks, else None.

    Note: [The final norm in the chunks] A causal LM normalises its hidden states once more before
    ``lm_head`` (Llama's ``model.norm``, GPT-2's ``transformer.ln_f``); the norm's fp32 activations, its
    output and, in backward, its output's gradient and its own fp32 backward are as large as the hidden
    states (2.25 GiB of a llama-7b head's backward floor at batch 8 x 4,096 in bfloat16). A per-token norm
    (LayerNorm or RMSNorm over the last dimension) normalises each token alone, so norm -> projection ->
    loss per chunk of tokens is exact per token, and only one chunk's norm is live. It runs in the chunks
    only where that is certain, read from the forwards (:func:`_norm_attr`): the base model's last op on
    its hidden states is ``self.<norm>(hidden_states)`` (a view may follow), which it returns as
    ``last_hidden_state``, and the causal LM feeds exactly that (sliced by tokens) to ``lm_head``; the
    norm is an ``nn.LayerNorm``/``nn.RMSNorm`` over the hidden size, or an RMSNorm class of the model's own
    family, called once, without hooks. A call that returns the hidden states keeps it outside
    (:func:`_wants_hidden_states`). Elsewhere the head is chunked as before, the norm whole.
    """
    prefix = getattr(lm, "base_model_prefix", "")
    base = getattr(lm, prefix, None) if isinstance(prefix, str) and prefix else None
    if not isinstance(base, nn.Module):
        return None
    attr = _norm_attr(type(lm), type(base), prefix)
    norm = getattr(base, attr, None) if attr else None
    head = lm.lm_head
    if not (isinstance(norm, nn.Module) and isinstance(head, nn.Linear) and _per_token(norm, base, head.in_features)):
        return None
    if norm._forward_hooks or norm._forward_pre_hooks or _FORWARD in norm.__dict__:
        return None
    if sum(m is norm for _, m in lm.named_modules(remove_duplicate=False)) != 1:
        return None  # shared with another place, which the pass-through would change
    return norm


def _per_token(norm: nn.Module, base: nn.Module, hidden: int) -> bool:
    """``norm`` normalises each token over the hidden size alone, and its class's own forward runs."""
    cls = type(norm)
    if cls in (nn.LayerNorm, nn.RMSNorm):
        return tuple(norm.normalized_shape) == (hidden,)  # type: ignore[arg-type]
    family = cls.__module__ == type(base).__module__ and cls.__name__.endswith("RMSNorm")
    weight = getattr(norm, "weight", None)
    return family and (weight is None or (isinstance(weight, torch.Tensor) and tuple(weight.shape) == (hidden,)))


_NORM_ATTRS: dict[tuple[type, type, str], str] = {}


def _norm_attr(lm_cls: type, base_cls: type, prefix: str) -> str:
    """The attribute of the base model that is its final norm, read from the two forwards (Note [The final
    norm in the chunks]); "" where the forwards do not show it for certain. Read once per pair of classes."""
    key = (lm_cls, base_cls, prefix)
    if key not in _NORM_ATTRS:
        _NORM_ATTRS[key] = _read_norm_attr(lm_cls, base_cls, prefix)
    return _NORM_ATTRS[key]


def _read_norm_attr(lm_cls: type, base_cls: type, prefix: str) -> str:
    lm_body, base_body = _body(lm_cls), _body(base_cls)
    if lm_body is None or base_body is None or not _feeds_last_hidden_state(lm_body, prefix):
        return ""
    at = next((i for i in range(len(base_body) - 1, -1, -1) if _norm_call(base_body[i])), None)
    if at is None:
        return ""
    st = base_body[at]
    assert isinstance(st, ast.Assign) and isinstance(st.value, ast.Call) and isinstance(st.value.func, ast.Attribute)
    name, attr = _name(st.targets[0]), st.value.func.attr
    calls = [n for s in base_body for n in ast.walk(s) if isinstance(n, ast.Attribute) and n.attr == attr
             and isinstance(n.value, ast.Name) and n.value.id == "self"]
    if len(calls) != 1:
        return ""
    for later in base_body[at + 1:]:
        if _is_view(later, name) or (isinstance(later, ast.Return) and _returns_last(later, name)):
            continue
        if any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(later)):
            return ""
    return attr


def _body(cls: type) -> list[ast.stmt] | None:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))  # type: ignore[attr-defined]
    except (OSError, TypeError, SyntaxError, AttributeError):
        return None
    return tree.body[0].body if tree.body and isinstance(tree.body[0], ast.FunctionDef) else None


def _name(node: ast.AST) -> str:
    return node.id if isinstance(node, ast.Name) else ""


def _norm_call(st: ast.stmt) -> bool:
    """``h = self.<attr>(h)``: one positional argument, the name assigned."""
    if not (isinstance(st, ast.Assign) and len(st.targets) == 1 and _name(st.targets[0])):
        return False
    call = st.value
    return (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and _name(call.func.value) == "self"
            and len(call.args) == 1 and not call.keywords and _name(call.args[0]) == _name(st.targets[0]))


def _is_view(st: ast.stmt, name: str) -> bool:
    """``h = h.view(...)`` or ``h = h.reshape(...)`` (the projection takes the last dimension, which the
    norm normalises: a view keeps each token's row)."""
    if not (isinstance(st, ast.Assign) and len(st.targets) == 1 and _name(st.targets[0]) == name):
        return False
    call = st.value
    return (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
            and call.func.attr in ("view", "reshape") and _name(call.func.value) == name
            and not any(_name(n) == name for a in call.args for n in ast.walk(a)))


def _returns_last(st: ast.Return, name: str) -> bool:
    """``return Output(last_hidden_state=h, ...)``, ``h`` nowhere else in it."""
    call = st.value
    if not isinstance(call, ast.Call) or call.args:
        return False
    uses = [k for k in call.keywords if any(_name(n) == name for n in ast.walk(k.value))]
    return len(uses) == 1 and uses[0].arg == "last_hidden_state" and _name(uses[0].value) == name


def _feeds_last_hidden_state(body: list[ast.stmt], prefix: str) -> bool:
    """The causal LM's forward gives ``lm_head`` the base model's ``last_hidden_state`` (or ``[0]``),
    sliced by tokens only: ``h = out.last_hidden_state``, ``h = slice_logits_to_keep(h, ...)``,
    ``h[:, s, :]``, and nothing else assigns ``h``."""
    at = next((i for i, st in enumerate(body) if _assigns_lm_head(st)), None)
    if at is None:
        return False
    st = body[at]
    assert isinstance(st, ast.Assign) and isinstance(st.value, ast.Call)
    arg = st.value.args[0] if len(st.value.args) == 1 and not st.value.keywords else None
    name = _name(arg.value if isinstance(arg, ast.Subscript) else arg) if arg is not None else ""
    calls = [_assigned(s) for s in body[:at]]
    outs = {t for t, v in calls if isinstance(v, ast.Call) and isinstance(v.func, ast.Attribute)
            and v.func.attr == prefix and _name(v.func.value) == "self"}
    sets = [s for s in body[:at] for n in ast.walk(s) if isinstance(n, (ast.Assign, ast.AugAssign, ast.AnnAssign))
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if _name(t) == name]
    return bool(name) and bool(sets) and _reads_output(sets[0], outs) and all(_slices(s, name) for s in sets[1:])


def _assigned(st: ast.stmt) -> tuple[str, ast.expr | None]:
    """``name = value`` or ``name: T = value``: (name, value); ("", None) for any other statement."""
    if isinstance(st, ast.Assign) and len(st.targets) == 1 and _name(st.targets[0]):
        return _name(st.targets[0]), st.value
    if isinstance(st, ast.AnnAssign) and st.value is not None and _name(st.target):
        return _name(st.target), st.value
    return "", None


def _reads_output(st: ast.stmt, outs: set[str]) -> bool:
    """``h = out.last_hidden_state`` or ``h = out[0]``, ``out`` the base model's output."""
    v = _assigned(st)[1]
    if isinstance(v, ast.Attribute):
        return v.attr == "last_hidden_state" and _name(v.value) in outs
    return (isinstance(v, ast.Subscript) and _name(v.value) in outs and isinstance(v.slice, ast.Constant)
            and v.slice.value == 0)


def _slices(st: ast.stmt, name: str) -> bool:
    """``h = slice_logits_to_keep(h, ...)`` or ``h = h[...]``."""
    v = _assigned(st)[1]
    if isinstance(v, ast.Subscript):
        return _name(v.value) == name
    return (isinstance(v, ast.Call) and _name(v.func) == "slice_logits_to_keep" and len(v.args) >= 1
            and _name(v.args[0]) == name)


# ---- installing, finding, setting ----------------------------------------------------------------------------------


def chunked_heads(model: nn.Module) -> list[ChunkedHead | _CausalLMForward]:
    """The heads in ``model`` whose chunks remat sets: its :class:`ChunkedHead` modules and an installed
    causal-LM forward."""
    out: list[ChunkedHead | _CausalLMForward] = []
    for m in model.modules():
        if isinstance(m, ChunkedHead):
            out.append(m)
        elif isinstance(m.__dict__.get(_FORWARD), _CausalLMForward):
            out.append(m.__dict__[_FORWARD])
    return out


def set_chunks(model: nn.Module, chunks: int) -> None:
    """Run every head of ``model`` (:func:`chunked_heads`) in ``chunks`` chunks."""
    for h in chunked_heads(model):
        h.chunks = chunks


def install(model: nn.Module, chunks: int) -> Callable[[], None]:
    """Run ``model``'s head in ``chunks`` chunks: its :class:`ChunkedHead`, or its transformers causal LM's
    forward installed (:func:`causal_lm` refuses a model where it does not apply). Returns what undoes it."""
    chunks = _checked_chunks(chunks, "remat")
    heads = [m for m in model.modules() if isinstance(m, ChunkedHead)]
    if len(heads) > 1:
        raise RematError(f"remat: {type(model).__name__} has {len(heads)} remat.ChunkedHead modules; remat plans"
                         " one head")
    if heads:
        before = heads[0].chunks
        heads[0].chunks = chunks
        return functools.partial(setattr, heads[0], "chunks", before)
    lm = causal_lm(model)
    previous = lm.__dict__.get(_FORWARD)
    if isinstance(previous, _CausalLMForward):
        before = previous.chunks
        previous.chunks = chunks
        return functools.partial(setattr, previous, "chunks", before)
    lm.forward = _CausalLMForward(lm, chunks)
    return functools.partial(uninstall, lm)


def uninstall(lm: nn.Module) -> None:
    """The causal LM's own forward again."""
    if isinstance(lm.__dict__.get(_FORWARD), _CausalLMForward):
        del lm.__dict__[_FORWARD]


@contextlib.contextmanager
def whole_heads(model: nn.Module) -> Iterator[None]:
    """Every chunked head of ``model`` whole (0 chunks) while inside: the plain model's step."""
    before = [(h, h.chunks) for h in chunked_heads(model)]
    for h, _ in before:
        h.chunks = 0
    try:
        yield
    finally:
        for h, c in before:
            h.chunks = c


@contextlib.contextmanager
def head_site(model: nn.Module, example_inputs: Any, loss_fn: Any, head: str, call: str) -> Iterator[bool]:
    """While profiling: ``head="chunked"``, the model's head installed whole (chunk counts are then set on
    the step's model, see :func:`set_chunks`), yields True; ``"keep"``, a head remat installed runs whole
    (the plain model is profiled, as its blocks are), yields False. The model is left as it was."""
    if head not in HEADS:
        raise RematError(f"{call}: head={head!r}; use 'keep' (the model's head as it is) or 'chunked' (the output"
                         " projection and the loss in chunks of tokens, chosen by the planner)")
    if head == "keep":
        installed = [h for h in chunked_heads(model) if isinstance(h, _CausalLMForward)]
        before = [(h, h.chunks) for h in installed]
        for h, _ in before:
            h.chunks = 0
        try:
            yield False
        finally:
            for h, c in before:
                h.chunks = c
        return
    if not any(isinstance(m, ChunkedHead) for m in model.modules()):
        _check_labels(model, example_inputs, loss_fn, call)
    undo = install(model, 0)
    try:
        yield True
    finally:
        undo()


def _check_labels(model: nn.Module, example_inputs: Any, loss_fn: Any, call: str) -> None:
    """A transformers model's chunked loss is computed from ``labels``, by the model."""
    causal_lm(model)  # applies at all (the clearer refusal first)
    if not isinstance(example_inputs, dict) or example_inputs.get("labels") is None:
        raise RematError(f"{call}: head='chunked' computes a transformers model's loss from its labels, and the example"
                         " inputs have none; pass a dict with 'labels' (e.g. {'input_ids': ids, 'labels': ids})")
    if loss_fn is not None:
        raise RematError(f"{call}: head='chunked' with loss_fn=: the model's output will have no logits (the chunked"
                         " head returns the loss, out.loss, from labels); drop loss_fn")


def chunk_counts(model: nn.Module) -> list[int]:
    """The chunk counts to measure for ``model``'s head, from what it saw on its last call: 1, 2, 4, ... while
    a chunk keeps :data:`MIN_CHUNK_TOKENS` tokens (at most :data:`MAX_CHUNKS`), up to the first count whose
    chunk's fp32 logits are no larger than the head's input (more chunks then save little)."""
    seen = max((h.seen for h in chunked_heads(model)), key=lambda s: s.tokens, default=_Seen())
    counts: list[int] = []
    c = 1
    while c <= MAX_CHUNKS and seen.tokens // c >= MIN_CHUNK_TOKENS:
        counts.append(c)
        if seen.hidden_bytes and seen.tokens * seen.vocab * 4 <= c * seen.hidden_bytes:
            break
        c *= 2
    return counts
