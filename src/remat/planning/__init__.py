"""The planning layer: chains, plans, the simulator and the strategies. Standard library and numpy only.

Nothing here imports torch (a test imports every module of this package with torch made unimportable),
so plans can be made, simulated and tested on any chain of numbers: :class:`Profile` in, :class:`Plan` out.

* :mod:`.profile` — the chain (:class:`Stage`, :class:`Profile`); :mod:`.plan` — the schedule
  (:class:`Record`, :class:`Region`, :class:`Plan`, checked by :meth:`Plan.validate`);
* :mod:`.simulate` — the peak and the time of a plan under the cost model (docs/cost-model.md);
* :mod:`.budget` — what a user writes as a budget, in bytes (docs/budgets.md);
* :mod:`.strategies` — the registry and the built-in strategies, with typed options;
* :mod:`.solve` — :func:`solve`, :func:`min_feasible_plan`, :func:`frontier`, and :func:`make_plan`, the one
  place plans are built;
* :mod:`.optimal` (the least-time DP), :mod:`.min_peak` (the least peak, exact), :mod:`.revolve`
  (binomial checkpointing) — the algorithms.
"""
