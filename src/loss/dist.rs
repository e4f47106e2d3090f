//! DIST: relations between predictions (`DistillationDISTLoss`).

use super::binding::Binding;
use super::common::safe_sqrt;
use super::registry::{DistillLoss, TermInput};
use crate::arch::ArchConfig;
use crate::config::Node;
use anyhow::Result;
use burn::config::Config;
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// DIST (Huang et al. 2022) of `[N, C]` logits per pair: `β·(1 − inter) + γ·(1 − intra)` (see
/// [`dist`]); terms `<name>_<A>_<B>`.
#[derive(Config, Debug, PartialEq)]
pub struct DistLossConfig {
    /// Weight of the inter-class (per-sample) relation.
    #[config(default = 1.0)]
    pub beta: f64,
    /// Weight of the intra-class (per-class) relation.
    #[config(default = 1.0)]
    pub gamma: f64,
    /// Prefix of the term names.
    #[config(default = "String::from(\"loss_dist\")")]
    pub name: String,
}

impl DistillLoss for DistLossConfig {
    fn from_config(p: &Node, _arch: &ArchConfig) -> Result<Self> {
        let mut c = Self::new();
        c.beta = p.f64_or("beta", c.beta)?;
        c.gamma = p.f64_or("gamma", c.gamma)?;
        c.name = p.str_or("name", &c.name)?;
        Ok(c)
    }

    fn term_names(&self, binding: &Binding) -> Vec<String> {
        binding.term_names(&self.name)
    }

    fn forward<B: Backend>(&self, input: &TermInput<B>) -> Result<Vec<Tensor<B, 1>>> {
        input.map_logit_pairs(|s, t| dist(s, t, self.beta, self.gamma))
    }
}

/// Mean over rows of the Pearson correlation of `a[n,:]` and `b[n,:]`, with PaddleClas's
/// cosine `Σ a·b / (‖a‖·‖b‖ + 1e-8)` of the row-centred vectors.
fn mean_row_pearson<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 1> {
    let a = a.clone().sub(a.mean_dim(1));
    let b = b.clone().sub(b.mean_dim(1));
    let norm = |x: Tensor<B, 2>| safe_sqrt(x.square().sum_dim(1));
    let denom = norm(a.clone()).mul(norm(b.clone())).add_scalar(1e-8);
    a.mul(b).sum_dim(1).div(denom).mean()
}

/// DIST (Huang et al. 2022, `DISTLoss`): `β·(1 − inter) + γ·(1 − intra)`, the mean Pearson
/// correlations of the softmax outputs per sample (inter-class) and per class (intra-class).
/// As in PaddleClas there is no temperature.
pub fn dist<B: Backend>(
    student: Tensor<B, 2>,
    teacher: Tensor<B, 2>,
    beta: f64,
    gamma: f64,
) -> Tensor<B, 1> {
    let (ys, yt) = (softmax(student, 1), softmax(teacher, 1));
    let inter = mean_row_pearson(ys.clone(), yt.clone())
        .neg()
        .add_scalar(1.0);
    let intra = mean_row_pearson(ys.transpose(), yt.transpose())
        .neg()
        .add_scalar(1.0);
    inter.mul_scalar(beta).add(intra.mul_scalar(gamma))
}

#[cfg(test)]
mod tests {
    use super::super::testing::{combined, specs};

    #[test]
    fn dist_terms_take_the_entry_name() {
        let l = combined(&specs(
            "[{DistillationDISTLoss: {model_name_pairs: [[Student, Teacher]], name: my_dist}}]",
        ))
        .unwrap();
        assert_eq!(l.term_names(), ["my_dist_Student_Teacher", "loss"]);
    }
}
