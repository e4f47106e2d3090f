//! The activations of PaddleClas's layers (`act` of `ConvBNLayer`, hardswish, hardsigmoid).

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// The activation after a [`ConvBn`] (PaddleClas's `act` argument).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    None,
    Relu,
    Hardswish,
}

impl Act {
    pub fn apply<B: Backend, const D: usize>(self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Act::None => x,
            Act::Relu => burn::tensor::activation::relu(x),
            Act::Hardswish => hardswish(x),
        }
    }
}

/// Paddle's `hardswish`: `x · min(max(x + 3, 0), 6) / 6`.
pub fn hardswish<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    // burn's hard_swish is x · clamp(x/6 + 1/2, 0, 1): the same function.
    burn::tensor::activation::hard_swish(x)
}

/// Paddle's `hardsigmoid(x, slope, offset)`: `clamp(slope · x + offset, 0, 1)`.
pub fn hardsigmoid<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    slope: f64,
    offset: f64,
) -> Tensor<B, D> {
    burn::tensor::activation::hard_sigmoid(x, slope, offset)
}

/// Slope of `paddle.nn.Hardsigmoid` (the functional's default, a rounded 1/6).
pub const PADDLE_HARDSIGMOID_SLOPE: f64 = 0.1666667;
