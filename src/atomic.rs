//! Atomic writes: a file or a whole directory is written under a temporary name beside its
//! destination, synced, and renamed into place, so a crash, a kill or a full disk at any moment
//! leaves either the old or the new content, never a torn one. A writer killed mid-write leaves
//! its temporary behind (`.<name>.tmp-<pid>`); [`remove_stale_temporaries`] clears those whose
//! writer is gone.

use anyhow::{anyhow, Context, Result};
use std::io;
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

/// Writes a directory atomically (a checkpoint): `fill` writes into a fresh temporary directory
/// beside `dir`, which then takes `dir`'s place in one atomic exchange. A failure leaves the
/// previous `dir` as it was, and a file system that refuses the write (full, over quota,
/// read-only, not writable) is named in plain words.
pub fn write_atomic(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let had_previous = dir.exists();
    let failed = |e: anyhow::Error| {
        let what = format!("checkpoint {}", dir.display());
        write_failure(&what, dir, had_previous, e)
    };
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))
        .map_err(failed)?;
    let name = dir
        .file_name()
        .context("checkpoint path has no name")?
        .to_string_lossy()
        .to_string();
    let tmp = parent.join(temporary_name(&name));
    let _ = std::fs::remove_dir_all(&tmp);
    let staged = std::fs::create_dir_all(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))
        .and_then(|()| fill(&tmp))
        .and_then(|()| sync_dir_files(&tmp));
    let installed = staged.and_then(|()| {
        if had_previous {
            // Swap the two directories in one step, so a crash or kill at any moment leaves
            // either the old or the new checkpoint under `dir`, never neither.
            exchange(&tmp, dir).with_context(|| format!("cannot replace {}", dir.display()))
        } else {
            std::fs::rename(&tmp, dir)
                .with_context(|| format!("cannot rename {} to {}", tmp.display(), dir.display()))
        }
    });
    if let Err(e) = installed {
        // Classified before the partial files go: their removal frees the space it looks at.
        let e = failed(e);
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if had_previous {
        std::fs::remove_dir_all(&tmp)
            .with_context(|| format!("cannot remove the previous {}", tmp.display()))?;
    }
    std::fs::File::open(parent)?.sync_all()?;
    Ok(())
}

/// The error of a failed write to `dest` (`what`: how the message names it): in plain words when
/// the file system refused it, else `e` with `what` named.
fn write_failure(what: &str, dest: &Path, had_previous: bool, e: anyhow::Error) -> anyhow::Error {
    let Some(reason) = refusal_reason(&e, dest) else {
        return e.context(format!("cannot write {what}"));
    };
    tracing::debug!("write of {} failed: {e:#}", dest.display());
    let kept = match dest.file_name() {
        Some(name) if had_previous => format!("the previous {} is kept", name.to_string_lossy()),
        _ => "nothing was written".to_string(),
    };
    anyhow!("cannot write {what}: {reason} ({kept})")
}

/// Why the file system refused a write, in plain words, when it did: from the I/O error in `e`'s
/// chain, or, when the chain lost it (a library that turned it into text), from the free space
/// left where `dest` goes.
fn refusal_reason(e: &anyhow::Error, dest: &Path) -> Option<String> {
    let io_error = e
        .chain()
        .filter_map(|c| c.downcast_ref::<io::Error>())
        .find(|io| refusal_of(io).is_some());
    match io_error {
        // ENOSPC also means no inodes left, with space to spare: `df` would not show that.
        Some(io) if io.kind() == io::ErrorKind::StorageFull => Some(
            free_space(dest)
                .map(|free| plain_no_space(&free))
                .unwrap_or_else(|| NO_SPACE.into()),
        ),
        Some(io) => refusal_of(io).map(str::to_string),
        None => {
            let free = free_space(dest)?;
            (free.bytes < ALMOST_FULL_BYTES || free.inodes == 0).then(|| plain_no_space(&free))
        }
    }
}

const NO_SPACE: &str = "no space left on device";

/// The plain words for the errors by which a file system refuses a write.
fn refusal_of(e: &io::Error) -> Option<&'static str> {
    use io::ErrorKind::*;
    match e.kind() {
        StorageFull => Some(NO_SPACE),
        QuotaExceeded => Some("disk quota exceeded"),
        ReadOnlyFilesystem => Some("the file system is read-only"),
        PermissionDenied => Some("permission denied"),
        FileTooLarge => Some("file too large for the file system"),
        _ => None,
    }
}

/// Below this much free space a failed write is taken for a full disk.
const ALMOST_FULL_BYTES: u64 = 1 << 20;

/// Space and inodes left to unprivileged writers on the file system holding `path` (or its
/// nearest existing ancestor).
struct FreeSpace {
    bytes: u64,
    inodes: u64,
}

fn plain_no_space(free: &FreeSpace) -> String {
    if free.inodes == 0 {
        format!("{NO_SPACE} (no free inodes)")
    } else {
        NO_SPACE.into()
    }
}

#[cfg(unix)]
fn free_space(path: &Path) -> Option<FreeSpace> {
    use std::os::unix::ffi::OsStrExt;
    let existing = path
        .ancestors()
        .find(|p| p.exists() && !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let c = std::ffi::CString::new(existing.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(FreeSpace {
        bytes: (st.f_bavail as u64).saturating_mul(st.f_frsize as u64),
        // File systems without an inode limit (btrfs, some tmpfs) report 0 files in all.
        inodes: if st.f_files == 0 {
            u64::MAX
        } else {
            st.f_favail as u64
        },
    })
}

#[cfg(not(unix))]
fn free_space(_path: &Path) -> Option<FreeSpace> {
    None
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

/// Writes one file atomically: a temporary file beside it, synced, then renamed over it. A
/// failure removes the temporary file and leaves the previous one as it was.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .context("file path has no name")?
        .to_string_lossy()
        .to_string();
    let tmp = path.with_file_name(temporary_name(&name));
    let had_previous = path.exists();
    let written = std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))
        .and_then(|()| {
            std::fs::rename(&tmp, path)
                .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
        });
    if let Err(e) = written {
        let e = write_failure(&path.display().to_string(), path, had_previous, e);
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
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

    /// /dev/full fails every write with ENOSPC: a file linked to it is a file on a full disk.
    fn write_to_full_disk(file: &Path) -> Result<()> {
        std::os::unix::fs::symlink("/dev/full", file)?;
        Ok(std::fs::write(file, [0u8; 100])?)
    }

    #[test]
    fn a_full_disk_is_named_and_the_previous_checkpoint_kept() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("latest");
        let e = write_atomic(&dir, |d| write_to_full_disk(&d.join("model.mpk"))).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "cannot write checkpoint {}: no space left on device (nothing was written)",
                dir.display()
            )
        );
        write_atomic(&dir, |d| Ok(std::fs::write(d.join("a"), "1")?)).unwrap();
        let e = write_atomic(&dir, |d| {
            std::fs::write(d.join("a"), "2")?;
            write_to_full_disk(&d.join("model.mpk")).context("saving model Student")
        })
        .unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            format!(
                "cannot write checkpoint {}: no space left on device (the previous latest is kept)",
                dir.display()
            )
        );
        assert_eq!(std::fs::read_to_string(dir.join("a")).unwrap(), "1");
        assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_full_disk_under_a_single_file_is_named_and_the_previous_file_kept() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("inference.json");
        write_file_atomic(&file, b"old").unwrap();
        // The temporary file's name is known: make it the full disk.
        let tmp = root
            .path()
            .join(format!(".inference.json.tmp-{}", std::process::id()));
        std::os::unix::fs::symlink("/dev/full", &tmp).unwrap();
        let e = write_file_atomic(&file, b"new").unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            format!(
                "cannot write {}: no space left on device (the previous inference.json is kept)",
                file.display()
            )
        );
        assert_eq!(std::fs::read(&file).unwrap(), b"old");
        assert!(
            std::fs::symlink_metadata(&tmp).is_err(),
            "temporary file left"
        );
    }

    #[test]
    fn refusals_of_the_file_system_are_put_in_plain_words() {
        let plain = |errno| refusal_of(&io::Error::from_raw_os_error(errno));
        assert_eq!(plain(libc::ENOSPC), Some("no space left on device"));
        assert_eq!(plain(libc::EDQUOT), Some("disk quota exceeded"));
        assert_eq!(plain(libc::EROFS), Some("the file system is read-only"));
        assert_eq!(plain(libc::EACCES), Some("permission denied"));
        assert_eq!(plain(libc::EIO), None);
        assert_eq!(
            refusal_of(&io::Error::from(io::ErrorKind::StorageFull)),
            Some("no space left on device")
        );
        // An error that lost its I/O error on the way (text only) is called a full disk when the
        // file system has no space left: /proc reports none available.
        let text_only = anyhow!("error while writing multi-byte MessagePack value");
        assert_eq!(
            refusal_reason(&text_only, Path::new("/proc/kd-launch/latest")).as_deref(),
            Some("no space left on device")
        );
        let tmp = tempfile::tempdir().unwrap();
        assert!(free_space(tmp.path()).unwrap().bytes > 0);
        // Another failure keeps its own words, with the destination named.
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("latest");
        let e = write_atomic(&dir, |_| bail!("encoder failed")).unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            format!("cannot write checkpoint {}: encoder failed", dir.display())
        );
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
