//! Backbones (the registry from config names), their feature taps, and the distillation model: a
//! set of named sub-models, some frozen, whose outputs the losses read by name and key.

pub mod cpu_conv;
pub mod layers;
pub mod resnet;
pub mod weights;

use crate::config::{ArchConfig, ModelSpec};
use anyhow::{anyhow, bail, Context, Result};
use burn::module::{AutodiffModule, Module};
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
pub use layers::BnMode;
use resnet::{ResNet, ResNetKind};
use std::collections::BTreeMap;
use std::path::Path;

/// Backbone names the registry knows, as written in `Arch.name` / `Arch.models[i].<Key>.name`.
pub const BACKBONES: &[&str] = &[
    "ResNet18",
    "ResNet34",
    "ResNet50",
    "ResNet101",
    "ResNet152",
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

fn resnet_kind(name: &str) -> Option<ResNetKind> {
    let depth = |s: &str| s.parse::<usize>().ok();
    if let Some(d) = name.strip_prefix("ResNet").and_then(depth) {
        return Some(ResNetKind::ImageNet { depth: d });
    }
    let rest = name.strip_prefix("resnet")?;
    match rest.strip_suffix("x4") {
        Some(d) => depth(d).map(|d| ResNetKind::Cifar { depth: d, widen: 4 }),
        None => depth(rest).map(|d| ResNetKind::Cifar { depth: d, widen: 1 }),
    }
}

#[derive(Module, Debug)]
pub enum Backbone<B: Backend> {
    ResNet(ResNet<B>),
}

impl<B: Backend> Backbone<B> {
    /// Builds the backbone named in `spec` (unknown names list the known ones).
    pub fn from_spec(spec: &ModelSpec, device: &B::Device) -> Result<Self> {
        let err = |m: String| anyhow!("{}", spec.params.error(m));
        let kind = BACKBONES
            .contains(&spec.name.as_str())
            .then(|| resnet_kind(&spec.name))
            .flatten()
            .ok_or_else(|| {
                err(format!(
                    "unknown backbone {:?}; known backbones: {}",
                    spec.name,
                    BACKBONES.join(", ")
                ))
            })?;
        let stem = spec.params.str_or("stem", "imagenet")?;
        let cifar_stem = match stem.as_str() {
            "imagenet" => false,
            "cifar" => true,
            other => {
                return Err(err(format!(
                    "stem must be imagenet or cifar, got {other:?}"
                )))
            }
        };
        if spec.class_num == 0 {
            return Err(err("class_num must be at least 1".into()));
        }
        let net = ResNet::new(kind, spec.class_num, cifar_stem, device).map_err(err)?;
        let backbone = Backbone::ResNet(net);
        // Parameters are initialised lazily; touch them all now, in a fixed order, so a seeded run
        // gets the same weights whatever is cloned later.
        let _ = backbone.num_params();
        Ok(backbone)
    }

    pub fn num_blocks(&self) -> usize {
        match self {
            Backbone::ResNet(r) => r.blocks.len(),
        }
    }

    pub fn forward(&self, x: Tensor<B, 4>, mode: BnMode, taps: &[usize]) -> ModelOutput<B> {
        match self {
            Backbone::ResNet(r) => {
                let (logits, feats) = r.forward(x, mode, taps);
                ModelOutput {
                    logits,
                    features: feats,
                    feature_names: vec![],
                }
            }
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

/// What one model returns: logits and the tapped feature maps (in `return_patterns` order).
#[derive(Clone, Debug)]
pub struct ModelOutput<B: Backend> {
    pub logits: Tensor<B, 2>,
    pub features: Vec<Tensor<B, 4>>,
    /// The `return_patterns` the features answer to, in the same order.
    pub feature_names: Vec<String>,
}

impl<B: Backend> ModelOutput<B> {
    /// The feature map tapped under `name` (a `return_patterns` entry).
    pub fn feature(&self, name: &str) -> Option<&Tensor<B, 4>> {
        self.feature_names
            .iter()
            .position(|n| n == name)
            .map(|i| &self.features[i])
    }
}

/// Parses `return_patterns` (`blocks[i]` or `blocksN`) into block indices.
pub fn parse_taps(spec: &ModelSpec, num_blocks: usize) -> Result<Vec<usize>> {
    spec.return_patterns
        .iter()
        .map(|p| {
            let idx = p
                .strip_prefix("blocks[")
                .and_then(|s| s.strip_suffix(']'))
                .or_else(|| p.strip_prefix("blocks"))
                .and_then(|s| s.parse::<usize>().ok());
            match idx {
                Some(i) if i < num_blocks => Ok(i),
                _ => Err(anyhow!(
                    "{}",
                    spec.params.error(format!(
                        "return_patterns: {p:?} is not a layer of {}; valid: blocks[0] .. blocks[{}]",
                        spec.name,
                        num_blocks - 1
                    ))
                )),
            }
        })
        .collect()
}

/// The models a trainer optimises, as one module so one optimizer and one record cover them.
#[derive(Module, Debug)]
pub struct TrainableSet<B: Backend> {
    pub models: Vec<Backbone<B>>,
}

/// Where a named model lives and what it returns.
#[derive(Clone, Debug)]
pub struct ModelSlot {
    pub key: String,
    pub spec: ModelSpec,
    pub taps: Vec<usize>,
    /// Index into `trainable.models` or `frozen`.
    pub index: usize,
}

/// A DistillationModel (or a single backbone): named sub-models, frozen ones kept off the
/// autodiff graph on the inner backend.
pub struct DistillationModel<B: AutodiffBackend> {
    pub trainable: TrainableSet<B>,
    pub frozen: Vec<Backbone<B::InnerBackend>>,
    pub slots: Vec<ModelSlot>,
    pub infer_model_name: String,
    /// BatchNorm mode of frozen models during training (eval unless the PaddleClas flag is set).
    pub frozen_bn: BnMode,
}

pub type Outputs<B> = BTreeMap<String, ModelOutput<B>>;

pub(crate) fn recorder() -> NamedMpkFileRecorder<FullPrecisionSettings> {
    NamedMpkFileRecorder::new()
}

/// Loads a record into `model`, refusing one written for another architecture: burn's own
/// loading asserts (panics) on a different block count and silently accepts other shapes.
fn load_checked<B: Backend>(
    model: Backbone<B>,
    file: &Path,
    device: &B::Device,
) -> Result<Backbone<B>> {
    let expected = weights::named_shapes(&model);
    let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        model.load_file(file, &recorder(), device)
    }))
    .map_err(|_| {
        anyhow!("the file holds a model of a different structure (another backbone or depth?)")
    })??;
    let diff = weights::shape_differences(&expected, &weights::named_shapes(&loaded));
    if !diff.is_empty() {
        bail!(
            "the file's weights do not fit this model: {}",
            diff.join("; ")
        );
    }
    Ok(loaded)
}

impl<B: AutodiffBackend> DistillationModel<B> {
    pub fn new(
        arch: &ArchConfig,
        frozen_bn_uses_batch_stats: bool,
        device: &B::Device,
    ) -> Result<Self> {
        let mut trainable = vec![];
        let mut frozen = vec![];
        let mut slots = vec![];
        for spec in &arch.models {
            let (index, blocks) = if spec.frozen {
                let m = Backbone::<B::InnerBackend>::from_spec(spec, device)?;
                let n = m.num_blocks();
                frozen.push(m);
                (frozen.len() - 1, n)
            } else {
                let m = Backbone::<B>::from_spec(spec, device)?;
                let n = m.num_blocks();
                trainable.push(m);
                (trainable.len() - 1, n)
            };
            slots.push(ModelSlot {
                key: spec.key.clone(),
                spec: spec.clone(),
                taps: parse_taps(spec, blocks)?,
                index,
            });
        }
        if trainable.is_empty() {
            bail!("Arch.freeze_params_list freezes every model: nothing would be trained");
        }
        Ok(DistillationModel {
            trainable: TrainableSet { models: trainable },
            frozen,
            slots,
            infer_model_name: arch.infer_model_name.clone(),
            frozen_bn: if frozen_bn_uses_batch_stats {
                BnMode::Train
            } else {
                BnMode::Eval
            },
        })
    }

    pub fn slot(&self, key: &str) -> Result<&ModelSlot> {
        self.slots.iter().find(|s| s.key == key).ok_or_else(|| {
            let known: Vec<_> = self.slots.iter().map(|s| s.key.as_str()).collect();
            anyhow!("no model named {key:?}; models: {}", known.join(", "))
        })
    }

    /// Training forward: trainable models on the autodiff graph; frozen ones on the inner
    /// backend (no graph), their outputs brought back as constants.
    pub fn forward_train(&self, x: Tensor<B, 4>) -> Outputs<B> {
        let mut out = BTreeMap::new();
        let x_inner = (!self.frozen.is_empty()).then(|| x.clone().inner());
        for slot in &self.slots {
            let o = if slot.spec.frozen {
                let o = self.frozen[slot.index].forward(
                    x_inner.clone().expect("frozen present"),
                    self.frozen_bn,
                    &slot.taps,
                );
                ModelOutput {
                    logits: Tensor::from_inner(o.logits),
                    features: o.features.into_iter().map(Tensor::from_inner).collect(),
                    feature_names: vec![],
                }
            } else {
                self.trainable.models[slot.index].forward(x.clone(), BnMode::Train, &slot.taps)
            };
            out.insert(
                slot.key.clone(),
                ModelOutput {
                    feature_names: slot.spec.return_patterns.clone(),
                    ..o
                },
            );
        }
        out
    }

    /// Evaluation forward of every model, BatchNorm on running statistics, no graph.
    pub fn forward_eval(
        &self,
        valid: &TrainableSet<B::InnerBackend>,
        x: Tensor<B::InnerBackend, 4>,
    ) -> Outputs<B::InnerBackend> {
        self.slots
            .iter()
            .map(|slot| {
                let m = if slot.spec.frozen {
                    &self.frozen[slot.index]
                } else {
                    &valid.models[slot.index]
                };
                let o = m.forward(x.clone(), BnMode::Eval, &slot.taps);
                (
                    slot.key.clone(),
                    ModelOutput {
                        feature_names: slot.spec.return_patterns.clone(),
                        ..o
                    },
                )
            })
            .collect()
    }

    /// The inference model (`infer_model_name`) on the inner backend.
    pub fn infer_model(&self) -> Result<(ModelSpec, Backbone<B::InnerBackend>)> {
        let slot = self.slot(&self.infer_model_name)?;
        let m = if slot.spec.frozen {
            self.frozen[slot.index].clone()
        } else {
            self.trainable.models[slot.index].valid()
        };
        Ok((slot.spec.clone(), m))
    }

    /// Saves every model as `<dir>/<key>.mpk`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        for slot in &self.slots {
            let path = dir.join(&slot.key);
            if slot.spec.frozen {
                self.frozen[slot.index]
                    .clone()
                    .save_file(&path, &recorder())
            } else {
                self.trainable.models[slot.index]
                    .clone()
                    .save_file(&path, &recorder())
            }
            .with_context(|| format!("saving model {} to {}", slot.key, path.display()))?;
        }
        Ok(())
    }

    /// Loads the weights of model `key` from a file written by [`Self::save`].
    pub fn load_model(&mut self, key: &str, file: &Path, device: &B::Device) -> Result<()> {
        let slot = self.slot(key)?.clone();
        let ctx = || format!("loading weights for model {key} from {}", file.display());
        if !file.is_file() {
            bail!("{}: file not found", ctx());
        }
        if slot.spec.frozen {
            let m = self.frozen[slot.index].clone();
            self.frozen[slot.index] = load_checked(m, file, device).with_context(ctx)?;
        } else {
            let m = self.trainable.models[slot.index].clone();
            self.trainable.models[slot.index] = load_checked(m, file, device).with_context(ctx)?;
        }
        Ok(())
    }

    /// Loads all models from a checkpoint directory (models missing there are an error).
    pub fn load_all(&mut self, dir: &Path, device: &B::Device) -> Result<()> {
        let keys: Vec<String> = self.slots.iter().map(|s| s.key.clone()).collect();
        for key in keys {
            self.load_model(&key, &dir.join(format!("{key}.mpk")), device)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Node, Pretrained};
    use burn::backend::Flex;

    fn spec(name: &str, class_num: usize, extra: &str) -> ModelSpec {
        let value = serde_yaml::from_str(&format!("{{name: {name}{extra}}}")).unwrap();
        ModelSpec {
            key: "m".into(),
            name: name.into(),
            class_num,
            pretrained: Pretrained::None,
            return_patterns: vec![],
            frozen: false,
            params: Node::root(value, Path::new("t.yaml")),
        }
    }

    fn params(name: &str, classes: usize, extra: &str) -> usize {
        Backbone::<Flex>::from_spec(&spec(name, classes, extra), &Default::default())
            .unwrap()
            .num_trainable_params()
    }

    /// Counts of the published architectures (torchvision for ImageNet ResNets; the CRD/DKD
    /// repositories' CIFAR ResNets at 100 classes).
    #[test]
    fn parameter_counts_match_the_reference_architectures() {
        assert_eq!(params("ResNet18", 1000, ""), 11_689_512);
        assert_eq!(params("ResNet34", 1000, ""), 21_797_672);
        assert_eq!(params("ResNet50", 1000, ""), 25_557_032);
        assert_eq!(params("resnet8x4", 100, ""), 1_233_540);
        assert_eq!(params("resnet32x4", 100, ""), 7_433_860);
        assert_eq!(params("resnet20", 100, ""), 278_324);
        assert_eq!(params("resnet56", 100, ""), 861_620);
        // kuangliu-style CIFAR ResNet18 (3x3 stem, no max-pool).
        assert_eq!(params("ResNet18", 100, ", stem: cifar"), 11_220_132);
    }

    #[test]
    fn unknown_backbone_lists_known_ones() {
        let e = Backbone::<Flex>::from_spec(&spec("ResNet19", 10, ""), &Default::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown backbone") && e.contains("resnet8x4"),
            "{e}"
        );
    }

    fn running_mean_of_teacher(
        model: &DistillationModel<burn::backend::Autodiff<Flex>>,
    ) -> Vec<f32> {
        let Backbone::ResNet(r) = &model.frozen[0];
        r.stem
            .bn
            .running_mean
            .value_sync()
            .into_data()
            .to_vec()
            .unwrap()
    }

    #[test]
    fn frozen_teacher_bn_is_eval_unless_paddleclas_mode() {
        let yaml = "{name: DistillationModel, class_num: 4, freeze_params_list: [True, False], models: [{Teacher: {name: resnet8}}, {Student: {name: resnet8}}]}";
        let node = Node::root(serde_yaml::from_str(yaml).unwrap(), Path::new("t.yaml"));
        let root = Node::root(
            serde_yaml::to_value(serde_yaml::Mapping::from_iter([(
                "Arch".into(),
                node.value.clone(),
            )]))
            .unwrap(),
            Path::new("t.yaml"),
        );
        let cfg =
            crate::config::Config::from_tree(root.value, Path::new("t.yaml"), vec![]).unwrap();
        let x = Tensor::random(
            [4, 3, 8, 8],
            burn::tensor::Distribution::Normal(1.0, 1.0),
            &Default::default(),
        );
        for paddle_mode in [false, true] {
            let model = DistillationModel::<burn::backend::Autodiff<Flex>>::new(
                &cfg.arch,
                paddle_mode,
                &Default::default(),
            )
            .unwrap();
            let before = running_mean_of_teacher(&model);
            let out = model.forward_train(x.clone());
            assert_eq!(out["Teacher"].logits.dims(), [4, 4]);
            assert_eq!(
                running_mean_of_teacher(&model) != before,
                paddle_mode,
                "paddle_mode={paddle_mode}"
            );
        }
    }

    #[test]
    fn loading_another_architecture_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m");
        let d = Default::default();
        Backbone::<Flex>::from_spec(&spec("resnet8", 10, ""), &d)
            .unwrap()
            .save_file(&file, &recorder())
            .unwrap();
        let file = file.with_extension("mpk");
        let deeper = Backbone::<Flex>::from_spec(&spec("resnet14", 10, ""), &d).unwrap();
        assert!(load_checked(deeper, &file, &d)
            .unwrap_err()
            .to_string()
            .contains("different structure"));
        let other_classes = Backbone::<Flex>::from_spec(&spec("resnet8", 7, ""), &d).unwrap();
        let e = load_checked(other_classes, &file, &d)
            .unwrap_err()
            .to_string();
        assert!(e.contains("fc.weight"), "{e}");
        let same = Backbone::<Flex>::from_spec(&spec("resnet8", 10, ""), &d).unwrap();
        assert!(load_checked(same, &file, &d).is_ok());
    }

    #[test]
    fn taps_return_block_outputs() {
        let mut s = spec("resnet8x4", 10, "");
        s.return_patterns = vec!["blocks[2]".into(), "blocks0".into()];
        let m = Backbone::<Flex>::from_spec(&s, &Default::default()).unwrap();
        let taps = parse_taps(&s, m.num_blocks()).unwrap();
        assert_eq!(taps, vec![2, 0]);
        let x = Tensor::<Flex, 4>::zeros([2, 3, 32, 32], &Default::default());
        let out = m.forward(x, BnMode::Eval, &taps);
        assert_eq!(out.logits.dims(), [2, 10]);
        assert_eq!(out.features[0].dims(), [2, 256, 8, 8]);
        assert_eq!(out.features[1].dims(), [2, 64, 32, 32]);
        s.return_patterns = vec!["blocks[3]".into()];
        assert!(parse_taps(&s, m.num_blocks())
            .unwrap_err()
            .to_string()
            .contains("blocks[2]"));
    }
}
