//! Distances between outputs, often feature maps (`DistillationDistanceLoss`).

use super::binding::Binding;
use super::common::{accept_unused, config_error};
use super::registry::{DistillLoss, TermInput};
use crate::arch::ArchConfig;
use crate::config::Node;
use anyhow::Result;
use burn::config::Config;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// Feature distance (`DistanceLoss`): `l2` mean squared error, `l1` mean absolute error,
/// `smooth_l1` Huber with δ = 1 (Paddle's defaults), each averaged over all elements.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum Distance {
    L2,
    L1,
    SmoothL1,
}

impl Distance {
    /// The `mode` that selects it.
    pub fn mode(self) -> &'static str {
        match self {
            Distance::L2 => "l2",
            Distance::L1 => "l1",
            Distance::SmoothL1 => "smooth_l1",
        }
    }
}

/// [`distance`] between the `key` outputs (logits, or `[N, C, H, W]` maps) of each pair; terms
/// `loss_<mode>_loss_<mode>_<pair index>`.
#[derive(Config, Debug, PartialEq)]
pub struct DistanceLossConfig {
    /// `mode`: `l2`, `l1` or `smooth_l1`.
    #[config(default = "Distance::L2")]
    pub mode: Distance,
}

impl DistillLoss for DistanceLossConfig {
    const READS_FEATURE_MAPS: bool = true;

    fn from_config(p: &Node, _arch: &ArchConfig) -> Result<Self> {
        let mut c = Self::new();
        let mode = p.str_or("mode", c.mode.mode())?;
        c.mode = [Distance::L2, Distance::L1, Distance::SmoothL1]
            .into_iter()
            .find(|d| d.mode() == mode)
            .ok_or_else(|| {
                config_error(p, format!("mode must be l2, l1 or smooth_l1, got {mode:?}"))
            })?;
        // PaddleClas's wrapper takes a `name`, but its terms are named by the mode here.
        accept_unused(p, "name");
        Ok(c)
    }

    /// PaddleClas's Distance wrapper names terms by pair index only.
    fn term_names(&self, binding: &Binding) -> Vec<String> {
        let m = self.mode.mode();
        (0..binding.pairs().len())
            .map(|i| format!("loss_{m}_loss_{m}_{i}"))
            .collect()
    }

    fn forward<B: Backend>(&self, input: &TermInput<B>) -> Result<Vec<Tensor<B, 1>>> {
        input.map_pairs(|pair| {
            Ok(match input.key {
                None | Some("logits") => distance(
                    pair.out_a.logits.clone(),
                    pair.out_b.logits.clone(),
                    self.mode,
                ),
                Some(k) => {
                    let (a, b) = pair.features(k, k)?;
                    distance(a.clone(), b.clone(), self.mode)
                }
            })
        })
    }
}

/// The [`Distance`] `mode` between two tensors of one shape, averaged over all elements.
pub fn distance<B: Backend, const D: usize>(
    a: Tensor<B, D>,
    b: Tensor<B, D>,
    mode: Distance,
) -> Tensor<B, 1> {
    let d = a.sub(b);
    match mode {
        Distance::L2 => d.square().mean(),
        Distance::L1 => d.abs().mean(),
        Distance::SmoothL1 => {
            let abs = d.clone().abs();
            let small = abs.clone().lower_elem(1.0);
            let quadratic = d.square().mul_scalar(0.5);
            let linear = abs.sub_scalar(0.5);
            linear.mask_where(small, quadratic).mean()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{combined, outputs, run, specs, value};
    use burn::backend::Flex;
    use burn::tensor::Tensor;

    #[test]
    fn distance_reads_feature_maps_by_return_pattern() {
        let l = combined(&specs(
            "[{DistillationDistanceLoss: {mode: l1, key: blocks5, model_name_pairs: [[Student, Teacher]]}}, {CELoss: {}}]",
        ))
        .unwrap();
        assert_eq!(l.term_names(), ["loss_l1_loss_l1_0", "CELoss", "loss"]);
        let (mut o, y) = outputs();
        let d = Default::default();
        for (name, v) in [("Student", 1.0f32), ("Teacher", 3.5)] {
            let m = o.get_mut(name).unwrap();
            m.features = vec![Tensor::<Flex, 4>::full([2, 2, 2, 2], v, &d)];
            m.feature_names = vec!["blocks5".into()];
        }
        let v = run(&l, &o, &y, 1).unwrap();
        assert!((value(&v.terms[0].1) - 2.5).abs() < 1e-6);
        o.get_mut("Teacher").unwrap().feature_names = vec!["blocks4".into()];
        let e = run(&l, &o, &y, 1).err().unwrap();
        assert!(e.to_string().contains("blocks5"), "{e}");
    }
}
