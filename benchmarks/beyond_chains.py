"""Issue 23, "beyond chains": remat against each framework's own every-block checkpointing on models that are not
chains (U-Nets, encoder-decoders, a vision-language model, CNN stems), measured as a user would.

    .venv/bin/python benchmarks/beyond_chains.py [--models unet,t5] [--quick] [--rounds 9]

For each model (tiny configs, random weights, dropout off, nothing downloaded), on the plain training step
(forward, loss, backward; no optimizer; the output held through backward; gradients kept allocated and zeroed
between steps, as remat's budget assumes):

1. no checkpointing: the step's peak;
2. the framework's own every-block checkpointing (the peer): diffusers ``enable_gradient_checkpointing()``,
   transformers ``gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})``, or, for
   the torchvision-style CNNs, every block wrapped by hand in ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``
   (ResNet: every residual block, and the stem plus every block; VGG: every conv + ReLU (+ pool) unit);
3. remat's least feasible peak: the smallest predicted peak of the plans remat makes from the model's profile
   (``min_feasible_peak(remat.profile(model, inputs))``, as ``remat plan`` reports it); ``remat.auto`` at that byte
   figure on a fresh copy, its peak measured;
4. remat at the peer's measured peak: ``remat.auto(fresh copy, budget=peer_peak, verify="grads")``, its peak
   measured, every parameter's gradient compared with ``torch.equal`` against the plain model's (same seed), and
   its step time against the peer's, side by side: rounds of one step each (A B, then B A, ...), each timed step
   after an untimed one of the same variant, one intra-op thread; the median of the per-round ratios remat / peer
   with their interquartile range and their range. A refused budget reads "infeasible (least X)".

Peaks: PyTorch's MemTracker, one tracker per step, the larger of two steps after a warm-up (independent of remat).
A model MemTracker refuses (a frozen parameter: Whisper's sinusoidal positions) is measured by ``remat.measure``
for every column, and its row says so. An error is a short cell; its traceback's essence follows the table.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import remat
from remat.planning.solve import min_feasible_peak

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

Built = tuple[nn.Module, dict[str, Any], Callable[[Any], torch.Tensor]]


def _transformers() -> Any:
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def _hf_loss(out: Any) -> torch.Tensor:
    return out.loss


def _mse_to(target: torch.Tensor) -> Callable[[Any], torch.Tensor]:
    def loss_fn(out: Any) -> torch.Tensor:
        return F.mse_loss(out.sample, target)

    return loss_fn


# ---- models (tiny configs, random weights, dropout off) -------------------------------------------------------

def unet(layers_per_block: int = 2) -> Built:
    """diffusers UNet2DConditionModel: two resolutions, cross-attention, skip connections from down to up."""
    import diffusers

    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=layers_per_block,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    inputs = {"sample": torch.randn(2, 4, 16, 16), "timestep": torch.tensor([10, 500]),
              "encoder_hidden_states": torch.randn(2, 8, 32)}
    return model.train(), inputs, _mse_to(torch.randn(2, 4, 16, 16))


def dit(num_layers: int = 4) -> Built:
    """diffusers DiTTransformer2DModel (adaLN-zero, class-conditioned), patch 2 on a 16 x 16 latent."""
    import diffusers

    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                            out_channels=4, num_layers=num_layers, sample_size=16, patch_size=2,
                                            num_embeds_ada_norm=10, norm_num_groups=32, dropout=0.0)
    inputs = {"hidden_states": torch.randn(2, 4, 16, 16), "timestep": torch.tensor([10, 500]),
              "class_labels": torch.tensor([1, 2])}
    return model.train(), inputs, _mse_to(torch.randn(2, 4, 16, 16))


def t5(layers: int = 4) -> Built:
    tf = _transformers()
    torch.manual_seed(0)
    cfg = tf.T5Config(d_model=64, d_ff=128, num_layers=layers, num_decoder_layers=layers, num_heads=4, d_kv=16,
                      vocab_size=256, decoder_start_token_id=0, pad_token_id=0, dropout_rate=0.0)
    ids = torch.randint(1, 256, (2, 64))
    return tf.T5ForConditionalGeneration(cfg).train(), {"input_ids": ids, "labels": ids, "use_cache": False}, _hf_loss


def bart(layers: int = 4) -> Built:
    tf = _transformers()
    torch.manual_seed(0)
    cfg = tf.BartConfig(vocab_size=256, d_model=64, encoder_layers=layers, decoder_layers=layers,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                        max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    ids = torch.randint(3, 256, (2, 64))
    labels = torch.randint(3, 256, (2, 48))
    inputs = {"input_ids": ids, "attention_mask": torch.ones(2, 64, dtype=torch.long), "labels": labels,
              "use_cache": False}
    return tf.BartForConditionalGeneration(cfg).train(), inputs, _hf_loss


def whisper(layers: int = 4) -> Built:
    """tests/zoo_models.py's tiny Whisper, 4 + 4 layers, dropout off (its encoder's positions are frozen)."""
    tf = _transformers()
    torch.manual_seed(0)
    cfg = tf.WhisperConfig(vocab_size=256, num_mel_bins=16, encoder_layers=layers, decoder_layers=layers,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                           decoder_ffn_dim=128, d_model=64, max_source_positions=32, max_target_positions=32,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3,
                           dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                           begin_suppress_tokens=None, suppress_tokens=None)
    features = torch.randn(2, 16, 64)  # (batch, mel bins, 2 * max_source_positions)
    labels = torch.randint(4, 256, (2, 24))
    return (tf.WhisperForConditionalGeneration(cfg).train(), {"input_features": features, "labels": labels,
                                                              "use_cache": False}, _hf_loss)


LLAVA_IMAGE_TOKEN = 255


def llava(vision_layers: int = 2, text_layers: int = 3) -> Built:
    """LlavaForConditionalGeneration: a CLIP vision tower (32 px, patch 8: 16 patches), a projector and a Llama.

    The vision feature layer is -2 and the strategy "default" (the CLS token dropped): each image gives 16 features,
    so the image token stands 16 times in each row; the labels ignore those positions."""
    tf = _transformers()
    torch.manual_seed(0)
    vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
                                 num_attention_heads=4, image_size=32, patch_size=8, projection_dim=32,
                                 attention_dropout=0.0)
    text = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=text_layers, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, attention_dropout=0.0)
    cfg = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_index=LLAVA_IMAGE_TOKEN,
                         vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=16)
    patches = (32 // 8) ** 2
    batch, seq = 2, 64
    ids = torch.randint(3, LLAVA_IMAGE_TOKEN, (batch, seq))
    ids[:, 0] = 1  # bos
    ids[:, 1:1 + patches] = LLAVA_IMAGE_TOKEN
    labels = ids.clone()
    labels[:, :1 + patches] = -100
    inputs = {"input_ids": ids, "pixel_values": torch.randn(batch, 3, 32, 32),
              "attention_mask": torch.ones(batch, seq, dtype=torch.long), "labels": labels, "use_cache": False}
    return tf.LlavaForConditionalGeneration(cfg).train(), inputs, _hf_loss


def _images(size: int, batch: int = 4) -> tuple[dict[str, Any], Callable[[Any], torch.Tensor]]:
    from tests.zoo_models import NUM_CLASSES

    x = torch.randn(batch, 3, size, size)
    target = torch.randint(0, NUM_CLASSES, (batch,))

    def loss_fn(out: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, target)

    return {"x": x}, loss_fn


def resnet18(size: int = 64) -> Built:
    """tests/zoo_models.py's copy of torchvision's ResNet-18 (width 8), on 64 x 64 images."""
    from tests import zoo_models as zoo

    torch.manual_seed(0)
    model = zoo.ResNet(zoo.BasicBlock, [2, 2, 2, 2], width=8)
    return model.train(), *_images(size)


def vgg11(size: int = 64) -> Built:
    """tests/zoo_models.py's copy of torchvision's VGG-11 (channels / 8), classifier dropout off, 64 x 64 images."""
    from tests import zoo_models as zoo

    torch.manual_seed(0)
    model = zoo.VGG(zoo.make_vgg_layers([8, "M", 16, "M", 32, 32, "M", 64, 64, "M"]), dropout=0.0)
    return model.train(), *_images(size)


# ---- the peers: each framework's own every-block checkpointing ---------------------------------------------------

class Checkpointed(nn.Module):
    """A module run under ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``, as one wraps it by hand."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return checkpoint(self.inner, *args, use_reentrant=False, **kwargs)


def diffusers_every_block(model: nn.Module) -> None:
    model.enable_gradient_checkpointing()


def hf_every_layer(model: nn.Module) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def resnet_every_block(model: nn.Module) -> None:
    for name in ("layer1", "layer2", "layer3", "layer4"):
        layer = model.get_submodule(name)
        for i, block in enumerate(list(layer)):
            layer[i] = Checkpointed(block)


def resnet_stem_and_every_block(model: nn.Module) -> None:
    resnet_every_block(model)
    model.conv1 = Checkpointed(nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool))
    model.bn1, model.relu, model.maxpool = nn.Identity(), nn.Identity(), nn.Identity()  # the stem's, now inside


def vgg_every_unit(model: nn.Module) -> None:
    """Every conv + ReLU unit (with the pool after it, if any) of ``features`` in its own checkpoint."""
    units: list[list[nn.Module]] = []
    for m in model.features:
        if isinstance(m, nn.Conv2d) or not units:
            units.append([])
        units[-1].append(m)
    model.features = nn.Sequential(*[Checkpointed(nn.Sequential(*u)) for u in units])


@dataclass
class Case:
    name: str
    build: Callable[[], Built]
    peers: list[tuple[str, Callable[[nn.Module], None]]]
    text: str


CASES = {c.name: c for c in [
    Case("unet", unet, [("diffusers enable_gradient_checkpointing", diffusers_every_block)],
         "diffusers UNet2DConditionModel: block_out_channels (32, 64), layers_per_block 2, CrossAttnDown + Down /"
         " Up + CrossAttnUp, cross_attention_dim 32; sample 2x4x16x16, encoder_hidden_states 2x8x32; MSE loss"),
    Case("dit", dit, [("diffusers enable_gradient_checkpointing", diffusers_every_block)],
         "diffusers DiTTransformer2DModel: 4 layers, 2 heads x 16, patch 2, 10 classes; latent 2x4x16x16; MSE loss"),
    Case("t5", t5, [("transformers gradient_checkpointing_enable", hf_every_layer)],
         "T5ForConditionalGeneration: 4 + 4 layers, d_model 64, d_ff 128, 4 heads x 16, vocab 256; 2 x 64 tokens,"
         " labels = ids"),
    Case("bart", bart, [("transformers gradient_checkpointing_enable", hf_every_layer)],
         "BartForConditionalGeneration: 4 + 4 layers, d_model 64, ffn 128, 4 heads, vocab 256; 2 x 64 tokens,"
         " 2 x 48 labels"),
    Case("whisper", whisper, [("transformers gradient_checkpointing_enable", hf_every_layer)],
         "WhisperForConditionalGeneration: 4 + 4 layers, d_model 64, ffn 128, 4 heads, 16 mel bins x 64 frames,"
         " 2 x 24 labels"),
    Case("llava", llava, [("transformers gradient_checkpointing_enable", hf_every_layer)],
         "LlavaForConditionalGeneration: CLIP vision 2 layers (hidden 32, 32 px, patch 8: 16 patches, feature layer"
         " -2) + projector + Llama 3 layers (hidden 64, GQA 4/2); 2 images, 2 x 64 tokens (16 image tokens each)"),
    Case("resnet18", resnet18, [("every residual block, by hand", resnet_every_block),
                                ("stem + every residual block, by hand", resnet_stem_and_every_block)],
         "tests/zoo_models.py ResNet-18 (torchvision's code, width 8, BatchNorm): batch 4 x 3 x 64 x 64,"
         " cross-entropy"),
    Case("vgg11", vgg11, [("every conv + ReLU (+ pool) unit, by hand", vgg_every_unit)],
         "tests/zoo_models.py VGG-11 (torchvision's code, channels / 8, classifier dropout off): batch 4 x 3 x 64"
         " x 64, cross-entropy"),
]}


# ---- measuring ---------------------------------------------------------------------------------------------------

def _tensors(inputs: dict[str, Any]) -> list[torch.Tensor]:
    return [t for t in inputs.values() if isinstance(t, torch.Tensor)]


def step_of(model: nn.Module, inputs: dict[str, Any], loss_fn: Callable[[Any], torch.Tensor]) -> Callable[[], Any]:
    """One training step, the output held through backward; returns the output."""
    def step() -> Any:
        out = model(**inputs)
        loss_fn(out).backward()
        return out

    return step


def zero_grads(model: nn.Module) -> None:
    model.zero_grad(set_to_none=False)


class MemTrackerRefuses(Exception):
    """MemTracker hooks every parameter: it refuses a frozen one."""


def peak_bytes(model: nn.Module, inputs: dict[str, Any], loss_fn: Callable[[Any], torch.Tensor], by: str,
               steps: int = 2) -> int:
    """The step's peak after a warm-up (gradients allocated, zeroed before each step): MemTracker, one tracker per
    step, the largest of ``steps`` steps; or ``remat.measure``."""
    from torch.distributed._tools.mem_tracker import MemTracker

    step = step_of(model, inputs, loss_fn)
    zero_grads(model)
    del_out = step()
    del del_out
    if by == "remat.measure":
        return remat.measure(step, model=model, inputs=_tensors(inputs), warmup=0, repeats=0).peak_bytes
    peaks = []
    for _ in range(steps):
        zero_grads(model)
        ref = MemTracker()
        try:
            ref.track_external(model, *_tensors(inputs))
            with ref:
                out = step()
                del out
        except RuntimeError as e:
            if "doesn't require gradient" in str(e):
                raise MemTrackerRefuses(str(e)) from None
            raise
        peaks.append(int(ref.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]))
    return max(peaks)


def grads_of(model: nn.Module, inputs: dict[str, Any], loss_fn: Callable[[Any], torch.Tensor]
             ) -> dict[str, torch.Tensor | None]:
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(0)
    out = step_of(model, inputs, loss_fn)()
    del out
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}


def grads_equal(a: dict[str, torch.Tensor | None], b: dict[str, torch.Tensor | None]) -> tuple[bool, str]:
    """Whether every parameter's gradient is bitwise equal (``torch.equal``; None only with None)."""
    differ = [n for n in a if not ((a[n] is None and b.get(n) is None)
                                   or (a[n] is not None and b.get(n) is not None and torch.equal(a[n], b[n])))]
    if a.keys() != b.keys():
        differ.append("(parameter names differ)")
    return not differ, f"{len(differ)} of {len(a)} differ ({', '.join(differ[:2])})" if differ else f"{len(a)} equal"


@dataclass
class Timing:
    ratio: float  # the median of the per-round ratios remat / peer
    q1: float
    q3: float
    lo: float
    hi: float
    remat_s: float  # medians of each
    peer_s: float

    def cell(self) -> str:
        return (f"{self.ratio:.3f} (IQR {self.q1:.3f}-{self.q3:.3f}, range {self.lo:.3f}-{self.hi:.3f});"
                f" {1e3 * self.remat_s:.1f} vs {1e3 * self.peer_s:.1f} ms")


def time_side_by_side(a: Callable[[], Any], b: Callable[[], Any], models: tuple[nn.Module, nn.Module],
                      rounds: int) -> Timing:
    """Rounds of one timed step of each (A B, then B A, ...), each after an untimed step of the same variant."""
    times: tuple[list[float], list[float]] = ([], [])
    for r in range(rounds):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for k in order:
            step, model = (a, b)[k], models[k]
            zero_grads(model)
            out = step()
            del out
            zero_grads(model)
            t0 = time.perf_counter()
            out = step()
            times[k].append(time.perf_counter() - t0)
            del out
    ratios = sorted(x / y for x, y in zip(*times))
    q = statistics.quantiles(ratios, n=4, method="inclusive")
    return Timing(statistics.median(ratios), q[0], q[2], ratios[0], ratios[-1], statistics.median(times[0]),
                  statistics.median(times[1]))


def least_feasible(model: nn.Module, inputs: dict[str, Any], loss_fn: Callable[[Any], torch.Tensor],
                   **options: Any) -> int:
    """remat's least feasible peak for the step: the smallest peak of any plan remat makes from the model's
    profile (sizes measured on the device where the step without checkpointing fits, as here), as
    ``remat plan`` and ``remat.frontier`` report it; ``options`` go to ``remat.profile``. (Asked for 1 byte,
    ``remat.auto`` names a figure at or above it: it runs nothing on the device above the budget, so it sizes
    the step on a fake copy alone.)"""
    return min_feasible_peak(remat.profile(model, inputs, loss_fn=loss_fn, **options))


def plan_summary(model: nn.Module) -> str:
    plan = remat.plan_of(model)
    regions = list(plan.regions())
    return f"{len(regions)} regions, predicted {plan.prediction.peak_bytes:,} B, +{100 * plan.prediction.overhead:.0f}%"


def planned_at(model: nn.Module, inputs: dict[str, Any], budget: int, loss_fn: Callable[[Any], torch.Tensor], *,
               verify: bool | str, **options: Any) -> tuple[nn.Module, str]:
    """``remat.auto`` at ``budget`` as a user calls it; where its own check refuses the plan (VerificationError),
    the same plan applied unchecked, so that the table shows by how much it is over: (model, what was refused)."""
    try:
        return remat.auto(model, inputs, budget=budget, loss_fn=loss_fn, verify=verify, **options), ""
    except remat.VerificationError as e:
        remat.auto(model, inputs, budget=budget, loss_fn=loss_fn, verify=False, **options)
        if "over the budget" not in str(e):
            return model, f"**{short(e)}; unchecked:** "
        own = remat.measure(step_of(model, inputs, loss_fn), model=model, inputs=_tensors(inputs), repeats=0)
        return model, f"**VerificationError: remat.measure {own.peak_bytes:,} B, over; unchecked,** MemTracker "


def over(measured: int, budget: int, own: Callable[[], int] | None = None) -> str:
    """Nothing within the budget; else by how much, and remat.measure's figure (``own``) beside: MemTracker's module
    hooks can keep a tensor alive under recomputation (benchmarks/memtracker_effect.py)."""
    if measured <= budget:
        return ""
    return f" **OVER by {measured - budget:,} B**" + (f" (remat.measure {own():,} B)" if own is not None else "")


# ---- one model ---------------------------------------------------------------------------------------------------

@dataclass
class Row:
    model: str
    plain: str = ""
    peer: str = ""
    peer_peak: str = ""
    least: str = ""
    at_least: str = ""
    at_peer: str = ""
    grads: str = ""
    time: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (where, the traceback's essence)
    notes: list[str] = field(default_factory=list)


def short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:110]}{'...' if len(text) > 110 else ''}"


def essence(e: BaseException) -> str:
    """The last frames of a traceback (file:line in function) and the error, a few lines."""
    frames = traceback.extract_tb(e.__traceback__)[-4:]
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}\n    at {where}"


def share(n: int, plain: int | None) -> str:
    return f"{n:,} B ({100 * n / plain:.1f}%)" if plain else f"{n:,} B"


@dataclass
class Run:
    """One model's measurements: the model as built, its inputs and loss, how peaks are measured, the plain
    step's peak and gradients; errors go to the report."""

    case: Case
    report: Report
    base: nn.Module
    inputs: dict[str, Any]
    loss_fn: Callable[[Any], torch.Tensor]
    by: str = "MemTracker"
    plain: int = 0
    reference: dict[str, torch.Tensor | None] = field(default_factory=dict)

    def fresh(self) -> nn.Module:
        return copy.deepcopy(self.base)

    def peak(self, model: nn.Module) -> int:
        return peak_bytes(model, self.inputs, self.loss_fn, self.by)

    def own(self, model: nn.Module) -> Callable[[], int] | None:
        """remat.measure's peak of ``model``'s step, to read beside MemTracker's (None: already remat.measure's)."""
        if self.by == "remat.measure":
            return None
        return lambda: peak_bytes(model, self.inputs, self.loss_fn, "remat.measure")

    def attempt(self, where: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as e:  # a cell says what failed; the table goes on
            self.report.errors.append((f"{self.case.name}: {where}", essence(e)))
            return e

    def measure_plain(self) -> None:
        model = self.fresh()
        try:
            self.plain = self.peak(model)
        except MemTrackerRefuses as e:
            self.by = "remat.measure"
            self.report.notes.append(f"{self.case.name}: measured by remat.measure for every column: MemTracker"
                                     f" refuses it ({e})")
            self.plain = self.peak(model)
        self.reference = grads_of(model, self.inputs, self.loss_fn)

    def at_least(self, least: int) -> str:
        """``remat.auto`` at the least, with sizes measured on the device as the profile that named it had them
        (``sizes="measured"``: a byte budget below the plain peak is otherwise sized on a fake copy, which may
        keep more, e.g. the 4-D attention mask a transformers model skips on the device, and refuses it)."""
        model, refused = planned_at(self.fresh(), self.inputs, least, self.loss_fn, verify=True, sizes="measured")
        measured = self.peak(model)
        beside = None if refused else self.own(model)
        return f"{refused}{share(measured, self.plain)}{over(measured, least, beside)}; {plan_summary(model)}"

    def peer(self, row: Row, enable: Callable[[nn.Module], None], least: int | Exception, timing: bool,
             rounds: int) -> None:
        """The peer's peak; remat at it: peak, gradients and time side by side."""
        peer_model = self.fresh()

        def peer_peak_of() -> int:
            enable(peer_model)
            return self.peak(peer_model)

        peer_peak = self.attempt(f"peer {row.peer}", peer_peak_of)
        if isinstance(peer_peak, Exception):
            row.peer_peak = short(peer_peak)
            return
        row.peer_peak = share(peer_peak, self.plain)
        if not isinstance(least, Exception):
            row.peer_peak += " — remat's least is " + ("≤ it" if least <= peer_peak else "**above it**")
        try:
            planned, refused = planned_at(self.fresh(), self.inputs, peer_peak, self.loss_fn, verify="grads")
        except remat.InfeasibleBudgetError as e:
            named = e.min_feasible_bytes
            row.at_peer = f"infeasible (least {named:,} B)" if named is not None else "infeasible"
            return
        except Exception as e:
            self.report.errors.append((f"{self.case.name}: remat.auto at {row.peer}'s peak", essence(e)))
            row.at_peer = short(e)
            return
        measured = self.attempt("remat at the peer's peak, measured", lambda: self.peak(planned))
        if isinstance(measured, Exception):
            row.at_peer = short(measured)
            return
        beside = None if refused else self.own(planned)
        row.at_peer = (f"{refused}{share(measured, self.plain)}{over(measured, peer_peak, beside)};"
                       f" {plan_summary(planned)}")
        same = self.attempt("gradients", lambda: grads_equal(grads_of(planned, self.inputs, self.loss_fn),
                                                             self.reference))
        row.grads = short(same) if isinstance(same, Exception) else ("bitwise equal" if same[0] else f"**{same[1]}**")
        if timing:
            t = self.attempt("timing", lambda: time_side_by_side(step_of(planned, self.inputs, self.loss_fn),
                                                                 step_of(peer_model, self.inputs, self.loss_fn),
                                                                 (planned, peer_model), rounds))
            row.time = short(t) if isinstance(t, Exception) else t.cell()


def run_case(case: Case, *, timing: bool, rounds: int, report: Report) -> None:
    run = Run(case, report, *case.build())
    run.measure_plain()
    label = case.name if run.by == "MemTracker" else f"{case.name} (remat.measure)"
    least = run.attempt("least feasible peak", lambda: least_feasible(run.fresh(), run.inputs, run.loss_fn))
    least_cell = short(least) if isinstance(least, Exception) else share(least, run.plain)
    at_least_cell = ""
    if not isinstance(least, Exception):
        got = run.attempt("remat.auto at its least", lambda: run.at_least(least))
        at_least_cell = short(got) if isinstance(got, Exception) else got
    for peer_label, enable in case.peers:
        row = Row(label, share(run.plain, None), peer_label, least=least_cell, at_least=at_least_cell)
        report.rows.append(row)
        run.peer(row, enable, least, timing, rounds)


HEADER = ("| model | no checkpointing | the framework's own checkpointing | its peak | remat's least feasible peak"
          " (predicted) | remat at its least (measured) | remat at the peer's peak (measured) | gradients vs plain"
          " | step time remat / peer (median of per-round ratios) |\n|---|---|---|---|---|---|---|---|---|")


def line(r: Row) -> str:
    return (f"| {r.model} | {r.plain} | {r.peer} | {r.peer_peak} | {r.least} | {r.at_least} | {r.at_peer} |"
            f" {r.grads} | {r.time} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    ap.add_argument("--quick", action="store_true", help="no timing")
    ap.add_argument("--rounds", type=int, default=9, help="timed rounds of each (default 9)")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    torch.set_num_threads(1)
    import logging

    logging.getLogger("remat").setLevel(logging.ERROR)
    report = Report()
    t0 = time.perf_counter()
    print(HEADER, flush=True)
    for name in names:
        case = CASES[name]
        start = len(report.rows)
        tc = time.perf_counter()
        try:
            run_case(case, timing=not args.quick, rounds=args.rounds, report=report)
        except Exception as e:
            report.errors.append((f"{name}: building or the plain step", essence(e)))
            report.rows.append(Row(name, short(e)))
        for r in report.rows[start:]:
            print(line(r), flush=True)
        print(f"<!-- {name}: {time.perf_counter() - tc:.0f} s -->", flush=True)
    print("\nPercentages are of the no-checkpointing peak. Models:")
    for name in names:
        print(f"- {name}: {CASES[name].text}")
    for note in report.notes:
        print(f"- {note}")
    if report.errors:
        print("\nErrors (the traceback's essence, innermost frame first):")
        for where, what in report.errors:
            print(f"- {where}: {what}")
    print(f"\n({time.perf_counter() - t0:.0f} s; torch {torch.__version__}, one intra-op thread"
          f"{'' if args.quick else f', {args.rounds} rounds'})")


if __name__ == "__main__":
    main()
