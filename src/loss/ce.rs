//! Cross-entropy: `CELoss` / `DistillationGTCELoss` against the labels (optionally
//! label-smoothed) and `DistillationCELoss` against a teacher's softmax.

use super::binding::{output, Binding};
use super::common::{accept_unused, config_error, one_hot};
use super::registry::{DistillLoss, TermInput};
use crate::arch::ArchConfig;
use crate::config::Node;
use anyhow::Result;
use burn::config::Config;
use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

/// Hard-label cross-entropy `mean_n −Σ_c y·log softmax(z)` of `[N, C]` logits and `[N]` labels,
/// with `epsilon` on the smoothed target `y = (1−ε)·onehot + ε/C`.
///
/// `CELoss` applies it to the trained model (term `CELoss`); `DistillationGTCELoss` to each of
/// its `model_names` (`CELoss_<model>`).
#[derive(Config, Debug, PartialEq)]
pub struct CeLossConfig {
    /// Label smoothing ε in [0, 1); none by default.
    pub epsilon: Option<f64>,
}

impl DistillLoss for CeLossConfig {
    fn from_config(p: &Node, _arch: &ArchConfig) -> Result<Self> {
        let mut c = CeLossConfig::new();
        c.epsilon = p.f64("epsilon")?;
        if let Some(eps) = c.epsilon {
            if !(0.0..1.0).contains(&eps) {
                return Err(config_error(
                    p,
                    format!("epsilon must be in [0, 1), got {eps}"),
                ));
            }
        }
        // PaddleClas's wrapper takes a `name` but names the terms after CELoss.
        accept_unused(p, "name");
        Ok(c)
    }

    fn binding(&self, config_name: &str, p: &Node) -> Result<Binding> {
        Binding::read_models(config_name, p)
    }

    fn term_names(&self, binding: &Binding) -> Vec<String> {
        binding.term_names("CELoss")
    }

    fn forward<B: Backend>(&self, input: &TermInput<B>) -> Result<Vec<Tensor<B, 1>>> {
        let ctx = input.ctx;
        Ok(match input.binding {
            Binding::Plain => vec![cross_entropy(
                output(ctx, ctx.default_model)?.logits.clone(),
                ctx.labels.clone(),
                self.epsilon,
            )],
            Binding::Models(ms) => ms
                .iter()
                .map(|m| {
                    Ok(cross_entropy(
                        output(ctx, m)?.logits.clone(),
                        ctx.labels.clone(),
                        self.epsilon,
                    ))
                })
                .collect::<Result<_>>()?,
            Binding::Pairs(_) => unreachable!("CELoss is bound to model_names when built"),
        })
    }
}

/// Soft-label cross-entropy against the second model of each pair (`DistillationCELoss`):
/// `mean_n −Σ_c softmax(z_b)·log softmax(z_a)` of `[N, C]` logits; terms `CELoss_<A>_<B>`.
#[derive(Config, Debug, PartialEq)]
pub struct SoftCeLossConfig {}

impl DistillLoss for SoftCeLossConfig {
    fn from_config(p: &Node, _arch: &ArchConfig) -> Result<Self> {
        // PaddleClas's wrapper takes a `name` but names the terms after CELoss.
        accept_unused(p, "name");
        Ok(SoftCeLossConfig::new())
    }

    fn term_names(&self, binding: &Binding) -> Vec<String> {
        binding.term_names("CELoss")
    }

    fn forward<B: Backend>(&self, input: &TermInput<B>) -> Result<Vec<Tensor<B, 1>>> {
        input.map_logit_pairs(soft_cross_entropy)
    }
}

/// Cross-entropy with hard labels, mean over the batch; with `epsilon`, label smoothing
/// `(1-ε)·onehot + ε/C` as Paddle's `label_smooth`.
pub fn cross_entropy<B: Backend>(
    logits: Tensor<B, 2>,
    labels: Tensor<B, 1, Int>,
    epsilon: Option<f64>,
) -> Tensor<B, 1> {
    let [_, c] = logits.dims();
    let mut target = one_hot(labels, c);
    if let Some(eps) = epsilon {
        target = target.mul_scalar(1.0 - eps).add_scalar(eps / c as f64);
    }
    soft_cross_entropy_with(log_softmax(logits, 1), target)
}

/// `mean_n −Σ_c target·log_p`.
fn soft_cross_entropy_with<B: Backend>(log_p: Tensor<B, 2>, target: Tensor<B, 2>) -> Tensor<B, 1> {
    log_p.mul(target).sum_dim(1).neg().mean()
}

/// Soft-label cross-entropy against a teacher (`DistillationCELoss`):
/// `mean_n −Σ_c softmax(z_t)·log softmax(z_s)`.
pub fn soft_cross_entropy<B: Backend>(
    student: Tensor<B, 2>,
    teacher: Tensor<B, 2>,
) -> Tensor<B, 1> {
    soft_cross_entropy_with(log_softmax(student, 1), softmax(teacher, 1))
}

#[cfg(test)]
mod tests {
    use super::super::testing::{combined, specs};

    #[test]
    fn soft_ce_terms_are_named_as_in_paddleclas() {
        let l = combined(&specs(
            "[{DistillationCELoss: {model_name_pairs: [[Student, Teacher]]}}]",
        ))
        .unwrap();
        assert_eq!(l.term_names(), ["CELoss_Student_Teacher", "loss"]);
    }

    #[test]
    fn epsilon_is_checked() {
        let e = combined(&specs("[{CELoss: {epsilon: 1.0}}]"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("epsilon must be in [0, 1), got 1"), "{e}");
    }
}
