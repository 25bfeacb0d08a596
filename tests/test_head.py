"""The loss head in chunks (issue 24, Note [Chunked head] in remat.runtime.head): the loss transformers
computes, within fp32 tolerance; fewer activations, planned with the blocks and measured within budget by
PyTorch's own MemTracker; refusals where it does not apply. Tiny shapes here; benchmarks/head.py measures the
large-vocabulary GPT-2 shape of the issue."""

import copy
import inspect
import json
import logging

import pytest
import torch
from torch import nn

import remat
from remat.app.cli import HEAD_NAMES, main
from remat.planning.solve import min_feasible_peak
from remat.runtime import head as H

from .models import hf, no_attention_dropout

RTOL = 1e-5  # fp32: each tensor's largest difference against its largest value


def close(a, b, rtol=RTOL):
    return (a - b).abs().max().item() <= rtol * max(b.abs().max().item(), 1e-30)


def lm(name, vocab=2048, batch=2, seq=64, dropout=True):
    """A transformers causal LM with a vocabulary large against its hidden size (the head dominates)."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if name == "gpt2":
        p = 0.1 if dropout else 0.0
        cfg = transformers.GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=vocab, n_positions=128,
                                      resid_pdrop=p, embd_pdrop=p, attn_pdrop=p)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                       num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128,
                                       attention_dropout=0.1 if dropout else 0.0)
        model = transformers.LlamaForCausalLM(cfg)
    model.config._attn_implementation = "sdpa"
    model.train()
    ids = torch.randint(0, vocab, (batch, seq))
    labels = ids.clone()
    labels[0, :5] = -100  # ignored tokens, as a padded batch has
    return model, {"input_ids": ids, "labels": labels, "use_cache": False}


def grads_of(model, inputs, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(**inputs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---- the loss ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunks", [0, 1, 3, 7])
@pytest.mark.parametrize("num_items", [None, 37])
def test_the_chunked_loss_is_transformers_causal_loss_within_fp32_tolerance(chunks, num_items):
    from transformers.loss.loss_utils import ForCausalLMLoss

    torch.manual_seed(0)
    hidden = torch.randn(2, 50, 16, requires_grad=True)
    lin = nn.Linear(16, 300)
    labels = torch.randint(0, 300, (2, 50))
    labels[1, 10:20] = -100
    n = None if num_items is None else torch.tensor(num_items)
    ref = ForCausalLMLoss(lin(hidden), labels, 300, num_items_in_batch=n)
    ref_grads = torch.autograd.grad(ref, [hidden, lin.weight, lin.bias])
    loss = H.chunked_cross_entropy(hidden, lin.weight, lin.bias, labels, chunks=chunks, shift=True,
                                   num_items_in_batch=n)
    grads = torch.autograd.grad(loss, [hidden, lin.weight, lin.bias])
    assert close(loss, ref) and all(close(g, r) for g, r in zip(grads, ref_grads))
    assert not torch.equal(grads[1], ref_grads[1]) or chunks in (0, 1), "summed in another order: not bitwise"


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("dropout", [False, True])
def test_the_chunked_head_gives_the_plain_models_loss_and_gradients_dropout_off_and_on(name, dropout):
    model, inputs = lm(name, dropout=dropout)
    if not dropout:
        no_attention_dropout(model)
    plain = copy.deepcopy(model)
    ref, ref_grads = grads_of(plain, inputs)
    assert H.final_norm(model) is (model.transformer.ln_f if name == "gpt2" else model.model.norm)  # in the chunks
    undo = H.install(model, 5)
    out, grads = grads_of(model, inputs)
    assert out.logits is None and out.loss is not None  # Rule 3: no full logits were built
    assert close(out.loss, ref.loss) and grads.keys() == ref_grads.keys()
    assert all(close(grads[n], ref_grads[n]) for n in ref_grads), [n for n in ref_grads if not close(grads[n],
                                                                                                       ref_grads[n])]
    n = torch.tensor(41)  # the Trainer's num_items_in_batch: the sum over it
    losses = []
    for m in (model, plain):
        torch.manual_seed(1)
        losses.append(m(**inputs, num_items_in_batch=n).loss)
    assert close(*losses)
    without_labels = {k: v for k, v in inputs.items() if k != "labels"}
    assert model(**without_labels).logits.shape == (2, 64, 2048)  # generation and logits as the model has them
    assert inspect.signature(model.forward) == inspect.signature(plain.forward)  # the Trainer reads it
    undo()
    assert "forward" not in vars(model)


def test_a_call_that_returns_the_hidden_states_keeps_the_final_norm_outside_the_chunks():
    """Note [The final norm in the chunks]: the last hidden state returned is the norm's output, as the model's."""
    model, inputs = lm("llama", dropout=False)
    no_attention_dropout(model)
    plain = copy.deepcopy(model)
    H.install(model, 4)
    out, ref = (m(**inputs, output_hidden_states=True) for m in (model, plain))
    assert torch.equal(out.hidden_states[-1], ref.hidden_states[-1]) and close(out.loss, ref.loss)


def test_the_final_norm_stays_outside_where_the_forwards_do_not_show_it_is_the_last_op():
    import transformers

    class Scaled(transformers.LlamaForCausalLM):  # the hidden states changed between the norm and lm_head
        def forward(self, input_ids=None, labels=None, **kwargs):
            outputs = self.model(input_ids=input_ids, **kwargs)
            hidden_states = outputs.last_hidden_state / 2
            logits = self.lm_head(hidden_states)
            return transformers.modeling_outputs.CausalLMOutputWithPast(logits=logits)

    model, _ = lm("llama")
    scaled = Scaled(model.config)
    assert H.final_norm(model) is model.model.norm and H.final_norm(scaled) is None
    model.model.norm.register_forward_hook(lambda *a: None)
    assert H.final_norm(model) is None  # a hook the chunks would bypass


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_the_final_norm_in_the_chunks_takes_its_activations_out_of_the_head(name, monkeypatch):
    model, inputs = lm(name, vocab=4096)
    inside = remat.profile(model, inputs, head="chunked", device="meta")
    monkeypatch.setattr(H, "final_norm", lambda lm: None)
    outside = remat.profile(model, inputs, head="chunked", device="meta")
    pairs = list(zip(inside.head_options, outside.head_options, strict=True))
    assert all(a.chunks == b.chunks and a.head.bwd_transient_bytes <= b.head.bwd_transient_bytes for a, b in pairs)
    assert pairs[-1][0].head.bwd_transient_bytes < pairs[-1][1].head.bwd_transient_bytes
    assert min_feasible_peak(inside) < min_feasible_peak(outside)


# ---- planned and measured ----------------------------------------------------------------------------------------


def memtracker_peak(model, inputs):
    """The step's peak by PyTorch's MemTracker, one tracker for the step, the output held through backward,
    gradients allocated by a step before."""
    from torch.distributed._tools.mem_tracker import MemTracker

    out = model(**inputs)
    out.loss.backward()
    del out
    ref = MemTracker()
    ref.track_external(model, *[v for v in inputs.values() if isinstance(v, torch.Tensor)])
    with ref:
        out = model(**inputs)
        out.loss.backward()
        del out
    return int(ref.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_auto_plans_the_head_in_chunks_between_the_two_least_peaks_and_memtracker_measures_it_within(name, caplog):
    model, inputs = lm(name, vocab=4096)
    no_attention_dropout(model)  # CPU attention with dropout takes the math path
    plain = copy.deepcopy(model)
    prof = remat.profile(model, inputs, head="chunked", repeats=1)
    assert prof.head_chunks == 0 and [o.chunks for o in prof.head_options][:3] == [1, 2, 4]
    low, whole = min_feasible_peak(prof), min_feasible_peak(prof.with_head(0))
    fixed = prof.base_bytes - prof.head_residual_bytes
    assert low - fixed <= (whole - fixed) / 2, "the chunked head at least halves the least feasible activations"
    budget = (low + whole) // 2
    with caplog.at_level(logging.INFO, logger="remat"):
        remat.auto(model, inputs, budget=budget, head="chunked", verify="grads", repeats=1)
    plan = remat.plan_of(model)
    assert plan.head_chunks and plan.head_chunks >= 1 and "logits not returned" in plan.summary()
    assert "within floating-point tolerance, not bit for bit" in caplog.text
    assert memtracker_peak(model, inputs) <= budget
    out, grads = grads_of(model, inputs)
    ref, ref_grads = grads_of(plain, inputs)
    assert out.logits is None and close(out.loss, ref.loss)
    assert all(close(grads[n], ref_grads[n]) for n in ref_grads)
    remat.remove(model)
    assert model(**inputs).logits is not None


def test_simulate_runs_a_plan_with_the_head_it_was_solved_with():
    """Note [A plan's head]: a plan with the head in chunks is simulated with that head, never the whole one's."""
    model, inputs = lm("gpt2", vocab=4096)
    prof = remat.profile(model, inputs, head="chunked", device="meta")
    plan = remat.solve(prof, min_feasible_peak(prof))
    assert plan.head_chunks and prof.head_chunks == 0
    assert remat.simulate(prof, plan) == plan.prediction == remat.simulate(prof.with_head(plan.head_chunks), plan)
    assert remat.simulate(prof, plan.items).peak_bytes > plan.prediction.peak_bytes  # items alone: the profile's head
    with pytest.raises(remat.PlanError, match=rf"runs the head in {plan.head_chunks} chunks, and the profile has no"):
        remat.simulate(prof.with_head(0), plan)
    whole = remat.solve(prof.with_head(0), None)
    assert whole.head_chunks == 0 and remat.simulate(prof, whole) == whole.prediction


def test_the_default_keeps_the_head_and_its_plans_bit_for_bit(caplog):
    model, inputs = hf("gpt2", batch=2, seq=32)
    no_attention_dropout(model)
    prof = remat.profile(model, inputs, repeats=1)
    assert prof.head_chunks is None and prof.head_options == ()
    plan = remat.solve(prof, "75%")
    assert plan.head_chunks is None and "head_chunks" not in plan.to_json()
    with caplog.at_level(logging.INFO, logger="remat"):
        remat.auto(model, inputs, budget="75%", verify="grads", repeats=1)
    assert "bitwise equal to the plain model's" in caplog.text
    assert model(**inputs).logits is not None


# ---- a plain model: remat.ChunkedHead ----------------------------------------------------------------------------


class TinyLM(nn.Module):
    def __init__(self, vocab=2048, d=32, depth=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
                                     for _ in range(depth)])
        self.head = remat.ChunkedHead(nn.Linear(d, vocab, bias=False), chunks=0, shift=True)

    def forward(self, ids, labels):
        h = self.embed(ids)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h, labels)


def test_a_plain_model_with_a_chunked_head_is_planned_and_its_plan_file_runs_the_head_so():
    torch.manual_seed(0)
    model = TinyLM()
    ids = torch.randint(0, 2048, (4, 64))
    plain = copy.deepcopy(model)
    prof = remat.profile(model, (ids, ids), head="chunked", repeats=1)
    low, whole = min_feasible_peak(prof), min_feasible_peak(prof.with_head(0))
    assert low < whole and model.head.chunks == 0, "profiling leaves the head as it was"
    plan = remat.solve(prof, low)
    assert plan.head_chunks >= 1 and json.loads(plan.to_json())["head_chunks"] == plan.head_chunks
    remat.apply(model, remat.Plan.from_json(plan.to_json()))
    assert model.head.chunks == plan.head_chunks
    torch.manual_seed(1)
    model(ids, ids).backward()
    torch.manual_seed(1)
    plain(ids, ids).backward()
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        assert close(p.grad, q.grad), n
    remat.remove(model)
    assert model.head.chunks == 0


# ---- where it does not apply -------------------------------------------------------------------------------------


def test_refusals_name_why_the_chunked_head_does_not_apply():
    import transformers

    bert, bert_inputs = hf("bert")
    with pytest.raises(remat.RematError, match=r"neither a transformers causal LM .* nor a model with a remat"):
        remat.profile(bert, bert_inputs, head="chunked", device="meta")
    cfg = transformers.Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8, vocab_size=256)
    with pytest.raises(remat.RematError, match=r"changes the logits after lm_head .*final_logit_softcapping"):
        H.causal_lm(transformers.Gemma2ForCausalLM(cfg))
    model, inputs = hf("gpt2")
    with pytest.raises(remat.RematError, match="the example inputs have none; pass a dict with 'labels'"):
        remat.profile(model, {"input_ids": inputs["input_ids"]}, head="chunked", device="meta")
    with pytest.raises(remat.RematError, match="with loss_fn=: the model's output will have no logits"):
        remat.profile(model, inputs, head="chunked", loss_fn=lambda out: out.logits.sum(), device="meta")
    with pytest.raises(remat.RematError, match="head='sliced'; use 'keep'"):
        remat.profile(model, inputs, head="sliced", device="meta")
    model.lm_head = nn.Sequential(model.lm_head)
    with pytest.raises(remat.RematError, match=r"its lm_head is a Sequential, not a torch\.nn\.Linear"):
        remat.auto(model, inputs, budget="90%", head="chunked")
    assert "forward" not in vars(model)


# ---- the command line --------------------------------------------------------------------------------------------


def test_the_cli_plans_the_head_and_refuses_it_with_a_saved_profile(capsys, tmp_path):
    assert HEAD_NAMES == H.HEADS
    args = ["gpt2-tiny", "--batch", "2", "--seq", "64", "--device", "meta"]
    assert main(["plan", *args, "--budget", "90%", "--head", "chunked"]) == 0
    out = capsys.readouterr().out
    assert "smallest feasible" in out and "<head>" in out
    path = tmp_path / "p.json"
    assert main(["profile", *args, "--head", "chunked", "-o", str(path)]) == 0
    assert json.loads(path.read_text())["head_options"]
    assert main(["plan", "--profile", str(path), "--budget", "1B"]) == 2
    assert "smallest feasible" in capsys.readouterr().err
    assert main(["plan", "--profile", str(path), "--budget", "1GiB", "--head", "chunked"]) == 2
    assert "--head" in capsys.readouterr().err


def test_a_chunked_head_the_user_set_is_kept_and_checked_bit_for_bit_with_the_default(caplog):
    torch.manual_seed(0)
    model = TinyLM()
    model.head.chunks = 4
    ids = torch.randint(0, 2048, (4, 64))
    with caplog.at_level(logging.INFO, logger="remat"):
        remat.auto(model, (ids, ids), budget="97%", verify="grads", repeats=1)
    assert remat.plan_of(model).head_chunks is None and model.head.chunks == 4
    assert "bitwise equal to the plain model's" in caplog.text


def test_fsdp_with_the_chunked_head_is_refused_before_any_work(capsys):
    assert main(["plan", "gpt2-tiny", "--budget", "1GiB", "--fsdp", "2", "--head", "chunked"]) == 2
    assert "--fsdp with --head chunked" in capsys.readouterr().err
