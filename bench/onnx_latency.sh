#!/usr/bin/env bash
# ONNX vs native latency of exported students, side by side in one run: for each model, a short
# training (weights do not matter for speed) and an export, then the forward pass timed in
# kd-launch (examples/infer_latency.rs) and in onnxruntime (bench/onnx_latency.py) at batch 1
# and 32, with 1 and 2 threads. Writes bench/results/onnx_latency.md. Needs `pip install onnxruntime`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p kd-launch
cargo build --release -p kd-engine --example infer_latency
KD=target/release/kd-launch
LAT=target/release/examples/infer_latency
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
head -n 64 dataset/fashion-mnist/train_list.txt > "$work/train.txt"
out=bench/results/onnx_latency.md
{
  echo "# Exported student: kd-launch vs onnxruntime forward latency (CPU)"
  echo
  echo "\`bench/onnx_latency.sh\` on $(nproc) cores, $(date -u +%Y-%m-%d); median of 20 runs after 3 warm-up runs;"
  echo "random input, preprocessing excluded; ratio = kd-launch / onnxruntime (above 1: onnxruntime faster)."
  echo
  echo "| model | input | batch | threads | kd-launch ms | onnxruntime ms | ratio |"
  echo "|---|---|---|---|---|---|---|"
} > "$out"
# The quickstart student at its own size, and two deployment-size students.
for spec in resnet8:28 PPLCNet_x1_0:224 ResNet18_vd:224; do
  arch=${spec%%:*}; size=${spec##*:}
  "$KD" train -c configs/quickstart/student.yaml -o Arch.name="$arch" -o Global.epochs=1 \
    -o Global.output_dir="$work/$arch" -o Global.eval_during_train=False \
    -o DataLoader.Train.dataset.cls_label_path="$work/train.txt" >/dev/null 2>&1
  "$KD" export -c configs/quickstart/student.yaml -o Arch.name="$arch" \
    -o Global.pretrained_model="$work/$arch/$arch/latest" -o Global.save_inference_dir="$work/$arch/inference" \
    -o "Global.image_shape=[3, $size, $size]" >/dev/null 2>&1
  for threads in 1 2; do
    for batch in 1 32; do
      n=$(( batch == 1 ? 20 : (size > 100 ? 5 : 20) ))
      ours=$("$LAT" --model "$work/$arch/inference" --batch $batch --size $size --threads $threads --runs $n | sed -n 's/.*median_ms=//p')
      theirs=$(python3 bench/onnx_latency.py --model "$work/$arch/inference/inference.onnx" --batch $batch --size $size --threads $threads --runs $n | sed -n 's/.*median_ms=//p')
      ratio=$(python3 -c "print(f'{$ours / $theirs:.2f}')")
      echo "| $arch | ${size}x${size} | $batch | $threads | $ours | $theirs | $ratio |" | tee -a "$out"
    done
  done
done
echo "wrote $out"
