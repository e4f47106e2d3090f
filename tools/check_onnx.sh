#!/usr/bin/env bash
# ONNX export checked in onnxruntime: for each backbone family a student trains one short epoch on
# 256 Fashion-MNIST images at a low rate (ResNet50's logits blow up at 0.02), is exported, and
# `kd-launch infer` on 32 validation images is compared with onnxruntime on the same images
# (tools/check_onnx.py: logits and top-k scores within 1e-4). Needs `pip install onnxruntime
# numpy pillow`.
#
# Usage: tools/check_onnx.sh [path/to/kd-launch]   (default: target/debug/kd-launch, built by the tests)
set -euo pipefail
cd "$(dirname "$0")/.."
KD=${1:-target/debug/kd-launch}
if [ ! -x "$KD" ]; then
  [ $# -eq 0 ] || { echo "check_onnx.sh: $KD is not an executable" >&2; exit 2; }
  cargo build -p kd-launch
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
head -n 256 dataset/fashion-mnist/train_list.txt > "$work/train.txt"
mkdir -p "$work/images"
head -n 32 dataset/fashion-mnist/val_list.txt | while read -r rel _; do
  cp "dataset/fashion-mnist/$rel" "$work/images/"
done
status=0
# resnet8: CIFAR ResNet; ResNet18_vd: deep stem, max-pool, average-pooled (ceil mode, odd sizes
# at 28x28) projections; ResNet50: bottleneck blocks; PP-LCNet and MobileNetV3: depthwise
# convolutions, SE, hardswish, dropout.
for arch in resnet8 ResNet18_vd ResNet50 PPLCNet_x0_25 MobileNetV3_small_x0_35; do
  out="$work/$arch"
  "$KD" train -c configs/quickstart/student.yaml \
    -o Arch.name="$arch" -o Global.epochs=1 -o Global.output_dir="$out" \
    -o Global.eval_during_train=False -o Global.print_batch_step=100 \
    -o DataLoader.Train.dataset.cls_label_path="$work/train.txt" \
    -o DataLoader.Train.sampler.batch_size=32 -o Optimizer.lr.learning_rate=0.005 >"$out.train.log" 2>&1 || { cat "$out.train.log"; exit 1; }
  "$KD" export -c configs/quickstart/student.yaml -o Arch.name="$arch" \
    -o Global.pretrained_model="$out/$arch/latest" -o Global.save_inference_dir="$out/inference" \
    -o Infer.PostProcess.topk=5 >/dev/null
  "$KD" infer --model "$out/inference" --images "$work/images" --logits > "$out.infer.jsonl"
  python3 tools/check_onnx.py --model "$out/inference/inference.onnx" --infer "$out.infer.jsonl" || status=1
done
exit $status
