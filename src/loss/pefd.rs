//! Projector ensemble feature distillation (`DistillationPairLoss` with
//! `base_loss_name: PEFDLoss`).

use super::binding::{check_channels, check_spatial};
use super::common::{config_error, Conv};
use super::pair::PairMaps;
use super::registry::{LossPart, TermInput};
use crate::config::Node;
use anyhow::{bail, Result};
use burn::config::Config;
use burn::module::Module;
use burn::tensor::activation::relu;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// PEFD (Chen et al. 2022) of a student map `[N, C_s, H, W]` and a teacher map
/// `[N, C_t, H, W]`: `mean_n (1 − cos(P(f_s), f_t))` over the flattened maps, where `P` is the
/// mean of `num_projectors` 1×1 conv + ReLU projections `C_s → C_t` (the layers of [`Pefd`]).
#[derive(Config, Debug, PartialEq)]
pub struct PefdLossConfig {
    /// `C_s`.
    pub student_channel: usize,
    /// `C_t`.
    pub teacher_channel: usize,
    /// Number of projectors (≥ 1).
    #[config(default = 3)]
    pub num_projectors: usize,
}

impl PefdLossConfig {
    /// The keys of PEFD in a `DistillationPairLoss` entry `p`.
    pub fn from_config(p: &Node) -> Result<Self> {
        let mut c = Self::new(
            p.require("student_channel")?.as_usize()?,
            p.require("teacher_channel")?.as_usize()?,
        );
        c.num_projectors = p.usize_or("num_projectors", c.num_projectors)?;
        if c.num_projectors == 0 {
            return Err(config_error(p, "num_projectors must be at least 1".into()));
        }
        Ok(c)
    }

    /// Fresh layers.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Pefd<B> {
        Pefd::new(
            self.student_channel,
            self.teacher_channel,
            self.num_projectors,
            device,
        )
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
            "student_channel",
            fs,
            self.student_channel,
            maps.a,
            maps.s_key,
        )?;
        check_channels(
            name,
            "teacher_channel",
            ft,
            self.teacher_channel,
            maps.b,
            maps.t_key,
        )?;
        let Some(LossPart::Pefd(pefd)) = input.part else {
            bail!("PEFDLoss: its trainable part is missing");
        };
        check_spatial(fs, ft, name)?;
        Ok(pefd.forward(fs.clone(), ft.clone()))
    }
}

/// Projector ensemble feature distillation (Chen et al. 2022, `PEFDLoss`): the mean of
/// `projectors` 1×1 conv + ReLU projections of the student's features, compared with the
/// teacher's by `mean_n (1 − cos)` over the flattened maps.
#[derive(Module, Debug)]
pub struct Pefd<B: Backend> {
    pub projectors: Vec<Conv<B>>,
}

impl<B: Backend> Pefd<B> {
    pub fn new(
        student_channel: usize,
        teacher_channel: usize,
        projectors: usize,
        device: &B::Device,
    ) -> Self {
        Pefd {
            projectors: (0..projectors)
                .map(|_| Conv::paddle_default(student_channel, teacher_channel, 1, device))
                .collect(),
        }
    }

    pub fn forward(&self, student: Tensor<B, 4>, teacher: Tensor<B, 4>) -> Tensor<B, 1> {
        let q = self.projectors.len() as f64;
        let projected = self
            .projectors
            .iter()
            .map(|p| relu(p.forward(student.clone())))
            .reduce(|a, b| a.add(b))
            .expect("at least one projector")
            .div_scalar(q);
        let flat = |t: Tensor<B, 4>| {
            let [n, c, h, w] = t.dims();
            t.reshape([n, c * h * w])
        };
        let (fs, ft) = (flat(projected), flat(teacher));
        let unit = |t: Tensor<B, 2>| t.clone().div(t.square().sum_dim(1).sqrt());
        unit(fs)
            .mul(unit(ft))
            .sum_dim(1)
            .neg()
            .add_scalar(1.0)
            .mean()
    }
}
