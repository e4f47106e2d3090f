//! Non-finite weights and outputs through the real binary: a run whose learning rate diverges
//! stops at the first eval that meets NaN, before any checkpoint of that epoch, with one or two
//! workers; a frozen model with NaN weights stops every rank at the first step; `eval` and
//! `export` refuse a checkpoint holding NaN.

mod common;

use common::{kd_config, make_dataset, student_weights, write, BIN};
use kd_engine::arch::{Backbone, ModelSpec, Pretrained};
use kd_engine::burn::backend::Flex;
use kd_engine::burn::module::Module;
use kd_engine::config::Node;
use kd_engine::weights::named::{load_named, named_tensors, save_safetensors};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs kd-launch; returns (exit code, stdout + stderr).
fn run_status(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("KD_THREADS", "2")
        .output()
        .expect("kd-launch runs");
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn state(ckpt: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(ckpt.join("state.json")).unwrap()).unwrap()
}

/// The learning rate of [`diverging_config`]: with 6 steps per epoch, a warm-up of 5 steps
/// (round(0.84 × 6)) shifts Piecewise's boundary at epoch 1 to the 12th step, the last of epoch
/// 2. Every step's loss is finite (the last one's is computed before its update); that update,
/// at a rate beyond f32's range, makes the weights infinite, which only epoch 2's eval can see.
/// (A rate of 1e38 gives weights that are huge but finite, and eval logits near 1e37 with two
/// workers: not yet non-finite.)
const DIVERGING_LR: &str = "lr: {name: Piecewise, learning_rate: 0.01, decay_epochs: [1], values: [0.01, 1.0e39], warmup_epoch: 0.84}";

/// A 3-epoch KD config (48 training images: 6 steps per epoch at `batch` × `workers` = 8)
/// whose weights diverge at the last step of epoch 2.
fn diverging_config(dir: &Path, data: &Path, out: &Path, batch: usize) -> PathBuf {
    let cfg = kd_config(dir, "diverging.yaml", data, out, 3, batch, "");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let lr = "lr: {name: MultiStepDecay, learning_rate: 0.01, milestones: [1], gamma: 0.5}";
    assert!(text.contains(lr), "{text}");
    write(&cfg, &text.replace(lr, DIVERGING_LR))
}

/// What a run that diverged in epoch 2 must leave: `best_model` and `latest` from epoch 1, with
/// finite weights, and no checkpoint of epoch 2.
fn assert_epoch_1_kept(cfg: &Path, out: &Path, log: &str) {
    let arch = out.join("DistillationModel");
    let best = state(&arch.join("best_model"));
    assert_eq!(best["best_epoch"], 1, "{best}\n{log}");
    assert_eq!(best["epoch"], 1, "{best}");
    assert_eq!(state(&arch.join("latest"))["epoch"], 1, "{log}");
    assert!(arch.join("epoch_1").is_dir());
    assert!(!arch.join("epoch_2").exists(), "{log}");
    // Export refuses non-finite weights: that it works says they are finite; check anyway.
    let weights = student_weights(cfg, &arch.join("best_model"), &out.join("exported"));
    assert!(weights.values().flatten().all(|v| v.is_finite()));
    assert!(
        !log.contains("[Eval][Epoch 2][Avg]"),
        "no metric of epoch 2:\n{log}"
    );
    assert!(log.contains("[Eval][Epoch 1] new best top1"), "{log}");
    assert!(!log.contains("[Eval][Epoch 2] new best"), "{log}");
}

/// The run on one worker: epoch 1 evaluates fine, epoch 2's eval meets NaN logits and
/// a NaN eval loss, and the run stops there naming them, before any checkpoint of epoch 2.
#[test]
fn a_diverging_run_stops_at_the_eval_and_keeps_the_last_good_best_model() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = dir.join("data");
    make_dataset(&data, 16, 3);
    let out = dir.join("out");
    let cfg = diverging_config(dir, &data, &out, 8);
    let (code, log) = run_status(&["train", "-c", cfg.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("[Eval][Epoch 1][Avg]"), "{log}");
    let error = log
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line:\n{log}"));
    assert!(
        error.starts_with(
            "error: eval at epoch 2: non-finite logits of model Student in 24 of 24 images and a \
             non-finite eval loss (CELoss) in 3 of 3 batches: the trained weights diverged: lower \
             the learning rate. No checkpoint of epoch 2 was written; best_model (top1 "
        ) && error.contains(", epoch 1) and latest in "),
        "{error}"
    );
    assert_epoch_1_kept(&cfg, &out, &log);
}

/// The same under `--nproc 2`: every rank fails at the same eval, and the message names the
/// ranks that met NaN.
#[test]
fn two_workers_stop_at_the_same_eval_naming_the_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = dir.join("data");
    make_dataset(&data, 16, 3);
    let out = dir.join("out");
    let cfg = diverging_config(dir, &data, &out, 4);
    let (code, log) = run_status(&["--nproc", "2", "train", "-c", cfg.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains(
            "eval at epoch 2: non-finite logits of model Student on ranks 0 and 1 (rank 0: 12 of \
             12 images, rank 1: 12 of 12 images) and a non-finite eval loss (CELoss) on ranks 0 \
             and 1 (rank 0: 2 of 2 batches, rank 1: 2 of 2 batches): the trained weights \
             diverged"
        ),
        "{log}"
    );
    for r in 0..2 {
        let worker = std::fs::read_to_string(out.join(format!("workerlog.{r}"))).unwrap();
        assert!(
            worker.contains("eval at epoch 2: non-finite logits"),
            "{worker}"
        );
    }
    assert_epoch_1_kept(&cfg, &out, &log);
}

fn resnet8(key: &str, frozen: bool) -> (ModelSpec, Backbone<Flex>) {
    let spec = ModelSpec {
        key: key.into(),
        name: "resnet8".into(),
        class_num: 3,
        pretrained: Pretrained::None,
        return_patterns: vec![],
        frozen,
        params: Node::root(
            serde_yaml::from_str("{name: resnet8}").unwrap(),
            Path::new("t.yaml"),
        ),
    };
    let model = Backbone::<Flex>::from_spec(&spec, &Default::default()).unwrap();
    (spec, model)
}

/// kd-launch's record format (burn's named MessagePack, full precision).
fn recorder(
) -> kd_engine::burn::record::NamedMpkFileRecorder<kd_engine::burn::record::FullPrecisionSettings> {
    kd_engine::burn::record::NamedMpkFileRecorder::new()
}

/// Overwrites tensor `name` of model `key` in checkpoint `ckpt` with NaN.
fn poison(ckpt: &Path, key: &str, name: &str) {
    let dev = Default::default();
    let (_, model) = resnet8(key, false);
    let model = model
        .load_file(ckpt.join(format!("{key}.mpk")), &recorder(), &dev)
        .unwrap();
    let mut tensors = named_tensors(&model);
    tensors.get_mut(name).unwrap().values.fill(f32::NAN);
    load_named(model, &tensors, &dev)
        .unwrap()
        .save_file(ckpt.join(key), &recorder())
        .unwrap();
}

/// `eval` (one and two workers) and `export` of a checkpoint whose student holds NaN: an error
/// naming the model and the tensor, no metric, no export.
#[test]
fn eval_and_export_refuse_a_checkpoint_with_nan_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = dir.join("data");
    make_dataset(&data, 4, 3);
    let out = dir.join("out");
    let cfg = kd_config(dir, "c.yaml", &data, &out, 1, 8, "");
    let cfg = cfg.to_str().unwrap();
    let (code, log) = run_status(&["train", "-c", cfg]);
    assert_eq!(code, Some(0), "{log}");
    let ckpt = out.join("DistillationModel/latest");
    let weights = format!("Global.pretrained_model={}", ckpt.display());
    // The same checkpoint evaluates before it is poisoned.
    let (code, log) = run_status(&["eval", "-c", cfg, "-o", &weights]);
    assert_eq!(code, Some(0), "{log}");
    poison(&ckpt, "Student", "ResNet.fc.bias");

    let (code, log) = run_status(&["eval", "-c", cfg, "-o", &weights]);
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains(
            "error: eval at epoch 1: non-finite logits of model Student in 6 of 6 images and a \
             non-finite eval loss (CELoss) in 1 of 1 batches: the weights hold NaN or infinite \
             values (model Student: ResNet.fc.bias (3 of 3 values)): they diverged in training"
        ),
        "{log}"
    );
    assert!(!log.contains("eval: 6 samples"), "no metric: {log}");

    let (code, log) = run_status(&["--nproc", "2", "eval", "-c", cfg, "-o", &weights]);
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("eval at epoch 1: non-finite logits of model Student on ranks 0 and 1"),
        "{log}"
    );

    // Under mpirun the ranks use MPI collectives behind the same trait, and the same code.
    if cfg!(feature = "mpi") {
        let hosts = write(&dir.join("hosts"), "localhost slots=2\n");
        let hosts = hosts.to_str().unwrap();
        let args = [
            "--hostfile",
            hosts,
            "--np",
            "2",
            "eval",
            "-c",
            cfg,
            "-o",
            &weights,
        ];
        let (code, log) = run_status(&args);
        assert_eq!(code, Some(1), "{log}");
        assert!(
            log.contains("eval at epoch 1: non-finite logits of model Student on ranks 0 and 1"),
            "{log}"
        );
    }

    let export_dir = dir.join("exported");
    let (code, log) = run_status(&[
        "export",
        "-c",
        cfg,
        "-o",
        &weights,
        "-o",
        &format!("Global.save_inference_dir={}", export_dir.display()),
    ]);
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains(&format!(
            "error: {}: the weights of model Student hold NaN or infinite values: ResNet.fc.bias \
             (3 of 3 values); they cannot be exported",
            ckpt.display()
        )),
        "{log}"
    );
    assert!(!export_dir.join("inference.safetensors").exists());
}

/// A frozen teacher whose weights are NaN: refused before step 1 by the teacher check, and
/// without it (`teacher_check_batches: 0`) every rank stops at the first step, naming it and
/// the loss and gradients that follow from it.
#[test]
fn a_teacher_with_nan_weights_stops_training_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let data = dir.join("data");
    make_dataset(&data, 4, 3);
    let (_, teacher) = resnet8("Teacher", true);
    let mut tensors = named_tensors(&teacher);
    tensors
        .get_mut("ResNet.fc.weight")
        .unwrap()
        .values
        .fill(f32::NAN);
    let file = dir.join("nan_teacher.safetensors");
    std::fs::write(&file, save_safetensors(&tensors, None).unwrap()).unwrap();
    let out = dir.join("out");
    let cfg = kd_config(dir, "c.yaml", &data, &out, 1, 4, "");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "- Teacher: {name: resnet8}",
        &format!(
            "- Teacher: {{name: resnet8, pretrained: {}}}",
            file.display()
        ),
    );
    let cfg = write(&cfg, &text);
    let cfg = cfg.to_str().unwrap();

    let (code, log) = run_status(&["train", "-c", cfg]);
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains(
            "error: frozen model Teacher gives non-finite logits for 6 of the first 6 eval images: \
             its weights hold NaN or infinite values: ResNet.fc.weight (192 of 192 values)"
        ),
        "{log}"
    );

    let (code, log) = run_status(&[
        "--nproc",
        "2",
        "train",
        "-c",
        cfg,
        "-o",
        "Global.teacher_check_batches=0",
    ]);
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains(
            "training stopped at epoch 1, iteration 0, before its update: non-finite logits of \
             frozen model Teacher on ranks 0 and 1; non-finite loss on ranks 0 and 1; non-finite \
             gradients on ranks 0 and 1. A frozen model gives non-finite outputs"
        ),
        "{log}"
    );
    assert!(!out.join("DistillationModel/latest").exists(), "{log}");

    // One process: the same checks, without ranks to name.
    let no_check = ["train", "-c", cfg, "-o", "Global.teacher_check_batches=0"];
    let (code, log) = run_status(&no_check);
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains(
            "error: training stopped at epoch 1, iteration 0, before its update: non-finite logits \
             of frozen model Teacher; non-finite loss; non-finite gradients. A frozen model gives \
             non-finite outputs: check its weights (`pretrained`) and the preprocessing. Nothing \
             was saved; the checkpoints already in "
        ),
        "{log}"
    );
}
