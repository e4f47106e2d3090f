//! ResNets with PaddleClas's layer naming: the residual blocks form one flat list `blocks`, so
//! `return_patterns: ["blocks[7]"]` taps the output of the eighth block.
//!
//! * ImageNet ResNet18/34/50 (He et al. 2016): 7×7/2 stem + 3×3/2 max-pool, four stages.
//!   `stem: cifar` swaps in a 3×3/1 stem without max-pool (the CIFAR ResNet18/34 of KD benchmarks).
//! * CIFAR ResNets of the CRD/DKD benchmarks (resnet20/56, resnet8x4/32x4): 3×3 stem, three stages
//!   of `(depth-2)/6` basic blocks.

use super::layers::{BnMode, ConvBn};
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// A basic (two 3×3) or bottleneck (1×1, 3×3, 1×1) residual block.
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub conv0: ConvBn<B>,
    pub conv1: ConvBn<B>,
    /// Third convolution of a bottleneck block.
    pub conv2: Option<ConvBn<B>>,
    /// 1×1 projection when the shape changes.
    pub short: Option<ConvBn<B>>,
}

impl<B: Backend> Block<B> {
    fn basic(cin: usize, cout: usize, stride: usize, device: &B::Device) -> Self {
        Block {
            conv0: ConvBn::new(cin, cout, 3, stride, true, device),
            conv1: ConvBn::new(cout, cout, 3, 1, false, device),
            conv2: None,
            short: (stride != 1 || cin != cout)
                .then(|| ConvBn::new(cin, cout, 1, stride, false, device)),
        }
    }

    fn bottleneck(cin: usize, width: usize, stride: usize, device: &B::Device) -> Self {
        let cout = width * 4;
        Block {
            conv0: ConvBn::new(cin, width, 1, 1, true, device),
            conv1: ConvBn::new(width, width, 3, stride, true, device),
            conv2: Some(ConvBn::new(width, cout, 1, 1, false, device)),
            short: (stride != 1 || cin != cout)
                .then(|| ConvBn::new(cin, cout, 1, stride, false, device)),
        }
    }

    pub fn forward(&self, x: Tensor<B, 4>, mode: BnMode) -> Tensor<B, 4> {
        let identity = match &self.short {
            Some(s) => s.forward(x.clone(), mode),
            None => x.clone(),
        };
        let mut y = self.conv1.forward(self.conv0.forward(x, mode), mode);
        if let Some(c) = &self.conv2 {
            y = c.forward(y, mode);
        }
        burn::tensor::activation::relu(y.add(identity))
    }
}

/// Which published network a [`ResNet`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResNetKind {
    ImageNet { depth: usize },
    Cifar { depth: usize, widen: usize },
}

#[derive(Module, Debug)]
pub struct ResNet<B: Backend> {
    pub stem: ConvBn<B>,
    pub max_pool: bool,
    pub blocks: Vec<Block<B>>,
    pub fc: Linear<B>,
}

impl<B: Backend> ResNet<B> {
    /// `cifar_stem` only affects ImageNet-kind networks (CIFAR ones always have the 3×3 stem).
    pub fn new(
        kind: ResNetKind,
        class_num: usize,
        cifar_stem: bool,
        device: &B::Device,
    ) -> Result<Self, String> {
        let mut blocks = vec![];
        let (stem, max_pool, out) = match kind {
            ResNetKind::ImageNet { depth } => {
                let (counts, bottleneck) = match depth {
                    18 => ([2, 2, 2, 2], false),
                    34 => ([3, 4, 6, 3], false),
                    50 => ([3, 4, 6, 3], true),
                    101 => ([3, 4, 23, 3], true),
                    152 => ([3, 8, 36, 3], true),
                    d => {
                        return Err(format!(
                            "ResNet depth {d} is not one of 18, 34, 50, 101, 152"
                        ))
                    }
                };
                let stem = if cifar_stem {
                    ConvBn::new(3, 64, 3, 1, true, device)
                } else {
                    ConvBn::new(3, 64, 7, 2, true, device)
                };
                let mut cin = 64;
                for (stage, &n) in counts.iter().enumerate() {
                    let width = 64 << stage;
                    for i in 0..n {
                        let stride = if i == 0 && stage > 0 { 2 } else { 1 };
                        if bottleneck {
                            blocks.push(Block::bottleneck(cin, width, stride, device));
                            cin = width * 4;
                        } else {
                            blocks.push(Block::basic(cin, width, stride, device));
                            cin = width;
                        }
                    }
                }
                (stem, !cifar_stem, cin)
            }
            ResNetKind::Cifar { depth, widen } => {
                if depth < 8 || (depth - 2) % 6 != 0 {
                    return Err(format!("CIFAR ResNet depth must be 6n+2, got {depth}"));
                }
                let n = (depth - 2) / 6;
                let widths = if widen == 1 {
                    [16, 16, 32, 64]
                } else {
                    [32, 64, 128, 256]
                };
                let stem = ConvBn::new(3, widths[0], 3, 1, true, device);
                let mut cin = widths[0];
                for stage in 0..3 {
                    for i in 0..n {
                        let stride = if i == 0 && stage > 0 { 2 } else { 1 };
                        blocks.push(Block::basic(cin, widths[stage + 1], stride, device));
                        cin = widths[stage + 1];
                    }
                }
                (stem, false, cin)
            }
        };
        Ok(ResNet {
            stem,
            max_pool,
            blocks,
            fc: LinearConfig::new(out, class_num).init(device),
        })
    }

    /// Logits, plus the outputs of the blocks whose indices are in `taps` (in the order given).
    pub fn forward(
        &self,
        x: Tensor<B, 4>,
        mode: BnMode,
        taps: &[usize],
    ) -> (Tensor<B, 2>, Vec<Tensor<B, 4>>) {
        let mut x = self.stem.forward(x, mode);
        if self.max_pool {
            x = burn::tensor::module::max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1], false);
        }
        let mut tapped: Vec<Option<Tensor<B, 4>>> = vec![None; taps.len()];
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(x, mode);
            for (slot, &t) in tapped.iter_mut().zip(taps) {
                if t == i {
                    *slot = Some(x.clone());
                }
            }
        }
        let [n, c, h, w] = x.dims();
        // Global average pool over a contiguous [N, C, HW] view.
        let pooled = x.reshape([n, c, h * w]).mean_dim(2).reshape([n, c]);
        let logits = self.fc.forward(pooled);
        (
            logits,
            tapped
                .into_iter()
                .map(|t| t.expect("tap index validated at build time"))
                .collect(),
        )
    }
}
