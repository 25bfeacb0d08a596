"""A plan: the nested schedule of one training step, as plain data. No torch here.

A plan is a sequence of items over the chain's stages ``0 … L``, in order:

* :class:`Record` ``(i)`` — run stage ``i`` recording autograd: its record (output and saved tensors)
  is kept until its backward;
* :class:`Region` ``(start, stop, body)`` — a checkpoint region over stages ``start … stop-1``: the
  first pass runs them without keeping anything but the region's input ``x_start`` and its output;
  during backward the region is recomputed from ``x_start`` following ``body``, itself a sequence of
  items over the same stages (so regions nest: multi-level recomputation);
* :class:`Selective` ``(i, option, save)`` — run block ``i`` in its own checkpoint with a selective
  policy: the outputs of the ops in ``save`` are kept from the first pass, the block's other ops are
  recomputed just before its backward (one of the block's profiled :class:`remat.BlockOption`).

More actions (offloading a record to host memory, another way to run a stage) become more item types;
the simulator and the executor dispatch on the type.

Plans are checked in one place, :meth:`Plan.validate`, which the planners call on every plan they make,
:meth:`Plan.from_json` calls on every plan it reads, and :func:`remat.apply` calls before running one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from remat.errors import PlanError
from remat.planning.profile import STAGE_KINDS, frozen
from remat.planning.table import render_table
from remat.units import format_bytes, format_seconds

__all__ = ["PLAN_FORMAT", "Item", "Plan", "Prediction", "Record", "Region", "Selective", "validate_items"]

PLAN_FORMAT = "remat.Plan/1"


@dataclass(frozen=True)
class Record:
    """Run stage ``stage`` recording; keep its record until its backward."""

    stage: int

    def to_dict(self) -> dict[str, Any]:
        return {"op": "record", "stage": self.stage}

    def describe(self) -> str:
        return f"record {self.stage}"


@dataclass(frozen=True)
class Region:
    """Checkpoint stages ``start … stop-1``; recompute them during backward following ``body``."""

    start: int
    stop: int
    body: tuple[Item, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"op": "region", "start": self.start, "stop": self.stop, "body": [b.to_dict() for b in self.body]}

    def describe(self) -> str:
        return f"region {self.start}..{self.stop - 1}"


@dataclass(frozen=True)
class Selective:
    """Run block ``stage`` in its own checkpoint, keeping the outputs of the ops in ``save`` from the first
    pass and recomputing the block's other ops before its backward (the stage's option ``option``)."""

    stage: int
    option: str
    save: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"op": "selective", "stage": self.stage, "option": self.option, "save": list(self.save)}

    def describe(self) -> str:
        return f"selective {self.stage} ({self.option})"


Item = Union[Record, Region, Selective]  # noqa: UP007 - a runtime alias, used before 3.10's X | Y in isinstance


def item_span(item: Item) -> tuple[int, int]:
    """``(start, stop)``: the stages ``start … stop-1`` an item covers."""
    return (item.start, item.stop) if isinstance(item, Region) else (item.stage, item.stage + 1)


def _stages(a: int, b: int) -> str:
    return f"stage {a}" if b == a + 1 else f"stages {a}..{b - 1}"


def validate_items(items: Sequence[Item], start: int, stop: int, checkpointable: Sequence[bool],
                   joins_previous: Sequence[bool] | None = None, *, where: str = "plan") -> None:
    """Check that ``items`` cover stages ``start … stop-1`` once each, in order, regions only where allowed.

    ``checkpointable[k]``: whether stage ``k`` may be inside a region; ``joins_previous[k]``: whether it
    may share a region with stage ``k-1``.

    Raises:
        PlanError: naming the first offending item, e.g. ``plan item 3 (region 2..5) overlaps region 1..3``.
    """
    if not isinstance(items, (tuple, list)) or not items:
        raise PlanError(f"{where}: no items for {_stages(start, stop)}")
    pos, prev = start, ""
    for k, it in enumerate(items):
        label = f"{where} item {k}"
        if not isinstance(it, (Record, Region, Selective)):
            raise PlanError(f"{label}: {it!r} is not a remat.Record or remat.Region (nor a remat.Selective)")
        _check_ints(it, label)
        label = f"{label} ({it.describe()})"
        a, b = item_span(it)
        if a < start or b > stop:
            outside = "the plan's" if where == "plan" else "its region's"
            raise PlanError(f"{label} is outside {outside} {_stages(start, stop)}")
        if a < pos:
            raise PlanError(f"{label} overlaps {prev}")
        if a > pos:
            raise PlanError(f"{label} starts at stage {a}: {_stages(pos, a)} missing")
        if isinstance(it, Region):
            _check_region(it, label, checkpointable, joins_previous)
        if isinstance(it, Selective) and not checkpointable[it.stage]:
            raise PlanError(f"{label}: stage {it.stage} cannot be checkpointed, so it has no selective option")
        pos, prev = b, it.describe()
    if pos != stop:
        raise PlanError(f"{where}: items end at stage {pos - 1}; {_stages(pos, stop)} missing")


def _check_ints(it: Item, label: str) -> None:
    values = {"start": it.start, "stop": it.stop} if isinstance(it, Region) else {"stage": it.stage}
    for key, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int):
            raise PlanError(f"{label}: {key}={v!r} must be an int")
    if isinstance(it, Selective):
        if not isinstance(it.option, str) or not it.option:
            raise PlanError(f"{label}: option={it.option!r} must be a non-empty str")
        if not isinstance(it.save, tuple) or not all(isinstance(op, str) and op for op in it.save):
            raise PlanError(f"{label}: save={it.save!r} must be a tuple of op names such as 'aten.mm.default'")
    if isinstance(it, Region) and not isinstance(it.body, tuple):
        raise PlanError(f"{label}: body={it.body!r} must be a tuple of items")


def _check_region(it: Region, label: str, checkpointable: Sequence[bool],
                  joins_previous: Sequence[bool] | None) -> None:
    a, b = it.start, it.stop
    if b <= a:
        raise PlanError(f"{label} is empty: stop {b} <= start {a}")
    for k in range(a, b):
        if not checkpointable[k]:
            raise PlanError(f"{label} contains stage {k}, which cannot be checkpointed")
        if joins_previous is not None and k > a and not joins_previous[k]:
            raise PlanError(
                f"{label} spans stages {k - 1} and {k}, which receive different extra arguments and cannot"
                " share a region"
            )
    if not it.body:
        raise PlanError(f"{label} has an empty body")
    validate_items(it.body, a, b, checkpointable, joins_previous, where=f"{label}, body")


@dataclass(frozen=True)
class Prediction:
    """What the simulator predicts for a plan (see :func:`remat.simulate`).

    Attributes:
        peak_bytes: predicted peak of the step, fixed memory and input included.
        fwd_s, bwd_s, recompute_s: the step's time split into first forward, backward, recomputation.
        forwards: per stage, how many times its forward runs (1 = never recomputed).
        held_bytes: per stage, bytes it leaves live at the end of the first forward pass.
        fixed_bytes: the fixed part of ``peak_bytes``.
    """

    peak_bytes: int
    fwd_s: float
    bwd_s: float
    recompute_s: float
    forwards: tuple[int, ...]
    held_bytes: tuple[int, ...]
    fixed_bytes: int

    @property
    def time_s(self) -> float:
        return self.fwd_s + self.bwd_s + self.recompute_s

    @property
    def overhead(self) -> float:
        """Extra time over a step with no recomputation, as a fraction (0.25 = +25%)."""
        base = self.fwd_s + self.bwd_s
        return self.recompute_s / base if base > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "peak_bytes": self.peak_bytes,
            "fwd_s": self.fwd_s,
            "bwd_s": self.bwd_s,
            "recompute_s": self.recompute_s,
            "forwards": list(self.forwards),
            "held_bytes": list(self.held_bytes),
            "fixed_bytes": self.fixed_bytes,
        }


def legacy_kind(name: str) -> str:
    """The kind of a stage in a plan saved before plans recorded kinds: from the profiler's names."""
    return {"<prologue>": "prologue", "<head>": "head"}.get(name, "block")


@dataclass(frozen=True)
class Plan:
    """A schedule for one training step of a profiled model.

    Attributes:
        items: the top-level sequence of :class:`Record` and :class:`Region` items.
        strategy: the name of the strategy that made it.
        budget_bytes: the budget it was made for (None: no budget).
        prediction: the simulator's figures for it.
        stage_names: names of the profile's stages, for reports.
        fingerprint: the profile's fingerprint; :func:`remat.apply` checks it against the model.
        options: strategy options used (e.g. ``{"segments": 4}``).
        input_shapes: ``((shape, dtype), ...)`` of the profiled inputs; :func:`remat.apply` accepts
            calls whose inputs are these or smaller (empty: no shape check beyond the fingerprint).
        stage_kinds: per stage, its kind (``"prologue"``, ``"block"``, ``"glue"``, ``"head"``); only blocks
            are ever inside a region. Left empty, it is inferred from the names as for a plan saved
            before kinds were recorded: ``<prologue>`` and ``<head>`` by name, every other stage a block.
        autocast: the autocast the planned step runs under (``"cpu:bfloat16"``), empty for none;
            :func:`remat.apply` refuses a recording call under another.
        head_chunks: how the head runs: None, as the model has it (untouched); 0, whole (the model's
            own head); n, the output projection and the loss over n checkpointed chunks of tokens, which
            :func:`remat.apply` installs (Note [Chunked head] in :mod:`remat.runtime.head`: the model then
            returns its loss and ``logits=None``).

    Plans are made by :func:`remat.solve` (and :func:`remat.frontier`); :meth:`validate` checks one made
    or edited by hand.
    """

    items: tuple[Item, ...]
    strategy: str
    budget_bytes: int | None
    prediction: Prediction
    stage_names: tuple[str, ...]
    fingerprint: str = ""
    options: dict[str, Any] = field(default_factory=dict, compare=False)
    input_shapes: tuple[Any, ...] = ()
    stage_kinds: tuple[str, ...] = ()
    autocast: str = ""
    head_chunks: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shapes", frozen(self.input_shapes))
        if not self.stage_kinds and isinstance(self.stage_names, (tuple, list)):
            kinds = tuple(legacy_kind(n) if isinstance(n, str) else "block" for n in self.stage_names)
            object.__setattr__(self, "stage_kinds", kinds)

    @property
    def peak_bytes(self) -> int:
        return self.prediction.peak_bytes

    @property
    def time_s(self) -> float:
        return self.prediction.time_s

    def block_indices(self) -> tuple[int, ...]:
        """Indices of the stages that are blocks (what :func:`remat.apply` looks up in the model)."""
        return tuple(i for i, kind in enumerate(self.stage_kinds) if kind == "block")

    def regions(self) -> Iterator[Region]:
        """Every region of the plan, outer before inner."""
        stack = list(reversed(self.items))
        while stack:
            it = stack.pop()
            if isinstance(it, Region):
                yield it
                stack.extend(reversed(it.body))

    def actions(self) -> list[str]:
        """Per stage, what the plan does with it: ``keep``, ``checkpoint`` (region start, input stored),
        ``recompute`` (inside a region), or ``selective <option>``."""
        acts = ["keep"] * len(self.stage_names)
        for it in self.items:
            if isinstance(it, Selective):
                acts[it.stage] = f"selective {it.option}"
            if isinstance(it, Region):
                acts[it.start] = "checkpoint"
                for k in range(it.start + 1, it.stop):
                    acts[k] = "recompute"
        if self.head_chunks is not None and self.stage_kinds and self.stage_kinds[-1] == "head":
            acts[-1] = f"chunked x{self.head_chunks}" if self.head_chunks else "whole"
        return acts

    # ---- checking ------------------------------------------------------------------------------
    def validate(self) -> Plan:
        """Check the plan is well-formed; returns it.

        Every stage is covered once, in order; regions are non-empty, nest inside their region and hold
        only blocks; every field has its type; the prediction has one figure per stage (or none).

        Raises:
            PlanError: naming the offending item or field.
        """
        _check_fields(self)
        n = len(self.stage_names)
        blocks = [kind == "block" for kind in self.stage_kinds]
        validate_items(self.items, 0, n, blocks)
        return self

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        head = {} if self.head_chunks is None else {"head_chunks": self.head_chunks}
        return {
            "format": PLAN_FORMAT,
            "strategy": self.strategy,
            "budget_bytes": self.budget_bytes,
            "fingerprint": self.fingerprint,
            "options": self.options,
            "input_shapes": list(self.input_shapes),
            "stage_names": list(self.stage_names),
            "stage_kinds": list(self.stage_kinds),
            "autocast": self.autocast,
            "items": [it.to_dict() for it in self.items],
            "prediction": self.prediction.to_dict(),
            **head,
        }

    def to_json(self, **kwargs: Any) -> str:
        """JSON text of the plan; ``Plan.from_json`` reads it back."""
        return json.dumps(self.to_dict(), **({"indent": 1} | kwargs))

    @classmethod
    def from_dict(cls, d: Any) -> Plan:
        """The plan a :meth:`to_dict` made, checked (:meth:`validate`).

        Raises:
            PlanError: a key missing or unknown, a value of the wrong type, or a malformed schedule;
                the message names the key or the item.
        """
        try:
            return _plan_from_dict(d).validate()
        except PlanError as e:
            raise PlanError(f"Plan.from_json: {str(e).removeprefix('plan: ')}") from None

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """The plan :meth:`to_json` wrote, checked (:meth:`validate`).

        Raises:
            PlanError: invalid JSON, or as :meth:`from_dict`.
        """
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"Plan.from_json: invalid JSON ({e})") from e
        return cls.from_dict(d)

    # ---- report --------------------------------------------------------------------------------
    def summary(self) -> str:
        p = self.prediction
        budget = format_bytes(self.budget_bytes) if self.budget_bytes is not None else "none"
        head = "" if not self.head_chunks else f"; head in {self.head_chunks} chunks (logits not returned)"
        return (
            f"remat plan '{self.strategy}': predicted peak {format_bytes(p.peak_bytes)} (budget {budget}),"
            f" step {format_seconds(p.time_s)} = fwd {format_seconds(p.fwd_s)} + bwd {format_seconds(p.bwd_s)}"
            f" + recompute {format_seconds(p.recompute_s)} (+{100 * p.overhead:.1f}%){head}"
        )

    def __str__(self) -> str:
        p = self.prediction
        acts = self.actions()
        rows = [
            [i, name, acts[i], p.forwards[i] - 1, format_bytes(p.held_bytes[i])]
            for i, name in enumerate(self.stage_names)
        ]
        blocks = acts[:-1] if self.head_chunks is not None else acts  # the head's own action is not a block's
        rows.append(["", "total", f"{sum(a != 'keep' for a in blocks)} checkpointed",
                     sum(p.forwards) - len(p.forwards), format_bytes(sum(p.held_bytes))])
        table = render_table(["#", "stage", "action", "recomputed", "held after fwd"], rows)
        return (
            f"{self.summary()}\nfixed memory {format_bytes(p.fixed_bytes)}; regions: {sum(1 for _ in self.regions())}"
            f"\n{table}"
        )


def _check_fields(plan: Plan) -> None:
    """The plan's fields have their types (a plan built by hand or read from a file may not)."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise PlanError(f"plan: {what}")

    need(isinstance(plan.strategy, str), f"strategy={plan.strategy!r} must be a str")
    b = plan.budget_bytes
    need(b is None or (isinstance(b, int) and not isinstance(b, bool) and b >= 0),
         f"budget_bytes={b!r} must be None or a non-negative int")
    need(isinstance(plan.fingerprint, str), f"fingerprint={plan.fingerprint!r} must be a str")
    need(isinstance(plan.options, dict), f"options={plan.options!r} must be a dict")
    need(isinstance(plan.input_shapes, tuple), f"input_shapes={plan.input_shapes!r} must be a sequence")
    names, kinds = plan.stage_names, plan.stage_kinds
    need(isinstance(names, tuple) and len(names) > 0 and all(isinstance(s, str) for s in names),
         f"stage_names={names!r} must be a non-empty tuple of str")
    need(isinstance(kinds, tuple) and len(kinds) == len(names),
         f"stage_kinds has {len(kinds)} entries for {len(names)} stages")
    for i, kind in enumerate(kinds):
        need(kind in STAGE_KINDS, f"stage {i} ({names[i]}) has kind {kind!r}; expected one of {STAGE_KINDS}")
    need(isinstance(plan.items, tuple), f"items must be a tuple, not {type(plan.items).__name__}")
    c = plan.head_chunks
    need(c is None or (isinstance(c, int) and not isinstance(c, bool) and c >= 0),
         f"head_chunks={c!r} must be None (the model's head) or an int >= 0 (0: whole; n: n chunks)")
    need(c is None or kinds[-1] == "head", f"head_chunks={c!r} but the last stage ({names[-1]}) is not the head")
    p = plan.prediction
    need(isinstance(p, Prediction), f"prediction={p!r} must be a remat.Prediction")
    for key in ("forwards", "held_bytes"):
        count = len(getattr(p, key))
        need(count in (0, len(names)), f"prediction.{key} has {count} entries for {len(names)} stages")


# ---- reading plan files ----------------------------------------------------------------------------
# Every key is checked for presence and type here, so that a corrupted or hand-edited file gives a
# PlanError naming the key or the item, never a KeyError or a TypeError from deep inside a planner.

_PLAN_KEYS = ("format", "strategy", "budget_bytes", "stage_names", "items", "prediction")
_PLAN_OPTIONAL = ("fingerprint", "options", "input_shapes", "stage_kinds", "autocast", "head_chunks")
_PREDICTION_KEYS = ("peak_bytes", "fwd_s", "bwd_s", "recompute_s", "forwards", "held_bytes", "fixed_bytes")
_ITEM_KEYS = {"record": ("op", "stage"), "region": ("op", "start", "stop", "body"),
              "selective": ("op", "stage", "option", "save")}


def _keys(d: Any, required: Sequence[str], optional: Sequence[str], where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise PlanError(f"{where}: expected a JSON object, got {type(d).__name__} {d!r}")
    for key in required:
        if key not in d:
            raise PlanError(f"{where}: missing key {key!r}")
    for key in d:
        if key not in required and key not in optional:
            raise PlanError(f"{where}: unknown key {key!r}; expected {', '.join(map(repr, (*required, *optional)))}")
    return d


def _int(value: Any, what: str, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlanError(f"{what}={value!r} must be an int")
    if minimum is not None and value < minimum:
        raise PlanError(f"{what}={value!r} must be >= {minimum}")
    return value


def _seconds(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PlanError(f"{what}={value!r} must be a number of seconds")
    return float(value)


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise PlanError(f"{what}={value!r} must be a list")
    return value


def _item_from_dict(d: Any, where: str) -> Item:
    if not isinstance(d, dict):
        raise PlanError(f"{where}: expected an object like {{'op': 'record', 'stage': 3}}, got {d!r}")
    op = d.get("op")
    if op not in _ITEM_KEYS:
        raise PlanError(f"{where}: unknown operation {op!r}; expected 'record' or 'region' (or 'selective')")
    _keys(d, _ITEM_KEYS[op], (), where)
    if op == "record":
        return Record(_int(d["stage"], f"{where}: stage", minimum=0))
    if op == "selective":
        option = d["option"]
        if not isinstance(option, str):
            raise PlanError(f"{where}: option={option!r} must be a str")
        save = _strings(d["save"], f"{where}: save")
        return Selective(_int(d["stage"], f"{where}: stage", minimum=0), option, save)
    start = _int(d["start"], f"{where}: start", minimum=0)
    stop = _int(d["stop"], f"{where}: stop", minimum=0)
    label = f"{where} (region {start}..{stop - 1}), body"
    body = tuple(_item_from_dict(b, f"{label} item {k}") for k, b in enumerate(_list(d["body"], f"{where}: body")))
    return Region(start, stop, body)


def _prediction_from_dict(d: Any) -> Prediction:
    where = "prediction"
    _keys(d, _PREDICTION_KEYS, (), where)
    return Prediction(
        peak_bytes=_int(d["peak_bytes"], f"{where}.peak_bytes", minimum=0),
        fwd_s=_seconds(d["fwd_s"], f"{where}.fwd_s"),
        bwd_s=_seconds(d["bwd_s"], f"{where}.bwd_s"),
        recompute_s=_seconds(d["recompute_s"], f"{where}.recompute_s"),
        forwards=tuple(_int(v, f"{where}.forwards[{k}]", minimum=0)
                       for k, v in enumerate(_list(d["forwards"], f"{where}.forwards"))),
        held_bytes=tuple(_int(v, f"{where}.held_bytes[{k}]")
                         for k, v in enumerate(_list(d["held_bytes"], f"{where}.held_bytes"))),
        fixed_bytes=_int(d["fixed_bytes"], f"{where}.fixed_bytes", minimum=0),
    )


def _strings(value: Any, what: str) -> tuple[str, ...]:
    for k, v in enumerate(_list(value, what)):
        if not isinstance(v, str):
            raise PlanError(f"{what}[{k}]={v!r} must be a str")
    return tuple(value)


def _plan_from_dict(d: Any) -> Plan:
    if not isinstance(d, dict):
        raise PlanError(f"expected a JSON object, got {type(d).__name__} {d!r}")
    if d.get("format") != PLAN_FORMAT:
        raise PlanError(f"unknown format {d.get('format')!r}; expected {PLAN_FORMAT!r}")
    _keys(d, _PLAN_KEYS, _PLAN_OPTIONAL, "plan")
    budget = d["budget_bytes"]
    options = d.get("options", {})
    if not isinstance(options, dict):
        raise PlanError(f"options={options!r} must be an object")
    for key in ("strategy", "fingerprint", "autocast"):
        if not isinstance(d.get(key, ""), str):
            raise PlanError(f"{key}={d[key]!r} must be a string")
    return Plan(
        items=tuple(_item_from_dict(it, f"plan item {k}") for k, it in enumerate(_list(d["items"], "items"))),
        strategy=d["strategy"],
        budget_bytes=None if budget is None else _int(budget, "budget_bytes", minimum=0),
        prediction=_prediction_from_dict(d["prediction"]),
        stage_names=_strings(d["stage_names"], "stage_names"),
        fingerprint=d.get("fingerprint", ""),
        options=options,
        input_shapes=tuple(_list(d.get("input_shapes", []), "input_shapes")),
        stage_kinds=_strings(d.get("stage_kinds", []), "stage_kinds"),
        autocast=d.get("autocast", ""),
        head_chunks=None if d.get("head_chunks") is None else _int(d["head_chunks"], "head_chunks", minimum=0),
    )
