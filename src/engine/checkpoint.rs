//! Checkpoints: one directory each (`latest`, `best_model`, `epoch_N`) holding every model
//! (`<Key>.mpk`), the optimizer state, the schedule position and the config used. A checkpoint is
//! written under a temporary name and renamed into place, so a crash never leaves a torn one.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const STATE_FILE: &str = "state.json";
pub const OPTIMIZER_FILE: &str = "optimizer";

/// Where training stands; saved as `state.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// Epochs fully completed.
    pub epoch: usize,
    /// Batches done in epoch `epoch + 1` (non-zero only for a checkpoint taken mid-epoch on stop).
    pub step_in_epoch: usize,
    /// Optimizer steps taken in all.
    pub global_step: usize,
    pub best_top1: f64,
    pub best_epoch: usize,
    /// Model keys in this checkpoint, and the one `export`/`infer` use.
    pub models: Vec<String>,
    pub infer_model_name: String,
    pub arch: String,
    /// Workers of the run that wrote it: `step_in_epoch` and `global_step` count per-worker
    /// batches (older checkpoints: 1).
    #[serde(default = "one")]
    pub world_size: usize,
}

fn one() -> usize {
    1
}

impl TrainState {
    pub fn read(dir: &Path) -> Result<TrainState> {
        let file = dir.join(STATE_FILE);
        if !dir.is_dir() {
            bail!(
                "checkpoint {} does not exist (expected a directory written by kd-launch train)",
                dir.display()
            );
        }
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("{} is not a kd-launch checkpoint state", file.display()))
    }
}

/// Writes a checkpoint directory atomically: `fill` writes into a fresh temporary directory
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

/// The checkpoint directory for `name` under `<output_dir>/<arch>/`, as PaddleClas lays it out.
pub fn checkpoint_dir(output_dir: &Path, arch: &str, name: &str) -> PathBuf {
    output_dir.join(arch).join(name)
}

/// Resolves a model weight file given in a config: a `.mpk` file, or a checkpoint directory
/// (then its `infer_model_name` model, or `key` when the checkpoint has a model of that name).
pub fn resolve_model_file(path: &Path, key: &str) -> Result<PathBuf> {
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    // PaddleClas names weights without their extension (`pretrained: path/ResNet50_vd_pretrained`).
    for ext in ["mpk", "pdparams"] {
        let with_ext = path.with_extension(ext);
        if path.extension().is_none() && with_ext.is_file() {
            return Ok(with_ext);
        }
    }
    if path.is_dir() {
        let state = TrainState::read(path)?;
        let pick = if state.models.iter().any(|m| m == key) {
            key.to_string()
        } else {
            state.infer_model_name.clone()
        };
        return Ok(path.join(format!("{pick}.mpk")));
    }
    bail!(
        "weights {} not found (give a kd-launch checkpoint directory or .mpk file, or a .pth, .pdparams or .safetensors file)",
        path.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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
