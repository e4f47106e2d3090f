//! The `Optimizer` section, its `lr` schedule included: every key is read (and checked) when the
//! config loads, whether or not the command trains.

use crate::config::{ConfigResult, Node};

pub const SCHEDULES: &[&str] = &["ConstLR", "MultiStepDecay", "Piecewise", "Cosine", "Step"];

#[derive(Clone, Debug)]
pub struct OptimizerConfig {
    pub name: String,
    pub momentum: f64,
    pub weight_decay: f64,
    pub use_nesterov: bool,
    pub lr: LrConfig,
}

#[derive(Clone, Debug)]
pub struct LrConfig {
    pub name: String,
    pub learning_rate: f64,
    pub warmup_epoch: f64,
    pub warmup_start_lr: f64,
    pub by_epoch: bool,
    /// What the schedule's name adds (in epochs; [`super::LrSchedule`] converts to steps).
    pub decay: LrDecay,
}

/// The schedule after the warm-up, with its own parameters.
#[derive(Clone, Debug, PartialEq)]
pub enum LrDecay {
    /// `ConstLR` (or `Constant`).
    Const,
    /// `MultiStepDecay`: times `gamma` at each milestone.
    MultiStep { milestones: Vec<usize>, gamma: f64 },
    /// `Step`: times `gamma` every `step_size` epochs.
    Step { step_size: usize, gamma: f64 },
    /// `Piecewise`: `values[i]` from `decay_epochs[i - 1]` on (one more value than boundaries).
    Piecewise {
        decay_epochs: Vec<usize>,
        values: Vec<f64>,
    },
    /// `Cosine` down to `eta_min` at the last epoch.
    Cosine { eta_min: f64 },
}

/// `key` of `n` (default `default`), which must be at least 0.
fn non_negative(n: &Node, key: &str, default: f64) -> ConfigResult<f64> {
    let v = n.f64_or(key, default)?;
    if v < 0.0 || v.is_nan() {
        return Err(n
            .require(key)?
            .error(format!("must not be negative, got {v}")));
    }
    Ok(v)
}

impl OptimizerConfig {
    pub fn parse(o: &Node) -> ConfigResult<OptimizerConfig> {
        let name = o.str_or("name", "Momentum")?;
        let mut weight_decay = non_negative(o, "weight_decay", 0.0)?;
        if let Some(r) = o.get("regularizer") {
            let kind = r.str_or("name", "L2")?;
            if !kind.eq_ignore_ascii_case("L2") {
                return Err(r.error(format!("regularizer {kind:?} is not supported (only L2)")));
            }
            weight_decay = non_negative(&r, "coeff", 0.0)?;
        }
        Ok(OptimizerConfig {
            name,
            momentum: non_negative(o, "momentum", 0.9)?,
            weight_decay,
            use_nesterov: o.bool_or("use_nesterov", false)?,
            lr: LrConfig::parse(&o.require("lr")?)?,
        })
    }
}

impl LrConfig {
    pub fn parse(lr: &Node) -> ConfigResult<LrConfig> {
        let name = lr.str_or("name", "ConstLR")?;
        let learning_rate = lr.require("learning_rate")?.as_f64()?;
        if !(learning_rate > 0.0 && learning_rate.is_finite()) {
            return Err(lr
                .require("learning_rate")?
                .error(format!("must be positive, got {learning_rate}")));
        }
        // PaddleClas's engine overwrites it with the batches per epoch of the loader, as
        // kd-launch does (see `LrSchedule::new`): the written value never counts.
        lr.accept(&["step_each_epoch"]);
        let required = |key: &str| lr.require(key).map(|_| ());
        let decay = match name.as_str() {
            "ConstLR" | "Constant" => LrDecay::Const,
            "MultiStepDecay" => {
                required("milestones")?;
                LrDecay::MultiStep {
                    milestones: lr.usize_list("milestones")?.unwrap_or_default(),
                    gamma: lr.f64_or("gamma", 0.1)?,
                }
            }
            "Step" => {
                let step_size = lr.require("step_size")?.as_usize()?;
                if step_size == 0 {
                    return Err(lr.require("step_size")?.error("must be at least 1"));
                }
                LrDecay::Step {
                    step_size,
                    gamma: lr.f64_or("gamma", 0.1)?,
                }
            }
            "Piecewise" => {
                required("decay_epochs")?;
                required("values")?;
                let decay_epochs = lr.usize_list("decay_epochs")?.unwrap_or_default();
                let values = lr.f64_list("values")?.unwrap_or_default();
                if values.len() != decay_epochs.len() + 1 {
                    return Err(lr.error(format!(
                        "Piecewise needs one more value than decay_epochs ({} values, {} boundaries)",
                        values.len(),
                        decay_epochs.len()
                    )));
                }
                LrDecay::Piecewise {
                    decay_epochs,
                    values,
                }
            }
            "Cosine" => LrDecay::Cosine {
                eta_min: lr.f64_or("eta_min", 0.0)?,
            },
            other => {
                return Err(lr.error(format!(
                    "unknown lr schedule {other:?}; known: {}",
                    SCHEDULES.join(", ")
                )));
            }
        };
        Ok(LrConfig {
            name,
            learning_rate,
            warmup_epoch: non_negative(lr, "warmup_epoch", 0.0)?,
            warmup_start_lr: non_negative(lr, "warmup_start_lr", 0.0)?,
            by_epoch: lr.bool_or("by_epoch", false)?,
            decay,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_yaml;
    use std::path::Path;

    fn parse(yaml: &str) -> (Node, ConfigResult<OptimizerConfig>) {
        let root = Node::root(
            parse_yaml(yaml, Path::new("o.yaml")).unwrap(),
            Path::new("o.yaml"),
        );
        let cfg = OptimizerConfig::parse(&root.require("Optimizer").unwrap());
        (root, cfg)
    }

    fn error(yaml: &str) -> String {
        parse(yaml).1.unwrap_err().to_string()
    }

    #[test]
    fn out_of_range_values_name_file_and_key() {
        let lr = "lr: {name: Cosine, learning_rate: 0.1}";
        for (yaml, key) in [
            (
                "Optimizer: {lr: {name: Cosine, learning_rate: -0.1}}".to_string(),
                "Optimizer.lr.learning_rate: must be positive",
            ),
            (
                "Optimizer: {lr: {name: Cosine, learning_rate: 0}}".to_string(),
                "Optimizer.lr.learning_rate: must be positive",
            ),
            (
                format!("Optimizer: {{momentum: -0.9, {lr}}}"),
                "Optimizer.momentum: must not be negative",
            ),
            (
                format!("Optimizer: {{weight_decay: -1e-4, {lr}}}"),
                "Optimizer.weight_decay: must not be negative",
            ),
            (
                format!("Optimizer: {{regularizer: {{name: L2, coeff: -1}}, {lr}}}"),
                "Optimizer.regularizer.coeff: must not be negative",
            ),
            (
                "Optimizer: {lr: {name: Cosine, learning_rate: 0.1, warmup_epoch: -1}}".into(),
                "Optimizer.lr.warmup_epoch: must not be negative",
            ),
            (
                "Optimizer: {lr: {name: Cosine, learning_rate: 0.1, warmup_start_lr: -0.01}}"
                    .into(),
                "Optimizer.lr.warmup_start_lr: must not be negative",
            ),
            (
                "Optimizer: {lr: {name: Step, learning_rate: 0.1, step_size: 0}}".into(),
                "Optimizer.lr.step_size: must be at least 1",
            ),
            (
                "Optimizer: {lr: {name: MultiStepDecay, learning_rate: 0.1}}".into(),
                "Optimizer.lr.milestones: missing (required)",
            ),
            (
                "Optimizer: {lr: {name: Warm, learning_rate: 0.1}}".into(),
                "Optimizer.lr: unknown lr schedule \"Warm\"",
            ),
        ] {
            let e = error(&yaml);
            assert!(e.starts_with(&format!("o.yaml: {key}")), "{yaml}: {e}");
        }
    }

    #[test]
    fn unknown_keys_are_reported_with_a_suggestion() {
        let (root, cfg) = parse(
            "Optimizer: {name: Momentum, momentun: 0.8, lr: {name: MultiStepDecay, learning_rate: 0.1, milestones: [1], gama: 0.5, step_each_epoch: 1}}",
        );
        let cfg = cfg.unwrap();
        assert_eq!(cfg.momentum, 0.9);
        let report: Vec<String> = root.unread_keys().iter().map(|k| k.to_string()).collect();
        assert_eq!(
            report,
            [
                "o.yaml: Optimizer.momentun: unknown key, ignored; did you mean `Optimizer.momentum`?",
                "o.yaml: Optimizer.lr.gama: unknown key, ignored; did you mean `Optimizer.lr.gamma`?",
            ]
        );
    }
}
