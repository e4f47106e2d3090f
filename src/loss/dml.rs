//! Deep mutual learning (`DistillationDMLLoss`).

use super::binding::Binding;
use super::common::{accept_unused, config_error};
use super::registry::{DistillLoss, TermInput};
use crate::arch::ArchConfig;
use crate::config::Node;
use anyhow::Result;
use burn::config::Config;
use burn::tensor::activation::{sigmoid, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// The activation DML compares outputs after.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum DmlAct {
    Softmax,
    Sigmoid,
    /// The outputs already are probabilities.
    Identity,
}

/// DML's symmetric KL of `[N, C]` outputs per pair (see [`dml`]); terms
/// `DMLLoss_<A>_<B>_<pair index>`.
#[derive(Config, Debug, PartialEq)]
pub struct DmlLossConfig {
    /// `act`: `softmax`, `sigmoid` or `None` (no activation).
    #[config(default = "DmlAct::Softmax")]
    pub act: DmlAct,
    /// Sum over the classes instead of averaging over them.
    #[config(default = false)]
    pub sum_across_class_dim: bool,
}

impl DistillLoss for DmlLossConfig {
    fn from_config(p: &Node, _arch: &ArchConfig) -> Result<Self> {
        let mut c = Self::new();
        c.act = match p.get("act") {
            Some(act) => match act.as_str()?.as_str() {
                "softmax" => DmlAct::Softmax,
                "sigmoid" => DmlAct::Sigmoid,
                "None" => DmlAct::Identity,
                other => {
                    return Err(config_error(
                        p,
                        format!("act must be softmax, sigmoid or None, got {other:?}"),
                    ))
                }
            },
            // `act: None` is null after PaddleClas's literal evaluation: no activation. (A
            // present key whose node is absent is a null.)
            None if p.value.as_mapping().is_some_and(|m| m.get("act").is_some()) => {
                DmlAct::Identity
            }
            None => c.act,
        };
        c.sum_across_class_dim = p.bool_or("sum_across_class_dim", c.sum_across_class_dim)?;
        // PaddleClas's wrapper takes a `name` but names the terms after DMLLoss.
        accept_unused(p, "name");
        Ok(c)
    }

    /// PaddleClas's DML wrapper appends the pair index.
    fn term_names(&self, binding: &Binding) -> Vec<String> {
        binding
            .pairs()
            .iter()
            .enumerate()
            .map(|(i, (a, b))| format!("DMLLoss_{a}_{b}_{i}"))
            .collect()
    }

    fn forward<B: Backend>(&self, input: &TermInput<B>) -> Result<Vec<Tensor<B, 1>>> {
        input.map_logit_pairs(|a, b| dml(a, b, self.act, self.sum_across_class_dim))
    }
}

/// Deep mutual learning's symmetric KL: with `k(a, b) = b·log((b+ε)/(a+ε))·C` (ε = 1e-12),
/// the mean over all elements of `(k(p, q) + k(q, p)) / 2` — a batch-mean symmetric KL —
/// or, with `sum_across_class_dim`, the sum over classes averaged over the batch.
pub fn dml<B: Backend>(
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
    act: DmlAct,
    sum_across_class_dim: bool,
) -> Tensor<B, 1> {
    let [_, c] = a.dims();
    let (p, q) = match act {
        DmlAct::Softmax => (softmax(a, 1), softmax(b, 1)),
        DmlAct::Sigmoid => (sigmoid(a), sigmoid(b)),
        DmlAct::Identity => (a, b),
    };
    let eps = 1e-12;
    let (lp, lq) = (
        p.clone().add_scalar(eps).log(),
        q.clone().add_scalar(eps).log(),
    );
    let k_pq = q.mul(lq.clone() - lp.clone());
    let k_qp = p.mul(lp - lq);
    let loss = (k_pq + k_qp).mul_scalar(c as f64 / 2.0);
    if sum_across_class_dim {
        loss.sum_dim(1).mean()
    } else {
        loss.mean()
    }
}

#[cfg(test)]
mod tests {
    use super::super::registry::LossKind;
    use super::super::testing::{combined, specs};
    use super::*;

    #[test]
    fn dml_terms_are_named_as_in_paddleclas() {
        let l = combined(&specs(
            "[{DistillationDMLLoss: {model_name_pairs: [[Student, Teacher], [Teacher, Student]], act: None}}]",
        ))
        .unwrap();
        assert_eq!(
            l.terms[0].loss,
            LossKind::Dml(DmlLossConfig::new().with_act(DmlAct::Identity))
        );
        assert_eq!(
            l.term_names(),
            [
                "DMLLoss_Student_Teacher_0",
                "DMLLoss_Teacher_Student_1",
                "loss"
            ]
        );
    }

    #[test]
    fn a_null_act_is_no_activation() {
        for (act, want) in [("", DmlAct::Identity), ("sigmoid", DmlAct::Sigmoid)] {
            let l = combined(&specs(&format!(
                "[{{DistillationDMLLoss: {{model_name_pairs: [[Student, Teacher]], act: {act}}}}}]"
            )))
            .unwrap();
            assert_eq!(
                l.terms[0].loss,
                LossKind::Dml(DmlLossConfig::new().with_act(want))
            );
        }
    }
}
