//! The directories a command writes, made ready before any work: a training run's
//! `<output_dir>/<arch>/` and an export's `save_inference_dir` are created and proved writable
//! (a problem found after an epoch of training loses that epoch), held by one writer at a time
//! (an advisory `flock`, which the OS releases when its holder dies, so a killed run never blocks
//! the next), and cleared of the temporaries that killed writers left.

use super::Config;
use crate::atomic::{process_is_gone, remove_stale_temporaries};
use anyhow::{bail, Result};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The lock file of a training run's directory; it holds the pid of the run holding it.
pub const LOCK_FILE: &str = ".lock";

/// A training run's claim on `<output_dir>/<arch>/`: while it lives, no other kd-launch run
/// trains into that directory. Dropping it (or the process dying) releases it.
#[derive(Debug)]
pub struct RunDirLock {
    /// Held open: the lock belongs to this open file.
    _file: File,
    pub dir: PathBuf,
}

/// Claims the run directory `<Global.output_dir>/<Arch.name>/` for training: creates it, locks it
/// against other runs (failing at once, naming the holder, when one has it), proves it writable
/// and removes the checkpoint temporaries of killed runs. The caller is the process that writes
/// the checkpoints (rank 0), before it does any work.
pub fn claim_run_dir(cfg: &Config) -> Result<RunDirLock> {
    let dir = cfg.global.output_dir.join(&cfg.arch.name);
    create_dir(cfg, "Global.output_dir", &dir)?;
    let lock_path = dir.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(|e| unusable(cfg, "Global.output_dir", &lock_path, "create", e))?;
    if !try_lock(&file, &lock_path)
        .map_err(|e| unusable(cfg, "Global.output_dir", &lock_path, "lock", e))?
    {
        let holder = holder_pid(&mut file)
            .map(|p| format!("pid {p}"))
            .unwrap_or_else(|| "pid unknown".into());
        bail!(
            "output directory {} is in use by another kd-launch run ({holder}); wait for it, or \
             set Global.output_dir to another directory",
            dir.display()
        );
    }
    // The pid is only read by a run refused the lock, to say whose it is.
    let write_pid = |f: &mut File| -> std::io::Result<()> {
        f.set_len(0)?;
        f.rewind()?;
        writeln!(f, "{}", std::process::id())
    };
    write_pid(&mut file).map_err(|e| unusable(cfg, "Global.output_dir", &lock_path, "write", e))?;
    check_writable(cfg, "Global.output_dir", &dir)?;
    remove_leftovers(&dir)?;
    Ok(RunDirLock { _file: file, dir })
}

/// An export's hold on `Global.save_inference_dir`, while it replaces its files there.
#[derive(Debug)]
pub struct ExportDirLock {
    _dir: File,
}

/// Makes `Global.save_inference_dir` ready for an export: created, proved writable, and locked
/// against another export into it. That one is waited for (exports take seconds), so the
/// directory ends up with one export's complete set of files, never a mix of two. The lock is
/// on the directory itself: a lock file would ship with the export.
pub fn claim_export_dir(cfg: &Config) -> Result<ExportDirLock> {
    let key = "Global.save_inference_dir";
    let dir = &cfg.global.save_inference_dir;
    create_dir(cfg, key, dir)?;
    let handle = File::open(dir).map_err(|e| unusable(cfg, key, dir, "open", e))?;
    if !try_lock(&handle, dir).map_err(|e| unusable(cfg, key, dir, "lock", e))? {
        tracing::info!(
            "another export is writing into {}; waiting for it",
            dir.display()
        );
        flock(&handle, libc::LOCK_EX).map_err(|e| unusable(cfg, key, dir, "lock", e))?;
    }
    check_writable(cfg, key, dir)?;
    remove_leftovers(dir)?;
    Ok(ExportDirLock { _dir: handle })
}

/// Creates `dir` (the directory of `key`, or one under it).
fn create_dir(cfg: &Config, key: &str, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| {
        let err = unusable(cfg, key, dir, "create", e);
        // Name the culprit when a file stands where a directory is needed: the OS's reason
        // alone ("File exists", "Not a directory") leaves the reader to find which one.
        match dir.ancestors().find(|a| a.exists() && !a.is_dir()) {
            Some(file) => anyhow::anyhow!("{err}; {} is a file, not a directory", file.display()),
            None => err,
        }
    })
}

/// Proves that files can be created in `dir` (a read-only directory or file system, an
/// exhausted quota) by creating and removing one. Named like a write temporary, so a kill in
/// between leaves nothing that the next run does not remove.
fn check_writable(cfg: &Config, key: &str, dir: &Path) -> Result<()> {
    let probe = dir.join(format!(".write-check.tmp-{}", std::process::id()));
    std::fs::write(&probe, b"kd-launch")
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|e| unusable(cfg, key, dir, "write into", e))
}

fn remove_leftovers(dir: &Path) -> Result<()> {
    for path in remove_stale_temporaries(dir)? {
        tracing::info!(
            "removed {}: left by a kd-launch process that was killed while writing it",
            path.display()
        );
    }
    Ok(())
}

/// The error for a directory of `key` that cannot be used: the config, the key, the path, the
/// operation and the OS's reason.
fn unusable(cfg: &Config, key: &str, path: &Path, what: &str, e: std::io::Error) -> anyhow::Error {
    anyhow::anyhow!(
        "{}: {key}: cannot {what} {}: {e}",
        cfg.file.display(),
        path.display()
    )
}

/// `flock(op)`; `Err(WouldBlock)` when another open file holds a conflicting lock (`LOCK_NB`).
fn flock(file: &File, op: libc::c_int) -> std::io::Result<()> {
    loop {
        // SAFETY: flock on a descriptor `file` owns; it only changes advisory lock state.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Takes an exclusive lock on `file` (at `path`) if nobody holds it: `Ok(false)` when another
/// does. Where the file system has no locks (some network file systems), the run goes on
/// unguarded, with a warning: refusing every run there would be worse than the race.
fn try_lock(file: &File, path: &Path) -> std::io::Result<bool> {
    match flock(file, libc::LOCK_EX | libc::LOCK_NB) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOLCK | libc::EOPNOTSUPP)) => {
            tracing::warn!(
                "cannot lock {} ({e}): another run writing there at the same time would not be noticed",
                path.display()
            );
            Ok(true)
        }
        Err(e) => Err(e),
    }
}

/// The pid the holder of a run directory's lock wrote into it. The holder writes it just after
/// taking the lock, over the previous holder's: a moment's wait covers a run that has only just
/// started.
fn holder_pid(file: &mut File) -> Option<u32> {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let mut text = String::new();
        let pid = file
            .rewind()
            .and_then(|()| file.read_to_string(&mut text))
            .ok()
            .and_then(|_| text.trim().parse::<u32>().ok())
            .filter(|&p| !process_is_gone(p));
        if pid.is_some() || Instant::now() > deadline {
            return pid;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(out: &Path, export: &Path) -> Config {
        let text = format!(
            "Global: {{output_dir: {}, save_inference_dir: {}}}\nArch: {{name: resnet8, class_num: 3}}\n",
            out.display(),
            export.display()
        );
        let tree = serde_yaml::from_str(&text).unwrap();
        Config::from_tree(tree, Path::new("c.yaml"), vec![]).unwrap()
    }

    #[test]
    fn a_run_directory_is_held_by_one_claim_at_a_time() {
        let root = tempfile::tempdir().unwrap();
        let cfg = config(&root.path().join("out"), &root.path().join("inference"));
        let held = claim_run_dir(&cfg).unwrap();
        assert_eq!(held.dir, root.path().join("out/resnet8"));
        let pid = std::fs::read_to_string(held.dir.join(LOCK_FILE)).unwrap();
        assert_eq!(pid.trim(), std::process::id().to_string());
        // Another open file of the same lock conflicts, even in this process.
        let refused = claim_run_dir(&cfg).unwrap_err().to_string();
        assert_eq!(
            refused,
            format!(
                "output directory {} is in use by another kd-launch run (pid {}); wait for it, \
                 or set Global.output_dir to another directory",
                held.dir.display(),
                std::process::id()
            )
        );
        drop(held);
        let again = claim_run_dir(&cfg).unwrap();
        // Only the lock file remains: the write check cleaned up after itself.
        let names: Vec<_> = std::fs::read_dir(&again.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [LOCK_FILE]);
    }

    #[test]
    fn a_file_in_the_way_is_named_with_the_key() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("taken");
        std::fs::write(&file, "x").unwrap();
        for (out, export) in [
            (file.clone(), root.path().join("inference")),
            (file.join("below"), root.path().join("inference")),
            (root.path().join("out"), file.join("inference")),
        ] {
            let cfg = config(&out, &export);
            let err = claim_run_dir(&cfg)
                .map(drop)
                .and_then(|()| claim_export_dir(&cfg).map(drop))
                .unwrap_err();
            let msg = format!("{err:#}");
            let key = if out.starts_with(&file) {
                "Global.output_dir"
            } else {
                "Global.save_inference_dir"
            };
            let dir = if key == "Global.output_dir" {
                &out
            } else {
                &export
            };
            let start = format!("c.yaml: {key}: cannot create {}", dir.display());
            assert!(msg.starts_with(&start), "{msg}");
            assert!(
                msg.contains("(os error")
                    && msg.ends_with(&format!("; {} is a file, not a directory", file.display())),
                "{msg}"
            );
        }
    }

    #[test]
    fn exports_into_one_directory_take_turns() {
        let root = tempfile::tempdir().unwrap();
        let cfg = config(&root.path().join("out"), &root.path().join("inference"));
        let first = claim_export_dir(&cfg).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn({
            let cfg = cfg.clone();
            move || {
                let second = claim_export_dir(&cfg).unwrap();
                tx.send(()).unwrap();
                drop(second);
            }
        });
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
        drop(first);
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        waiter.join().unwrap();
        // Nothing of the lock is left in the export.
        assert_eq!(
            std::fs::read_dir(&cfg.global.save_inference_dir)
                .unwrap()
                .count(),
            0
        );
    }
}
