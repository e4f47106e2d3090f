#!/usr/bin/env python3
"""Numeric fixtures for the PaddleClas backbones: eval-mode logits and one feature tap each.

Builds PPLCNet_x0_25, MobileNetV3_small_x0_35 and ResNet18_vd at 5 classes with the PyTorch
re-statement in tools/count_params.py (imported, not copied), gives every tensor a value from a
formula of its position (no randomness, no names), runs them in eval mode on a fixed 2x3x35x35
input and writes tests/data/backbone_fixtures.json, which tests/backbone_fixtures.rs checks.

The formula (tests/backbone_fixtures.rs implements the same one):
  * tensors are numbered k = 0, 1, ... in module pre-order (registration order), within a
    module in the order weight, bias, running_mean, running_var; kd-launch's field order is the
    same, so burn's module traversal visits them in this order;
  * element i is the index in PyTorch's row-major layout (a Linear weight is [out, in]; burn
    stores it transposed, [in, out]); s in [-1, 1) is a 32-bit integer hash of (k, i) (see
    `unit`; exact integer arithmetic, so bit-identical in Rust), scaled to x / 2^31 - 1;
    a sine of the position was tried first, but its regularity made the signal vanish (PP-LCNet)
    or grow to 1e6 (ResNet);
  * conv / linear weight: gain * s * sqrt(6 / fan_in) (He-uniform times a per-model gain
    recorded in the fixture), fan_in = numel / out_channels;
    conv / linear bias: 0.1 s; BatchNorm weight: 1 + 0.2 s; bias: 0.1 s;
    running_mean: 0.1 s; running_var: 1 + 0.2 |s|;
  * input element i: 0.5 sin(0.37 i).
Every value is rounded to float32 before use, so both sides start from the same numbers.

count_params.py's heads have no dropout; kd-launch's Paddle dropout (`downscale_in_infer`)
scales by 1 - p in eval mode, so the Rust test builds with `dropout_prob: null`.

Usage (repository root): python3 tools/gen_backbone_fixtures.py
"""

import json
import math
import os
import sys

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from count_params import build  # noqa: E402

CLASSES = 5
INPUT = [2, 3, 35, 35]
# (name, tap, gain): the weight gain keeps activations O(1) to the logits (hardswish halves small
# signals, so without it PP-LCNet's batch items become indistinguishable by blocks6; much more
# and the signal grows without bound).
MODELS = [("PPLCNet_x0_25", "blocks4", 1.5), ("MobileNetV3_small_x0_35", "blocks[3]", 1.2),
          ("ResNet18_vd", "blocks[2]", 1.0)]


def unit(k, n):
    """s in [-1, 1) for elements 0 .. n-1 of tensor k: a 32-bit integer hash of (k, i)."""
    m = np.uint64(0xFFFFFFFF)
    i = np.arange(n, dtype=np.uint64)
    x = (i * np.uint64(0x9E3779B1) + np.uint64((k + 1) * 0x85EBCA77)) & m
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x2C1B3C6D)) & m
    x ^= x >> np.uint64(12)
    x = (x * np.uint64(0x297A2D39)) & m
    x ^= x >> np.uint64(15)
    return x.astype(np.float64) / 2.0**31 - 1.0


def values(k, n, kind, fan_in, gain):
    s = unit(k, n)
    v = {"weight": gain * s * math.sqrt(6.0 / fan_in), "bias": 0.1 * s, "bn_weight": 1 + 0.2 * s,
         "bn_bias": 0.1 * s, "running_mean": 0.1 * s, "running_var": 1 + 0.2 * np.abs(s)}[kind]
    return v.astype(np.float32)


def assign(model, gain):
    """Sets every tensor by the formula; returns how many were set."""
    k = 0
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            tensors = [(m.weight, "bn_weight"), (m.bias, "bn_bias"),
                       (m.running_mean, "running_mean"), (m.running_var, "running_var")]
        elif isinstance(m, (nn.Conv2d, nn.Linear)):
            tensors = [(m.weight, "weight")] + ([(m.bias, "bias")] if m.bias is not None else [])
        else:
            assert not list(m.parameters(recurse=False)), type(m)
            continue
        for t, kind in tensors:
            fan_in = t.numel() // t.shape[0]
            v = values(k, t.numel(), kind, fan_in, gain).reshape(t.shape)
            with torch.no_grad():
                t.copy_(torch.from_numpy(v))
            k += 1
    return k


def flat(t):
    return [float(f"{v:.8g}") for v in t.detach().double().flatten().tolist()]


def run(name, tap, gain):
    stem, blocks, taps, feat, head, _ = build(name, CLASSES)
    head = nn.Linear(feat, CLASSES) if head is None else head
    model = nn.ModuleList([stem, *blocks, head]).eval()
    count = assign(model, gain)
    n = math.prod(INPUT)
    x = torch.from_numpy((0.5 * np.sin(0.37 * np.arange(n))).astype(np.float32)).reshape(INPUT)
    with torch.no_grad():
        h = stem(x)
        for t, b in zip(taps, blocks):
            h = b(h)
            if t == tap:
                feature = h
        if isinstance(head, nn.Linear):  # ResNet: global average pool, flatten, fc
            logits = head(h.mean((2, 3)))
        else:
            logits = head(h)
    return {"name": name, "class_num": CLASSES, "gain": gain, "tensors": count, "input_shape": INPUT,
            "logits_shape": list(logits.shape), "logits": flat(logits), "tap": tap,
            "tap_shape": list(feature.shape), "tap_values": flat(feature)}


def main():
    torch.set_num_threads(2)
    out = {"generator": "tools/gen_backbone_fixtures.py", "models": [run(*m) for m in MODELS]}
    path = os.path.join("tests", "data", "backbone_fixtures.json")
    with open(path, "w") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")
    for m in out["models"]:
        lg, tp = np.array(m["logits"]), np.array(m["tap_values"])
        print(f"{m['name']}: {m['tensors']} tensors, logits {lg.round(4).tolist()}, "
              f"{m['tap']} {m['tap_shape']} |max| {np.abs(tp).max():.3g} rms {tp.std():.3g}")
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
