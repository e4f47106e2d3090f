#!/usr/bin/env bash
# GPU check of the distributed path, for a machine with a GPU:
#
#   tests/gpu/run.sh [kd-launch built with --features cuda] [two GPU ids, default 0,1]
#
#   1. one GPU worker trains the quickstart KD config for one epoch (burn-cuda);
#   2. two GPU workers through the launcher (`--gpus a,b`): NCCL all-reduce, its unique id sent
#      over the launcher's TCP rendezvous; both finish, rank 1 used NCCL, the loss is finite;
#      prints the all-reduce time per step (allreduce_cost) against the step (batch_cost).
#      With one GPU, NCCL refuses two ranks on it ("duplicate GPU"), so the two workers share
#      GPU 0 with KD_GPU_COLLECTIVE=host (gradients over TCP) and the NCCL step is reported
#      as not run.
# NCCL is libnccl.so.2 on LD_LIBRARY_PATH (e.g. from the nvidia-nccl-cu13 Python package:
# export LD_LIBRARY_PATH=$(python3 -c 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__))')/lib:$LD_LIBRARY_PATH).
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${1:-target/release/kd-launch}
gpus=${2:-0,1}
work=${WORK:-/tmp/kd-gpu-check}
rm -rf "$work"; mkdir -p "$work"
[ -d dataset/fashion-mnist ] || "$bin" dataset fashion-mnist --out dataset/fashion-mnist --train-count 5000 --val-count 1000
common=(-c configs/quickstart/kd.yaml -o Global.device=gpu -o Global.epochs=1
        -o Arch.models.0.Teacher.pretrained=False -o Global.print_batch_step=10)
ngpu=$(nvidia-smi -L 2>/dev/null | wc -l || echo 0)

echo "== 1. one GPU worker"
timeout 600 "$bin" --gpus "${gpus%%,*}" train "${common[@]}" -o Global.output_dir="$work/one" 2>&1 | tail -3

if [ "$ngpu" -ge 2 ]; then
  echo "== 2. two GPU workers over NCCL (GPUs $gpus)"
  timeout 600 "$bin" --gpus "$gpus" train "${common[@]}" -o Global.output_dir="$work/two" 2>&1 | tail -3
  grep -q "(nccl collectives)" "$work/two/workerlog.1" || { echo "rank 1 did not use NCCL"; exit 1; }
else
  echo "== 2. one GPU: two workers on GPU 0, gradients over TCP (NCCL needs two GPUs: not run)"
  port=$((29500 + RANDOM % 1000))
  pids=()
  for r in 0 1; do
    RANK=$r LOCAL_RANK=$r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port KD_LAUNCH_DEVICE=gpu:0 \
      KD_GPU_COLLECTIVE=host timeout 600 "$bin" train "${common[@]}" -o Global.output_dir="$work/two" \
      > "$work/two.rank$r.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  cp "$work/two.rank0.log" "$work/two/workerlog.0"
fi
if grep -q "loss: nan\|loss: inf" "$work/two/workerlog.0"; then echo "loss not finite"; exit 1; fi
echo "== all-reduce cost per step vs step time (rank 0, epoch means)"
grep -o "batch_cost: [0-9.]*s, reader_cost: [0-9.]*s, allreduce_cost: [0-9.]*s" "$work/two/workerlog.0" | tail -2
echo "GPU check passed"
