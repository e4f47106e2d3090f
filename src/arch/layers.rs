//! Building blocks shared by the backbones: a BatchNorm whose mode is explicit (so a frozen teacher
//! can run in eval mode, or on batch statistics as PaddleClas does, on any backend) and Conv+BN.

use burn::module::{Module, Param, RunningState};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Initializer, PaddingConfig2d};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether convolutions run as im2col + one batched matmul (see [`conv_as_matmul`]) rather than
/// the backend's own convolution. Set per run from the device: on the CPU backend the matmul
/// form's backward pass avoids burn's strided copies and its direct transposed convolution.
static CONV_AS_MATMUL: AtomicBool = AtomicBool::new(false);

pub fn set_conv_as_matmul(on: bool) {
    CONV_AS_MATMUL.store(on, Ordering::Relaxed);
}

pub fn conv_as_matmul_enabled() -> bool {
    CONV_AS_MATMUL.load(Ordering::Relaxed)
}

/// Convolution (square kernel, no bias, groups 1) as im2col built from shifted strided slices of
/// the zero-padded input, then `W[Cout, Cin·k²] @ cols[N, Cin·k², Ho·Wo]`. Every piece is a
/// plain tensor op, so autodiff's backward is two matmuls plus slice scatters, with NCHW kept
/// contiguous throughout.
pub fn conv_as_matmul<B: Backend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    stride: usize,
    pad: usize,
) -> Tensor<B, 4> {
    let [n, cin, h, w] = x.dims();
    let [cout, _, k, _] = weight.dims();
    let ho = (h + 2 * pad - k) / stride + 1;
    let wo = (w + 2 * pad - k) / stride + 1;
    let xp = if pad > 0 {
        Tensor::zeros([n, cin, h + 2 * pad, w + 2 * pad], &x.device())
            .slice_assign([0..n, 0..cin, pad..pad + h, pad..pad + w], x)
    } else {
        x
    };
    let window = |i: usize, j: usize| {
        let rows = burn::tensor::Slice::new(
            i as isize,
            Some((i + stride * (ho - 1) + 1) as isize),
            stride as isize,
        );
        let cols = burn::tensor::Slice::new(
            j as isize,
            Some((j + stride * (wo - 1) + 1) as isize),
            stride as isize,
        );
        xp.clone().slice([
            burn::tensor::Slice::from(0..n),
            burn::tensor::Slice::from(0..cin),
            rows,
            cols,
        ])
    };
    let cols = if k == 1 {
        window(0, 0).reshape([n, cin, ho * wo])
    } else {
        let taps: Vec<Tensor<B, 4>> = (0..k)
            .flat_map(|i| (0..k).map(move |j| (i, j)))
            .map(|(i, j)| window(i, j))
            .collect();
        // [N, Cin, k², Ho, Wo] matches the weight's [Cout, Cin, k, k] order.
        Tensor::stack::<5>(taps, 2).reshape([n, cin * k * k, ho * wo])
    };
    weight
        .reshape([1, cout, cin * k * k])
        .matmul(cols)
        .reshape([n, cout, ho, wo])
}

/// How BatchNorm layers normalise in a forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BnMode {
    /// Batch statistics; running statistics are updated.
    Train,
    /// Running statistics.
    Eval,
}

/// BatchNorm over `[N, C, H, W]`. Unlike burn's, the mode is an argument rather than
/// `B::ad_enabled()`, and statistics are reduced over contiguous reshapes (no `swap_dims`),
/// which avoids a full strided copy of every activation on the CPU backend.
#[derive(Module, Debug)]
pub struct BatchNorm2d<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub bias: Param<Tensor<B, 1>>,
    pub running_mean: RunningState<Tensor<B, 1>>,
    pub running_var: RunningState<Tensor<B, 1>>,
    /// Weight of the new batch statistic in the running average (PaddleClas: 1 - 0.9).
    pub momentum: f64,
    pub epsilon: f64,
}

impl<B: Backend> BatchNorm2d<B> {
    pub fn new(channels: usize, device: &B::Device) -> Self {
        BatchNorm2d {
            weight: Param::from_tensor(Tensor::ones([channels], device)),
            bias: Param::from_tensor(Tensor::zeros([channels], device)),
            running_mean: RunningState::new(Tensor::zeros([channels], device)),
            running_var: RunningState::new(Tensor::ones([channels], device)),
            momentum: 0.1,
            epsilon: 1e-5,
        }
    }

    pub fn forward(&self, x: Tensor<B, 4>, mode: BnMode) -> Tensor<B, 4> {
        let [n, c, h, w] = x.dims();
        let (mean, var) = match mode {
            BnMode::Eval => (
                self.running_mean.value_sync(),
                self.running_var.value_sync(),
            ),
            BnMode::Train => {
                // [N, C, HW] is a free view of the contiguous activation.
                let flat = x.clone().reshape([n, c, h * w]);
                let mean = flat.clone().mean_dim(2).mean_dim(0); // [1, C, 1]
                let var = (flat - mean.clone()).square().mean_dim(2).mean_dim(0);
                let (mean, var) = (mean.reshape([c]), var.reshape([c]));
                let m = self.momentum;
                let count = (n * h * w) as f64;
                // Running variance is the unbiased estimate, as in Paddle and PyTorch.
                let unbiased = var
                    .clone()
                    .detach()
                    .mul_scalar(count / (count - 1.0).max(1.0));
                self.running_mean.update(
                    self.running_mean
                        .value_sync()
                        .mul_scalar(1.0 - m)
                        .add(mean.clone().detach().mul_scalar(m)),
                );
                self.running_var.update(
                    self.running_var
                        .value_sync()
                        .mul_scalar(1.0 - m)
                        .add(unbiased.mul_scalar(m)),
                );
                (mean, var)
            }
        };
        // y = x * scale + shift with per-channel scale = γ/√(σ²+ε), shift = β − μ·scale:
        // two full-size operations instead of four.
        let scale = self.weight.val().div(var.add_scalar(self.epsilon).sqrt());
        let shift = self.bias.val().sub(mean.mul(scale.clone()));
        x.mul(scale.reshape([1, c, 1, 1]))
            .add(shift.reshape([1, c, 1, 1]))
    }
}

/// Convolution (no bias) followed by BatchNorm, optionally ReLU.
#[derive(Module, Debug)]
pub struct ConvBn<B: Backend> {
    pub conv: Conv2d<B>,
    pub bn: BatchNorm2d<B>,
    pub relu: bool,
}

impl<B: Backend> ConvBn<B> {
    pub fn new(
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        relu: bool,
        device: &B::Device,
    ) -> Self {
        let pad = kernel / 2;
        let conv = Conv2dConfig::new([cin, cout], [kernel, kernel])
            .with_stride([stride, stride])
            .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
            .with_bias(false)
            // He initialisation for ReLU networks (fan-out, as torchvision's ResNet).
            .with_initializer(Initializer::KaimingNormal {
                gain: std::f64::consts::SQRT_2,
                fan_out_only: true,
            })
            .init(device);
        ConvBn {
            conv,
            bn: BatchNorm2d::new(cout, device),
            relu,
        }
    }

    pub fn forward(&self, x: Tensor<B, 4>, mode: BnMode) -> Tensor<B, 4> {
        let conv = if conv_as_matmul_enabled() {
            let pad = self.conv.weight.dims()[2] / 2;
            conv_as_matmul(x, self.conv.weight.val(), self.conv.stride[0], pad)
        } else {
            self.conv.forward(x)
        };
        let y = self.bn.forward(conv, mode);
        if self.relu {
            burn::tensor::activation::relu(y)
        } else {
            y
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{Distribution, TensorData};

    #[test]
    fn batchnorm_train_normalises_and_updates_running_stats() {
        let device = Default::default();
        let bn = BatchNorm2d::<Flex>::new(3, &device);
        let x = Tensor::<Flex, 4>::random([4, 3, 5, 5], Distribution::Normal(2.0, 3.0), &device);
        let y = bn.forward(x.clone(), BnMode::Train);
        let [n, c, h, w] = y.dims();
        let flat = y.reshape([n, c, h * w]);
        let mean: Vec<f32> = flat
            .clone()
            .mean_dim(2)
            .mean_dim(0)
            .into_data()
            .to_vec()
            .unwrap();
        for m in mean {
            assert!(m.abs() < 1e-4, "{m}");
        }
        let var: Vec<f32> = flat
            .square()
            .mean_dim(2)
            .mean_dim(0)
            .into_data()
            .to_vec()
            .unwrap();
        for v in var {
            assert!((v - 1.0).abs() < 1e-3, "{v}");
        }
        let rm: Vec<f32> = bn.running_mean.value_sync().into_data().to_vec().unwrap();
        let xm: Vec<f32> = x
            .reshape([4, 3, 25])
            .mean_dim(2)
            .mean_dim(0)
            .reshape([3])
            .into_data()
            .to_vec()
            .unwrap();
        for (r, m) in rm.iter().zip(xm) {
            assert!((r - 0.1 * m).abs() < 1e-5);
        }
    }

    #[test]
    fn conv_as_matmul_equals_the_backend_convolution() {
        let device = Default::default();
        for (k, stride, cin, cout, hw) in [
            (3, 1, 3, 5, 7),
            (3, 2, 4, 6, 8),
            (1, 2, 4, 3, 7),
            (7, 2, 3, 4, 11),
            (1, 1, 2, 2, 3),
        ] {
            let pad = k / 2;
            let conv = Conv2dConfig::new([cin, cout], [k, k])
                .with_stride([stride, stride])
                .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
                .with_bias(false)
                .init::<Flex>(&device);
            let x = Tensor::<Flex, 4>::random(
                [2, cin, hw, hw],
                Distribution::Normal(0.0, 1.0),
                &device,
            );
            let a: Vec<f32> = conv.forward(x.clone()).into_data().to_vec().unwrap();
            let b: Vec<f32> = conv_as_matmul(x, conv.weight.val(), stride, pad)
                .into_data()
                .to_vec()
                .unwrap();
            assert_eq!(a.len(), b.len(), "k{k} s{stride}");
            for (u, v) in a.iter().zip(&b) {
                assert!((u - v).abs() < 1e-4, "k{k} s{stride}: {u} vs {v}");
            }
        }
    }

    #[test]
    fn conv_as_matmul_gradients_equal_the_backend_convolution() {
        type AD = burn::backend::Autodiff<Flex>;
        let device = Default::default();
        let conv = Conv2dConfig::new([3, 4], [3, 3])
            .with_stride([2, 2])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .with_bias(false)
            .init::<AD>(&device);
        let x0 = Tensor::<AD, 4>::random([2, 3, 9, 9], Distribution::Normal(0.0, 1.0), &device);
        let grads = |matmul: bool| {
            let x = x0.clone().detach().require_grad();
            let w = conv.weight.val().detach().require_grad();
            let y = if matmul {
                conv_as_matmul(x.clone(), w.clone(), 2, 1)
            } else {
                burn::tensor::module::conv2d(
                    x.clone(),
                    w.clone(),
                    None,
                    burn::tensor::ops::ConvOptions::new([2, 2], [1, 1], [1, 1], 1),
                )
            };
            let g = y.square().sum().backward();
            let gx: Vec<f32> = x.grad(&g).unwrap().into_data().to_vec().unwrap();
            let gw: Vec<f32> = w.grad(&g).unwrap().into_data().to_vec().unwrap();
            (gx, gw)
        };
        let (ax, aw) = grads(false);
        let (bx, bw) = grads(true);
        for (u, v) in ax.iter().zip(&bx).chain(aw.iter().zip(&bw)) {
            assert!((u - v).abs() < 1e-3 * (1.0 + u.abs()), "{u} vs {v}");
        }
    }

    #[test]
    fn batchnorm_eval_uses_running_stats() {
        let device = Default::default();
        let bn = BatchNorm2d::<Flex>::new(1, &device);
        bn.running_mean.update(Tensor::from_data(
            TensorData::new(vec![1.0f32], [1]),
            &device,
        ));
        bn.running_var.update(Tensor::from_data(
            TensorData::new(vec![4.0f32], [1]),
            &device,
        ));
        let x = Tensor::<Flex, 4>::from_data(TensorData::new(vec![3.0f32], [1, 1, 1, 1]), &device);
        let y: Vec<f32> = bn.forward(x, BnMode::Eval).into_data().to_vec().unwrap();
        assert!((y[0] - 2.0 / (4.0f32 + 1e-5).sqrt()).abs() < 1e-6);
    }
}
