//! kd-launch's engine: knowledge distillation for image classifiers on burn.
//!
//! The modules follow PaddleClas's concept map so its users find things where they expect them:
//! `config` (YAML, overrides, the read-tracking `Node`), `arch` (backbones, DistillationModel), `loss`, `data` (dataset,
//! transforms, sampler, loader), `optim` (optimizers, lr schedules), `metric`, `engine` (train,
//! eval, infer, export, checkpoints) and `dist` (collectives). The engine knows nothing of
//! processes: the launcher hands it a job and a [`dist::Collective`].

pub mod arch;
pub mod atomic;
pub mod config;
pub mod data;
pub mod engine;
pub mod loss;
pub mod metric;
pub mod nn;
pub mod optim;
pub mod parallel;
pub mod weights;

pub use burn;
pub use engine::Config;
