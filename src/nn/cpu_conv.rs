//! Dense convolution as a backend-extension op ([`ConvBackend`], burn's pattern for custom
//! operations), and its CPU implementation for training on `Autodiff<Flex>`: im2col + GEMM a few
//! samples at a time ([`super::gemm_conv`]), forward and backward. burn 0.21's generic convolution backward transposes activations
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
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use burn_flex::FlexTensor;

use super::batch_norm_op::BatchNormBackend;
use super::conv_geometry::Geometry;
use super::{depthwise_conv, gemm_conv};

/// The convolutions kd-launch runs through [`ConvBackend`] (those of PaddleClas's
/// `ConvBNLayer`): square kernel, the same stride on both axes, symmetric zero padding, no bias,
/// no dilation; dense (one group, weight `[Cout, Cin, k, k]`) or depthwise (one filter per
/// channel, weight `[C, 1, k, k]`). The kernel size comes from the weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SquareConv {
    pub stride: usize,
    pub pad: usize,
    pub depthwise: bool,
}

impl SquareConv {
    /// A dense convolution.
    pub fn dense(stride: usize, pad: usize) -> Self {
        SquareConv {
            stride,
            pad,
            depthwise: false,
        }
    }
    /// The same convolution in burn's terms, for a weight with `out_channels` filters.
    pub fn options(self, out_channels: usize) -> ConvOptions<2> {
        let groups = if self.depthwise { out_channels } else { 1 };
        ConvOptions::new(
            [self.stride, self.stride],
            [self.pad, self.pad],
            [1, 1],
            groups,
        )
    }
}

/// Output channels of a `[Cout, Cin/groups, k, k]` weight.
fn out_channels<B: Backend>(weight: &FloatTensor<B>) -> usize {
    use burn::tensor::TensorMetadata;
    weight.shape()[0]
}

/// Gradients of a [`SquareConv`] with respect to its input and its weight; `None` where the
/// backward pass did not ask for one (a frozen weight, an input that needs no gradient).
pub struct ConvGrads<B: Backend> {
    pub x: Option<FloatTensor<B>>,
    pub weight: Option<FloatTensor<B>>,
}

/// A backend with kd-launch's convolution op (and its fused BatchNorm, the supertrait, so one
/// bound brings both). The default methods are burn's own
/// convolution and its gradients, so a backend with nothing better (CUDA) implements the trait
/// with an empty block; `Flex` overrides both with the im2col + GEMM version, and
/// `Autodiff<B>` records the op in the graph with a backward that calls `B`'s.
pub trait ConvBackend: BatchNormBackend {
    /// `x[N, Cin, H, W]` convolved with `weight[Cout, Cin, k, k]`: `[N, Cout, Ho, Wo]`.
    fn square_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        conv: SquareConv,
    ) -> FloatTensor<Self> {
        burn_square_conv2d::<Self>(x, weight, conv)
    }

    /// The gradients of [`ConvBackend::square_conv2d`] given the gradient of its output,
    /// computing only the ones asked for.
    fn square_conv2d_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        conv: SquareConv,
        want_x: bool,
        want_weight: bool,
    ) -> ConvGrads<Self> {
        burn_square_conv2d_backward::<Self>(x, weight, grad, conv, want_x, want_weight)
    }
}

/// burn's convolution: the default [`ConvBackend::square_conv2d`].
pub fn burn_square_conv2d<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    conv: SquareConv,
) -> FloatTensor<B> {
    let options = conv.options(out_channels::<B>(&weight));
    B::conv2d(x, weight, None, options)
}

/// burn's convolution gradients, the ones burn's autodiff takes for its own convolution: the
/// default [`ConvBackend::square_conv2d_backward`].
pub fn burn_square_conv2d_backward<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    grad: FloatTensor<B>,
    conv: SquareConv,
    want_x: bool,
    want_weight: bool,
) -> ConvGrads<B> {
    let options = conv.options(out_channels::<B>(&weight));
    ConvGrads {
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

/// [`ConvBackend::square_conv2d`] on tensors.
pub fn square_conv2d<B: ConvBackend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    conv: SquareConv,
) -> Tensor<B, 4> {
    Tensor::from_primitive(TensorPrimitive::Float(B::square_conv2d(
        x.into_primitive().tensor(),
        weight.into_primitive().tensor(),
        conv,
    )))
}

/// `t` as contiguous f32 storage, or `None` for another float type (then burn's convolution
/// runs instead).
fn f32_storage(t: &FlexTensor) -> Option<FlexTensor> {
    (t.dtype() == DType::F32).then(|| t.to_contiguous())
}

fn from_vec(data: Vec<f32>, shape: [usize; 4]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(data, shape))
}

fn dims4(t: &FlexTensor) -> [usize; 4] {
    let s = t.layout().shape();
    [s[0], s[1], s[2], s[3]]
}

/// The chunked im2col + GEMM path ([`super::gemm_conv`]) and the direct depthwise kernel
/// ([`super::depthwise_conv`]) on `Flex`, the CPU backend (inference, and the inner backend
/// of training).
impl ConvBackend for Flex {
    fn square_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        conv: SquareConv,
    ) -> FloatTensor<Self> {
        let (Some(xc), Some(wc)) = (f32_storage(&x), f32_storage(&weight)) else {
            return burn_square_conv2d::<Self>(x, weight, conv);
        };
        let [cout, _, k, _] = dims4(&wc);
        let g = Geometry::new(dims4(&xc), cout, k, conv.stride, conv.pad);
        let y = if conv.depthwise {
            depthwise_conv::forward(f32s(&xc), f32s(&wc), &g)
        } else {
            gemm_conv::forward(f32s(&xc), f32s(&wc), &g)
        };
        from_vec(y, [g.n, cout, g.ho, g.wo])
    }

    fn square_conv2d_backward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        conv: SquareConv,
        want_x: bool,
        want_weight: bool,
    ) -> ConvGrads<Self> {
        let (Some(xc), Some(wc), Some(dy)) =
            (f32_storage(&x), f32_storage(&weight), f32_storage(&grad))
        else {
            return burn_square_conv2d_backward::<Self>(x, weight, grad, conv, want_x, want_weight);
        };
        let [cout, cin_per_group, k, _] = dims4(&wc);
        let g = Geometry::new(dims4(&xc), cout, k, conv.stride, conv.pad);
        let (x, w, dy) = (f32s(&xc), f32s(&wc), f32s(&dy));
        let (dx, dw) = if conv.depthwise {
            depthwise_conv::backward(x, w, dy, &g, want_x, want_weight)
        } else {
            gemm_conv::backward(x, w, dy, &g, want_x, want_weight)
        };
        ConvGrads {
            x: dx.map(|d| from_vec(d, [g.n, g.cin, g.h, g.w])),
            weight: dw.map(|d| from_vec(d, [cout, cin_per_group, k, k])),
        }
    }
}

/// The elements of a contiguous f32 tensor.
fn f32s(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("contiguous f32 tensor")
}

/// `B`'s dense convolution as one node of the autodiff graph (rather than the graph of whatever
/// `B`'s version is made of), whose backward is `B`'s [`ConvBackend::square_conv2d_backward`].
#[derive(Debug)]
struct SquareConvBackward;

impl<B: ConvBackend> Backward<B, 2> for SquareConvBackward {
    /// The checkpointed input and weight, and the convolution.
    type State = (NodeId, NodeId, SquareConv);

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
        let computed = B::square_conv2d_backward(
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
    fn square_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        conv: SquareConv,
    ) -> FloatTensor<Self> {
        let prepared = <SquareConvBackward as Backward<B, 2>>::prepare::<C>(
            SquareConvBackward,
            [x.node.clone(), weight.node.clone()],
        );
        match prepared.compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let x_state = prep.checkpoint(&x);
                let weight_state = prep.checkpoint(&weight);
                prep.finish(
                    (x_state, weight_state, conv),
                    B::square_conv2d(x.primitive, weight.primitive, conv),
                )
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::square_conv2d(x.primitive, weight.primitive, conv))
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

    fn float_tensor<const D: usize>(t: FloatTensor<Flex>) -> Tensor<Flex, D> {
        Tensor::from_primitive(TensorPrimitive::Float(t))
    }

    /// Values and both gradients equal burn's own convolution's (the reference).
    #[test]
    fn matches_burn_convolution_values_and_gradients() {
        let device = Default::default();
        // Batches of one, two and several samples per chunk, with a short last chunk.
        for (n, k, stride, cin, cout, hw) in [
            (2, 3, 1, 3, 5, 7),
            (2, 3, 2, 4, 6, 8),
            (2, 1, 2, 4, 3, 7),
            (2, 7, 2, 3, 4, 11),
            (2, 1, 1, 2, 2, 3),
            (1, 3, 1, 3, 4, 9),
            (1, 1, 1, 3, 4, 9),
            (13, 3, 1, 3, 5, 4),
            (13, 1, 1, 3, 5, 4),
            (11, 3, 2, 2, 3, 5),
            (40, 3, 1, 2, 3, 6),
        ] {
            let pad = k / 2;
            let x0 =
                Tensor::<Ad, 4>::random([n, cin, hw, hw], Distribution::Normal(0.0, 1.0), &device);
            let w0 =
                Tensor::<Ad, 4>::random([cout, cin, k, k], Distribution::Normal(0.0, 0.5), &device);
            let run = |fast: bool| {
                let x = x0.clone().detach().require_grad();
                let w = w0.clone().detach().require_grad();
                let y = if fast {
                    square_conv2d(x.clone(), w.clone(), SquareConv::dense(stride, pad))
                } else {
                    burn::tensor::module::conv2d(
                        x.clone(),
                        w.clone(),
                        None,
                        SquareConv::dense(stride, pad).options(cout),
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
                        "n{n} k{k} s{stride} {name}: {p} vs {q}"
                    );
                }
            }
        }
    }

    /// The depthwise kernel's values and both gradients equal burn's grouped convolution's.
    #[test]
    fn depthwise_matches_burn_grouped_convolution() {
        let device = Default::default();
        for (n, c, k, stride, hw) in [
            (2, 3, 3, 1, 7),
            (3, 4, 3, 2, 8),
            (2, 5, 5, 1, 9),
            (2, 3, 5, 2, 11),
            (1, 2, 3, 2, 1),
        ] {
            let spec = SquareConv {
                stride,
                pad: k / 2,
                depthwise: true,
            };
            let x0 =
                Tensor::<Ad, 4>::random([n, c, hw, hw], Distribution::Normal(0.0, 1.0), &device);
            let w0 = Tensor::<Ad, 4>::random([c, 1, k, k], Distribution::Normal(0.0, 0.5), &device);
            let run = |fast: bool| {
                let x = x0.clone().detach().require_grad();
                let w = w0.clone().detach().require_grad();
                let y = if fast {
                    square_conv2d(x.clone(), w.clone(), spec)
                } else {
                    burn::tensor::module::conv2d(x.clone(), w.clone(), None, spec.options(c))
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
                        (p - q).abs() <= 1e-4 * (1.0 + p.abs()),
                        "n{n} c{c} k{k} s{stride} {name}: {p} vs {q}"
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
        let a: Vec<f32> = square_conv2d(x.clone(), w.clone(), SquareConv::dense(2, 1))
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
        let conv = SquareConv::dense(2, 1);
        let x0 = Tensor::<Ad, 4>::random([2, 3, 9, 9], Distribution::Normal(0.0, 1.0), &device);
        let w0 = Tensor::<Ad, 4>::random([4, 3, 3, 3], Distribution::Normal(0.0, 0.5), &device);
        let (x, w) = (x0.detach().require_grad(), w0.detach().require_grad());
        let y = burn::tensor::module::conv2d(x.clone(), w.clone(), None, conv.options(4));
        let dy = y.random_like(Distribution::Normal(0.0, 1.0)).detach();
        // d(sum(y · dy))/dy is dy itself.
        let g = y.clone().mul(dy.clone()).sum().backward();
        let floats = |t: Tensor<Flex, 4>| t.into_data().to_vec::<f32>().unwrap();
        let prim = |t: Tensor<Flex, 4>| t.into_primitive().tensor();
        let (xi, wi, dyi) = (x.clone().inner(), w.clone().inner(), dy.inner());
        let ours = burn_square_conv2d_backward::<Flex>(
            prim(xi.clone()),
            prim(wi.clone()),
            prim(dyi),
            conv,
            true,
            true,
        );
        let yi = float_tensor::<4>(burn_square_conv2d::<Flex>(prim(xi), prim(wi), conv));
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
