"""The product surface: remat.auto, the remat command, the examples."""

import copy
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import remat
from remat.app import cli
from remat.planning.strategies import min_feasible_plan

from .models import hf

ROOT = Path(__file__).resolve().parent.parent


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
    remat.auto(model, inputs, budget=0.9, repeats=1)
    assert not remat.runtime.model.hf_checkpointing_active(model)
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


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "remat.app.cli", *args], capture_output=True, text=True, timeout=600)


def test_cli_plan_prints_a_plan_and_json():
    r = run_cli("plan", "gpt2", "--batch", "2", "--seq", "128", "--budget", "2GiB", "--device", "meta")
    assert r.returncode == 0, r.stderr
    assert "predicted peak" in r.stdout and "fixed memory: " in r.stdout and "gradients" in r.stdout
    assert "verdict: one training step fits" in r.stdout
    r = run_cli("plan", "mlp", "--batch", "8", "--seq", "512", "--budget", "0.8", "--json")
    assert r.returncode == 0, r.stderr
    plan = remat.Plan.from_json(r.stdout)
    assert plan.peak_bytes <= plan.budget_bytes


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    r = run_cli("plan", "gpt2", "--batch", "2", "--seq", "128", "--budget", "1KiB")
    assert r.returncode == 2
    assert r.stderr.startswith("remat: error: remat.solve: budget 1.00 KiB is below the smallest feasible peak")
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    r = run_cli("plan", "gpt5", "--budget", "1GiB")
    assert r.returncode == 2 and "unknown model 'gpt5'" in r.stderr
    r = run_cli("plan", "mlp", "--budget", "lots")
    assert r.returncode == 2 and "'lots'" in r.stderr
    r = run_cli("--debug", "plan", "mlp", "--budget", "lots")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_cli_profile_then_plan_from_the_saved_profile(tmp_path):
    out = tmp_path / "profile.json"
    png = tmp_path / "frontier.png"
    assert cli.main(["profile", "gpt2-tiny", "--batch", "2", "--seq", "64", "--device", "cpu", "--repeats", "1",
                     "-o", str(out)]) == 0
    assert json.loads(out.read_text())["format"] == "remat.Profile/1"
    assert cli.main(["plan", "--profile", str(out), "--budget", "0.9", "--optimizer", "adam",
                     "--plot", str(png), "--frontier"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_runs_quickly_end_to_end(tmp_path, capsys):
    png = tmp_path / "f.png"
    assert cli.main(["demo", "--quick", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "checkpoint every layer" in out and "below every-layer" in out and "grads equal" in out
    assert " NO" not in out  # every gradient equal
    assert png.stat().st_size > 10_000


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_examples_run(example):
    r = subprocess.run([sys.executable, str(ROOT / "examples" / example)], capture_output=True, text=True,
                       timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
