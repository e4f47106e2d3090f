//! Spherical KD (`DistillationSKDLoss`).

use super::binding::Binding;
use super::ce::{cross_entropy, soft_cross_entropy};
use super::common::{check_temperature, target_labels};
use super::registry::{DistillLoss, TermInput};
use crate::arch::ArchConfig;
use crate::config::Node;
use anyhow::Result;
use burn::config::Config;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

/// Spherical KD (Guo et al. 2020) of `[N, C]` logits per pair (see [`skd`]); terms
/// `<name>_<A>_<B>`.
#[derive(Config, Debug, PartialEq)]
pub struct SkdLossConfig {
    /// Softening temperature T (> 0).
    #[config(default = 1.0)]
    pub temperature: f64,
    /// Scale of the normalised logits.
    #[config(default = 2.0)]
    pub multiplier: f64,
    /// Weight of the KD term; the hard-label CE gets `1 − alpha`.
    #[config(default = 0.9)]
    pub alpha: f64,
    /// The teacher's arg-max instead of the labels in the CE term.
    #[config(default = false)]
    pub use_target_as_gt: bool,
    /// Prefix of the term names.
    #[config(default = "String::from(\"skd_loss\")")]
    pub name: String,
}

impl DistillLoss for SkdLossConfig {
    fn from_config(p: &Node, _arch: &ArchConfig) -> Result<Self> {
        let mut c = Self::new();
        c.temperature = p.f64_or("temperature", c.temperature)?;
        c.multiplier = p.f64_or("multiplier", c.multiplier)?;
        c.alpha = p.f64_or("alpha", c.alpha)?;
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
            skd(s, tch, y, self.temperature, self.multiplier, self.alpha)
        })
    }
}

/// Spherical KD (Guo et al. 2020, `SKDLoss`): both logits layer-normalised over the classes
/// (no affine, ε = 1e-7) and scaled by `multiplier`; then
/// `α·T²·softCE(z_s/T, z_t/T) + (1 − α)·CE(z_s, y)` on the normalised logits.
pub fn skd<B: Backend>(
    student: Tensor<B, 2>,
    teacher: Tensor<B, 2>,
    labels: Tensor<B, 1, Int>,
    temperature: f64,
    multiplier: f64,
    alpha: f64,
) -> Tensor<B, 1> {
    let norm = |z: Tensor<B, 2>| {
        let centred = z.clone().sub(z.mean_dim(1));
        let var = centred.clone().square().mean_dim(1);
        centred
            .div(var.add_scalar(1e-7).sqrt())
            .mul_scalar(multiplier)
    };
    let (zs, zt) = (norm(student), norm(teacher));
    let kd = soft_cross_entropy(
        zs.clone().div_scalar(temperature),
        zt.div_scalar(temperature),
    )
    .mul_scalar(temperature * temperature);
    let ce = cross_entropy(zs, labels, None);
    kd.mul_scalar(alpha).add(ce.mul_scalar(1.0 - alpha))
}

#[cfg(test)]
mod tests {
    use super::super::testing::{combined, specs};

    #[test]
    fn skd_terms_are_named_as_in_paddleclas() {
        let l = combined(&specs(
            "[{DistillationSKDLoss: {model_name_pairs: [[Student, Teacher]], temperature: 1}}]",
        ))
        .unwrap();
        assert_eq!(l.term_names(), ["skd_loss_Student_Teacher", "loss"]);
    }
}
