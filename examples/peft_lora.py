"""LoRA with PEFT: the blocks are found through PeftModel -> LoraModel -> the base model, no stages= needed."""

import logging

import peft
import torch
import transformers

import remat

logging.basicConfig(level=logging.INFO, format="%(message)s")
transformers.logging.set_verbosity_error()
torch.manual_seed(0)

config = transformers.GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=128, n_positions=128)
base = transformers.GPT2LMHeadModel(config).train()
model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_fc"],
                                                  task_type="CAUSAL_LM"))
ids = torch.randint(0, 128, (4, 64))
batch = {"input_ids": ids, "labels": ids}

opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
model = remat.auto(model, batch, budget="70%", optimizer=opt, verify="grads")  # gradients checked bit for bit
print(remat.plan_of(model))
for step in range(3):
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    print(f"step {step}: loss {loss.item():.3f}")
