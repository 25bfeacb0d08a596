import os

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(autouse=True, scope="session")
def _one_thread_per_worker():
    """Two xdist workers on two cores: one intra-op thread each, or they fight for the cores."""
    try:
        import torch
    except ImportError:  # the planner tests run without torch
        yield
        return
    torch.set_num_threads(1)
    yield


try:  # CI runs a fixed set of examples; local runs explore new ones
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, deadline=None)
    if os.environ.get("CI"):
        settings.load_profile("ci")
except ImportError:  # pragma: no cover
    pass
