"""remat.auto: profile, plan and apply in one call (the remat command and the examples: test_cli.py)."""

import copy
import logging

import pytest
import torch

import remat
from remat.planning.solve import min_feasible_plan

from .models import hf


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_auto_keeps_gradients_and_fits_the_budget(name, caplog):
    torch.manual_seed(0)
    model, inputs = hf(name, batch=2, seq=64)
    plain = copy.deepcopy(model)
    torch.manual_seed(1)
    plain(**inputs).loss.backward()
    prof = remat.profile(model, inputs, repeats=1)
    none = remat.solve(prof, None, strategy="none").peak_bytes
    low = min_feasible_plan(prof).peak_bytes
    budget = (low + none) // 2
    with caplog.at_level(logging.INFO, logger="remat"):
        remat.auto(model, inputs, budget=budget, repeats=1)
    assert "remat.auto: 6 stages" in caplog.text and "predicted peak" in caplog.text
    plan = remat.plan_of(model)
    assert plan.peak_bytes <= budget
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(1)
    model(**inputs).loss.backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), model.named_parameters()):
        assert torch.equal(a.grad, b.grad), n

    def step():
        out = model(**inputs)
        out.loss.backward()

    measured = remat.measure(step, model=model, inputs=[inputs["input_ids"], inputs["attention_mask"]], repeats=0)
    assert measured.peak_bytes <= budget


def test_auto_replaces_the_models_own_checkpointing_and_restores_use_cache():
    model, inputs = hf("gpt2")
    inputs.pop("use_cache")
    model.config.use_cache = True
    model.gradient_checkpointing_enable()
    remat.auto(model, inputs, budget="100%", repeats=1)
    assert not remat.runtime.hf.checkpointing_active(model)
    assert model.config.use_cache is False
    remat.remove(model)
    assert model.config.use_cache is True


def test_auto_on_a_sequential_with_a_loss_function_and_infeasible_budgets():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[remat.app.zoo.MLPBlock(64, 128) for _ in range(6)])
    x, target = torch.randn(512, 64), torch.randn(512, 64)

    def loss_fn(out):
        return torch.nn.functional.mse_loss(out, target)

    remat.auto(model, x, budget=0.8, loss_fn=loss_fn, repeats=1)
    assert remat.plan_of(model).peak_bytes <= remat.plan_of(model).budget_bytes
    with pytest.raises(remat.InfeasibleBudgetError, match="smallest feasible peak"):
        remat.auto(model, x, budget="1KiB", loss_fn=loss_fn, repeats=1)


def test_auto_with_estimated_times_takes_a_throughput():
    """``repeats=0`` times nothing: remat.profile asks for ``throughput=``, which auto passes on."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[remat.app.zoo.MLPBlock(32, 64) for _ in range(4)])
    x = torch.randn(64, 32)

    def loss_fn(out):
        return out.pow(2).mean()

    with pytest.raises(remat.RematError, match="throughput="):
        remat.auto(model, x, budget="70%", loss_fn=loss_fn, repeats=0)
    remat.auto(model, x, budget="70%", loss_fn=loss_fn, repeats=0, throughput="cpu")
    plan = remat.plan_of(model)
    assert plan.peak_bytes <= plan.budget_bytes and plan.time_s > 0


def test_a_loss_that_is_not_a_scalar_is_refused_with_its_shape_and_the_fix():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[remat.app.zoo.MLPBlock(16, 32) for _ in range(3)])
    with pytest.raises(remat.ProfileError, match=r"got a tensor of shape \(8, 16\); pass loss_fn="):
        remat.auto(model, torch.randn(8, 16), budget="60%", loss_fn=lambda out: out, repeats=1)
