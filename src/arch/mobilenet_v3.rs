//! MobileNetV3 large and small (Howard et al. 2019), as PaddleClas's
//! legendary_models/mobilenet_v3.py builds them, with its layer names.
//!
//! A 3×3/2 Conv+BN+hardswish stem (`conv`), the inverted residual `blocks[i]` (1×1 expand,
//! depthwise k×k, squeeze-and-excitation where the table says so, 1×1 linear projection, identity
//! added when stride 1 and channels equal), a 1×1 Conv+BN+hardswish `last_second_conv` (960 /
//! 576 channels at scale 1), global average pool, a bias-free 1×1 `last_conv` to 1280 +
//! hardswish, Paddle dropout (`downscale_in_infer`), flatten, `fc`. Unlike PP-LCNet, the SE
//! gate is `hardsigmoid(x, slope=0.2, offset=0.5)`. Widths scale by `make_divisible(c · scale)`.
//! MobileNetV3_large_x1_0 has 5.48M trainable parameters at 1000 classes, small_x1_0 2.94M.

use super::pplcnet::make_divisible;
use super::taps::Taps;
use crate::nn::cpu_conv::ConvBackend;
use crate::nn::layers::{
    global_avg_pool, hardswish, pointwise_on_pooled, Act, BnMode, ConvBn, PaddleDropout, SeModule,
};
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// The two published configurations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MobileNetV3Size {
    Large,
    Small,
}

/// One inverted residual block at scale 1: `[kernel, expanded, out, squeeze-excite, act,
/// stride]`.
type BlockSpec = (usize, usize, usize, bool, Act, usize);

const R: Act = Act::Relu;
const H: Act = Act::Hardswish;

/// PaddleClas's `NET_CONFIG["large"]`.
const LARGE: [BlockSpec; 15] = [
    (3, 16, 16, false, R, 1),
    (3, 64, 24, false, R, 2),
    (3, 72, 24, false, R, 1),
    (5, 72, 40, true, R, 2),
    (5, 120, 40, true, R, 1),
    (5, 120, 40, true, R, 1),
    (3, 240, 80, false, H, 2),
    (3, 200, 80, false, H, 1),
    (3, 184, 80, false, H, 1),
    (3, 184, 80, false, H, 1),
    (3, 480, 112, true, H, 1),
    (3, 672, 112, true, H, 1),
    (5, 672, 160, true, H, 2),
    (5, 960, 160, true, H, 1),
    (5, 960, 160, true, H, 1),
];

/// PaddleClas's `NET_CONFIG["small"]`.
const SMALL: [BlockSpec; 11] = [
    (3, 16, 16, true, R, 2),
    (3, 72, 24, false, R, 2),
    (3, 88, 24, false, R, 1),
    (5, 96, 40, true, H, 2),
    (5, 240, 40, true, H, 1),
    (5, 240, 40, true, H, 1),
    (5, 120, 48, true, H, 1),
    (5, 144, 48, true, H, 1),
    (5, 288, 96, true, H, 2),
    (5, 576, 96, true, H, 1),
    (5, 576, 96, true, H, 1),
];

/// Slope of the SE gate's hardsigmoid in PaddleClas's MobileNetV3.
const SE_SLOPE: f64 = 0.2;

/// Expand, depthwise, optional squeeze-and-excitation, linear projection; identity shortcut
/// when the shape is kept.
#[derive(Module, Debug)]
pub struct ResidualUnit<B: Backend> {
    pub expand_conv: ConvBn<B>,
    pub bottleneck_conv: ConvBn<B>,
    pub mid_se: Option<SeModule<B>>,
    pub linear_conv: ConvBn<B>,
    pub shortcut: bool,
}

impl<B: Backend> ResidualUnit<B> {
    fn new(cin: usize, spec: BlockSpec, scale: f64, device: &B::Device) -> Self {
        let (k, exp, out, se, act, stride) = spec;
        let mid = make_divisible(exp as f64 * scale, 8);
        let out = make_divisible(out as f64 * scale, 8);
        ResidualUnit {
            expand_conv: ConvBn::new(cin, mid, 1, 1, act, device),
            bottleneck_conv: ConvBn::depthwise(mid, k, stride, act, device),
            mid_se: se.then(|| SeModule::new(mid, SE_SLOPE, device)),
            linear_conv: ConvBn::new(mid, out, 1, 1, Act::None, device),
            shortcut: stride == 1 && cin == out,
        }
    }

    fn out_channels(&self) -> usize {
        self.linear_conv.conv.weight.dims()[0]
    }
}

impl<B: ConvBackend> ResidualUnit<B> {
    pub fn forward(&self, x: Tensor<B, 4>, mode: BnMode) -> Tensor<B, 4> {
        let mut y = self
            .bottleneck_conv
            .forward(self.expand_conv.forward(x.clone(), mode), mode);
        if let Some(se) = &self.mid_se {
            y = se.forward(y);
        }
        let y = self.linear_conv.forward(y, mode);
        if self.shortcut {
            y.add(x)
        } else {
            y
        }
    }
}

#[derive(Module, Debug)]
pub struct MobileNetV3<B: Backend> {
    pub conv: ConvBn<B>,
    pub blocks: Vec<ResidualUnit<B>>,
    pub last_second_conv: ConvBn<B>,
    /// Bias-free 1×1 conv on the pooled features.
    pub last_conv: Conv2d<B>,
    pub dropout: PaddleDropout,
    pub fc: Linear<B>,
    #[module(skip)]
    pub size: MobileNetV3Size,
}

impl<B: Backend> MobileNetV3<B> {
    /// `class_expand`: channels of `last_conv` (PaddleClas default 1280); `dropout_prob` 0.2 by
    /// default (0 for none).
    pub fn new(
        size: MobileNetV3Size,
        scale: f64,
        class_num: usize,
        dropout_prob: f64,
        class_expand: usize,
        device: &B::Device,
    ) -> Self {
        let (table, squeeze): (&[BlockSpec], usize) = match size {
            MobileNetV3Size::Large => (&LARGE, 960),
            MobileNetV3Size::Small => (&SMALL, 576),
        };
        let stem = make_divisible(16.0 * scale, 8);
        let mut cin = stem;
        let blocks: Vec<ResidualUnit<B>> = table
            .iter()
            .map(|&spec| {
                let block = ResidualUnit::new(cin, spec, scale, device);
                cin = block.out_channels();
                block
            })
            .collect();
        let squeeze = make_divisible(squeeze as f64 * scale, 8);
        MobileNetV3 {
            conv: ConvBn::new(3, stem, 3, 2, Act::Hardswish, device),
            blocks,
            last_second_conv: ConvBn::new(cin, squeeze, 1, 1, Act::Hardswish, device),
            last_conv: Conv2dConfig::new([squeeze, class_expand], [1, 1])
                .with_bias(false)
                .init(device),
            dropout: PaddleDropout { prob: dropout_prob },
            fc: LinearConfig::new(class_expand, class_num).init(device),
            size,
        }
    }

    /// `blocks[0]` .. `blocks[n-1]`, then `avg_pool` (the pooled `last_second_conv` output).
    pub fn tap_names(&self) -> Vec<String> {
        super::taps::block_list_taps(self.blocks.len())
    }

    /// PaddleClas's `stages_pattern`.
    pub fn stage_names(&self) -> Vec<String> {
        let ends: &[usize] = match self.size {
            MobileNetV3Size::Large => &[0, 2, 5, 11, 14],
            MobileNetV3Size::Small => &[0, 2, 7, 10],
        };
        ends.iter().map(|i| format!("blocks[{i}]")).collect()
    }
}

impl<B: ConvBackend> MobileNetV3<B> {
    pub fn forward(
        &self,
        x: Tensor<B, 4>,
        mode: BnMode,
        taps: &[usize],
    ) -> (Tensor<B, 2>, Vec<Tensor<B, 4>>) {
        let mut taps = Taps::new(taps);
        let mut x = self.conv.forward(x, mode);
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(x, mode);
            taps.offer(i, &x);
        }
        let pooled = global_avg_pool(self.last_second_conv.forward(x, mode));
        taps.offer(self.blocks.len(), &pooled);
        let x = hardswish(pointwise_on_pooled(&self.last_conv, pooled));
        let x = self.dropout.forward(x, mode);
        let [n, c, _, _] = x.dims();
        (self.fc.forward(x.reshape([n, c])), taps.finish())
    }
}
