#!/usr/bin/env python3
"""Runs a kd-launch ONNX export in onnxruntime and compares it with `kd-launch infer`.

The preprocessing comes from the model's own metadata (`preprocess`, PaddleClas's transform
list), re-done here with Pillow and numpy; the images must not need resampling (ResizeImage to
their own size, or none), which is what keeps the comparison about the network, not about two
resize filters. All logits must agree to --tol relative to the largest one (untrained models have
logits of ~0.02, where an absolute 1e-4 would hide a wrong layer);
for each image, every class `kd-launch infer` put in its top-k must have the
same score in onnxruntime to within --tol, and onnxruntime's top-k must be the same classes.

Usage:
  kd-launch infer --model DIR --images IMGS --logits > infer.jsonl
  python3 tools/check_onnx.py --model DIR/inference.onnx --infer infer.jsonl [--tol 1e-4]
Exit status 0 when everything matches; prints the largest score difference.
"""

import argparse
import json
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image


def preprocess(path, transforms):
    img = None
    chw = False
    for t in transforms:
        (name, p), = t.items()
        p = p or {}
        if name == "DecodeImage":
            img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
        elif name == "ResizeImage":
            h, w = img.shape[:2]
            if "resize_short" in p:
                target = p["resize_short"]
                ok = min(h, w) == target
            else:
                size = p["size"]
                size = size if isinstance(size, list) else [size, size]
                ok = [w, h] == size
            if not ok:
                sys.exit(f"{path}: ResizeImage {p} would resample; this check needs images at size")
        elif name == "CropImage":
            size = p["size"]
            cw, ch = (size, size) if isinstance(size, int) else size
            h, w = img.shape[:2]
            y, x = (h - ch) // 2, (w - cw) // 2
            img = img[y:y + ch, x:x + cw]
        elif name == "NormalizeImage":
            scale = p.get("scale", 1.0 / 255.0)
            if isinstance(scale, str):
                num, den = scale.split("/")
                scale = float(num) / float(den)
            mean = np.array(p.get("mean", [0.485, 0.456, 0.406]), dtype=np.float32)
            std = np.array(p.get("std", [0.229, 0.224, 0.225]), dtype=np.float32)
            img = (img * np.float32(scale) - mean) / std
            if str(p.get("order", "")).lower() == "chw":
                img = img.transpose(2, 0, 1)
                chw = True
        elif name == "ToCHWImage":
            if not chw:
                img = img.transpose(2, 0, 1)
                chw = True
        else:
            sys.exit(f"transform {name} is not reproduced by this check")
    if not chw:
        img = img.transpose(2, 0, 1)
    return np.ascontiguousarray(img, dtype=np.float32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--infer", required=True, help="JSON lines from kd-launch infer")
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()

    sess = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    transforms = json.loads(meta["preprocess"])
    rows = [json.loads(l) for l in open(args.infer) if l.startswith("{")]
    if not rows:
        sys.exit("no results in " + args.infer)
    x = np.stack([preprocess(r["file_name"], transforms) for r in rows])
    logits, scores = sess.run(["logits", "scores"], {"image": x})
    # Logits first (scores of an untrained model are all near 1/classes and would hide a lot).
    theirs_logits = np.array([r["logits"] for r in rows], dtype=np.float32)
    logit_diff = float(np.abs(logits - theirs_logits).max())
    logit_scale = float(np.abs(theirs_logits).max())
    worst, bad = 0.0, []
    if logit_diff > args.tol * logit_scale:
        bad.append(("logits", logit_diff, logit_scale))
    for r, s in zip(rows, scores):
        ids = r["class_ids"]
        diff = max(abs(float(s[c]) - v) for c, v in zip(ids, r["scores"]))
        worst = max(worst, diff)
        theirs = list(np.argsort(-s, kind="stable")[:len(ids)])
        # Ties between near-equal scores may order differently; the sets must agree where the
        # scores are distinguishable.
        if diff > args.tol or (sorted(theirs) != sorted(ids)
                               and abs(float(s[theirs[-1]]) - r["scores"][-1]) > args.tol):
            bad.append((r["file_name"], ids, r["scores"], theirs, s[ids].tolist()))
    print(f"{args.model}: {len(rows)} images, max |logit difference| {logit_diff:.2e} "
          f"(max |logit| {logit_scale:.3f}), "
          f"max top-{len(rows[0]['class_ids'])} score difference {worst:.2e} (tolerance {args.tol:g}); "
          f"top-1 scores {min(r['scores'][0] for r in rows):.3f}..{max(r['scores'][0] for r in rows):.3f}")
    for b in bad[:5]:
        print("MISMATCH", *b)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
