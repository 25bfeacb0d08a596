"""Small models for tests: a zoo of chain shapes, built quickly with random weights."""

from __future__ import annotations

import torch
from torch import nn

from remat.app import zoo


class ConvBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x))) + x


def cnn(blocks: int = 5, c: int = 8) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, c, 3, padding=1), *[ConvBlock(c) for _ in range(blocks)],
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


class TupleBlock(nn.Module):
    """Returns (hidden, aux) and takes a keyword mask, like a transformers layer of old."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.drop = nn.Dropout(0.2)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None, *, scale: float = 1.0):
        y = self.drop(torch.tanh(self.lin(h))) * scale
        if mask is not None:
            y = y * mask
        return (h + y, None)


class TupleNet(nn.Module):
    def __init__(self, depth: int = 6, d: int = 32) -> None:
        super().__init__()
        self.inp = nn.Linear(16, d)
        self.layers = nn.ModuleList([TupleBlock(d) for _ in range(depth)])
        self.out = nn.Linear(d, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h, mask=mask, scale=0.5)[0]
        return {"logits": self.out(h), "loss": self.out(h).pow(2).mean()}


def hf(name: str, batch: int = 2, seq: int = 32, gqa: bool = True):
    """Small transformers configs with dropout on (the zoo's tiny sizes, fewer layers where big)."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    if name == "gpt2":
        cfg = transformers.GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=256, n_positions=128,
                                      resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
        model = transformers.GPT2LMHeadModel(cfg)
    elif name == "llama":
        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=2 if gqa else 4, vocab_size=256,
                                       max_position_embeddings=128, attention_dropout=0.1)
        model = transformers.LlamaForCausalLM(cfg)
    elif name == "bert":
        cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                      intermediate_size=128, vocab_size=256, max_position_embeddings=128)
        model = transformers.BertForMaskedLM(cfg)
    else:
        raise ValueError(name)
    model.config._attn_implementation = "sdpa"
    model.train()
    ids = torch.randint(0, 256, (batch, seq))
    inputs = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    if name != "bert":
        inputs["use_cache"] = False
    return model, inputs


def no_attention_dropout(model: nn.Module) -> None:
    """Dropout off everywhere: on CPU, attention with dropout takes the math path (s x s weights)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.0


def memtracker_peak(model: nn.Module, step, *inputs: torch.Tensor) -> int:
    """Peak of ``step`` by torch's own MemTracker (independent of remat), gradients allocated and zeroed."""
    from torch.distributed._tools.mem_tracker import MemTracker

    ref = MemTracker()
    ref.track_external(model, *inputs)
    for p in model.parameters():
        p.grad.zero_()
    with ref:
        step()
    return int(ref.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])


def mlp(depth: int = 6, width: int = 64):
    torch.manual_seed(0)
    return zoo.residual_mlp(depth, width, 2 * width, dropout=0.1), torch.randn(32, width)
