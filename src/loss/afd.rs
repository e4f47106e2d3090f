//! Attention-based feature distillation (`AFDLoss`), with the LinearTransformTeacher/Student
//! layers PaddleClas keeps in its `AttentionModel`.

use super::binding::{check_channels, feature, output, Binding};
use super::common::{config_error, normal};
use super::registry::{DistillLoss, LossPart, TermInput};
use crate::arch::ArchConfig;
use crate::config::Node;
use crate::nn::layers::{BatchNorm2d, BnMode};
use anyhow::{anyhow, bail, Result};
use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::activation::{relu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::module::adaptive_avg_pool2d;
use burn::tensor::{Distribution, Tensor};

/// AFD (Ji et al. 2021) between all tapped maps of a student and a teacher (`[N, C, H, W]`
/// each): every teacher map attends over the student maps, see [`Afd::forward`]; one term
/// `<name>`. The maps are those the Arch's LinearTransformStudent/Teacher read.
#[derive(Config, Debug, PartialEq)]
pub struct AfdLossConfig {
    /// `model_name_pair`: `[student, teacher]`.
    #[config(default = "vec![String::from(\"Student\"), String::from(\"Teacher\")]")]
    pub model_name_pair: Vec<String>,
    /// The student maps: the `keys` of the student's LinearTransformStudent.
    #[config(default = "Vec::new()")]
    pub student_maps: Vec<String>,
    /// The teacher maps: the `keys` of the teacher's LinearTransformTeacher.
    #[config(default = "Vec::new()")]
    pub teacher_maps: Vec<String>,
    /// The channels of `s_shapes`, one per student map.
    #[config(default = "Vec::new()")]
    pub student_channels: Vec<usize>,
    /// The channels of `t_shapes`, one per teacher map.
    #[config(default = "Vec::new()")]
    pub teacher_channels: Vec<usize>,
    /// Query/key size; defaults to the transforms' (theirs default to 128).
    #[config(default = 128)]
    pub qk_dim: usize,
    /// The term name.
    #[config(default = "String::from(\"loss_afd\")")]
    pub name: String,
}

/// `[[C, H, W], ...]` shapes; only the channels are used (spatial sizes come from the maps).
fn channels(p: &Node, key: &str) -> Result<Vec<usize>> {
    p.require(key)?
        .items()?
        .iter()
        .map(|s| {
            let dims = s.items()?;
            match dims.first() {
                Some(c) if !dims.is_empty() => Ok(c.as_usize()?),
                _ => bail!("{}", s.error("expected [channels, height, width]")),
            }
        })
        .collect()
}

impl DistillLoss for AfdLossConfig {
    const READS_FEATURE_MAPS: bool = true;
    const HAS_PART: bool = true;

    fn from_config(p: &Node, arch: &ArchConfig) -> Result<Self> {
        let e = |m: String| config_error(p, m);
        let mut c = Self::new();
        if let Some(pair) = p.str_list("model_name_pair")? {
            c.model_name_pair = pair;
        }
        let [s, t] = c.model_name_pair.as_slice() else {
            return Err(e("model_name_pair must be [student, teacher]".into()));
        };
        // PaddleClas's keys into the LinearTransform outputs; kd-launch has only these.
        for (keys, want) in [
            ("student_keys", ["bilinear_key", "value"]),
            ("teacher_keys", ["query", "value"]),
        ] {
            if let Some(k) = p.str_list(keys)? {
                if k != want {
                    return Err(e(format!(
                        "{keys} must be {want:?} (the LinearTransform outputs), got {k:?}"
                    )));
                }
            }
        }
        let transform = |model: &str, kind: &str| {
            arch.attention
                .iter()
                .find(|a| a.model == model && a.name == kind)
                .ok_or_else(|| {
                    e(format!(
                        "AFDLoss needs Arch model {model} to be an AttentionModel with a {kind}"
                    ))
                })
        };
        let (ts, tt) = (
            transform(s, "LinearTransformStudent")?,
            transform(t, "LinearTransformTeacher")?,
        );
        let (student_channels, teacher_channels) =
            (channels(p, "s_shapes")?, channels(p, "t_shapes")?);
        if student_channels.len() != ts.keys.len() || teacher_channels.len() != tt.keys.len() {
            return Err(e(format!(
                "s_shapes/t_shapes list {} and {} maps, the transforms read {} and {}",
                student_channels.len(),
                teacher_channels.len(),
                ts.keys.len(),
                tt.keys.len()
            )));
        }
        // The transforms' own shape lists (PaddleClas sizes their layers from them) must agree.
        for (transform, key, ours) in [
            (ts, "s_shapes", &student_channels),
            (tt, "t_shapes", &teacher_channels),
            (ts, "t_shapes", &teacher_channels),
        ] {
            if transform.params.get(key).is_some() && channels(&transform.params, key)? != *ours {
                return Err(anyhow!(
                    "{}",
                    transform
                        .params
                        .require(key)?
                        .error(format!("channels differ from AFDLoss.{key} ({ours:?})"))
                ));
            }
        }
        let qk_dim = p.usize_or("qk_dim", tt.qk_dim)?;
        if ts.qk_dim != qk_dim || tt.qk_dim != qk_dim {
            return Err(e(format!(
                "qk_dim differs between AFDLoss ({qk_dim}) and the LinearTransforms ({}, {})",
                ts.qk_dim, tt.qk_dim
            )));
        }
        c.student_maps = ts.keys.clone();
        c.teacher_maps = tt.keys.clone();
        c.student_channels = student_channels;
        c.teacher_channels = teacher_channels;
        c.qk_dim = qk_dim;
        c.name = p.str_or("name", &c.name)?;
        Ok(c)
    }

    /// The models come from `model_name_pair`.
    fn binding(&self, _config_name: &str, _p: &Node) -> Result<Binding> {
        let [s, t] = self.model_name_pair.as_slice() else {
            unreachable!("model_name_pair checked when read");
        };
        Ok(Binding::Pairs(vec![(s.clone(), t.clone())]))
    }

    fn term_names(&self, _binding: &Binding) -> Vec<String> {
        vec![self.name.clone()]
    }

    fn forward<B: Backend>(&self, input: &TermInput<B>) -> Result<Vec<Tensor<B, 1>>> {
        let ctx = input.ctx;
        let (s, tch) = &input.binding.pairs()[0];
        let (os, ot) = (output(ctx, s)?, output(ctx, tch)?);
        let fs = self
            .student_maps
            .iter()
            .map(|k| feature(os, s, k).cloned())
            .collect::<Result<Vec<_>>>()?;
        let ft = self
            .teacher_maps
            .iter()
            .map(|k| feature(ot, tch, k).cloned())
            .collect::<Result<Vec<_>>>()?;
        let name = input.config_name;
        for (i, (f, k)) in fs.iter().zip(&self.student_maps).enumerate() {
            let key = format!("s_shapes[{i}]");
            check_channels(name, &key, f, self.student_channels[i], s, k)?;
        }
        for (i, (f, k)) in ft.iter().zip(&self.teacher_maps).enumerate() {
            let key = format!("t_shapes[{i}]");
            check_channels(name, &key, f, self.teacher_channels[i], tch, k)?;
        }
        let Some(LossPart::Afd(afd)) = input.part else {
            bail!("AFDLoss: its trainable part is missing");
        };
        Ok(vec![afd.forward(&fs, &ft, ctx.mode)])
    }

    fn init_part<B: Backend>(&self, device: &B::Device) -> Option<LossPart<B>> {
        Some(LossPart::Afd(Afd::new(
            &self.teacher_channels,
            &self.student_channels,
            self.qk_dim,
            device,
        )))
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

    /// `[N, nin] → [N, nout]`.
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

/// The trainable layers of AFD: the LinearTransformTeacher/Student layers and the attention's
/// positional terms.
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
