//! Weighted soft labels (`DistillationWSLLoss`).

use super::binding::Binding;
use super::common::{check_temperature, one_hot, target_labels};
use super::registry::{DistillLoss, TermInput};
use crate::arch::ArchConfig;
use crate::config::Node;
use anyhow::Result;
use burn::config::Config;
use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

/// Weighted soft labels (Zhou et al. 2021) of `[N, C]` logits per pair (see [`wsl`]); terms
/// `<name>_<A>_<B>`.
#[derive(Config, Debug, PartialEq)]
pub struct WslLossConfig {
    /// Softening temperature T (> 0).
    #[config(default = 2.0)]
    pub temperature: f64,
    /// The teacher's arg-max instead of the labels in the sample weights.
    #[config(default = false)]
    pub use_target_as_gt: bool,
    /// Prefix of the term names.
    #[config(default = "String::from(\"wsl_loss\")")]
    pub name: String,
}

impl DistillLoss for WslLossConfig {
    fn from_config(p: &Node, _arch: &ArchConfig) -> Result<Self> {
        let mut c = Self::new();
        c.temperature = p.f64_or("temperature", c.temperature)?;
        c.use_target_as_gt = p.bool_or("use_target_as_gt", c.use_target_as_gt)?;
        check_temperature(p, c.temperature)?;
        c.name = p.str_or("name", &c.name)?;
        Ok(c)
    }

    fn term_names(&self, binding: &Binding) -> Vec<String> {
        binding.term_names(&self.name)
    }

    fn forward<B: Backend>(&self, input: &TermInput<B>) -> Result<Vec<Tensor<B, 1>>> {
        let labels = &input.ctx.labels;
        input.map_logit_pairs(|s, tch| {
            let y = target_labels(labels.clone(), &tch, self.use_target_as_gt);
            wsl(s, tch, y, self.temperature)
        })
    }
}

/// Weighted soft labels (Zhou et al. 2021, `WSLLoss`): the soft CE
/// `−Σ_c softmax(z_t/T)·log softmax(z_s/T)` of each sample, weighted by
/// `1 − exp(−max(CE_s / (CE_t + 1e-7), 0))` where `CE` are the hard-label cross-entropies at
/// T = 1 of the detached logits; `T² · mean_n`.
pub fn wsl<B: Backend>(
    student: Tensor<B, 2>,
    teacher: Tensor<B, 2>,
    labels: Tensor<B, 1, Int>,
    temperature: f64,
) -> Tensor<B, 1> {
    let [_, c] = student.dims();
    let y = one_hot(labels, c);
    let ce = |z: Tensor<B, 2>| log_softmax(z.detach(), 1).mul(y.clone()).sum_dim(1).neg();
    let ratio = ce(student.clone())
        .div(ce(teacher.clone()).add_scalar(1e-7))
        .clamp_min(0.0);
    let weight = ratio.neg().exp().neg().add_scalar(1.0);
    let soft = log_softmax(student.div_scalar(temperature), 1)
        .mul(softmax(teacher.div_scalar(temperature), 1))
        .sum_dim(1)
        .neg();
    soft.mul(weight)
        .mean()
        .mul_scalar(temperature * temperature)
}

#[cfg(test)]
mod tests {
    use super::super::testing::{combined, specs};

    #[test]
    fn wsl_terms_are_named_as_in_paddleclas() {
        let l = combined(&specs(
            "[{DistillationWSLLoss: {model_name_pairs: [[Student, Teacher]]}}]",
        ))
        .unwrap();
        assert_eq!(l.term_names(), ["wsl_loss_Student_Teacher", "loss"]);
    }
}
