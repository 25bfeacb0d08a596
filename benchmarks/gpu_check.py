"""remat on CUDA: the allocator's peak beside remat's tracker and prediction, gradients, step times.

Run by benchmarks/gpu.sh on a GPU machine; writes a Markdown report (default: gpu-report.md). CPU-only
machines: it exits with a message. Sized to finish in a few minutes on one H100/H200.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch
import transformers

import remat
from remat.planning.solve import min_feasible_plan
from remat.units import format_bytes

transformers.logging.set_verbosity_error()


def models(dtype: torch.dtype):
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12,
                                                                n_positions=2048))
    ids = torch.randint(0, 50257, (8, 1024))
    yield "gpt2 (124M), batch 8 x 1024", gpt2, {"input_ids": ids, "labels": ids, "use_cache": False}
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=2048, intermediate_size=5504, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=16, vocab_size=32000, max_position_embeddings=4096))
    ids = torch.randint(0, 32000, (4, 2048))
    yield "llama-style 1.1B (bf16), batch 4 x 2048", llama.to(dtype), {"input_ids": ids, "labels": ids,
                                                                        "use_cache": False}


def timed(step, repeats=5):
    ts = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu-report.md")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here", file=sys.stderr)
        return 0
    lines = [f"# remat on {torch.cuda.get_device_name()} (torch {torch.__version__})", ""]
    for name, model, inputs in models(torch.bfloat16):
        model = model.cuda().train()
        inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

        def step(model=model, inputs=inputs):
            out = model(**inputs)
            out.loss.backward()

        t = time.perf_counter()
        prof = remat.profile(model, inputs, repeats=3)
        meta = remat.profile(model, inputs, device="meta", throughput="h200")
        lines += [f"## {name}", "", f"profiled in {time.perf_counter() - t:.1f} s (cuda and meta)", ""]
        none = remat.solve(prof, None, strategy="none")
        every = remat.solve(prof, None, strategy="every")
        low = min_feasible_plan(prof).peak_bytes
        ref = copy.deepcopy(model)
        for p in ref.parameters():
            p.grad = None
        torch.manual_seed(0)
        ref(**inputs).loss.backward()
        ref_grads = [p.grad for p in ref.parameters()]
        del ref
        head = ["budget", "plan", "sim peak", "meta-profile sim", "tracker peak", "CUDA allocator peak",
                "tracker vs CUDA", "time x", "sim time x", "max |grad diff|"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        base_t = None
        for label, budget in [("none", None), ("60%", int(0.6 * none.peak_bytes)), ("every's peak", every.peak_bytes),
                              ("min feasible", low)]:
            plan = remat.solve(prof, budget) if budget else none
            meta_plan = remat.simulate(meta, plan.items)
            remat.apply(model, plan, check_inputs=False)
            m = remat.measure(step, model=model, inputs=[inputs["input_ids"]], repeats=0)
            cuda_step = m.cuda_peak_bytes - m.cuda_baseline_bytes
            dt = timed(step)
            base_t = base_t or dt
            for p in model.parameters():
                p.grad = None
            torch.manual_seed(0)
            model(**inputs).loss.backward()
            diff = max((p.grad.float() - g.float()).abs().max().item() for p, g in zip(model.parameters(), ref_grads))
            remat.remove(model)
            lines.append(f"| {label} | {sum(1 for _ in plan.regions())} regions | {format_bytes(plan.peak_bytes)} |"
                         f" {format_bytes(meta_plan.peak_bytes)} | {format_bytes(m.peak_bytes)} |"
                         f" {format_bytes(m.cuda_peak_bytes)} |"
                         f" {100 * (m.step_bytes - cuda_step) / m.peak_bytes:+.2f}% |"
                         f" {dt / base_t:.2f}x | {plan.time_s / none.time_s:.2f}x | {diff:.2e} |")
        lines.append("")
        model.cpu()
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
