"""Stage discovery by watching one forward (runtime/stages.py), and LayerDrop while profiling."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import remat
from remat import ProfileError, solve
from remat.planning.solve import min_feasible_plan
from remat.runtime.model import as_call, find_stages
from remat.runtime.stages import layerdrop_draws_without_skipping

from .zoo_models import ZOO, LayerDropNet, _vectors


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
    # a residual block, a block whose layers an activation separates, and VGG's in-place ReLUs
    assert _found("resnet50")[0] == "layer1.0"
    assert _found("inplace_mul_between_blocks") == [f"blocks.{i}" for i in range(4)]
    assert _found("vgg11") == ["features", "classifier"]
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
