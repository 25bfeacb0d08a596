"""The memory-time frontier as a PNG (matplotlib is imported only here, only when plotting)."""

from __future__ import annotations

from collections.abc import Sequence

from remat.errors import RematError
from remat.planning.plan import Plan
from remat.planning.profile import Profile
from remat.planning.solve import frontier, solve

__all__ = ["plot_frontier"]

_MARKERS = {"none": ("o", "tab:gray"), "every": ("s", "tab:red"), "sqrt": ("^", "tab:orange"),
            "revolve": ("D", "tab:purple"), "optimal": ("*", "tab:green")}


def plot_frontier(profile: Profile, path: str, *, highlight: Plan | None = None, budget: int | None = None,
                  strategies: Sequence[str] = ("none", "every", "sqrt", "revolve"),
                  title: str | None = None, measured: Sequence[tuple[str, int, float]] = ()) -> str:
    """Write a PNG of the predicted memory-time frontier of ``profile`` to ``path``; returns ``path``.

    The optimal frontier is a step line; each strategy in ``strategies`` is a marker; ``highlight``
    (the chosen plan) is a large star; ``budget`` a vertical line; ``measured`` adds points
    ``(label, peak_bytes, time ratio)`` measured on the real model.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RematError("remat.plot_frontier: plotting needs matplotlib: pip install 'remat[plot]'") from e

    base = solve(profile, None, strategy="none").time_s
    points = frontier(profile)
    top = max(p.peak_bytes for p in points)
    unit, scale = ("GiB", 2**30) if top >= 2**30 else ("MiB", 2**20)

    def xy(plan: Plan) -> tuple[float, float]:
        return plan.peak_bytes / scale, plan.time_s / base

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    xs, ys = zip(*(xy(p) for p in points))
    ax.step(xs, ys, where="post", color="tab:green", lw=1.8, label="optimal frontier (remat)")
    ax.scatter(xs, ys, color="tab:green", s=10, zorder=3)
    for name in strategies:
        plan = solve(profile, None, strategy=name)
        x, y = xy(plan)
        marker, color = _MARKERS.get(name, ("x", "black"))
        ax.scatter([x], [y], marker=marker, color=color, s=60, zorder=4, label=f"{name}")
    for k, (label, peak, ratio) in enumerate(measured):
        ax.scatter([peak / scale], [ratio], marker="x", color="black", s=40, zorder=5,
                   label="measured on the model" if k == 0 else None)
        ax.annotate(label, (peak / scale, ratio), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if highlight is not None:
        x, y = xy(highlight)
        ax.scatter([x], [y], marker="*", color="gold", edgecolor="black", s=260, zorder=6,
                   label=f"chosen plan ({highlight.strategy})")
        budget = budget if budget is not None else highlight.budget_bytes
    if budget is not None:
        ax.axvline(budget / scale, color="tab:blue", ls="--", lw=1, label=f"budget {budget / scale:.2f} {unit}")
    ax.set_xlabel(f"predicted peak memory of one training step ({unit})")
    ax.set_ylabel("predicted step time / no checkpointing")
    model = profile.meta.get("model", "chain")
    ax.set_title(title or f"remat: memory-time frontier, {model} ({len(profile.stages)} stages)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
