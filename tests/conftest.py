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
