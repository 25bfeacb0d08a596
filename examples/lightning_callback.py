"""Lightning: the Remat callback plans the model a LightningModule's training_step calls, for the fit."""

import logging

import lightning as L
import torch
import transformers

from remat.integrations.lightning import Remat

logging.basicConfig(level=logging.INFO, format="%(message)s")
transformers.logging.set_verbosity_error()
torch.manual_seed(0)


class LitLM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        config = transformers.GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=128, n_positions=128)
        self.model = transformers.GPT2LMHeadModel(config)

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


ids = torch.randint(0, 128, (16, 64))
loader = torch.utils.data.DataLoader([{"input_ids": x, "labels": x} for x in ids], batch_size=4)
callback = Remat(loader, budget="70%")  # the first batch is the example; AdamW's state counts in the budget
trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
trainer.fit(LitLM(), loader)
print(callback.plan)
