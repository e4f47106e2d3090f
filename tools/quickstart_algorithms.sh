#!/usr/bin/env bash
# Every distillation algorithm on the bundled Fashion-MNIST subset (CPU), one table:
# the resnet20 teacher is trained once (configs/quickstart/teacher.yaml), then the resnet8
# student alone and each configs/quickstart/<algorithm>.yaml, for every seed in $SEEDS.
#
#   tools/quickstart_algorithms.sh                 # seed 42, students 3 epochs, teacher 10
#   SEEDS="1 2 3" EPOCHS=10 TEACHER_EPOCHS=30 tools/quickstart_algorithms.sh
#   ALGOS="kd dkd" tools/quickstart_algorithms.sh  # a subset
#
# Writes bench/results/quickstart_algorithms.md and the same table into README.md between the
# `quickstart-algorithms` markers. Training logs: output/algorithms/seed<S>/<run>/train.log.
# "step img/s" times the training step alone (teacher forward, student forward/backward, losses,
# optimizer) with examples/kd_step.rs on each config: batch 64, 28×28, $(nproc) threads, all
# configs back to back in two rounds (the second in reverse order), the faster round kept — the
# side-by-side comparison of what each loss costs ("vs KD" is that ratio). The training logs'
# `ips` (output/algorithms/.../train.log) also count data loading and whatever else ran meanwhile.
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-42}
EPOCHS=${EPOCHS:-3}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-10}
ALGOS=${ALGOS:-"kd dkd dist wsl skd rkd mgd pefd afd dml udml ssld"}
cargo build --release -p kd-launch && cargo build --release -p kd-engine --example kd_step
KD=./target/release/kd-launch
OUT=output/algorithms
mkdir -p "$OUT" bench/results

# The teacher all students learn from (its path is fixed in the configs), trained longer than the
# students so that it has something to teach. Retrained when its epoch count differs.
teacher=output/quickstart/teacher/resnet20
if ! grep -qs "epochs: $TEACHER_EPOCHS\$" "$teacher/best_model/config.yaml"; then
  "$KD" train -c configs/quickstart/teacher.yaml -o Global.epochs="$TEACHER_EPOCHS"
  rm -rf "$OUT" && mkdir -p "$OUT" # students of another teacher
fi

best_top1() { sed -n 's/.*"best_top1": *\([0-9.eE+-]*\).*/\1/p' "$1"; }
run() { # run <name> <config> <arch dir name> <seed>; prints the best top-1
  local name=$1 cfg=$2 arch=$3 seed=$4 dir="$OUT/seed$4/$1"
  # Reuse a finished run of the same length (delete output/algorithms or set RERUN=1 to redo).
  if ! grep -qs "epochs: $EPOCHS\$" "$dir/$arch/best_model/config.yaml" || [ "${RERUN:-0}" = 1 ]; then
    rm -rf "$dir"; mkdir -p "$dir"
    echo "== $name (seed $seed)" >&2
    "$KD" train -c "$cfg" -o Global.seed="$seed" -o Global.epochs="$EPOCHS" \
      -o Global.output_dir="$dir/" -o Global.print_batch_step=20 > "$dir/train.out" 2> "$dir/train.log" \
      || { echo "training $name failed; see $dir/train.log" >&2; tail -5 "$dir/train.log" >&2; return 1; }
  fi
  local t
  t=$(best_top1 "$dir/$arch/best_model/state.json")
  [[ $t =~ ^[0-9.eE+-]+$ ]] || { echo "$name: no best top-1 in $dir" >&2; return 1; }
  echo "$t"
}

declare -A top
for seed in $SEEDS; do
  t=$(run student configs/quickstart/student.yaml resnet8 "$seed")
  top[student]="${top[student]:-} $t"
  for a in $ALGOS; do
    t=$(run "$a" "configs/quickstart/$a.yaml" DistillationModel "$seed")
    top[$a]="${top[$a]:-} $t"
  done
done

# Step throughput of each config, back to back (nothing else should run meanwhile).
step_ips() {
  ./target/release/examples/kd_step --config "$1" --size 28 --batch 64 --warmup 3 --steps 15 \
    --threads "$(nproc)" | sed -n 's/.*img_per_s=\([0-9.]*\).*/\1/p'
}
declare -A step
order="student $ALGOS"
for round in 1 2; do
  for a in $order; do
    v=$(step_ips "configs/quickstart/$a.yaml")
    echo "step img/s $a (round $round): $v" >&2
    step[$a]=$(awk -v a="${step[$a]:-0}" -v b="$v" 'BEGIN { print (b > a ? b : a) }')
  done
  order=$(echo $order | tr ' ' '\n' | tac | tr '\n' ' ')
done

mean() { echo "$@" | awk '{ s = 0; for (i = 1; i <= NF; i++) s += $i; printf "%.4f", s / NF }'; }
spread() { echo "$@" | awk '{ if (NF < 2) { print "–"; exit } m = 0; for (i = 1; i <= NF; i++) m += $i; m /= NF;
  v = 0; for (i = 1; i <= NF; i++) v += ($i - m) ^ 2; printf "%.4f", sqrt(v / (NF - 1)) }'; }
base=$(mean ${top[student]})
kd_step=${step[kd]:-${step[student]}}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
nseeds=$(echo $SEEDS | wc -w)
table="bench/results/quickstart_algorithms.md"
{
  echo "| algorithm | config | student top-1 | std over seeds | gain over student alone | epochs | seeds | step img/s | step vs KD |"
  echo "|---|---|---|---|---|---|---|---|---|"
  printf '| student alone (resnet8) | `configs/quickstart/student.yaml` | %s | %s | – | %s | %s | %.1f | %s |\n' \
    "$base" "$(spread ${top[student]})" "$EPOCHS" "$SEEDS" "${step[student]}" "$(ratio "${step[student]}" "$kd_step")"
  for a in $ALGOS; do
    m=$(mean ${top[$a]})
    printf '| %s | `configs/quickstart/%s.yaml` | %s | %s | %+.4f | %s | %s | %.1f | %s |\n' \
      "$(echo "$a" | tr a-z A-Z)" "$a" "$m" "$(spread ${top[$a]})" \
      "$(awk -v a="$m" -v b="$base" 'BEGIN { print a - b }')" "$EPOCHS" "$SEEDS" \
      "${step[$a]}" "$(ratio "${step[$a]}" "$kd_step")"
  done
  echo
  echo "Teacher: resnet20 trained by \`configs/quickstart/teacher.yaml\` for $TEACHER_EPOCHS epochs (best top-1 $(best_top1 output/quickstart/teacher/resnet20/best_model/state.json)); student: resnet8; $nseeds seed(s); top-1 on the 1,000 bundled validation images (best epoch). Produced by \`tools/quickstart_algorithms.sh\` on $(date -u +%Y-%m-%d), $(nproc) CPU cores."
} > "$table"
cat "$table"

# Replace the table in README.md between the markers.
awk -v file="$table" '
  /<!-- quickstart-algorithms:start -->/ { print; while ((getline line < file) > 0) print line; skip = 1; next }
  /<!-- quickstart-algorithms:end -->/ { skip = 0 }
  !skip { print }' README.md > README.md.tmp && mv README.md.tmp README.md
