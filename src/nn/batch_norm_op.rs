//! Training-mode BatchNorm as one op with its own backward, on the CPU backend.
//!
//! Written with burn's tensor ops, a training BatchNorm is ~6 passes over the activation
//! forward (mean, centre, square, mean, scale, shift) and about twice that backward through the
//! graph of those ops, each allocating a full-size tensor. As one op it is 3 passes forward
//! (mean, variance, `y = x·scale + shift`) and 2 backward (per-channel sums of `dy` and
//! `dy·x̂`, then `dx`), all parallel.
//!
//! Formula, per channel `c` over the `M = N·H·W` values of `x[N, C, H, W]`:
//! `μ = Σx/M`, `σ² = Σ(x−μ)²/M` (biased), `x̂ = (x−μ)/√(σ²+ε)`, `y = γ·x̂ + β`;
//! backward `dβ = Σdy`, `dγ = Σdy·x̂`, `dx = γ/√(σ²+ε) · (dy − dβ/M − x̂·dγ/M)`.
//! Sums are taken in f64, channel by channel in a fixed order (results do not depend on the
//! thread count).
//!
//! Backends without their own version (CUDA, wgpu) answer `None` and the caller keeps the
//! composed ops.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::backend::Flex;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, TensorData};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::activation::Act;

/// `(y, mean[C], biased variance[C])` of a training-mode BatchNorm.
pub type BatchNormOutput<B> = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

/// `(dx, dγ, dβ)`.
pub type BatchNormGrads<B> = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

/// A backend that may have a fused training-mode BatchNorm (see the module docs); `Autodiff<B>`
/// records it as one graph node whose backward is `B`'s.
pub trait BatchNormBackend: Backend {
    /// `x[N, C, H, W]`, `gamma[C]`, `beta[C]` → `(y, μ, σ²)`, or `None` where the backend has
    /// no fused version (the caller then composes burn's ops).
    fn batch_norm_train(
        _x: FloatTensor<Self>,
        _gamma: FloatTensor<Self>,
        _beta: FloatTensor<Self>,
        _epsilon: f64,
    ) -> Option<BatchNormOutput<Self>> {
        None
    }

    /// Evaluation-mode BatchNorm and the activation after it in one pass, without gradients:
    /// `act(x·scale[c] + shift[c])` over `x[N, C, H, W]`, or `None` where the backend has no
    /// such op (or, under autodiff, where it would have to be differentiated).
    fn scale_shift_act(
        _x: FloatTensor<Self>,
        _scale: FloatTensor<Self>,
        _shift: FloatTensor<Self>,
        _act: Act,
    ) -> Option<FloatTensor<Self>> {
        None
    }

    /// The gradients of [`BatchNormBackend::batch_norm_train`] given `dy` and the `(μ, σ²)` it
    /// returned. Only called where `batch_norm_train` answered `Some`.
    fn batch_norm_train_backward(
        _x: FloatTensor<Self>,
        _gamma: FloatTensor<Self>,
        _stats: (FloatTensor<Self>, FloatTensor<Self>),
        _epsilon: f64,
        _dy: FloatTensor<Self>,
    ) -> BatchNormGrads<Self> {
        unreachable!("batch_norm_train_backward without a fused batch_norm_train")
    }
}

fn f32_tensor(t: &FlexTensor) -> Option<FlexTensor> {
    (t.dtype() == DType::F32).then(|| t.to_contiguous())
}

fn floats(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("contiguous f32 tensor")
}

fn tensor(data: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(data, shape))
}

/// `[N, C, H·W]` sizes of a 4-d tensor.
fn ncl(t: &FlexTensor) -> Option<(usize, usize, usize)> {
    let s = t.layout().shape();
    (s.num_dims() == 4).then(|| (s[0], s[1], s[2] * s[3]))
}

/// Calls `f(c, planes)` for each channel with its `N` planes of `len` values.
fn per_channel<R: Send>(
    x: &[f32],
    (n, c, l): (usize, usize, usize),
    f: impl Fn(usize, &mut dyn Iterator<Item = &[f32]>) -> R + Sync,
) -> Vec<R> {
    (0..c)
        .into_par_iter()
        .map(|ci| {
            f(
                ci,
                &mut (0..n).map(|ni| &x[(ni * c + ci) * l..(ni * c + ci + 1) * l]),
            )
        })
        .collect()
}

/// `(y, μ, σ²)`.
fn forward(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
    dims: (usize, usize, usize),
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (n, c, l) = dims;
    let m = (n * l) as f64;
    let mean: Vec<f64> = per_channel(x, dims, |_, planes| {
        planes
            .map(|p| p.iter().map(|&v| v as f64).sum::<f64>())
            .sum::<f64>()
            / m
    });
    let var: Vec<f64> = per_channel(x, dims, |ci, planes| {
        let mu = mean[ci];
        planes
            .map(|p| {
                p.iter()
                    .map(|&v| (v as f64 - mu) * (v as f64 - mu))
                    .sum::<f64>()
            })
            .sum::<f64>()
            / m
    });
    let inv_std: Vec<f64> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    let scale: Vec<f32> = (0..c)
        .map(|ci| (gamma[ci] as f64 * inv_std[ci]) as f32)
        .collect();
    let shift: Vec<f32> = (0..c)
        .map(|ci| (beta[ci] as f64 - mean[ci] * gamma[ci] as f64 * inv_std[ci]) as f32)
        .collect();
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(l)
        .zip(x.par_chunks(l))
        .enumerate()
        .for_each(|(nc, (out, src))| {
            let (s, b) = (scale[nc % c], shift[nc % c]);
            out.iter_mut().zip(src).for_each(|(o, v)| *o = v * s + b);
        });
    let narrow = |v: &[f64]| v.iter().map(|&v| v as f32).collect();
    (y, narrow(&mean), narrow(&var))
}

/// `(dx, dγ, dβ)` from the forward's `μ` and `σ²`.
fn backward(
    x: &[f32],
    gamma: &[f32],
    (mean, var): (&[f32], &[f32]),
    eps: f64,
    dy: &[f32],
    dims: (usize, usize, usize),
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (n, c, l) = dims;
    let m = (n * l) as f64;
    let inv_std: Vec<f32> = var
        .iter()
        .map(|&v| (1.0 / (v as f64 + eps).sqrt()) as f32)
        .collect();
    // Σdy and Σdy·x̂ per channel.
    let sums: Vec<(f64, f64)> = (0..c)
        .into_par_iter()
        .map(|ci| {
            let (mu, is) = (mean[ci], inv_std[ci]);
            let (mut sd, mut sdx) = (0f64, 0f64);
            for ni in 0..n {
                let r = (ni * c + ci) * l..(ni * c + ci + 1) * l;
                let (g, v) = (&dy[r.clone()], &x[r]);
                sd += g.iter().map(|&a| a as f64).sum::<f64>();
                sdx += g
                    .iter()
                    .zip(v)
                    .map(|(&a, &b)| a as f64 * ((b - mu) * is) as f64)
                    .sum::<f64>();
            }
            (sd, sdx)
        })
        .collect();
    let dbeta: Vec<f32> = sums.iter().map(|s| s.0 as f32).collect();
    let dgamma: Vec<f32> = sums.iter().map(|s| s.1 as f32).collect();
    let mut dx = vec![0f32; x.len()];
    dx.par_chunks_mut(l).enumerate().for_each(|(nc, out)| {
        let ci = nc % c;
        let (mu, is) = (mean[ci], inv_std[ci]);
        let k = gamma[ci] * is;
        let (mean_dy, mean_dyx) = ((sums[ci].0 / m) as f32, (sums[ci].1 / m) as f32);
        let r = nc * l..(nc + 1) * l;
        out.iter_mut()
            .zip(&dy[r.clone()])
            .zip(&x[r])
            .for_each(|((o, &g), &v)| *o = k * (g - mean_dy - (v - mu) * is * mean_dyx));
    });
    (dx, dgamma, dbeta)
}

impl BatchNormBackend for Flex {
    fn batch_norm_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> Option<BatchNormOutput<Self>> {
        let (x, g, b) = (f32_tensor(&x)?, f32_tensor(&gamma)?, f32_tensor(&beta)?);
        let dims = ncl(&x)?;
        let (y, mean, var) = forward(floats(&x), floats(&g), floats(&b), epsilon, dims);
        Some((
            tensor(y, x.layout().shape().to_vec()),
            tensor(mean, vec![dims.1]),
            tensor(var, vec![dims.1]),
        ))
    }

    fn scale_shift_act(
        x: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        act: Act,
    ) -> Option<FloatTensor<Self>> {
        let (x, scale, shift) = (f32_tensor(&x)?, f32_tensor(&scale)?, f32_tensor(&shift)?);
        let (_, c, l) = ncl(&x)?;
        let (scale, shift) = (floats(&scale), floats(&shift));
        let mut y = vec![0f32; x.layout().num_elements()];
        y.par_chunks_mut(l)
            .zip(floats(&x).par_chunks(l))
            .enumerate()
            .for_each(|(nc, (out, src))| {
                let (s, b) = (scale[nc % c], shift[nc % c]);
                match act {
                    Act::None => out.iter_mut().zip(src).for_each(|(o, v)| *o = v * s + b),
                    Act::Relu => out
                        .iter_mut()
                        .zip(src)
                        .for_each(|(o, v)| *o = (v * s + b).max(0.0)),
                    // x · clamp(x/6 + 1/2, 0, 1), as burn's hard_swish.
                    Act::Hardswish => out.iter_mut().zip(src).for_each(|(o, v)| {
                        let z = v * s + b;
                        *o = z * (z / 6.0 + 0.5).clamp(0.0, 1.0)
                    }),
                }
            });
        Some(tensor(y, x.layout().shape().to_vec()))
    }

    fn batch_norm_train_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        (mean, var): (FloatTensor<Self>, FloatTensor<Self>),
        epsilon: f64,
        dy: FloatTensor<Self>,
    ) -> BatchNormGrads<Self> {
        let contiguous = |t: &FlexTensor| f32_tensor(t).expect("f32 tensor");
        let (x, g, dy) = (contiguous(&x), contiguous(&gamma), contiguous(&dy));
        let (mean, var) = (contiguous(&mean), contiguous(&var));
        let dims = ncl(&x).expect("4-d input");
        let stats = (floats(&mean), floats(&var));
        let (dx, dgamma, dbeta) =
            backward(floats(&x), floats(&g), stats, epsilon, floats(&dy), dims);
        (
            tensor(dx, x.layout().shape().to_vec()),
            tensor(dgamma, vec![dims.1]),
            tensor(dbeta, vec![dims.1]),
        )
    }
}

/// The autodiff node of a fused BatchNorm: parents `x`, `γ`, `β`.
#[derive(Debug)]
struct BatchNormTrainBackward;

impl<B: BatchNormBackend> Backward<B, 3> for BatchNormTrainBackward {
    /// The checkpointed input and scale, the batch statistics and ε.
    type State = (NodeId, NodeId, FloatTensor<B>, FloatTensor<B>, f64);

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_x, node_gamma, node_beta] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let (x_id, gamma_id, mean, var, epsilon) = ops.state;
        let x = checkpointer.retrieve_node_output::<FloatTensor<B>>(x_id);
        let gamma = checkpointer.retrieve_node_output::<FloatTensor<B>>(gamma_id);
        let (dx, dgamma, dbeta) = B::batch_norm_train_backward(x, gamma, (mean, var), epsilon, dy);
        if let Some(node) = node_x {
            grads.register::<B>(node.id, dx);
        }
        if let Some(node) = node_gamma {
            grads.register::<B>(node.id, dgamma);
        }
        if let Some(node) = node_beta {
            grads.register::<B>(node.id, dbeta);
        }
    }
}

impl<B: BatchNormBackend, C: CheckpointStrategy> BatchNormBackend for Autodiff<B, C> {
    fn batch_norm_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> Option<BatchNormOutput<Self>> {
        let (y, mean, var) = B::batch_norm_train(
            x.primitive.clone(),
            gamma.primitive.clone(),
            beta.primitive,
            epsilon,
        )?;
        let prepared = <BatchNormTrainBackward as Backward<B, 3>>::prepare::<C>(
            BatchNormTrainBackward,
            [x.node.clone(), gamma.node.clone(), beta.node.clone()],
        );
        let y = match prepared.compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let x_state = prep.checkpoint(&x);
                let gamma_state = prep.checkpoint(&gamma);
                let state = (x_state, gamma_state, mean.clone(), var.clone(), epsilon);
                prep.finish(state, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        // The statistics leave the graph: they only update the running averages.
        Some((y, Self::from_inner(mean), Self::from_inner(var)))
    }
}

/// CUDA keeps the composed ops.
#[cfg(feature = "cuda")]
impl BatchNormBackend for burn::backend::Cuda {}

/// So does wgpu.
#[cfg(feature = "wgpu")]
impl BatchNormBackend for burn::backend::Wgpu {}

#[cfg(test)]
mod tests {
    use super::BatchNormBackend;
    use crate::nn::layers::{Act, BatchNorm2d};
    use crate::nn::BnMode;
    use burn::backend::{Autodiff, Flex};
    use burn::module::{Param, RunningState};
    use burn::tensor::{Distribution, Tensor};

    type Ad = Autodiff<Flex>;

    fn values<const D: usize>(t: Tensor<Flex, D>) -> Vec<f32> {
        t.into_data().to_vec().unwrap()
    }

    /// Evaluation-mode BatchNorm + activation in one pass equals the composed ops.
    #[test]
    fn scale_shift_act_equals_eval_batch_norm_then_activation() {
        let device = Default::default();
        let x = Tensor::<Flex, 4>::random([3, 4, 5, 6], Distribution::Normal(0.0, 3.0), &device);
        let mut bn = BatchNorm2d::<Flex>::new(4, &device);
        bn.weight =
            Param::from_tensor(Tensor::random([4], Distribution::Normal(1.0, 0.3), &device));
        bn.bias = Param::from_tensor(Tensor::random([4], Distribution::Normal(0.0, 0.3), &device));
        bn.running_mean =
            RunningState::new(Tensor::random([4], Distribution::Normal(0.5, 1.0), &device));
        bn.running_var = RunningState::new(Tensor::random(
            [4],
            Distribution::Uniform(0.5, 2.0),
            &device,
        ));
        for act in [Act::None, Act::Relu, Act::Hardswish] {
            let want = values(act.apply(bn.forward(x.clone(), BnMode::Eval)));
            let scale = bn
                .weight
                .val()
                .div(bn.running_var.value().add_scalar(bn.epsilon).sqrt());
            let shift = bn
                .bias
                .val()
                .sub(bn.running_mean.value().mul(scale.clone()));
            let prim = |t: Tensor<Flex, 1>| t.into_primitive().tensor();
            let got = Flex::scale_shift_act(
                x.clone().into_primitive().tensor(),
                prim(scale),
                prim(shift),
                act,
            )
            .expect("flex has the op");
            let got = values(Tensor::<Flex, 4>::from_primitive(
                burn::tensor::TensorPrimitive::Float(got),
            ));
            for (p, q) in want.iter().zip(&got) {
                assert!(
                    (p - q).abs() <= 1e-5 * (1.0 + p.abs()),
                    "{act:?}: {p} vs {q}"
                );
            }
        }
    }

    /// The fused op gives what the composed ops give: output, running statistics, and the
    /// gradients of `x`, `γ` and `β`.
    #[test]
    fn fused_equals_composed_batch_norm() {
        let device = Default::default();
        let c3 = |t: Tensor<Ad, 1>| t.into_primitive().tensor();
        let probe = Tensor::<Ad, 4>::zeros([2, 3, 2, 2], &device)
            .into_primitive()
            .tensor();
        let ones = Tensor::<Ad, 1>::ones([3], &device);
        // Otherwise forward_act would fall back to the composed ops and compare them to themselves.
        assert!(Ad::batch_norm_train(probe, c3(ones.clone()), c3(ones), 1e-5).is_some());
        for dims in [[4, 3, 5, 5], [7, 2, 1, 1], [2, 5, 8, 3]] {
            let x0 = Tensor::<Ad, 4>::random(dims, Distribution::Normal(0.5, 2.0), &device);
            let dy = Tensor::<Ad, 4>::random(dims, Distribution::Normal(0.0, 1.0), &device);
            let gamma = Tensor::<Ad, 1>::random([dims[1]], Distribution::Normal(1.0, 0.3), &device);
            let beta = Tensor::<Ad, 1>::random([dims[1]], Distribution::Normal(0.0, 0.3), &device);
            let run = |fused: bool| {
                let mut bn = BatchNorm2d::<Ad>::new(dims[1], &device);
                bn.weight = Param::from_tensor(gamma.clone().detach().require_grad());
                bn.bias = Param::from_tensor(beta.clone().detach().require_grad());
                let x = x0.clone().detach().require_grad();
                let y = if fused {
                    bn.forward_act(x.clone(), BnMode::Train, Act::None)
                } else {
                    bn.forward(x.clone(), BnMode::Train)
                };
                let g = y.clone().mul(dy.clone().detach()).sum().backward();
                vec![
                    values(y.inner()),
                    values(x.grad(&g).unwrap()),
                    values(bn.weight.val().grad(&g).unwrap()),
                    values(bn.bias.val().grad(&g).unwrap()),
                    values(bn.running_mean.value().inner()),
                    values(bn.running_var.value().inner()),
                ]
            };
            let (a, b) = (run(false), run(true));
            for (name, u, v) in ["y", "dx", "dγ", "dβ", "running mean", "running var"]
                .iter()
                .zip(&a)
                .zip(&b)
                .map(|((n, u), v)| (n, u, v))
            {
                let scale = u.iter().fold(1e-3f32, |m, x| m.max(x.abs()));
                for (p, q) in u.iter().zip(v) {
                    assert!((p - q).abs() <= 1e-5 * scale, "{dims:?} {name}: {p} vs {q}");
                }
            }
        }
    }
}
