#!/usr/bin/env bash
# Data-parallel scaling on this machine's CPUs: one epoch of KD training with 1 process
# (1 thread, then 2 threads) and with 2 processes of 1 thread each (`--nproc 2`, TCP
# all-reduce), same per-process batch. Reports images/s over all processes, the step time and
# the all-reduce time per step (from the workers' logs: `batch_cost`, `allreduce_cost`, the
# epoch's means), for two students: resnet8 (78k parameters, the quickstart) and a CIFAR-stem
# ResNet18 (11.2M parameters: 45 MB of gradients per step).
#
# Two rounds, the second in reverse order (this machine's speed drifts by 10-30 % between runs,
# so compare rows within a round).
#
#   bench/scaling.sh            # writes bench/results/scaling.md
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p kd-launch >/dev/null
bin=target/release/kd-launch
[ -d dataset/fashion-mnist ] || $bin dataset fashion-mnist --out dataset/fashion-mnist --train-count 5000 --val-count 1000
out=${OUT:-/tmp/kd-scaling}
rm -rf "$out"; mkdir -p "$out"
head -n 1280 dataset/fashion-mnist/train_list.txt > "$out/train_1280.txt"
teacher=output/quickstart/teacher/resnet20/best_model
[ -d "$teacher" ] || teacher=False

# name | extra overrides
cases=(
  "resnet8|-o DataLoader.Train.dataset.cls_label_path=dataset/fashion-mnist/train_list.txt"
  "ResNet18 (CIFAR stem)|-o Arch.models.1.Student.name=ResNet18 -o Arch.models.1.Student.stem=cifar -o DataLoader.Train.dataset.cls_label_path=$out/train_1280.txt"
)
# label | kd-launch placement | threads per process | processes
runs=(
  "1 process × 1 thread|--threads 1|1"
  "1 process × 2 threads|--threads 2|1"
  "2 processes × 1 thread|--nproc 2 --threads 1|2"
)
field() { { grep -o "$1: [0-9.]*" || true; } | tail -1 | awk '{print $2}'; }
{
  echo "| round | student | run | img/s (all processes) | step s | all-reduce s/step | all-reduce share | speed-up vs 1×1 |"
  echo "|---|---|---|---|---|---|---|---|"
} > "$out/table.md"
for round in 1 2; do
  order=("${runs[@]}")
  if [ $round = 2 ]; then order=("${runs[2]}" "${runs[1]}" "${runs[0]}"); fi
  for c in "${cases[@]}"; do
    IFS='|' read -r name extra <<<"$c"
    declare -A total_of=()
    rows=()
    for r in "${order[@]}"; do
      IFS='|' read -r label place procs <<<"$r"
      dir="$out/r$round-$(echo "$name-$label" | tr -c 'A-Za-z0-9' _)"
      # shellcheck disable=SC2086
      $bin $place train -c configs/quickstart/kd.yaml $extra -o Global.epochs=1 \
        -o Global.eval_during_train=False -o Global.print_batch_step=1000 \
        -o Arch.models.0.Teacher.pretrained=$teacher -o Global.output_dir="$dir" > "$dir.log" 2>&1
      log=$dir.log
      [ -f "$dir/workerlog.0" ] && log=$dir/workerlog.0
      line=$(grep "\[Train\]\[Epoch 1/1\]\[Iter" "$log" | tail -1)
      step=$(echo "$line" | field batch_cost)
      ips=$(echo "$line" | field ips)
      ar=$(echo "$line" | field allreduce_cost); ar=${ar:-0}
      total=$(awk -v i="$ips" -v p="$procs" 'BEGIN{printf "%.1f", i*p}')
      total_of[$label]=$total
      rows+=("$label|$total|$step|$ar")
    done
    base=${total_of["1 process × 1 thread"]}
    for row in "${runs[@]}"; do
      IFS='|' read -r label _ _ <<<"$row"
      for x in "${rows[@]}"; do
        IFS='|' read -r l total step ar <<<"$x"
        [ "$l" = "$label" ] || continue
        share=$(awk -v a="$ar" -v s="$step" 'BEGIN{printf "%.1f %%", 100*a/s}')
        speed=$(awk -v t="$total" -v b="$base" 'BEGIN{printf "%.2f", t/b}')
        echo "| $round | $name | $label | $total | $step | $ar | $share | $speed |" | tee -a "$out/table.md"
      done
    done
    unset total_of
  done
done
mkdir -p bench/results
{
  echo "# Data-parallel scaling on the CPU (\`bench/scaling.sh\`, $(date -u +%F), $(nproc) cores)"
  echo
  echo "KD, resnet20 teacher (frozen) → student, batch 64 per process, 28×28 Fashion-MNIST, one epoch, no eval;"
  echo "means over the epoch from the rank-0 log. img/s counts every process's images."
  echo
  cat "$out/table.md"
} > bench/results/scaling.md
cat bench/results/scaling.md
