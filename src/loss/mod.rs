//! Losses: PaddleClas's loss entries by their config names, their term names and values.
//!
//! Each loss has its own file: its typed config (PaddleClas's keys and defaults), its formula
//! (public functions of tensors, also tested against an independent reference in
//! `tests/loss_fixtures.rs`), its term names and, for MGD, PEFD and AFD, its trainable layers.
//! [`registry`] maps config names to losses, [`binding`] resolves `model_name_pairs` /
//! `model_names` / `key`, and [`combined`] sums the weighted terms as PaddleClas's
//! `CombinedLoss`. Loss layers are [`LossPart`]s, trained and saved with the models.

pub mod afd;
pub mod binding;
pub mod ce;
pub mod combined;
pub mod common;
pub mod dist;
pub mod distance;
pub mod dkd;
pub mod dml;
pub mod kl;
pub mod mgd;
pub mod pair;
pub mod pefd;
pub mod registry;
pub mod rkd;
pub mod skd;
pub mod wsl;

#[cfg(test)]
mod testing;

pub use binding::Binding;
pub use combined::{CombinedLoss, LossContext, LossTerm, LossValues};
pub use registry::{DistillLoss, LossKind, LossPart, TermInput, LOSSES};
