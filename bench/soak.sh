#!/usr/bin/env bash
# Soak: does memory stay flat over a long run? Trains configs/quickstart/student.yaml (resnet8,
# 28x28 Fashion-MNIST, 5,000 images) at batch 16 for enough epochs to pass STEPS steps (eval of
# the 1,000 val images after every epoch), reading the process's VmRSS (and VmHWM, its peak)
# from /proc at every 100th step as the log reports it. Then evaluates the trained checkpoint
# on 10,000 images (the val list 10 times), sampling every 25 batches of 16 (400 images), and
# infers on 10,000 images from the export (a directory of 10 x 1,000 links to the val images;
# infer reports nothing until the end, so sampled every 0.25 s). Writes the series and a
# verdict (growth from the 500th step, or the 20% point, to the last sample) to
# bench/results/soak.md.
#
# Usage: bench/soak.sh [STEPS]   (default 2000)
#   KD_LAUNCH=<binary>  use this kd-launch instead of building the release one
#   KD_THREADS=<n>      compute threads (default 2)
#   SOAK_REPEAT=<n>     eval/infer on the 1,000 val images n times (default 10; 1 for a quick check)
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-2000}
repeat=${SOAK_REPEAT:-10}
out_md=bench/results/soak.md
target=${CARGO_TARGET_DIR:-target}
if [[ -z "${KD_LAUNCH:-}" ]]; then
  cargo build --release -p kd-launch 2>&1 | tail -1
  KD_LAUNCH=$target/release/kd-launch
  built_from="this tree ($(git rev-parse --short HEAD)$(git diff --quiet || echo ', with uncommitted changes'))"
else
  built_from="given as KD_LAUNCH"
fi
export KD_THREADS=${KD_THREADS:-2}

work=$(mktemp -d /tmp/kd-soak.XXXXXX)
trap 'rm -rf "$work"' EXIT
# A private copy: a build in a shared target directory must not swap the binary mid-run.
cp "$KD_LAUNCH" "$work/kd-launch"
bin=$work/kd-launch
bin_note="$KD_LAUNCH, $built_from, modified $(date -u -r "$KD_LAUNCH" '+%Y-%m-%d %H:%M UTC'), sha256 $(sha256sum "$bin" | cut -c1-12)"

cfg=configs/quickstart/student.yaml
data=dataset/fashion-mnist
batch=16
train_images=$(wc -l <"$data/train_list.txt")
iters=$(((train_images + batch - 1) / batch))
epochs=$(((steps + iters - 1) / iters))
echo "soak: $epochs epochs x $iters steps (batch $batch) = $((epochs * iters)) steps; binary $bin_note"

# kib FIELD PID: a /proc/PID/status field in KiB (VmRSS, VmHWM); empty once PID is gone.
kib() { awk '/^'"$1"':/ {print $2}' "/proc/$2/status" 2>/dev/null || true; }
# sample FILE KEY PID: appends "KEY RSS PEAK" (KiB) to FILE, unless PID has already exited.
sample() {
  local rss
  rss=$(kib VmRSS "$3")
  if [[ -n "$rss" ]]; then echo -e "$2\t$rss\t$(kib VmHWM "$3")" >>"$1"; fi
}

# Runs "$@" (kd-launch ...) with stderr to $log, and calls `on_line PID LINE` for each stderr
# line as it comes; returns the command's status.
follow() {
  local log=$1
  shift
  "$@" 2>"$log" >"$log.stdout" &
  local pid=$!
  tail -n +1 -F --pid="$pid" "$log" 2>/dev/null | while IFS= read -r line; do on_line "$pid" "$line"; done
  wait "$pid"
}

# 1. Training.
train_series=$work/train.tsv
on_line() {
  local re='\[Train\]\[Epoch ([0-9]+)/[0-9]+\]\[Iter: ([0-9]+)/([0-9]+)\]'
  if [[ $2 =~ $re ]]; then
    local step=$(((BASH_REMATCH[1] - 1) * BASH_REMATCH[3] + BASH_REMATCH[2] + 1))
    if ((step % 100 == 0)); then sample "$train_series" "$step" "$1"; fi
  fi
}
t0=$(date +%s)
follow "$work/train.log" "$bin" train -c "$cfg" \
  -o Global.output_dir="$work/out" -o Global.save_inference_dir="$work/inference" \
  -o Global.epochs="$epochs" -o Global.print_batch_step=1 \
  -o DataLoader.Train.sampler.batch_size=$batch
train_s=$(($(date +%s) - t0))
ckpt=$work/out/resnet8/latest
grep -q "done: $epochs epochs" "$work/train.log.stdout"
echo "train: $(wc -l <"$train_series") samples, ${train_s}s"

# 2. Eval on 10,000 images: the val list ten times.
for _ in $(seq "$repeat"); do cat "$data/val_list.txt"; done >"$work/val10k.txt"
eval_series=$work/eval.tsv
on_line() {
  local re='\[Eval\]\[Epoch [0-9]+\]\[Iter: ([0-9]+)/([0-9]+)\]'
  if [[ $2 =~ $re ]] && (((BASH_REMATCH[1] + 1) % 25 == 0)); then
    sample "$eval_series" $(((BASH_REMATCH[1] + 1) * batch)) "$1"
  fi
}
t0=$(date +%s)
follow "$work/eval.log" "$bin" eval -c "$cfg" \
  -o Global.pretrained_model="$ckpt" -o Global.print_batch_step=1 \
  -o DataLoader.Eval.dataset.cls_label_path="$work/val10k.txt" \
  -o DataLoader.Eval.sampler.batch_size=$batch
eval_s=$(($(date +%s) - t0))
eval_result=$(grep -o 'eval: .*' "$work/eval.log.stdout")
echo "$eval_result (${eval_s}s)"

# 3. Infer on 10,000 images, from the export.
"$bin" export -c "$cfg" -o Global.pretrained_model="$ckpt" \
  -o Global.save_inference_dir="$work/inference" >/dev/null
for k in $(seq "$repeat"); do
  mkdir -p "$work/infer10k/$k"
  ln -s "$PWD/$data"/images/val/*.png "$work/infer10k/$k/"
done
infer_series=$work/infer.tsv
t0=$(date +%s.%N)
"$bin" infer --model "$work/inference" --images "$work/infer10k" >"$work/infer.stdout" 2>"$work/infer.log" &
pid=$!
while kill -0 "$pid" 2>/dev/null; do
  sample "$infer_series" "$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.2f", b-a}')" "$pid"
  sleep 0.25
done
wait "$pid"
infer_s=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
infer_n=$(grep -c '^{' "$work/infer.stdout")
echo "infer: $infer_n results (${infer_s}s)"

# 4. The report.
# growth FILE FROM-ROW-FILTER: "a MB -> b MB: +d MB (+p%)" between the first row whose key is
# >= FROM and the last row.
growth() {
  awk -F'\t' -v from="$2" '
    $1 >= from && !a { a = $2 } { b = $2 }
    END { printf "%.1f MB -> %.1f MB: %+.1f MB (%+.1f%%)", a/1024, b/1024, (b-a)/1024, 100*(b-a)/a }' "$1"
}
table() {
  echo "| $2 | RSS MB | peak RSS MB |"
  echo "|---:|---:|---:|"
  awk -F'\t' '{ printf "| %s | %.1f | %.1f |\n", $1, $2/1024, $3/1024 }' "$1"
}
last_step=$(tail -1 "$train_series" | cut -f1)
infer_from=$(awk -F'\t' '{ t = $1 } END { printf "%.2f", t * 0.2 }' "$infer_series")
{
  echo "# Soak: memory over 2,000+ training steps, and eval and infer on 10,000 images"
  echo
  echo "Written by \`bench/soak.sh $steps\` on $(date -u '+%Y-%m-%d %H:%M UTC'); $(nproc) CPUs (shared with other jobs while it ran), KD_THREADS=$KD_THREADS."
  echo "Binary: $bin_note."
  echo
  echo "Train: \`$cfg\` (resnet8, 28x28 Fashion-MNIST, $train_images images) at batch $batch: $epochs epochs x $iters steps = $((epochs * iters)) steps, eval of 1,000 images and checkpoints after every epoch; ${train_s}s."
  echo "RSS (VmRSS) read from /proc at every 100th step as the log reports it; peak = VmHWM."
  echo "Eval: the trained \`latest\` on the val list repeated $repeat times, batch $batch; $eval_result; ${eval_s}s; sampled every 25 batches."
  echo "Infer: \`infer --model\` (the export) on a directory of $repeat x 1,000 links to the val images; $infer_n results; ${infer_s}s; sampled every 0.25 s (it prints its results at the end only)."
  echo
  echo "## Verdict"
  echo
  echo "- Train, step 500 to step $last_step: $(growth "$train_series" 500)."
  echo "- Eval, image $((repeat * 200)) to $((repeat * 1000)): $(growth "$eval_series" $((repeat * 200)))."
  echo "- Infer, 20% of its time to the end: $(growth "$infer_series" "$infer_from")."
  echo
  echo "## Train"
  echo
  table "$train_series" step
  echo
  echo "## Eval ($((repeat * 1000)) images)"
  echo
  table "$eval_series" images
  echo
  echo "## Infer ($((repeat * 1000)) images)"
  echo
  table "$infer_series" seconds
} >"$out_md"
echo "wrote $out_md"
sed -n '/## Verdict/,/## Train/p' "$out_md" | grep '^-'
