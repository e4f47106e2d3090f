#!/usr/bin/env python3
"""kd-launch against PyTorch (and onnxruntime for exported students) on this CPU, in one run.

For every case and thread count, the two systems run alternately (kd-launch first in odd rounds,
PyTorch first in even ones), each round waiting first for an idle machine; the table gives the
median img/s of each, the spread (max - min over rounds, as % of the median), the ratio of
medians (above 1: kd-launch faster), peak RSS, and the fraction of the machine's fp32 peak each
reaches. Peak = best of PyTorch's 4096x4096 GEMM and a large 3x3 convolution at that thread
count; FLOPs per image are counted by PyTorch's FlopCounterMode on the same step (2 x
multiply-adds, forward + backward; the teacher's forward included), the same count for both.

Needs the release binaries (kd-launch, examples kd_step and infer_latency) and a Python with
torch (+ onnxruntime for the inference rows), e.g. `python3 -m venv venv && venv/bin/pip install
torch onnxruntime`; bench/run.sh builds the binaries and runs this.

Usage: bench/compare.py [--rounds 3] [--only SUBSTRING] [--threads 1,2] [--out FILE]
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KD_STEP = os.path.join(ROOT, "target/release/examples/kd_step")
INFER = os.path.join(ROOT, "target/release/examples/infer_latency")
KD = os.path.join(ROOT, "target/release/kd-launch")
TORCH = [sys.executable, os.path.join(ROOT, "bench/torch_kd_step.py")]
ONNX = [sys.executable, os.path.join(ROOT, "bench/onnx_latency.py")]

# name, common model args (both sides take the same flags), steps timed
TRAIN = [
    ("KD ResNet34→ResNet18 32² c100 b64",
     "--teacher ResNet34 --student ResNet18 --stem cifar --size 32 --batch 64 --classes 100", 3),
    ("KD ResNet34→ResNet18 224² c1000 b16",
     "--teacher ResNet34 --student ResNet18 --stem imagenet --size 224 --batch 16 --classes 1000", 2),
    ("ResNet18 alone 32² c100 b64",
     "--teacher none --student ResNet18 --stem cifar --size 32 --batch 64 --classes 100", 3),
    ("ResNet18 alone 224² c1000 b16",
     "--teacher none --student ResNet18 --stem imagenet --size 224 --batch 16 --classes 1000", 2),
    ("KD PPLCNet_x2_5→PPLCNet_x1_0 224² c1000 b16",
     "--teacher PPLCNet_x2_5 --student PPLCNet_x1_0 --size 224 --batch 16 --classes 1000", 3),
    ("KD MobileNetV3_large_x1_0→small_x1_0 224² c1000 b16",
     "--teacher MobileNetV3_large_x1_0 --student MobileNetV3_small_x1_0 --size 224 --batch 16 --classes 1000", 3),
]
# exported student (kd-launch export: BN folded) vs torch eval vs onnxruntime on the export
INFER_CASES = [
    ("ResNet18", "cifar", 32, 64, 100),
    ("ResNet18", "imagenet", 224, 16, 1000),
    ("ResNet18", "imagenet", 224, 1, 1000),
    ("ResNet18", "imagenet", 224, 32, 1000),
    ("PPLCNet_x1_0", None, 224, 1, 1000),
    ("PPLCNet_x1_0", None, 224, 32, 1000),
    ("MobileNetV3_small_x1_0", None, 224, 1, 1000),
    ("MobileNetV3_small_x1_0", None, 224, 32, 1000),
]


def cpu_busy(interval=1.0):
    """Fraction of the machine's CPU time busy over `interval` seconds (/proc/stat)."""
    def read():
        v = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        return sum(v), v[3] + v[4]
    t0, i0 = read()
    time.sleep(interval)
    t1, i1 = read()
    return 1 - (i1 - i0) / max(t1 - t0, 1)


def wait_idle(limit=0.10, timeout=300):
    """Waits until the machine is idle (< `limit` busy for a second); returns the last reading."""
    start = time.time()
    busy = cpu_busy()
    while busy > limit and time.time() - start < timeout:
        busy = cpu_busy()
    return busy


def run(cmd, env=None):
    """Runs `cmd`; returns (stdout, peak RSS in MB, CPU share of other processes meanwhile)."""
    def stat():
        v = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        return sum(v), sum(v) - v[3] - v[4]
    tick = os.sysconf("SC_CLK_TCK")
    total0, busy0 = stat()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    total1, busy1 = stat()
    if status != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
    own = (ru.ru_utime + ru.ru_stime) * tick
    other = max(0.0, (busy1 - busy0) - own) / max(total1 - total0, 1)
    return out, ru.ru_maxrss / 1024, other


def result(out, key):
    for line in out.splitlines():
        if line.startswith("RESULT"):
            for f in line.split():
                if f.startswith(key + "="):
                    return float(f.split("=", 1)[1])
    raise RuntimeError(f"no {key} in:\n{out[-2000:]}")


def peak_gflops(threads):
    code = f"""
import time, torch
torch.set_num_threads({threads})
best = 0
a, b = torch.randn(4096, 4096), torch.randn(4096, 4096)
for _ in range(3):
    t = time.perf_counter(); a @ b; best = max(best, 2 * 4096**3 / (time.perf_counter() - t))
x, w = torch.randn(32, 256, 28, 28), torch.randn(256, 256, 3, 3)
for _ in range(3):
    t = time.perf_counter(); torch.nn.functional.conv2d(x, w, padding=1)
    best = max(best, 2 * 32 * 256 * 28 * 28 * 256 * 9 / (time.perf_counter() - t))
print(best / 1e9)
"""
    return float(subprocess.check_output([sys.executable, "-c", code], text=True).split()[-1])


def flops_per_image(args, infer=False):
    """Forward + backward FLOPs of one step per image, counted by PyTorch on its model."""
    code = f"""
import sys; sys.argv = ['x'] + {args.split()!r} + {['--infer'] if infer else []!r}
sys.path.insert(0, {os.path.join(ROOT, 'bench')!r})
import torch, torch_kd_step as t
from torch.utils.flop_counter import FlopCounterMode
import argparse
ns = dict(zip(sys.argv[1::2], sys.argv[2::2]))
b, c, s = int(ns['--batch']), int(ns['--classes']), int(ns['--size'])
st = t.build(ns['--student'], c, ns.get('--stem', 'cifar'))
te = None if ns.get('--teacher', 'none') == 'none' or {infer!r} else t.build(ns['--teacher'], c, ns.get('--stem', 'cifar')).eval()
x = torch.randn(b, 3, s, s)
with FlopCounterMode(display=False) as m:
    if {infer!r}:
        st.eval()
        with torch.no_grad(): st(x)
    else:
        y = st(x)
        if te is not None:
            with torch.no_grad(): te(x)
        y.sum().backward()
print(m.get_total_flops() / b)
"""
    return float(subprocess.check_output([sys.executable, "-c", code], text=True).split()[-1])


def median_spread(xs):
    m = statistics.median(xs)
    return m, 100 * (max(xs) - min(xs)) / m


def export_student(work, arch, stem, size, classes):
    """A kd-launch export of `arch` (one short epoch on 64 quickstart images; weights do not
    matter for speed), BN folded as every export is."""
    d = os.path.join(work, f"{arch}-{stem}-{size}")
    if os.path.isdir(os.path.join(d, "inference")):
        return d
    lst = os.path.join(work, "train.txt")
    if not os.path.exists(lst):
        with open(os.path.join(ROOT, "dataset/fashion-mnist/train_list.txt")) as f:
            open(lst, "w").writelines(f.readlines()[:64])
    o = ["-o", f"Arch.name={arch}", "-o", f"Arch.class_num={classes}"]
    if stem:
        o += ["-o", f"Arch.stem={stem}"]
    cfg = os.path.join(ROOT, "configs/quickstart/student.yaml")
    subprocess.run([KD, "train", "-c", cfg, *o, "-o", "Global.epochs=1", "-o", f"Global.output_dir={d}",
                    "-o", "Global.eval_during_train=False", "-o", f"DataLoader.Train.dataset.cls_label_path={lst}"],
                   check=True, capture_output=True, cwd=ROOT)
    subprocess.run([KD, "export", "-c", cfg, *o, "-o", f"Global.pretrained_model={d}/{arch}/latest",
                    "-o", f"Global.save_inference_dir={d}/inference", "-o", f"Global.image_shape=[3, {size}, {size}]"],
                   check=True, capture_output=True, cwd=ROOT)
    return d


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default="", help="run only cases whose name contains this")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench/results/compare.md"))
    ap.add_argument("--no-infer", action="store_true")
    a = ap.parse_args()
    threads = [int(t) for t in a.threads.split(",")]
    import torch
    lines = []

    def emit(line=""):
        print(line, flush=True)
        lines.append(line)

    cpu = subprocess.check_output("lscpu | sed -n 's/^Model name: *//p'", shell=True, text=True).strip()
    avx512 = "avx512f" in open("/proc/cpuinfo").read()
    emit(f"# kd-launch vs PyTorch {torch.__version__} on the CPU")
    emit()
    emit(f"`bench/compare.py --rounds {a.rounds}` on {cpu} ({os.cpu_count()} CPUs, "
         f"{'AVX-512' if avx512 else 'AVX2'}), {time.strftime('%Y-%m-%d', time.gmtime())}, commit "
         + subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip())
    emit()
    peaks = {t: peak_gflops(t) for t in threads}
    emit("fp32 peak (PyTorch's best of a 4096³ GEMM and a 3×3 convolution): "
         + ", ".join(f"{peaks[t]:.0f} GFLOP/s at {t} thread{'s' if t > 1 else ''}" for t in threads))
    emit()
    emit("| case | threads | kd-launch img/s (spread) | PyTorch img/s (spread) | ratio | % of peak kd / torch | peak RSS MB kd / torch | others' CPU |")
    emit("|---|---|---|---|---|---|---|---|")
    for name, args, steps in TRAIN:
        if a.only not in name:
            continue
        fl = flops_per_image(args)
        for t in threads:
            kd, pt, rss_kd, rss_pt, other = [], [], [], [], 0.0
            kd_cmd = [KD_STEP, *args.split(), "--threads", str(t), "--steps", str(steps), "--warmup", "1"]
            pt_cmd = [*TORCH, *args.split(), "--threads", str(t), "--steps", str(steps), "--warmup", "1"]
            for r in range(a.rounds):
                order = [("kd", kd_cmd), ("pt", pt_cmd)]
                if r % 2:
                    order.reverse()
                for who, cmd in order:
                    wait_idle()
                    out, rss, o = run(cmd)
                    other = max(other, o)
                    (kd if who == "kd" else pt).append(result(out, "img_per_s"))
                    (rss_kd if who == "kd" else rss_pt).append(rss)
            (mk, sk), (mp, sp) = median_spread(kd), median_spread(pt)
            pk = 100 * mk * fl / 1e9 / peaks[t]
            pp = 100 * mp * fl / 1e9 / peaks[t]
            emit(f"| {name} | {t} | {mk:.2f} ({sk:.0f} %) | {mp:.2f} ({sp:.0f} %) | **{mk / mp:.2f}** | "
                 f"{pk:.0f} / {pp:.0f} | {max(rss_kd):.0f} / {max(rss_pt):.0f} | {100 * other:.0f} % |")
    if not a.no_infer:
        emit()
        emit("Inference (exported student, BN folded; PyTorch: eval mode, no_grad; onnxruntime: the "
             "export's inference.onnx), img/s:")
        emit()
        emit("| model | input | batch | threads | kd-launch | PyTorch | onnxruntime | kd / torch | kd / ort |")
        emit("|---|---|---|---|---|---|---|---|---|")
        work = tempfile.mkdtemp(prefix="kd-bench-")
        try:
            for arch, stem, size, batch, classes in INFER_CASES:
                label = f"{arch} {size}² b{batch}"
                if a.only not in label:
                    continue
                d = export_student(work, arch, stem, size, classes)
                runs = 20 if batch * size * size <= 64 * 32 * 32 else 6
                for t in threads:
                    kd, pt, ort = [], [], []
                    cmds = [
                        ("kd", [INFER, "--model", f"{d}/inference", "--batch", str(batch), "--size", str(size),
                                "--threads", str(t), "--runs", str(runs)]),
                        ("pt", [*TORCH, "--infer", "--student", arch, "--stem", stem or "cifar", "--size", str(size),
                                "--batch", str(batch), "--classes", str(classes), "--threads", str(t),
                                "--steps", str(runs), "--warmup", "3"]),
                        ("ort", [*ONNX, "--model", f"{d}/inference/inference.onnx", "--batch", str(batch),
                                 "--size", str(size), "--threads", str(t), "--runs", str(runs)]),
                    ]
                    for r in range(a.rounds):
                        for who, cmd in (cmds if r % 2 == 0 else cmds[::-1]):
                            wait_idle()
                            out, _, _ = run(cmd)
                            v = result(out, "img_per_s") if who == "pt" else batch * 1e3 / result(out, "median_ms")
                            {"kd": kd, "pt": pt, "ort": ort}[who].append(v)
                    mk, mp, mo = (statistics.median(v) for v in (kd, pt, ort))
                    emit(f"| {arch} | {size}² | {batch} | {t} | {mk:.1f} | {mp:.1f} | {mo:.1f} | **{mk / mp:.2f}** | {mk / mo:.2f} |")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
