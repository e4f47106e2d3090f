//! Optimizers and learning-rate schedules.

pub mod config;
pub mod lr;

use anyhow::{bail, Result};
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::SgdConfig;
pub use config::{LrConfig, LrDecay, OptimizerConfig, SCHEDULES};
pub use lr::LrSchedule;

pub const OPTIMIZERS: &[&str] = &["Momentum", "SGD"];

/// Paddle's Momentum as burn's SGD: coupled L2 weight decay (`g += wd·w`), `v = μ·v + g`
/// (no dampening: burn's default dampening of 0.1 is Paddle-incompatible), `w -= lr·v`.
pub fn sgd_config(cfg: &OptimizerConfig) -> Result<SgdConfig> {
    let momentum = match cfg.name.as_str() {
        "Momentum" => Some(
            MomentumConfig::new()
                .with_momentum(cfg.momentum)
                .with_dampening(0.0)
                .with_nesterov(cfg.use_nesterov),
        ),
        "SGD" => None,
        other => bail!(
            "Optimizer.name: unknown optimizer {other:?}; known: {}",
            OPTIMIZERS.join(", ")
        ),
    };
    let decay = (cfg.weight_decay > 0.0).then(|| WeightDecayConfig::new(cfg.weight_decay as f32));
    Ok(SgdConfig::new()
        .with_momentum(momentum)
        .with_weight_decay(decay))
}
