//! The run directory through the real binary: an unusable output directory fails before any
//! training, a second run into a busy one is refused until the first dies, and the temporaries
//! of writers killed mid-checkpoint are removed when a run starts.

mod common;

use common::{data_section, global, make_dataset, write};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const BIN: &str = common::BIN;

/// A single-model config training into `out` for `epochs` epochs.
fn config(dir: &Path, data: &Path, out: &Path, epochs: usize) -> PathBuf {
    write(
        &dir.join("c.yaml"),
        &format!(
            "{}Arch: {{name: resnet8, class_num: 3}}\nLoss:\n  Train:\n    - CELoss: {{weight: 1.0}}\n{}",
            global(out, epochs),
            data_section(data)
        ),
    )
}

fn kd_launch(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("KD_THREADS", "1")
        .output()
        .expect("kd-launch runs")
}

/// The run's combined output, after checking that it failed before any training step.
fn failed_before_training(out: &Output, args: &[&str]) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "kd-launch {args:?} succeeded:\n{text}"
    );
    assert!(
        !text.contains("[Train]"),
        "kd-launch {args:?} trained:\n{text}"
    );
    text
}

/// An output directory that cannot be created (a file stands in the way) fails `train` before
/// its first step, naming the key, the path and the OS's reason; so does a missing checkpoint
/// to resume from, and an export directory in the same state fails `export` before its work.
#[test]
fn an_unusable_output_directory_fails_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 4, 3);
    let file = write(&tmp.path().join("a_file"), "not a directory");
    let cfg = config(tmp.path(), &data, &tmp.path().join("out"), 1);
    let cfg = cfg.to_str().unwrap();

    let file_in_the_way = format!("; {} is a file, not a directory", file.display());
    for out in [file.clone(), file.join("below")] {
        let set = format!("Global.output_dir={}", out.display());
        for args in [
            vec!["train", "-c", cfg, "-o", &set],
            // A launch of workers checks before it starts them.
            vec!["--nproc", "2", "train", "-c", cfg, "-o", &set],
        ] {
            let text = failed_before_training(&kd_launch(&args), &args);
            let expected = format!(
                "{cfg}: Global.output_dir: cannot create {}: ",
                out.join("resnet8").display()
            );
            assert!(text.contains(&expected), "{text}");
            assert!(text.contains("(os error"), "{text}");
            assert!(text.contains(&file_in_the_way), "{text}");
        }
    }

    let missing = tmp.path().join("out/resnet8/missing");
    let args = [
        "train",
        "-c",
        cfg,
        "-o",
        &format!("Global.checkpoints={}", missing.display()),
    ];
    let text = failed_before_training(&kd_launch(&args), &args);
    assert!(
        text.contains(&format!(
            "{cfg}: Global.checkpoints: checkpoint {} does not exist",
            missing.display()
        )),
        "{text}"
    );

    let export_dir = file.join("inference");
    let args = [
        "export",
        "-c",
        cfg,
        "-o",
        &format!("Global.save_inference_dir={}", export_dir.display()),
        // Checked before the weights are read: these need not exist.
        &format!("Global.pretrained_model={}", missing.display()),
    ];
    let text = failed_before_training(&kd_launch(&args), &args);
    assert!(
        text.contains(&format!(
            "{cfg}: Global.save_inference_dir: cannot create {}: ",
            export_dir.display()
        )) && text.contains(&file_in_the_way),
        "{text}"
    );
}

/// While a run trains into a directory, a second run into it (alone or with workers) is
/// refused before any work, naming the first's pid; once the first is killed (SIGKILL: nothing
/// of it runs to release anything), the OS has released its lock and a new run starts.
#[test]
fn a_second_run_into_a_busy_directory_is_refused_until_the_first_dies() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 4, 3);
    let out = tmp.path().join("out");
    let cfg = config(tmp.path(), &data, &out, 100_000);
    let cfg = cfg.to_str().unwrap();

    let mut first = Command::new(BIN)
        .args(["train", "-c", cfg, "-o", "Global.save_interval=100000"])
        .env("KD_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(first.stderr.take().unwrap()).lines();
    let mut seen = vec![];
    for line in lines.by_ref() {
        let line = line.unwrap();
        let training = line.contains("[Train]");
        seen.push(line);
        if training {
            break;
        }
    }
    assert!(seen.last().unwrap().contains("[Train]"), "{seen:#?}");
    // Keep the first run's pipe drained while it trains on.
    let drain = std::thread::spawn(move || lines.count());

    let refusal = format!(
        "output directory {} is in use by another kd-launch run (pid {}); wait for it, or set \
         Global.output_dir to another directory",
        out.join("resnet8").display(),
        first.id()
    );
    for args in [
        vec!["train", "-c", cfg, "-o", "Global.epochs=1"],
        vec!["--nproc", "2", "train", "-c", cfg, "-o", "Global.epochs=1"],
    ] {
        let text = failed_before_training(&kd_launch(&args), &args);
        assert!(text.contains(&refusal), "{text}");
    }
    assert!(
        first.try_wait().unwrap().is_none(),
        "the first run was disturbed"
    );

    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    drain.join().unwrap();
    let args = ["train", "-c", cfg, "-o", "Global.epochs=1"];
    let third = kd_launch(&args);
    let stdout = String::from_utf8_lossy(&third.stdout);
    assert!(
        third.status.success() && stdout.contains("done: 1 epochs"),
        "{stdout}{}",
        String::from_utf8_lossy(&third.stderr)
    );
}

/// The temporaries of checkpoint and file writes whose writer is gone are removed (and named in
/// the log) when a run starts, before its first step; one of a live process is left alone.
#[test]
fn leftovers_of_killed_writers_are_removed_when_a_run_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data, 4, 3);
    let out = tmp.path().join("out");
    let cfg = config(tmp.path(), &data, &out, 1);
    let run_dir = out.join("resnet8");
    std::fs::create_dir_all(&run_dir).unwrap();

    let mut exited = Command::new("true").spawn().unwrap();
    exited.wait().unwrap();
    let dead = exited.id();
    let stale = [
        run_dir.join(format!(".latest.tmp-{dead}")),
        run_dir.join(format!(".epoch_3.tmp-{dead}")),
    ];
    for dir in &stale {
        std::fs::create_dir(dir).unwrap();
        std::fs::write(dir.join("model.mpk"), vec![0u8; 1 << 16]).unwrap();
    }
    let stale_file = run_dir.join(format!(".notes.txt.tmp-{dead}"));
    std::fs::write(&stale_file, "half written").unwrap();
    // This test process stands for a writer that is still at work.
    let live = run_dir.join(format!(".latest.tmp-{}", std::process::id()));
    std::fs::create_dir(&live).unwrap();

    let args = ["train", "-c", cfg.to_str().unwrap()];
    let run = kd_launch(&args);
    let log = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{log}");
    let first_step = log.find("[Train]").expect("a training log line");
    for gone in stale.iter().chain([&stale_file]) {
        assert!(!gone.exists(), "{} is still there", gone.display());
        let said = format!(
            "removed {}: left by a kd-launch process that was killed while writing it",
            gone.display()
        );
        let at = log
            .find(&said)
            .unwrap_or_else(|| panic!("{said:?} not in\n{log}"));
        assert!(at < first_step, "{log}");
    }
    assert!(live.is_dir(), "a live writer's temporary was removed");
    assert!(run_dir.join("latest/state.json").is_file());
}
