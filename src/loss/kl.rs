//! Hinton KD (`DistillationKLDivLoss`).

use super::binding::Binding;
use super::common::{accept_unused, check_temperature};
use super::registry::{DistillLoss, TermInput};
use crate::arch::ArchConfig;
use crate::config::Node;
use anyhow::Result;
use burn::config::Config;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// KL divergence of the softened distributions of `[N, C]` logits,
/// `T² · Σ_{n,c} p_t (log p_t − log p_s) / N` with `p = softmax(z/T)`, per pair; terms
/// `loss_kldiv_<A>_<B>`.
#[derive(Config, Debug, PartialEq)]
pub struct KlDivLossConfig {
    /// Softening temperature T (> 0).
    #[config(default = 4.0)]
    pub temperature: f64,
}

impl DistillLoss for KlDivLossConfig {
    fn from_config(p: &Node, _arch: &ArchConfig) -> Result<Self> {
        let mut c = Self::new();
        c.temperature = p.f64_or("temperature", c.temperature)?;
        check_temperature(p, c.temperature)?;
        // PaddleClas's wrapper takes a `name` but names the terms after KLDivLoss.
        accept_unused(p, "name");
        Ok(c)
    }

    fn term_names(&self, binding: &Binding) -> Vec<String> {
        binding.term_names("loss_kldiv")
    }

    fn forward<B: Backend>(&self, input: &TermInput<B>) -> Result<Vec<Tensor<B, 1>>> {
        input.map_logit_pairs(|s, t| kl_div(s, t, self.temperature))
    }
}

/// Hinton KD: `T² · Σ p_t (log p_t − log p_s) / N` with `p = softmax(z/T)`.
pub fn kl_div<B: Backend>(
    student: Tensor<B, 2>,
    teacher: Tensor<B, 2>,
    temperature: f64,
) -> Tensor<B, 1> {
    let [n, _] = student.dims();
    let log_ps = log_softmax(student.div_scalar(temperature), 1);
    let log_pt = log_softmax(teacher.div_scalar(temperature), 1);
    let pt = log_pt.clone().exp();
    pt.mul(log_pt.sub(log_ps))
        .sum()
        .mul_scalar(temperature * temperature / n as f64)
}

#[cfg(test)]
mod tests {
    use super::super::testing::{combined, specs};

    #[test]
    fn temperature_must_be_positive() {
        let e = combined(&specs(
            "[{DistillationKLDivLoss: {model_name_pairs: [[Student, Teacher]], temperature: 0}}]",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("temperature must be positive, got 0"), "{e}");
    }
}
