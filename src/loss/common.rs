//! Small pieces several losses share: tensor helpers, the temperature check and the
//! convolution MGD and PEFD build their layers from.

use crate::config::Node;
use anyhow::{anyhow, Result};
use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Distribution, Int, Tensor};

/// An error at the loss entry `p` (file and key path in the message).
pub(crate) fn config_error(p: &Node, message: String) -> anyhow::Error {
    anyhow!("{}", p.error(message))
}

/// Accepts `key`: PaddleClas takes it for this loss but it changes nothing
/// (a read key is not reported as unknown).
pub(crate) fn accept_unused(p: &Node, key: &str) {
    p.accept(&[key]);
}

/// Softened losses divide by the temperature, so it must be positive.
pub(crate) fn check_temperature(p: &Node, temperature: f64) -> Result<()> {
    if temperature <= 0.0 {
        return Err(config_error(
            p,
            format!("temperature must be positive, got {temperature}"),
        ));
    }
    Ok(())
}

/// `[N]` class indices → `[N, C]` one-hot rows.
pub fn one_hot<B: Backend>(labels: Tensor<B, 1, Int>, classes: usize) -> Tensor<B, 2> {
    labels.one_hot::<2>(classes).float()
}

/// `log Σ exp` along dim 1, keeping the dim: `[N, C] → [N, 1]`.
pub fn logsumexp<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let max = x.clone().max_dim(1).detach();
    x.sub(max.clone()).exp().sum_dim(1).log().add(max)
}

/// Hard labels, or the teacher's arg-max when a loss is told to use it as ground truth
/// (`use_target_as_gt`).
pub fn target_labels<B: Backend>(
    labels: Tensor<B, 1, Int>,
    teacher: &Tensor<B, 2>,
    from_teacher: bool,
) -> Tensor<B, 1, Int> {
    if from_teacher {
        let [n, _] = teacher.dims();
        teacher.clone().argmax(1).reshape([n])
    } else {
        labels
    }
}

/// `sqrt(max(x, 1e-24))`: a norm whose gradient stays finite at zero (its value differs only
/// below 1e-12, where every caller adds a larger epsilon anyway).
pub fn safe_sqrt<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    x.clamp_min(1e-24).sqrt()
}

/// Normal initialisation with standard deviation `std` (drawn from the backend's seeded RNG).
pub(crate) fn normal<B: Backend, const D: usize>(
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

/// A stride-1 "same" convolution with bias (MGD's align conv and generator, PEFD's projectors).
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

    /// `[N, C_in, H, W] → [N, C_out, H, W]`.
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
