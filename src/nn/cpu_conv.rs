//! Dense convolution as a backend-extension op ([`ConvBackend`], burn's pattern for custom
//! operations), and its CPU implementation for training on `Autodiff<Flex>`: im2col + one batched
//! GEMM forward, and a custom backward (weight gradient = GEMM against the im2col matrix, input
//! gradient = GEMM then col2im). burn 0.21's generic convolution backward transposes activations
//! with strided copies and runs a direct transposed convolution; profiles of ResNet training
//! showed those, not the GEMMs, taking most of the step. Backends without their own version
//! (CUDA, wgpu) keep burn's convolution through the trait's default methods.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::ops::{ConvOptions, FloatTensor};
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use rayon::prelude::*;

/// The one convolution shape kd-launch runs through [`ConvBackend`]: square kernel, the same
/// stride on both axes, symmetric zero padding, no bias, no dilation, one group (the dense
/// convolutions of PaddleClas's `ConvBNLayer`). The kernel size comes from the weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DenseConv {
    pub stride: usize,
    pub pad: usize,
}

impl DenseConv {
    /// The same convolution in burn's terms.
    pub fn options(self) -> ConvOptions<2> {
        ConvOptions::new([self.stride, self.stride], [self.pad, self.pad], [1, 1], 1)
    }
}

/// Gradients of a [`DenseConv`] with respect to its input and its weight; `None` where the
/// backward pass did not ask for one (a frozen weight, an input that needs no gradient).
pub struct DenseConvGrads<B: Backend> {
    pub x: Option<FloatTensor<B>>,
    pub weight: Option<FloatTensor<B>>,
}

/// A backend with kd-launch's dense convolution op. The default methods are burn's own
/// convolution and its gradients, so a backend with nothing better (CUDA) implements the trait
/// with an empty block; `Flex` overrides both with the im2col + GEMM version, and
/// `Autodiff<B>` records the op in the graph with a backward that calls `B`'s.
pub trait ConvBackend: Backend {
    /// `x[N, Cin, H, W]` convolved with `weight[Cout, Cin, k, k]`: `[N, Cout, Ho, Wo]`.
    fn dense_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        conv: DenseConv,
    ) -> FloatTensor<Self> {
        burn_dense_conv2d::<Self>(x, weight, conv)
    }

    /// The gradients of [`ConvBackend::dense_conv2d`] given the gradient of its output,
    /// computing only the ones asked for.
    fn dense_conv2d_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        conv: DenseConv,
        want_x: bool,
        want_weight: bool,
    ) -> DenseConvGrads<Self> {
        burn_dense_conv2d_backward::<Self>(x, weight, grad, conv, want_x, want_weight)
    }
}

/// burn's convolution: the default [`ConvBackend::dense_conv2d`].
pub fn burn_dense_conv2d<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    conv: DenseConv,
) -> FloatTensor<B> {
    B::conv2d(x, weight, None, conv.options())
}

/// burn's convolution gradients, the ones burn's autodiff takes for its own convolution: the
/// default [`ConvBackend::dense_conv2d_backward`].
pub fn burn_dense_conv2d_backward<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    grad: FloatTensor<B>,
    conv: DenseConv,
    want_x: bool,
    want_weight: bool,
) -> DenseConvGrads<B> {
    let options = conv.options();
    DenseConvGrads {
        x: want_x.then(|| {
            B::conv2d_x_backward(x.clone(), weight.clone(), grad.clone(), options.clone())
        }),
        weight: want_weight.then(|| B::conv2d_weight_backward(x, weight, grad, options)),
    }
}

/// A training backend whose inner backend has the op too: students train on `Self`, frozen
/// teachers and evaluation run on `Self::InnerBackend`.
pub trait ConvAutodiffBackend: ConvBackend + AutodiffBackend<InnerBackend: ConvBackend> {}

impl<B> ConvAutodiffBackend for B where B: ConvBackend + AutodiffBackend<InnerBackend: ConvBackend> {}

/// [`ConvBackend::dense_conv2d`] on tensors.
pub fn dense_conv2d<B: ConvBackend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    conv: DenseConv,
) -> Tensor<B, 4> {
    Tensor::from_primitive(TensorPrimitive::Float(B::dense_conv2d(
        x.into_primitive().tensor(),
        weight.into_primitive().tensor(),
        conv,
    )))
}

/// Geometry of a square-kernel convolution with symmetric padding.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    n: usize,
    cin: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    pad: usize,
    ho: usize,
    wo: usize,
}

impl Geometry {
    fn new([n, cin, h, w]: [usize; 4], k: usize, stride: usize, pad: usize) -> Self {
        let ho = (h + 2 * pad - k) / stride + 1;
        let wo = (w + 2 * pad - k) / stride + 1;
        Geometry {
            n,
            cin,
            h,
            w,
            k,
            stride,
            pad,
            ho,
            wo,
        }
    }
    /// Rows of the im2col matrix (`Cin·k²`) and its columns (`Ho·Wo`).
    fn kl(&self) -> (usize, usize) {
        (self.cin * self.k * self.k, self.ho * self.wo)
    }
    /// A plain 1×1 stride-1 convolution needs no im2col: the input already is the matrix.
    fn is_pointwise(&self) -> bool {
        self.k == 1 && self.stride == 1 && self.pad == 0
    }
}

/// Output columns `ox` whose input column `ox·stride + j − pad` lies inside `[0, w)`.
fn valid_range(j: usize, g: &Geometry) -> std::ops::Range<usize> {
    let lo = g.pad.saturating_sub(j).div_ceil(g.stride);
    let hi = if g.w + g.pad > j {
        ((g.w + g.pad - j - 1) / g.stride + 1).min(g.wo)
    } else {
        0
    };
    lo..hi.max(lo)
}

/// Calls `f(dst_row_segment, src_row, first_src_col)` for every in-bounds output row of kernel
/// tap `(i, j)`: the gather/scatter pattern shared by im2col and col2im.
fn for_each_tap_row(
    g: &Geometry,
    i: usize,
    j: usize,
    mut f: impl FnMut(std::ops::Range<usize>, usize, usize),
) {
    let ok = valid_range(j, g);
    if ok.is_empty() {
        return;
    }
    let first = ok.start * g.stride + j - g.pad;
    for oy in 0..g.ho {
        let y = (oy * g.stride + i) as isize - g.pad as isize;
        if y >= 0 && y < g.h as isize {
            f(
                oy * g.wo + ok.start..oy * g.wo + ok.end,
                y as usize * g.w,
                first,
            );
        }
    }
}

/// `x[N, Cin, H, W]` → `cols[Cin·k², N·Ho·Wo]`: rows ordered (c, i, j) like the weight's
/// `[Cout, Cin, k, k]`, all samples side by side so a layer is one large GEMM.
fn im2col(x: &[f32], g: Geometry) -> Vec<f32> {
    let (kk, l) = g.kl();
    let plane = g.h * g.w;
    let mut cols = vec![0f32; kk * g.n * l];
    cols.par_chunks_mut(g.n * l)
        .enumerate()
        .for_each(|(r, row)| {
            let (c, i, j) = (r / (g.k * g.k), (r / g.k) % g.k, r % g.k);
            for n in 0..g.n {
                let src = &x[(n * g.cin + c) * plane..(n * g.cin + c + 1) * plane];
                let dst = &mut row[n * l..(n + 1) * l];
                for_each_tap_row(&g, i, j, |out, src_row, first| {
                    let d = &mut dst[out];
                    let s = &src[src_row + first..src_row + g.w];
                    if g.stride == 1 {
                        d.copy_from_slice(&s[..d.len()]);
                    } else {
                        d.iter_mut()
                            .zip(s.iter().step_by(g.stride))
                            .for_each(|(d, s)| *d = *s);
                    }
                });
            }
        });
    cols
}

/// The adjoint of [`im2col`]: scatter-adds `cols[Cin·k², N·Ho·Wo]` back to `[N, Cin, H, W]`.
fn col2im(cols: &[f32], g: Geometry) -> Vec<f32> {
    let (_, l) = g.kl();
    let plane = g.h * g.w;
    let mut x = vec![0f32; g.n * g.cin * plane];
    x.par_chunks_mut(plane).enumerate().for_each(|(nc, dst)| {
        let (n, c) = (nc / g.cin, nc % g.cin);
        for i in 0..g.k {
            for j in 0..g.k {
                let r = (c * g.k + i) * g.k + j;
                let src = &cols[(r * g.n + n) * l..(r * g.n + n + 1) * l];
                for_each_tap_row(&g, i, j, |out, dst_row, first| {
                    let d = &mut dst[dst_row + first..dst_row + g.w];
                    d.iter_mut()
                        .step_by(g.stride)
                        .zip(&src[out])
                        .for_each(|(d, s)| *d += *s);
                });
            }
        }
    });
    x
}

/// `[N, C, L]` → `[C, N·L]`.
fn to_channel_major(t: &[f32], n: usize, c: usize, l: usize) -> Vec<f32> {
    let mut out = vec![0f32; t.len()];
    out.par_chunks_mut(n * l).enumerate().for_each(|(ci, row)| {
        for ni in 0..n {
            row[ni * l..(ni + 1) * l].copy_from_slice(&t[(ni * c + ci) * l..(ni * c + ci + 1) * l]);
        }
    });
    out
}

/// `[C, N·L]` → `[N, C, L]`.
fn to_sample_major(t: &[f32], n: usize, c: usize, l: usize) -> Vec<f32> {
    let mut out = vec![0f32; t.len()];
    out.par_chunks_mut(l).enumerate().for_each(|(nc, dst)| {
        let (ni, ci) = (nc / c, nc % c);
        dst.copy_from_slice(&t[(ci * n + ni) * l..(ci * n + ni + 1) * l]);
    });
    out
}

fn float_tensor<const D: usize>(t: FloatTensor<Flex>) -> Tensor<Flex, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn to_vec<const D: usize>(t: Tensor<Flex, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("f32 tensor")
}

fn matrix(
    data: Vec<f32>,
    rows: usize,
    cols: usize,
    device: &<Flex as burn::tensor::backend::BackendTypes>::Device,
) -> Tensor<Flex, 2> {
    Tensor::from_data(TensorData::new(data, [rows, cols]), device)
}

/// The im2col matrix `[Cin·k², N·Ho·Wo]` of `x`.
fn cols_of(x: Tensor<Flex, 4>, g: Geometry) -> Tensor<Flex, 2> {
    let (kk, l) = g.kl();
    let device = x.device();
    let x = to_vec(x);
    let cols = if g.is_pointwise() {
        to_channel_major(&x, g.n, g.cin, l)
    } else {
        im2col(&x, g)
    };
    matrix(cols, kk, g.n * l, &device)
}

/// The forward pass: `W[Cout, K] @ cols[K, N·L]`, back to `[N, Cout, Ho, Wo]`.
fn forward(x: Tensor<Flex, 4>, w: Tensor<Flex, 4>, g: Geometry) -> Tensor<Flex, 4> {
    let [cout, ..] = w.dims();
    let (kk, l) = g.kl();
    let device = x.device();
    let y = to_vec(w.reshape([cout, kk]).matmul(cols_of(x, g)));
    Tensor::from_data(
        TensorData::new(to_sample_major(&y, g.n, cout, l), [g.n, cout, g.ho, g.wo]),
        &device,
    )
}

/// The im2col path on `Flex`, the CPU backend (inference, and the inner backend of training).
impl ConvBackend for Flex {
    fn dense_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        conv: DenseConv,
    ) -> FloatTensor<Self> {
        let (x, w) = (float_tensor::<4>(x), float_tensor::<4>(weight));
        let g = Geometry::new(x.dims(), w.dims()[2], conv.stride, conv.pad);
        forward(x, w, g).into_primitive().tensor()
    }

    fn dense_conv2d_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        conv: DenseConv,
        want_x: bool,
        want_weight: bool,
    ) -> DenseConvGrads<Self> {
        let (x, w) = (float_tensor::<4>(x), float_tensor::<4>(weight));
        let grad = float_tensor::<4>(grad);
        let [cout, _, k, _] = w.dims();
        let g = Geometry::new(x.dims(), k, conv.stride, conv.pad);
        let (kk, l) = g.kl();
        let device = grad.device();
        // dY as [Cout, N·L], the layout of the forward GEMM's output.
        let grad = matrix(
            to_channel_major(&to_vec(grad), g.n, cout, l),
            cout,
            g.n * l,
            &device,
        );
        let grad_weight = want_weight.then(|| {
            // dW = dY · colsᵀ
            grad.clone()
                .matmul(cols_of(x, g).transpose())
                .reshape([cout, g.cin, k, k])
                .into_primitive()
                .tensor()
        });
        let grad_x = want_x.then(|| {
            // dcols = Wᵀ · dY, then col2im.
            let gcols = to_vec(w.reshape([cout, kk]).transpose().matmul(grad));
            let gx = if g.is_pointwise() {
                to_sample_major(&gcols, g.n, g.cin, l)
            } else {
                col2im(&gcols, g)
            };
            Tensor::<Flex, 4>::from_data(TensorData::new(gx, [g.n, g.cin, g.h, g.w]), &device)
                .into_primitive()
                .tensor()
        });
        DenseConvGrads {
            x: grad_x,
            weight: grad_weight,
        }
    }
}

/// `B`'s dense convolution as one node of the autodiff graph (rather than the graph of whatever
/// `B`'s version is made of), whose backward is `B`'s [`ConvBackend::dense_conv2d_backward`].
#[derive(Debug)]
struct DenseConvBackward;

impl<B: ConvBackend> Backward<B, 2> for DenseConvBackward {
    /// The checkpointed input and weight, and the convolution.
    type State = (NodeId, NodeId, DenseConv);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_x, node_weight] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x_id, weight_id, conv) = ops.state;
        let x = checkpointer.retrieve_node_output::<FloatTensor<B>>(x_id);
        let weight = checkpointer.retrieve_node_output::<FloatTensor<B>>(weight_id);
        let computed = B::dense_conv2d_backward(
            x,
            weight,
            grad,
            conv,
            node_x.is_some(),
            node_weight.is_some(),
        );
        if let (Some(node), Some(g)) = (node_weight, computed.weight) {
            grads.register::<B>(node.id, g);
        }
        if let (Some(node), Some(g)) = (node_x, computed.x) {
            grads.register::<B>(node.id, g);
        }
    }
}

impl<B: ConvBackend, C: CheckpointStrategy> ConvBackend for Autodiff<B, C> {
    fn dense_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        conv: DenseConv,
    ) -> FloatTensor<Self> {
        let prepared = <DenseConvBackward as Backward<B, 2>>::prepare::<C>(
            DenseConvBackward,
            [x.node.clone(), weight.node.clone()],
        );
        match prepared.compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let x_state = prep.checkpoint(&x);
                let weight_state = prep.checkpoint(&weight);
                prep.finish(
                    (x_state, weight_state, conv),
                    B::dense_conv2d(x.primitive, weight.primitive, conv),
                )
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::dense_conv2d(x.primitive, weight.primitive, conv))
            }
        }
    }
    // The default backward (burn's convolution gradients on `Self`) would only serve a second
    // derivative, which nothing takes.
}

/// CUDA keeps burn's convolution (the trait's defaults).
#[cfg(feature = "cuda")]
impl ConvBackend for burn::backend::Cuda {}

/// So does wgpu.
#[cfg(feature = "wgpu")]
impl ConvBackend for burn::backend::Wgpu {}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    type Ad = Autodiff<Flex>;

    /// Values and both gradients equal burn's own convolution's (the reference).
    #[test]
    fn matches_burn_convolution_values_and_gradients() {
        let device = Default::default();
        for (k, stride, cin, cout, hw) in [
            (3, 1, 3, 5, 7),
            (3, 2, 4, 6, 8),
            (1, 2, 4, 3, 7),
            (7, 2, 3, 4, 11),
            (1, 1, 2, 2, 3),
        ] {
            let pad = k / 2;
            let x0 =
                Tensor::<Ad, 4>::random([2, cin, hw, hw], Distribution::Normal(0.0, 1.0), &device);
            let w0 =
                Tensor::<Ad, 4>::random([cout, cin, k, k], Distribution::Normal(0.0, 0.5), &device);
            let run = |fast: bool| {
                let x = x0.clone().detach().require_grad();
                let w = w0.clone().detach().require_grad();
                let y = if fast {
                    dense_conv2d(x.clone(), w.clone(), DenseConv { stride, pad })
                } else {
                    burn::tensor::module::conv2d(
                        x.clone(),
                        w.clone(),
                        None,
                        DenseConv { stride, pad }.options(),
                    )
                };
                let yv: Vec<f32> = y.clone().into_data().to_vec().unwrap();
                let g = y.square().sum().backward();
                let gx: Vec<f32> = x.grad(&g).unwrap().into_data().to_vec().unwrap();
                let gw: Vec<f32> = w.grad(&g).unwrap().into_data().to_vec().unwrap();
                (yv, gx, gw)
            };
            let (a, b) = (run(false), run(true));
            for (name, u, v) in [("y", &a.0, &b.0), ("dx", &a.1, &b.1), ("dw", &a.2, &b.2)] {
                assert_eq!(u.len(), v.len());
                for (p, q) in u.iter().zip(v.iter()) {
                    assert!(
                        (p - q).abs() <= 1e-3 * (1.0 + p.abs()),
                        "k{k} s{stride} {name}: {p} vs {q}"
                    );
                }
            }
        }
    }

    #[test]
    fn inference_forward_matches_burn() {
        let device = Default::default();
        let x = Tensor::<Flex, 4>::random([3, 4, 9, 9], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<Flex, 4>::random([5, 4, 3, 3], Distribution::Normal(0.0, 1.0), &device);
        let a: Vec<f32> = dense_conv2d(x.clone(), w.clone(), DenseConv { stride: 2, pad: 1 })
            .into_data()
            .to_vec()
            .unwrap();
        let opts = burn::tensor::ops::ConvOptions::new([2, 2], [1, 1], [1, 1], 1);
        let b: Vec<f32> = burn::tensor::module::conv2d(x, w, None, opts)
            .into_data()
            .to_vec()
            .unwrap();
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() < 1e-4, "{p} vs {q}");
        }
    }

    /// The trait's defaults (CUDA's path) are exactly what burn's autodiff computes for its own
    /// convolution: same values, bit for bit.
    #[test]
    fn burn_defaults_equal_burn_autodiff_convolution() {
        let device = Default::default();
        let conv = DenseConv { stride: 2, pad: 1 };
        let x0 = Tensor::<Ad, 4>::random([2, 3, 9, 9], Distribution::Normal(0.0, 1.0), &device);
        let w0 = Tensor::<Ad, 4>::random([4, 3, 3, 3], Distribution::Normal(0.0, 0.5), &device);
        let (x, w) = (x0.detach().require_grad(), w0.detach().require_grad());
        let y = burn::tensor::module::conv2d(x.clone(), w.clone(), None, conv.options());
        let dy = y.random_like(Distribution::Normal(0.0, 1.0)).detach();
        // d(sum(y · dy))/dy is dy itself.
        let g = y.clone().mul(dy.clone()).sum().backward();
        let floats = |t: Tensor<Flex, 4>| t.into_data().to_vec::<f32>().unwrap();
        let prim = |t: Tensor<Flex, 4>| t.into_primitive().tensor();
        let (xi, wi, dyi) = (x.clone().inner(), w.clone().inner(), dy.inner());
        let ours = burn_dense_conv2d_backward::<Flex>(
            prim(xi.clone()),
            prim(wi.clone()),
            prim(dyi),
            conv,
            true,
            true,
        );
        let yi = float_tensor::<4>(burn_dense_conv2d::<Flex>(prim(xi), prim(wi), conv));
        assert_eq!(floats(yi), floats(y.inner()));
        assert_eq!(
            floats(float_tensor(ours.x.unwrap())),
            floats(x.grad(&g).unwrap())
        );
        assert_eq!(
            floats(float_tensor(ours.weight.unwrap())),
            floats(w.grad(&g).unwrap())
        );
    }
}
