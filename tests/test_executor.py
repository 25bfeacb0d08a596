"""remat.apply: the plan runs with exactly the plain model's gradients, in the memory predicted."""

import copy
import io
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import remat
from remat import PlanMismatchError, simulate, solve
from remat.planning.solve import frontier, min_feasible_plan

from .models import TupleNet, cnn, hf, mlp


def _call(model, inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def _grads(model, inputs, loss_fn, seed=0):
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(seed)
    out = _call(model, inputs)
    loss_fn(out).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def hf_loss(out):
    return out.loss


def sq_loss(out):
    return (out["loss"] if isinstance(out, dict) else out.float().pow(2).mean())


ZOO = {
    "mlp": lambda: (*mlp(6, 64), sq_loss),
    "cnn": lambda: (cnn(5, 16), torch.randn(8, 3, 16, 16), lambda out: out.pow(2).mean()),
    "gpt2": lambda: (*hf("gpt2"), hf_loss),
    "llama": lambda: (*hf("llama"), hf_loss),
    "bert": lambda: (*hf("bert"), hf_loss),
    "tuples+kwargs": lambda: (TupleNet(6), {"x": torch.randn(8, 16), "mask": torch.ones(8, 32)}, sq_loss),
}


def _plans(prof):
    none = simulate(prof, solve(prof, None, strategy="none")).peak_bytes
    low = min_feasible_plan(prof).peak_bytes
    plans = [solve(prof, None, strategy=s) for s in ("every", "sqrt", "revolve")]
    plans += [solve(prof, low + (none - low) * k // 4) for k in range(4)]
    return plans


@pytest.mark.parametrize("name", list(ZOO))
def test_gradients_are_exactly_equal_with_dropout_on(name):
    torch.manual_seed(0)
    model, inputs, loss_fn = ZOO[name]()
    model.train()
    ref = _grads(copy.deepcopy(model), inputs, loss_fn)
    prof = remat.profile(model, inputs, loss_fn=loss_fn, repeats=1)
    shapes = set()
    for plan in _plans(prof):
        remat.apply(model, plan)
        got = _grads(model, inputs, loss_fn)
        assert got.keys() == ref.keys()
        for k in ref:
            assert torch.equal(got[k], ref[k]), (name, plan.strategy, k)
        remat.remove(model)
        shapes.add(tuple(type(i).__name__ for i in plan.items))
    assert len(shapes) >= 3  # really different plans


def test_multi_level_plan_below_every_layer_peak_fits_and_is_exact():
    torch.manual_seed(0)
    model, x = mlp(12, 64)
    ref = _grads(copy.deepcopy(model), x, sq_loss)
    prof = remat.profile(model, x, loss_fn=sq_loss, repeats=1)
    every = solve(prof, None, strategy="every").peak_bytes
    low = min_feasible_plan(prof).peak_bytes
    assert low < every
    plan = solve(prof, (low + every) // 2)
    assert any(any(isinstance(b, remat.Region) for b in r.body) for r in plan.regions()), "expected nesting"
    remat.apply(model, plan)
    got = _grads(model, x, sq_loss)
    assert all(torch.equal(got[k], ref[k]) for k in ref)

    def step():
        sq_loss(model(x)).backward()

    m = remat.measure(step, model=model, inputs=x, repeats=0)
    assert m.peak_bytes <= plan.budget_bytes < every


@pytest.mark.parametrize("name", ["mlp", "cnn", "gpt2", "llama"])
def test_measured_peak_is_within_budget_and_5_percent_of_simulated_across_the_frontier(name):
    torch.manual_seed(0)
    model, inputs, loss_fn = ZOO[name]()
    prof = remat.profile(model, inputs, loss_fn=loss_fn, repeats=1)
    pts = frontier(prof)
    chosen = pts[:: max(1, len(pts) // 6)] + [pts[-1]]
    if isinstance(inputs, torch.Tensor):
        tensors = [inputs]
    else:
        tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor)]
    for point in chosen:
        plan = solve(prof, point.peak_bytes)
        remat.apply(model, plan)

        def step():
            out = _call(model, inputs)
            loss_fn(out).backward()

        m = remat.measure(step, model=model, inputs=tensors, repeats=0)
        remat.remove(model)
        assert m.peak_bytes <= plan.budget_bytes, (name, plan.budget_bytes, m.peak_bytes)
        assert abs(m.peak_bytes - plan.peak_bytes) <= 0.05 * plan.peak_bytes, (name, plan.peak_bytes, m.peak_bytes)


def test_batchnorm_statistics_move_once_per_step_even_when_recomputed_twice():
    torch.manual_seed(0)
    model, x = cnn(6), torch.randn(4, 3, 8, 8)
    plain = copy.deepcopy(model)
    prof = remat.profile(model, x, loss_fn=lambda o: o.pow(2).mean(), repeats=1)
    plan = min_feasible_plan(prof)
    assert max(plan.prediction.forwards) >= 3  # some block is recomputed twice
    remat.apply(model, plan)
    for m in (plain, model):
        for _ in range(2):
            m(x).pow(2).mean().backward()
    for (k, a), (_, b) in zip(plain.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), k
    assert int(model[1].bn.num_batches_tracked) == 2


def test_frozen_parameters_and_inputs_without_grad():
    torch.manual_seed(0)
    model, x = mlp(6, 64)
    for i, block in enumerate(model):
        if i % 2 == 0:
            block.requires_grad_(False)  # LoRA-style: most weights frozen
    ref = _grads(copy.deepcopy(model), x, sq_loss)
    prof = remat.profile(model, x, loss_fn=sq_loss, repeats=1)
    remat.apply(model, solve(prof, None, strategy="every"))
    got = _grads(model, x, sq_loss)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_autocast_bfloat16_on_cpu():
    torch.manual_seed(0)
    model, inputs = hf("llama")

    def loss_fn(out):
        return out.loss

    def grads(m):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _grads(m, inputs, loss_fn)

    ref = grads(copy.deepcopy(model))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        prof = remat.profile(model, inputs, repeats=1)
    remat.apply(model, min_feasible_plan(prof))
    got = grads(model)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_no_grad_runs_the_plain_forward_and_a_recording_eval_step_is_planned(monkeypatch):
    """A step that records autograd keeps what the plan keeps, in training and evaluation mode alike (a
    training step run in eval mode was silently unplanned: predicted 180.4 MiB, measured 224.1 MiB)."""
    torch.manual_seed(0)
    model, inputs = hf("gpt2")
    prof = remat.profile(model, inputs, repeats=1)
    remat.apply(model, solve(prof, None, strategy="every"))
    calls = []
    import remat.runtime.regions as regions

    real = regions._checkpoint_without_reentrant_generator
    monkeypatch.setattr(regions, "_checkpoint_without_reentrant_generator",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        model(**inputs)
    model.eval()
    with torch.no_grad():
        model(**inputs)
    assert calls == []
    model(**inputs).loss.backward()
    assert len(calls) == 4
    model.train()
    model(**inputs).loss.backward()
    assert len(calls) == 8


def test_identity_is_kept_and_remove_restores_the_model(tmp_path):
    torch.manual_seed(0)
    model, inputs = hf("gpt2")
    params = list(model.parameters())
    keys = list(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    prof = remat.profile(model, inputs, repeats=1)
    remat.apply(model, solve(prof, None, strategy="sqrt"))
    assert remat.plan_of(model).strategy == "sqrt"
    assert list(model.parameters()) == params and list(model.state_dict()) == keys
    model(**inputs).loss.backward()
    opt.step()  # the optimizer still owns the model's parameters
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh, _ = hf("gpt2")
    fresh.load_state_dict(torch.load(buf))
    remat.remove(model)
    assert not any("forward" in m.__dict__ or m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    model.eval()
    fresh.eval()
    assert torch.equal(model(**inputs).logits, fresh(**inputs).logits)


def test_stale_plans_are_refused():
    torch.manual_seed(0)
    model, x = mlp(6, 64)
    prof = remat.profile(model, x, loss_fn=sq_loss, repeats=1)
    plan = solve(prof, None, strategy="every")
    other, _ = mlp(6, 96)
    with pytest.raises(PlanMismatchError, match="other parameters"):
        remat.apply(other, plan)
    fewer, _ = mlp(4, 64)
    with pytest.raises(PlanMismatchError, match="does not have"):
        remat.apply(fewer, plan)
    remat.apply(model, plan)
    model(torch.randn(16, 64)).sum().backward()  # a smaller (last) batch needs less memory: accepted
    with pytest.raises(PlanMismatchError, match=r"args\[0\] has shape \(64, 64\), larger than the planned \(32, 64\)"):
        model(torch.randn(64, 64)).sum().backward()
    with pytest.raises(PlanMismatchError, match=r"args\[0\] is torch.float64, planned torch.float32"):
        model.double()(torch.randn(32, 64, dtype=torch.float64)).sum().backward()
    model.float()
    remat.apply(model, plan, check_inputs=False)
    model(torch.randn(64, 64)).sum().backward()
    with torch.no_grad():
        model(torch.randn(16, 64))  # inference is never checked


def test_torch_compile_of_the_blocks_of_a_planned_model_trains():
    """Compiled blocks (aot_eager traces through AOTAutograd without a C++ toolchain) run the same graph in
    the first pass and in recomputation; gradients then match the eager model to float32 rounding (rtol
    1e-5: the traced graph may reorder additions). A whole planned model compiled trains too
    (tests/test_compile.py; Note [torch.compile] in remat.runtime.regions)."""
    torch.manual_seed(0)
    model, x = mlp(4, 32)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0  # compiled RNG differs from eager RNG
    ref = _grads(copy.deepcopy(model), x, sq_loss)
    prof = remat.profile(model, x, loss_fn=sq_loss, repeats=1)
    plan = min_feasible_plan(prof)
    remat.apply(model, plan)
    for k, kind in enumerate(plan.stage_kinds):
        if kind == "block":
            model.get_submodule(plan.stage_names[k]).compile(backend="aot_eager")
    for p in model.parameters():
        p.grad = None
    sq_loss(model(x)).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-6)
    whole, _ = mlp(4, 32)
    for m in whole.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    remat.apply(whole, plan)
    sq_loss(torch.compile(whole, backend="aot_eager")(x)).backward()
    for n, p in whole.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-6)


LAYERS = st.sampled_from(["linear", "tanh", "gelu", "norm", "dropout", "mlp"])


@settings(max_examples=int(os.environ.get("REMAT_EXAMPLES", "8")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(kinds=st.lists(LAYERS, min_size=3, max_size=9), share=st.floats(0.0, 1.0), seed=st.integers(0, 10**6))
def test_random_chains_and_budgets_are_exact_and_within_budget(kinds, share, seed):
    kinds = ["linear", *kinds]  # at least one layer with parameters
    torch.manual_seed(seed)
    d = 24
    make = {"linear": lambda: nn.Linear(d, d), "tanh": nn.Tanh, "gelu": nn.GELU, "norm": lambda: nn.LayerNorm(d),
            "dropout": lambda: nn.Dropout(0.3), "mlp": lambda: remat.app.zoo.MLPBlock(d, 2 * d, 0.2)}
    model = nn.Sequential(*[make[k]() for k in kinds])
    x = torch.randn(16, d)
    ref = _grads(copy.deepcopy(model), x, sq_loss, seed=seed)
    prof = remat.profile(model, x, loss_fn=sq_loss, repeats=1, warmup=1)
    none = simulate(prof, solve(prof, None, strategy="none")).peak_bytes
    low = min_feasible_plan(prof).peak_bytes
    plan = solve(prof, int(low + share * (none - low)))
    remat.apply(model, plan)
    got = _grads(model, x, sq_loss, seed=seed)
    assert all(torch.equal(got[k], ref[k]) for k in ref)

    def step():
        sq_loss(model(x)).backward()

    assert remat.measure(step, model=model, inputs=x, repeats=0).peak_bytes <= plan.budget_bytes
