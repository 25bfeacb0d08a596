"""The chain that planners optimise: stages with sizes and times (see docs/cost-model.md).

No torch here: a :class:`Profile` is plain numbers, built by :func:`remat.profile` from a model or
directly from lists of numbers, so that planners can be used and tested on any chain.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from remat.errors import PlanError, ProfileError
from remat.planning.table import render_table
from remat.units import format_bytes, format_seconds

__all__ = ["STAGE_KINDS", "BlockOption", "HeadOption", "Profile", "Stage", "frozen"]

#: What a stage is: what runs before the first block, a block, code the model runs between two blocks
#: (measured as a stage of its own, never checkpointed), or what runs after the last block (loss included).
#: Only blocks can be inside a checkpoint region.
STAGE_KINDS = ("prologue", "block", "glue", "head")


def frozen(value: Any) -> Any:
    """``value`` with every list turned into a tuple, recursively (JSON gives lists; data keeps tuples)."""
    if isinstance(value, (list, tuple)):
        return tuple(frozen(v) for v in value)
    return value


#: The JSON format of a profile. Format 1 (remat 0.1) lacked recompute_copy_bytes and bwd_extra_bytes and
#: could list options that save a block's output: measured profiles in it are refused.
PROFILE_FORMAT = "remat.Profile/2"


@dataclass(frozen=True)
class BlockOption:
    """One way to run a block inside its own checkpoint with a selective policy (PyTorch's selective
    activation checkpointing): the outputs of the ops in ``save`` are kept from the first pass, every
    other op of the block is recomputed before its backward.

    Attributes:
        name: a short label, unique among the block's options (``"sac"``, ``"matmul"``, ``"cut2"``).
        save: the ops whose outputs are kept, as ``"aten.addmm.default"`` (every call of the op in the
            block's forward) or ``"aten.addmm.default#2"`` (its third call only).
        kept_bytes: bytes the block holds from its first pass until its backward, its output included
            (the option's ``xbar_bytes``; the block's input is held by the checkpoint).
        recompute_s: what the option adds to the step: the recomputation of the ops it does not save,
            and the policy's own overhead.
        fwd_transient_bytes: peak above ``kept_bytes`` while the block's first pass runs.
        bwd_extra_bytes: how far the block's backward (its recomputation under the policy, then its
            backward) peaks above a plain record's backward, both measured alone: a recomputation that
            returns cached outputs can hold more at once than the first pass did.
    """

    name: str
    save: tuple[str, ...]
    kept_bytes: int
    recompute_s: float
    fwd_transient_bytes: int = 0
    bwd_extra_bytes: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "save", tuple(self.save))
        if not isinstance(self.name, str) or not self.name:
            raise ProfileError(f"BlockOption: name={self.name!r} must be a non-empty str")
        if not all(isinstance(op, str) and op for op in self.save):
            raise ProfileError(f"BlockOption {self.name!r}: save={self.save!r} must hold op names such as"
                               " 'aten.mm.default' or 'aten.mm.default#2'")
        for f in ("kept_bytes", "fwd_transient_bytes", "bwd_extra_bytes"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ProfileError(f"BlockOption {self.name!r}: {f}={v!r} must be a non-negative int of bytes")
        r = self.recompute_s
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not r >= 0:
            raise ProfileError(f"BlockOption {self.name!r}: recompute_s={r!r} must be a non-negative number of"
                               " seconds")


@dataclass(frozen=True)
class Stage:
    """One stage ``F_i`` of the chain. Bytes are ints, times are seconds.

    Attributes:
        name: where the stage lives in the model (``"transformer.h.3"``) or a label.
        x_bytes: bytes of the stage's input ``x_i`` (the gradient flowing back has the same size).
        xbar_bytes: bytes the stage keeps when it runs recording: its output plus every tensor it saves
            for backward, each storage once, parameters and its input excluded.
        fwd_s: forward time with autograd recording.
        bwd_s: backward time.
        fwd_nograd_s: forward time without recording (what a checkpointed first pass costs at best).
        fwd_transient_bytes: peak above ``xbar_bytes`` while the recording forward runs.
        fwd_nograd_transient_bytes: peak above the output while an unrecorded forward runs.
        bwd_transient_bytes: peak during backward above the stage's record, the incoming and the
            outgoing gradient. Negative (down to ``-x_bytes``) when the outgoing gradient reuses the
            incoming one's memory, as across a residual connection.
        kind: ``"prologue"`` (what runs before the blocks), ``"block"``, ``"glue"`` (code the model runs
            between two blocks, measured as a stage of its own), or ``"head"`` (what runs after the
            blocks, loss included). See :data:`STAGE_KINDS`.
        checkpointable: whether the stage can be inside a checkpoint region (blocks only).
        joins_previous: whether the stage can share a region with the stage before it (it receives the
            same extra arguments, e.g. the same attention mask).
        fwd_flops: floating-point operations of the forward (0 if not counted).
        input_freed_bytes: bytes of the input released once the stage has run recording, when nothing
            else holds the input (the stage does not save it: e.g. an RMSNorm that saves an fp32 copy of
            a bf16 input). A checkpoint region or the caller holding the input keeps it alive.
        output_released_bytes: bytes of the stage's output that are gone by the time its backward runs:
            the stage does not save its own output, and whoever did (the next stage) has run its
            backward already.
        recompute_bwd_extra_bytes: what the stage's backward needs beyond the above when it runs
            inside a recomputed region (measured with every block its own region).
        recompute_hold_bytes: bytes beyond the chain model that stay live while a region ending with
            this stage is recomputed (measured likewise).
        recompute_copy_bytes: bytes a recomputation copies for the stage before it runs and holds
            until every block of the region has run again: the running statistics of its BatchNorm
            layers, restored afterwards so that they move once per step. A region holds its stages'
            copies together while it is recomputed.
        fwd_region_s: what putting the stage in a checkpoint region adds to the step: its unrecorded
            first pass plus its recomputation beyond a recorded forward (measured with every block its
            own region); None: ``fwd_s``, one more forward.
        options: ways to run the block in its own checkpoint with a selective policy (blocks only; see
            :class:`BlockOption`); empty when not profiled.
        side_bytes: bytes of the tensors the stage outputs besides its output ``x_{i+1}`` that later
            stages read (a U-Net's skip connection, an encoder output every decoder block reads, T5's
            position bias): live from the stage's forward until its backward whatever the plan does,
            never part of ``xbar_bytes`` (docs/cost-model.md, long-lived tensors).
        side_grad_bytes: bytes of their gradients (0 when they do not require grad), charged likewise.
    """

    name: str
    x_bytes: int
    xbar_bytes: int
    fwd_s: float
    bwd_s: float
    fwd_nograd_s: float | None = None
    fwd_transient_bytes: int = 0
    fwd_nograd_transient_bytes: int = 0
    bwd_transient_bytes: int = 0
    kind: str = "block"
    checkpointable: bool = True
    joins_previous: bool = True
    fwd_flops: float = 0.0
    input_freed_bytes: int = 0
    output_released_bytes: int = 0
    recompute_bwd_extra_bytes: int = 0
    recompute_hold_bytes: int = 0
    recompute_copy_bytes: int = 0
    fwd_region_s: float | None = None
    options: tuple[BlockOption, ...] = ()
    side_bytes: int = 0
    side_grad_bytes: int = 0

    @property
    def side(self) -> int:
        """Bytes of the stage's long-lived side tensors and their gradients, held from its forward to its
        backward."""
        return self.side_bytes + self.side_grad_bytes

    @property
    def region_s(self) -> float:
        """Seconds a checkpoint region adds per pass over this stage."""
        return self.fwd_s if self.fwd_region_s is None else self.fwd_region_s

    def option(self, name: str) -> BlockOption:
        """The option called ``name``.

        Raises:
            PlanError: the stage has no such option (the message lists those it has).
        """
        for o in self.options:
            if o.name == name:
                return o
        have = ", ".join(repr(o.name) for o in self.options) or "none (profile it with remat.add_options)"
        raise PlanError(f"stage {self.name!r} has no option {name!r}; its options: {have}")

    def __post_init__(self) -> None:
        self._check_options()
        for f in (
            "x_bytes",
            "xbar_bytes",
            "fwd_transient_bytes",
            "fwd_nograd_transient_bytes",
            "input_freed_bytes",
            "output_released_bytes",
            "recompute_bwd_extra_bytes",
            "recompute_hold_bytes",
            "recompute_copy_bytes",
            "side_bytes",
            "side_grad_bytes",
        ):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ProfileError(f"Stage {self.name!r}: {f}={v!r} must be a non-negative int of bytes")
        for f in ("fwd_s", "bwd_s"):
            v = getattr(self, f)
            if not isinstance(v, (int, float)) or v < 0 or v != v:
                raise ProfileError(f"Stage {self.name!r}: {f}={v!r} must be a non-negative number of seconds")
        b = self.bwd_transient_bytes
        if isinstance(b, bool) or not isinstance(b, int) or b < -self.x_bytes:
            raise ProfileError(f"Stage {self.name!r}: bwd_transient_bytes={b!r} must be an int >= -x_bytes")
        if self.input_freed_bytes > self.x_bytes:
            raise ProfileError(
                f"Stage {self.name!r}: input_freed_bytes={self.input_freed_bytes} exceeds x_bytes={self.x_bytes}"
            )
        if self.kind not in STAGE_KINDS:
            raise ProfileError(f"Stage {self.name!r}: kind={self.kind!r} must be one of {STAGE_KINDS}")
        if self.checkpointable and self.kind != "block":
            raise ProfileError(
                f"Stage {self.name!r}: a {self.kind} stage cannot be checkpointed (only blocks can);"
                " pass checkpointable=False"
            )

    def _check_options(self) -> None:
        """Options read from JSON arrive as dicts: made into :class:`BlockOption` here, then checked."""
        options = tuple(BlockOption(**o) if isinstance(o, dict) else o for o in self.options)
        object.__setattr__(self, "options", options)
        names = [o.name for o in options if isinstance(o, BlockOption)]
        if len(names) != len(options):
            raise ProfileError(f"Stage {self.name!r}: options={self.options!r} must be BlockOptions")
        if len(set(names)) != len(names):
            raise ProfileError(f"Stage {self.name!r}: option names {names} repeat; give each a unique name")
        if options and not self.checkpointable:
            raise ProfileError(f"Stage {self.name!r}: only a checkpointable block can have options")


@dataclass(frozen=True)
class HeadOption:
    """Another way to run the head: the output projection and the loss over ``chunks`` chunks of tokens,
    each chunk checkpointed, so that its logits are recomputed in backward and no more than one chunk's
    logits are live (Note [Chunked head] in :mod:`remat.runtime.head`).

    Attributes:
        chunks: how many chunks of tokens (1 or more).
        head: the head stage's figures, measured with the head run that way (kind ``"head"``).
        residual_bytes: the profile's ``head_residual_bytes`` with the head run that way (the output a
            loop holds through backward no longer holds the logits).
    """

    chunks: int
    head: Stage
    residual_bytes: int

    def __post_init__(self) -> None:
        if isinstance(self.head, dict):  # read from JSON
            object.__setattr__(self, "head", Stage(**self.head))
        c = self.chunks
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ProfileError(f"HeadOption: chunks={c!r} must be an int of 1 or more")
        if not isinstance(self.head, Stage) or self.head.kind != "head":
            raise ProfileError(f"HeadOption (chunks {c}): head={self.head!r} must be a Stage of kind 'head'")
        r = self.residual_bytes
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ProfileError(f"HeadOption (chunks {c}): residual_bytes={r!r} must be a non-negative int of bytes")


@dataclass(frozen=True)
class Profile:
    """A model as a chain of stages ``F_0 … F_L``; the last stage is the head (loss included).

    Attributes:
        stages: the chain, in execution order.
        fixed_bytes: memory live through the whole step that no schedule changes: parameters,
            gradients, buffers, optimizer state if counted. The input ``x_0`` is not in it.
        params_bytes, grads_bytes: parts of ``fixed_bytes``, for reports.
        device: where it was profiled (``"cpu"``, ``"cuda"``, ``"meta"``, or ``"synthetic"``).
        repeats: how many timed runs stand behind each time (medians); 0 for estimated times.
        fingerprint: the model structure and input shapes it came from (``""`` when built by hand).
        head_residual_bytes: bytes the head's backward leaves live until the end of the step (the
            model's output when the training loop holds it; the gradient of an output projection tied to
            the input embedding, which autograd holds until the embedding's contribution arrives).
            Planned as if live through the whole step (exact in backward, a small over-count in the
            first forward pass).
        input_shapes: ``((shape, dtype), ...)`` of the profiled inputs, in call order (empty when built by
            hand); plans carry them so that a planned model can refuse larger inputs.
        after_backward_bytes: bytes the step allocates after backward, above ``base_bytes`` (the optimizer's
            step: its temporaries, while parameters, gradients, state and the held output are live); the
            step's peak is at least ``base_bytes`` plus this, whatever the plan (Note [The optimizer's
            step] in :mod:`remat.runtime.measure`).
        safety_fraction: predicted activation peaks are raised by this share before they are checked
            against a budget. Profiles of real models set 0.002: the profile is exact for every plan
            shape it calibrates, but deep nesting can keep a few small tensors (normalisation
            statistics, a small layer's output) alive a little longer (measured: 224 bytes on a 640 KB
            peak). Profiles built by hand keep 0. The plan with every block its own region, which the
            profiler ran on the device, is charged its measured peak instead while the stages are the
            ones measured (``meta["measured_every_act_bytes"]``; Note [Safety margin] in
            :mod:`remat.planning.simulate`).
        head_chunks: how the head runs: None, as the model has it (remat does not change it); 0, whole,
            as the model has it, with ``head_options`` to choose from; n, in n checkpointed chunks of
            tokens (:class:`HeadOption`; ``remat.profile(..., head="chunked")``).
        head_options: other ways to run the head, one per chunk count; :func:`remat.solve` plans each
            with the blocks and keeps the fastest plan that fits (:meth:`head_variants`).
        meta: free-form facts for reports (model name, dtype, measured peak, ...).
    """

    stages: tuple[Stage, ...]
    fixed_bytes: int = 0
    params_bytes: int = 0
    grads_bytes: int = 0
    device: str = "synthetic"
    repeats: int = 0
    fingerprint: str = ""
    head_residual_bytes: int = 0
    safety_fraction: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    input_shapes: tuple[Any, ...] = ()
    after_backward_bytes: int = 0
    head_chunks: int | None = None
    head_options: tuple[HeadOption, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.stages, tuple):
            object.__setattr__(self, "stages", tuple(self.stages))
        self._check_head_options()
        # Profiles made before input_shapes was a field kept them in meta: read them from there.
        shapes = self.input_shapes or self.meta.get("input_shapes", ())
        object.__setattr__(self, "input_shapes", frozen(shapes))
        if len(self.stages) == 0:
            raise ProfileError("Profile: the chain is empty; a profile needs at least one stage (the head)")
        if isinstance(self.fixed_bytes, bool) or not isinstance(self.fixed_bytes, int) or self.fixed_bytes < 0:
            raise ProfileError(f"Profile: fixed_bytes={self.fixed_bytes!r} must be a non-negative int")

    def _check_head_options(self) -> None:
        """Head options read from JSON arrive as dicts: made into :class:`HeadOption` here, then checked."""
        options = tuple(HeadOption(**o) if isinstance(o, dict) else o for o in self.head_options)
        object.__setattr__(self, "head_options", options)
        c = self.head_chunks
        if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 0):
            raise ProfileError(f"Profile: head_chunks={c!r} must be None or an int >= 0")
        if not options:
            return
        if c is None or not all(isinstance(o, HeadOption) for o in options):
            raise ProfileError("Profile: head_options must be HeadOptions, on a profile whose head_chunks says how"
                               " its own head runs (0: whole)")
        counts = [o.chunks for o in options]
        if len(set(counts)) != len(counts) or c in counts:
            raise ProfileError(f"Profile: head_options repeat a chunk count ({counts}; the profile's own: {c})")

    def with_head(self, chunks: int) -> Profile:
        """The profile with its head run in ``chunks`` chunks (its own head, or one of ``head_options``),
        without options. The time the chunked head adds over the whole one is kept in
        ``meta["head_recompute_s"]`` (a plan reports it as recomputation).

        Raises:
            ProfileError: no such option (the message lists the chunk counts there are).
        """
        if chunks == self.head_chunks:
            return dataclasses.replace(self, head_options=())
        option = next((o for o in self.head_options if o.chunks == chunks), None)
        if option is None:
            have = ", ".join(str(o.chunks) for o in self.head_options) or "none"
            raise ProfileError(f"Profile: no head option with {chunks} chunks; the profile's own head runs in"
                               f" {self.head_chunks} (0: whole), its options in: {have}")
        own = self.stages[-1]
        extra = option.head.fwd_s + option.head.bwd_s - own.fwd_s - own.bwd_s
        # The every-block plan's measured peak was measured with the profile's own head: not this one's.
        meta = {k: v for k, v in self.meta.items() if k not in ("measured_every_act_bytes", "measured_every_digest")}
        meta["head_recompute_s"] = max(0.0, extra) + float(self.meta.get("head_recompute_s", 0.0))
        return dataclasses.replace(self, stages=(*self.stages[:-1], option.head), head_chunks=chunks,
                                   head_residual_bytes=option.residual_bytes, head_options=(), meta=meta)

    def head_variants(self) -> list[Profile]:
        """One profile per way to run the head, the profile's own first (without ``head_options``)."""
        return [self.with_head(c) for c in (self.head_chunks, *(o.chunks for o in self.head_options))
                if c is not None] or [self]

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_lists(
        cls,
        x_bytes: Sequence[int],
        xbar_bytes: Sequence[int],
        fwd_s: Sequence[float],
        bwd_s: Sequence[float],
        *,
        fwd_transient_bytes: Sequence[int] | None = None,
        fwd_nograd_transient_bytes: Sequence[int] | None = None,
        bwd_transient_bytes: Sequence[int] | None = None,
        fixed_bytes: int = 0,
        names: Sequence[str] | None = None,
        checkpointable: Sequence[bool] | None = None,
        kinds: Sequence[str] | None = None,
        side_bytes: Sequence[int] | None = None,
        side_grad_bytes: Sequence[int] | None = None,
    ) -> Profile:
        """Build a chain from lists of numbers, one entry per stage; the last stage is the head.

        ``kinds`` gives each stage's kind (default: blocks, then the head); only blocks are checkpointable.
        ``side_bytes`` and ``side_grad_bytes``: each stage's long-lived side tensors and their gradients
        (default none).

        >>> p = Profile.from_lists([100, 100, 100], [200, 200, 0], [1.0, 1.0, 0.5], [2.0, 2.0, 1.0])
        >>> len(p), p.stages[-1].kind
        (3, 'head')
        """
        n = len(x_bytes)
        lists = {"xbar_bytes": xbar_bytes, "fwd_s": fwd_s, "bwd_s": bwd_s, "side_bytes": side_bytes or [0] * n,
                 "side_grad_bytes": side_grad_bytes or [0] * n}
        for label, seq in lists.items():
            if len(seq) != n:
                raise ProfileError(f"Profile.from_lists: {label} has {len(seq)} entries, x_bytes has {n}")
        zeros = [0] * n
        of = list(fwd_transient_bytes or zeros)
        ofn = list(fwd_nograd_transient_bytes or zeros)
        ob = list(bwd_transient_bytes or zeros)
        names = list(names) if names is not None else [f"stage{i}" for i in range(n)]
        ck = list(checkpointable) if checkpointable is not None else [True] * n
        kind = list(kinds) if kinds is not None else ["block"] * (n - 1) + ["head"]
        if len(kind) != n:
            raise ProfileError(f"Profile.from_lists: kinds has {len(kind)} entries, x_bytes has {n}")
        stages = tuple(
            Stage(
                name=names[i],
                x_bytes=int(x_bytes[i]),
                xbar_bytes=int(xbar_bytes[i]),
                fwd_s=float(fwd_s[i]),
                bwd_s=float(bwd_s[i]),
                fwd_transient_bytes=int(of[i]),
                fwd_nograd_transient_bytes=int(ofn[i]),
                bwd_transient_bytes=int(ob[i]),
                kind=kind[i],
                checkpointable=ck[i] and i != n - 1 and kind[i] == "block",
                side_bytes=int(lists["side_bytes"][i]),
                side_grad_bytes=int(lists["side_grad_bytes"][i]),
            )
            for i in range(n)
        )
        return cls(stages=stages, fixed_bytes=int(fixed_bytes))

    def with_extra_fixed(self, extra_bytes: int, label: str) -> Profile:
        """The same chain with ``extra_bytes`` more fixed memory (e.g. optimizer state), noted in meta."""
        if extra_bytes < 0:
            raise ProfileError(f"Profile.with_extra_fixed: extra_bytes={extra_bytes} must be >= 0")
        extra = dict(self.meta.get("extra_fixed", {}))
        extra[label] = extra.get(label, 0) + extra_bytes
        meta = {**self.meta, "extra_fixed": extra}
        return dataclasses.replace(self, fixed_bytes=self.fixed_bytes + extra_bytes, meta=meta)

    # ---- derived numbers ----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.stages)

    @property
    def input_bytes(self) -> int:
        """``x_0``: bytes of the chain's input, counted toward the budget."""
        return self.stages[0].x_bytes

    def output_bytes(self, i: int) -> int:
        """``x_{i+1}``: bytes of stage i's output (0 after the head)."""
        return self.stages[i + 1].x_bytes if i + 1 < len(self.stages) else 0

    @property
    def base_bytes(self) -> int:
        """Memory no schedule changes: fixed memory, the input ``x_0`` and the head's residual."""
        return self.fixed_bytes + self.input_bytes + self.head_residual_bytes

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(s.kind for s in self.stages)

    def block_indices(self) -> tuple[int, ...]:
        """Indices of the stages that are blocks (not the prologue, glue or the head).

        >>> Profile.from_lists([1, 1, 1], [1, 1, 0], [1.0] * 3, [1.0] * 3, kinds=["prologue", "block", "head"]
        ...                    ).block_indices()
        (1,)
        """
        return tuple(i for i, s in enumerate(self.stages) if s.kind == "block")

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["format"] = PROFILE_FORMAT
        return d

    def to_json(self, **kwargs: Any) -> str:
        """JSON text of the profile (no pickle); ``Profile.from_json`` reads it back."""
        return json.dumps(self.to_dict(), **({"indent": 1} | kwargs))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Profile:
        d = dict(d)
        fmt = d.pop("format", PROFILE_FORMAT)
        if fmt == "remat.Profile/1" and d.get("device", "synthetic") != "synthetic":
            raise ProfileError(
                f"Profile.from_json: a measured profile in format {fmt!r}, saved by an older remat whose block"
                " options and BatchNorm accounting could predict less than the measured peak; profile the"
                " model again (remat.profile, or `remat profile MODEL -o FILE`)")
        if fmt not in (PROFILE_FORMAT, "remat.Profile/1"):
            raise ProfileError(f"Profile.from_json: unknown format {fmt!r}; expected {PROFILE_FORMAT!r}")
        try:
            stages = tuple(Stage(**s) for s in d.pop("stages"))
            return cls(stages=stages, **d)
        except (TypeError, KeyError) as e:
            raise ProfileError(f"Profile.from_json: not a remat profile ({e})") from e

    @classmethod
    def from_json(cls, text: str) -> Profile:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ProfileError(f"Profile.from_json: invalid JSON ({e})") from e
        return cls.from_dict(data)

    def fixed_summary(self) -> str:
        """``'25.1 GiB (parameters 12.6 GiB, gradients 12.6 GiB, ...)'``: what the fixed memory holds."""
        extra = dict(self.meta.get("extra_fixed", {}))
        other = self.fixed_bytes - self.params_bytes - self.grads_bytes - sum(extra.values())
        parts = [f"parameters {format_bytes(self.params_bytes)}", f"gradients {format_bytes(self.grads_bytes)}"]
        parts += [f"{k} {format_bytes(v)}" for k, v in extra.items()]
        parts.append(f"buffers and other {format_bytes(other)}")
        return f"{format_bytes(self.fixed_bytes)} ({', '.join(parts)})"

    # ---- report --------------------------------------------------------------------------------
    def __str__(self) -> str:
        rows = []
        for i, s in enumerate(self.stages):
            rows.append(
                [
                    i,
                    s.name,
                    s.kind if s.checkpointable or s.kind != "block" else "block*",
                    format_bytes(s.x_bytes),
                    format_bytes(s.xbar_bytes),
                    format_seconds(s.fwd_s),
                    format_seconds(s.bwd_s),
                    format_bytes(s.fwd_transient_bytes),
                    format_bytes(s.bwd_transient_bytes),
                ]
            )
        head = (
            f"remat.Profile: {len(self.stages)} stages on {self.device}"
            f" ({self.repeats} timed repeats per figure)" if self.repeats else
            f"remat.Profile: {len(self.stages)} stages on {self.device} (times estimated)"
        )
        fixed = f"fixed memory {self.fixed_summary()}; input x0 {format_bytes(self.input_bytes)}"
        table = render_table(
            ["#", "stage", "kind", "x", "xbar", "fwd", "bwd", "fwd peak+", "bwd peak+"], rows
        )
        return f"{head}\n{fixed}\n{table}{self._head_options_summary()}"

    def _head_options_summary(self) -> str:
        """The head's options, one line (empty without): chunks, backward peak, residual, time."""
        if not self.head_options:
            return ""
        own = self.stages[-1]
        parts = [f"{c} chunks: bwd peak+ {format_bytes(h.bwd_transient_bytes)}, residual {format_bytes(r)},"
                 f" {format_seconds(h.fwd_s + h.bwd_s)}"
                 for c, h, r in [(self.head_chunks, own, self.head_residual_bytes),
                                 *((o.chunks, o.head, o.residual_bytes) for o in self.head_options)]]
        return "\nhead options (0 chunks: whole): " + "; ".join(parts)
