"""The acceptance zoo: architectures written the way people write them, each at unit-test size.

Every builder returns ``(model, example_inputs, loss_fn)`` with a fixed seed, the model in training mode
(dropout, stochastic depth and LayerDrop active where the architecture has them). The CNNs follow
torchvision's code structure (written out here: torchvision is not imported); the transformers models
are built from configs with random weights.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Built = tuple[nn.Module, Any, Callable[[Any], Tensor]]

NUM_CLASSES = 10


def _images(batch: int = 4, size: int = 32) -> tuple[Tensor, Callable[[Any], Tensor]]:
    x = torch.randn(batch, 3, size, size)
    target = torch.randint(0, NUM_CLASSES, (batch,))

    def loss_fn(out: Tensor) -> Tensor:
        return F.cross_entropy(out, target)

    return x, loss_fn


def _hf_loss(out: Any) -> Tensor:
    return out.loss


# ----------------------------------------------------------------------------------------------------
# torchvision-structured CNNs
# ----------------------------------------------------------------------------------------------------


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups,
                     bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)
        out = self.conv3(out)
        out = self.bn3(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], num_classes: int = NUM_CLASSES,
                 width: int = 8) -> None:
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int,
                    stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes))
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x


def resnet18() -> Built:
    torch.manual_seed(0)
    model = ResNet(BasicBlock, [2, 2, 2, 2], width=8)
    return model.train(), *_images()


def resnet50() -> Built:
    torch.manual_seed(0)
    model = ResNet(Bottleneck, [2, 2, 2, 1], width=8)
    return model.train(), *_images()


class VGG(nn.Module):
    def __init__(self, features: nn.Module, num_classes: int = NUM_CLASSES, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(
            nn.Linear(64 * 2 * 2, 64),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(64, 64),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


def make_vgg_layers(cfg: list[str | int], batch_norm: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_channels = 3
    for v in cfg:
        if v == "M":
            layers += [nn.MaxPool2d(kernel_size=2, stride=2)]
        else:
            assert isinstance(v, int)
            conv2d = nn.Conv2d(in_channels, v, kernel_size=3, padding=1)
            if batch_norm:
                layers += [conv2d, nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            else:
                layers += [conv2d, nn.ReLU(inplace=True)]
            in_channels = v
    return nn.Sequential(*layers)


def vgg11() -> Built:
    torch.manual_seed(0)
    model = VGG(make_vgg_layers([8, "M", 16, "M", 32, 32, "M", 64, 64, "M"]))
    return model.train(), *_images()


class _DenseLayer(nn.Module):
    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = float(drop_rate)

    def bn_function(self, inputs: list[Tensor]) -> Tensor:
        concated_features = torch.cat(inputs, 1)
        bottleneck_output = self.conv1(self.relu1(self.norm1(concated_features)))
        return bottleneck_output

    def forward(self, input: Tensor | list[Tensor]) -> Tensor:
        prev_features = [input] if isinstance(input, Tensor) else input
        bottleneck_output = self.bn_function(prev_features)
        new_features = self.conv2(self.relu2(self.norm2(bottleneck_output)))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class _DenseBlock(nn.ModuleDict):
    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
                 drop_rate: float) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate=growth_rate, bn_size=bn_size,
                                drop_rate=drop_rate)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, init_features: Tensor) -> Tensor:
        features = [init_features]
        for _name, layer in self.items():
            new_features = layer(features)
            features.append(new_features)
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    def __init__(self, growth_rate: int = 8, block_config: tuple[int, ...] = (2, 3, 2), num_init_features: int = 16,
                 bn_size: int = 2, drop_rate: float = 0.1, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
            ("norm0", nn.BatchNorm2d(num_init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        ]))
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(num_layers=num_layers, num_input_features=num_features, bn_size=bn_size,
                                growth_rate=growth_rate, drop_rate=drop_rate)
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                trans = _Transition(num_input_features=num_features, num_output_features=num_features // 2)
                self.features.add_module(f"transition{i + 1}", trans)
                num_features = num_features // 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        features = self.features(x)
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        out = self.classifier(out)
        return out


def densenet() -> Built:
    torch.manual_seed(0)
    return DenseNet().train(), *_images()


def _make_divisible(v: float, divisor: int, min_value: int | None = None) -> int:
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class Conv2dNormActivation(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int | None = None, groups: int = 1,
                 norm_layer: Callable[..., nn.Module] | None = nn.BatchNorm2d,
                 activation_layer: Callable[..., nn.Module] | None = nn.ReLU, bias: bool | None = None) -> None:
        if padding is None:
            padding = (kernel_size - 1) // 2
        if bias is None:
            bias = norm_layer is None
        layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                                             groups=groups, bias=bias)]
        if norm_layer is not None:
            layers.append(norm_layer(out_channels))
        if activation_layer is not None:
            layers.append(activation_layer(inplace=True))
        super().__init__(*layers)
        self.out_channels = out_channels


class InvertedResidualV2(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        self.stride = stride
        hidden_dim = round(inp * expand_ratio)
        self.use_res_connect = self.stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(inp, hidden_dim, kernel_size=1, activation_layer=nn.ReLU6))
        layers.extend([
            Conv2dNormActivation(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim,
                                 activation_layer=nn.ReLU6),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ])
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES, dropout: float = 0.2) -> None:
        super().__init__()
        input_channel, last_channel = 8, 64
        # t, c, n, s
        setting = [[1, 8, 1, 1], [6, 12, 2, 2], [6, 16, 2, 2], [6, 24, 2, 1]]
        features: list[nn.Module] = [Conv2dNormActivation(3, input_channel, stride=2, activation_layer=nn.ReLU6)]
        for t, c, n, s in setting:
            for i in range(n):
                features.append(InvertedResidualV2(input_channel, c, s if i == 0 else 1, expand_ratio=t))
                input_channel = c
        features.append(Conv2dNormActivation(input_channel, last_channel, kernel_size=1, activation_layer=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(last_channel, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


def mobilenet_v2() -> Built:
    torch.manual_seed(0)
    return MobileNetV2().train(), *_images()


class SqueezeExcitation(nn.Module):
    def __init__(self, input_channels: int, squeeze_channels: int,
                 activation: Callable[..., nn.Module] = nn.ReLU,
                 scale_activation: Callable[..., nn.Module] = nn.Sigmoid) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def _scale(self, input: Tensor) -> Tensor:
        scale = self.avgpool(input)
        scale = self.fc1(scale)
        scale = self.activation(scale)
        scale = self.fc2(scale)
        return self.scale_activation(scale)

    def forward(self, input: Tensor) -> Tensor:
        scale = self._scale(input)
        return scale * input


class InvertedResidualV3(nn.Module):
    def __init__(self, cin: int, kernel: int, expanded: int, cout: int, use_se: bool, use_hs: bool,
                 stride: int) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        activation_layer = nn.Hardswish if use_hs else nn.ReLU
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(Conv2dNormActivation(cin, expanded, kernel_size=1, activation_layer=activation_layer))
        layers.append(Conv2dNormActivation(expanded, expanded, kernel_size=kernel, stride=stride, groups=expanded,
                                           activation_layer=activation_layer))
        if use_se:
            squeeze_channels = _make_divisible(expanded // 4, 8)
            layers.append(SqueezeExcitation(expanded, squeeze_channels, scale_activation=nn.Hardsigmoid))
        layers.append(Conv2dNormActivation(expanded, cout, kernel_size=1, activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.out_channels = cout

    def forward(self, input: Tensor) -> Tensor:
        result = self.block(input)
        if self.use_res_connect:
            result += input
        return result


class MobileNetV3(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES, dropout: float = 0.2) -> None:
        super().__init__()
        # cin, kernel, expanded, cout, use_se, use_hs, stride
        setting = [
            (8, 3, 8, 8, True, False, 2),
            (8, 3, 32, 16, False, False, 2),
            (16, 3, 48, 16, False, False, 1),
            (16, 5, 64, 24, True, True, 2),
            (24, 5, 96, 24, True, True, 1),
        ]
        layers: list[nn.Module] = [Conv2dNormActivation(3, 8, kernel_size=3, stride=2,
                                                        activation_layer=nn.Hardswish)]
        for cfg in setting:
            layers.append(InvertedResidualV3(*cfg))
        lastconv_output_channels = 6 * 24
        layers.append(Conv2dNormActivation(24, lastconv_output_channels, kernel_size=1,
                                           activation_layer=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(lastconv_output_channels, 64),
            nn.Hardswish(inplace=True),
            nn.Dropout(p=dropout, inplace=True),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


def mobilenet_v3() -> Built:
    torch.manual_seed(0)
    return MobileNetV3().train(), *_images()


def stochastic_depth(input: Tensor, p: float, mode: str, training: bool = True) -> Tensor:
    if not training or p == 0.0:
        return input
    survival_rate = 1.0 - p
    if mode == "row":
        size = [input.shape[0]] + [1] * (input.ndim - 1)
    else:
        size = [1] * input.ndim
    noise = torch.empty(size, dtype=input.dtype, device=input.device)
    noise = noise.bernoulli_(survival_rate)
    if survival_rate > 0.0:
        noise.div_(survival_rate)
    return input * noise


class StochasticDepth(nn.Module):
    def __init__(self, p: float, mode: str) -> None:
        super().__init__()
        self.p = p
        self.mode = mode

    def forward(self, input: Tensor) -> Tensor:
        return stochastic_depth(input, self.p, self.mode, self.training)


class MBConv(nn.Module):
    def __init__(self, cin: int, expand_ratio: float, kernel: int, stride: int, cout: int,
                 stochastic_depth_prob: float) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        activation_layer = nn.SiLU
        expanded_channels = _make_divisible(cin * expand_ratio, 8)
        if expanded_channels != cin:
            layers.append(Conv2dNormActivation(cin, expanded_channels, kernel_size=1,
                                               activation_layer=activation_layer))
        layers.append(Conv2dNormActivation(expanded_channels, expanded_channels, kernel_size=kernel, stride=stride,
                                           groups=expanded_channels, activation_layer=activation_layer))
        squeeze_channels = max(1, cin // 4)
        layers.append(SqueezeExcitation(expanded_channels, squeeze_channels,
                                        activation=partial(nn.SiLU, inplace=True)))
        layers.append(Conv2dNormActivation(expanded_channels, cout, kernel_size=1, activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, "row")
        self.out_channels = cout

    def forward(self, input: Tensor) -> Tensor:
        result = self.block(input)
        if self.use_res_connect:
            result = self.stochastic_depth(result)
            result += input
        return result


class EfficientNet(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES, dropout: float = 0.2,
                 stochastic_depth_prob: float = 0.3) -> None:
        super().__init__()
        # expand_ratio, kernel, stride, cin, cout, num_layers
        setting = [(1, 3, 1, 8, 8, 1), (4, 3, 2, 8, 16, 2), (4, 5, 2, 16, 24, 2), (4, 3, 2, 24, 32, 2)]
        layers: list[nn.Module] = [Conv2dNormActivation(3, 8, kernel_size=3, stride=2, activation_layer=nn.SiLU)]
        total_stage_blocks = sum(s[-1] for s in setting)
        stage_block_id = 0
        for expand_ratio, kernel, stride, cin, cout, num_layers in setting:
            stage: list[nn.Module] = []
            for i in range(num_layers):
                sd_prob = stochastic_depth_prob * float(stage_block_id) / total_stage_blocks
                stage.append(MBConv(cin if i == 0 else cout, expand_ratio, kernel, stride if i == 0 else 1, cout,
                                    sd_prob))
                stage_block_id += 1
            layers.append(nn.Sequential(*stage))
        lastconv_output_channels = 4 * 32
        layers.append(Conv2dNormActivation(32, lastconv_output_channels, kernel_size=1, activation_layer=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout, inplace=True),
                                        nn.Linear(lastconv_output_channels, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


def efficientnet() -> Built:
    torch.manual_seed(0)
    return EfficientNet().train(), *_images()


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        x = x.permute(0, 3, 1, 2)
        return x


class Permute(nn.Module):
    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return torch.permute(x, self.dims)


class CNBlock(nn.Module):
    def __init__(self, dim: int, layer_scale: float, stochastic_depth_prob: float) -> None:
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, bias=True),
            Permute([0, 2, 3, 1]),
            norm_layer(dim),
            nn.Linear(in_features=dim, out_features=4 * dim, bias=True),
            nn.GELU(),
            nn.Linear(in_features=4 * dim, out_features=dim, bias=True),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob, "row")

    def forward(self, input: Tensor) -> Tensor:
        result = self.layer_scale * self.block(input)
        result = self.stochastic_depth(result)
        result += input
        return result


class ConvNeXt(nn.Module):
    def __init__(self, dims: tuple[int, ...] = (8, 16, 32, 64), depths: tuple[int, ...] = (1, 2, 2, 1),
                 stochastic_depth_prob: float = 0.2, layer_scale: float = 1e-6,
                 num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        norm_layer = partial(LayerNorm2d, eps=1e-6)
        layers: list[nn.Module] = [Conv2dNormActivation(3, dims[0], kernel_size=4, stride=4, padding=0,
                                                        norm_layer=norm_layer, activation_layer=None, bias=True)]
        total_stage_blocks = sum(depths)
        stage_block_id = 0
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            stage: list[nn.Module] = []
            for _ in range(depth):
                sd_prob = stochastic_depth_prob * stage_block_id / (total_stage_blocks - 1.0)
                stage.append(CNBlock(dim, layer_scale, sd_prob))
                stage_block_id += 1
            layers.append(nn.Sequential(*stage))
            if i + 1 < len(dims):
                layers.append(nn.Sequential(norm_layer(dim), nn.Conv2d(dim, dims[i + 1], kernel_size=2, stride=2)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(norm_layer(dims[-1]), nn.Flatten(1), nn.Linear(dims[-1], num_classes))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = self.classifier(x)
        return x


def convnext() -> Built:
    torch.manual_seed(0)
    return ConvNeXt().train(), *_images()


def plain_sequential_cnn() -> Built:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.1),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Dropout(0.1),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, NUM_CLASSES),
    )
    return model.train(), *_images()


# ----------------------------------------------------------------------------------------------------
# Vision transformers written out
# ----------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int = 32, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 32) -> None:
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        return self.proj_drop(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop: float = 0.1) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, attn_drop=drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class VisionTransformer(nn.Module):
    def __init__(self, img_size: int = 32, patch_size: int = 4, embed_dim: int = 32, depth: int = 3,
                 num_heads: int = 4, drop: float = 0.1, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, self.patch_embed.num_patches + 1, embed_dim) * 0.02)
        self.pos_drop = nn.Dropout(drop)
        self.blocks = nn.ModuleList([ViTBlock(embed_dim, num_heads, drop=drop) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        cls_token = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls_token, x), dim=1)
        x = x + self.pos_embed
        x = self.pos_drop(x)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return self.head(x[:, 0])


def vit() -> Built:
    torch.manual_seed(0)
    return VisionTransformer().train(), *_images()


def window_partition(x: Tensor, window_size: int) -> Tensor:
    B, H, W, C = x.shape
    x = x.view(B, H // window_size, window_size, W // window_size, window_size, C)
    windows = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, C)
    return windows


def window_reverse(windows: Tensor, window_size: int, H: int, W: int) -> Tensor:
    B = int(windows.shape[0] / (H * W / window_size / window_size))
    x = windows.view(B, H // window_size, W // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(B, H, W, -1)
    return x


class WindowAttention(nn.Module):
    def __init__(self, dim: int, window_size: int, num_heads: int, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij"))
        coords_flatten = torch.flatten(coords, 1)
        relative_coords = (coords_flatten[:, :, None] - coords_flatten[:, None, :]).permute(1, 2, 0).contiguous()
        relative_coords[:, :, 0] += window_size - 1
        relative_coords[:, :, 1] += window_size - 1
        relative_coords[:, :, 0] *= 2 * window_size - 1
        self.register_buffer("relative_position_index", relative_coords.sum(-1))
        self.qkv = nn.Linear(dim, dim * 3)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(N, N, -1)
        attn = attn + bias.permute(2, 0, 1).contiguous().unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(B_ // nW, nW, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = attn.softmax(dim=-1)
        attn = self.attn_drop(attn)
        x = (attn @ v).transpose(1, 2).reshape(B_, N, C)
        x = self.proj(x)
        return self.proj_drop(x)


class SwinTransformerBlock(nn.Module):
    def __init__(self, dim: int, input_resolution: tuple[int, int], num_heads: int, window_size: int = 4,
                 shift_size: int = 0, drop: float = 0.1, drop_path: float = 0.0) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.window_size = window_size
        self.shift_size = shift_size
        if min(input_resolution) <= window_size:
            self.shift_size = 0
            self.window_size = min(input_resolution)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, self.window_size, num_heads, attn_drop=drop, proj_drop=drop)
        self.drop_path = StochasticDepth(drop_path, "row")
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim, drop)
        if self.shift_size > 0:
            H, W = input_resolution
            img_mask = torch.zeros((1, H, W, 1))
            cnt = 0
            slices = (slice(0, -self.window_size), slice(-self.window_size, -self.shift_size),
                      slice(-self.shift_size, None))
            for h in slices:
                for w in slices:
                    img_mask[:, h, w, :] = cnt
                    cnt += 1
            mask_windows = window_partition(img_mask, self.window_size).view(-1, self.window_size ** 2)
            attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
            attn_mask = attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)
        else:
            attn_mask = None
        self.register_buffer("attn_mask", attn_mask)

    def forward(self, x: Tensor) -> Tensor:
        H, W = self.input_resolution
        B, _L, C = x.shape
        shortcut = x
        x = self.norm1(x)
        x = x.view(B, H, W, C)
        if self.shift_size > 0:
            shifted_x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        else:
            shifted_x = x
        x_windows = window_partition(shifted_x, self.window_size).view(-1, self.window_size * self.window_size, C)
        attn_windows = self.attn(x_windows, mask=self.attn_mask)
        attn_windows = attn_windows.view(-1, self.window_size, self.window_size, C)
        shifted_x = window_reverse(attn_windows, self.window_size, H, W)
        if self.shift_size > 0:
            x = torch.roll(shifted_x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        else:
            x = shifted_x
        x = x.view(B, H * W, C)
        x = shortcut + self.drop_path(x)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class PatchMerging(nn.Module):
    def __init__(self, input_resolution: tuple[int, int], dim: int) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        H, W = self.input_resolution
        B, _L, C = x.shape
        x = x.view(B, H, W, C)
        x0 = x[:, 0::2, 0::2, :]
        x1 = x[:, 1::2, 0::2, :]
        x2 = x[:, 0::2, 1::2, :]
        x3 = x[:, 1::2, 1::2, :]
        x = torch.cat([x0, x1, x2, x3], -1).view(B, -1, 4 * C)
        x = self.norm(x)
        return self.reduction(x)


class BasicLayer(nn.Module):
    def __init__(self, dim: int, input_resolution: tuple[int, int], depth: int, num_heads: int, window_size: int,
                 drop_path: list[float], downsample: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([
            SwinTransformerBlock(dim, input_resolution, num_heads, window_size,
                                 shift_size=0 if i % 2 == 0 else window_size // 2, drop_path=drop_path[i])
            for i in range(depth)
        ])
        self.downsample = PatchMerging(input_resolution, dim) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.blocks:
            x = blk(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class SwinTransformer(nn.Module):
    def __init__(self, img_size: int = 32, patch_size: int = 4, embed_dim: int = 32, depths: tuple[int, ...] = (2, 2),
                 num_heads: tuple[int, ...] = (2, 4), window_size: int = 4, drop_path_rate: float = 0.2,
                 num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        self.patch_norm = nn.LayerNorm(embed_dim)
        self.pos_drop = nn.Dropout(0.1)
        res = img_size // patch_size
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths))]
        self.layers = nn.ModuleList()
        for i, depth in enumerate(depths):
            dim = embed_dim * 2 ** i
            r = res // 2 ** i
            self.layers.append(BasicLayer(dim, (r, r), depth, num_heads[i], window_size,
                                          dpr[sum(depths[:i]):sum(depths[:i + 1])], downsample=i + 1 < len(depths)))
        self.num_features = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(self.num_features)
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(self.num_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_norm(self.patch_embed(x))
        x = self.pos_drop(x)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x)
        x = self.avgpool(x.transpose(1, 2))
        x = torch.flatten(x, 1)
        return self.head(x)


def swin() -> Built:
    torch.manual_seed(0)
    return SwinTransformer().train(), *_images()


# ----------------------------------------------------------------------------------------------------
# transformers models from configs (random weights)
# ----------------------------------------------------------------------------------------------------


def _transformers() -> Any:
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def _lm_inputs(batch: int = 2, seq: int = 32, vocab: int = 256) -> dict[str, Tensor]:
    ids = torch.randint(0, vocab, (batch, seq))
    return {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long), "labels": ids}


def gpt2() -> Built:
    tf = _transformers()
    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_layer=3, n_embd=64, n_head=4, vocab_size=256, n_positions=64, resid_pdrop=0.1,
                        embd_pdrop=0.1, attn_pdrop=0.1)
    model = tf.GPT2LMHeadModel(cfg)
    return model.train(), {**_lm_inputs(), "use_cache": False}, _hf_loss


def llama() -> Built:
    tf = _transformers()
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=64, attention_dropout=0.1)
    model = tf.LlamaForCausalLM(cfg)
    return model.train(), {**_lm_inputs(), "use_cache": False}, _hf_loss


def bert() -> Built:
    tf = _transformers()
    torch.manual_seed(0)
    cfg = tf.BertConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                        vocab_size=256, max_position_embeddings=64)
    model = tf.BertForMaskedLM(cfg)
    inputs = _lm_inputs()
    labels = inputs["labels"].clone()
    labels[torch.rand(labels.shape) > 0.15] = -100
    labels[:, 0] = inputs["input_ids"][:, 0]  # at least one labelled token per row
    inputs["labels"] = labels
    return model.train(), inputs, _hf_loss


def t5() -> Built:
    """The filed case: T5 with an encoder and a decoder of three blocks each."""
    tf = _transformers()
    torch.manual_seed(0)
    cfg = tf.T5Config(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=3, num_decoder_layers=3,
                      num_heads=4, dropout_rate=0.0, decoder_start_token_id=0)
    model = tf.T5ForConditionalGeneration(cfg)
    ids = torch.randint(1, 256, (2, 48))
    labels = torch.randint(1, 256, (2, 32))
    inputs = {"input_ids": ids, "attention_mask": torch.ones(2, 48, dtype=torch.long), "labels": labels,
              "use_cache": False}
    return model.train(), inputs, _hf_loss


def bart() -> Built:
    tf = _transformers()
    torch.manual_seed(0)
    cfg = tf.BartConfig(vocab_size=256, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                        dropout=0.1, attention_dropout=0.1, activation_dropout=0.1)
    model = tf.BartForConditionalGeneration(cfg)
    ids = torch.randint(3, 256, (2, 32))
    labels = torch.randint(3, 256, (2, 24))
    inputs = {"input_ids": ids, "attention_mask": torch.ones(2, 32, dtype=torch.long), "labels": labels,
              "use_cache": False}
    return model.train(), inputs, _hf_loss


def whisper() -> Built:
    tf = _transformers()
    torch.manual_seed(0)
    cfg = tf.WhisperConfig(vocab_size=256, num_mel_bins=16, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                           decoder_ffn_dim=64, d_model=32, max_source_positions=16, max_target_positions=32,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3,
                           dropout=0.1, attention_dropout=0.1, activation_dropout=0.1,
                           begin_suppress_tokens=None, suppress_tokens=None)
    model = tf.WhisperForConditionalGeneration(cfg)
    features = torch.randn(2, 16, 32)  # (batch, mel bins, 2 * max_source_positions)
    labels = torch.randint(4, 256, (2, 16))
    return model.train(), {"input_features": features, "labels": labels, "use_cache": False}, _hf_loss


def wav2vec2() -> Built:
    """CTC fine-tuning with LayerDrop: a random draw before each encoder block decides whether it runs."""
    tf = _transformers()
    torch.manual_seed(0)
    cfg = tf.Wav2Vec2Config(vocab_size=32, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                            intermediate_size=64, conv_dim=(16, 16, 16), conv_stride=(5, 4, 2),
                            conv_kernel=(10, 4, 2), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                            layerdrop=0.1, hidden_dropout=0.1, attention_dropout=0.1, activation_dropout=0.1,
                            feat_proj_dropout=0.1, mask_time_prob=0.05, mask_time_length=2,
                            ctc_loss_reduction="mean", ctc_zero_infinity=True, pad_token_id=0)
    model = tf.Wav2Vec2ForCTC(cfg)
    audio = torch.randn(2, 1600)
    labels = torch.randint(1, 32, (2, 8))
    return model.train(), {"input_values": audio, "labels": labels}, _hf_loss


def albert() -> Built:
    """One transformer layer shared by all three layer positions (ALBERT's cross-layer sharing)."""
    tf = _transformers()
    torch.manual_seed(0)
    cfg = tf.AlbertConfig(vocab_size=256, embedding_size=16, hidden_size=32, num_hidden_layers=3,
                          num_hidden_groups=1, num_attention_heads=4, intermediate_size=64,
                          max_position_embeddings=64, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    model = tf.AlbertForMaskedLM(cfg)
    return model.train(), _lm_inputs(), _hf_loss


def mixtral() -> Built:
    """Mixture of experts: routing depends on the data, and a load-balancing loss reads every layer's router."""
    tf = _transformers()
    torch.manual_seed(0)
    cfg = tf.MixtralConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           num_experts_per_tok=2, max_position_embeddings=64, output_router_logits=True,
                           router_aux_loss_coef=0.02, attention_dropout=0.1)
    model = tf.MixtralForCausalLM(cfg)
    return model.train(), {**_lm_inputs(), "use_cache": False}, _hf_loss


# ----------------------------------------------------------------------------------------------------
# Code between blocks
# ----------------------------------------------------------------------------------------------------


class MLPBlock(nn.Module):
    """Pre-norm residual MLP block."""

    def __init__(self, d: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(self.drop(self.act(self.fc1(self.norm(x)))))


class FeedForward(nn.Module):
    """``fc2(gelu(fc1(x)))`` without a residual: the parent adds it."""

    def __init__(self, d: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(F.gelu(self.fc1(x))))


def _vectors(batch: int = 8, d_in: int = 16, d_out: int = 4) -> tuple[Tensor, Callable[[Any], Tensor]]:
    x = torch.randn(batch, d_in)
    target = torch.randn(batch, d_out)

    def loss_fn(out: Tensor) -> Tensor:
        return F.mse_loss(out, target)

    return x, loss_fn


class InPlaceMulBetween(nn.Module):
    def __init__(self, d: int = 32, depth: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(16, d)
        self.blocks = nn.ModuleList([MLPBlock(d) for _ in range(depth)])
        self.out = nn.Linear(d, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for blk in self.blocks:
            h = blk(h)
            h.mul_(0.5)
        return self.out(h)


def inplace_mul_between_blocks() -> Built:
    torch.manual_seed(0)
    return InPlaceMulBetween().train(), *_vectors()


class InPlaceLeakyBetween(nn.Module):
    def __init__(self, d: int = 32, depth: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(16, d)
        self.blocks = nn.ModuleList([FeedForward(d) for _ in range(depth)])
        self.out = nn.Linear(d, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for blk in self.blocks:
            h = blk(h)
            F.leaky_relu_(h, 0.1)
        return self.out(h)


def inplace_leaky_relu_between_blocks() -> Built:
    torch.manual_seed(0)
    return InPlaceLeakyBetween().train(), *_vectors()


class ParentResidual(nn.Module):
    def __init__(self, d: int = 32, depth: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(16, d)
        self.norms = nn.ModuleList([nn.LayerNorm(d) for _ in range(depth)])
        self.blocks = nn.ModuleList([FeedForward(d) for _ in range(depth)])
        self.out = nn.Linear(d, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for norm, blk in zip(self.norms, self.blocks):
            h = h + blk(norm(h))
        return self.out(h)


def residual_in_parent() -> Built:
    torch.manual_seed(0)
    return ParentResidual().train(), *_vectors()


class AuxLossNet(nn.Module):
    """Deep supervision: a second head reads the hidden state after block 1."""

    def __init__(self, d: int = 32, depth: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(16, d)
        self.blocks = nn.ModuleList([MLPBlock(d) for _ in range(depth)])
        self.aux_head = nn.Linear(d, 4)
        self.out = nn.Linear(d, 4)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.inp(x)
        aux = None
        for i, blk in enumerate(self.blocks):
            h = blk(h)
            if i == 1:
                aux = self.aux_head(h)
        assert aux is not None
        return {"logits": self.out(h), "aux": aux}


def aux_loss_from_intermediate() -> Built:
    torch.manual_seed(0)
    x = torch.randn(8, 16)
    target = torch.randn(8, 4)

    def loss_fn(out: dict[str, Tensor]) -> Tensor:
        return F.mse_loss(out["logits"], target) + 0.3 * F.mse_loss(out["aux"], target)

    return AuxLossNet().train(), x, loss_fn


class LayerDropNet(nn.Module):
    """LayerDrop (Fan et al. 2019): in training each block is skipped with its own probability, drawn
    with ``torch.rand`` before the block."""

    def __init__(self, d: int = 32, depth: int = 4, layerdrop: tuple[float, ...] = (0.3, 0.3, 0.3, 0.3)) -> None:
        super().__init__()
        self.inp = nn.Linear(16, d)
        self.blocks = nn.ModuleList([MLPBlock(d) for _ in range(depth)])
        self.layerdrop = layerdrop
        self.out = nn.Linear(d, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for i, blk in enumerate(self.blocks):
            if self.training and torch.rand(()) < self.layerdrop[i]:
                continue
            h = blk(h)
        return self.out(h)


def layerdrop() -> Built:
    torch.manual_seed(0)
    return LayerDropNet().train(), *_vectors()


def layerdrop_skips_block1() -> Built:
    """Block 1 has drop probability 1: the draw always skips it at run time; the others always run."""
    torch.manual_seed(0)
    return LayerDropNet(layerdrop=(0.0, 1.0, 0.0, 0.0)).train(), *_vectors()


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 256, d: int = 32, depth: int = 4, seq: int = 32, tie: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        self.blocks = nn.ModuleList([ViTBlock(d, 4, mlp_ratio=2.0, drop=0.1) for _ in range(depth)])
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids: Tensor) -> Tensor:
        h = self.embed(ids) + self.pos[: ids.shape[1]]
        for blk in self.blocks:
            h = blk(h)
        return self.lm_head(self.norm(h))


def _lm_loss(ids: Tensor) -> Callable[[Tensor], Tensor]:
    def loss_fn(logits: Tensor) -> Tensor:
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    return loss_fn


def tied_embeddings() -> Built:
    torch.manual_seed(0)
    model = TinyLM(tie=True)
    ids = torch.randint(0, 256, (2, 32))
    return model.train(), ids, _lm_loss(ids)


def frozen_embedding_and_first_block() -> Built:
    torch.manual_seed(0)
    model = TinyLM()
    model.embed.requires_grad_(False)
    model.pos.requires_grad_(False)
    model.blocks[0].requires_grad_(False)
    ids = torch.randint(0, 256, (2, 32))
    return model.train(), ids, _lm_loss(ids)


class EncoderBlock(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.ff = FeedForward(d, dropout)

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.ff(self.norm2(x))


class DecoderBlock(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.cross_attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.norm3 = nn.LayerNorm(d)
        self.ff = FeedForward(d, dropout)

    def forward(self, x: Tensor, memory: Tensor, causal_mask: Tensor) -> Tensor:
        y = self.norm1(x)
        x = x + self.self_attn(y, y, y, attn_mask=causal_mask, need_weights=False)[0]
        x = x + self.cross_attn(self.norm2(x), memory, memory, need_weights=False)[0]
        return x + self.ff(self.norm3(x))


class EncoderDecoder(nn.Module):
    def __init__(self, vocab: int = 128, d: int = 32, heads: int = 4, enc_layers: int = 3, dec_layers: int = 3,
                 max_len: int = 32) -> None:
        super().__init__()
        self.src_embed = nn.Embedding(vocab, d)
        self.tgt_embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(max_len, d) * 0.02)
        self.encoder = nn.ModuleList([EncoderBlock(d, heads) for _ in range(enc_layers)])
        self.enc_norm = nn.LayerNorm(d)
        self.decoder = nn.ModuleList([DecoderBlock(d, heads) for _ in range(dec_layers)])
        self.dec_norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, vocab)

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        memory = self.src_embed(src) + self.pos[: src.shape[1]]
        for blk in self.encoder:
            memory = blk(memory)
        memory = self.enc_norm(memory)
        t = tgt.shape[1]
        causal = torch.triu(torch.full((t, t), float("-inf")), diagonal=1)
        h = self.tgt_embed(tgt) + self.pos[:t]
        for blk in self.decoder:
            h = blk(h, memory, causal)
        return self.out(self.dec_norm(h))


def encoder_decoder_by_hand() -> Built:
    torch.manual_seed(0)
    model = EncoderDecoder()
    src = torch.randint(0, 128, (2, 24))
    tgt = torch.randint(0, 128, (2, 16))

    def loss_fn(logits: Tensor) -> Tensor:
        return F.cross_entropy(logits[:, :-1].reshape(-1, 128), tgt[:, 1:].reshape(-1))

    return model.train(), (src, tgt), loss_fn


class TorchTransformerClassifier(nn.Module):
    """torch's own nn.TransformerEncoder (its forward converts masks and loops over ``layers``)."""

    def __init__(self, vocab: int = 128, d: int = 32, layers: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 4, dim_feedforward=64, dropout=0.1, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, 2)

    def forward(self, ids: Tensor, padding_mask: Tensor) -> Tensor:
        h = self.encoder(self.embed(ids) * math.sqrt(self.embed.embedding_dim), src_key_padding_mask=padding_mask)
        return self.head(h.mean(1))


def torch_transformer_encoder() -> Built:
    torch.manual_seed(0)
    model = TorchTransformerClassifier()
    ids = torch.randint(0, 128, (4, 24))
    padding_mask = torch.zeros(4, 24, dtype=torch.bool)
    padding_mask[1, 20:] = True
    target = torch.randint(0, 2, (4,))
    return model.train(), (ids, padding_mask), lambda out: F.cross_entropy(out, target)


def filed_reproducer() -> Built:
    """The filed bug: an in-place LeakyReLU between two Linear layers of a Sequential."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.LeakyReLU(0.1, inplace=True), nn.Linear(16, 16), nn.Tanh(),
                          nn.Linear(16, 4))
    return model.train(), *_vectors()


ZOO: dict[str, Callable[[], Built]] = {
    "resnet18": resnet18,
    "resnet50": resnet50,
    "vgg11": vgg11,
    "densenet": densenet,
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v3": mobilenet_v3,
    "efficientnet": efficientnet,
    "convnext": convnext,
    "plain_sequential_cnn": plain_sequential_cnn,
    "vit": vit,
    "swin": swin,
    "gpt2": gpt2,
    "llama": llama,
    "bert": bert,
    "t5": t5,
    "bart": bart,
    "whisper": whisper,
    "wav2vec2_layerdrop": wav2vec2,
    "albert": albert,
    "mixtral": mixtral,
    "inplace_mul_between_blocks": inplace_mul_between_blocks,
    "inplace_leaky_relu_between_blocks": inplace_leaky_relu_between_blocks,
    "residual_in_parent": residual_in_parent,
    "aux_loss_from_intermediate": aux_loss_from_intermediate,
    "layerdrop": layerdrop,
    "layerdrop_skips_block1": layerdrop_skips_block1,
    "tied_embeddings": tied_embeddings,
    "frozen_embedding_and_first_block": frozen_embedding_and_first_block,
    "encoder_decoder_by_hand": encoder_decoder_by_hand,
    "torch_transformer_encoder": torch_transformer_encoder,
    "filed_reproducer": filed_reproducer,
}
