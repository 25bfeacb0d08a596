"""Stage discovery by watching one forward (runtime/stages.py), and LayerDrop while profiling."""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

import remat
from remat import ProfileError, solve
from remat.planning.solve import min_feasible_plan
from remat.runtime.model import as_call, find_stages
from remat.runtime.regions import recompute_copy_bytes
from remat.runtime.span import Span, resolve
from remat.runtime.stages import layerdrop_draws_without_skipping

from .zoo_models import NUM_CLASSES, VGG, ZOO, LayerDropNet, _vectors, make_vgg_layers


def _found(name: str) -> list[str]:
    model, inputs, _ = ZOO[name]()
    call = (inputs, {}) if isinstance(inputs, tuple) else as_call(inputs)
    pairs, how = find_stages(model, None, inputs=call)
    assert how == "blocks"
    return [n for n, _ in pairs]


def test_containers_are_expanded_into_their_blocks():
    assert _found("resnet18") == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert _found("convnext")[:3] == ["features.1.0", "features.2", "features.3.0"]
    assert _found("swin") == ["layers.0.blocks.0", "layers.0.blocks.1", "layers.0.downsample",
                              "layers.1.blocks.0", "layers.1.blocks.1"]


def test_blocks_are_not_split_into_their_layers():
    # a residual block, and a block whose layers an activation separates
    assert _found("resnet50")[0] == "layer1.0"
    assert _found("inplace_mul_between_blocks") == [f"blocks.{i}" for i in range(4)]
    assert _found("gpt2") == [f"transformer.h.{i}" for i in range(3)]


def test_encoder_and_decoder_stacks_are_both_stages():
    # enc_norm's output (the memory every decoder block reads) lives through the decoder: a stage still
    assert _found("encoder_decoder_by_hand") == ["encoder.0", "encoder.1", "encoder.2", "enc_norm", "decoder.0",
                                                 "decoder.1", "decoder.2"]
    # T5: block 0 of each stack also returns the position bias the other blocks read: a side output, and block
    # 0 a stage like the others (it was glue, never recomputed)
    t5 = _found("t5")
    assert t5[:3] == ["encoder.block.0", "encoder.block.1", "encoder.block.2"]
    assert "decoder.block.0" in t5 and "decoder.block.1" in t5 and t5[-1] == "decoder.final_layer_norm"


def test_a_side_branch_is_not_on_the_chain():
    # deep supervision: an auxiliary head reads the hidden state after block 1
    assert _found("aux_loss_from_intermediate") == [f"blocks.{i}" for i in range(4)]


def test_discovery_leaves_buffers_and_the_random_state_as_they_were():
    model, x, _ = ZOO["resnet18"]()
    buffers = [b.clone() for b in model.buffers()]
    state = torch.get_rng_state()
    find_stages(model, None, inputs=as_call(x))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))


def test_discovery_on_a_meta_copy_finds_the_same_stages():
    model, x, _ = ZOO["resnet18"]()
    prof = remat.profile(model, x, loss_fn=lambda out: out.pow(2).mean(), device="meta")
    assert [s.name for s in prof.stages if s.kind == "block"] == _found("resnet18")


def test_explicit_stages_and_models_without_a_chain():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    assert find_stages(model, ["2"], inputs=as_call(torch.randn(2, 4)))[1] == "explicit"

    class Bare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x * self.w)

    with pytest.raises(ProfileError, match=r"cannot find a chain of stages in Bare.*stages=\["):
        find_stages(Bare(), None, inputs=as_call(torch.randn(2, 4)))


def test_layerdrop_draws_without_skipping_while_profiling():
    model = LayerDropNet(layerdrop=(0.0, 1.0, 0.5, 0.0))
    model.config = SimpleNamespace(layerdrop=0.1, encoder_layerdrop=0.0, dropout=0.1)
    before = model.layerdrop
    with layerdrop_draws_without_skipping(model):
        p = model.layerdrop[1]
        # a model that draws only when p > 0 (or p != 0) draws
        assert p > 0.0 and 0.0 < p and p != 0 and not p == 0 and not p <= 0 and model.config.layerdrop > 0.0
        assert not bool(torch.rand(()) < p) and not bool(torch.zeros(()) < p)  # and never skips
        assert model.layerdrop[0] == 0.0 and type(model.layerdrop[0]) is float  # 0 stays: nothing drawn
        assert model.config.encoder_layerdrop == 0.0 and model.config.dropout == 0.1
    assert model.layerdrop is before and model.config.layerdrop == 0.1


def _step(model: nn.Module, x: torch.Tensor, loss_fn, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(seed)
    for p in model.parameters():
        p.grad = None
    loss = loss_fn(model(x))
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]


def test_a_block_skipped_by_layerdrop_in_training_is_a_region_of_its_own():
    torch.manual_seed(0)
    model = LayerDropNet(layerdrop=(0.0, 1.0, 0.0, 0.0)).train()  # block 1 is always skipped in training
    x, loss_fn = _vectors()
    plain = copy.deepcopy(model)
    # sizes measured: a branch on a random draw has no value on the fake copy the profiler otherwise runs
    prof = remat.profile(model, x, loss_fn=loss_fn, repeats=1, sizes="measured")
    assert [s.kind for s in prof.stages] == ["prologue", *["block", "glue"] * 3, "block", "head"]
    calls = []
    model.blocks[1].register_forward_pre_hook(lambda m, a: calls.append(1))
    for plan in (solve(prof, None, strategy="every"), solve(prof, None, strategy="none")):
        remat.apply(model, plan)
        (loss, grads), (ref_loss, ref_grads) = _step(model, x, loss_fn), _step(plain, x, loss_fn)
        assert torch.equal(loss, ref_loss)
        assert all((g is None and r is None) or torch.equal(g, r) for g, r in zip(grads, ref_grads))
    assert not calls and model.blocks[1].fc1.weight.grad is None


class HeldFeatures(nn.Module):
    """wav2vec2's shape: a normed feature map the model returns beside its output, held through the blocks."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.proj = nn.Linear(d, d)
        self.blocks = nn.Sequential(*(nn.Linear(d, d) for _ in range(3)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat = self.norm(x)
        return self.blocks(self.proj(feat)), feat


def test_a_stage_whose_output_lives_on_starts_no_region_with_the_next_one():
    # Note [Tensors that live on]: norm's output is returned, so it lives through the blocks; proj's output
    # is held by the call to `blocks` until it returns. Both are stages; no region spans those boundaries.
    model = HeldFeatures()
    x = torch.randn(4, 16)
    pairs, _ = find_stages(model, None, inputs=as_call(x))
    assert [n for n, _ in pairs] == ["norm", "proj", "blocks.0", "blocks.1", "blocks.2"]

    def loss_fn(out):
        return out[0].square().sum() + out[1].square().sum()

    prof = remat.profile(model, x, loss_fn=loss_fn, sizes="measured", repeats=0, throughput="cpu")
    assert [s.joins_previous for s in prof.stages[1:-1]] == [False, False, False, True, True]
    plain = copy.deepcopy(model)
    for plan in (solve(prof, None, strategy="every"), solve(prof, None, strategy="sqrt"), min_feasible_plan(prof)):
        remat.apply(model, plan)
        (loss, grads), (ref_loss, ref_grads) = _step(model, x, loss_fn), _step(plain, x, loss_fn)
        assert torch.equal(loss, ref_loss)
        assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads))
        measured = remat.measure(lambda: loss_fn(model(x)).backward(), model=model, inputs=[x], repeats=0)
        assert measured.peak_bytes <= plan.prediction.peak_bytes, plan
        remat.remove(model)


def test_a_vision_language_model_has_the_blocks_of_both_towers():
    # Llava: the language model takes `inputs_embeds` (the text embeddings with the image features scattered in),
    # and the chain starts at the images: the vision tower's layers, the projector, the language model's layers
    from .test_beyond_chains import bc

    model, inputs, _ = bc.llava(vision_layers=2, text_layers=3)
    pairs, _ = find_stages(model, None, inputs=as_call(inputs))
    names = [n for n, _ in pairs]
    assert names[:2] == ["model.vision_tower.encoder.layers.0", "model.vision_tower.encoder.layers.1"]
    assert "model.multi_modal_projector" in names
    assert names[-3:] == [f"model.language_model.layers.{i}" for i in range(3)]


def test_a_unet_is_planned_at_the_granularity_of_its_own_checkpointing():
    # diffusers checkpoints each resnet and attention of its down, mid and up blocks; so does remat's chain
    pytest.importorskip("diffusers")
    from .test_beyond_chains import bc

    model, inputs, _ = bc.unet(layers_per_block=1)
    names = [n for n, _ in find_stages(model, None, inputs=as_call(inputs))[0]]
    assert names[0] == "down_blocks.0.resnets.0" and "mid_block.attentions.0" in names
    assert names[-1] == "up_blocks.1.attentions.1"
    assert sum(n.startswith("up_blocks.") for n in names) >= 6


# ----------------------------------------------------------------------------------------------------
# Spans: consecutive children of a container as one stage (Note [Spans] in runtime/span.py)
# ----------------------------------------------------------------------------------------------------

VGG_SPANS = ["features.0:3", "features.3:6", "features.6:8", "features.8:11", "features.11:13", "features.13:16"]


def test_vgg_features_are_spans_of_conv_relu_pool():
    # `features` was one stage: its convs are no stack (in-place ReLUs and pools between them), and a conv alone
    # saves nothing (the in-place ReLU after it saves its output). The classifier's Linear + ReLU + Dropout too.
    assert _found("vgg11") == [*VGG_SPANS, "classifier.0:3", "classifier.3:6", "classifier.6"]
    model, _, _ = ZOO["vgg11"]()
    span = resolve(model, "features.8:11")
    assert isinstance(span, Span) and [type(m) for m in span.parts] == [nn.Conv2d, nn.ReLU, nn.MaxPool2d]
    assert span.parts[0] is model.features[8]
    with pytest.raises(AttributeError):
        resolve(model, "features.8:30")


def _vgg_bn() -> tuple[nn.Module, torch.Tensor, Any]:
    torch.manual_seed(0)
    model = VGG(make_vgg_layers([8, "M", 16, "M", 32, "M", 64, "M"], batch_norm=True)).train()
    x, target = torch.randn(2, 3, 32, 32), torch.randint(0, NUM_CLASSES, (2,))
    return model, x, lambda out: nn.functional.cross_entropy(out, target)


def _step(model: nn.Module, x: torch.Tensor, loss_fn: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(1)
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model(x))
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]


def test_a_plan_of_spans_round_trips_and_runs_bitwise_with_batchnorm_inside():
    model, x, loss_fn = _vgg_bn()
    prof = remat.profile(copy.deepcopy(model), x, loss_fn=loss_fn, repeats=1)
    names = [s.name for s in prof.stages if s.kind == "block"]
    assert names[:4] == ["features.0:4", "features.4:8", "features.8:12", "features.12:16"]  # conv + BN + ReLU (+ pool)
    span = resolve(model, "features.0:4")
    assert recompute_copy_bytes(span) == (8 + 8 + 1) * 4 + 4  # running mean, var (fp32), num_batches_tracked (int64)
    assert prof.stages[1].recompute_copy_bytes == recompute_copy_bytes(span)
    plan = remat.Plan.from_json(min_feasible_plan(prof).to_json())
    assert plan.regions()
    planned = remat.apply(copy.deepcopy(model), plan)
    assert remat.plan_of(planned).stage_names == prof.names
    want, got = _step(model, x, loss_fn), _step(planned, x, loss_fn)
    assert torch.equal(want[0], got[0]) and all(torch.equal(a, b) for a, b in zip(want[1], got[1]))
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), planned.buffers()))  # statistics moved once
    copied = copy.deepcopy(planned)  # the span hooks travel with the model
    assert torch.equal(_step(copied, x, loss_fn)[0], want[0])
    remat.remove(planned)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in planned.modules())


def test_a_span_may_not_change_its_input_in_place():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(inplace=True), nn.Linear(8, 8))
    with pytest.raises(ProfileError, match="modifies its input in place"):
        remat.profile(model, torch.randn(2, 8), stages=["0", "1:3"], repeats=1)


def test_an_in_place_child_of_a_sequential_joins_the_stage_before():
    model = nn.Sequential(nn.Linear(8, 8), nn.LeakyReLU(0.1, inplace=True), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    assert [n for n, _ in find_stages(model, None)[0]] == ["0:2", "2", "3", "4"]
    relu = nn.ReLU(inplace=True)  # one module at two places: its hooks would fire twice, so it stays glue
    model = nn.Sequential(nn.Linear(8, 8), relu, nn.Linear(8, 8), relu, nn.Linear(8, 4))
    assert [n for n, _ in find_stages(model, None)[0]] == ["0", "2", "4"]
    nested = nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.ReLU(inplace=True)), nn.Linear(8, 4))
    assert [n for n, _ in find_stages(nested, None)[0]] == ["0.0:2", "1"]
