//! Building blocks shared by the backbones: a BatchNorm whose mode is explicit (so a frozen teacher
//! can run in eval mode, or on batch statistics as PaddleClas does, on any backend), Conv+BN(+act),
//! Paddle's activations, squeeze-and-excitation, and Paddle's dropout.

use super::batch_norm_op::BatchNormBackend;
use super::cpu_conv::{square_conv2d, ConvBackend, SquareConv};
use burn::module::{Module, Param, RunningState};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Initializer, PaddingConfig2d};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorPrimitive};
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether dense and depthwise convolutions go through [`ConvBackend`] (on by default), whose
/// CPU version is kd-launch's; off, every convolution is burn's `Conv2d` (for comparisons).
static CPU_CONV: AtomicBool = AtomicBool::new(true);

/// Chooses between kd-launch's CPU convolution ([`ConvBackend`]) and burn's own.
pub fn set_cpu_conv(on: bool) {
    CPU_CONV.store(on, Ordering::Relaxed);
}

/// How BatchNorm layers normalise in a forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BnMode {
    /// Batch statistics; running statistics are updated.
    Train,
    /// Batch statistics of `k` interleaved splits of the batch (samples `i ≡ s mod k` form split
    /// `s`), each normalised by its own statistics; running statistics are updated with their
    /// mean. This is what `k` workers with per-worker BatchNorm compute on the shards of one
    /// global batch (DistributedBatchSampler deals sample `i` to rank `i mod k`), so one worker
    /// can reproduce a `k`-worker run ("ghost" batch norm).
    TrainSplits(usize),
    /// Running statistics.
    Eval,
}

impl BnMode {
    /// Whether this is a training mode (batch statistics, dropout active).
    pub fn is_train(self) -> bool {
        !matches!(self, BnMode::Eval)
    }
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
        let splits = match mode {
            BnMode::TrainSplits(k) if k > 1 && n % k == 0 => k,
            _ => 1,
        };
        if splits > 1 {
            return self.forward_splits(x, splits);
        }
        let (mean, var) = match mode {
            BnMode::Eval => (
                self.running_mean.value_sync(),
                self.running_var.value_sync(),
            ),
            BnMode::Train | BnMode::TrainSplits(_) => {
                // [N, C, HW] is a free view of the contiguous activation.
                let flat = x.clone().reshape([n, c, h * w]);
                let mean = flat.clone().mean_dim(2).mean_dim(0); // [1, C, 1]
                                                                 // Repeating the per-channel value over N (a tiny copy) turns the broadcast into
                                                                 // flex's fast "one scalar per row" pattern instead of its generic strided walk.
                let var = (flat - mean.clone().repeat_dim(0, n))
                    .square()
                    .mean_dim(2)
                    .mean_dim(0);
                let (mean, var) = (mean.reshape([c]), var.reshape([c]));
                self.update_running(mean.clone(), var.clone(), n * h * w);
                (mean, var)
            }
        };
        // y = x * scale + shift: two full-size operations instead of four.
        let (scale, shift) = self.scale_shift(mean, var);
        let per_row = |t: Tensor<B, 1>| t.reshape([1, c, 1, 1]).repeat_dim(0, n);
        x.mul(per_row(scale)).add(per_row(shift))
    }

    /// Per-channel `scale = γ/√(σ²+ε)` and `shift = β − μ·scale`, so that the normalised
    /// output is `x·scale + shift`.
    fn scale_shift(&self, mean: Tensor<B, 1>, var: Tensor<B, 1>) -> (Tensor<B, 1>, Tensor<B, 1>) {
        let scale = self.weight.val().div(var.add_scalar(self.epsilon).sqrt());
        let shift = self.bias.val().sub(mean.mul(scale.clone()));
        (scale, shift)
    }

    /// `act(forward(x, mode))`, through the backend's fused ops where it has them (kd-launch's
    /// CPU ops switched on, see [`set_cpu_conv`]): training BatchNorm as one op with its own
    /// backward; evaluation BatchNorm and the activation in one pass (frozen teachers, eval,
    /// inference).
    pub fn forward_act(&self, x: Tensor<B, 4>, mode: BnMode, act: Act) -> Tensor<B, 4>
    where
        B: BatchNormBackend,
    {
        let float = |t| Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(t));
        let prim = |t: Tensor<B, 1>| t.into_primitive().tensor();
        if CPU_CONV.load(Ordering::Relaxed) {
            match mode {
                BnMode::Train => {
                    let [n, _, h, w] = x.dims();
                    if let Some((y, mean, var)) = B::batch_norm_train(
                        x.clone().into_primitive().tensor(),
                        prim(self.weight.val()),
                        prim(self.bias.val()),
                        self.epsilon,
                    ) {
                        self.update_running(float(mean), float(var), n * h * w);
                        return act.apply(Tensor::from_primitive(TensorPrimitive::Float(y)));
                    }
                }
                BnMode::Eval => {
                    let (scale, shift) = self.scale_shift(
                        self.running_mean.value_sync(),
                        self.running_var.value_sync(),
                    );
                    let input = x.clone().into_primitive().tensor();
                    if let Some(y) = B::scale_shift_act(input, prim(scale), prim(shift), act) {
                        return Tensor::from_primitive(TensorPrimitive::Float(y));
                    }
                }
                BnMode::TrainSplits(_) => {}
            }
        }
        act.apply(self.forward(x, mode))
    }

    /// [`BnMode::TrainSplits`]: `[N, C, H, W]` viewed as `[N/k, k, C, HW]` puts sample
    /// `j·k + s` at `(j, s)`, so split `s` is a slice along the second axis.
    fn forward_splits(&self, x: Tensor<B, 4>, k: usize) -> Tensor<B, 4> {
        let [n, c, h, w] = x.dims();
        let m = n / k;
        let flat = x.reshape([m, k, c, h * w]);
        let mean = flat.clone().mean_dim(3).mean_dim(0); // [1, k, C, 1]
        let var = (flat.clone() - mean.clone().repeat_dim(0, m))
            .square()
            .mean_dim(3)
            .mean_dim(0);
        self.update_running(
            mean.clone().mean_dim(1).reshape([c]),
            var.clone().mean_dim(1).reshape([c]),
            m * h * w,
        );
        let gamma = self.weight.val().reshape([1, 1, c, 1]);
        let beta = self.bias.val().reshape([1, 1, c, 1]);
        let scale = gamma.div(var.add_scalar(self.epsilon).sqrt()); // [1, k, C, 1]
        let shift = beta.sub(mean.mul(scale.clone()));
        flat.mul(scale.repeat_dim(0, m))
            .add(shift.repeat_dim(0, m))
            .reshape([n, c, h, w])
    }

    /// Moves the running statistics towards a batch's (biased) `var` over `count` values per
    /// channel, and applies the update at once, so the stored value is always current (burn's
    /// `RunningState` otherwise holds it back until the next read, and a module visitor or mapper
    /// — checkpoints, replica synchronisation — would see the previous step's value).
    fn update_running(&self, mean: Tensor<B, 1>, var: Tensor<B, 1>, count: usize) {
        let m = self.momentum;
        let count = count as f64;
        // Running variance is the unbiased estimate, as PyTorch and Paddle's GPU kernels keep it
        // (Paddle's CPU kernel keeps the biased one).
        let unbiased = var.detach().mul_scalar(count / (count - 1.0).max(1.0));
        self.running_mean.update(
            self.running_mean
                .value_sync()
                .mul_scalar(1.0 - m)
                .add(mean.detach().mul_scalar(m)),
        );
        self.running_var.update(
            self.running_var
                .value_sync()
                .mul_scalar(1.0 - m)
                .add(unbiased.mul_scalar(m)),
        );
        let _ = self.running_mean.value_sync();
        let _ = self.running_var.value_sync();
    }
}

pub use super::activation::{hardsigmoid, hardswish, Act, PADDLE_HARDSIGMOID_SLOPE};

/// Global average pool to `[N, C, 1, 1]`, reduced over a contiguous `[N, C, HW]` view.
pub fn global_avg_pool<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [n, c, h, w] = x.dims();
    x.reshape([n, c, h * w]).mean_dim(2).reshape([n, c, 1, 1])
}

/// A 1×1 convolution applied to pooled `[N, C, 1, 1]` features as one matrix product (the
/// weight keeps its convolution shape `[out, in, 1, 1]`, so names and shapes stay PaddleClas's).
pub fn pointwise_on_pooled<B: Backend>(conv: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    let [n, c, _, _] = x.dims();
    let [out, cin, _, _] = conv.weight.dims();
    debug_assert_eq!(c, cin, "1x1 convolution over {c} channels expects {cin}");
    let w = conv.weight.val().reshape([out, cin]).transpose();
    let mut y = x.reshape([n, c]).matmul(w);
    if let Some(b) = &conv.bias {
        y = y.add(b.val().reshape([1, out]));
    }
    y.reshape([n, out, 1, 1])
}

/// Convolution (no bias) followed by BatchNorm and an activation: PaddleClas's `ConvBNLayer`.
/// `groups > 1` is a grouped (depthwise when `groups == cin == cout`) convolution.
#[derive(Module, Debug)]
pub struct ConvBn<B: Backend> {
    pub conv: Conv2d<B>,
    pub bn: BatchNorm2d<B>,
    #[module(skip)]
    pub act: Act,
}

impl<B: Backend> ConvBn<B> {
    /// A dense (`groups = 1`) `kernel`×`kernel` convolution, padding `kernel / 2`.
    pub fn new(
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        act: Act,
        device: &B::Device,
    ) -> Self {
        Self::grouped(cin, cout, kernel, stride, 1, act, device)
    }

    /// A depthwise convolution: one `kernel`×`kernel` filter per channel.
    pub fn depthwise(
        channels: usize,
        kernel: usize,
        stride: usize,
        act: Act,
        device: &B::Device,
    ) -> Self {
        Self::grouped(channels, channels, kernel, stride, channels, act, device)
    }

    fn grouped(
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        groups: usize,
        act: Act,
        device: &B::Device,
    ) -> Self {
        let pad = kernel / 2;
        let conv = Conv2dConfig::new([cin, cout], [kernel, kernel])
            .with_stride([stride, stride])
            .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
            .with_groups(groups)
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
            act,
        }
    }
}

impl<B: ConvBackend> ConvBn<B> {
    pub fn forward(&self, x: Tensor<B, 4>, mode: BnMode) -> Tensor<B, 4> {
        // Dense and depthwise convolutions are the backend's op; other groupings take burn's.
        let [cout, cin_per_group, k, _] = self.conv.weight.dims();
        let depthwise = cin_per_group == 1 && self.conv.groups == cout && cout > 1;
        let conv = if (self.conv.groups == 1 || depthwise) && CPU_CONV.load(Ordering::Relaxed) {
            let spec = SquareConv {
                stride: self.conv.stride[0],
                pad: k / 2,
                depthwise,
            };
            square_conv2d(x, self.conv.weight.val(), spec)
        } else {
            self.conv.forward(x)
        };
        self.bn.forward_act(conv, mode, self.act)
    }
}

/// Squeeze-and-excitation as PaddleClas writes it: global average pool, 1×1 conv to `C/4`
/// (with bias), ReLU, 1×1 conv back to `C` (with bias), hardsigmoid, channel-wise product.
/// The hardsigmoid's slope differs between families (PP-LCNet: Paddle's default ≈ 1/6;
/// MobileNetV3: 0.2), so it is a field.
#[derive(Module, Debug)]
pub struct SeModule<B: Backend> {
    pub conv1: Conv2d<B>,
    pub conv2: Conv2d<B>,
    pub slope: f64,
}

impl<B: Backend> SeModule<B> {
    pub fn new(channels: usize, slope: f64, device: &B::Device) -> Self {
        let squeezed = channels / 4;
        SeModule {
            conv1: Conv2dConfig::new([channels, squeezed], [1, 1]).init(device),
            conv2: Conv2dConfig::new([squeezed, channels], [1, 1]).init(device),
            slope,
        }
    }

    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [n, c, h, w] = x.dims();
        let s = pointwise_on_pooled(&self.conv1, global_avg_pool(x.clone()));
        let s = pointwise_on_pooled(&self.conv2, burn::tensor::activation::relu(s));
        let scale = hardsigmoid(s, self.slope, 0.5);
        // Expanding [N, C, 1, 1] over H×W as an explicit per-row repeat is flex's fast pattern.
        x.mul(
            scale
                .reshape([n, c, 1])
                .repeat_dim(2, h * w)
                .reshape([n, c, h, w]),
        )
    }
}

/// Paddle's `Dropout(p, mode="downscale_in_infer")`, which PP-LCNet and MobileNetV3 use: in
/// training each element is kept with probability `1 - p` and NOT rescaled; in evaluation
/// everything is multiplied by `1 - p`. Training vs evaluation follows the [`BnMode`] of the
/// forward pass (so a frozen teacher run on batch statistics, as PaddleClas does, also drops).
#[derive(Module, Clone, Debug)]
pub struct PaddleDropout {
    pub prob: f64,
}

impl PaddleDropout {
    pub fn forward<B: Backend, const D: usize>(
        &self,
        x: Tensor<B, D>,
        mode: BnMode,
    ) -> Tensor<B, D> {
        if self.prob == 0.0 {
            return x;
        }
        let keep = 1.0 - self.prob;
        match mode {
            BnMode::Train | BnMode::TrainSplits(_) => {
                let mask = x.random_like(burn::tensor::Distribution::Bernoulli(keep));
                x.mul(mask)
            }
            BnMode::Eval => x.mul_scalar(keep),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{Distribution, TensorData};

    /// `TrainSplits(k)` on a batch of `k·b` equals `k` separate `Train` passes on the interleaved
    /// splits (what `k` workers compute), with the running statistics averaged over them.
    #[test]
    fn batchnorm_splits_equal_separate_batches() {
        let device = Default::default();
        let x = Tensor::<Flex, 4>::random([6, 3, 2, 2], Distribution::Normal(1.0, 2.0), &device);
        let whole = BatchNorm2d::<Flex>::new(3, &device);
        let y = whole.forward(x.clone(), BnMode::TrainSplits(2));
        let mut running = vec![];
        for s in 0..2 {
            let idx = Tensor::<Flex, 1, burn::tensor::Int>::from_data(
                TensorData::new(vec![s as i64, s as i64 + 2, s as i64 + 4], [3]),
                &device,
            );
            let part = BatchNorm2d::<Flex>::new(3, &device);
            let ys = part.forward(x.clone().select(0, idx.clone()), BnMode::Train);
            let got = y.clone().select(0, idx);
            let diff: f32 = (ys - got).abs().max().into_scalar();
            assert!(diff < 1e-5, "split {s}: {diff}");
            running.push(
                part.running_var
                    .value()
                    .into_data()
                    .to_vec::<f32>()
                    .unwrap(),
            );
        }
        let mean: Vec<f32> = running[0]
            .iter()
            .zip(&running[1])
            .map(|(a, b)| (a + b) / 2.0)
            .collect();
        let got = whole
            .running_var
            .value()
            .into_data()
            .to_vec::<f32>()
            .unwrap();
        for (a, b) in mean.iter().zip(&got) {
            assert!((a - b).abs() < 1e-5, "{mean:?} vs {got:?}");
        }
        // Plain training on the whole batch differs (other statistics): the test can fail.
        let plain = BatchNorm2d::<Flex>::new(3, &device).forward(x, BnMode::Train);
        let d: f32 = (plain - y).abs().max().into_scalar();
        assert!(d > 1e-3);
    }

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
