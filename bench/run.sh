#!/usr/bin/env bash
# Side by side on this machine, in one run: the KD training step (CIFAR-style ResNet34 teacher →
# ResNet18 student, batch 64, 32x32, 100 classes) in kd-launch and in PyTorch (CPU), at 1 and 2
# threads, then the data loader alone on the quickstart data. Needs `pip install torch`.
# Usage: bench/run.sh [steps]
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-4}
cargo build --release --example kd_step --example loader_throughput 2>&1 | tail -1
for t in 1 2; do
  python3 bench/torch_kd_step.py --steps "$steps" --warmup 1 --threads "$t" | grep RESULT
  ./target/release/examples/kd_step --steps "$steps" --warmup 1 --threads "$t" --conv kd | grep RESULT
  ./target/release/examples/kd_step --steps "$steps" --warmup 1 --threads "$t" --conv burn | grep RESULT
done
for t in 1 2; do
  ./target/release/examples/loader_throughput -c configs/quickstart/kd.yaml --threads "$t" | grep RESULT
done
