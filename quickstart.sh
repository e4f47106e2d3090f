#!/usr/bin/env bash
# kd-launch quickstart on the bundled Fashion-MNIST subset, CPU only:
#   teacher (resnet20) → student alone (resnet8) → KD student → DKD student → export → infer.
# Extra arguments are passed to every `train` (e.g. -o Global.epochs=1).
set -euo pipefail
cd "$(dirname "$0")"
cargo build --release -p kd-launch
KD=./target/release/kd-launch
start=$(date +%s)
for cfg in teacher student kd dkd; do
  echo "== train configs/quickstart/$cfg.yaml"
  "$KD" train -c "configs/quickstart/$cfg.yaml" "$@"
done
"$KD" export -c configs/quickstart/dkd.yaml -o Global.pretrained_model=output/quickstart/dkd/DistillationModel/best_model
echo "== infer from the export (first 3 validation images)"
for i in 00000 00001 00002; do
  "$KD" infer --model output/quickstart/dkd/inference --images "dataset/fashion-mnist/images/val/$i.png"
done
echo
echo "== results (best top-1 on the 1,000 validation images; $(( $(date +%s) - start )) s in all)"
for run in teacher/resnet20 student/resnet8 kd/DistillationModel dkd/DistillationModel; do
  state="output/quickstart/$run/best_model/state.json"
  top1=$(sed -n 's/.*"best_top1": *\([0-9.eE+-]*\).*/\1/p' "$state")
  epoch=$(sed -n 's/.*"best_epoch": *\([0-9]*\).*/\1/p' "$state")
  printf '%-28s top1 %s (epoch %s)\n' "$run" "$top1" "$epoch"
done
echo "checkpoints: output/quickstart/<run>/<arch>/{latest,best_model}"
echo "exported DKD student: output/quickstart/dkd/inference (inference.safetensors + inference.json, inference.onnx)"
