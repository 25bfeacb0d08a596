"""torch.compile of a whole planned model (Note [torch.compile] in remat.runtime.regions): the compiled
blocks run the same graphs in the first pass and in recomputation, the gradients are the eager planned
model's to float32 rounding, and the step stays within the budget it was planned for.

The peak is measured by torch's profiler (every allocation the CPU allocator makes, inductor's buffers
included), not by remat.measure: a dispatch mode makes dynamo skip the frames it has not compiled yet.
Inductor compiles C++: about 40 s for the Llama case on 2 CPU cores with an empty inductor cache (10 s with
a warm one), so GPT-2 under inductor (50 s more) runs only with REMAT_SLOW=1.
"""

import copy
import os
import shutil

import pytest
import torch
from torch import nn

import remat
from remat.planning.solve import min_feasible_plan

from .models import hf, mlp, no_attention_dropout


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _profiled_peak(step, model, inputs):
    """Peak bytes of ``step``: the parameters, gradients (allocated, zeroed) and inputs that exist before
    it, plus the most the CPU allocator held above that during the step (torch.profiler's memory events);
    and how many compiled graphs ran forward."""
    from torch.profiler import ProfilerActivity, profile

    params = list(model.parameters())
    for p in params:
        p.grad.zero_()
    before = sum(t.numel() * t.element_size() for p in params for t in (p, p.grad))
    before += sum(t.numel() * t.element_size() for t in inputs if isinstance(t, torch.Tensor))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        if e.name() == "[memory]":
            live += e.nbytes()
            peak = max(peak, live)
    return before + peak, sum(e.name() == "CompiledFunction" for e in events)


def _train(model, forward, inputs_of, steps=2):
    """``steps`` SGD steps; the gradients of each."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        forward().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
    return grads


_CXX = any(shutil.which(c) for c in ("g++", "clang++", "c++"))
_INDUCTOR = pytest.mark.skipif(not _CXX, reason="inductor on CPU needs a C++ compiler")
_SLOW = pytest.mark.skipif(not os.environ.get("REMAT_SLOW"), reason="50 s of C++ compiling; REMAT_SLOW=1 runs it")


@pytest.mark.parametrize(("name", "backend"), [
    ("gpt2", "aot_eager"), ("llama", "aot_eager"),
    pytest.param("llama", "inductor", marks=_INDUCTOR),
    pytest.param("gpt2", "inductor", marks=[_INDUCTOR, _SLOW]),
])
def test_a_planned_transformer_compiled_whole_trains_within_budget(name, backend):
    model, inputs = hf(name)
    no_attention_dropout(model)  # compiled random draws are not eager's
    model = remat.auto(model, inputs, budget="70%", progress=False)
    plan = remat.plan_of(model)
    assert list(plan.regions()), "the budget must checkpoint something"
    eager = copy.deepcopy(model)  # the same plan, run eagerly (a deep copy carries its hooks)
    compiled = torch.compile(model, backend=backend)
    got = _train(model, lambda: compiled(**inputs).loss, inputs)
    want = _train(eager, lambda: eager(**inputs).loss, inputs)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for n in w:
            torch.testing.assert_close(g[n], w[n], rtol=1e-5, atol=1e-6, msg=n)
    peak, graphs = _profiled_peak(lambda: compiled(**inputs).loss.backward(), model, inputs.values())
    blocks = sum(kind == "block" for kind in plan.stage_kinds)
    recomputed = sum(r.stop - r.start for r in plan.regions())
    assert graphs >= blocks + recomputed  # every block ran compiled, in the first pass and in recomputation
    eager_peak, _ = _profiled_peak(lambda: eager(**inputs).loss.backward(), eager, inputs.values())
    assert peak <= plan.budget_bytes, (peak, eager_peak, plan.budget_bytes)


def test_nested_regions_recompute_compiled_blocks():
    """Multi-level recomputation: an inner region entered again in its outer region's recomputation runs
    the compiled blocks too."""
    model, x = mlp(8, 32)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0

    def loss(out):
        return out.pow(2).mean()

    plan = min_feasible_plan(remat.profile(model, x, loss_fn=loss, repeats=1))
    assert any(isinstance(it, remat.Region) for r in plan.regions() for it in r.body), plan
    remat.apply(model, plan)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    got = _train(model, lambda: loss(compiled(x)), [x])
    want = _train(eager, lambda: loss(eager(x)), [x])
    for g, w in zip(got, want):
        for n in w:
            torch.testing.assert_close(g[n], w[n], rtol=1e-5, atol=1e-6, msg=n)


def test_a_recomputation_that_does_not_run_the_compiled_graph_again_names_the_fix(monkeypatch):
    """Were a recomputation to run other graphs than its first pass (here: dynamo kept off in it, as torch's
    checkpoint leaves it), checkpoint's error comes back as remat's, saying what to do."""
    from remat.runtime import regions

    model, inputs = hf("gpt2")
    no_attention_dropout(model)
    model = remat.auto(model, inputs, budget="70%", progress=False)
    monkeypatch.setattr(regions, "set_eval_frame", lambda callback: None)
    loss = torch.compile(model, backend="aot_eager")(**inputs).loss
    with pytest.raises(remat.PlanMismatchError, match=r"block\.compile\(\) for each block"):
        loss.backward()
