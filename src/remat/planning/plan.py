"""A plan: the nested schedule of one training step, as plain data. No torch here.

A plan is a sequence of items over the chain's stages ``0 … L``, in order:

* :class:`Record` ``(i)`` — run stage ``i`` recording autograd: its record (output and saved tensors)
  is kept until its backward;
* :class:`Region` ``(start, stop, body)`` — a checkpoint region over stages ``start … stop-1``: the
  first pass runs them without keeping anything but the region's input ``x_start`` and its output;
  during backward the region is recomputed from ``x_start`` following ``body``, itself a sequence of
  items over the same stages (so regions nest: multi-level recomputation).

More actions (offloading a record to host memory, another way to run a stage) become more item types;
the simulator and the executor dispatch on the type.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from remat.errors import PlanError
from remat.planning.table import render_table
from remat.units import format_bytes, format_seconds

__all__ = ["Item", "Plan", "Prediction", "Record", "Region", "validate_items"]


@dataclass(frozen=True)
class Record:
    """Run stage ``stage`` recording; keep its record until its backward."""

    stage: int

    def to_dict(self) -> dict[str, Any]:
        return {"op": "record", "stage": self.stage}


@dataclass(frozen=True)
class Region:
    """Checkpoint stages ``start … stop-1``; recompute them during backward following ``body``."""

    start: int
    stop: int
    body: tuple[Item, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"op": "region", "start": self.start, "stop": self.stop, "body": [b.to_dict() for b in self.body]}


Item = Union[Record, Region]  # noqa: UP007 - a runtime alias, used before 3.10's X | Y in isinstance


def item_from_dict(d: dict[str, Any]) -> Item:
    op = d.get("op")
    if op == "record":
        return Record(int(d["stage"]))
    if op == "region":
        return Region(int(d["start"]), int(d["stop"]), tuple(item_from_dict(b) for b in d["body"]))
    raise PlanError(f"Plan.from_json: unknown operation {op!r}; expected 'record' or 'region'")


def _span(items: Sequence[Item]) -> Iterator[tuple[int, int]]:
    for it in items:
        yield (it.stage, it.stage + 1) if isinstance(it, Record) else (it.start, it.stop)


def validate_items(items: Sequence[Item], start: int, stop: int, checkpointable: Sequence[bool],
                   joins_previous: Sequence[bool] | None = None) -> None:
    """Check that ``items`` cover stages ``start … stop-1`` in order, regions only where allowed.

    Raises:
        PlanError: naming the first offending item.
    """
    pos = start
    if not items:
        raise PlanError(f"plan: no items for stages {start}..{stop - 1}")
    for it, (a, b) in zip(items, _span(items)):
        if a != pos:
            raise PlanError(f"plan: item {it!r} starts at stage {a}, expected stage {pos}")
        if isinstance(it, Region):
            if not b > a:
                raise PlanError(f"plan: region {a}..{b - 1} is empty")
            for k in range(a, b):
                if not checkpointable[k]:
                    raise PlanError(f"plan: region {a}..{b - 1} contains stage {k}, which cannot be checkpointed")
                if joins_previous is not None and k > a and not joins_previous[k]:
                    raise PlanError(
                        f"plan: region {a}..{b - 1} spans stages {k - 1} and {k}, which receive different extra"
                        " arguments and cannot share a region"
                    )
            validate_items(it.body, a, b, checkpointable, joins_previous)
        pos = b
    if pos != stop:
        raise PlanError(f"plan: items end at stage {pos - 1}, expected them to cover up to stage {stop - 1}")


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
        input_shapes: ``[[shape, dtype], ...]`` of the profiled inputs; :func:`remat.apply` accepts
            calls whose inputs are these or smaller (empty: no shape check beyond the fingerprint).
    """

    items: tuple[Item, ...]
    strategy: str
    budget_bytes: int | None
    prediction: Prediction
    stage_names: tuple[str, ...]
    fingerprint: str = ""
    options: dict[str, Any] = field(default_factory=dict, compare=False)
    input_shapes: tuple[Any, ...] = ()

    @property
    def peak_bytes(self) -> int:
        return self.prediction.peak_bytes

    @property
    def time_s(self) -> float:
        return self.prediction.time_s

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
        or ``recompute`` (inside a region)."""
        acts = ["keep"] * len(self.stage_names)
        for it in self.items:
            if isinstance(it, Region):
                acts[it.start] = "checkpoint"
                for k in range(it.start + 1, it.stop):
                    acts[k] = "recompute"
        return acts

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        p = self.prediction
        return {
            "format": "remat.Plan/1",
            "strategy": self.strategy,
            "budget_bytes": self.budget_bytes,
            "fingerprint": self.fingerprint,
            "options": self.options,
            "input_shapes": list(self.input_shapes),
            "stage_names": list(self.stage_names),
            "items": [it.to_dict() for it in self.items],
            "prediction": {
                "peak_bytes": p.peak_bytes,
                "fwd_s": p.fwd_s,
                "bwd_s": p.bwd_s,
                "recompute_s": p.recompute_s,
                "forwards": list(p.forwards),
                "held_bytes": list(p.held_bytes),
                "fixed_bytes": p.fixed_bytes,
            },
        }

    def to_json(self, **kwargs: Any) -> str:
        """JSON text of the plan; ``Plan.from_json`` reads it back."""
        return json.dumps(self.to_dict(), **({"indent": 1} | kwargs))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"Plan.from_json: invalid JSON ({e})") from e
        if d.get("format") != "remat.Plan/1":
            raise PlanError(f"Plan.from_json: unknown format {d.get('format')!r}; expected 'remat.Plan/1'")
        p = d["prediction"]
        return cls(
            items=tuple(item_from_dict(it) for it in d["items"]),
            strategy=d["strategy"],
            budget_bytes=d["budget_bytes"],
            prediction=Prediction(
                peak_bytes=p["peak_bytes"],
                fwd_s=p["fwd_s"],
                bwd_s=p["bwd_s"],
                recompute_s=p["recompute_s"],
                forwards=tuple(p["forwards"]),
                held_bytes=tuple(p["held_bytes"]),
                fixed_bytes=p["fixed_bytes"],
            ),
            stage_names=tuple(d["stage_names"]),
            fingerprint=d.get("fingerprint", ""),
            options=d.get("options", {}),
            input_shapes=tuple(d.get("input_shapes", ())),
        )

    # ---- report --------------------------------------------------------------------------------
    def summary(self) -> str:
        p = self.prediction
        budget = format_bytes(self.budget_bytes) if self.budget_bytes is not None else "none"
        return (
            f"remat plan '{self.strategy}': predicted peak {format_bytes(p.peak_bytes)} (budget {budget}),"
            f" step {format_seconds(p.time_s)} = fwd {format_seconds(p.fwd_s)} + bwd {format_seconds(p.bwd_s)}"
            f" + recompute {format_seconds(p.recompute_s)} (+{100 * p.overhead:.1f}%)"
        )

    def __str__(self) -> str:
        p = self.prediction
        acts = self.actions()
        rows = [
            [i, name, acts[i], p.forwards[i] - 1, format_bytes(p.held_bytes[i])]
            for i, name in enumerate(self.stage_names)
        ]
        rows.append(["", "total", f"{sum(a != 'keep' for a in acts)} checkpointed",
                     sum(p.forwards) - len(p.forwards), format_bytes(sum(p.held_bytes))])
        table = render_table(["#", "stage", "action", "recomputed", "held after fwd"], rows)
        return (
            f"{self.summary()}\nfixed memory {format_bytes(p.fixed_bytes)}; regions: {sum(1 for _ in self.regions())}"
            f"\n{table}"
        )
