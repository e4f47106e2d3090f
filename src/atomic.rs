//! Atomic writes: a file or a whole directory is written under a temporary name beside its
//! destination, synced, and renamed into place, so a crash, a kill or a full disk at any moment
//! leaves either the old or the new content, never a torn one. A writer killed mid-write leaves
//! its temporary behind (`.<name>.tmp-<pid>`); [`remove_stale_temporaries`] clears those whose
//! writer is gone.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// The temporary name this process writes `name` under, beside it.
fn temporary_name(name: &str) -> String {
    format!(".{name}.tmp-{}", std::process::id())
}

/// The pid of the process that wrote temporary `file_name` (see [`temporary_name`]), if the name
/// is one of ours.
fn temporary_writer(file_name: &str) -> Option<u32> {
    let (stem, pid) = file_name.rsplit_once(".tmp-")?;
    if !stem.starts_with('.') || stem.len() < 2 {
        return None;
    }
    // No process has pid 0 or one beyond i32: such a name is not a temporary of ours.
    pid.parse::<u32>()
        .ok()
        .filter(|&p| p > 0 && p <= i32::MAX as u32)
}

/// Whether process `pid` (of this machine) no longer exists: `kill(pid, 0)` answers ESRCH. A
/// process of another user (EPERM) is alive.
pub(crate) fn process_is_gone(pid: u32) -> bool {
    // Beyond i32, `pid` would turn into a process group below; 0 is this process's group.
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return true;
    };
    if pid == 0 {
        return true;
    }
    // SAFETY: signal 0 sends nothing; it only asks whether the process exists. `pid` is
    // positive, so this never addresses a process group.
    let rc = unsafe { libc::kill(pid, 0) };
    rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// Removes the temporaries in `dir` that [`write_atomic`] / [`write_file_atomic`] left when their
/// writer was killed: those whose writer pid is no longer alive, and this process's own (a dead
/// process's that had the same pid: the caller has not written into `dir` yet). A temporary of a
/// live process stays: it may be writing (an export into the same directory, say). Returns what
/// was removed; a missing `dir` has none.
pub fn remove_stale_temporaries(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
    };
    let mut removed = vec![];
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let Some(pid) = entry.file_name().to_str().and_then(temporary_writer) else {
            continue;
        };
        if pid != std::process::id() && !process_is_gone(pid) {
            continue;
        }
        let path = entry.path();
        // Not followed: a link named like a temporary is removed itself, never its target.
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        let gone = if is_dir {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        gone.with_context(|| format!("cannot remove the leftover {}", path.display()))?;
        removed.push(path);
    }
    Ok(removed)
}

/// Writes a directory atomically (a checkpoint, an export): `fill` writes into a fresh temporary directory
/// beside `dir`, which then takes `dir`'s place in one atomic exchange.
pub fn write_atomic(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let name = dir
        .file_name()
        .context("checkpoint path has no name")?
        .to_string_lossy()
        .to_string();
    let tmp = parent.join(temporary_name(&name));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e).with_context(|| format!("writing checkpoint {}", dir.display()));
    }
    sync_dir_files(&tmp)?;
    if dir.exists() {
        // Swap the two directories in one step, so a crash or kill at any moment leaves either
        // the old or the new checkpoint under `dir`, never neither.
        exchange(&tmp, dir).with_context(|| format!("cannot replace {}", dir.display()))?;
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("cannot remove the previous {}", tmp.display()))?;
    } else {
        std::fs::rename(&tmp, dir)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()))?;
    }
    std::fs::File::open(parent)?.sync_all()?;
    Ok(())
}

/// Atomically exchanges two paths (Linux `renameat2(RENAME_EXCHANGE)`).
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let (ca, cb) = (
        CString::new(a.as_os_str().as_bytes())?,
        CString::new(b.as_os_str().as_bytes())?,
    );
    // SAFETY: both are valid NUL-terminated paths; AT_FDCWD resolves them like rename(2).
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// Elsewhere: move the old one aside, then rename (a crash in between leaves `.old`).
#[cfg(not(target_os = "linux"))]
fn exchange(a: &Path, b: &Path) -> Result<()> {
    let old = b.with_extension("old");
    std::fs::rename(b, &old)?;
    std::fs::rename(a, b)?;
    std::fs::rename(&old, a)?;
    Ok(())
}

/// Writes one file atomically: a temporary file beside it, synced, then renamed over it.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .context("file path has no name")?
        .to_string_lossy()
        .to_string();
    let tmp = path.with_file_name(temporary_name(&name));
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

fn sync_dir_files(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_file() {
            std::fs::File::open(&p)?.sync_all()?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::bail;

    #[test]
    fn failed_write_leaves_the_previous_checkpoint_intact() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("latest");
        write_atomic(&dir, |d| Ok(std::fs::write(d.join("a"), "1")?)).unwrap();
        let r = write_atomic(&dir, |d| {
            std::fs::write(d.join("a"), "2")?;
            bail!("disk full")
        });
        assert!(r.is_err());
        assert_eq!(std::fs::read_to_string(dir.join("a")).unwrap(), "1");
        write_atomic(&dir, |d| Ok(std::fs::write(d.join("a"), "3")?)).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("a")).unwrap(), "3");
        let other = root.path().join("keep.txt");
        write_file_atomic(&other, b"x").unwrap();
        write_file_atomic(&other, b"y").unwrap();
        assert_eq!(std::fs::read(&other).unwrap(), b"y");
        std::fs::remove_file(&other).unwrap();
        // No temporary directories are left behind.
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
    }

    #[test]
    fn only_temporaries_of_gone_writers_are_removed() {
        let root = tempfile::tempdir().unwrap();
        let mut exited = std::process::Command::new("true").spawn().unwrap();
        exited.wait().unwrap();
        let dead = exited.id();
        let mut running = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let live = running.id();
        let own_ckpt = root
            .path()
            .join(format!(".latest.tmp-{}", std::process::id()));
        std::fs::create_dir(&own_ckpt).unwrap();
        let dead_ckpt = root.path().join(format!(".latest.tmp-{dead}"));
        std::fs::create_dir(&dead_ckpt).unwrap();
        std::fs::write(dead_ckpt.join("model.mpk"), "x").unwrap();
        let dead_file = root.path().join(format!(".inference.json.tmp-{dead}"));
        std::fs::write(&dead_file, "x").unwrap();
        let kept = [
            format!(".latest.tmp-{live}"),
            // pid 1 is alive, and another user's process where this runs unprivileged.
            ".latest.tmp-1".to_string(),
            format!("latest.tmp-{dead}"),
            format!(".tmp-{dead}"),
            ".latest.tmp-4294967295".to_string(),
            ".latest.tmp-x".to_string(),
            "latest".to_string(),
        ];
        for k in &kept {
            std::fs::create_dir(root.path().join(k)).unwrap();
        }
        let mut removed = remove_stale_temporaries(root.path()).unwrap();
        running.kill().unwrap();
        running.wait().unwrap();
        removed.sort();
        // This process counts as gone: the caller has not written yet, so an own-pid temporary
        // is a previous process's.
        let mut expected = vec![dead_file, dead_ckpt, own_ckpt];
        expected.sort();
        assert_eq!(removed, expected);
        for k in &kept {
            assert!(root.path().join(k).exists(), "{k} was removed");
        }
        assert!(remove_stale_temporaries(&root.path().join("missing"))
            .unwrap()
            .is_empty());
    }
}
