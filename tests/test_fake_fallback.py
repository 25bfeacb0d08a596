"""A byte budget below the plain step's peak is sized on a fake copy, which falls back per op where it cannot run
one (Note [Falling back per op] in remat.runtime.fakemode): MoE layers whose grouped matmul has a bf16-only meta
kernel, and models that branch on values (LayerDrop's draw, ``.item()``, ``nonzero``). Their plans hold in the loop
a user writes (PyTorch's MemTracker) and give the plain model's gradients bit for bit."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import remat
from remat.runtime.profiler import _Fake

from .test_step import loop_peak


def _moe(kind: str) -> tuple[nn.Module, dict]:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2, vocab_size=256, max_position_embeddings=128)
    if kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**common, moe_intermediate_size=32, num_experts=4, head_dim=16)
        model = transformers.Qwen3MoeForCausalLM(cfg)
    else:
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**common, num_local_experts=4))
    ids = torch.randint(0, 256, (2, 32))
    return model.train(), {"input_ids": ids, "labels": ids, "use_cache": False}


def _m2m() -> tuple[nn.Module, dict]:
    """LayerDrop draws a random scalar and branches on it (``aten._local_scalar_dense`` on the fake copy)."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.M2M100Config(vocab_size=256, d_model=64, encoder_layers=2, decoder_layers=2,
                                    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                    decoder_ffn_dim=128, max_position_embeddings=128)
    model = transformers.M2M100ForConditionalGeneration(cfg)
    ids = torch.randint(3, 256, (2, 32))
    return model.train(), {"input_ids": ids, "labels": ids}


class _Routed(nn.Module):
    """Tokens picked by value: ``nonzero`` (an output shape that depends on values) and ``.item()``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 96), nn.GELU(), nn.Linear(96, 32)) for _ in range(4))
        self.out = nn.Linear(32, 64)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> SimpleNamespace:
        kept = (input_ids % 3 != 0).nonzero(as_tuple=True)  # as many tokens as the ids say
        x = self.embed(input_ids)[kept]
        for block in self.blocks:
            x = x + block(x)
        scale = 1.0 + int((input_ids == 1).sum().item())
        loss = nn.functional.cross_entropy(self.out(x) / scale, labels[kept])
        return SimpleNamespace(loss=loss)  # as transformers' outputs: .loss


def _routed() -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (8, 64))
    return _Routed(), {"input_ids": ids, "labels": ids}


MODELS = {"qwen3_moe": lambda: _moe("qwen3_moe"), "mixtral": lambda: _moe("mixtral"), "m2m100": _m2m,
          "routed": _routed}


def _grads(model: nn.Module, inputs: dict) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    model(**inputs).loss.backward()
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.mark.parametrize("name", list(MODELS))
def test_the_fake_copy_runs_what_its_meta_kernels_refuse(name):
    model, inputs = MODELS[name]()
    fake = remat.profile(model, inputs, sizes="fake", repeats=1)
    measured = remat.profile(model, inputs, sizes="measured", repeats=1)
    assert fake.meta["sizes"] == "fake"
    # Never a number below what the step allocates.
    assert fake.meta["measured_peak_bytes"] >= measured.meta["measured_peak_bytes"]
    none = remat.solve(measured, None, strategy="none")
    assert remat.simulate(fake, remat.solve(fake, None, strategy="none")).peak_bytes >= remat.simulate(
        measured, none).peak_bytes


@pytest.mark.parametrize("name", list(MODELS))
def test_a_byte_budget_below_the_plain_peak_plans_and_holds(name):
    """Refused before ('the step does not run on a fake copy'): now planned, within budget in the user's loop,
    with the plain model's gradients bit for bit."""
    model, inputs = MODELS[name]()
    plain = copy.deepcopy(model)
    ref = copy.deepcopy(model)
    peak = loop_peak(ref, inputs, torch.optim.AdamW(ref.parameters()))
    opt = torch.optim.AdamW(model.parameters())
    budget = int(0.93 * peak)
    remat.auto(model, inputs, budget=budget, optimizer=opt)
    plan = remat.plan_of(model)
    assert plan is not None and any(True for _ in plan.regions())
    assert loop_peak(model, inputs, opt) <= budget
    plain.load_state_dict(model.state_dict())  # the loop stepped the planned model's weights
    for a, b in zip(_grads(model, inputs), _grads(plain, inputs), strict=True):
        assert torch.equal(a, b)


def test_a_value_the_fake_copy_cannot_know_is_still_refused_clearly():
    """A branch on a tensor computed from activations larger than the mirror keeps fails as before: refused by
    name, never guessed."""

    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(512, 512) for _ in range(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = block(x)
                if x.mean() > 1e9:  # a value of a 2 MiB activation
                    x = x * 0
            return x.sum()

    x = torch.randn(1024, 512)
    with pytest.raises(remat.RematError, match="does not run on a fake copy"):
        remat.profile(Gate(), x, sizes="fake", repeats=1)


def test_the_fake_copy_never_writes_the_real_model():
    model, inputs = _routed()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fake = _Fake.of(model, (), inputs, "cpu", None)
    with fake.running(flash=False):
        fake.model(**fake.kwargs).loss.backward()
        for p in fake.model.parameters():
            p.data.mul_(0)  # written on the fake copy only
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _bloom(layers: int, batch: int, seq: int) -> tuple[nn.Module, dict]:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.BloomForCausalLM(transformers.BloomConfig(hidden_size=64, n_layer=layers, n_head=4,
                                                                   vocab_size=256))
    ids = torch.randint(3, 256, (batch, seq))
    return model.train(), {"input_ids": ids, "labels": ids, "use_cache": False}


@pytest.mark.parametrize("shape", [(2, 2, 32), (2, 4, 128), (4, 2, 32)])
def test_bloom_attention_scores_freed_after_the_projection_are_counted_once(shape):
    """BLOOM's attention frees its scores when it returns, after its output projection (a stage): they were
    counted as kept by the code before it, and the self-check refused the model (+5.0% at 2x32, +22.2% at 4x128,
    'bytes were counted twice'). Note [Lingering bytes]: the chain model now predicts the measured peak within 0.2%,
    never below."""
    model, inputs = _bloom(*shape)
    prof = remat.profile(model, inputs, sizes="measured", repeats=1)
    measured = prof.meta["measured_peak_bytes"]
    predicted = remat.simulate(prof, remat.solve(prof, None, strategy="none")).peak_bytes
    assert measured <= predicted <= 1.005 * measured


def test_bloom_plans_within_budget_with_the_plain_gradients():
    """Refused by the self-check before. Its stages as found (the attention's projection, the MLP: the attention
    scores are code between them, never checkpointed) allow no less than about 90% of the plain peak here."""
    model, inputs = _bloom(4, 4, 128)
    plain = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters())
    remat.auto(model, inputs, budget="95%", optimizer=opt)
    plan = remat.plan_of(model)
    assert loop_peak(model, inputs, opt) <= plan.budget_bytes
    plain.load_state_dict(model.state_dict())
    for a, b in zip(_grads(model, inputs), _grads(plain, inputs), strict=True):
        assert torch.equal(a, b)
