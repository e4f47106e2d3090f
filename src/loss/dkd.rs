//! Decoupled KD (`DistillationDKDLoss`).

use super::binding::Binding;
use super::common::{check_temperature, config_error, logsumexp, one_hot, target_labels};
use super::registry::{DistillLoss, TermInput};
use crate::arch::ArchConfig;
use crate::config::Node;
use anyhow::Result;
use burn::config::Config;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

/// A large negative number that masks a logit out of a softmax without producing NaN.
const MASK: f32 = -1.0e30;

/// Decoupled KD (Zhao et al. 2022) of `[N, C]` logits per pair: `α·TCKD + β·NCKD` (see [`dkd`]),
/// times `min(epoch / warmup, 1)` with a warm-up; terms `<name>_<A>_<B>`.
#[derive(Config, Debug, PartialEq)]
pub struct DkdLossConfig {
    /// Softening temperature T (> 0).
    #[config(default = 1.0)]
    pub temperature: f64,
    /// Weight of the target-class term.
    #[config(default = 1.0)]
    pub alpha: f64,
    /// Weight of the non-target-class term.
    #[config(default = 1.0)]
    pub beta: f64,
    /// kd-launch extension: a linear warm-up over this many epochs (> 0), as mdistiller's.
    pub warmup: Option<f64>,
    /// The teacher's arg-max instead of the labels as the target class.
    #[config(default = false)]
    pub use_target_as_gt: bool,
    /// Prefix of the term names.
    #[config(default = "String::from(\"loss_dkd\")")]
    pub name: String,
}

impl DistillLoss for DkdLossConfig {
    fn from_config(p: &Node, _arch: &ArchConfig) -> Result<Self> {
        let mut c = Self::new();
        c.temperature = p.f64_or("temperature", c.temperature)?;
        c.alpha = p.f64_or("alpha", c.alpha)?;
        c.beta = p.f64_or("beta", c.beta)?;
        c.warmup = p.f64("warmup")?;
        c.use_target_as_gt = p.bool_or("use_target_as_gt", c.use_target_as_gt)?;
        check_temperature(p, c.temperature)?;
        if let Some(w) = c.warmup {
            if w <= 0.0 {
                return Err(config_error(p, format!("warmup must be positive, got {w}")));
            }
        }
        c.name = p.str_or("name", &c.name)?;
        Ok(c)
    }

    fn term_names(&self, binding: &Binding) -> Vec<String> {
        binding.term_names(&self.name)
    }

    fn forward<B: Backend>(&self, input: &TermInput<B>) -> Result<Vec<Tensor<B, 1>>> {
        let ctx = input.ctx;
        input.map_logit_pairs(|s, tch| {
            let y = target_labels(ctx.labels.clone(), &tch, self.use_target_as_gt);
            let v = dkd(s, tch, y, self.temperature, self.alpha, self.beta);
            match self.warmup {
                Some(w) => v.mul_scalar((ctx.epoch as f64 / w).min(1.0)),
                None => v,
            }
        })
    }
}

/// Decoupled KD (Zhao et al. 2022): `α·TCKD + β·NCKD`.
///
/// PaddleClas computes `log(b_s)` of the binary target/non-target probabilities directly, which is
/// `-inf` (then NaN) once a probability underflows; here both are log-sum-exps of the logits, equal
/// where PaddleClas is finite and finite everywhere else.
pub fn dkd<B: Backend>(
    student: Tensor<B, 2>,
    teacher: Tensor<B, 2>,
    labels: Tensor<B, 1, Int>,
    temperature: f64,
    alpha: f64,
    beta: f64,
) -> Tensor<B, 1> {
    let [n, c] = student.dims();
    let gt = one_hot(labels, c).equal_elem(1.0);
    let zs = student.div_scalar(temperature);
    let zt = teacher.div_scalar(temperature);
    let scale = temperature * temperature / n as f64;

    // Binary (target, non-target) log-probabilities: log b₁ = z_y − lse(z), log b₂ = lse(z without y) − lse(z).
    let binary = |z: Tensor<B, 2>| {
        let all = logsumexp(z.clone());
        let target = z.clone().mask_fill(gt.clone().bool_not(), MASK);
        let target = logsumexp(target).sub(all.clone());
        let other = logsumexp(z.mask_fill(gt.clone(), MASK)).sub(all);
        Tensor::cat(vec![target, other], 1)
    };
    let log_bs = binary(zs.clone());
    let log_bt = binary(zt.clone());
    let tckd = log_bt
        .clone()
        .exp()
        .mul(log_bt.sub(log_bs))
        .sum()
        .mul_scalar(scale);

    // Non-target distributions: the target logit pushed down by 1000, as in the paper's code.
    let push = gt.float().mul_scalar(1000.0);
    let log_qs = log_softmax(zs.sub(push.clone()), 1);
    let log_qt = log_softmax(zt.sub(push), 1);
    let nckd = log_qt
        .clone()
        .exp()
        .mul(log_qt.sub(log_qs))
        .sum()
        .mul_scalar(scale);
    tckd.mul_scalar(alpha).add(nckd.mul_scalar(beta))
}

#[cfg(test)]
mod tests {
    use super::super::testing::{combined, outputs, run, specs, value};

    #[test]
    fn dkd_warmup_ramps_linearly() {
        let l = combined(&specs(
            "[{DistillationDKDLoss: {model_name_pairs: [[Student, Teacher]], warmup: 4}}]",
        ))
        .unwrap();
        let (o, y) = outputs();
        let at = |epoch| value(&run(&l, &o, &y, epoch).unwrap().total);
        assert!((at(1) * 4.0 - at(4)).abs() < 1e-5);
        assert_eq!(at(4), at(9));
    }

    #[test]
    fn warmup_must_be_positive() {
        let e = combined(&specs(
            "[{DistillationDKDLoss: {model_name_pairs: [[Student, Teacher]], warmup: 0}}]",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("warmup must be positive, got 0"), "{e}");
    }
}
