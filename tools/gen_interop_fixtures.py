#!/usr/bin/env python3
"""Fixtures for weight import (tests/interop.rs): files written by the real PyTorch and Paddle,
and the logits their own frameworks compute.

* torchvision ResNet18 (10 classes) with seeded random weights, saved with torch.save(state_dict)
  and gzipped (tests/data/interop/resnet18_torchvision.pth.gz); its eval-mode logits on a fixed
  2x3x64x64 input. To keep the file small, the large convolutions are ~99 % zeros (every tensor
  still has thousands of non-zeros at random positions, so a wrong layout or a swapped tensor
  changes the logits); BatchNorm statistics are set from batches of data so the signal stays O(1).
* timm's resnet50d (ResNet-D: PaddleClas's ResNet50_vd), randomised the same way, saved with
  safetensors.torch.save_file (timm's distribution format), gzipped, and its logits.
* The names and shapes of torchvision's ResNet34 and ResNet50 state dicts (no values): the Rust
  test maps them and compares with kd-launch's ResNet34/50 exactly.
* With --paddleclas <PaddleClas checkout> and paddlepaddle installed: PaddleClas's own PPLCNet_x0_25
  and ResNet18_vd (10 classes, Paddle's default initialisation, seeded, then sparse large
  convolutions and random BatchNorm statistics), saved with paddle.save (.pdparams, the format of
  PaddleClas's released weights) and gzipped, and their eval-mode logits from Paddle; and the
  names and shapes of PaddleClas's MobileNetV3 small/large, PPLCNet_x1_0, ResNet34/50_vd and
  ResNet18/34/50 state dicts.

Usage (repository root):
  python3 tools/gen_interop_fixtures.py [--paddleclas /path/to/PaddleClas]
"""

import argparse
import gzip
import json
import os
import sys

import numpy as np

OUT = "tests/data/interop"
CLASSES = 10
# PP-LCNet's conv weight gain over Paddle's initialisation: 1.0 fades (both inputs get nearly
# the same logits), 1.3 explodes (logits ~400); 1.15 gives input-dependent O(1) logits.
GAIN = 1.15
INPUT = [2, 3, 64, 64]


def fixed_input():
    # A fixed pseudo-random input, written as raw little-endian f32 beside the fixtures.
    rng = np.random.default_rng(7)
    return rng.standard_normal(INPUT).astype(np.float32)


def randomize(model, torch, g):
    """Seeded random weights, large convolutions mostly zeros (the files are gzipped), BatchNorm
    statistics from batches of data so the eval-mode signal stays O(1)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d) and m.weight.numel() > 4000:
                p = m.weight
                # 1 % of the weights, but about 8 per filter at least: an all-zero filter gives a
                # channel of zeros whose BatchNorm (variance ~0) would amplify round-off.
                share = max(0.01, 8 / p[0].numel())
                keep = torch.rand(p.shape, generator=g) < share
                # He scale for the kept fan-in, so each layer passes the signal on.
                fan_in = p[0].numel() * share
                w = torch.randn(p.shape, generator=g) * (2.0 / fan_in) ** 0.5
                # where(), not a product: -0.0 would put random sign bits between the zeros.
                p.copy_(torch.where(keep, w, torch.zeros_like(w)))
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the batches below
        model.train()
        for _ in range(4):
            model(torch.randn(8, *INPUT[1:], generator=g))
        model.eval()


def gzip_file(path):
    with open(path, "rb") as f, gzip.GzipFile(path + ".gz", "wb", 9, mtime=0) as g:
        g.write(f.read())
    os.remove(path)
    return os.path.basename(path) + ".gz"


def torch_fixtures(x):
    import safetensors.torch
    import timm
    import torch
    import torchvision

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    out = {"torch_version": torch.__version__, "torchvision_version": torchvision.__version__,
           "timm_version": timm.__version__}
    model = torchvision.models.resnet18(num_classes=CLASSES)
    randomize(model, torch, g)
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    path = os.path.join(OUT, "resnet18_torchvision.pth")
    torch.save(model.state_dict(), path)
    out["resnet18_torchvision"] = {"file": gzip_file(path), "logits": logits.tolist()}
    # timm's ResNet-D (deep stem, average-pooled projections) is PaddleClas's ResNet50_vd; timm
    # distributes weights as safetensors.
    model = timm.create_model("resnet50d", num_classes=CLASSES)
    randomize(model, torch, g)
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    path = os.path.join(OUT, "resnet50d_timm.safetensors")
    safetensors.torch.save_file(model.state_dict(), path)
    out["resnet50d_timm"] = {"file": gzip_file(path), "logits": logits.tolist()}
    shapes = {}
    for arch in ["resnet34", "resnet50"]:
        m = getattr(torchvision.models, arch)(num_classes=CLASSES)
        shapes[arch] = {k: list(v.shape) for k, v in m.state_dict().items()}
    out["torchvision_state_dict_shapes"] = shapes
    return out


def paddle_fixtures(x, paddleclas):
    import paddle

    sys.path.insert(0, paddleclas)
    from ppcls.utils import logger
    logger.init_logger()
    from ppcls.arch.backbone.legendary_models.pp_lcnet import PPLCNet_x0_25
    from ppcls.arch.backbone.legendary_models.resnet import ResNet18_vd

    out = {"paddle_version": paddle.__version__}
    paddle.seed(3)
    for name, ctor in [("PPLCNet_x0_25", PPLCNet_x0_25), ("ResNet18_vd", ResNet18_vd)]:
        model = ctor(class_num=CLASSES)
        # Non-trivial BatchNorm statistics (Paddle initialises them to 0 and 1); large
        # convolutions 99 % zeros as above (the file is gzipped); a larger head so the
        # logits are O(1).
        rng = np.random.default_rng(5)
        state = model.state_dict()
        for k, v in state.items():
            if len(v.shape) == 4 and int(np.prod(v.shape)) > 20000:
                fan_in = int(np.prod(v.shape[1:])) * 0.01
                w = rng.standard_normal(v.shape) * (2.0 / fan_in) ** 0.5
                v.set_value(np.where(rng.random(v.shape) < 0.01, w, 0.0).astype(np.float32))
            elif len(v.shape) == 4 and name == "PPLCNet_x0_25":
                # Paddle's default initialisation lets PP-LCNet's signal fade (both inputs
                # would get nearly the same logits); a gain keeps the logits input-dependent.
                v.set_value((v.numpy() * GAIN).astype(np.float32))
            elif k == "fc.weight" and name == "PPLCNet_x0_25":
                v.set_value((v.numpy() * 20).astype(np.float32))
            elif k.endswith("._mean"):
                v.set_value((0.1 * rng.standard_normal(v.shape)).astype(np.float32))
            elif k.endswith("._variance"):
                v.set_value((0.5 + rng.random(v.shape)).astype(np.float32))
        model.eval()
        logits = model(paddle.to_tensor(x)).numpy()
        file = f"{name}_paddleclas.pdparams"
        path = os.path.join(OUT, file)
        paddle.save(model.state_dict(), path)
        file = gzip_file(path)
        out[name] = {"file": file, "logits": logits.tolist()}
    # Names and shapes only, for the families and sizes not covered by a file above.
    from ppcls.arch.backbone.legendary_models import mobilenet_v3, pp_lcnet, resnet
    shapes = {}
    for name, ctor in [("MobileNetV3_small_x0_35", mobilenet_v3.MobileNetV3_small_x0_35),
                       ("MobileNetV3_large_x1_0", mobilenet_v3.MobileNetV3_large_x1_0),
                       ("PPLCNet_x1_0", pp_lcnet.PPLCNet_x1_0),
                       ("ResNet34_vd", resnet.ResNet34_vd), ("ResNet50_vd", resnet.ResNet50_vd),
                       ("ResNet50", resnet.ResNet50), ("ResNet18", resnet.ResNet18),
                       ("ResNet34", resnet.ResNet34)]:
        shapes[name] = {k: list(v.shape) for k, v in ctor(class_num=CLASSES).state_dict().items()}
    out["paddleclas_state_dict_shapes"] = shapes
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--paddleclas", help="a PaddleClas checkout (needs paddlepaddle)")
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    x = fixed_input()
    x.tofile(os.path.join(OUT, "input_2x3x64x64.f32"))
    fixtures = {"input": {"file": "input_2x3x64x64.f32", "shape": INPUT}, "classes": CLASSES}
    fixtures.update(torch_fixtures(x))
    if args.paddleclas:
        fixtures.update(paddle_fixtures(x, args.paddleclas))
    with open(os.path.join(OUT, "fixtures.json"), "w") as f:
        json.dump(fixtures, f)
    print("wrote", OUT)


if __name__ == "__main__":
    main()
