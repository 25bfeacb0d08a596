"""The optimal persistent schedule of a heterogeneous chain, by dynamic programming. No torch here.

After Beaumont, Eyraud-Dubois, Herrmann, Joly, Shilova (2019), "Optimal checkpointing for
heterogeneous chains" — the recurrence is restated in docs/cost-model.md with the memory terms used by
:mod:`remat.simulate`, so that the DP value equals the simulated time of the plan it returns.

Memory is discretised into slots of ``delta = floor(M / slots)`` bytes, where ``M`` is the budget less
:attr:`Profile.base_bytes` (fixed memory, the input, the head's residual); every size is rounded *up* to
whole slots, so a plan the DP calls feasible never exceeds the real budget. One refinement of the
simulator is taken on the safe side: a stage's backward is charged ``max(0, recompute_bwd_extra -
output_released)`` whether it runs in the first pass or inside a recomputation, so the DP may call a plan
infeasible that the simulator, which decides, lets through (the ``optimal`` strategy also simulates the
baselines and the smallest-peak plan). Time is O(L^3 * slots), vectorised over the slot axis and the
split point.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from remat.planning.plan import Item, Record, Region
from remat.planning.profile import Profile

INF = float("inf")
RECORD = -1  # decision code: record stage i; 0 = infeasible; j > 0 = checkpoint region i..j-1


@dataclass
class Table:
    """The solved DP: cost ``C[f, i, l, m]`` and decision ``D[f, i, l, m]`` for every range and slot
    count, ``f = 0`` when the range's input is pinned (held by the caller), ``f = 1`` when loose."""

    cost: npt.NDArray[np.float32]
    decision: npt.NDArray[np.int32]
    delta: int
    slots: int
    x: npt.NDArray[np.int64]
    keep: npt.NDArray[np.int64]  # keep[f, i]: slots a record of stage i holds for the rest of the range
    width: int = 0  # the table's last slot index (>= slots when records can free more than they keep)
    # hold[l]: slots live while a region ending at l recomputes
    hold: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def feasible_slots(self) -> npt.NDArray[np.int64]:
        """Slot counts at which the whole chain is feasible."""
        n = self.cost.shape[1]
        return np.nonzero(np.isfinite(self.cost[0, 0, n - 1, : self.slots + 1]))[0]

    def items(self, m: int) -> tuple[Item, ...]:
        """The plan for the whole chain within ``m`` slots."""
        n = self.cost.shape[1]
        return self._items(0, 0, n - 1, m)

    def _items(self, f: int, i: int, l: int, m: int) -> tuple[Item, ...]:
        out: list[Item] = []
        while True:
            d = int(self.decision[f, i, l, m])
            if d == 0:
                raise AssertionError(f"no feasible decision for stages {i}..{l} in {m} slots")
            if d == RECORD:
                out.append(Record(i))
                if i == l:
                    return tuple(out)
                m = min(self.width, m - int(self.keep[f, i]))
                i += 1
            else:
                out.append(Region(i, d, self._items(0, i, d - 1, m - int(self.hold[d - 1]))))
                m -= int(self.x[d])
                i = d
            f = 1


def _slots(values: list[int], delta: int, up: bool = True) -> npt.NDArray[np.int64]:
    if up:
        return np.array([-(-v // delta) for v in values], dtype=np.int64)
    return np.array([v // delta for v in values], dtype=np.int64)


def solve_table(profile: Profile, activation_bytes: int, slots: int = 500) -> Table:
    """Solve the DP for a chain whose activations (all but :attr:`Profile.base_bytes`) get
    ``activation_bytes``."""
    if activation_bytes < 0:
        raise ValueError("activation_bytes must be >= 0")
    st = profile.stages
    n = len(st)
    delta = max(1, activation_bytes // max(1, slots))
    S = activation_bytes // delta
    x = _slots([s.x_bytes for s in st] + [0], delta)  # x[n] = 0: nothing after the head
    kb = _slots([s.xbar_bytes for s in st], delta)
    freed = _slots([s.input_freed_bytes for s in st], delta, up=False)  # rounded down: conservative
    keep = np.stack([kb, kb - freed])  # keep[f, i]
    # The simulator charges -released in the first pass and -released + extra inside recomputation;
    # the DP, which does not track which one it is in, charges the larger: max(0, extra - released).
    released = _slots([s.output_released_bytes for s in st], delta, up=False)
    extra = _slots([s.recompute_bwd_extra_bytes for s in st], delta)
    margin = np.maximum(0, extra - released)
    hold = _slots([s.recompute_hold_bytes for s in st], delta)  # live while a region ending here recomputes
    of = _slots([s.fwd_transient_bytes for s in st], delta)
    ofn = _slots([s.fwd_nograd_transient_bytes for s in st], delta)
    ob = _slots([s.bwd_transient_bytes for s in st], delta)
    uf = np.array([s.fwd_s for s in st], dtype=np.float32)
    ub = np.array([s.bwd_s for s in st], dtype=np.float32)
    cum_uf = np.concatenate([[0.0], np.cumsum([s.region_s for s in st])])  # what regions add, per stage

    # jmax[i]: regions starting at i may end before any j <= jmax[i].
    jmax = np.arange(n)
    for i in range(n):
        j = i
        while j < n and st[j].checkpointable and (j == i or st[j].joins_previous):
            j += 1
        jmax[i] = j
    # sweep[i, j]: peak above held x_i of an unrecorded pass over i..j-1 (in slots).
    sweep = np.zeros((n, n + 1), dtype=np.int64)
    for i in range(n):
        best = 0
        for k in range(i, n):
            best = max(best, (x[k] if k > i else 0) + x[k + 1] + ofn[k])
            sweep[i, k + 1] = best

    # A record may hold fewer bytes than the input it frees (negative keep): the rest of the range then
    # has more room than the range itself, so the table extends past the budget by the total of such
    # gains (capped at S). The answer is still read at slot count S.
    top = S
    S = S + min(S, int(np.maximum(0, -keep[1]).sum()))
    ms = np.arange(S + 1)
    # below[t] is INF on slots m < t and 0 from t on: adding below[thr] masks infeasible slot counts.
    below = np.where(ms[None, :] < np.arange(S + 2)[:, None], INF, 0.0).astype(np.float32)
    cost = np.full((2, n, n, S + 1), INF, dtype=np.float32)
    shifted = np.full((n, n, S + 1), INF, dtype=np.float32)  # shifted[l, j, m] = cost[1, j, l, m - x[j]]
    body = np.full((n, n, S + 1), INF, dtype=np.float32)  # body[i, l, m] = cost[0, i, l, m - hold[l]]
    decision = np.zeros((2, n, n, S + 1), dtype=np.int32)
    for l in range(n):
        for i in range(l, -1, -1):
            # Checkpoint regions i..j-1 (the same whether x_i is pinned or loose: the region holds it).
            region = np.full(S + 1, INF, dtype=np.float32)
            region_dec = np.zeros(S + 1, dtype=np.int32)
            jhi = min(l, int(jmax[i]))
            if jhi >= i + 1:
                js = np.arange(i + 1, jhi + 1)
                block = shifted[l, i + 1 : jhi + 1] + body[i, i:jhi]
                block += (cum_uf[js] - cum_uf[i])[:, None]
                thr = np.minimum(S + 1, np.maximum(x[l + 1] + sweep[i, js], x[js]))
                block += below[thr]
                arg = np.argmin(block, axis=0)
                region = np.take_along_axis(block, arg[None, :], axis=0)[0]
                region_dec = np.where(np.isfinite(region), js[arg], 0).astype(np.int32)
            for f in (0, 1):
                k = int(keep[f, i])
                rec_req = max(x[l + 1] + kb[i] + of[i], x[i] + x[i + 1] + k + ob[i] + margin[i], k, 0)
                rec = np.full(S + 1, INF, dtype=np.float32)
                if rec_req <= S:
                    if i == l:
                        rec[rec_req:] = uf[i] + ub[i]
                    else:  # rec[m] = cost of the rest at min(S, m - k) slots
                        lo = rec_req - k
                        if lo <= S:
                            rec[rec_req : S + 1 - max(0, -k)] = cost[1, i + 1, l, lo : S + 1 - max(0, k)]
                        rec[max(rec_req, S + 1 + min(0, k)) :] = cost[1, i + 1, l, S]
                        rec[rec_req:] += uf[i] + ub[i]
                better = region < rec
                cost[f, i, l] = np.where(better, region, rec)
                decision[f, i, l] = np.where(better, region_dec, np.where(np.isfinite(rec), RECORD, 0))
            xi = int(x[i])
            if xi <= S:
                shifted[l, i, xi:] = cost[1, i, l, : S + 1 - xi]
            h = int(hold[l])
            if h <= S:
                body[i, l, h:] = cost[0, i, l, : S + 1 - h]
    return Table(cost=cost, decision=decision, delta=delta, slots=top, x=x, keep=keep, width=S, hold=hold)
