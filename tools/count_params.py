#!/usr/bin/env python3
"""Reference parameter counts and tap shapes for the PaddleClas backbones kd-launch builds.

Re-states, as small PyTorch modules, the layer tables of PaddleClas's
ppcls/arch/backbone/legendary_models/{resnet.py (version "vd"), pp_lcnet.py, mobilenet_v3.py}
(channel tables, make_divisible, SE reduction 4 with biased 1x1 convs, bias-free last conv,
biased fc) and prints, per network, the trainable parameter count at 1000 classes (BatchNorm
running statistics are buffers, so not counted) and the shapes of the feature taps for a
2x3x32x32 input at 10 classes. Used to write the expected values in src/arch/ tests; the tests
do not need it. Usage: python3 tools/count_params.py
"""

import torch
from torch import nn


def make_divisible(v, divisor=8, min_value=None):
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBn(nn.Sequential):
    def __init__(self, cin, cout, k, stride=1, groups=1, act=None):
        layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                  nn.BatchNorm2d(cout)]
        if act == "relu":
            layers.append(nn.ReLU())
        elif act == "hardswish":
            layers.append(nn.Hardswish())
        super().__init__(*layers)


class SE(nn.Module):
    def __init__(self, c, slope):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c // 4, 1)
        self.conv2 = nn.Conv2d(c // 4, c, 1)
        self.slope = slope

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        s = self.conv2(torch.relu(self.conv1(s)))
        return x * torch.clamp(self.slope * s + 0.5, 0, 1)


class Classifier(nn.Module):
    """GAP, 1x1 conv (no bias) + hardswish, dropout, flatten, fc."""

    def __init__(self, cin, expand, classes):
        super().__init__()
        self.last_conv = nn.Conv2d(cin, expand, 1, bias=False)
        self.fc = nn.Linear(expand, classes)

    def forward(self, x):
        x = nn.functional.hardswish(self.last_conv(x.mean((2, 3), keepdim=True)))
        return self.fc(x.flatten(1))


# ----- ResNet_vd: 3x(3x3 ConvBNReLU) stem, max-pool; every stage's first block has a 1x1
# projection, behind a 2x2/2 ceil-mode average pool except in the first stage.
class VdBlock(nn.Module):
    def __init__(self, cin, width, stride, bottleneck, project, first):
        super().__init__()
        cout = width * 4 if bottleneck else width
        if bottleneck:
            self.body = nn.Sequential(ConvBn(cin, width, 1, act="relu"),
                                      ConvBn(width, width, 3, stride, act="relu"),
                                      ConvBn(width, cout, 1))
        else:
            self.body = nn.Sequential(ConvBn(cin, width, 3, stride, act="relu"),
                                      ConvBn(width, width, 3))
        self.short = None
        if project:
            pool = [] if first else [nn.AvgPool2d(2, stride, ceil_mode=True,
                                                  count_include_pad=False)]
            self.short = nn.Sequential(*pool, ConvBn(cin, cout, 1))

    def forward(self, x):
        s = x if self.short is None else self.short(x)
        return torch.relu(self.body(x) + s)


def resnet_vd(depth, classes):
    counts, bottleneck = {18: ([2, 2, 2, 2], False), 34: ([3, 4, 6, 3], False),
                          50: ([3, 4, 6, 3], True), 101: ([3, 4, 23, 3], True),
                          152: ([3, 8, 36, 3], True), 200: ([3, 12, 48, 3], True)}[depth]
    stem = [ConvBn(3, 32, 3, 2, act="relu"), ConvBn(32, 32, 3, act="relu"),
            ConvBn(32, 64, 3, act="relu"), nn.MaxPool2d(3, 2, 1)]
    blocks, cin = [], 64
    for stage, n in enumerate(counts):
        width = 64 << stage
        for i in range(n):
            stride = 2 if i == 0 and stage > 0 else 1
            blocks.append(VdBlock(cin, width, stride, bottleneck, i == 0, stage == 0 and i == 0))
            cin = width * 4 if bottleneck else width
    taps = [f"blocks[{i}]" for i in range(len(blocks))]
    return nn.Sequential(*stem), blocks, taps, cin, None, classes


# ----- PP-LCNet: [k, in, out, stride, se] per depthwise-separable block, stages blocks2..6.
LCNET = {
    "blocks2": [[3, 16, 32, 1, False]],
    "blocks3": [[3, 32, 64, 2, False], [3, 64, 64, 1, False]],
    "blocks4": [[3, 64, 128, 2, False], [3, 128, 128, 1, False]],
    "blocks5": [[3, 128, 256, 2, False]] + [[5, 256, 256, 1, False]] * 5,
    "blocks6": [[5, 256, 512, 2, True], [5, 512, 512, 1, True]],
}


class DwSep(nn.Module):
    def __init__(self, cin, cout, k, stride, se):
        super().__init__()
        self.dw = ConvBn(cin, cin, k, stride, groups=cin, act="hardswish")
        self.se = SE(cin, 1 / 6) if se else nn.Identity()
        self.pw = ConvBn(cin, cout, 1, act="hardswish")

    def forward(self, x):
        return self.pw(self.se(self.dw(x)))


def pplcnet(scale, classes):
    d = lambda c: make_divisible(c * scale)
    stem = ConvBn(3, d(16), 3, 2, act="hardswish")
    stages = [nn.Sequential(*[DwSep(d(i), d(o), k, s, se) for k, i, o, s, se in cfg])
              for cfg in LCNET.values()]
    return stem, stages, list(LCNET), d(512), Classifier(d(512), 1280, classes), classes


# ----- MobileNetV3: [k, exp, out, se, act, stride] per inverted residual block.
MV3 = {
    "large": [[3, 16, 16, False, "relu", 1], [3, 64, 24, False, "relu", 2],
              [3, 72, 24, False, "relu", 1], [5, 72, 40, True, "relu", 2],
              [5, 120, 40, True, "relu", 1], [5, 120, 40, True, "relu", 1],
              [3, 240, 80, False, "hardswish", 2], [3, 200, 80, False, "hardswish", 1],
              [3, 184, 80, False, "hardswish", 1], [3, 184, 80, False, "hardswish", 1],
              [3, 480, 112, True, "hardswish", 1], [3, 672, 112, True, "hardswish", 1],
              [5, 672, 160, True, "hardswish", 2], [5, 960, 160, True, "hardswish", 1],
              [5, 960, 160, True, "hardswish", 1]],
    "small": [[3, 16, 16, True, "relu", 2], [3, 72, 24, False, "relu", 2],
              [3, 88, 24, False, "relu", 1], [5, 96, 40, True, "hardswish", 2],
              [5, 240, 40, True, "hardswish", 1], [5, 240, 40, True, "hardswish", 1],
              [5, 120, 48, True, "hardswish", 1], [5, 144, 48, True, "hardswish", 1],
              [5, 288, 96, True, "hardswish", 2], [5, 576, 96, True, "hardswish", 1],
              [5, 576, 96, True, "hardswish", 1]],
}


class Inverted(nn.Module):
    def __init__(self, cin, mid, cout, k, stride, se, act):
        super().__init__()
        self.body = nn.Sequential(ConvBn(cin, mid, 1, act=act),
                                  ConvBn(mid, mid, k, stride, groups=mid, act=act),
                                  SE(mid, 0.2) if se else nn.Identity(),
                                  ConvBn(mid, cout, 1))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y


def mobilenet_v3(kind, scale, classes):
    d = lambda c: make_divisible(c * scale)
    cfg = MV3[kind]
    squeeze = d(960 if kind == "large" else 576)
    stem = ConvBn(3, d(16), 3, 2, act="hardswish")
    blocks, cin = [], d(16)
    for k, exp, c, se, act, s in cfg:
        blocks.append(Inverted(cin, d(exp), d(c), k, s, se, act))
        cin = d(c)
    head = nn.Sequential(ConvBn(cin, squeeze, 1, act="hardswish"),
                         Classifier(squeeze, 1280, classes))
    taps = [f"blocks[{i}]" for i in range(len(blocks))]
    return stem, blocks, taps, squeeze, head, classes


def build(name, classes):
    if name.startswith("ResNet"):
        return resnet_vd(int(name[6:].split("_")[0]), classes)
    if name.startswith("PPLCNet_x"):
        return pplcnet(float(name[9:].replace("_", ".")), classes)
    kind, scale = name[len("MobileNetV3_"):].split("_x")
    return mobilenet_v3(kind, float(scale.replace("_", ".")), classes)


def report(name):
    stem, blocks, taps, feat, head, _ = build(name, 1000)
    fc = nn.Linear(feat, 1000) if head is None else head
    model = nn.ModuleList([stem, *blocks, fc])
    count = sum(p.numel() for p in model.parameters())
    # PaddleClas's docs use other conventions for some families: PP-LCNet's Params(M) include
    # the BatchNorm running statistics, MobileNetV3's leave out the biases (SE convs and fc).
    stats = sum(b.numel() for n, b in model.named_buffers() if "running" in n)
    biases = sum(m.bias.numel() for m in model.modules()
                 if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None)
    stem, blocks, taps, feat, head, _ = build(name, 10)
    x = stem(torch.zeros(2, 3, 32, 32))
    shapes = []
    for t, b in zip(taps, blocks):
        x = b(x)
        shapes.append(f"{t}={list(x.shape[1:])}")
    print(f"{name}: {count} params ({count / 1e6:.2f}M; with BN running stats "
          f"{(count + stats) / 1e6:.3f}M; without conv/fc biases {(count - biases) / 1e6:.3f}M)")
    print(f"  taps at 32x32: {' '.join(shapes)}")


if __name__ == "__main__":
    for n in ["ResNet18_vd", "ResNet34_vd", "ResNet50_vd", "ResNet101_vd", "ResNet152_vd",
              "ResNet200_vd", "PPLCNet_x0_25", "PPLCNet_x0_35", "PPLCNet_x0_5", "PPLCNet_x0_75",
              "PPLCNet_x1_0", "PPLCNet_x1_5", "PPLCNet_x2_0", "PPLCNet_x2_5",
              "MobileNetV3_large_x0_35", "MobileNetV3_large_x0_5", "MobileNetV3_large_x0_75",
              "MobileNetV3_large_x1_0", "MobileNetV3_large_x1_25", "MobileNetV3_small_x0_35",
              "MobileNetV3_small_x0_5", "MobileNetV3_small_x0_75", "MobileNetV3_small_x1_0",
              "MobileNetV3_small_x1_25"]:
        report(n)
