//! Teachers from other frameworks' files through the real binary: `pretrained: True` resolved in
//! the weights directory (and the error when the file is not there), and the frozen-teacher
//! check before step 1, which must call a teacher at chance level out and report a good one.

mod common;

use common::{data_section, global, make_dataset, write};
use kd_engine::arch::Backbone;
use kd_engine::arch::{ModelSpec, Pretrained};
use kd_engine::burn::backend::Flex;
use kd_engine::config::Node;
use kd_engine::weights::named as weights;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs kd-launch; returns (success, stdout + stderr).
fn run_all(args: &[&str]) -> (bool, String) {
    let out = Command::new(common::BIN)
        .args(args)
        .env("KD_THREADS", "2")
        .output()
        .expect("kd-launch runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn kd_config(dir: &Path, data: &Path, out: &Path, classes: usize, teacher: &str) -> String {
    kd_config_with(dir, data, out, classes, teacher, "{name: resnet8}")
}

fn kd_config_with(
    dir: &Path,
    data: &Path,
    out: &Path,
    classes: usize,
    teacher: &str,
    student: &str,
) -> String {
    let cfg = format!(
        "{}Arch:\n  name: DistillationModel\n  class_num: {classes}\n  freeze_params_list: [True, False]\n  models:\n    - Teacher: {teacher}\n    - Student: {student}\n  infer_model_name: Student\nLoss:\n  Train:\n    - DistillationGTCELoss: {{weight: 1.0, model_names: [Student]}}\n    - DistillationKLDivLoss: {{weight: 1.0, model_name_pairs: [[Student, Teacher]], temperature: 4}}\n  Eval:\n    - CELoss: {{weight: 1.0}}\nMetric:\n  Eval:\n    - DistillationTopkAcc: {{model_key: Student, topk: [1, 2]}}\n{}",
        global(out, 1),
        data_section(data)
    );
    write(&dir.join("kd.yaml"), &cfg)
        .to_str()
        .unwrap()
        .to_string()
}

#[test]
fn teacher_check_calls_out_a_teacher_at_chance_and_reports_a_real_one() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 4, 3); // 6 validation images, 2 per class
                               // A resnet8 teacher that answers class 0 whatever it sees: zero classifier weights and a
                               // bias for class 0, written as a safetensors file in kd-launch's naming.
    let spec = ModelSpec {
        key: "Teacher".into(),
        name: "resnet8".into(),
        class_num: 3,
        pretrained: Pretrained::None,
        return_patterns: vec![],
        frozen: true,
        params: Node::root(
            serde_yaml::from_str("{name: resnet8}").unwrap(),
            Path::new("t.yaml"),
        ),
    };
    let model = Backbone::<Flex>::from_spec(&spec, &Default::default()).unwrap();
    let mut tensors = weights::named_tensors(&model);
    tensors
        .get_mut("ResNet.fc.weight")
        .unwrap()
        .values
        .fill(0.0);
    tensors.get_mut("ResNet.fc.bias").unwrap().values = vec![5.0, 0.0, 0.0];
    let file = tmp.path().join("always_zero.safetensors");
    std::fs::write(&file, weights::save_safetensors(&tensors, None).unwrap()).unwrap();
    let teacher = format!("{{name: resnet8, pretrained: {}}}", file.display());
    let cfg = kd_config(tmp.path(), &data, &tmp.path().join("out"), 3, &teacher);

    // Balanced labels: answering 0 is right 2 times in 6, exactly chance for 3 classes.
    let (ok, log) = run_all(&["train", "-c", &cfg]);
    assert!(ok, "{log}");
    assert!(log.contains("loaded pretrained weights"), "{log}");
    assert!(
        log.contains(
            "frozen model Teacher scores top-1 0.3333 on 6 eval images, about chance (0.3333)"
        ),
        "{log}"
    );
    // Every validation image labelled 0: the same teacher is now right every time.
    let list = std::fs::read_to_string(data.join("val_list.txt")).unwrap();
    let zeros: String = list
        .lines()
        .map(|l| format!("{} 0\n", l.split(' ').next().unwrap()))
        .collect();
    std::fs::write(data.join("val_list.txt"), zeros).unwrap();
    let cfg = kd_config(tmp.path(), &data, &tmp.path().join("out2"), 3, &teacher);
    let (ok, log) = run_all(&["train", "-c", &cfg]);
    assert!(ok, "{log}");
    assert!(
        log.contains("frozen model Teacher: top-1 1.0000 on the first 6 eval images"),
        "{log}"
    );
    assert!(!log.contains("about chance"), "{log}");
}

/// A 3-class dataset under `root/data`, and PaddleClas's PPLCNet_x0_25 (10 classes, as written
/// by paddle.save) under the released file's name in `root/weights`.
fn data_and_released_weights(root: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let data = root.join("data");
    make_dataset(&data, 4, 3);
    let weights_dir = root.join("weights");
    std::fs::create_dir_all(&weights_dir).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/data/interop/PPLCNet_x0_25_paddleclas.pdparams.gz");
    let mut bytes = vec![];
    flate2::read::GzDecoder::new(std::fs::File::open(fixture).unwrap())
        .read_to_end(&mut bytes)
        .unwrap();
    let released = weights_dir.join("PPLCNet_x0_25_pretrained.pdparams");
    std::fs::write(&released, bytes).unwrap();
    (data, weights_dir, released)
}

#[test]
fn pretrained_true_loads_the_released_file_or_says_where_to_get_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, weights_dir, released) = data_and_released_weights(tmp.path());
    let cfg = kd_config(
        tmp.path(),
        &data,
        &tmp.path().join("out"),
        10,
        "{name: PPLCNet_x0_25, pretrained: True}",
    );
    let dir_opt = format!("Global.pretrained_dir={}", weights_dir.display());

    let (ok, log) = run_all(&["check", "-c", &cfg, "-o", &dir_opt]);
    assert!(ok, "{log}");
    assert!(
        log.contains(&format!("released weights {}", released.display())),
        "{log}"
    );

    // Elsewhere: refused before any work, naming the file, the directory and the publisher.
    let empty = tmp.path().join("empty");
    let (ok, log) = run_all(&[
        "train",
        "-c",
        &cfg,
        "-o",
        &format!("Global.pretrained_dir={}", empty.display()),
    ]);
    assert!(!ok, "{log}");
    for needle in [
        "PPLCNet_x0_25_pretrained.pdparams",
        &empty.display().to_string(),
        "https://paddle-imagenet-models-name.bj.bcebos.com/dygraph/legendary_models/PPLCNet_x0_25_pretrained.pdparams",
    ] {
        assert!(log.contains(needle), "{needle} not in {log}");
    }
    assert!(
        !tmp.path().join("out").exists(),
        "nothing written on refusal"
    );

    let (ok, log) = run_all(&["train", "-c", &cfg, "-o", &dir_opt]);
    assert!(ok, "{log}");
    assert!(
        log.contains(&format!(
            "model Teacher: loaded pretrained weights {}",
            released.display()
        )),
        "{log}"
    );
    assert!(log.contains("frozen model Teacher"), "{log}");
}

#[test]
fn a_student_may_start_from_weights_for_another_class_count_a_teacher_may_not() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, weights_dir, _) = data_and_released_weights(tmp.path());
    let dir_opt = format!("Global.pretrained_dir={}", weights_dir.display());
    // ImageNet-style weights (10 classes here) for a 3-class student: a fresh classifier.
    let cfg = kd_config_with(
        tmp.path(),
        &data,
        &tmp.path().join("out"),
        3,
        "{name: resnet8}",
        "{name: PPLCNet_x0_25, pretrained: True}",
    );
    let (ok, log) = run_all(&["train", "-c", &cfg, "-o", &dir_opt]);
    assert!(ok, "{log}");
    assert!(
        log.contains("PPLCNet.fc.weight has shape [1280, 10], the model [1280, 3]: the classifier keeps its initial weights"),
        "{log}"
    );
    // The same file for a frozen 3-class teacher: refused, the head named.
    let cfg = kd_config(
        tmp.path(),
        &data,
        &tmp.path().join("out2"),
        3,
        "{name: PPLCNet_x0_25, pretrained: True}",
    );
    let (ok, log) = run_all(&["train", "-c", &cfg, "-o", &dir_opt]);
    assert!(!ok, "{log}");
    assert!(
        log.contains("PPLCNet.fc.weight: expected [1280, 3], file has [1280, 10]"),
        "{log}"
    );
}
