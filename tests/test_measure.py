"""remat.measure: exact bytes on CPU, the same bytes on meta, CUDA beside the allocator."""

import dataclasses
import json

import pytest
import torch
from torch import nn

import remat
from remat import MemoryTracker, measure

from .models import hf, memtracker_peak, no_attention_dropout

F32 = 4


def test_linear_chain_is_byte_exact():
    """Three bias-free Linear(256, 256) on a (64, 256) input: count every byte by hand."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(256, 256, bias=False) for _ in range(3)])
    x = torch.randn(64, 256)
    act = 64 * 256 * F32  # one activation
    w = 256 * 256 * F32
    m = measure(lambda: model(x).sum().backward(), model=model, inputs=x, repeats=1)
    assert m.breakdown["parameters"] == 3 * w
    assert m.breakdown["gradients"] == 3 * w  # kept allocated (set_to_none=False)
    assert m.baseline_bytes == 6 * w + act
    # Peak: in the backward of the last Linear: the two saved inputs h1 and h2 (the output h3 was a
    # temporary, freed after the sum), the gradient it computes for h2 (act) and its weight gradient
    # before it is accumulated into .grad (w), plus the loss and its gradient (two 4-byte scalars).
    assert m.peak_bytes == m.baseline_bytes + 2 * act + act + w + 2 * F32
    assert m.step_bytes == m.peak_bytes - m.baseline_bytes


def test_views_are_not_counted_twice_and_frees_are_seen():
    with MemoryTracker() as t:
        a = torch.ones(1024)  # 4 KiB
        v1, v2 = a.view(32, 32), a[::2]
        b = a.t() if a.dim() == 2 else a.unsqueeze(0)
        assert t.live_bytes == 4096
        del a, v1, v2, b
        assert t.live_bytes == 0
        c = torch.ones(2048)
        assert t.live_bytes == 8192
        del c
    assert t.peak_bytes == 8192 and t.live_bytes == 0


def test_in_place_ops_allocate_nothing():
    x = torch.ones(1000)
    with MemoryTracker() as t:
        t.track(x)
        x.mul_(2).add_(1)
        x.relu_()
    assert t.peak_bytes == 4000 and t.live_bytes == 4000


def test_undeclared_old_storages_reached_by_views_are_not_counted():
    old = torch.ones(1000)
    with MemoryTracker() as t:
        old.view(10, 100).sum()
    assert t.peak_bytes == 4  # only the scalar sum


def test_tensors_freed_mid_step_lower_the_live_count():
    def step():
        a = torch.ones(10_000)
        b = a * 2
        del a
        c = b + 1
        return c.sum()

    with MemoryTracker() as t:
        step()
    assert t.peak_bytes == 80_004  # b, c and the scalar sum; never three 40 KB tensors at once
    assert t.live_bytes == 0


def test_set_to_none_counts_gradients_as_they_appear():
    model = nn.Linear(512, 512, bias=False)
    x = torch.randn(8, 512)
    kept = measure(lambda: model(x).sum().backward(), model=model, inputs=x, repeats=0)
    fresh = measure(lambda: model(x).sum().backward(), model=model, inputs=x, repeats=0, set_to_none=True)
    assert kept.breakdown["gradients"] == 512 * 512 * F32
    assert fresh.baseline_bytes == kept.baseline_bytes - 512 * 512 * F32
    assert fresh.peak_bytes <= kept.peak_bytes


def test_result_prints_and_serialises():
    model = nn.Linear(64, 64)
    x = torch.randn(4, 64)
    m = measure(lambda: model(x).sum().backward(), model=model, inputs=x, repeats=2, warmup=1)
    text = str(m)
    assert "peak" in text and "KiB" in text and "median of 2" in text and "gradients kept" in text
    d = json.loads(m.to_json())
    assert d["peak_bytes"] == m.peak_bytes and len(d["times_s"]) == 2
    assert m.time_s > 0
    with pytest.raises(remat.RematError, match="callable"):
        measure(42)


def _gpt2_step(model, inputs):
    def step():
        model(**inputs).loss.backward()

    return step


def test_gpt2_step_matches_an_independent_storage_tracker():
    """torch.distributed._tools.mem_tracker.MemTracker is PyTorch's own tracker, built independently."""
    pytest.importorskip("torch.distributed._tools.mem_tracker")
    model, inputs = hf("gpt2", batch=4, seq=64)
    step = _gpt2_step(model, inputs)
    step()  # allocate gradients, as remat.measure's warm-up does
    ours = measure(step, model=model, inputs=list(inputs.values())[:3], warmup=0, repeats=0)
    theirs = memtracker_peak(model, step, inputs["input_ids"], inputs["attention_mask"])
    assert abs(ours.peak_bytes - theirs) <= 0.01 * theirs, (ours.peak_bytes, theirs)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_meta_profile_gives_the_same_bytes_as_cpu(name):
    """Attention dropout off: on CPU, attention with dropout takes the math path, while the meta profile
    plans for the fused kernel GPUs run (see remat.runtime.profiler, Note [Attention on meta]). No grouped-query
    attention: while tracing, transformers materialises the mask and so copies K/V heads (docs/faq.md)."""
    model, inputs = hf(name, batch=2, seq=32, gqa=False)
    no_attention_dropout(model)
    cpu = remat.profile(model, inputs, repeats=1)
    meta = remat.profile(model, inputs, device="meta")
    assert meta.device == "meta" and cpu.device == "cpu"
    assert meta.fixed_bytes == cpu.fixed_bytes and meta.input_bytes == cpu.input_bytes
    peak = cpu.meta["measured_peak_bytes"]
    assert abs(meta.meta["measured_peak_bytes"] - peak) <= 0.01 * peak
    fields = ["x_bytes", "xbar_bytes", "fwd_transient_bytes", "bwd_transient_bytes", "input_freed_bytes"]
    for a, b in zip(meta.stages, cpu.stages):
        for f in fields:
            # transformers builds its attention mask even when not needed while tracing: 2 KiB here
            assert abs(getattr(a, f) - getattr(b, f)) <= 0.01 * peak, (a.name, f)
        if a.kind == "block":
            assert a == dataclasses.replace(b, fwd_s=a.fwd_s, bwd_s=a.bwd_s, fwd_nograd_s=a.fwd_nograd_s,
                                            fwd_region_s=a.fwd_region_s, fwd_flops=a.fwd_flops), a.name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_allocator_agrees_within_two_percent():
    model, inputs = hf("gpt2", batch=8, seq=128)
    model.cuda()
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    m = measure(_gpt2_step(model, inputs), model=model, inputs=list(inputs.values())[:3])
    assert m.cuda_peak_bytes is not None
    assert abs(m.step_bytes - (m.cuda_peak_bytes - m.cuda_baseline_bytes)) <= 0.02 * m.peak_bytes
