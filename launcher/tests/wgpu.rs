//! The GPU code path on burn-wgpu (feature `wgpu`): burn's own convolution and BatchNorm kernels
//! instead of kd-launch's CPU ones, tensors and the frozen teacher on a device, host↔device
//! transfers for batches, gradients and checkpoints. On a machine without a GPU the adapter is
//! Mesa's lavapipe (Vulkan on the CPU; `tools/test.sh` installs it), so the models and data here
//! are tiny: lavapipe runs the quickstart's KD step about 16 times slower than the CPU backend.
#![cfg(feature = "wgpu")]

mod common;

use common::{infer_lines, kd_config, make_dataset, max_rel_diff, run, student_weights, BIN};
use std::path::Path;
use std::process::Command;

fn wgpu_config(dir: &Path, name: &str, data: &Path, out: &Path, epochs: usize) -> String {
    let cfg = kd_config(dir, name, data, out, epochs, 4, "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("device: cpu", "device: wgpu");
    std::fs::write(&cfg, text).unwrap();
    cfg.to_str().unwrap().to_string()
}

fn logits_of(lines: &[serde_json::Value]) -> Vec<(String, Vec<f64>)> {
    lines
        .iter()
        .map(|l| {
            (
                l["file_name"].as_str().unwrap().to_string(),
                serde_json::from_value(l["logits"].clone()).unwrap(),
            )
        })
        .collect()
}

/// Train (KD, teacher frozen on the device) → eval → export → infer: the export, run by the CPU
/// backend, gives the logits the wgpu backend gives from the same checkpoint (1e-4).
#[test]
fn train_eval_export_infer_on_wgpu() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = dir.join("data");
    make_dataset(&data, 4, 3);
    let out = dir.join("out");
    let cfg = wgpu_config(dir, "kd.yaml", &data, &out, 1);
    let log = run(&["train", "-c", &cfg]);
    assert!(log.contains("done: 1 epochs"), "{log}");
    let best = out.join("DistillationModel/best_model");
    let ckpt = format!("Global.pretrained_model={}", best.display());
    let ev = run(&["eval", "-c", &cfg, "-o", &ckpt]);
    assert!(ev.contains("eval: 6 samples"), "{ev}");
    let exp = run(&["export", "-c", &cfg, "-o", &ckpt]);
    assert!(exp.contains("exported model Student"), "{exp}");
    let on_cpu = logits_of(&infer_lines(&run(&[
        "infer",
        "--model",
        out.join("inference").to_str().unwrap(),
        "--images",
        data.join("val").to_str().unwrap(),
        "--logits",
    ])));
    let on_wgpu = logits_of(&infer_lines(&run(&[
        "infer", "-c", &cfg, "-o", &ckpt, "--logits",
    ])));
    assert_eq!(on_cpu.len(), 6);
    assert_eq!(on_cpu.len(), on_wgpu.len());
    for ((fa, la), (fb, lb)) in on_cpu.iter().zip(&on_wgpu) {
        assert_eq!(fa, fb);
        for (x, y) in la.iter().zip(lb) {
            assert!(
                (x - y).abs() <= 1e-4 * (1.0 + x.abs()),
                "{fa}: {la:?} vs {lb:?}"
            );
        }
    }
}

/// Two workers on the one adapter (`--gpus 0,0`), gradients over the launcher's TCP collective:
/// both finish, rank 1 ran on wgpu, and the replicas' per-epoch fingerprint check passed.
/// Resuming the two-worker run from its epoch-1 checkpoint reaches the weights a straight
/// two-epoch run reaches (1e-5: the same kernels on the same data, in the same order).
#[test]
fn two_workers_on_one_adapter_and_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = dir.join("data");
    make_dataset(&data, 4, 3);
    let launch = |cfg: &str, extra: &[&str]| {
        let mut args = vec!["--gpus", "0,0", "train", "-c", cfg];
        args.extend_from_slice(extra);
        run(&args);
    };
    let straight_out = dir.join("straight");
    let straight = wgpu_config(dir, "straight.yaml", &data, &straight_out, 2);
    launch(&straight, &[]);
    let log1 = std::fs::read_to_string(straight_out.join("workerlog.1")).unwrap();
    assert!(
        log1.contains("rank 1 (tcp)") && log1.contains("wgpu"),
        "rank 1's log:\n{log1}"
    );

    let resumed_out = dir.join("resumed");
    let first = wgpu_config(dir, "first.yaml", &data, &resumed_out, 1);
    launch(&first, &[]);
    let resumed = wgpu_config(dir, "resumed.yaml", &data, &resumed_out, 2);
    let latest = resumed_out.join("DistillationModel/latest");
    launch(
        &resumed,
        &["-o", &format!("Global.checkpoints={}", latest.display())],
    );
    let a = student_weights(
        Path::new(&straight),
        &straight_out.join("DistillationModel/latest"),
        &dir.join("e1"),
    );
    let b = student_weights(Path::new(&resumed), &latest, &dir.join("e2"));
    let (d, name) = max_rel_diff(&a, &b, |_| true);
    assert!(d <= 1e-5, "resumed run differs by {d} (relative) in {name}");
}

/// No Vulkan driver, or an adapter id beyond the list: a clear error before anything is
/// written, naming what to install or which adapters there are.
#[test]
fn a_missing_or_unknown_adapter_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = dir.join("data");
    make_dataset(&data, 2, 3);
    let out = dir.join("out");
    let cfg = wgpu_config(dir, "kd.yaml", &data, &out, 1);
    let attempt = |args: &[&str], env: &[(&str, &str)]| {
        let o = Command::new(BIN)
            .args(args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let no_driver = [
        ("VK_DRIVER_FILES", "/nonexistent.json"),
        ("VK_ICD_FILENAMES", "/nonexistent.json"),
    ];
    let err = attempt(&["train", "-c", &cfg], &no_driver);
    assert!(
        err.contains("no Vulkan adapter") && err.contains("mesa-vulkan-drivers"),
        "{err}"
    );
    let err = attempt(&["--gpus", "7", "train", "-c", &cfg], &[]);
    assert!(
        err.contains("--gpus 7: wgpu lists") && err.contains("adapter(s) here, ids 0 to"),
        "{err}"
    );
    assert!(!out.join("DistillationModel").exists(), "nothing written");
}
