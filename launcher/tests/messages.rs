//! What the user reads when inputs or the disk fail, through the real binary: a checkpoint of
//! another architecture, a truncated record, a full disk under the output directory, a label
//! beyond `class_num`, a path with a space. Each says what is wrong and what to do, and no panic
//! text or burn internals ever reach stderr.

mod common;

use common::{data_section, global, make_dataset, run, write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = common::BIN;

/// Runs kd-launch expecting failure; returns its stderr.
fn run_failing(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .env("KD_THREADS", "2")
        .output()
        .expect("kd-launch runs");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "kd-launch {args:?} succeeded:\n{err}"
    );
    assert_clean(&err);
    err
}

/// No panic text and none of burn's misleading advice.
fn assert_clean(stderr: &str) {
    for banned in [
        "panicked",
        "RUST_BACKTRACE",
        "record-backward-compat",
        "0.14.0",
    ] {
        assert!(!stderr.contains(banned), "`{banned}` in stderr:\n{stderr}");
    }
}

/// A plain classifier config (`arch`, 3 classes) training `epochs` epochs into `out`.
fn config(dir: &Path, name: &str, data: &Path, out: &Path, arch: &str, epochs: usize) -> PathBuf {
    write(
        &dir.join(name),
        &format!(
            "{}Arch: {{name: {arch}, class_num: 3}}\nLoss:\n  Train:\n    - CELoss: {{weight: 1.0}}\n  Eval:\n    - CELoss: {{weight: 1.0}}\n{}",
            global(out, epochs),
            data_section(data)
        ),
    )
}

/// A checkpoint of another architecture is refused in kd-launch's words, with no panic text
/// (burn asserts on it); a truncated model or optimizer record is called truncated, with its
/// size and the other checkpoints to use instead.
#[test]
fn a_foreign_or_truncated_checkpoint_is_named_without_panic_text() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 4, 3);
    let deep_out = tmp.path().join("deep");
    let deep = config(tmp.path(), "deep.yaml", &data, &deep_out, "resnet14", 1);
    run(&["train", "-c", deep.to_str().unwrap()]);
    let out = tmp.path().join("out");
    let cfg = config(tmp.path(), "c.yaml", &data, &out, "resnet8", 1);
    let cfg = cfg.to_str().unwrap();
    run(&["train", "-c", cfg]);

    // resnet14's checkpoint into resnet8: as the trained weights (eval), and as a model's
    // `pretrained` (train).
    let foreign = deep_out.join("resnet14/latest");
    let err = run_failing(&[
        "eval",
        "-c",
        cfg,
        "-o",
        &format!("Global.pretrained_model={}", foreign.display()),
    ]);
    assert!(
        err.contains(&format!(
            "loading weights for model model from {}/model.mpk: the file holds a model of a \
             different structure (another backbone or depth?)",
            foreign.display()
        )),
        "{err}"
    );
    let err = run_failing(&[
        "train",
        "-c",
        cfg,
        "-o",
        &format!("Arch.pretrained={}", foreign.display()),
    ]);
    assert!(err.contains("different structure"), "{err}");

    // A truncated model record.
    let arch_dir = out.join("resnet8");
    let model = arch_dir.join("latest/model.mpk");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 2]).unwrap();
    let err = run_failing(&[
        "eval",
        "-c",
        cfg,
        "-o",
        &format!(
            "Global.pretrained_model={}",
            arch_dir.join("latest").display()
        ),
    ]);
    assert!(
        err.contains(&format!(
            "{} is truncated ({} bytes, the record stops partway): use another checkpoint \
             (beside it: best_model, epoch_1) or a complete copy of the file",
            model.display(),
            bytes.len() / 2
        )),
        "{err}"
    );

    // A truncated optimizer record, met on resume.
    let optimizer = arch_dir.join("epoch_1/optimizer.mpk");
    let bytes = std::fs::read(&optimizer).unwrap();
    std::fs::write(&optimizer, &bytes[..bytes.len() - 100]).unwrap();
    let err = run_failing(&[
        "train",
        "-c",
        cfg,
        "-o",
        "Global.epochs=2",
        &format!("Global.checkpoints={}", arch_dir.join("epoch_1").display()),
    ]);
    assert!(
        err.contains(&format!(
            "loading optimizer state: {} is truncated ({} bytes, the record stops partway): use \
             another checkpoint (beside it: best_model, latest)",
            optimizer.display(),
            bytes.len() - 100
        )),
        "{err}"
    );
}

/// A label at or beyond `class_num` names the list, the line and the line's text.
#[test]
fn a_label_beyond_class_num_names_the_list_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 4, 3);
    let cfg = config(
        tmp.path(),
        "c.yaml",
        &data,
        &tmp.path().join("out"),
        "resnet8",
        1,
    );
    let err = run_failing(&[
        "train",
        "-c",
        cfg.to_str().unwrap(),
        "-o",
        "Arch.class_num=2",
    ]);
    // make_dataset lists class 2's first image on line 9 (4 per class).
    assert!(
        err.contains(&format!(
            "{}:9: label 2 is out of range for model model (class_num 2) in \"train/2_0.png 2\"; \
             set Arch.class_num (the list's largest label is 2)",
            data.join("train_list.txt").display()
        )),
        "{err}"
    );
}

/// A path with a space under the default delimiter says to set one, naming the key.
#[test]
fn a_path_with_a_space_asks_for_a_delimiter() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 4, 3);
    std::fs::copy(data.join("train/1_0.png"), data.join("train/my cat.png")).unwrap();
    let list = data.join("train_list.txt");
    let text = std::fs::read_to_string(&list).unwrap();
    std::fs::write(&list, format!("train/my cat.png 1\n{text}")).unwrap();
    let cfg = config(
        tmp.path(),
        "c.yaml",
        &data,
        &tmp.path().join("out"),
        "resnet8",
        1,
    );
    let err = run_failing(&["train", "-c", cfg.to_str().unwrap()]);
    assert!(
        err.contains(&format!(
            "{}:1: \"train/my cat.png 1\" has 3 fields; with the default delimiter (a space) \
             paths cannot contain spaces — set DataLoader.Train.dataset.delimiter (e.g. \"\\t\") \
             and use it in the list",
            list.display()
        )),
        "{err}"
    );
    // With the delimiter set and used, the same image trains.
    std::fs::write(&list, text.replace(' ', "\t") + "train/my cat.png\t1\n").unwrap();
    let with_tab = write(
        &tmp.path().join("tab.yaml"),
        &std::fs::read_to_string(&cfg).unwrap().replacen(
            "train_list.txt\n",
            "train_list.txt\n      delimiter: \"\\t\"\n",
            1,
        ),
    );
    run(&[
        "train",
        "-c",
        with_tab.to_str().unwrap(),
        "-o",
        "Global.eval_during_train=False",
    ]);
}

/// Bytes a directory's files take on a tmpfs (whole pages).
fn pages_used(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len().div_ceil(4096) * 4096)
        .sum()
}

/// Runs `script` as root of a private mount namespace (`unshare -m`, or `unshare -rm` where only
/// user namespaces are allowed); `None` when neither can mount a tmpfs here.
fn in_mount_namespace(script: &str, mounted: &Path) -> Option<Output> {
    for flags in ["-m", "-rm"] {
        let _ = std::fs::remove_file(mounted);
        let out = Command::new("unshare")
            .args([flags, "sh", "-c", script])
            .env("KD_THREADS", "2")
            .output()
            .ok()?;
        if mounted.exists() {
            return Some(out);
        }
    }
    None
}

/// A disk that fills up during a checkpoint write: the error says so in plain words and the
/// previous `latest` stays whole. The output directory is a tmpfs with room for one `latest`
/// and a half: the second epoch's `latest`, written beside the first, cannot fit.
#[test]
fn a_full_disk_is_named_and_the_previous_latest_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 4, 3);
    let extra = "  eval_during_train: False\n";
    let measure_out = tmp.path().join("measure");
    let measure = config(tmp.path(), "m.yaml", &data, &measure_out, "resnet8", 1);
    run(&["train", "-c", measure.to_str().unwrap()]);
    let one_latest = pages_used(&measure_out.join("resnet8/latest"));

    let mnt = tmp.path().join("small_disk");
    let keep = tmp.path().join("kept");
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::create_dir_all(&keep).unwrap();
    let cfg = write(
        &tmp.path().join("c.yaml"),
        &std::fs::read_to_string(&measure)
            .unwrap()
            .replace(
                &measure_out.display().to_string(),
                &mnt.display().to_string(),
            )
            .replace("Global:\n", &format!("Global:\n{extra}"))
            .replace("epochs: 1", "epochs: 2")
            .replace("save_interval: 1", "save_interval: 100"),
    );
    let mounted = tmp.path().join("mounted");
    let script = format!(
        "mount -t tmpfs -o size={size} tmpfs '{mnt}' || exit 97\n\
         touch '{mounted}'\n\
         '{BIN}' train -c '{cfg}' 2>'{err}'\n\
         rc=$?\n\
         cp -r '{mnt}/.' '{keep}/'\n\
         exit $rc\n",
        size = (one_latest + one_latest / 2).div_ceil(4096) * 4096,
        mnt = mnt.display(),
        mounted = mounted.display(),
        cfg = cfg.display(),
        err = tmp.path().join("stderr").display(),
        keep = keep.display(),
    );
    let Some(out) = in_mount_namespace(&script, &mounted) else {
        eprintln!(
            "skipped: no tmpfs can be mounted here (unshare -m / -rm refused); the full-disk \
             message is covered by the /dev/full unit tests in kd-engine"
        );
        return;
    };
    let err = std::fs::read_to_string(tmp.path().join("stderr")).unwrap();
    assert!(
        !out.status.success(),
        "training on a full disk succeeded:\n{err}"
    );
    assert_clean(&err);
    assert!(
        err.contains(&format!(
            "error: cannot write checkpoint {}/resnet8/latest: no space left on device (the \
             previous latest is kept)",
            mnt.display()
        )),
        "{err}"
    );
    // The kept `latest` is epoch 1's, whole: it evaluates, and nothing temporary is left.
    let latest = keep.join("resnet8/latest");
    let state = std::fs::read_to_string(latest.join("state.json")).unwrap();
    assert!(state.contains("\"epoch\": 1,"), "{state}");
    // (`.lock` is the run's output-directory lock, kept on purpose.)
    let mut left: Vec<_> = std::fs::read_dir(keep.join("resnet8"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    left.sort();
    assert_eq!(left, [".lock", "latest"], "{left:?}");
    let ev = run(&[
        "eval",
        "-c",
        measure.to_str().unwrap(),
        "-o",
        &format!("Global.pretrained_model={}", latest.display()),
    ]);
    assert!(ev.contains("top1"), "{ev}");
}
