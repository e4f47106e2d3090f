//! Masked generative distillation (`DistillationPairLoss` with `base_loss_name: MGDLoss`).

use super::binding::{check_channels, check_spatial};
use super::common::{config_error, Conv};
use super::pair::PairMaps;
use super::registry::{LossPart, TermInput};
use super::LossContext;
use crate::config::Node;
use anyhow::{bail, Result};
use burn::config::Config;
use burn::module::Module;
use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

/// MGD (Yang et al. 2022) of a student map `[N, C_s, H, W]` and a teacher map `[N, C_t, H, W]`:
/// `alpha_mgd · mean (G(align(f_s) · M) − f_t)²` with a random channel mask `M` that drops a
/// fraction `lambda_mgd` of the channels, a 1×1 align conv when `C_s ≠ C_t`, and a
/// conv3×3-ReLU-conv3×3 generator `G` (the layers of [`Mgd`]).
#[derive(Config, Debug, PartialEq)]
pub struct MgdLossConfig {
    /// `C_s`.
    pub student_channels: usize,
    /// `C_t`.
    pub teacher_channels: usize,
    /// Scale of the loss (1.756 = 7e-5 · 512·7·7, the original's sum-reduction weight).
    #[config(default = 1.756)]
    pub alpha_mgd: f64,
    /// Fraction of masked channels, in [0, 1].
    #[config(default = 0.15)]
    pub lambda_mgd: f64,
}

impl MgdLossConfig {
    /// The keys of MGD in a `DistillationPairLoss` entry `p`.
    pub fn from_config(p: &Node) -> Result<Self> {
        let mut c = Self::new(
            p.require("student_channels")?.as_usize()?,
            p.require("teacher_channels")?.as_usize()?,
        );
        c.alpha_mgd = p.f64_or("alpha_mgd", c.alpha_mgd)?;
        c.lambda_mgd = p.f64_or("lambda_mgd", c.lambda_mgd)?;
        if !(0.0..=1.0).contains(&c.lambda_mgd) {
            return Err(config_error(
                p,
                format!("lambda_mgd must be in [0, 1], got {}", c.lambda_mgd),
            ));
        }
        Ok(c)
    }

    /// Fresh layers.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Mgd<B> {
        Mgd::new(self.student_channels, self.teacher_channels, device)
    }

    /// The loss of one pair's maps.
    pub fn forward_maps<B: Backend>(
        &self,
        input: &TermInput<B>,
        maps: &PairMaps<B>,
    ) -> Result<Tensor<B, 1>> {
        let (fs, ft) = (maps.student, maps.teacher);
        let name = input.config_name;
        check_channels(
            name,
            "student_channels",
            fs,
            self.student_channels,
            maps.a,
            maps.s_key,
        )?;
        check_channels(
            name,
            "teacher_channels",
            ft,
            self.teacher_channels,
            maps.b,
            maps.t_key,
        )?;
        let [n, c, _, _] = ft.dims();
        let mask = mgd_mask(n, c, self.lambda_mgd, input.ctx, input.index, &ft.device());
        let Some(LossPart::Mgd(mgd)) = input.part else {
            bail!("MGDLoss: its trainable part is missing");
        };
        check_spatial(fs, ft, name)?;
        Ok(mgd.forward(fs.clone(), ft.clone(), mask, self.alpha_mgd))
    }
}

/// MGD's channel mask `[N, C, 1, 1]`: 0 with probability `lambda`, drawn from (seed, step, term).
pub(crate) fn mgd_mask<B: Backend>(
    n: usize,
    c: usize,
    lambda: f64,
    ctx: &LossContext<B>,
    term: usize,
    device: &B::Device,
) -> Tensor<B, 4> {
    use rand::{Rng, SeedableRng};
    let seed = ctx
        .seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(ctx.step.wrapping_mul(0x2545_F491_4F6C_DD1D))
        .wrapping_add(term as u64);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let values: Vec<f32> = (0..n * c)
        .map(|_| {
            if rng.random::<f64>() < lambda {
                0.0
            } else {
                1.0
            }
        })
        .collect();
    Tensor::from_data(TensorData::new(values, [n, c, 1, 1]), device)
}

/// Masked generative distillation (Yang et al. 2022) for classification, as PaddleClas's
/// `MGDLoss`: optional 1×1 align conv, a random channel mask, a conv-ReLU-conv generator.
#[derive(Module, Debug)]
pub struct Mgd<B: Backend> {
    pub align: Option<Conv<B>>,
    pub generator0: Conv<B>,
    pub generator1: Conv<B>,
}

impl<B: Backend> Mgd<B> {
    pub fn new(student_channels: usize, teacher_channels: usize, device: &B::Device) -> Self {
        Mgd {
            align: (student_channels != teacher_channels)
                .then(|| Conv::kaiming(student_channels, teacher_channels, 1, device)),
            generator0: Conv::kaiming(teacher_channels, teacher_channels, 3, device),
            generator1: Conv::kaiming(teacher_channels, teacher_channels, 3, device),
        }
    }

    /// `alpha · mean (G(align(f_s) · M) − f_t)²`; `mask` is `[N, C_t, 1, 1]` of 0/1.
    pub fn forward(
        &self,
        student: Tensor<B, 4>,
        teacher: Tensor<B, 4>,
        mask: Tensor<B, 4>,
        alpha: f64,
    ) -> Tensor<B, 1> {
        let s = match &self.align {
            Some(a) => a.forward(student),
            None => student,
        };
        let [n, c, h, w] = s.dims();
        // The mask repeated to full size: flex's broadcasting over [N, C, 1, 1] is a slow strided walk.
        let mask = mask
            .reshape([n, c, 1])
            .repeat_dim(2, h * w)
            .reshape([n, c, h, w]);
        let generated = self
            .generator1
            .forward(relu(self.generator0.forward(s.mul(mask))));
        generated.sub(teacher).square().mean().mul_scalar(alpha)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{context, outputs};
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn mgd_masks_repeat_per_step_and_drop_lambda_of_channels() {
        let (o, y) = outputs();
        let mask = |step| -> Vec<f32> {
            mgd_mask::<Flex>(
                64,
                64,
                0.15,
                &context(&o, &y, 1, step),
                1,
                &Default::default(),
            )
            .into_data()
            .to_vec()
            .unwrap()
        };
        assert_eq!(mask(7), mask(7));
        assert_ne!(mask(7), mask(8));
        let dropped = mask(7).iter().filter(|&&v| v == 0.0).count() as f64 / 4096.0;
        assert!((dropped - 0.15).abs() < 0.03, "dropped {dropped}");
    }
}
