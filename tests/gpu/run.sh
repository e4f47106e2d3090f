#!/usr/bin/env bash
# GPU check of the distributed path (NCCL through cudarc), for a machine with a GPU.
#
#   tests/gpu/run.sh [kd-launch binary built with --features cuda] [GPU ids, default 0,0]
#
# With one GPU, two workers share it (`--gpus 0,0` is refused, so the launcher's workers are
# started by hand with torchrun's variables: both on GPU 0). It checks:
#   1. one GPU worker trains the quickstart KD config for a few steps (burn-cuda);
#   2. two GPU workers (NCCL all-reduce, unique id over the TCP rendezvous) train the same
#      job; both finish, rank 1 logs NCCL collectives, and loss stays finite;
#   3. NCCL's all-reduce time per step is printed from the workers' logs (allreduce_cost).
# NCCL comes from libnccl.so.2 on LD_LIBRARY_PATH (e.g. the nvidia-nccl-cu13 Python package:
# export LD_LIBRARY_PATH=$(python3 -c 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__))')/lib).
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${1:-target/release/kd-launch}
gpus=${2:-0,0}
work=${WORK:-/tmp/kd-gpu-check}
rm -rf "$work"; mkdir -p "$work"
[ -d dataset/fashion-mnist ] || "$bin" dataset fashion-mnist --out dataset/fashion-mnist --train-count 5000 --val-count 1000
common=(-c configs/quickstart/kd.yaml -o Global.device=gpu -o Global.epochs=1
        -o Arch.models.0.Teacher.pretrained=False -o Global.print_batch_step=10)

echo "== 1. one GPU worker"
"$bin" --gpus "${gpus%%,*}" train "${common[@]}" -o Global.output_dir="$work/one" 2>&1 | tail -3

echo "== 2. two GPU workers over NCCL (GPUs $gpus)"
IFS=, read -r g0 g1 <<<"$gpus"
port=$((29500 + RANDOM % 1000))
pids=()
for r in 0 1; do
  g=$([ $r = 0 ] && echo "$g0" || echo "$g1")
  RANK=$r LOCAL_RANK=$r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port KD_LAUNCH_DEVICE=gpu:$g \
    "$bin" train "${common[@]}" -o Global.output_dir="$work/two" > "$work/rank$r.log" 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
tail -3 "$work/rank0.log"
[ $status = 0 ] || { echo "FAILED"; tail -20 "$work/rank1.log"; exit 1; }
grep -q "nccl collectives" "$work/rank1.log" || { echo "rank 1 did not use NCCL"; exit 1; }
if grep -q "loss: nan\|loss: inf" "$work/rank0.log"; then echo "loss not finite"; exit 1; fi

echo "== 3. all-reduce cost per step (NCCL, host-staged) vs step time"
grep -o "batch_cost: [0-9.]*s, reader_cost: [0-9.]*s, allreduce_cost: [0-9.]*s" "$work/rank0.log" | tail -3
echo "GPU check passed"
