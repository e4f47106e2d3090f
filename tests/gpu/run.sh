#!/usr/bin/env bash
# The device check, for a machine with one GPU (≤ 10 minutes wall, nothing downloaded there):
#
#   cargo build --release --features cuda            # here; carry target/release/kd-launch
#   tests/gpu/run.sh [kd-launch] [GPU id, default 0]  # there
#
# It prints one table; rows:
#   1 quickstart KD (configs/quickstart/kd.yaml; 2,048 training images, random teacher), one GPU
#   2 ResNet34 → ResNet18 KD at 224×224 on generated images (tests/gpu/r34_r18.yaml): img/s in
#     steady state (median of the steps after the first 4) and the share of the GPU's FP32 peak
#   3 eval of row 2's GPU checkpoint; 4 its export
#   5 infer parity: row 2's checkpoint on the GPU vs its export on the CPU (max Δlogit ≤ 1e-3,
#     where Δlogit = |a - b| / max(1, |a|))
#   6 NCCL with world size 1 through the launcher (KD_GPU_COLLECTIVE=nccl --gpus 0): the
#     gradients take the device-memory all-reduce; its student vs row 1's (max Δlogit)
#   7 two workers on this one GPU, gradients over the host (KD_GPU_COLLECTIVE=host --gpus 0,0)
#   8 with a second GPU: two workers over NCCL (--gpus 0,1)
#
# NCCL is libnccl.so.2: found on LD_LIBRARY_PATH, or in the nvidia-nccl-cu13 Python package.
# DEVICE=wgpu runs rows 1–5 and 7 on burn-wgpu instead (a kd-launch built with --features
# wgpu; with SMALL=1, sizes for Mesa's lavapipe) to check this script without a GPU.
set -uo pipefail
cd "$(dirname "$0")/../.."
bin=$(realpath "${1:-target/release/kd-launch}")
gpu=${2:-0}
device=${DEVICE:-gpu}
work=${WORK:-/tmp/kd-gpu-check}
small=${SMALL:-0}
rm -rf "$work"
mkdir -p "$work"
log() { echo "== $*" >&2; }

if [ "$device" = gpu ] && ! ldconfig -p 2>/dev/null | grep -q libnccl.so.2; then
  nccl_lib=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(os.path.dirname(nvidia.nccl.__file__), "lib"))' 2>/dev/null || true)
  [ -n "$nccl_lib" ] && export LD_LIBRARY_PATH="$nccl_lib:${LD_LIBRARY_PATH:-}"
fi

rows=()
# Every command's timeout is what is left of BUDGET seconds (default 570: the check fits in ten
# minutes); a row that would start with under 20 s left is skipped and says so.
budget=${BUDGET:-570}
left() { echo $((budget - SECONDS)); }
skip_if_late() {
  if [ "$(left)" -lt 20 ]; then row "$1" skipped "" "time budget of $budget s spent"; return 0; fi
  return 1
}
sep=$'\x1f'
row() { rows+=("$1$sep$2$sep$3$sep$4"); }  # name, result, figure, detail

# The median `ips` of a training log's steps after the first 4 (cold kernels, autotuning; of
# all but the first in shorter runs).
steady_ips() {
  grep -o "ips: [0-9.]*" "$1" | awk '{ v[NR] = $2 } END { s = NR > 4 ? 4 : (NR > 1 ? 1 : 0); for (i = s + 1; i <= NR; i++) print v[i] }' | sort -g |
    awk '{ v[NR] = $1 } END { if (NR == 0) print "n/a"; else print v[int((NR + 1) / 2)] }'
}
# Largest |a - b| / max(1, |a|) over the logits of two `infer --logits` outputs (same images, same
# order): absolute for logits up to 1, relative beyond (float32 holds 7 digits).
max_logit_diff() {
  python3 - "$1" "$2" <<'PY'
import json, sys
def load(p):
    return [json.loads(l) for l in open(p) if l.startswith("{")]
a, b = load(sys.argv[1]), load(sys.argv[2])
assert len(a) == len(b) and len(a) > 0, (len(a), len(b))
print("%.2e" % max(abs(x - y) / max(1.0, abs(x)) for ra, rb in zip(a, b) for x, y in zip(ra["logits"], rb["logits"])))
PY
}
within() { python3 -c "import sys; sys.exit(0 if float('$1') <= float('$2') else 1)" 2>/dev/null; }
# FP32 peak (dense, no tensor cores) of the GPU by name, in TFLOP/s; PEAK_TFLOPS overrides.
peak_tflops() {
  [ -n "${PEAK_TFLOPS:-}" ] && { echo "$PEAK_TFLOPS"; return; }
  case "$(nvidia-smi --query-gpu=name --format=csv,noheader -i "$gpu" 2>/dev/null)" in
    *H200*|*H100*SXM*|*"H100 80GB HBM3"*) echo 67 ;; *H100*) echo 51 ;; *A100*) echo 19.5 ;;
    *L40S*) echo 91.6 ;; *4090*) echo 82.6 ;; *) echo "" ;;
  esac
}

# Data: the quickstart's (in the repository) and generated 256×256 images for the 224 crop.
data=$work/data
mkdir -p "$data"
qs_train=2048 qs_val=512 syn_train=1536 syn_val=256 syn_size=256 crop=224 batch=64
[ "$small" = 1 ] && { qs_train=128 qs_val=64 syn_train=32 syn_val=8 syn_size=72 crop=64 batch=8; }
head -n $qs_train dataset/fashion-mnist/train_list.txt > "$data/qs_train.txt"
head -n $qs_val dataset/fashion-mnist/val_list.txt > "$data/qs_val.txt"
"$bin" dataset synthetic --out "$data/syn" --train-count $syn_train --val-count $syn_val \
  --size $syn_size >/dev/null || { echo "cannot generate the data"; exit 1; }

dev=(-o Global.device="$device")
quick=(-c configs/quickstart/kd.yaml "${dev[@]}" -o Global.epochs=1 -o Global.print_batch_step=1
       -o Arch.models.0.Teacher.pretrained=False -o Global.eval_during_train=False
       -o Global.save_inference_dir="$work/quickstart_inference"
       -o DataLoader.Train.dataset.cls_label_path="$data/qs_train.txt"
       -o DataLoader.Eval.dataset.cls_label_path="$data/qs_val.txt")
syn=(-c tests/gpu/r34_r18.yaml "${dev[@]}" -o Global.output_dir="$work/r34" -o Global.save_inference_dir="$work/r34/inference"
     -o DataLoader.Train.dataset.image_root="$data/syn" -o DataLoader.Eval.dataset.image_root="$data/syn"
     -o DataLoader.Train.dataset.cls_label_path="$data/syn/train_list.txt"
     -o DataLoader.Eval.dataset.cls_label_path="$data/syn/val_list.txt"
     -o Infer.infer_imgs="$data/syn/val" -o DataLoader.Train.sampler.batch_size=$batch
     -o Global.image_shape="[3,$crop,$crop]" -o DataLoader.Train.dataset.transform_ops.1.RandCropImage.size=$crop
     -o DataLoader.Eval.dataset.transform_ops.2.CropImage.size=$crop -o Infer.transforms.2.CropImage.size=$crop
     -o DataLoader.Eval.dataset.transform_ops.1.ResizeImage.resize_short=$syn_size
     -o Infer.transforms.1.ResizeImage.resize_short=$syn_size)
qs_val_imgs=$work/qs_val_imgs
mkdir -p "$qs_val_imgs"
head -n 64 "$data/qs_val.txt" | while read -r rel _; do cp "dataset/fashion-mnist/$rel" "$qs_val_imgs/"; done

# 1. Quickstart KD on one GPU.
log "1. quickstart KD, one $device worker"
t0=$SECONDS
if skip_if_late "quickstart KD, 1 worker"; then :
elif timeout "$(left)" "$bin" --gpus "$gpu" train "${quick[@]}" -o Global.output_dir="$work/one" > "$work/one.log" 2>&1; then
  row "quickstart KD, 1 worker" PASS "$(steady_ips "$work/one.log") img/s" "$((SECONDS - t0)) s, $qs_train images"
else
  row "quickstart KD, 1 worker" FAIL "" "$(tail -1 "$work/one.log")"
fi

# 2. ResNet34 → ResNet18 at 224².
log "2. ResNet34 -> ResNet18 KD at ${crop}x${crop}"
t0=$SECONDS
if skip_if_late "ResNet34->ResNet18 KD ${crop}²"; then :
elif timeout "$(left)" "$bin" --gpus "$gpu" train "${syn[@]}" > "$work/r34.log" 2>&1; then
  ips=$(steady_ips "$work/r34.log")
  peak=$(peak_tflops)
  # Per image: ResNet34 forward 7.3 GFLOP (3.6 GMAC) + ResNet18 forward and backward
  # 3 × 3.6 GFLOP, at 224²; scaled by area for other crops.
  share=$(python3 -c "
ips, peak = '$ips', '$peak'
flop = 18.2e9 * ($crop / 224) ** 2
if ips == 'n/a': print('n/a')
else:
    t = float(ips) * flop / 1e12
    print(f'{t:.1f} TFLOP/s' + (f', {100 * t / float(peak):.1f} % of {peak} FP32 peak' if peak else ''))" 2>/dev/null || echo "n/a")
  row "ResNet34->ResNet18 KD ${crop}²" PASS "$ips img/s" "$share; batch $batch; $((SECONDS - t0)) s"
else
  row "ResNet34->ResNet18 KD ${crop}²" FAIL "" "$(tail -1 "$work/r34.log")"
fi
ckpt=$work/r34/DistillationModel/latest

# 3–5. Eval, export, infer parity from the GPU checkpoint.
log "3. eval"
if skip_if_late "eval of the GPU checkpoint"; then :
elif out=$(timeout "$(left)" "$bin" --gpus "$gpu" eval "${syn[@]}" -o Global.pretrained_model="$ckpt" 2> "$work/eval.err"); then
  row "eval of the GPU checkpoint" PASS "" "$(echo "$out" | grep '^eval:' | cut -c1-70)"
else
  row "eval of the GPU checkpoint" FAIL "" "$(tail -1 "$work/eval.err")"
fi
log "4. export"
if skip_if_late "export of the GPU checkpoint"; then :
elif timeout "$(left)" "$bin" export "${syn[@]}" -o Global.pretrained_model="$ckpt" > "$work/export.log" 2>&1; then
  row "export of the GPU checkpoint" PASS "" "$(grep -o 'exported.*' "$work/export.log")"
else
  row "export of the GPU checkpoint" FAIL "" "$(tail -1 "$work/export.log")"
fi
log "5. infer parity"
if ! skip_if_late "infer $device vs CPU export"; then
timeout "$(left)" "$bin" --gpus "$gpu" infer "${syn[@]}" -o Global.pretrained_model="$ckpt" --logits > "$work/infer_dev.jsonl" 2> "$work/infer_dev.err"
timeout "$(left)" "$bin" infer --model "$work/r34/inference" --images "$data/syn/val" --logits > "$work/infer_cpu.jsonl" 2> "$work/infer_cpu.err"
d=$(max_logit_diff "$work/infer_dev.jsonl" "$work/infer_cpu.jsonl" 2>/dev/null || echo "n/a")
if within "$d" 1e-3; then row "infer $device vs CPU export" PASS "max Δlogit $d" "$syn_val images"
else row "infer $device vs CPU export" FAIL "max Δlogit $d" "limit 1e-3; see $work/infer_*.err"; fi
fi

# 6. NCCL, world size 1, through the launcher.
if [ "$device" = gpu ]; then
  log "6. NCCL world size 1"
  if skip_if_late "NCCL world 1 (device all-reduce)"; then :
  elif KD_GPU_COLLECTIVE=nccl timeout "$(left)" "$bin" --gpus "$gpu" train "${quick[@]}" -o Global.output_dir="$work/nccl1" > "$work/nccl1.log" 2>&1; then
    for run in one nccl1; do
      timeout "$(left)" "$bin" --gpus "$gpu" infer "${quick[@]}" -o Global.pretrained_model="$work/$run/DistillationModel/latest" \
        --images "$qs_val_imgs" --logits > "$work/$run.infer.jsonl" 2>/dev/null
    done
    d=$(max_logit_diff "$work/one.infer.jsonl" "$work/nccl1.infer.jsonl" 2>/dev/null || echo "n/a")
    row "NCCL world 1 (device all-reduce)" PASS "$(steady_ips "$work/nccl1.log") img/s" "student vs row 1: max Δlogit $d"
  else
    row "NCCL world 1 (device all-reduce)" FAIL "" "$(tail -1 "$work/nccl1.log")"
  fi
else
  row "NCCL world 1" "not run" "" "DEVICE=$device"
fi

# 7. Two workers on one GPU, gradients over the host.
log "7. two workers on one $device, host collectives"
if skip_if_late "2 workers on 1 $device (host)"; then :
elif KD_GPU_COLLECTIVE=host timeout "$(left)" "$bin" --gpus "$gpu,$gpu" train "${quick[@]}" -o Global.output_dir="$work/two" > "$work/two.log" 2>&1; then
  cost=$(grep -o "batch_cost: [0-9.]*s, reader_cost: [0-9.]*s, allreduce_cost: [0-9.]*s" "$work/two/workerlog.0" | tail -1)
  row "2 workers on 1 $device (host)" PASS "$(steady_ips "$work/two/workerlog.0") img/s/worker" "$cost"
else
  row "2 workers on 1 $device (host)" FAIL "" "$(tail -1 "$work/two.log")"
fi

# 8. Two GPUs over NCCL.
ngpu=$(nvidia-smi -L 2>/dev/null | wc -l)
if [ "$device" = gpu ] && [ "$ngpu" -ge 2 ]; then
  other=$([ "$gpu" = 0 ] && echo 1 || echo 0)
  log "8. two GPUs over NCCL"
  if skip_if_late "2 GPUs over NCCL"; then :
  elif timeout "$(left)" "$bin" --gpus "$gpu,$other" train "${quick[@]}" -o Global.output_dir="$work/nccl2" > "$work/nccl2.log" 2>&1 \
     && grep -q "(nccl collectives)\|nccl" "$work/nccl2/workerlog.1"; then
    row "2 GPUs over NCCL" PASS "$(steady_ips "$work/nccl2/workerlog.0") img/s/worker" ""
  else
    row "2 GPUs over NCCL" FAIL "" "$(tail -1 "$work/nccl2.log")"
  fi
else
  row "2 GPUs over NCCL" "not run" "" "$ngpu GPU(s) here"
fi

echo
echo "kd-launch device check: $("$bin" --version) on $(nvidia-smi --query-gpu=name --format=csv,noheader -i "$gpu" 2>/dev/null || echo "$device")"
printf '| %-34s | %-7s | %-28s | %s\n' "check" "result" "figure" "detail"
printf '|%s|%s|%s|%s\n' "------------------------------------" "---------" "------------------------------" "------"
fail=0
for r in "${rows[@]}"; do
  IFS=$sep read -r name result figure detail <<< "$r"
  printf '| %-34s | %-7s | %-28s | %s\n' "$name" "$result" "$figure" "$detail"
  [ "$result" = FAIL ] && fail=1
done
echo "logs: $work; $SECONDS s"
exit $fail
