#!/usr/bin/env bash
# Behaviour of two kd-launch binaries side by side, for refactors that must change nothing:
#   tools/behaviour_diff.sh OLD_BIN NEW_BIN [WORKDIR]
# For each binary: `check` of the 13 shipped PaddleClas configs and every configs/quickstart
# config (stdout + stderr); a teacher and six distillation runs (KD, DKD, MGD, AFD, PEFD, DML),
# 2 epochs on the first 512 training / 256 validation images, every step logged; the students
# exported. Then: the check reports and the training logs are diffed (timestamps and timings
# removed), and the exports compared byte for byte (checkpoint records are not: they hold random
# parameter ids). Prints every difference; exits 1 if there is one.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
old=$(readlink -f "$1")
new=$(readlink -f "$2")
work=${3:-$(mktemp -d)}
mkdir -p "$work"
work=$(cd "$work" && pwd)
runs=(kd dkd mgd afd pefd dml)

run_all() { # BIN DIR
  local bin=$1 dir=$2
  rm -rf "$dir"
  mkdir -p "$dir/check"
  cd "$dir"
  ln -s "$repo/dataset" dataset
  ln -s "$repo/configs" configs
  head -512 dataset/fashion-mnist/train_list.txt >small_train.txt
  head -256 dataset/fashion-mnist/val_list.txt >small_val.txt
  for c in "$repo"/tests/data/paddleclas-configs/*.yaml configs/quickstart/*.yaml; do
    local out="check/$(basename "$c").txt"
    "$bin" check -c "$c" >"$out" 2>&1 && echo "rc=0" >>"$out" || echo "rc=$?" >>"$out"
  done
  local o=(-o Global.epochs=2 -o DataLoader.Train.dataset.cls_label_path=./small_train.txt
    -o DataLoader.Eval.dataset.cls_label_path=./small_val.txt -o Global.print_batch_step=1)
  for a in teacher "${runs[@]}"; do
    KD_THREADS=2 "$bin" train -c "configs/quickstart/$a.yaml" "${o[@]}" >"train-$a.log" 2>&1 || echo "rc=$?" >>"train-$a.log"
  done
  for a in "${runs[@]}"; do
    "$bin" export -c "configs/quickstart/$a.yaml" "${o[@]}" \
      -o "Global.pretrained_model=./output/quickstart/$a/DistillationModel/latest" \
      -o "Global.save_inference_dir=./export-$a" >"export-$a.log" 2>&1 || echo "rc=$?" >>"export-$a.log"
  done
}

strip() { sed -E 's/^[0-9T:.-]+Z +//; s/(batch_cost|reader_cost|ips|eta|allreduce_cost): [^,]+//g' "$1"; }

run_all "$old" "$work/old"
run_all "$new" "$work/new"
cd "$work"
status=0
for f in $(cd old/check && ls) ; do
  diff <(strip "old/check/$f") <(strip "new/check/$f") || { echo "^ check $f"; status=1; }
done
for a in teacher "${runs[@]}"; do
  diff <(strip "old/train-$a.log") <(strip "new/train-$a.log") || { echo "^ train $a"; status=1; }
done
for a in "${runs[@]}"; do
  for f in inference.safetensors inference.onnx inference.json; do
    cmp -s "old/export-$a/$f" "new/export-$a/$f" || { echo "export $a/$f differs"; status=1; }
  done
done
echo "$(ls old/check | wc -l) check reports, $((${#runs[@]} + 1)) training logs, ${#runs[@]} exports compared in $work: $([ $status = 0 ] && echo identical || echo DIFFERENT)"
exit $status
