"""Every model tried, as a new user would: `remat.auto` at 70% of the no-checkpointing peak (or, where that is
infeasible, at the least feasible peak the error names, given back in bytes), then the loop a user writes —
each step's forward in its own autocast block where the set-up has one, the output held through backward,
AdamW's step — measured by PyTorch's own MemTracker over two steps. Prints a markdown table: no silent
over-budget anywhere.

    .venv/bin/python benchmarks/trust_table.py
"""

from __future__ import annotations

import contextlib
import copy
import functools
import sys
import time
from pathlib import Path

import torch
import transformers

import remat
from remat.runtime.model import loss_function

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.models import hf

transformers.logging.set_verbosity_error()


def loop_peak(model, inputs, loss_fn, opt, autocast):
    from torch.distributed._tools.mem_tracker import MemTracker

    block = functools.partial(torch.autocast, "cpu", dtype=autocast) if autocast else contextlib.nullcontext
    args, kwargs = ((), inputs) if isinstance(inputs, dict) else ((inputs,), {})

    def step():
        with block():
            out = model(*args, **kwargs)
            loss = loss_fn(out)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        return out

    step()
    tensors = [t for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor)]
    peaks = []
    for _ in range(2):  # one tracker per step: MemTracker's module statistics do not survive a recomputed module
        ref = MemTracker()
        try:
            ref.track_external(model, opt, *tensors)
            with ref:
                out = step()
                del out
        except RuntimeError as e:  # MemTracker hooks every parameter: it refuses a frozen one
            if "doesn't require gradient" not in str(e):
                raise
            m = remat.measure(step, model=model, inputs=tensors, optimizer=opt, repeats=0)
            return m.peak_bytes, "remat.measure"
        peaks.append(int(ref.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]))
    return max(peaks), "MemTracker"


def mamba2():
    torch.manual_seed(0)
    cfg = transformers.Mamba2Config(hidden_size=64, num_hidden_layers=4, vocab_size=256, num_heads=8, head_dim=16,
                                    state_size=16, n_groups=1, expand=2, chunk_size=16)
    ids = torch.randint(0, 256, (2, 64))
    return transformers.Mamba2ForCausalLM(cfg).train(), {"input_ids": ids, "labels": ids}


def x_decoder():
    import x_transformers

    torch.manual_seed(0)
    model = x_transformers.TransformerWrapper(num_tokens=256, max_seq_len=128,
                                              attn_layers=x_transformers.Decoder(dim=64, depth=4, heads=4)).train()
    return model, torch.randint(0, 256, (4, 128))


def t5():
    torch.manual_seed(0)
    cfg = transformers.T5Config(d_model=64, d_ff=128, num_layers=4, num_decoder_layers=4, num_heads=4, d_kv=16,
                                vocab_size=256, decoder_start_token_id=0, pad_token_id=0)
    ids = torch.randint(0, 256, (2, 64))
    return transformers.T5ForConditionalGeneration(cfg).train(), {"input_ids": ids, "labels": ids}


def setups():
    """(name, make, loss_fn, eval_mode, autocast, how auto learns of autocast)."""
    default, ce = loss_function(None), None  # None: cross-entropy of the logits against the inputs
    yield "GPT-2", lambda: hf("gpt2", batch=4, seq=128), default, False, None, None
    yield "GPT-2 from_pretrained-style eval mode", lambda: hf("gpt2", batch=4, seq=128), default, True, None, None
    yield "Llama (GQA, attention dropout), eval mode", lambda: hf("llama", batch=4, seq=128), default, True, None, None
    yield "BERT", lambda: hf("bert", batch=4, seq=128), default, False, None, None
    yield "GPT-2, bf16 autocast, planned inside", lambda: hf("gpt2", batch=2, seq=32), default, False, torch.bfloat16, \
        "inside"
    yield "Llama, bf16 autocast, autocast=", lambda: hf("llama", batch=2, seq=64), default, False, torch.bfloat16, \
        "given"
    yield "Mamba2 (cache on in its config)", mamba2, default, False, None, None
    yield "T5 4+4 layers", t5, default, False, None, None
    yield "x-transformers decoder (keeps attention maps)", x_decoder, ce, False, None, None
    for name in ("resnet18", "mixtral", "bart", "whisper", "swin"):
        yield f"zoo: {name}", functools.partial(_zoo, name), name, False, None, None


def _zoo(name):
    from tests.zoo_models import ZOO

    return ZOO[name]()


def run(name, make, loss_fn, eval_mode, autocast, how):
    built = make()
    model, inputs = built[:2]
    if isinstance(loss_fn, str):  # a zoo entry: its own loss
        loss_fn = built[2] or loss_function(None)
    if loss_fn is None:
        target = inputs

        def loss_fn(logits):
            return torch.nn.functional.cross_entropy(logits.transpose(1, 2), target)

    if eval_mode:
        model.eval()
    plain = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters())
    ctx = torch.autocast("cpu", dtype=autocast) if how == "inside" else contextlib.nullcontext()
    kw = {"autocast": autocast} if how == "given" else {}
    budget, asked = "70%", "70%"
    try:
        with ctx:
            remat.auto(model, inputs, budget=budget, optimizer=opt, loss_fn=loss_fn, verify="grads", **kw)
    except remat.InfeasibleBudgetError as e:
        budget, asked = e.min_feasible_bytes, "least named"
        with ctx:
            remat.auto(model, inputs, budget=budget, optimizer=opt, loss_fn=loss_fn, verify="grads", **kw)
    plan = remat.plan_of(model)
    if eval_mode:
        model.train()
    measured, by = loop_peak(model, inputs, loss_fn, opt, autocast)
    del plain
    return (name if by == "MemTracker" else f"{name} (measured by {by}: MemTracker refuses its frozen parameter)",
            asked, plan.budget_bytes, plan.prediction.peak_bytes, measured,
            "within" if measured <= plan.budget_bytes else "**OVER**")


def main() -> None:
    torch.set_num_threads(1)
    print("| model / set-up | budget asked | budget (B) | predicted (B) | measured, MemTracker (B) | measured / budget"
          " | |\n|---|---|---|---|---|---|---|")
    t0 = time.perf_counter()
    for setup in setups():
        try:
            name, asked, budget, predicted, measured, verdict = run(*setup)
        except Exception as e:  # a row says what failed; the table goes on
            print(f"| {setup[0]} | | | | | | {type(e).__name__}: {str(e)[:160]} |", flush=True)
            continue
        print(f"| {name} | {asked} | {budget:,} | {predicted:,} | {measured:,} | {measured / budget:.3f} | {verdict} |",
              flush=True)
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
