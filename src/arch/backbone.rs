//! The backbone registry: config names (`Arch.name` / `Arch.models[i].<Key>.name`) to networks,
//! their config keys, and their feature taps.

use super::mobilenet_v3::{MobileNetV3, MobileNetV3Size};
use super::pplcnet::PPLCNet;
use super::resnet::{ResNet, ResNetKind};
use super::ModelOutput;
use super::ModelSpec;
use crate::nn::cpu_conv::ConvBackend;
use crate::nn::layers::BnMode;
use anyhow::{anyhow, Result};
use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use serde_yaml::Value;

/// Backbone names the registry knows.
pub const BACKBONES: &[&str] = &[
    "ResNet18",
    "ResNet34",
    "ResNet50",
    "ResNet101",
    "ResNet152",
    "ResNet18_vd",
    "ResNet34_vd",
    "ResNet50_vd",
    "ResNet101_vd",
    "ResNet152_vd",
    "ResNet200_vd",
    "PPLCNet_x0_25",
    "PPLCNet_x0_35",
    "PPLCNet_x0_5",
    "PPLCNet_x0_75",
    "PPLCNet_x1_0",
    "PPLCNet_x1_5",
    "PPLCNet_x2_0",
    "PPLCNet_x2_5",
    "MobileNetV3_large_x0_35",
    "MobileNetV3_large_x0_5",
    "MobileNetV3_large_x0_75",
    "MobileNetV3_large_x1_0",
    "MobileNetV3_large_x1_25",
    "MobileNetV3_small_x0_35",
    "MobileNetV3_small_x0_5",
    "MobileNetV3_small_x0_75",
    "MobileNetV3_small_x1_0",
    "MobileNetV3_small_x1_25",
    "resnet8",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet8x4",
    "resnet32x4",
];

/// PaddleClas backbones that PaddleClas distillation configs use but kd-launch does not build:
/// named so that `kd-launch check` says so rather than "unknown backbone".
pub const NOT_IMPLEMENTED: &[&str] = &["Res2Net200_vd_26w_4s", "PPHGNet_base"];

/// Which network a registry name denotes.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    ResNet(ResNetKind),
    PPLCNet { scale: f64 },
    MobileNetV3 { size: MobileNetV3Size, scale: f64 },
}

/// `x1_25` → 1.25.
fn scale(s: &str) -> Option<f64> {
    s.strip_prefix('x')?.replace('_', ".").parse().ok()
}

fn kind(name: &str) -> Option<Kind> {
    if let Some(s) = name.strip_prefix("PPLCNet_") {
        return scale(s).map(|scale| Kind::PPLCNet { scale });
    }
    if let Some(rest) = name.strip_prefix("MobileNetV3_") {
        let (size, s) = rest.split_once('_')?;
        let size = match size {
            "large" => MobileNetV3Size::Large,
            "small" => MobileNetV3Size::Small,
            _ => return None,
        };
        return scale(s).map(|scale| Kind::MobileNetV3 { size, scale });
    }
    let depth = |s: &str| s.parse::<usize>().ok();
    if let Some(rest) = name.strip_prefix("ResNet") {
        let (d, vd) = match rest.strip_suffix("_vd") {
            Some(d) => (d, true),
            None => (rest, false),
        };
        return depth(d).map(|depth| Kind::ResNet(ResNetKind::ImageNet { depth, vd }));
    }
    let rest = name.strip_prefix("resnet")?;
    let cifar = match rest.strip_suffix("x4") {
        Some(d) => depth(d).map(|d| ResNetKind::Cifar { depth: d, widen: 4 }),
        None => depth(rest).map(|d| ResNetKind::Cifar { depth: d, widen: 1 }),
    };
    cifar.map(Kind::ResNet)
}

/// A network from the registry. (Variants differ in size; burn modules cannot be boxed, and a
/// backbone is built once and moved rarely.)
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Backbone<B: Backend> {
    ResNet(ResNet<B>),
    PPLCNet(PPLCNet<B>),
    MobileNetV3(MobileNetV3<B>),
}

impl<B: Backend> Backbone<B> {
    /// Builds the backbone named in `spec`. Unknown names list the known ones; PaddleClas
    /// backbones kd-launch does not implement say so. The model entry's keys are read here (or
    /// in `arch::config`); the unknown-key report names any other, which kd-launch ignores
    /// (PaddleClas's constructors refuse them; its MobileNetV3 drops them).
    pub fn from_spec(spec: &ModelSpec, device: &B::Device) -> Result<Self> {
        let p = &spec.params;
        let err = |m: String| anyhow!("{}", p.error(m));
        let name = spec.name.as_str();
        if NOT_IMPLEMENTED.contains(&name) {
            return Err(err(format!(
                "backbone {name:?} (a PaddleClas backbone) is not implemented in kd-launch"
            )));
        }
        let kind = BACKBONES
            .contains(&name)
            .then(|| kind(name))
            .flatten()
            .ok_or_else(|| {
                err(format!(
                    "unknown backbone {name:?}; known backbones: {}",
                    BACKBONES.join(", ")
                ))
            })?;
        if spec.class_num == 0 {
            return Err(err("class_num must be at least 1".into()));
        }
        reject_non_default(spec)?;
        // Which released weights `pretrained: True` loads (see `import::released_file_name`);
        // read here too so that a bad value fails before any work, whatever `pretrained` says.
        p.bool_or("use_ssld", false)?;
        let is_resnet = matches!(kind, Kind::ResNet(_));
        if !is_resnet {
            if let Some(n) = p.get("stem") {
                return Err(anyhow!("{}", n.error("`stem` applies to the ResNets only")));
            }
        }
        let backbone = match kind {
            Kind::ResNet(k) => {
                let stem = p.str_or("stem", "imagenet")?;
                let cifar_stem = match stem.as_str() {
                    "imagenet" => false,
                    "cifar" => true,
                    other => {
                        return Err(err(format!(
                            "stem must be imagenet or cifar, got {other:?}"
                        )))
                    }
                };
                // PaddleClas's default; the CIFAR stem comes from the CRD/DKD repositories,
                // whose ResNets (torchvision's) project only where the shape changes.
                let first_short_conv = p.bool_or("use_first_short_conv", !cifar_stem)?;
                Backbone::ResNet(
                    ResNet::new(k, spec.class_num, cifar_stem, first_short_conv, device)
                        .map_err(err)?,
                )
            }
            Kind::PPLCNet { scale } => Backbone::PPLCNet(PPLCNet::new(
                scale,
                spec.class_num,
                dropout_prob(spec)?,
                class_expand(spec)?,
                p.bool_or("use_last_conv", true)?,
                device,
            )),
            Kind::MobileNetV3 { size, scale } => Backbone::MobileNetV3(MobileNetV3::new(
                size,
                scale,
                spec.class_num,
                dropout_prob(spec)?,
                class_expand(spec)?,
                device,
            )),
        };
        // Parameters are initialised lazily; touch them all now, in a fixed order, so a seeded run
        // gets the same weights whatever is cloned later.
        let _ = backbone.num_params();
        Ok(backbone)
    }

    /// The names a `return_patterns` entry can take, in forward order; [`Self::forward`]'s
    /// `taps` index this list (see [`super::parse_taps`]).
    pub fn tap_names(&self) -> Vec<String> {
        match self {
            Backbone::ResNet(r) => r.tap_names(),
            Backbone::PPLCNet(m) => m.tap_names(),
            Backbone::MobileNetV3(m) => m.tap_names(),
        }
    }

    /// PaddleClas's `stages_pattern` (what `return_stages` selects from).
    pub fn stage_names(&self) -> Vec<String> {
        match self {
            Backbone::ResNet(r) => r.stage_names(),
            Backbone::PPLCNet(m) => m.stage_names(),
            Backbone::MobileNetV3(m) => m.stage_names(),
        }
    }

    /// Trainable parameters: `num_params` minus BatchNorm running statistics.
    pub fn num_trainable_params(&self) -> usize {
        #[derive(Default)]
        struct Count {
            path: Vec<String>,
            total: usize,
        }
        impl<B: Backend> burn::module::ModuleVisitor<B> for Count {
            fn enter_module(&mut self, name: &str, _container: &str) {
                self.path.push(name.to_string());
            }
            fn exit_module(&mut self, _name: &str, _container: &str) {
                self.path.pop();
            }
            fn visit_float<const D: usize>(&mut self, p: &burn::module::Param<Tensor<B, D>>) {
                let running = self.path.last().is_some_and(|n| n.starts_with("running_"));
                if !running {
                    self.total += p.shape().num_elements();
                }
            }
        }
        let mut c = Count::default();
        self.visit(&mut c);
        c.total
    }
}

impl<B: ConvBackend> Backbone<B> {
    /// Logits and the features at `taps` (indices into [`Self::tap_names`]), in that order.
    /// `mode` drives BatchNorm and dropout alike (`Train`: batch statistics, dropout on).
    pub fn forward(&self, x: Tensor<B, 4>, mode: BnMode, taps: &[usize]) -> ModelOutput<B> {
        let (logits, features) = match self {
            Backbone::ResNet(r) => r.forward(x, mode, taps),
            Backbone::PPLCNet(m) => m.forward(x, mode, taps),
            Backbone::MobileNetV3(m) => m.forward(x, mode, taps),
        };
        ModelOutput {
            logits,
            features,
            feature_names: vec![],
        }
    }
}

/// `dropout_prob` of PP-LCNet / MobileNetV3: 0.2 when absent, no dropout when null (PaddleClas
/// builds no Dropout layer then), else a probability in `[0, 1)`.
fn dropout_prob(spec: &ModelSpec) -> Result<f64> {
    let prob = match spec.params.get_or_null("dropout_prob") {
        None => 0.2,
        Some(n) if n.value.is_null() => 0.0,
        Some(n) => n.as_f64()?,
    };
    if !(0.0..1.0).contains(&prob) {
        let n = spec.params.require("dropout_prob")?;
        return Err(anyhow!(
            "{}",
            n.error(format!("must be in [0, 1), got {prob}"))
        ));
    }
    Ok(prob)
}

/// `class_expand`: channels of the last 1×1 conv before `fc` (PaddleClas default 1280).
fn class_expand(spec: &ModelSpec) -> Result<usize> {
    let c = spec.params.usize_or("class_expand", 1280)?;
    if c == 0 {
        let n = spec.params.require("class_expand")?;
        return Err(anyhow!("{}", n.error("must be at least 1")));
    }
    Ok(c)
}

/// PaddleClas constructor arguments that change the network or its training and that kd-launch
/// does not implement: an error unless they hold PaddleClas's default (five stage strides of 2;
/// a learning-rate multiplier of 1 per stage, six for PP-LCNet), so a config is never silently
/// trained as a different model. PaddleClas's MobileNetV3 takes neither (it drops unknown keys).
fn reject_non_default(spec: &ModelSpec) -> Result<()> {
    let all = |v: &Value, len: usize, x: f64| {
        v.as_sequence()
            .is_some_and(|s| s.len() == len && s.iter().all(|e| e.as_f64() == Some(x)))
    };
    let stages = if spec.name.starts_with("PPLCNet") {
        6
    } else {
        5
    };
    // Other constructor arguments: only their defaults are implemented.
    let defaults: &[(&str, Value)] = &[
        ("act", Value::from("hard_swish")),
        ("stem_act", Value::from("relu")),
        ("layer_type", Value::from("ConvBNLayer")),
        ("input_image_channel", Value::from(3)),
        ("inplanes", Value::from(16)),
        ("stop_after", Value::Null),
        ("freeze_befor", Value::Null),
    ];
    for (key, default) in defaults {
        if let Some(n) = spec.params.get(key) {
            if n.value != *default && !(default.is_null() && n.value.is_null()) {
                return Err(anyhow!(
                    "{}",
                    n.error(format!(
                        "only PaddleClas's default ({}) is implemented in kd-launch (backbone {})",
                        serde_yaml::to_string(default).unwrap_or_default().trim(),
                        spec.name
                    ))
                ));
            }
        }
    }
    if spec.name.starts_with("MobileNetV3") {
        return Ok(());
    }
    for key in ["stride_list", "lr_mult_list"] {
        let Some(n) = spec.params.get(key) else {
            continue;
        };
        let default = match key {
            "stride_list" => all(&n.value, 5, 2.0),
            _ => all(&n.value, stages, 1.0),
        };
        if !default {
            return Err(anyhow!(
                "{}",
                n.error(format!(
                    "values other than PaddleClas's default are not implemented in kd-launch \
                     (backbone {})",
                    spec.name
                ))
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::tests::spec;
    use crate::arch::{parse_taps, taps};
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::Distribution;

    fn build(name: &str, classes: usize, extra: &str) -> Backbone<Flex> {
        Backbone::<Flex>::from_spec(&spec(name, classes, extra), &Default::default()).unwrap()
    }

    fn params(name: &str, classes: usize, extra: &str) -> usize {
        build(name, classes, extra).num_trainable_params()
    }

    fn build_error(name: &str, extra: &str) -> String {
        Backbone::<Flex>::from_spec(&spec(name, 10, extra), &Default::default())
            .unwrap_err()
            .to_string()
    }

    /// Counts of the published architectures: torchvision for the plain ImageNet ResNets; the
    /// CRD/DKD repositories' CIFAR ResNets at 100 classes; PaddleClas's ResNet_vd, PP-LCNet and
    /// MobileNetV3 as re-stated in tools/count_params.py. PaddleClas's docs give 25.58M
    /// (ResNet50_vd, ResNet_and_vd_en.md), 2.96M / 9.04M (PPLCNet_x1_0 / x2_5, counting BN
    /// running statistics: 2.963M / 9.045M) and 5.47M / 2.94M (MobileNetV3 large / small x1_0,
    /// leaving out conv and fc biases: 5.474M / 2.936M).
    #[test]
    fn parameter_counts_match_the_reference_architectures() {
        let torchvision = ", use_first_short_conv: False";
        assert_eq!(params("ResNet18", 1000, torchvision), 11_689_512);
        assert_eq!(params("ResNet34", 1000, torchvision), 21_797_672);
        assert_eq!(params("ResNet50", 1000, torchvision), 25_557_032);
        // PaddleClas's default adds a 64→64 1×1 conv + BatchNorm to the first block of
        // ResNet18/34 (4,096 + 128 parameters); ResNet50's first block projects anyway.
        assert_eq!(params("ResNet18", 1000, ""), 11_689_512 + 4_224);
        assert_eq!(params("ResNet34", 1000, ""), 21_797_672 + 4_224);
        assert_eq!(params("ResNet50", 1000, ""), 25_557_032);
        assert_eq!(params("resnet8x4", 100, ""), 1_233_540);
        assert_eq!(params("resnet32x4", 100, ""), 7_433_860);
        assert_eq!(params("resnet20", 100, ""), 278_324);
        assert_eq!(params("resnet56", 100, ""), 861_620);
        // kuangliu-style CIFAR ResNet18 (3x3 stem, no max-pool).
        assert_eq!(params("ResNet18", 100, ", stem: cifar"), 11_220_132);
        assert_eq!(params("ResNet18_vd", 1000, ""), 11_712_968);
        assert_eq!(params("ResNet34_vd", 1000, ""), 21_821_128);
        assert_eq!(params("ResNet50_vd", 1000, ""), 25_576_264);
        assert_eq!(params("ResNet101_vd", 1000, ""), 44_568_392);
        assert_eq!(params("PPLCNet_x0_25", 1000, ""), 1_521_184);
        assert_eq!(params("PPLCNet_x0_35", 1000, ""), 1_643_090);
        assert_eq!(params("PPLCNet_x0_5", 1000, ""), 1_879_576);
        assert_eq!(params("PPLCNet_x0_75", 1000, ""), 2_357_008);
        assert_eq!(params("PPLCNet_x1_0", 1000, ""), 2_952_520);
        assert_eq!(params("PPLCNet_x1_5", 1000, ""), 4_499_832);
        assert_eq!(params("PPLCNet_x2_0", 1000, ""), 6_521_512);
        assert_eq!(params("PPLCNet_x2_5", 1000, ""), 9_017_560);
        assert_eq!(params("MobileNetV3_large_x0_35", 1000, ""), 2_104_328);
        assert_eq!(params("MobileNetV3_large_x1_0", 1000, ""), 5_480_206);
        assert_eq!(params("MobileNetV3_large_x1_25", 1000, ""), 7_443_308);
        assert_eq!(params("MobileNetV3_small_x0_5", 1000, ""), 1_902_536);
        assert_eq!(params("MobileNetV3_small_x1_0", 1000, ""), 2_939_958);
        assert_eq!(params("MobileNetV3_small_x1_25", 1000, ""), 3_627_370);
    }

    #[test]
    fn every_registered_name_builds() {
        for name in BACKBONES {
            // The deep ones are covered by their shallower siblings (same code, more blocks).
            if ["ResNet152", "ResNet152_vd", "ResNet200_vd"].contains(name) {
                continue;
            }
            let m = Backbone::<Flex>::from_spec(&spec(name, 3, ""), &Default::default());
            assert!(m.is_ok(), "{name}: {}", m.unwrap_err());
        }
    }

    #[test]
    fn unknown_backbone_lists_known_ones() {
        let e = build_error("ResNet19", "");
        assert!(
            e.contains("unknown backbone") && e.contains("resnet8x4") && e.contains("PPLCNet_x1_0"),
            "{e}"
        );
    }

    #[test]
    fn paddleclas_backbones_without_an_implementation_say_so() {
        for name in ["Res2Net200_vd_26w_4s", "PPHGNet_base"] {
            let e = build_error(name, "");
            assert!(
                e.contains(name) && e.contains("not implemented in kd-launch"),
                "{e}"
            );
            assert!(!e.contains("unknown backbone"), "{e}");
        }
    }

    #[test]
    fn config_keys() {
        // use_ssld only picks released weights; default stride/lr lists are accepted.
        let ok = ", use_ssld: True, stride_list: [2, 2, 2, 2, 2], lr_mult_list: [1.0, 1, 1, 1, 1]";
        assert!(
            Backbone::<Flex>::from_spec(&spec("ResNet50_vd", 10, ok), &Default::default()).is_ok()
        );
        let e = build_error(
            "PPLCNet_x1_0",
            ", stride_list: [2, [2, 1], [2, 1], [2, 1], [2, 1]]",
        );
        assert!(
            e.contains("stride_list") && e.contains("not implemented"),
            "{e}"
        );
        let e = build_error("ResNet50_vd", ", lr_mult_list: [0.1, 0.1, 0.2, 0.2, 0.3]");
        assert!(e.contains("lr_mult_list"), "{e}");
        assert!(build_error("PPLCNet_x1_0", ", stem: cifar").contains("ResNets only"));
        assert!(build_error("ResNet50_vd", ", stem: cifar").contains("_vd"));
        assert!(build_error("PPLCNet_x1_0", ", dropout_prob: 1.5").contains("[0, 1)"));
        // Dropout: 0.2 by default, none for null (PaddleClas builds no layer), else as given.
        let prob = |extra: &str| match build("MobileNetV3_small_x1_0", 10, extra) {
            Backbone::MobileNetV3(m) => m.dropout.prob,
            _ => unreachable!(),
        };
        assert_eq!(prob(""), 0.2);
        assert_eq!(prob(", dropout_prob: null"), 0.0);
        assert_eq!(prob(", dropout_prob: 0.5"), 0.5);
        match build(
            "PPLCNet_x0_25",
            10,
            ", use_last_conv: False, class_expand: 640",
        ) {
            Backbone::PPLCNet(m) => {
                assert!(m.last_conv.is_none());
                assert_eq!(m.fc.weight.dims(), [128, 10]);
            }
            _ => unreachable!(),
        }
    }

    /// Tap shapes at 2×3×32×32, as tools/count_params.py prints them.
    #[test]
    fn taps_return_the_named_outputs() {
        /// Backbone, return_patterns, expected `[C, H, W]` of each.
        type Case<'a> = (&'a str, &'a [&'a str], &'a [[usize; 3]]);
        let cases: &[Case] = &[
            (
                "resnet8x4",
                &["blocks[2]", "blocks0", "avg_pool"],
                &[[256, 8, 8], [64, 32, 32], [256, 1, 1]],
            ),
            (
                "ResNet50_vd",
                &["blocks[0]", "blocks[3]", "blocks[15]", "avg_pool"],
                &[[256, 8, 8], [512, 4, 4], [2048, 1, 1], [2048, 1, 1]],
            ),
            (
                "PPLCNet_x1_0",
                &["blocks3", "blocks4", "blocks5", "blocks6", "blocks2"],
                &[
                    [64, 8, 8],
                    [128, 4, 4],
                    [256, 2, 2],
                    [512, 1, 1],
                    [32, 16, 16],
                ],
            ),
            (
                "PPLCNet_x2_5",
                &["blocks6", "avg_pool"],
                &[[1280, 1, 1], [1280, 1, 1]],
            ),
            (
                "MobileNetV3_large_x1_0",
                &["blocks[0]", "blocks[5]", "blocks[14]", "avg_pool"],
                &[[16, 16, 16], [40, 4, 4], [160, 1, 1], [960, 1, 1]],
            ),
            (
                "MobileNetV3_small_x1_0",
                &["blocks[0]", "blocks[7]", "blocks[10]"],
                &[[16, 8, 8], [48, 2, 2], [96, 1, 1]],
            ),
        ];
        let x = Tensor::<Flex, 4>::random(
            [2, 3, 32, 32],
            Distribution::Normal(0.0, 1.0),
            &Default::default(),
        );
        for &(name, patterns, shapes) in cases {
            let mut s = spec(name, 10, "");
            s.return_patterns = patterns.iter().map(|p| p.to_string()).collect();
            let m = Backbone::<Flex>::from_spec(&s, &Default::default()).unwrap();
            let taps = parse_taps(&s, &m.tap_names()).unwrap();
            for mode in [BnMode::Train, BnMode::Eval] {
                let out = m.forward(x.clone(), mode, &taps);
                assert_eq!(out.logits.dims(), [2, 10], "{name}");
                let got: Vec<[usize; 3]> = out
                    .features
                    .iter()
                    .map(|f| {
                        let [n, c, h, w] = f.dims();
                        assert_eq!(n, 2);
                        [c, h, w]
                    })
                    .collect();
                assert_eq!(got, shapes, "{name}");
            }
        }
    }

    #[test]
    fn an_unknown_tap_lists_the_valid_ones() {
        let bad = |name: &str, pattern: &str| {
            let mut s = spec(name, 10, "");
            s.return_patterns = vec![pattern.into()];
            let m = Backbone::<Flex>::from_spec(&s, &Default::default()).unwrap();
            parse_taps(&s, &m.tap_names()).unwrap_err().to_string()
        };
        let e = bad("resnet8x4", "blocks[3]");
        assert!(e.contains("blocks[0] .. blocks[2], avg_pool"), "{e}");
        let e = bad("PPLCNet_x1_0", "blocks[3]");
        assert!(
            e.contains("blocks2, blocks3, blocks4, blocks5, blocks6, avg_pool"),
            "{e}"
        );
        let e = bad("MobileNetV3_small_x1_0", "blocks[11]");
        assert!(e.contains("blocks[0] .. blocks[10]"), "{e}");
    }

    #[test]
    fn return_stages_picks_paddleclas_stages_pattern() {
        let stages = |name: &str, extra: &str| {
            let s = spec(name, 10, extra);
            let m = Backbone::<Flex>::from_spec(&s, &Default::default()).unwrap();
            taps::resolve_return_patterns(&s, &m.stage_names()).map_err(|e| e.to_string())
        };
        let v = |x: &[&str]| Ok(x.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            stages("ResNet18_vd", ", return_stages: True"),
            v(&["blocks[1]", "blocks[3]", "blocks[5]", "blocks[7]"])
        );
        assert_eq!(
            stages("ResNet50", ", return_stages: True"),
            v(&["blocks[2]", "blocks[6]", "blocks[12]", "blocks[15]"])
        );
        assert_eq!(
            stages("PPLCNet_x1_0", ", return_stages: [1, 4]"),
            v(&["blocks3", "blocks6"])
        );
        assert_eq!(
            stages("MobileNetV3_large_x1_0", ", return_stages: 3"),
            v(&["blocks[11]"])
        );
        assert_eq!(
            stages("MobileNetV3_small_x1_0", ", return_stages: True"),
            v(&["blocks[0]", "blocks[2]", "blocks[7]", "blocks[10]"])
        );
        assert!(stages("PPLCNet_x1_0", ", return_stages: [5]")
            .unwrap_err()
            .contains("stage 5"));
        // return_patterns win over return_stages, as in PaddleClas.
        let mut s = spec("PPLCNet_x1_0", 10, ", return_stages: True");
        s.return_patterns = vec!["blocks4".into()];
        assert_eq!(
            taps::resolve_return_patterns(&s, &["blocks2".into()]).unwrap(),
            vec!["blocks4".to_string()]
        );
    }

    /// vd shortcut pooling on odd sides (ceil mode) keeps the shortcut and the strided 3×3 conv
    /// of the same size.
    #[test]
    fn resnet_vd_runs_on_odd_feature_sizes() {
        let mut s = spec("ResNet18_vd", 10, "");
        s.return_patterns = vec!["blocks[2]".into(), "blocks[7]".into()];
        let m = Backbone::<Flex>::from_spec(&s, &Default::default()).unwrap();
        let taps = parse_taps(&s, &m.tap_names()).unwrap();
        // 36 → stem 18 → max-pool 9 → 5 → 3 → 2.
        let x = Tensor::<Flex, 4>::ones([1, 3, 36, 36], &Default::default());
        let out = m.forward(x, BnMode::Eval, &taps);
        assert_eq!(out.features[0].dims(), [1, 128, 5, 5]);
        assert_eq!(out.features[1].dims(), [1, 512, 2, 2]);
    }

    /// Constructor arguments kd-launch does not implement are errors unless they hold the default.
    #[test]
    fn non_default_constructor_arguments_are_refused() {
        let d = Default::default();
        for (name, extra, ok) in [
            ("PPLCNet_x1_0", ", act: relu", false),
            ("PPLCNet_x1_0", ", act: hard_swish", true),
            ("ResNet50_vd", ", stop_after: \"blocks[3]\"", false),
            ("ResNet50_vd", ", stop_after: null", true),
            ("MobileNetV3_small_x1_0", ", inplanes: 32", false),
        ] {
            let r = Backbone::<Flex>::from_spec(&spec(name, 10, extra), &d);
            match (ok, r) {
                (true, r) => assert!(r.is_ok(), "{name}{extra}: {:?}", r.err()),
                (false, Ok(_)) => panic!("{name}{extra} accepted"),
                (false, Err(e)) => assert!(e.to_string().contains("default"), "{e}"),
            }
        }
    }

    /// Paddle's `downscale_in_infer` dropout: no rescaling in training, × (1 - p) in evaluation.
    #[test]
    fn paddle_dropout_scales_at_inference_only() {
        let d = crate::nn::layers::PaddleDropout { prob: 0.25 };
        let x = Tensor::<Flex, 2>::ones([64, 64], &Default::default());
        let eval: Vec<f32> = d
            .forward(x.clone(), BnMode::Eval)
            .into_data()
            .to_vec()
            .unwrap();
        assert!(eval.iter().all(|v| (*v - 0.75).abs() < 1e-6));
        let train: Vec<f32> = d.forward(x, BnMode::Train).into_data().to_vec().unwrap();
        assert!(train.iter().all(|v| *v == 0.0 || *v == 1.0));
        let kept = train.iter().filter(|v| **v == 1.0).count() as f64 / train.len() as f64;
        assert!((kept - 0.75).abs() < 0.05, "{kept}");
    }

    /// One training step's forward and backward on the CPU autodiff backend: finite gradients
    /// everywhere, grouped (depthwise) convolutions included. Prints the time of a step at
    /// batch 8, 32×32 (`cargo test ... -- --nocapture`).
    #[test]
    fn forward_backward_gives_finite_gradients() {
        type Ad = Autodiff<Flex>;
        let device = Default::default();
        for name in ["PPLCNet_x1_0", "MobileNetV3_small_x1_0", "ResNet18_vd"] {
            let mut s = spec(name, 10, "");
            s.return_patterns = match name {
                "PPLCNet_x1_0" => vec!["blocks4".into()],
                _ => vec!["blocks[1]".into()],
            };
            let m = Backbone::<Ad>::from_spec(&s, &device).unwrap();
            let taps = parse_taps(&s, &m.tap_names()).unwrap();
            let x =
                Tensor::<Ad, 4>::random([8, 3, 32, 32], Distribution::Normal(0.0, 1.0), &device);
            let mut times = vec![];
            for _ in 0..3 {
                let start = std::time::Instant::now();
                let out = m.forward(x.clone(), BnMode::Train, &taps);
                let loss = out.logits.square().mean() + out.features[0].clone().mean();
                let grads = loss.backward();
                times.push(start.elapsed().as_secs_f64() * 1e3);
                let gp = burn::optim::GradientsParams::from_grads(grads, &m);
                // Every trainable parameter got a finite gradient.
                struct Check<'a> {
                    grads: &'a burn::optim::GradientsParams,
                    seen: usize,
                    path: Vec<String>,
                }
                impl burn::module::ModuleVisitor<Ad> for Check<'_> {
                    fn enter_module(&mut self, name: &str, _: &str) {
                        self.path.push(name.into());
                    }
                    fn exit_module(&mut self, _: &str, _: &str) {
                        self.path.pop();
                    }
                    fn visit_float<const D: usize>(
                        &mut self,
                        p: &burn::module::Param<Tensor<Ad, D>>,
                    ) {
                        if self.path.last().is_some_and(|n| n.starts_with("running_")) {
                            return;
                        }
                        let g = self.grads.get::<Flex, D>(p.id);
                        let name = self.path.join(".");
                        let g = g.unwrap_or_else(|| panic!("{name}: no gradient"));
                        let v: Vec<f32> = g.into_data().to_vec().unwrap();
                        assert!(
                            v.iter().all(|x| x.is_finite()),
                            "{name}: non-finite gradient"
                        );
                        self.seen += 1;
                    }
                }
                let mut check = Check {
                    grads: &gp,
                    seen: 0,
                    path: vec![],
                };
                m.visit(&mut check);
                assert!(check.seen > 10, "{name}");
            }
            eprintln!(
                "{name}: forward+backward at 8x3x32x32: {:.0} ms (first {:.0} ms)",
                times[1..].iter().sum::<f64>() / (times.len() - 1) as f64,
                times[0]
            );
        }
    }
}
