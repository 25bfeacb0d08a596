"""remat under the frameworks people train with: transformers' Trainer, PEFT (LoRA), accelerate, Lightning,
and a torchtitan-style model. Each runs the real library on CPU: the planned model trains as the framework
drives it, with the plain model's gradients bit for bit and a peak (torch's own MemTracker) within the budget.

The models are tiny (4 layers, hidden 32, batch 2 x 32 tokens): with AdamW's state in the budget, a
2-layer model has no schedule at 70% of its peak (the state, the embeddings and the head alone are over it).
"""

import copy
import json
import logging
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import remat
from remat.errors import ProfileError, RematError

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

SEQ, BATCH, VOCAB = 32, 2, 64


def tiny(arch: str) -> nn.Module:
    torch.manual_seed(0)
    if arch == "gpt2":  # dropout on (0.1): the planned run must draw the plain run's masks
        cfg = transformers.GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                       max_position_embeddings=64)
        model = transformers.LlamaForCausalLM(cfg)
    model.config._attn_implementation = "sdpa"
    return model.train()


def token_ids(n: int = 3 * BATCH) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(1))


def batch_of(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}


def first_mlp(model: nn.Module) -> nn.Module:
    base = getattr(model, "transformer", None) or model.model
    return (base.h if hasattr(base, "h") else base.layers)[0].mlp


def grads_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert want and got.keys() == want.keys()
    differ = [n for n in want if not torch.equal(got[n], want[n])]
    assert not differ, f"{len(differ)} gradients differ: {differ[:3]}"


class StepPeaks:
    """Each step's peak by torch's own MemTracker (independent of remat): everything allocated during the
    step, plus what lives through it (parameters, gradients, optimizer state, the batch)."""

    def __init__(self) -> None:
        self.peaks: list[int] = []
        self._tracker = None

    def begin(self, *external) -> None:
        from torch.distributed._tools.mem_tracker import MemTracker

        self._tracker = MemTracker()
        self._tracker.track_external(*external)
        self._tracker.__enter__()

    def end(self) -> None:
        tracker, self._tracker = self._tracker, None
        tracker.__exit__(None, None, None)
        self.peaks.append(int(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]))

    def close(self) -> None:
        """Leave a tracker a failed step left open (its hooks would follow the next tests' models)."""
        if self._tracker is not None:
            self._tracker.__exit__(None, None, None)
            self._tracker = None


def tensor_bytes(obj) -> int:
    flat = torch.utils._pytree.tree_leaves(obj)
    return sum(t.untyped_storage().nbytes() for t in flat if isinstance(t, torch.Tensor))


def state_floor(model: nn.Module) -> int:
    """Parameters, gradients and AdamW's two moments: what a step with AdamW holds at its optimizer step."""
    return 4 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


# ---- transformers' Trainer --------------------------------------------------------------------------------


class _Dataset(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return batch_of(self.ids[i])


class _Watch(transformers.TrainerCallback):
    """The first step's gradients (before the optimizer step) and every step's peak."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, batch_bytes: int) -> None:
        self.model, self.optimizer, self.batch_bytes = model, optimizer, batch_bytes
        self.grads: dict[str, torch.Tensor] = {}
        self.peaks = StepPeaks()

    def on_step_begin(self, args, state, control, **kwargs):
        self.peaks.begin(self.model, self.optimizer)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step == 0:
            self.grads = grads_of(self.model)

    def on_step_end(self, args, state, control, **kwargs):
        self.peaks.end()
        self.peaks.peaks[-1] += self.batch_bytes  # the batch was made before the step began


def train_with_trainer(model: nn.Module, optimizer: torch.optim.Optimizer, out, *, hf_checkpointing: bool) -> _Watch:
    ids = token_ids()
    watch = _Watch(model, optimizer, tensor_bytes(batch_of(ids[:BATCH])))
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=BATCH, max_steps=3, report_to=[], use_cpu=True,
        gradient_checkpointing=hf_checkpointing, save_strategy="no", logging_strategy="no", seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Dataset(ids), optimizers=(optimizer, None),
                                   callbacks=[watch])
    try:
        trainer.train()
    finally:
        watch.peaks.close()
    return watch


_PLAIN_RUNS: dict[str, tuple[dict[str, torch.Tensor], list[int]]] = {}


def plain_trainer_run(arch: str, tmp_path_factory) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The plain model's first-step gradients and step peaks under the same Trainer (once per architecture)."""
    if arch not in _PLAIN_RUNS:
        model = tiny(arch)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        watch = train_with_trainer(model, opt, tmp_path_factory.mktemp("plain"), hf_checkpointing=False)
        _PLAIN_RUNS[arch] = watch.grads, watch.peaks.peaks
    return _PLAIN_RUNS[arch]


@pytest.mark.parametrize("hf_checkpointing", [False, True], ids=["plain-args", "gradient_checkpointing"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_trainer_trains_a_planned_model_within_budget(arch, hf_checkpointing, tmp_path_factory, caplog):
    """The Trainer passes num_items_in_batch (a 0-d tensor) to forward, and with gradient_checkpointing=True
    enables transformers' checkpointing in train(), after remat.auto: the plan must stay the only schedule."""
    model = tiny(arch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    remat.auto(model, batch_of(token_ids()[:BATCH]), budget="70%", optimizer=opt)
    plan = remat.plan_of(model)
    block0 = plan.stage_names.index(next(n for n in plan.stage_names if n.endswith(("h.0", "layers.0"))))
    calls = []
    first_mlp(model).register_forward_hook(lambda *_: calls.append(1))
    with caplog.at_level(logging.WARNING, logger="remat"):
        watch = train_with_trainer(model, opt, tmp_path_factory.mktemp("planned"), hf_checkpointing=hf_checkpointing)
    assert not model.is_activation_checkpointing  # transformers' own checkpointing stayed off
    assert len(calls) == 3 * plan.prediction.forwards[block0]  # 3 steps, each block run as planned, no more
    assert ("activation_checkpointing_enable() ignored" in caplog.text) == hf_checkpointing
    want_grads, plain_peaks = plain_trainer_run(arch, tmp_path_factory)
    assert_same_grads(watch.grads, want_grads)
    assert len(watch.peaks.peaks) == 3
    assert state_floor(model) < max(watch.peaks.peaks) <= plan.budget_bytes < max(plain_peaks)


def test_save_pretrained_keeps_the_users_use_cache_and_remove_restores_the_methods(tmp_path):
    model = tiny("gpt2")
    assert model.config.use_cache is True
    remat.auto(model, batch_of(token_ids()[:BATCH]), budget="70%", optimizer="adamw")
    assert model.config.use_cache is False  # off while planned: a cache would be written twice
    model.save_pretrained(tmp_path / "planned")
    assert json.loads((tmp_path / "planned" / "config.json").read_text())["use_cache"] is True
    assert model.config.use_cache is False
    model.gradient_checkpointing_enable()
    assert not model.is_activation_checkpointing
    pickled = copy.deepcopy(model)  # a planned copy keeps both guards, on its own config
    pickled.save_pretrained(tmp_path / "copy")
    assert json.loads((tmp_path / "copy" / "config.json").read_text())["use_cache"] is True
    remat.remove(model)
    assert model.config.use_cache is True and "save_pretrained" not in vars(model)
    model.gradient_checkpointing_enable()
    assert model.is_activation_checkpointing


def test_scalar_inputs_the_plan_never_saw_are_accepted_and_larger_tensors_refused():
    model = tiny("gpt2")
    batch = batch_of(token_ids()[:BATCH])
    remat.auto(model, batch, budget="70%", verify=False)
    model(**batch, num_items_in_batch=torch.tensor(64)).loss.backward()
    model(**batch, num_items_in_batch=64).loss.backward()
    with pytest.raises(remat.PlanMismatchError, match=r"extra_mask was not planned for \(\(2, 32\)"):
        model(**batch, extra_mask=torch.ones(2, 32))


# ---- PEFT -------------------------------------------------------------------------------------------------


def _planned_lora(model, blocks: str) -> dict[str, torch.Tensor]:
    """``model`` (PEFT-wrapped) planned at 70% without ``stages=``: its blocks found through the wrappers, gradients
    bitwise equal to a plain copy's, the peak within budget and under the plain one's; the plain gradients."""
    plain = copy.deepcopy(model)
    # use_cache=False: a planned model runs without its KV cache (a cache changes the plain model's gradients
    # in the last bit: its attention reads keys and values from the cache's copies)
    batch = {"input_ids": token_ids()[:BATCH], "labels": token_ids()[:BATCH], "use_cache": False}
    remat.auto(model, batch, budget="70%")
    plan = remat.plan_of(model)
    assert plan.stage_names[1:5] == tuple(f"{blocks}.{i}" for i in range(4))
    assert any(a == "checkpoint" for a in plan.actions())

    def step(m):
        for p in m.parameters():
            p.grad = None
        torch.manual_seed(0)
        m(**batch).loss.backward()
        return grads_of(m)

    got, want = step(model), step(plain)
    assert want and all("lora_" in n for n in want)  # only the adapters train
    assert_same_grads(got, want)
    # remat.measure, not MemTracker: torch's MemTracker cannot follow a frozen embedding (it hooks every
    # module output, and one that needs no gradient takes no hook)
    m = remat.measure(lambda: step(model), model=model, inputs=[batch["input_ids"]], repeats=0)
    plain_peak = remat.measure(lambda: step(plain), model=plain, inputs=[batch["input_ids"]], repeats=0).peak_bytes
    assert m.peak_bytes <= plan.budget_bytes < plain_peak
    return want


@pytest.mark.parametrize("task_type", ["CAUSAL_LM", None])
def test_peft_lora_model_is_planned_through_its_wrappers(task_type):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], lora_dropout=0.1,
                             task_type=task_type)
    want = _planned_lora(peft.get_peft_model(tiny("gpt2"), config), "base_model.model.transformer.h")
    assert len(want) == 4 * 2 * 4  # c_attn, 2 c_proj, c_fc in 4 blocks, A and B each


def test_peft_lora_on_a_llama_config_is_planned_through_its_wrappers():
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                             lora_dropout=0.1, task_type="CAUSAL_LM")
    want = _planned_lora(peft.get_peft_model(tiny("llama"), config), "base_model.model.model.layers")
    assert len(want) == 4 * 4 * 2  # q, v, up, down in 4 blocks, A and B each


# ---- accelerate -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_accelerate_prepared_model_and_optimizer(arch):
    accelerate = pytest.importorskip("accelerate")
    from accelerate.optimizer import AcceleratedOptimizer

    batch = {**batch_of(token_ids()[:BATCH]), "use_cache": False}  # as planned: no KV cache (see the PEFT test)
    runs = {}
    for planned in (False, True):
        accelerator = accelerate.Accelerator(cpu=True)
        model = tiny(arch)
        model, opt = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
        assert isinstance(opt, AcceleratedOptimizer)
        if planned:
            assert remat.optimizer_state_bytes(model, opt) == remat.optimizer_state_bytes(model, "adamw")
            remat.auto(model, batch, budget="70%", optimizer=opt)
        steps = []
        for _ in range(2):
            torch.manual_seed(0)
            accelerator.backward(model(**batch).loss)
            steps.append(grads_of(model))
            opt.step()
            opt.zero_grad()
        runs[planned] = model, opt, steps
    (model, opt, got), (_, _, want) = runs[True], runs[False]
    for g, w in zip(got, want):
        assert_same_grads(g, w)

    def step():
        model(**batch).loss.backward()
        opt.step()

    from lightning.pytorch.core.optimizer import LightningOptimizer

    assert remat.optimizer_state_bytes(model, LightningOptimizer(opt)) == remat.optimizer_state_bytes(model, opt) > 0
    m = remat.measure(step, model=model, inputs=[batch["input_ids"]], optimizer=opt, repeats=0)
    assert m.breakdown["optimizer"] == remat.optimizer_state_bytes(model, "adamw")
    assert state_floor(model) < m.peak_bytes <= remat.plan_of(model).budget_bytes


# ---- Lightning --------------------------------------------------------------------------------------------


def _lightning_module(arch: str = "gpt2"):
    L = pytest.importorskip("lightning")

    class LitLM(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny(arch)

        def training_step(self, batch, batch_idx):
            return self.model(**batch, use_cache=False).loss  # as planned: no KV cache (see the PEFT test)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    return L, LitLM()


def _fit(L, module, callbacks):
    loader = torch.utils.data.DataLoader([batch_of(i) for i in token_ids()], batch_size=BATCH)

    class Watch(L.Callback):
        def __init__(self) -> None:
            self.grads: dict[str, torch.Tensor] = {}
            self.peaks = StepPeaks()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.peaks.begin(pl_module, trainer.optimizers[0], *batch.values())

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 0:
                self.grads = grads_of(pl_module)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.peaks.end()

    watch = Watch()
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[*callbacks, watch])
    torch.manual_seed(0)
    try:
        trainer.fit(module, loader)
    finally:
        watch.peaks.close()
    assert trainer.global_step == 3
    return watch, loader


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lightning_callback_plans_the_model_training_step_calls(arch):
    from remat.integrations.lightning import Remat

    L, module = _lightning_module(arch)
    plain = copy.deepcopy(module)
    callback = Remat(torch.utils.data.DataLoader([batch_of(i) for i in token_ids()], batch_size=BATCH),
                     budget="70%")
    watch, _ = _fit(L, module, [callback])
    want, _ = _fit(L, plain, [])
    plan = callback.plan
    assert plan is not None and plan.stage_names[1] == {"gpt2": "transformer.h.0", "llama": "model.layers.0"}[arch]
    assert plan.prediction.fixed_bytes >= state_floor(module.model)  # AdamW from configure_optimizers counted
    with pytest.raises(remat.PlanError, match="no plan is applied"):  # removed when fit ended
        remat.plan_of(module.model)
    assert module.model.config.use_cache is True
    assert_same_grads(watch.grads, want.grads)
    assert len(watch.peaks.peaks) == 3
    assert state_floor(module) < max(watch.peaks.peaks) <= plan.budget_bytes < max(want.peaks.peaks)


def test_a_lightning_module_given_to_auto_is_refused_with_the_fix():
    _, module = _lightning_module()
    with pytest.raises(ProfileError, match=r"LitLM is a LightningModule without a forward.*remat.integrations"
                                           r".lightning.Remat"):
        remat.auto(module, batch_of(token_ids()[:BATCH]), budget="70%")


def test_lightning_callback_names_the_inner_model_when_it_cannot_choose():
    from remat.integrations.lightning import Remat, inner_model

    _, module = _lightning_module()
    module.head = nn.Linear(4, 4)
    with pytest.raises(RematError, match=r"2 children with trainable parameters \(\['model', 'head'\]\).*module="):
        inner_model(module, None)
    with pytest.raises(RematError, match=r"module='modle' is not a submodule"):
        inner_model(module, "modle")
    assert inner_model(module, "model") is module.model
    assert Remat(None, budget="50%").plan is None


# ---- a torchtitan-style model -----------------------------------------------------------------------------


@dataclass(slots=True)
class TitanArgs:
    """torchtitan's model configs are slotted dataclasses: no ``__dict__``."""

    dim: int = 32
    n_layers: int = 4
    n_heads: int = 4
    vocab_size: int = VOCAB
    max_seq_len: int = 64
    norm_eps: float = 1e-5


def _rope(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis[: x.shape[1]].view(1, x.shape[1], 1, -1)).flatten(3).type_as(x)


class TitanBlock(nn.Module):
    def __init__(self, layer_id: int, config: TitanArgs) -> None:
        super().__init__()
        self.layer_id, self.config = layer_id, config
        self.heads = config.n_heads
        self.wqkv = nn.Linear(config.dim, 3 * config.dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)
        self.w1 = nn.Linear(config.dim, 4 * config.dim, bias=False)
        self.w2 = nn.Linear(4 * config.dim, config.dim, bias=False)
        self.w3 = nn.Linear(config.dim, 4 * config.dim, bias=False)
        self.attention_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.wqkv(self.attention_norm(x)).view(b, s, 3, self.heads, d // self.heads).unbind(2)
        q, k = _rope(q, freqs_cis), _rope(k, freqs_cis)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        h = x + self.wo(a.transpose(1, 2).reshape(b, s, d))
        y = self.ffn_norm(h)
        return h + self.w2(F.silu(self.w1(y)) * self.w3(y))


class TitanLlama(nn.Module):
    """torchtitan's Llama3 layout: blocks in an ``nn.ModuleDict`` keyed "0".."n-1", a complex RoPE buffer
    passed to every block, the loss computed outside the model."""

    def __init__(self, config: TitanArgs) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        half = config.dim // config.n_heads // 2
        freqs = torch.outer(torch.arange(2 * config.max_seq_len).float(), 1e4 ** (-torch.arange(half).float() / half))
        self.register_buffer("freqs_cis", torch.polar(torch.ones_like(freqs), freqs), persistent=False)
        self.layers = nn.ModuleDict({str(i): TitanBlock(i, config) for i in range(config.n_layers)})
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h, self.freqs_cis)
        return self.output(self.norm(h))


def test_torchtitan_style_model_with_slotted_config_and_module_dict_blocks():
    torch.manual_seed(0)
    model = TitanLlama(TitanArgs()).train()
    with pytest.raises(TypeError):
        vars(model.config)  # the trait: no __dict__
    plain = copy.deepcopy(model)
    ids = token_ids()[:BATCH]

    def loss_fn(out):
        return F.cross_entropy(out.flatten(0, 1), ids.flatten())

    remat.auto(model, ids, budget="70%", loss_fn=loss_fn, optimizer="adamw", verify="grads")
    plan = remat.plan_of(model)
    assert plan.stage_names[1:5] == ("layers.0", "layers.1", "layers.2", "layers.3")
    for m in (model, plain):
        loss_fn(m(ids)).backward()
    assert_same_grads(grads_of(model), grads_of(plain))
    m = remat.measure(lambda: loss_fn(model(ids)).backward(), model=model, inputs=[ids], optimizer="adamw", repeats=0)
    assert m.peak_bytes <= plan.budget_bytes
