//! Trainable layers that belong to a loss rather than to a model: MGD's generator, PEFD's
//! projectors and AFD's attention (with the LinearTransformTeacher/Student layers PaddleClas
//! keeps in its `AttentionModel`). As in PaddleClas (which optimises `[model, loss]`), they are
//! trained with the student and saved in the checkpoint (`loss_parts.mpk`).

use crate::nn::layers::{BatchNorm2d, BnMode};
use burn::module::{Module, Param};
use burn::tensor::activation::{relu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::module::{adaptive_avg_pool2d, conv2d};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Distribution, Tensor};

/// Normal initialisation with standard deviation `std` (drawn from the backend's seeded RNG).
fn normal<B: Backend, const D: usize>(
    shape: [usize; D],
    std: f64,
    device: &B::Device,
) -> Param<Tensor<B, D>> {
    Param::from_tensor(Tensor::random(
        shape,
        Distribution::Normal(0.0, std),
        device,
    ))
}

/// A stride-1 "same" convolution with bias.
#[derive(Module, Debug)]
pub struct Conv<B: Backend> {
    pub weight: Param<Tensor<B, 4>>,
    pub bias: Param<Tensor<B, 1>>,
}

impl<B: Backend> Conv<B> {
    /// He-normal weights over the fan-out (`kaiming_normal_(mode="fan_out", relu)` as MGD), zero bias.
    pub fn kaiming(cin: usize, cout: usize, kernel: usize, device: &B::Device) -> Self {
        let std = (2.0 / (cout * kernel * kernel) as f64).sqrt();
        Conv {
            weight: normal([cout, cin, kernel, kernel], std, device),
            bias: Param::from_tensor(Tensor::zeros([cout], device)),
        }
    }

    /// Paddle's default `Conv2D` initialisation: normal with std `sqrt(2 / (C_in·k²))`, zero bias.
    pub fn paddle_default(cin: usize, cout: usize, kernel: usize, device: &B::Device) -> Self {
        let std = (2.0 / (cin * kernel * kernel) as f64).sqrt();
        Conv {
            weight: normal([cout, cin, kernel, kernel], std, device),
            bias: Param::from_tensor(Tensor::zeros([cout], device)),
        }
    }

    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let pad = self.weight.dims()[2] / 2;
        conv2d(
            x,
            self.weight.val(),
            Some(self.bias.val()),
            ConvOptions::new([1, 1], [pad, pad], [1, 1], 1),
        )
    }
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

/// Linear → BatchNorm1D (→ ReLU): PaddleClas's `LinearBNReLU`.
#[derive(Module, Debug)]
pub struct LinearBn<B: Backend> {
    pub weight: Param<Tensor<B, 2>>,
    pub bias: Param<Tensor<B, 1>>,
    pub bn: BatchNorm2d<B>,
}

impl<B: Backend> LinearBn<B> {
    /// Xavier-uniform weights, zero bias (Paddle's `nn.Linear` defaults).
    pub fn new(nin: usize, nout: usize, device: &B::Device) -> Self {
        let limit = (6.0 / (nin + nout) as f64).sqrt();
        LinearBn {
            weight: Param::from_tensor(Tensor::random(
                [nin, nout],
                Distribution::Uniform(-limit, limit),
                device,
            )),
            bias: Param::from_tensor(Tensor::zeros([nout], device)),
            bn: BatchNorm2d::new(nout, device),
        }
    }

    pub fn forward(&self, x: Tensor<B, 2>, mode: BnMode, with_relu: bool) -> Tensor<B, 2> {
        let [n, _] = x.dims();
        let nout = self.bias.dims()[0];
        let y = x
            .matmul(self.weight.val())
            .add(self.bias.val().reshape([1, nout]));
        let y = self
            .bn
            .forward(y.reshape([n, nout, 1, 1]), mode)
            .reshape([n, nout]);
        if with_relu {
            relu(y)
        } else {
            y
        }
    }
}

/// Attention-based feature distillation (Ji et al. 2021, `AFDLoss` with PaddleClas's
/// LinearTransformTeacher/Student): every teacher map attends over all student maps.
#[derive(Module, Debug)]
pub struct Afd<B: Backend> {
    /// One query layer per teacher map (`C_t → qk`, no ReLU).
    pub query: Vec<LinearBn<B>>,
    /// One key layer per student map (`C_s → qk`, ReLU).
    pub key: Vec<LinearBn<B>>,
    /// `qk → qk · T` (no ReLU): a key per (student map, teacher map).
    pub bilinear: LinearBn<B>,
    /// Positional terms `p_t p_sᵀ` added to the attention logits.
    pub p_t: Param<Tensor<B, 2>>,
    pub p_s: Param<Tensor<B, 2>>,
    pub qk_dim: usize,
}

/// `x / max(‖x‖₂, 1e-12)` along `dim` (Paddle's `F.normalize`), finite gradient at zero.
fn normalize<B: Backend, const D: usize>(x: Tensor<B, D>, dim: usize) -> Tensor<B, D> {
    let norm = x.clone().square().sum_dim(dim).clamp_min(1e-24).sqrt();
    x.div(norm)
}

/// `mean_c f²` of a `[N, C, H, W]` map, as `[N, 1, H, W]`.
fn energy<B: Backend>(f: &Tensor<B, 4>) -> Tensor<B, 4> {
    f.clone().square().mean_dim(1)
}

impl<B: Backend> Afd<B> {
    pub fn new(
        teacher_channels: &[usize],
        student_channels: &[usize],
        qk_dim: usize,
        device: &B::Device,
    ) -> Self {
        let (t, s) = (teacher_channels.len(), student_channels.len());
        let xavier = |rows: usize| (2.0 / (rows + qk_dim) as f64).sqrt();
        Afd {
            query: teacher_channels
                .iter()
                .map(|&c| LinearBn::new(c, qk_dim, device))
                .collect(),
            key: student_channels
                .iter()
                .map(|&c| LinearBn::new(c, qk_dim, device))
                .collect(),
            bilinear: LinearBn::new(qk_dim, qk_dim * t, device),
            p_t: normal([t, qk_dim], xavier(t), device),
            p_s: normal([s, qk_dim], xavier(s), device),
            qk_dim,
        }
    }

    /// The AFD loss `Σ_t mean_b Σ_s att[b,t,s] · mean_hw (v̂_s − v_t)²` for teacher maps `ft`
    /// and student maps `fs` (each `[N, C, H, W]`).
    pub fn forward(&self, fs: &[Tensor<B, 4>], ft: &[Tensor<B, 4>], mode: BnMode) -> Tensor<B, 1> {
        let (t, s, qk) = (ft.len(), fs.len(), self.qk_dim);
        let n = ft[0].dims()[0];
        let gap = |f: &Tensor<B, 4>| {
            let [n, c, _, _] = f.dims();
            f.clone().mean_dim(3).mean_dim(2).reshape([n, c])
        };
        // Teacher side: queries [N, T, qk] and per-map spatial energies [N, HW].
        let query = Tensor::stack::<3>(
            ft.iter()
                .zip(&self.query)
                .map(|(f, l)| l.forward(gap(f), mode, false))
                .collect(),
            1,
        );
        let value_t: Vec<Tensor<B, 2>> = ft
            .iter()
            .map(|f| {
                let [n, _, h, w] = f.dims();
                normalize(energy(f).reshape([n, h * w]), 1)
            })
            .collect();
        // Student side: keys [N·S, qk] → bilinear keys [N, S, T, qk].
        let key = Tensor::stack::<3>(
            fs.iter()
                .zip(&self.key)
                .map(|(f, l)| l.forward(gap(f), mode, true))
                .collect(),
            1,
        )
        .reshape([n * s, qk]);
        let bilinear = self
            .bilinear
            .forward(key, mode, false)
            .reshape([n, s, t, qk]);
        // Student energies pooled to each distinct teacher map shape: [N, S, H_u·W_u].
        let mut shapes: Vec<[usize; 3]> = vec![];
        let mut shape_of = vec![];
        for f in ft {
            let [_, c, h, w] = f.dims();
            let i = shapes
                .iter()
                .position(|u| *u == [c, h, w])
                .unwrap_or_else(|| {
                    shapes.push([c, h, w]);
                    shapes.len() - 1
                });
            shape_of.push(i);
        }
        let value_s: Vec<Tensor<B, 3>> = shapes
            .iter()
            .map(|&[_, h, w]| {
                let pooled = fs
                    .iter()
                    .map(|f| adaptive_avg_pool2d(energy(f), [h, w]).reshape([n, h * w]))
                    .collect();
                normalize(Tensor::stack::<3>(pooled, 1), 2)
            })
            .collect();
        // Attention of each teacher map over the student maps: [N, T, S].
        let content = bilinear
            .swap_dims(1, 2)
            .matmul(query.reshape([n, t, qk, 1]))
            .reshape([n, t, s]);
        let position = self
            .p_t
            .val()
            .matmul(self.p_s.val().transpose())
            .reshape([1, t, s])
            .repeat_dim(0, n);
        let att = softmax(content.add(position).div_scalar((qk as f64).sqrt()), 2);
        let mut total: Option<Tensor<B, 1>> = None;
        for (i, vt) in value_t.into_iter().enumerate() {
            let vs = value_s[shape_of[i]].clone();
            let [_, _, hw] = vs.dims();
            let diff = vs
                .sub(vt.reshape([n, 1, hw]).repeat_dim(1, s))
                .square()
                .mean_dim(2)
                .reshape([n, s]);
            let a = att.clone().slice([0..n, i..i + 1, 0..s]).reshape([n, s]);
            let term = diff.mul(a).sum_dim(1).mean();
            total = Some(match total {
                Some(acc) => acc.add(term),
                None => term,
            });
        }
        total.expect("at least one teacher map")
    }
}

/// The trainable part of one loss entry.
#[derive(Module, Debug)]
pub enum LossPart<B: Backend> {
    Mgd(Mgd<B>),
    Pefd(Pefd<B>),
    Afd(Afd<B>),
}
