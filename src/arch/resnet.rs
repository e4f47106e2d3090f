//! ResNets with PaddleClas's layer naming: the residual blocks form one flat list `blocks`, so
//! `return_patterns: ["blocks[7]"]` taps the output of the eighth block.
//!
//! * ImageNet ResNet18/34/50 (He et al. 2016): 7×7/2 stem + 3×3/2 max-pool, four stages.
//!   `stem: cifar` swaps in a 3×3/1 stem without max-pool (the CIFAR ResNet18/34 of KD benchmarks).
//! * PaddleClas's ResNet*_vd ("bag of tricks", He et al. 2019, legendary_models/resnet.py with
//!   `version="vd"`): a stem of three 3×3 Conv+BN+ReLU (3→32 stride 2, 32→32, 32→64), and a
//!   1×1 projection on the first block of every stage (PaddleClas's `use_first_short_conv`),
//!   preceded by a 2×2/2 average pool (ceil mode, padding excluded) except in the first stage,
//!   whose projection is a plain stride-1 1×1 conv ("if_first").
//! * Both follow PaddleClas's `use_first_short_conv` (default true: the first block of the first
//!   stage projects even where its shape does not change); `use_first_short_conv: False` gives
//!   torchvision's ResNet18/34 and timm's resnet18d/34d. ResNet50_vd is 25.58M params.
//! * CIFAR ResNets of the CRD/DKD benchmarks (resnet20/56, resnet8x4/32x4): 3×3 stem, three stages
//!   of `(depth-2)/6` basic blocks.

use super::taps::Taps;
use crate::nn::cpu_conv::ConvBackend;
use crate::nn::layers::{global_avg_pool, Act, BnMode, ConvBn};
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
    /// 1×1 projection when the shape changes (vd: on the first block of every stage).
    pub short: Option<ConvBn<B>>,
    /// vd: the projection sees a 2×2/2 average pool of the input (and runs at stride 1).
    pub short_pool: bool,
}

/// How a block's shortcut is built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shortcut {
    /// torchvision: a strided 1×1 projection only where the shape changes.
    Plain,
    /// PaddleClas vd: always a projection; average-pooled unless `first` (the first stage's).
    Vd { first: bool },
    /// PaddleClas's `use_first_short_conv` on a plain ResNet: a strided 1×1 projection even where
    /// the shape does not change (the first block of the first stage).
    Always,
}

impl Shortcut {
    fn build<B: Backend>(
        self,
        cin: usize,
        cout: usize,
        stride: usize,
        device: &B::Device,
    ) -> (Option<ConvBn<B>>, bool) {
        match self {
            Shortcut::Plain => (
                (stride != 1 || cin != cout)
                    .then(|| ConvBn::new(cin, cout, 1, stride, Act::None, device)),
                false,
            ),
            Shortcut::Always => (
                Some(ConvBn::new(cin, cout, 1, stride, Act::None, device)),
                false,
            ),
            // A stride-1 vd projection that is not the first stage's would pool with stride 1
            // in PaddleClas; no ResNet_vd has one (every later stage starts with stride 2).
            Shortcut::Vd { first } => (
                Some(ConvBn::new(cin, cout, 1, 1, Act::None, device)),
                !first && stride != 1,
            ),
        }
    }
}

impl<B: Backend> Block<B> {
    fn basic(cin: usize, cout: usize, stride: usize, sc: Shortcut, device: &B::Device) -> Self {
        let (short, short_pool) = sc.build(cin, cout, stride, device);
        Block {
            conv0: ConvBn::new(cin, cout, 3, stride, Act::Relu, device),
            conv1: ConvBn::new(cout, cout, 3, 1, Act::None, device),
            conv2: None,
            short,
            short_pool,
        }
    }

    fn bottleneck(
        cin: usize,
        width: usize,
        stride: usize,
        sc: Shortcut,
        device: &B::Device,
    ) -> Self {
        let cout = width * 4;
        let (short, short_pool) = sc.build(cin, cout, stride, device);
        Block {
            conv0: ConvBn::new(cin, width, 1, 1, Act::Relu, device),
            conv1: ConvBn::new(width, width, 3, stride, Act::Relu, device),
            conv2: Some(ConvBn::new(width, cout, 1, 1, Act::None, device)),
            short,
            short_pool,
        }
    }
}

impl<B: ConvBackend> Block<B> {
    pub fn forward(&self, x: Tensor<B, 4>, mode: BnMode) -> Tensor<B, 4> {
        let identity = match &self.short {
            // Paddle's AvgPool2D(2, 2, padding="SAME", ceil_mode=True), exclusive: on an odd
            // side the last window holds one row/column and averages only that.
            Some(s) if self.short_pool => s.forward(
                burn::tensor::module::avg_pool2d(x.clone(), [2, 2], [2, 2], [0, 0], false, true),
                mode,
            ),
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
    /// `vd`: PaddleClas's ResNet*_vd (deep stem, average-pooled projections).
    ImageNet {
        depth: usize,
        vd: bool,
    },
    Cifar {
        depth: usize,
        widen: usize,
    },
}

#[derive(Module, Debug)]
pub struct ResNet<B: Backend> {
    /// One Conv+BN+ReLU, or three for vd (PaddleClas's `stem.0` .. `stem.2`).
    pub stem: Vec<ConvBn<B>>,
    pub max_pool: bool,
    pub blocks: Vec<Block<B>>,
    pub fc: Linear<B>,
}

impl<B: Backend> ResNet<B> {
    /// `cifar_stem` only affects ImageNet-kind networks (CIFAR ones always have the 3×3 stem).
    /// `first_short_conv` is PaddleClas's `use_first_short_conv`: the first block of the first
    /// stage gets a 1×1 projection even where its shape does not change (PaddleClas's default;
    /// torchvision's and timm's ResNets have none there). It matters for the basic-block
    /// ResNets (18, 34): a bottleneck's first block changes width and always projects.
    pub fn new(
        kind: ResNetKind,
        class_num: usize,
        cifar_stem: bool,
        first_short_conv: bool,
        device: &B::Device,
    ) -> Result<Self, String> {
        let mut blocks = vec![];
        let (stem, max_pool, out) = match kind {
            ResNetKind::ImageNet { depth, vd } => {
                let (counts, bottleneck) = match depth {
                    18 => ([2, 2, 2, 2], false),
                    34 => ([3, 4, 6, 3], false),
                    50 => ([3, 4, 6, 3], true),
                    101 => ([3, 4, 23, 3], true),
                    152 => ([3, 8, 36, 3], true),
                    200 => ([3, 12, 48, 3], true),
                    d => {
                        return Err(format!(
                            "ResNet depth {d} is not one of 18, 34, 50, 101, 152, 200"
                        ))
                    }
                };
                if vd && cifar_stem {
                    return Err("stem: cifar is not available for the _vd ResNets".into());
                }
                let stem = if vd {
                    vec![
                        ConvBn::new(3, 32, 3, 2, Act::Relu, device),
                        ConvBn::new(32, 32, 3, 1, Act::Relu, device),
                        ConvBn::new(32, 64, 3, 1, Act::Relu, device),
                    ]
                } else if cifar_stem {
                    vec![ConvBn::new(3, 64, 3, 1, Act::Relu, device)]
                } else {
                    vec![ConvBn::new(3, 64, 7, 2, Act::Relu, device)]
                };
                let mut cin = 64;
                for (stage, &n) in counts.iter().enumerate() {
                    let width = 64 << stage;
                    for i in 0..n {
                        let stride = if i == 0 && stage > 0 { 2 } else { 1 };
                        let sc = match (vd, i, stage) {
                            (_, 0, 0) if !first_short_conv => Shortcut::Plain,
                            (true, 0, _) => Shortcut::Vd { first: stage == 0 },
                            (false, 0, 0) => Shortcut::Always,
                            _ => Shortcut::Plain,
                        };
                        if bottleneck {
                            blocks.push(Block::bottleneck(cin, width, stride, sc, device));
                            cin = width * 4;
                        } else {
                            blocks.push(Block::basic(cin, width, stride, sc, device));
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
                let stem = vec![ConvBn::new(3, widths[0], 3, 1, Act::Relu, device)];
                let mut cin = widths[0];
                for stage in 0..3 {
                    for i in 0..n {
                        let stride = if i == 0 && stage > 0 { 2 } else { 1 };
                        let sc = Shortcut::Plain;
                        blocks.push(Block::basic(cin, widths[stage + 1], stride, sc, device));
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

    /// Feature taps in forward order: `blocks[0]` .. `blocks[n-1]`, then `avg_pool` (the
    /// globally pooled features, `[N, C, 1, 1]`).
    pub fn tap_names(&self) -> Vec<String> {
        super::taps::block_list_taps(self.blocks.len())
    }

    /// PaddleClas's `stages_pattern`: the last block of each stage.
    pub fn stage_names(&self) -> Vec<String> {
        let mut names = vec![];
        for (i, b) in self.blocks.iter().enumerate().skip(1) {
            // A stage starts where the block changes the shape (its shortcut projects).
            if b.short.is_some() {
                names.push(format!("blocks[{}]", i - 1));
            }
        }
        names.push(format!("blocks[{}]", self.blocks.len() - 1));
        names
    }
}

impl<B: ConvBackend> ResNet<B> {
    /// Logits, plus the taps whose indices (into [`Self::tap_names`]) are in `taps`, in the
    /// order given.
    pub fn forward(
        &self,
        x: Tensor<B, 4>,
        mode: BnMode,
        taps: &[usize],
    ) -> (Tensor<B, 2>, Vec<Tensor<B, 4>>) {
        let mut taps = Taps::new(taps);
        let mut x = x;
        for conv in &self.stem {
            x = conv.forward(x, mode);
        }
        if self.max_pool {
            x = burn::tensor::module::max_pool2d(x, [3, 3], [2, 2], [1, 1], [1, 1], false);
        }
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(x, mode);
            taps.offer(i, &x);
        }
        let pooled = global_avg_pool(x);
        taps.offer(self.blocks.len(), &pooled);
        let [n, c, _, _] = pooled.dims();
        let logits = self.fc.forward(pooled.reshape([n, c]));
        (logits, taps.finish())
    }
}
