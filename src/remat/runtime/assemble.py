"""From logged runs to a :class:`Profile`: each stage's numbers in the cost model (docs/cost-model.md).

Sizes come from three tracked runs of the step (:class:`Runs`): recording with nothing checkpointed,
without recording, and with every block its own checkpoint region (for calibration). Times come from
:class:`Times`: medians over timed runs, or one run's estimates.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from remat.planning.profile import Profile, Stage
from remat.runtime.model import GLUE, HEAD, PROLOGUE
from remat.runtime.timeline import Key, Lingering, Run, Window

__all__ = ["MIN_TIME_S", "Runs", "Times", "assemble"]

MIN_TIME_S = 1e-7

#: With no timed backward (runs that record would not fit), a backward is taken as this many forwards:
#: a matmul's backward computes two products for its one (input and weight gradients).
BACKWARD_PER_FORWARD = 2.0


@dataclass
class Runs:
    """The tracked runs of one profile, over the blocks ``names``."""

    full: Run  # recording, nothing checkpointed
    nograd: Run  # not recording
    every: Run  # recording, every block its own checkpoint region
    names: list[str]
    inputs_bytes: int
    copies: list[int] = field(default_factory=list)  # per block: what its recomputation copies (norm statistics)


@dataclass
class Times:
    """Seconds per window, as medians over timed runs of each kind (recording with nothing checkpointed,
    not recording, every block its own region); a kind may be absent.

    Note: [Pooled timings] Blocks of one structure on inputs of one shape do the same work, so their
    samples are pooled: a block's time is the median over all of them and all repeats. On a shared
    machine one block's window can be stretched several times by another process; a median over many
    samples is not. An unrecorded forward is never free: a checkpoint region costs at least the block's
    unrecorded first pass.

    Without recorded runs (they would not fit in memory), a block's forward is its unrecorded first pass
    in the every-region run and its backward the rest of its backward window there; without those too,
    a backward is :data:`BACKWARD_PER_FORWARD` forwards.
    """

    recorded: list[dict[Key, float]]
    nograd: list[dict[Key, float]]
    every: list[dict[Key, float]]
    groups: dict[int, list[int]]  # block -> the blocks it pools with (itself included)
    bwd_keys: dict[int, Key]  # block (-1: prologue) -> its backward window in recording runs
    every_bwd_keys: dict[int, Key]  # the same in the every-region runs
    source: str = "measured"

    def _med(self, runs: list[dict[Key, float]], keys: Sequence[Key]) -> float:
        vals = [r[k] for r in runs for k in keys if k in r]
        return max(MIN_TIME_S, statistics.median(vals)) if vals else 0.0

    def _pooled(self, runs: list[dict[Key, float]], label: str, k: int) -> float:
        return self._med(runs, [(label, j) for j in self.groups.get(k, [k])])

    def _pooled_bwd(self, runs: list[dict[Key, float]], keys: dict[int, Key], k: int) -> float:
        if k not in keys:
            return 0.0
        if keys[k][0] != "bwd":
            return self._med(runs, [keys[k]])
        return self._med(runs, [keys[j] for j in self.groups.get(k, [k]) if j in keys and keys[j][0] == "bwd"])

    @property
    def _fwd_runs(self) -> list[dict[Key, float]]:
        """Runs in which the prologue, glue and head record: any but the unrecorded ones."""
        return self.recorded or self.every

    def window(self, key: Key) -> float:
        """A window of the prologue, the glue or the head, recording."""
        if self._fwd_runs:
            return self._med(self._fwd_runs, [key])
        if key[0] in ("bwd_head", "end"):  # the head: its forward and backward
            return (1 + BACKWARD_PER_FORWARD) * self.nograd_window(("end", -1))
        return self.nograd_window(key)

    def nograd_window(self, key: Key) -> float:
        return self._med(self.nograd, [key])

    def prologue_bwd(self) -> float:
        if self.recorded:
            return self._pooled_bwd(self.recorded, self.bwd_keys, -1)
        if self.every:
            return self._pooled_bwd(self.every, self.every_bwd_keys, -1)
        return BACKWARD_PER_FORWARD * self.nograd_window(("pre", 0))

    def fwd(self, k: int) -> float:
        if self.recorded:
            return self._pooled(self.recorded, "post", k)
        if self.every:
            return self._pooled(self.every, "post", k)
        return self.fwd_nograd(k)

    def fwd_nograd(self, k: int) -> float:
        return self._pooled(self.nograd, "post", k)

    def bwd(self, k: int) -> float:
        if self.recorded:
            return self._pooled_bwd(self.recorded, self.bwd_keys, k)
        if self.every:
            return max(MIN_TIME_S, self._pooled_bwd(self.every, self.every_bwd_keys, k) - self.fwd(k))
        return BACKWARD_PER_FORWARD * self.fwd(k)

    def region(self, k: int) -> float:
        """What a checkpoint region adds for block k: its unrecorded first pass plus its recomputation
        beyond a recorded forward, measured in the every-region run; never less than the first pass."""
        first = self.fwd_nograd(k)
        if not self.every:
            return max(MIN_TIME_S, first)
        measured = (self._pooled(self.every, "post", k) + self._pooled_bwd(self.every, self.every_bwd_keys, k)
                    - self.fwd(k) - self.bwd(k))
        return max(MIN_TIME_S, first, measured)


def assemble(runs: Runs, times: Times, *, params_bytes: int, grads_bytes: int, fingerprint: str,
             device: str, repeats: int, input_shapes: list[list[Any]], meta: dict[str, Any]) -> Profile:
    """The profile of the step that ``runs`` logged."""
    last_freed = runs.full.tl.last_input_freed()
    stages = [_prologue(runs, times)]
    stages += [_block(runs, times, k, last_freed) for k in range(len(runs.names))]
    stages, held = _without_held_output(runs, stages)
    stages, kept = _kept_by_the_model(runs, stages)
    held += kept
    head, residual = _head(runs, times, last_freed)
    stages = _after_head(runs, stages)
    stages = _calibrated(runs, times, stages, base=residual + held)
    stages = _with_glue([*stages, head], runs, times)
    return Profile(
        stages=tuple(stages),
        fixed_bytes=runs.full.start.live - runs.inputs_bytes,
        params_bytes=params_bytes,
        grads_bytes=grads_bytes,
        device=device,
        repeats=repeats,
        fingerprint=fingerprint,
        head_residual_bytes=residual + held,
        input_shapes=tuple(input_shapes),
        safety_fraction=0.002,
        meta={
            **meta,
            "measured_peak_bytes": runs.full.peak,
            "measured_every_peak_bytes": runs.every.peak,  # Note [Safety margin] (remat.planning.simulate)
            "carry_shapes": [list(s) if s else None for s in runs.full.tl.shapes],
            "flops": sum(e.flops for e in runs.full.tl.events),
            "times": times.source,
        },
    )


def _prologue(runs: Runs, times: Times) -> Stage:
    """What runs from the start of the step to the first block."""
    full, w = runs.full, runs.full.prologue
    back = full.backward.get(-1)
    xbar, ft, ofn = _lingering(runs, w, runs.nograd.prologue, w.end.live - full.start.live)
    return Stage(
        name=PROLOGUE,
        x_bytes=runs.inputs_bytes,
        xbar_bytes=xbar,
        fwd_s=times.window(w.key),
        bwd_s=times.prologue_bwd() if back is not None else 0.0,
        fwd_nograd_s=times.nograd_window(w.key),
        fwd_transient_bytes=ft,
        fwd_nograd_transient_bytes=ofn,
        bwd_transient_bytes=_bwd_transient(runs, -1),
        output_released_bytes=(full.tl.x_bytes[0] or 0) if full.tl.output_released(-1) else 0,
        kind="prologue",
        checkpointable=False,
        joins_previous=False,
        fwd_flops=w.end.flops,
    )


def _bwd_transient(runs: Runs, k: int) -> int:
    """The peak of stage k's backward above its input's gradient (may be negative: the gradient for
    the input can reuse the incoming gradient's memory)."""
    w = runs.full.backward.get(k)
    if w is None:
        return 0
    x_in = (runs.full.tl.x_bytes[k] or 0) if k >= 0 else runs.inputs_bytes
    return max(-x_in, w.end.peak - w.start.live - x_in)


def _block(runs: Runs, times: Times, k: int, last_freed: int) -> Stage:
    tl, w = runs.full.tl, runs.full.block[k]
    n = len(runs.names)
    # Bytes released between this block's end and the next block's start: its input, if unsaved.
    glue = runs.full.glue.get(k)
    glue_rise = glue.rise + runs.full.lingering(glue).freed if glue is not None else 0
    freed = min(max(0, -glue_rise), tl.x_bytes[k] or 0) if glue is not None else last_freed
    out_bytes = (tl.x_bytes[k + 1] or 0) if k + 1 < n else tl.head_x_bytes
    xbar, ft, ofn = _lingering(runs, w, runs.nograd.block[k], w.rise)
    return Stage(
        name=runs.names[k],
        x_bytes=tl.x_bytes[k] or 0,
        xbar_bytes=xbar,
        fwd_s=times.fwd(k),
        bwd_s=times.bwd(k) if k in runs.full.backward else 0.0,
        fwd_nograd_s=times.fwd_nograd(k),
        fwd_transient_bytes=ft,
        fwd_nograd_transient_bytes=ofn,
        bwd_transient_bytes=_bwd_transient(runs, k),
        kind="block",
        checkpointable=True,
        joins_previous=tl.joins[k] and not _lives_on(runs, k),
        fwd_flops=w.end.flops,
        input_freed_bytes=freed,
        output_released_bytes=out_bytes if tl.output_released(k) else 0,
        recompute_copy_bytes=runs.copies[k] if k < len(runs.copies) else 0,
    )


def _lives_on(runs: Runs, k: int) -> bool:
    """Note: [Tensors that live on] An unrecorded pass over a region frees each block's input once the block
    has run (the sweep of docs/cost-model.md). Where block k's input lives on past the block after it, with
    nothing recording (a U-Net's skip connection, which its up path reads; an encoder's output), a region
    holding blocks k-1 and k would keep it where the model counts it freed: block k then starts a region.
    Measured in the unrecorded run: the input's storage is still alive when block k + 2 starts. (An input
    that lives through the next block only, the input of a container that its caller holds until the
    container returns, is left to the calibration and the margin, as before: forbidding those regions put a
    stack of nested Sequentials' least at 67% of its plain peak, from under 45%.)"""
    tl = runs.nograd.tl
    return 0 < k < len(runs.names) - 2 and not tl.in_freed_after_next[k]


def _lingering(runs: Runs, w: Window, nograd: Window | None, rise: int) -> tuple[int, int, int]:
    """A forward window's record, transient and unrecorded transient, with its lingering bytes (Note [Lingering
    bytes] in timeline.py) out of its record and in its transients, from ``rise``: the live bytes it gained."""
    lin = runs.full.lingering(w)
    ng = runs.nograd.lingering(nograd) if nograd is not None else Lingering()
    xbar = max(0, rise + lin.freed - lin.own)
    # Above the record: the window's own transient (measured above its end, after what it freed), what it
    # leaves to later windows, and what earlier windows left to it and a later one frees.
    transient = w.transient + lin.own + lin.live - lin.freed
    nograd_transient = ((nograd.transient if nograd is not None else 0) + ng.own
                        + max(lin.live - lin.freed, ng.live - ng.freed))
    return xbar, transient, nograd_transient


def _without_held_output(runs: Runs, stages: list[Stage]) -> tuple[list[Stage], int]:
    """A model output that the training loop holds (a Sequential's last activation) lives to the end of
    the step: it belongs to the head's residual, not to the last block's record (released at its
    backward)."""
    tl = runs.full.tl
    last = stages[-1]
    if not (tl.output_held and runs.names and last.xbar_bytes >= tl.head_x_bytes):
        return stages, 0
    held = tl.head_x_bytes
    return [*stages[:-1], dataclasses.replace(last, xbar_bytes=last.xbar_bytes - held, output_released_bytes=0)], held


def _kept_by_the_model(runs: Runs, stages: list[Stage]) -> tuple[list[Stage], int]:
    """Note: [Outputs the model keeps] A block may return more than its hidden state, and the model's code
    may keep it: T5's block 0 returns the position bias every later block reads, x-transformers' attention
    returns its attention maps in a dataclass, which the decoder keeps in a list for the whole forward. A
    checkpoint frees nothing the model still holds. In the run with every block its own region, block k's
    first pass should leave only its output live; what it leaves beyond that is kept by the model whatever
    the plan, and taken out of the block's record. What is gone by the end of the step is the block's side
    tensors (``side_bytes``), held from its forward to its backward (Note [Side tensors] in the cost model);
    what the step's output still holds at its end (a T5's encoder output, returned beside the loss) is live
    through the whole step: the head's residual, with the held output. Their gradients are left in the
    measured windows (the backward windows and the calibration's hold see them live), not charged again as
    ``side_grad_bytes``: charged on top, BLOOM's profile predicted 23% above its measured step."""
    tl, every, n = runs.full.tl, runs.every.tl, len(runs.names)
    out, kept = list(stages), 0
    for k in range(n):
        out_k = (tl.x_bytes[k + 1] or 0) if k + 1 < n else tl.head_x_bytes
        extra = min(max(0, runs.every.block[k].rise - out_k), out[k + 1].xbar_bytes)
        if extra <= 0:
            continue
        at_end = min(extra, every.sides_at_end[k])
        out[k + 1] = dataclasses.replace(out[k + 1], xbar_bytes=out[k + 1].xbar_bytes - extra,
                                         side_bytes=extra - at_end)
        kept += at_end
    return out, kept


def _head(runs: Runs, times: Times, last_freed: int) -> tuple[Stage, int]:
    """From the last block's output through the loss, and back to the last block's output gradient; and
    the bytes the head leaves live to the end of the step (its residual)."""
    tl, w = runs.full.tl, runs.full.head
    # The head's window opens at the last block's post-hook, before the last block's unsaved input is
    # released: measure from the live bytes without it. At its end the gradient for the last block's
    # output is live, and the output itself unless the head's forward already released it.
    start = w.start.live - last_freed
    end = tl.head_grad_bytes - (tl.head_x_bytes if tl.output_gone_at_head_grad else 0)
    residual = max(0, w.end.live - start - end) if runs.full.head_has_grad else 0
    fwd_ng = times.nograd_window(("end", -1))
    total = times.window(w.key)  # the head's forward and backward, back to back
    fwd = min(fwd_ng, total) if fwd_ng else total / 3
    head = Stage(
        name=HEAD,
        x_bytes=tl.head_x_bytes,
        xbar_bytes=0,
        fwd_s=fwd,
        bwd_s=max(MIN_TIME_S, total - fwd),
        fwd_nograd_s=fwd_ng,
        bwd_transient_bytes=max(-tl.head_x_bytes, w.end.peak - start - tl.head_x_bytes - residual),
        kind="head",
        checkpointable=False,
        joins_previous=False,
        fwd_flops=w.end.flops,
    )
    return head, residual


def _after_head(runs: Runs, stages: list[Stage]) -> list[Stage]:
    """A gradient smaller than the last block's output (a sum's expanded scalar) starts the last block's
    backward window lower than the chain model's whole gradient, so the window's rise above it is
    smaller. (A head whose forward released the output is measured as it ran: its backward window's
    peak already lacks it.)"""
    tl, last = runs.full.tl, stages[-1]
    if not runs.names or not runs.full.head_has_grad:
        return stages
    short = max(0, tl.head_x_bytes - tl.head_grad_bytes)
    last = dataclasses.replace(
        last,
        bwd_transient_bytes=max(-last.x_bytes, last.bwd_transient_bytes - short),
    )
    return [*stages[:-1], last]


def _calibrated(runs: Runs, times: Times, stages: list[Stage], *, base: int) -> list[Stage]:
    """Note: [Calibrating recomputation] In a run with every block its own checkpoint region, the
    backward window of block k holds its recomputation and its backward. What was live at its start
    beyond the chain model's figure (recompute_hold_bytes: e.g. the region's first-pass output, still
    referenced) and what the window rose above the model's figure for it (recompute_bwd_extra_bytes)
    are kept per block, and charged whenever the block ends, or runs inside, a recomputed region. The
    window also holds the copies the recomputation makes (recompute_copy_bytes, Note [Copies in
    recomputation] in simulate.py); the rise is measured over the figure without them, so where they
    set the window's peak it keeps them too. A region, which charges them beside its body, and a
    Selective item, which charges them in its rebuild, may count them twice (safe side)."""
    tl, n = runs.full.tl, len(runs.names)
    out = list(stages)
    for k, w in runs.every.backward.items():
        if k < 0:
            continue
        st = out[k + 1]
        # The chain model's live bytes when region k's recomputation starts, in the calibration run:
        # base (with what the head leaves), the prologue's record, the outputs of regions 0..k-1 (the
        # inputs of 1..k), and the gradient y_{k+1}.
        out_k = (tl.x_bytes[k + 1] or 0) if k + 1 < n else tl.head_x_bytes
        expected = (runs.every.start.live + base + out[0].xbar_bytes
                    + sum(tl.x_bytes[m] or 0 for m in range(1, k + 1)) + out_k)
        model_rise = max(st.xbar_bytes + st.fwd_transient_bytes,
                         st.x_bytes + st.xbar_bytes - st.output_released_bytes + st.bwd_transient_bytes)
        out[k + 1] = dataclasses.replace(
            st,
            recompute_hold_bytes=max(0, w.start.live - expected),
            recompute_bwd_extra_bytes=max(0, w.end.peak - w.start.live - model_rise),
            fwd_region_s=times.region(k),
        )
    return out


def _with_glue(stages: list[Stage], runs: Runs, times: Times) -> list[Stage]:
    """Note: [Glue] Code the model runs between two blocks (an activation in place, a residual add in
    the parent's forward, a random draw for LayerDrop, a flatten) is a stage of its own, kind "glue": its
    bytes are counted, and since it is not a module it is never checkpointed, so the blocks around it
    never share a region (a recomputation runs the blocks of a region back to back). Its backward runs
    between the two blocks' backward and is counted in the earlier block's backward window."""
    out = [stages[0]]
    for k, block in enumerate(stages[1:-1]):
        w = runs.full.glue.get(k)
        if w is None or w.end.ops == 0:
            out.append(block)
            continue
        glue = _glue(runs, times, k)
        # The glue's record is still live when the window holding both backwards starts: the chain model
        # frees it at the glue's own backward, so the block's backward peak carries it.
        freed_in, _ = runs.full.tl.freed_by_glue(k)
        out.append(dataclasses.replace(block, input_freed_bytes=freed_in, output_released_bytes=0,
                                       bwd_transient_bytes=block.bwd_transient_bytes + glue.xbar_bytes))
        out.append(glue)
    out.append(stages[-1])
    for i in range(1, len(out)):  # a block after glue never shares a region with the block before
        if out[i - 1].kind == "glue" and out[i].joins_previous:
            out[i] = dataclasses.replace(out[i], joins_previous=False)
    return out


def _glue(runs: Runs, times: Times, k: int) -> Stage:
    """The code between block k and block k + 1, as a stage that is never checkpointed."""
    tl, w = runs.full.tl, runs.full.glue[k]
    freed_in, freed_out = tl.freed_by_glue(k)
    ng = runs.nograd.glue.get(k)
    xbar, ft, ofn = _lingering(runs, w, ng, w.rise + freed_in + freed_out)
    return Stage(
        name=f"{GLUE}{runs.names[k]}",
        x_bytes=tl.out_bytes[k],
        xbar_bytes=xbar,
        fwd_s=times.window(w.key),
        bwd_s=0.0,
        fwd_nograd_s=times.nograd_window(w.key),
        fwd_transient_bytes=ft,
        fwd_nograd_transient_bytes=ofn,
        kind="glue",
        checkpointable=False,
        joins_previous=False,
        fwd_flops=w.end.flops,
        input_freed_bytes=min(freed_out, tl.out_bytes[k]),
    )
