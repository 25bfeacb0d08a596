"""accelerate: plan after accelerator.prepare; the AcceleratedOptimizer's AdamW state counts in the budget."""

import logging

import accelerate
import torch
import transformers

import remat

logging.basicConfig(level=logging.INFO, format="%(message)s")
transformers.logging.set_verbosity_error()
torch.manual_seed(0)

config = transformers.GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=128, n_positions=128)
model = transformers.GPT2LMHeadModel(config).train()
accelerator = accelerate.Accelerator(cpu=True)
model, opt = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
ids = torch.randint(0, 128, (4, 64))
batch = {"input_ids": ids, "labels": ids}

model = remat.auto(model, batch, budget="70%", optimizer=opt)
for step in range(3):
    loss = model(**batch).loss
    accelerator.backward(loss)
    opt.step()
    opt.zero_grad()
    print(f"step {step}: loss {loss.item():.3f}")
