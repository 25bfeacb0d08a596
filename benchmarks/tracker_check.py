"""remat.measure against PyTorch's own storage tracker (MemTracker) on transformers steps, and the meta
profile's peak against the CPU profile's.

    .venv/bin/python benchmarks/tracker_check.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.models import hf, memtracker_peak, no_attention_dropout

import remat


def main() -> None:
    for name in ("gpt2", "llama"):
        model, inputs = hf(name, batch=4, seq=64, gqa=False)

        def step(model=model, inputs=inputs) -> None:
            model(**inputs).loss.backward()

        step()
        ours = remat.measure(step, model=model, inputs=[inputs["input_ids"], inputs["attention_mask"]],
                             warmup=0, repeats=0).peak_bytes
        theirs = memtracker_peak(model, step, inputs["input_ids"], inputs["attention_mask"])
        no_attention_dropout(model)
        cpu = remat.profile(model, inputs, repeats=1).meta["measured_peak_bytes"]
        meta = remat.profile(model, inputs, device="meta").meta["measured_peak_bytes"]
        print(f"{name}: remat.measure {ours:,} B, MemTracker {theirs:,} B ({100 * (ours - theirs) / theirs:+.3f}%);"
              f" profiled peak cpu {cpu:,} B, meta {meta:,} B ({100 * (meta - cpu) / cpu:+.3f}%)")


if __name__ == "__main__":
    main()
