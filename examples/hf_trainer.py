"""transformers' Trainer on a planned model, with TrainingArguments(gradient_checkpointing=True) left as it is:
the plan stays the model's only checkpointing, and save_pretrained keeps the model's own use_cache."""

import json
import logging
import tempfile
from pathlib import Path

import torch
import transformers

import remat

logging.basicConfig(level=logging.INFO, format="%(message)s")
transformers.logging.set_verbosity_error()
torch.manual_seed(0)

config = transformers.LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=128, max_position_embeddings=128)
model = transformers.LlamaForCausalLM(config).train()
ids = torch.randint(0, 128, (16, 64))
dataset = [{"input_ids": x, "labels": x} for x in ids]

opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
model = remat.auto(model, {"input_ids": ids[:4], "labels": ids[:4]}, budget="70%", optimizer=opt)

with tempfile.TemporaryDirectory() as out:
    args = transformers.TrainingArguments(output_dir=out, per_device_train_batch_size=4, max_steps=4, use_cpu=True,
                                          report_to=[], gradient_checkpointing=True, logging_steps=1,
                                          save_strategy="no")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, optimizers=(opt, None))
    trainer.train()  # logs: "activation_checkpointing_enable() ignored: this model runs a remat plan ..."
    model.save_pretrained(Path(out) / "model")
    saved = json.loads((Path(out) / "model" / "config.json").read_text())
    print(f"saved use_cache: {saved['use_cache']} (the model's own; planned: {model.config.use_cache})")
    assert saved["use_cache"] is True and not model.is_activation_checkpointing
