#!/usr/bin/env python3
"""PyTorch reference for one knowledge-distillation training step (CPU), the other side of
examples/kd_step.rs, and (--infer) of the student's eval-mode forward (examples/infer_latency.rs).

Default: student ResNet18, teacher ResNet34 (frozen, eval mode, no_grad), CIFAR stem (3x3/1,
no max-pool); --stem imagenet gives torchvision's 7x7/2 + max-pool stem. PPLCNet_x* and
MobileNetV3_* students/teachers come from tools/count_params.py's re-statement of PaddleClas's.
Loss = CE(student, labels) + T^2 * KL(p_teacher || p_student) / N, with T=4.
Optimizer: SGD lr 0.1, momentum 0.9, dampening 0, weight_decay 1e-4.
Inputs are random tensors; only throughput is measured.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with identity or 1x1 conv+BN projection shortcut."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:  # shape changes -> projection
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """3x3 stem (stride 1, no max-pool), 4 stages, global avg pool, linear head."""

    def __init__(self, blocks, classes, imagenet_stem=False):
        super().__init__()
        k, s = (7, 2) if imagenet_stem else (3, 1)
        self.conv1 = nn.Conv2d(3, 64, k, s, k // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.pool = nn.MaxPool2d(3, 2, 1) if imagenet_stem else nn.Identity()
        layers, cin = [], 64
        for cout, n, stride in zip([64, 128, 256, 512], blocks, [1, 2, 2, 2]):
            for i in range(n):  # only the first block of a stage strides
                layers.append(BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, classes)

    def forward(self, x):
        x = self.layers(self.pool(F.relu(self.bn1(self.conv1(x)))))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class Paddle(nn.Module):
    """A PaddleClas mobile backbone from tools/count_params.py: stem, blocks, head."""

    def __init__(self, name, classes):
        super().__init__()
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
        from count_params import build
        stem, blocks, _, feat, head, _ = build(name, classes)
        self.stem, self.blocks = stem, nn.Sequential(*blocks)
        self.head = head if head is not None else nn.Linear(feat, classes)
        self.pool_first = head is None

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(x.mean((2, 3)) if self.pool_first else x)


def build(name, classes, stem):
    depth = {"ResNet18": [2, 2, 2, 2], "ResNet34": [3, 4, 6, 3]}
    if name in depth:
        return CifarResNet(depth[name], classes, imagenet_stem=stem == "imagenet")
    return Paddle(name, classes)


def kd_kl(student_logits, teacher_logits, t):
    """Hinton KD: T^2 * sum_i p_t (log p_t - log p_s) / N (batch mean)."""
    log_ps = F.log_softmax(student_logits / t, dim=1)
    log_pt = F.log_softmax(teacher_logits / t, dim=1)
    n = student_logits.shape[0]
    return (t * t) * (log_pt.exp() * (log_pt - log_ps)).sum() / n


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--size", type=int, default=32, help="image height/width")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--no-teacher", action="store_true", help="student-only CE step")
    ap.add_argument("--teacher", default="ResNet34", help="ResNet18/34, PPLCNet_x*, MobileNetV3_*, none")
    ap.add_argument("--student", default="ResNet18")
    ap.add_argument("--stem", default="cifar", choices=["cifar", "imagenet"], help="ResNet stem")
    ap.add_argument("--infer", action="store_true",
                    help="time the student's eval-mode forward (no_grad) instead of a training step")
    ap.add_argument("--temperature", type=float, default=4.0)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    count = lambda m: sum(p.numel() for p in m.parameters())

    student = build(args.student, args.classes, args.stem).train()
    print(f"student {args.student} params={count(student):,}")
    teacher = None
    if not args.no_teacher and args.teacher != "none" and not args.infer:
        teacher = build(args.teacher, args.classes, args.stem).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        print(f"teacher {args.teacher} params={count(teacher):,}")

    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9,
                          dampening=0, weight_decay=1e-4)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, args.classes, (args.batch,))

    if args.infer:
        student.eval()

    def infer():
        with torch.no_grad():
            return student(x).sum().item()

    def step():
        if args.infer:
            return infer()
        logits = student(x)
        loss = F.cross_entropy(logits, y)  # CE weight 1
        if teacher is not None:
            with torch.no_grad():
                t_logits = teacher(x)
            loss = loss + kd_kl(logits, t_logits, args.temperature)  # KD weight 1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()  # .item() forces completion of the step

    for _ in range(args.warmup):
        step()
    t0 = time.perf_counter()
    for i in range(args.steps):
        loss = step()
    wall = time.perf_counter() - t0
    step_s = wall / max(args.steps, 1)
    print(f"last loss={loss:.4f}" if args.steps else "no timed steps")
    print(f"RESULT torch_{'infer' if args.infer else 'kd_step'} img_per_s={args.batch / step_s:.3f} "
          f"step_s={step_s:.6f} threads={torch.get_num_threads()} "
          f"batch={args.batch} torch={torch.__version__}")


if __name__ == "__main__":
    main()
