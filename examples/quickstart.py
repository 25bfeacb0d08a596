"""Train a GPT-2-style model within a memory budget: remat.auto profiles, plans and applies."""

import logging

import torch
import transformers

import remat

logging.basicConfig(level=logging.INFO, format="%(message)s")
transformers.logging.set_verbosity_error()
torch.manual_seed(0)

config = transformers.GPT2Config(n_layer=6, n_embd=128, n_head=4, vocab_size=2048, n_positions=256)
model = transformers.GPT2LMHeadModel(config).train()
ids = torch.randint(0, 2048, (4, 128))
batch = {"input_ids": ids, "labels": ids}

model = remat.auto(model, batch, budget=0.6)  # 60% of the peak without checkpointing
print(remat.plan_of(model))

opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
for step in range(3):
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=False)
    print(f"step {step}: loss {loss.item():.3f}")
