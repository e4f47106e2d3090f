//! Checkpoints: one directory each (`latest`, `best_model`, `epoch_N`) holding every model
//! (`<Key>.mpk`), the optimizer state, the schedule position and the config used. A checkpoint is
//! written under a temporary name and renamed into place, so a crash never leaves a torn one.

pub use crate::atomic::{write_atomic, write_file_atomic};
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
