//! Convolution for training on the CPU backend (`Autodiff<Flex>`): im2col + one batched GEMM
//! forward, and a custom backward (weight gradient = GEMM against the im2col matrix, input
//! gradient = GEMM then col2im). burn 0.21's generic convolution backward transposes activations
//! with strided copies and runs a direct transposed convolution; profiles of ResNet training
//! showed those, not the GEMMs, taking most of the step.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use rayon::prelude::*;
use std::any::{Any, TypeId};

type Ad = Autodiff<Flex>;
type Prim = <Flex as burn::tensor::backend::BackendTypes>::FloatTensorPrimitive;

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

/// Forward on the inner backend: `W[Cout, K] @ cols[K, N·L]`, back to `[N, Cout, Ho, Wo]`.
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

#[derive(Debug)]
struct ConvBackward;

impl Backward<Flex, 2> for ConvBackward {
    type State = (NodeId, NodeId, [usize; 4], usize, usize);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_x, node_w] = ops.parents;
        let grad = Tensor::<Flex, 4>::from_primitive(TensorPrimitive::Float(
            grads.consume::<Flex>(&ops.node),
        ));
        let (x_id, w_id, shape, stride, pad) = ops.state;
        let x = Tensor::<Flex, 4>::from_primitive(TensorPrimitive::Float(
            checkpointer.retrieve_node_output::<Prim>(x_id),
        ));
        let w = Tensor::<Flex, 4>::from_primitive(TensorPrimitive::Float(
            checkpointer.retrieve_node_output::<Prim>(w_id),
        ));
        let [cout, _, k, _] = w.dims();
        let g = Geometry::new(shape, k, stride, pad);
        let (kk, l) = g.kl();
        let device = grad.device();
        // dY as [Cout, N·L], the layout of the forward GEMM's output.
        let grad = matrix(
            to_channel_major(&to_vec(grad), g.n, cout, l),
            cout,
            g.n * l,
            &device,
        );
        if let Some(node) = node_w {
            // dW = dY · colsᵀ
            let gw = grad
                .clone()
                .matmul(cols_of(x, g).transpose())
                .reshape([cout, g.cin, k, k]);
            grads.register::<Flex>(node.id, gw.into_primitive().tensor());
        }
        if let Some(node) = node_x {
            // dcols = Wᵀ · dY, then col2im.
            let gcols = to_vec(w.reshape([cout, kk]).transpose().matmul(grad));
            let gx = if g.is_pointwise() {
                to_sample_major(&gcols, g.n, g.cin, l)
            } else {
                col2im(&gcols, g)
            };
            let gx =
                Tensor::<Flex, 4>::from_data(TensorData::new(gx, [g.n, g.cin, g.h, g.w]), &device);
            grads.register::<Flex>(node.id, gx.into_primitive().tensor());
        }
    }
}

fn conv_autodiff(x: Tensor<Ad, 4>, w: Tensor<Ad, 4>, stride: usize, pad: usize) -> Tensor<Ad, 4> {
    let [_, _, k, _] = w.dims();
    let shape = x.dims();
    let g = Geometry::new(shape, k, stride, pad);
    let x = x.into_primitive().tensor();
    let w = w.into_primitive().tensor();
    let run = |xp: Prim, wp: Prim| {
        let xi = Tensor::<Flex, 4>::from_primitive(TensorPrimitive::Float(xp));
        let wi = Tensor::<Flex, 4>::from_primitive(TensorPrimitive::Float(wp));
        forward(xi, wi, g).into_primitive().tensor()
    };
    let out = match ConvBackward
        .prepare::<NoCheckpointing>([x.node.clone(), w.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let xs = prep.checkpoint(&x);
            let ws = prep.checkpoint(&w);
            prep.finish((xs, ws, shape, stride, pad), run(x.primitive, w.primitive))
        }
        OpsKind::UnTracked(prep) => prep.finish(run(x.primitive, w.primitive)),
    };
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

/// The CPU convolution when `B` is `Autodiff<Flex>` (training) or `Flex` (inference);
/// other backends get their inputs back to run their own.
#[allow(clippy::type_complexity)]
pub fn try_conv2d<B: Backend>(
    x: Tensor<B, 4>,
    w: Tensor<B, 4>,
    stride: usize,
    pad: usize,
) -> Result<Tensor<B, 4>, (Tensor<B, 4>, Tensor<B, 4>)> {
    if TypeId::of::<B>() == TypeId::of::<Flex>() {
        // Inference (frozen teacher, eval): forward only.
        let cast = |t: Tensor<B, 4>| {
            *(Box::new(t) as Box<dyn Any>)
                .downcast::<Tensor<Flex, 4>>()
                .expect("B is Flex")
        };
        let (x, w) = (cast(x), cast(w));
        let g = Geometry::new(x.dims(), w.dims()[2], stride, pad);
        return Ok(*(Box::new(forward(x, w, g)) as Box<dyn Any>)
            .downcast::<Tensor<B, 4>>()
            .expect("B is Flex"));
    }
    if TypeId::of::<B>() != TypeId::of::<Ad>() {
        return Err((x, w));
    }
    let cast = |t: Tensor<B, 4>| {
        *(Box::new(t) as Box<dyn Any>)
            .downcast::<Tensor<Ad, 4>>()
            .expect("B is Autodiff<Flex>")
    };
    let y = conv_autodiff(cast(x), cast(w), stride, pad);
    Ok(*(Box::new(y) as Box<dyn Any>)
        .downcast::<Tensor<B, 4>>()
        .expect("B is Autodiff<Flex>"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

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
                    try_conv2d(x.clone(), w.clone(), stride, pad).unwrap()
                } else {
                    burn::tensor::module::conv2d(
                        x.clone(),
                        w.clone(),
                        None,
                        burn::tensor::ops::ConvOptions::new(
                            [stride, stride],
                            [pad, pad],
                            [1, 1],
                            1,
                        ),
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
        let a: Vec<f32> = try_conv2d(x.clone(), w.clone(), 2, 1)
            .unwrap()
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
}
