//! What the optimizer sees: the trainable models and the losses' own layers (MGD's generator,
//! AFD's attention, ...) as one module, so one optimizer state and one gradient exchange cover
//! both. Between steps the models live in the `DistillationModel` and the layers with the
//! trainer; [`TrainableSet::take`] gathers them for the moments that need them together.

use crate::arch::{Backbone, DistillationModel};
use crate::loss::LossPart;
use crate::weights::{load_record_checked, save_module};
use anyhow::{bail, Context, Result};
use burn::module::Module;
use burn::tensor::backend::{AutodiffBackend, Backend};
use std::path::Path;

/// The trainable models and the losses' layers. The field names are the record layout of the
/// optimizer state in every checkpoint: keep them.
#[derive(Module, Debug)]
pub struct TrainableSet<B: Backend> {
    pub models: Vec<Backbone<B>>,
    pub loss_parts: Vec<LossPart<B>>,
}

impl<B: AutodiffBackend> TrainableSet<B> {
    /// Moves the model's trainable models and `loss_parts` into one set (no copies).
    pub fn take(model: &mut DistillationModel<B>, loss_parts: &mut Vec<LossPart<B>>) -> Self {
        TrainableSet {
            models: std::mem::take(&mut model.trainable),
            loss_parts: std::mem::take(loss_parts),
        }
    }

    /// Gives the models back to `model` and the layers to `loss_parts`.
    pub fn put_back(self, model: &mut DistillationModel<B>, loss_parts: &mut Vec<LossPart<B>>) {
        model.trainable = self.models;
        *loss_parts = self.loss_parts;
    }
}

/// File stem of the losses' trainable layers in a checkpoint directory.
pub const LOSS_PARTS_FILE: &str = "loss_parts";

/// Saves the losses' layers (when there are any) as `<dir>/loss_parts.mpk`.
pub fn save_loss_parts<B: Backend>(parts: &[LossPart<B>], dir: &Path) -> Result<()> {
    if parts.is_empty() {
        return Ok(());
    }
    let path = dir.join(LOSS_PARTS_FILE);
    save_module(parts.to_vec(), &path).context("saving the losses' layers")
}

/// Loads the losses' layers (when there are any) from a checkpoint directory.
pub fn load_loss_parts<B: Backend>(
    parts: Vec<LossPart<B>>,
    dir: &Path,
    device: &B::Device,
) -> Result<Vec<LossPart<B>>> {
    if parts.is_empty() {
        return Ok(parts);
    }
    let file = dir.join(format!("{LOSS_PARTS_FILE}.mpk"));
    let ctx = || {
        format!(
            "loading the losses' trainable layers from {}",
            file.display()
        )
    };
    if !file.is_file() {
        bail!(
            "{}: file not found (was the checkpoint written for another Loss config?)",
            ctx()
        );
    }
    load_record_checked(
        parts,
        &file,
        device,
        "the file holds layers of a different structure",
        "shapes differ",
    )
    .with_context(ctx)
}
