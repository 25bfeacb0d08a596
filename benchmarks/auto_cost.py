"""What ``remat.auto`` itself costs on a GPT-2 config: its peak process memory (RSS) beside the plain
step's, and its wall time in units of plain steps.

Each case runs in a fresh process (peak RSS is per process): the model alone; the model and plain
training steps; the model and ``remat.auto`` at a budget below the no-checkpointing peak (sizes from a
fake copy, times from runs that fit) and at one above it (sizes measured).

    .venv/bin/python benchmarks/auto_cost.py
"""

from __future__ import annotations

import json
import subprocess
import sys

CASE = r"""
import json, resource, statistics, sys, time
import torch, transformers
import remat
torch.manual_seed(0)
cfg = transformers.GPT2Config(n_layer=8, n_embd=256, n_head=8, n_positions=512, vocab_size=2048,
                              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
model = transformers.GPT2LMHeadModel(cfg)
ids = torch.randint(0, 2048, (8, 512))
batch = {"input_ids": ids, "labels": ids}
case = sys.argv[1]
out = {"case": case}
if case == "plain":
    times = []
    for _ in range(4):
        t = time.perf_counter()
        model(**batch).loss.backward()
        times.append(time.perf_counter() - t)
    out["step_s"] = statistics.median(times[1:])
    step = lambda: model(**batch).loss.backward()
    out["tracked_peak"] = remat.measure(step, model=model, inputs=ids, repeats=0).peak_bytes
elif case.startswith("auto"):
    t = time.perf_counter()
    remat.auto(model, batch, budget=case.split(":")[1], repeats=3)
    out["auto_s"] = time.perf_counter() - t
    plan = remat.plan_of(model)
    out["predicted"] = plan.prediction.peak_bytes
    out["budget"] = plan.budget_bytes
out["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(out))
"""


def run(case: str) -> dict:
    res = subprocess.run([sys.executable, "-c", CASE, case], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    base, plain = run("model"), run("plain")
    mib = 2**20
    print(f"model alone: RSS {base['rss'] / mib:.0f} MiB")
    print(f"plain step: tracked peak {plain['tracked_peak'] / mib:.1f} MiB, RSS {plain['rss'] / mib:.0f} MiB"
          f" (+{(plain['rss'] - base['rss']) / mib:.0f} over the model), {plain['step_s'] * 1e3:.0f} ms per step")
    for budget in ("600MiB", "2GiB"):  # below the no-checkpointing peak (1.1 GiB), and above it
        a = run(f"auto:{budget}")
        over = (a["rss"] - base["rss"]) / mib
        print(f"remat.auto budget {budget}: RSS {a['rss'] / mib:.0f} MiB (+{over:.0f} over the"
              f" model), {a['auto_s']:.1f} s = {a['auto_s'] / plain['step_s']:.1f} plain steps; plan predicts"
              f" {a['predicted'] / mib:.1f} MiB of budget {a['budget'] / mib:.1f} MiB")


if __name__ == "__main__":
    main()
