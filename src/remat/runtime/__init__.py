"""The runtime layer: everything that touches torch.

The model's path reads top-down: :mod:`model` (introspection: call conventions, fingerprints, stages)
→ :mod:`measure` (exact bytes of a step) → :mod:`profiler` (a model as a chain: a
:class:`remat.planning.profile.Profile`) → planning → :mod:`executor` (run a plan) — and :mod:`auto`
chains them.
"""
