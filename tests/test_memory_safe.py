"""remat.auto never needs the memory it saves: sizes from a fake copy, times from runs that fit, the
optimizer's state in the budget, and a check of the planned step (Note [Memory-safe profiling])."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import remat
from remat import RematError, VerificationError, simulate, solve
from remat.runtime.auto import _verify
from remat.runtime.step import Step

from .models import mlp

LIMITED = textwrap.dedent(
    """
    import resource, sys
    import torch
    from torch import nn
    import remat

    torch.manual_seed(0)
    W, B, N = 64, 262144, 8  # every activation 64 MiB; 1.3 GiB without checkpointing
    model = nn.Sequential(*[nn.Sequential(nn.Linear(W, W), nn.GELU()) for _ in range(N)])
    x = torch.randn(B, W)
    loss_fn = lambda out: out.pow(2).mean()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    page = resource.getpagesize()
    size = int(open("/proc/self/statm").read().split()[0]) * page
    resource.setrlimit(resource.RLIMIT_AS, (size + 1000 * 2**20, resource.getrlimit(resource.RLIMIT_AS)[1]))
    try:
        loss_fn(model(x)).backward()
    except RuntimeError as e:
        print("plain step failed:", str(e).splitlines()[0])
    else:
        print("plain step ran")
    model.zero_grad(set_to_none=True)
    remat.auto(model, x, budget="600MB", loss_fn=loss_fn, optimizer=opt)
    print("planned", remat.plan_of(model).prediction.peak_bytes)

    def step():
        opt.zero_grad(set_to_none=False)
        loss_fn(model(x)).backward()
        opt.step()

    m = remat.measure(step, model=model, inputs=x, optimizer=opt, warmup=1, repeats=1)  # 3 steps
    print("trained", m.peak_bytes, m.breakdown["optimizer"], 600 * 10**6)
    """
)


def test_auto_fits_where_the_plain_step_does_not():
    out = subprocess.run([sys.executable, "-c", LIMITED], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("plain step failed") and "memory" in lines[0], out.stdout
    peak, optimizer, budget = map(int, lines[-1].split()[1:])
    assert optimizer > 0 and peak <= budget, out.stdout


def test_fake_sizes_equal_measured_sizes_and_only_fitting_runs_are_made():
    model, x = mlp(6, 64)
    measured = remat.profile(model, x, sizes="measured", repeats=1)
    fake = remat.profile(model, x, sizes="fake", repeats=1)
    assert measured.meta["sizes"] == "measured" and fake.meta["sizes"] == "fake"
    assert [dataclasses.astuple(s)[1:3] for s in fake.stages] == [dataclasses.astuple(s)[1:3] for s in measured.stages]
    none = simulate(measured, solve(measured, None, strategy="none")).peak_bytes
    assert simulate(fake, solve(fake, None, strategy="none")).peak_bytes == none
    # A limit below the step without checkpointing: sizes fake; below every run too: times estimated.
    peak = measured.meta["measured_peak_bytes"]
    assert remat.profile(model, x, limit_bytes=peak - 1, repeats=1).meta["sizes"] == "fake"
    assert remat.profile(model, x, limit_bytes=peak, repeats=1).meta["sizes"] == "measured"
    tiny = remat.profile(model, x, limit_bytes=1, repeats=1)
    assert tiny.meta["times"] == "estimated" and all(s.fwd_s > 0 for s in tiny.stages)
    assert remat.profile(model, x, repeats=1).meta["sizes"] == "measured"  # it fits: measured


def test_repeats_zero_is_refused_unless_times_are_estimated():
    model, x = mlp(3, 16)
    with pytest.raises(RematError, match=r"repeats=0.*throughput"):
        remat.profile(model, x, repeats=0)
    prof = remat.profile(model, x, repeats=0, throughput="cpu")
    assert prof.meta["estimated_times"] and all(s.fwd_s > 0 for s in prof.stages[1:-1])


def test_identical_blocks_share_pooled_times_and_a_region_is_never_free():
    model, x = mlp(6, 64)
    prof = remat.profile(model, x, sizes="measured", repeats=2)
    blocks = [prof.stages[k] for k in prof.block_indices()]
    inner = blocks[1:-1]  # the first block's input needs no gradient; the last one feeds the head
    assert len({s.fwd_s for s in inner}) == 1 and len({s.bwd_s for s in inner}) == 1
    assert all(s.region_s >= s.fwd_nograd_s > 0 for s in blocks)


def test_auto_counts_optimizer_state_in_the_budget():
    model, x = mlp(6, 256)  # parameters dominate: AdamW state is most of the budget
    opt = torch.optim.AdamW(model.parameters())
    plain = remat.profile(model, x, repeats=1)
    state = remat.optimizer_state_bytes(model, opt)
    none = simulate(plain, solve(plain, None, strategy="none")).peak_bytes
    with pytest.raises(remat.InfeasibleBudgetError):
        remat.auto(model, x, budget=none + state // 2, optimizer=opt, repeats=1)
    remat.auto(model, x, budget=none + state, optimizer=opt, repeats=1)
    assert remat.plan_of(model).prediction.peak_bytes <= none + state

    def step():
        opt.zero_grad(set_to_none=False)
        model(x).sum().backward()
        opt.step()

    m = remat.measure(step, model=model, inputs=x, optimizer=opt, warmup=1, repeats=1)
    assert m.breakdown["optimizer"] == state and m.peak_bytes <= none + state


def test_verify_catches_a_step_over_its_budget_and_removes_the_plan():
    model, x = mlp(6, 64)
    remat.auto(model, x, budget="80%", repeats=1)  # verify=True by default, and it passes
    plan = remat.plan_of(model)
    with pytest.raises(VerificationError, match="over the budget"):
        _verify(Step.of(model, x), dataclasses.replace(plan, budget_bytes=1000), None, grads=False)
    assert not remat.runtime.executor.is_applied(model)


class Drifting(nn.Module):
    """A model whose result depends on how often it was called: the plain run differs from the planned one."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)) for _ in range(6))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        x = x * self.calls
        for b in self.blocks:
            x = b(x)
        return x


def test_verify_grads_compares_with_the_plain_model():
    model, x = mlp(6, 64)
    remat.auto(model, x, budget="80%", repeats=1, verify="grads")
    assert remat.runtime.executor.is_applied(model)
    with pytest.raises(VerificationError, match="differ"):
        remat.auto(Drifting(), torch.randn(256, 8), budget="80%", repeats=1, verify="grads")
    with pytest.raises(RematError, match="verify="):
        remat.auto(Drifting(), torch.randn(256, 8), budget="80%", repeats=1, verify="yes")


class BranchesOnValues(nn.Module):
    """Python control flow on a tensor's value: a fake copy cannot run it."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(4))

    def forward(self, x):
        for b in self.blocks:
            x = b(x) if float(x.detach().sum()) < 1e9 else x
        return x


def test_a_step_that_a_fake_copy_cannot_run_is_measured_or_refused_clearly(caplog):
    # 2 MiB activations: more than the fake copy keeps the values of (Note [Falling back per op])
    model, x = BranchesOnValues(), torch.randn(32768, 16)
    with caplog.at_level("WARNING", logger="remat"):
        prof = remat.profile(model, x, repeats=1)
    assert prof.meta["sizes"] == "measured" and "fake copy" in caplog.text
    with pytest.raises(remat.ProfileError, match=r"fake copy.*sizes='measured'"):
        remat.profile(model, x, repeats=1, sizes="fake")
    with pytest.raises(remat.ProfileError, match=r"fake copy"):
        remat.profile(model, x, device="meta")


def test_the_model_itself_runs_nothing_above_the_limit():
    model, x = mlp(6, 64)
    from torch._subclasses.fake_tensor import FakeTensor

    calls = []  # the hook is copied with the model: count the calls on real tensors
    model.register_forward_pre_hook(lambda mod, args: calls.append(not isinstance(args[0], FakeTensor)))
    prof = remat.profile(model, x, repeats=1, limit_bytes=1)  # stages found on the fake copy too
    assert prof.meta["sizes"] == "fake" and prof.meta["times"] == "estimated"
    assert calls and not any(calls)


def test_a_step_a_fake_copy_cannot_run_is_refused_under_a_limit():
    model, x = BranchesOnValues(), torch.randn(32768, 16)  # values beyond what the fake copy keeps
    with pytest.raises(remat.ProfileError, match=r"fake copy.*limit_bytes"):
        remat.profile(model, x, repeats=1, limit_bytes=10**9)
    with pytest.raises(remat.ProfileError, match=r"fake copy"):
        remat.auto(model, x, budget="1MB", repeats=1)


def test_verify_turns_a_failing_planned_step_into_a_clear_error(monkeypatch):
    import remat.runtime.auto as auto_module

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(auto_module, "measure", broken)
    model, x = mlp(6, 64)
    with pytest.raises(VerificationError, match=r"failed when run once.*out of memory"):
        remat.auto(model, x, budget="80%", repeats=1)
    assert not remat.runtime.executor.is_applied(model)


def test_verify_grads_on_a_layerdrop_model_compares_like_with_like():
    from .zoo_models import ZOO

    model, inputs, loss_fn = ZOO["layerdrop"]()
    remat.auto(model, inputs, loss_fn=loss_fn, budget="95%", repeats=1, verify="grads")
    assert remat.runtime.executor.is_applied(model)


def test_a_failed_auto_leaves_transformers_checkpointing_on():
    from .models import hf

    model, inputs = hf("gpt2")
    model.gradient_checkpointing_enable()
    with pytest.raises(remat.InfeasibleBudgetError):
        remat.auto(model, inputs, budget="1KiB", repeats=1)
    assert model.is_gradient_checkpointing


class SharedLayer(nn.Module):
    """One layer called several times (ALBERT's sharing): no chain of blocks that each run once."""

    def __init__(self):
        super().__init__()
        self.embed, self.layer, self.head = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 4)

    def forward(self, x):
        x = self.embed(x)
        for _ in range(4):
            x = torch.tanh(self.layer(x))
        return self.head(x)


def test_an_infeasible_budget_says_when_no_chain_of_blocks_was_found():
    prof = remat.profile(SharedLayer(), torch.randn(256, 16), repeats=1)
    with pytest.raises(remat.InfeasibleBudgetError, match=r"kept by <glue after>embed.*called several times"):
        solve(prof, prof.fixed_bytes + 1)
