//! End to end through the real binary: train a teacher, distill a student (KD), evaluate, export,
//! infer from the export, and resume a stopped run to the same final state (bitwise: the
//! schedule here does not depend on the epoch count, and augmentation is seeded per sample).

mod common;

use common::{data_section, global, infer_lines, make_dataset, run, write};
use serde_json::Value;
use std::path::Path;
use std::process::Command;

const BIN: &str = common::BIN;

#[test]
fn train_distill_eval_export_infer_and_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 8, 3);
    let d = data_section(&data);

    // 1. Teacher alone.
    let t_out = tmp.path().join("teacher");
    let teacher = write(
        &tmp.path().join("teacher.yaml"),
        &format!("{}Arch: {{name: resnet8, class_num: 3}}\nLoss:\n  Train:\n    - CELoss: {{weight: 1.0}}\n  Eval:\n    - CELoss: {{weight: 1.0}}\n{d}", global(&t_out, 2)),
    );
    run(&["train", "-c", teacher.to_str().unwrap()]);
    for name in ["latest", "best_model", "epoch_1", "epoch_2"] {
        let dir = t_out.join("resnet8").join(name);
        for f in ["model.mpk", "optimizer.mpk", "state.json", "config.yaml"] {
            assert!(dir.join(f).is_file(), "missing {}/{f}", dir.display());
        }
    }
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(t_out.join("resnet8/latest/state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["epoch"], 2);
    assert_eq!(state["global_step"], 6); // 24 images / batch 8 × 2 epochs

    // 2. KD student from the frozen teacher.
    let teacher_ckpt = t_out.join("resnet8/best_model");
    let kd_cfg = |out: &Path, epochs: usize| {
        format!(
            "{}Arch:\n  name: DistillationModel\n  class_num: 3\n  freeze_params_list: [True, False]\n  models:\n    - Teacher: {{name: resnet8, pretrained: {}}}\n    - Student: {{name: resnet8}}\n  infer_model_name: Student\nLoss:\n  Train:\n    - DistillationGTCELoss: {{weight: 1.0, model_names: [Student]}}\n    - DistillationKLDivLoss: {{weight: 1.0, model_name_pairs: [[Student, Teacher]], temperature: 4}}\n  Eval:\n    - CELoss: {{weight: 1.0}}\nMetric:\n  Eval:\n    - DistillationTopkAcc: {{model_key: Student, topk: [1, 2]}}\n{d}",
            global(out, epochs),
            teacher_ckpt.display()
        )
    };
    let kd_out = tmp.path().join("kd");
    let kd = write(&tmp.path().join("kd.yaml"), &kd_cfg(&kd_out, 2));
    let kd = kd.to_str().unwrap();
    let check = run(&["check", "-c", kd]);
    assert!(
        check.contains("loss_kldiv_Student_Teacher") && check.contains("frozen"),
        "{check}"
    );
    run(&["train", "-c", kd]);
    let best = kd_out.join("DistillationModel/best_model");
    assert!(best.join("Teacher.mpk").is_file() && best.join("Student.mpk").is_file());

    // 3. Eval of the saved checkpoint.
    let ev = run(&[
        "eval",
        "-c",
        kd,
        "-o",
        &format!("Global.pretrained_model={}", best.display()),
    ]);
    assert!(ev.contains("top1"), "{ev}");
    // Global.pretrained_model wins over a model's own `pretrained` (here: the teacher's weights).
    let ev_override = run(&[
        "eval",
        "-c",
        kd,
        "-o",
        &format!("Global.pretrained_model={}", best.display()),
        &format!(
            "Arch.models.1.Student.pretrained={}",
            teacher_ckpt.display()
        ),
    ]);
    assert_eq!(ev, ev_override);

    // 4. Export, then infer from the export alone and from config + checkpoint: same answers.
    let exp = run(&[
        "export",
        "-c",
        kd,
        "-o",
        &format!("Global.pretrained_model={}", best.display()),
    ]);
    assert!(exp.contains("exported model Student"), "{exp}");
    let inf_dir = kd_out.join("inference");
    assert!(
        inf_dir.join("inference.safetensors").is_file() && inf_dir.join("inference.json").is_file()
    );
    let from_export = infer_lines(&run(&[
        "infer",
        "--model",
        inf_dir.to_str().unwrap(),
        "--images",
        data.join("val").to_str().unwrap(),
    ]));
    let from_config = infer_lines(&run(&[
        "infer",
        "-c",
        kd,
        "-o",
        &format!("Global.pretrained_model={}", best.display()),
    ]));
    assert_eq!(from_export.len(), 12);
    assert_eq!(from_export.len(), from_config.len());
    for (a, b) in from_export.iter().zip(&from_config) {
        assert_eq!(a["file_name"], b["file_name"]);
        assert_eq!(a["class_ids"], b["class_ids"]);
        let sa: Vec<f64> = serde_json::from_value(a["scores"].clone()).unwrap();
        let sb: Vec<f64> = serde_json::from_value(b["scores"].clone()).unwrap();
        assert_eq!(sa.len(), 2);
        assert!(sa[0] >= sa[1] && sa[0] <= 1.0 && sa[1] >= 0.0);
        for (x, y) in sa.iter().zip(&sb) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
        let names: Vec<String> = serde_json::from_value(a["label_names"].clone()).unwrap();
        assert!(names[0].starts_with("band"));
    }

    // 5. Resume: 1 epoch, then resume to 2 epochs == 2 epochs straight (same seed).
    let r_out = tmp.path().join("resumed");
    let r_cfg = write(&tmp.path().join("resume.yaml"), &kd_cfg(&r_out, 2));
    let r_cfg = r_cfg.to_str().unwrap();
    run(&["train", "-c", r_cfg, "-o", "Global.epochs=1"]);
    let latest = r_out.join("DistillationModel/latest");
    run(&[
        "train",
        "-c",
        r_cfg,
        "-o",
        &format!("Global.checkpoints={}", latest.display()),
    ]);
    // Records carry random parameter ids, so compare the weights through exports (names → values).
    let export_of = |ckpt: &Path, dir: &Path| {
        run(&[
            "export",
            "-c",
            r_cfg,
            "-o",
            &format!("Global.pretrained_model={}", ckpt.display()),
            &format!("Global.save_inference_dir={}", dir.display()),
        ]);
        std::fs::read(dir.join("inference.safetensors")).unwrap()
    };
    let straight = export_of(
        &kd_out.join("DistillationModel/latest"),
        &tmp.path().join("exp_straight"),
    );
    let resumed = export_of(&latest, &tmp.path().join("exp_resumed"));
    assert!(
        straight == resumed,
        "resumed run's student differs from the uninterrupted run's"
    );
    let s1: Value =
        serde_json::from_str(&std::fs::read_to_string(latest.join("state.json")).unwrap()).unwrap();
    assert_eq!(s1["epoch"], 2);
}

/// A key that nothing reads is warned about, with the key it resembles: by `check` in its report,
/// and by `train` once, before the first step (a misspelt section as much as a misspelt key in
/// one). A config without one gets no such warning.
#[test]
fn unknown_keys_are_warned_about_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 4, 3);
    let text = format!(
        "{}Arch: {{name: resnet8, class_num: 3}}\nLoss:\n  Train:\n    - CELoss: {{weight: 1.0}}\n{}",
        global(&tmp.path().join("out"), 1),
        data_section(&data)
    );
    let clean = write(&tmp.path().join("clean.yaml"), &text);
    let check = run(&["check", "-c", clean.to_str().unwrap()]);
    assert!(!check.contains("unknown key"), "{check}");

    let typo = write(
        &tmp.path().join("typo.yaml"),
        &(text.replace("Global:\n", "Global:\n  epoch: 5\n") + "Globl:\n  epochs: 2\n"),
    );
    let warnings = [
        format!(
            "{}: Global.epoch: unknown key, ignored; did you mean `Global.epochs`?",
            typo.display()
        ),
        format!(
            "{}: Globl: unknown key, ignored; did you mean `Global`?",
            typo.display()
        ),
    ];
    let check = run(&["check", "-c", typo.to_str().unwrap()]);
    for warning in &warnings {
        assert!(check.contains(&format!("warning: {warning}\n")), "{check}");
    }
    let out = Command::new(BIN)
        .args(["train", "-c", typo.to_str().unwrap()])
        .env("KD_THREADS", "2")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    let first_step = log.find("[Train]").expect("a training log line");
    for warning in &warnings {
        assert_eq!(log.matches(warning.as_str()).count(), 1, "{log}");
        assert!(log.find(warning.as_str()).unwrap() < first_step, "{log}");
    }
}

/// A value the config layer rejects (here a negative learning rate, in the file) stops `train`
/// before any step, naming the file and the key, with nothing written under `output_dir`.
#[test]
fn invalid_values_stop_training_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 4, 3);
    let out = tmp.path().join("out");
    let cfg = write(
        &tmp.path().join("c.yaml"),
        &format!(
            "{}Arch: {{name: resnet8, class_num: 3}}\nLoss:\n  Train:\n    - CELoss: {{weight: 1.0}}\n{}",
            global(&out, 1),
            data_section(&data).replace("learning_rate: 0.05", "learning_rate: -0.05")
        ),
    );
    let run = Command::new(BIN)
        .args(["train", "-c", cfg.to_str().unwrap()])
        .env("KD_THREADS", "2")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{log}");
    assert!(!log.contains("[Train]"), "{log}");
    assert!(
        log.contains(&format!(
            "{}: Optimizer.lr.learning_rate: must be positive",
            cfg.display()
        )),
        "{log}"
    );
    assert!(!out.exists(), "{} was written", out.display());
}

#[test]
fn bad_inputs_fail_with_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write(
        &tmp.path().join("c.yaml"),
        "Arch: {name: resnet8}\nLoss:\n  Train:\n    - DistillationDKDLoss: {temperature: abc}\n",
    );
    let out = Command::new(BIN)
        .args(["check", "-c", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("c.yaml") && err.contains("Loss.Train[0].DistillationDKDLoss.temperature"),
        "{err}"
    );

    let out = Command::new(BIN)
        .args([
            "check",
            "-c",
            cfg.to_str().unwrap(),
            "-o",
            "Arch.name=ResNet19",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown backbone") && err.contains("ResNet18"),
        "{err}"
    );

    let out = Command::new(BIN)
        .args([
            "check",
            "-c",
            tmp.path().join("missing.yaml").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.yaml"));
}

/// Ctrl-C (SIGINT) during training stops after the current step with a resumable `latest`
/// recording the position inside the epoch; resuming finishes the run.
#[test]
fn sigint_leaves_a_resumable_checkpoint() {
    use std::io::{BufRead, BufReader};
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 32, 3); // 96 images: 12 iterations per epoch
    let out = tmp.path().join("out");
    let cfg = write(
        &tmp.path().join("c.yaml"),
        &format!(
            "{}Arch: {{name: resnet8, class_num: 3}}\nLoss:\n  Train:\n    - CELoss: {{weight: 1.0}}\n{}",
            global(&out, 50).replace("print_batch_step: 2", "print_batch_step: 1"),
            data_section(&data)
        ),
    );
    let mut child = Command::new(BIN)
        .args(["train", "-c", cfg.to_str().unwrap()])
        .env("KD_THREADS", "1")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    // Wait until training is under way (second epoch), then interrupt.
    for line in lines.by_ref() {
        if line.unwrap().contains("[Train][Epoch 2/50][Iter: 1/") {
            break;
        }
    }
    unsafe {
        libc_kill(child.id() as i32, 2);
    }
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{rest:?}");
    assert!(
        rest.iter().any(|l| l.contains("stopped on request")),
        "{rest:?}"
    );
    let latest = out.join("resnet8/latest");
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(latest.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["epoch"], 1, "{state}");
    assert!(state["step_in_epoch"].as_u64().unwrap() > 0, "{state}");
    let resumed = run(&[
        "train",
        "-c",
        cfg.to_str().unwrap(),
        "-o",
        "Global.epochs=3",
        &format!("Global.checkpoints={}", latest.display()),
    ]);
    assert!(resumed.contains("done: 3 epochs"), "{resumed}");

    // The interrupted-and-resumed run ends where an uninterrupted one does (bitwise).
    let straight_out = tmp.path().join("straight");
    run(&[
        "train",
        "-c",
        cfg.to_str().unwrap(),
        "-o",
        "Global.epochs=3",
        &format!("Global.output_dir={}", straight_out.display()),
    ]);
    let export_of = |ckpt: &Path, dir: &Path| {
        let o = [
            format!("Global.pretrained_model={}", ckpt.display()),
            format!("Global.save_inference_dir={}", dir.display()),
        ];
        run(&["export", "-c", cfg.to_str().unwrap(), "-o", &o[0], &o[1]]);
        std::fs::read(dir.join("inference.safetensors")).unwrap()
    };
    let a = export_of(&latest, &tmp.path().join("exp_resumed"));
    let b = export_of(
        &straight_out.join("resnet8/latest"),
        &tmp.path().join("exp_straight"),
    );
    assert!(
        a == b,
        "mid-epoch resume differs from the uninterrupted run"
    );
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}
