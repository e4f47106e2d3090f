#!/usr/bin/env bash
# kd-launch vs PyTorch (training steps, inference) and onnxruntime (exported students) on this
# CPU, side by side in one run: builds the release binaries, then bench/compare.py alternates
# the systems for --rounds rounds per case after waiting for an idle machine, and writes
# bench/results/compare.md (medians, spreads, ratios, % of fp32 peak, peak RSS).
# Needs a Python with torch and onnxruntime: `python3 -m venv venv && venv/bin/pip install torch
# onnxruntime`, then PYTHON=venv/bin/python bench/run.sh [--rounds 3] [--only TEXT] [--threads 1,2]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p kd-launch 2>&1 | tail -1
cargo build --release -p kd-engine --example kd_step --example infer_latency 2>&1 | tail -1
exec "${PYTHON:-python3}" bench/compare.py "$@"
