//! Learning-rate schedules with PaddleClas's names. Each maps a position (iteration, or epoch when
//! `by_epoch`) to a rate; a linear warm-up runs first and shifts the schedule, as Paddle's
//! `LinearWarmup` does.

use super::config::{LrConfig, LrDecay};

#[derive(Clone, Debug, PartialEq)]
enum Shape {
    Const,
    /// Decay by `gamma` at each boundary (in steps).
    Multi {
        boundaries: Vec<usize>,
        gamma: f64,
    },
    /// Explicit value per interval.
    Piecewise {
        boundaries: Vec<usize>,
        values: Vec<f64>,
    },
    Cosine {
        total: usize,
        eta_min: f64,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct LrSchedule {
    base: f64,
    warmup_steps: usize,
    warmup_start: f64,
    shape: Shape,
    /// Steps per epoch in the schedule's unit (1 when `by_epoch`).
    steps_per_epoch: usize,
    pub by_epoch: bool,
}

impl LrSchedule {
    /// `iters_per_epoch` is injected like PaddleClas's `step_each_epoch` (the YAML value is ignored).
    pub fn new(cfg: &LrConfig, epochs: usize, iters_per_epoch: usize) -> Self {
        let spe = if cfg.by_epoch {
            1
        } else {
            iters_per_epoch.max(1)
        };
        let warmup_steps = (cfg.warmup_epoch * spe as f64).round() as usize;
        let epochs_to_steps = |v: &[usize]| v.iter().map(|e| e * spe).collect::<Vec<_>>();
        let shape = match &cfg.decay {
            LrDecay::Const => Shape::Const,
            LrDecay::MultiStep { milestones, gamma } => Shape::Multi {
                boundaries: epochs_to_steps(milestones),
                gamma: *gamma,
            },
            LrDecay::Step { step_size, gamma } => {
                let b: Vec<usize> = (1..=epochs / step_size).map(|k| k * step_size).collect();
                Shape::Multi {
                    boundaries: epochs_to_steps(&b),
                    gamma: *gamma,
                }
            }
            LrDecay::Piecewise {
                decay_epochs,
                values,
            } => Shape::Piecewise {
                boundaries: epochs_to_steps(decay_epochs),
                values: values.clone(),
            },
            LrDecay::Cosine { eta_min } => Shape::Cosine {
                total: ((epochs as f64 - cfg.warmup_epoch).max(1.0) * spe as f64) as usize,
                eta_min: *eta_min,
            },
        };
        // PaddleClas's Piecewise takes its first value as the base rate.
        let base = match &shape {
            Shape::Piecewise { values, .. } => values[0],
            _ => cfg.learning_rate,
        };
        LrSchedule {
            base,
            warmup_steps,
            warmup_start: cfg.warmup_start_lr,
            shape,
            steps_per_epoch: spe,
            by_epoch: cfg.by_epoch,
        }
    }

    /// The rate at global iteration `iter` (0-based) during epoch `epoch` (0-based).
    pub fn at(&self, iter: usize, epoch: usize) -> f64 {
        let step = if self.by_epoch { epoch } else { iter };
        if step < self.warmup_steps {
            return self.warmup_start
                + (self.base - self.warmup_start) * step as f64 / self.warmup_steps as f64;
        }
        let t = step - self.warmup_steps;
        match &self.shape {
            Shape::Const => self.base,
            Shape::Multi { boundaries, gamma } => {
                self.base * gamma.powi(boundaries.iter().filter(|&&b| t >= b).count() as i32)
            }
            Shape::Piecewise { boundaries, values } => {
                values[boundaries.iter().filter(|&&b| t >= b).count()]
            }
            Shape::Cosine { total, eta_min } => {
                let t = t.min(*total) as f64;
                eta_min
                    + (self.base - eta_min)
                        * 0.5
                        * (1.0 + (std::f64::consts::PI * t / *total as f64).cos())
            }
        }
    }

    pub fn steps_per_epoch(&self) -> usize {
        self.steps_per_epoch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Node;
    use std::path::Path;

    fn lr(yaml: &str, epochs: usize, ipe: usize) -> LrSchedule {
        let v: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
        let cfg = LrConfig::parse(&Node::root(v, Path::new("t.yaml"))).unwrap();
        LrSchedule::new(&cfg, epochs, ipe)
    }

    #[test]
    fn multistep_per_iteration() {
        let s = lr(
            "{name: MultiStepDecay, learning_rate: 0.2, milestones: [2, 4], gamma: 0.1}",
            6,
            10,
        );
        assert_eq!(s.at(19, 1), 0.2);
        assert!((s.at(20, 2) - 0.02).abs() < 1e-12);
        assert!((s.at(45, 4) - 0.002).abs() < 1e-12);
    }

    #[test]
    fn piecewise_uses_values() {
        let s = lr("{name: Piecewise, learning_rate: 0.1, decay_epochs: [1, 2], values: [0.1, 0.01, 0.001]}", 3, 5);
        assert_eq!(s.at(4, 0), 0.1);
        assert_eq!(s.at(5, 1), 0.01);
        assert_eq!(s.at(10, 2), 0.001);
    }

    #[test]
    fn cosine_with_warmup() {
        let s = lr(
            "{name: Cosine, learning_rate: 1.0, warmup_epoch: 1, warmup_start_lr: 0.0}",
            3,
            4,
        );
        assert_eq!(s.at(0, 0), 0.0);
        assert_eq!(s.at(2, 0), 0.5);
        assert_eq!(s.at(4, 1), 1.0); // warm-up done, cosine starts at the base rate
        assert!((s.at(8, 2) - 0.5).abs() < 1e-12); // halfway through the 8 cosine steps
        assert!(s.at(12, 3) < 1e-12);
    }

    #[test]
    fn by_epoch_steps_once_per_epoch() {
        let s = lr(
            "{name: MultiStepDecay, learning_rate: 1.0, milestones: [1], by_epoch: True}",
            2,
            100,
        );
        assert_eq!(s.at(99, 0), 1.0);
        assert!((s.at(100, 1) - 0.1).abs() < 1e-12);
    }
}
