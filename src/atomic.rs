//! Atomic writes: a file or a whole directory is written under a temporary name beside its
//! destination, synced, and renamed into place, so a crash, a kill or a full disk at any moment
//! leaves either the old or the new content, never a torn one.

use anyhow::{Context, Result};
use std::path::Path;

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
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
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
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
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
}
