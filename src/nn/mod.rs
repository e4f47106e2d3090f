//! Layers shared by the backbones, the losses' own layers and the data-parallel code: BatchNorm
//! with kd-launch's modes, convolution + BatchNorm blocks, activations, and the CPU convolution.

mod activation;
pub mod batch_norm_op;
mod conv_geometry;
pub mod cpu_conv;
mod cpu_kernel;
mod depthwise_conv;
mod gemm_conv;
pub mod layers;
mod winograd;

pub use layers::BnMode;
