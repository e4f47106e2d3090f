//! PP-LCNet (Cui et al. 2021, "PP-LCNet: A Lightweight CPU Convolutional Neural Network"), as
//! PaddleClas's legendary_models/pp_lcnet.py builds it, with its layer names.
//!
//! A 3×3/2 Conv+BN+hardswish stem (`conv1`), five stages `blocks2` .. `blocks6` of
//! depthwise-separable blocks (depthwise k×k Conv+BN+hardswish, squeeze-and-excitation in the
//! two `blocks6` blocks, pointwise Conv+BN+hardswish), global average pool, a bias-free 1×1
//! `last_conv` to 1280 channels + hardswish, Paddle dropout (`downscale_in_infer`), flatten,
//! `fc`. Widths scale by `make_divisible(c · scale)`. PPLCNet_x1_0 has 2.95M trainable
//! parameters at 1000 classes.

use super::taps::Taps;
use crate::nn::cpu_conv::ConvBackend;
use crate::nn::layers::{
    global_avg_pool, hardswish, pointwise_on_pooled, Act, BnMode, ConvBn, PaddleDropout, SeModule,
    PADDLE_HARDSIGMOID_SLOPE,
};
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// PaddleClas's channel rounding: to the nearest multiple of `divisor` (at least `divisor`),
/// one step up when rounding lost more than 10%.
pub fn make_divisible(v: f64, divisor: usize) -> usize {
    let d = divisor as f64;
    let rounded = ((v + d / 2.0).trunc() as usize / divisor * divisor).max(divisor);
    if (rounded as f64) < 0.9 * v {
        rounded + divisor
    } else {
        rounded
    }
}

/// One depthwise-separable block: `[kernel, in, out, stride, squeeze-excite]` at scale 1.
type BlockSpec = (usize, usize, usize, usize, bool);

/// PaddleClas's `NET_CONFIG`, one entry per stage `blocks2` .. `blocks6`.
const STAGES: [&[BlockSpec]; 5] = [
    &[(3, 16, 32, 1, false)],
    &[(3, 32, 64, 2, false), (3, 64, 64, 1, false)],
    &[(3, 64, 128, 2, false), (3, 128, 128, 1, false)],
    &[
        (3, 128, 256, 2, false),
        (5, 256, 256, 1, false),
        (5, 256, 256, 1, false),
        (5, 256, 256, 1, false),
        (5, 256, 256, 1, false),
        (5, 256, 256, 1, false),
    ],
    &[(5, 256, 512, 2, true), (5, 512, 512, 1, true)],
];

/// Depthwise conv, optional squeeze-and-excitation, pointwise conv.
#[derive(Module, Debug)]
pub struct DepthwiseSeparable<B: Backend> {
    pub dw_conv: ConvBn<B>,
    pub se: Option<SeModule<B>>,
    pub pw_conv: ConvBn<B>,
}

impl<B: Backend> DepthwiseSeparable<B> {
    fn new(spec: BlockSpec, scale: f64, device: &B::Device) -> Self {
        let (k, cin, cout, stride, se) = spec;
        let (cin, cout) = (
            make_divisible(cin as f64 * scale, 8),
            make_divisible(cout as f64 * scale, 8),
        );
        DepthwiseSeparable {
            dw_conv: ConvBn::depthwise(cin, k, stride, Act::Hardswish, device),
            // paddle.nn.Hardsigmoid(), i.e. Paddle's default slope.
            se: se.then(|| SeModule::new(cin, PADDLE_HARDSIGMOID_SLOPE, device)),
            pw_conv: ConvBn::new(cin, cout, 1, 1, Act::Hardswish, device),
        }
    }
}

impl<B: ConvBackend> DepthwiseSeparable<B> {
    pub fn forward(&self, x: Tensor<B, 4>, mode: BnMode) -> Tensor<B, 4> {
        let mut x = self.dw_conv.forward(x, mode);
        if let Some(se) = &self.se {
            x = se.forward(x);
        }
        self.pw_conv.forward(x, mode)
    }
}

#[derive(Module, Debug)]
pub struct PPLCNet<B: Backend> {
    pub conv1: ConvBn<B>,
    pub blocks2: Vec<DepthwiseSeparable<B>>,
    pub blocks3: Vec<DepthwiseSeparable<B>>,
    pub blocks4: Vec<DepthwiseSeparable<B>>,
    pub blocks5: Vec<DepthwiseSeparable<B>>,
    pub blocks6: Vec<DepthwiseSeparable<B>>,
    /// Bias-free 1×1 conv on the pooled features (`use_last_conv: False` drops it).
    pub last_conv: Option<Conv2d<B>>,
    pub dropout: PaddleDropout,
    pub fc: Linear<B>,
}

/// Tap names: the five stage outputs, then the pooled features.
const TAPS: [&str; 6] = [
    "blocks2", "blocks3", "blocks4", "blocks5", "blocks6", "avg_pool",
];

impl<B: Backend> PPLCNet<B> {
    /// `class_expand`: channels of `last_conv` (PaddleClas default 1280); `dropout_prob` 0.2 by
    /// default.
    pub fn new(
        scale: f64,
        class_num: usize,
        dropout_prob: f64,
        class_expand: usize,
        use_last_conv: bool,
        device: &B::Device,
    ) -> Self {
        let stage = |i: usize| -> Vec<DepthwiseSeparable<B>> {
            STAGES[i]
                .iter()
                .map(|&s| DepthwiseSeparable::new(s, scale, device))
                .collect()
        };
        let last = make_divisible(512.0 * scale, 8);
        let last_conv = use_last_conv.then(|| {
            Conv2dConfig::new([last, class_expand], [1, 1])
                .with_bias(false)
                .init(device)
        });
        PPLCNet {
            conv1: ConvBn::new(
                3,
                make_divisible(16.0 * scale, 8),
                3,
                2,
                Act::Hardswish,
                device,
            ),
            blocks2: stage(0),
            blocks3: stage(1),
            blocks4: stage(2),
            blocks5: stage(3),
            blocks6: stage(4),
            fc: LinearConfig::new(if use_last_conv { class_expand } else { last }, class_num)
                .init(device),
            last_conv,
            dropout: PaddleDropout { prob: dropout_prob },
        }
    }

    /// `blocks2` .. `blocks6` (the stage outputs), then `avg_pool`.
    pub fn tap_names(&self) -> Vec<String> {
        TAPS.iter().map(|s| s.to_string()).collect()
    }

    /// PaddleClas's `stages_pattern`.
    pub fn stage_names(&self) -> Vec<String> {
        TAPS[..5].iter().map(|s| s.to_string()).collect()
    }
}

impl<B: ConvBackend> PPLCNet<B> {
    pub fn forward(
        &self,
        x: Tensor<B, 4>,
        mode: BnMode,
        taps: &[usize],
    ) -> (Tensor<B, 2>, Vec<Tensor<B, 4>>) {
        let mut taps = Taps::new(taps);
        let mut x = self.conv1.forward(x, mode);
        let stages = [
            &self.blocks2,
            &self.blocks3,
            &self.blocks4,
            &self.blocks5,
            &self.blocks6,
        ];
        for (i, stage) in stages.into_iter().enumerate() {
            for block in stage {
                x = block.forward(x, mode);
            }
            taps.offer(i, &x);
        }
        let mut x = global_avg_pool(x);
        taps.offer(5, &x);
        if let Some(conv) = &self.last_conv {
            x = hardswish(pointwise_on_pooled(conv, x));
            x = self.dropout.forward(x, mode);
        }
        let [n, c, _, _] = x.dims();
        (self.fc.forward(x.reshape([n, c])), taps.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::make_divisible;

    /// Values of PaddleClas's `make_divisible` (Python) at the scales its models use.
    #[test]
    fn make_divisible_matches_paddleclas() {
        let cases = [
            (16.0 * 0.25, 8),
            (512.0 * 0.25, 128),
            (16.0 * 0.35, 8),
            (32.0 * 0.35, 16),
            (64.0 * 0.35, 24),
            (256.0 * 0.35, 88),
            (512.0 * 0.35, 176),
            (16.0 * 0.75, 16),
            (32.0 * 0.75, 24),
            (16.0 * 2.5, 40),
            (512.0 * 2.5, 1280),
            (88.0 * 0.35, 32),
            (96.0 * 0.35, 32),
            (120.0 * 0.35, 40),
        ];
        for (v, want) in cases {
            assert_eq!(make_divisible(v, 8), want, "make_divisible({v})");
        }
    }
}
