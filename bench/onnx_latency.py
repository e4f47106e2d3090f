#!/usr/bin/env python3
"""onnxruntime side of bench/onnx_latency.sh: median forward latency of an exported model on
random input (preprocessing excluded), CPU execution provider, a given number of threads."""
import argparse
import time

import numpy as np
import onnxruntime as ort

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--batch", type=int, default=1)
ap.add_argument("--size", type=int, default=224)
ap.add_argument("--runs", type=int, default=20)
ap.add_argument("--warmup", type=int, default=3)
ap.add_argument("--threads", type=int, default=1)
a = ap.parse_args()
so = ort.SessionOptions()
so.intra_op_num_threads = a.threads
so.inter_op_num_threads = 1
sess = ort.InferenceSession(a.model, so, providers=["CPUExecutionProvider"])
x = np.random.default_rng(0).random((a.batch, 3, a.size, a.size), dtype=np.float32)
times = []
for i in range(a.warmup + a.runs):
    t = time.perf_counter()
    sess.run(["logits"], {"image": x})
    if i >= a.warmup:
        times.append((time.perf_counter() - t) * 1e3)
times.sort()
print(f"RESULT onnxruntime-{ort.__version__} batch={a.batch} size={a.size} threads={a.threads} "
      f"median_ms={times[len(times) // 2]:.3f}")
