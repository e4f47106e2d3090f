//! Backbones (the registry from config names), their feature taps, and the distillation model: a
//! set of named sub-models, some frozen, whose outputs the losses read by name and key.

pub mod backbone;
pub mod cpu_conv;
pub mod import;
pub mod layers;
pub mod mobilenet_v3;
pub mod pplcnet;
pub mod resnet;
pub mod taps;
pub mod weights;

use crate::config::{ArchConfig, ModelSpec};
use anyhow::{anyhow, bail, Context, Result};
pub use backbone::{Backbone, BACKBONES};
use burn::module::{AutodiffModule, Module};
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use cpu_conv::ConvAutodiffBackend;
pub use layers::BnMode;
use std::collections::BTreeMap;
use std::path::Path;
pub use taps::parse_taps;

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

/// What a trainer optimises, as one module so one optimizer and one record cover it: the
/// trainable models and the losses' own layers (MGD's generator, AFD's attention, ...).
#[derive(Module, Debug)]
pub struct TrainableSet<B: Backend> {
    pub models: Vec<Backbone<B>>,
    pub loss_parts: Vec<crate::loss::parts::LossPart<B>>,
}

/// File stem of the losses' trainable layers in a checkpoint directory.
pub const LOSS_PARTS_FILE: &str = "loss_parts";

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
    /// BatchNorm mode of trainable models during training (`Train`, or `TrainSplits` to
    /// reproduce several workers' per-worker statistics on one).
    pub train_bn: BnMode,
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
            let (index, tap_names, stage_names) = if spec.frozen {
                let m = Backbone::<B::InnerBackend>::from_spec(spec, device)?;
                let names = (m.tap_names(), m.stage_names());
                frozen.push(m);
                (frozen.len() - 1, names.0, names.1)
            } else {
                let m = Backbone::<B>::from_spec(spec, device)?;
                let names = (m.tap_names(), m.stage_names());
                trainable.push(m);
                (trainable.len() - 1, names.0, names.1)
            };
            // `return_stages` becomes the patterns it stands for, so outputs are named by them.
            let mut spec = spec.clone();
            spec.return_patterns = taps::resolve_return_patterns(&spec, &stage_names)?;
            slots.push(ModelSlot {
                key: spec.key.clone(),
                taps: parse_taps(&spec, &tap_names)?,
                spec,
                index,
            });
        }
        if trainable.is_empty() {
            bail!("Arch.freeze_params_list freezes every model: nothing would be trained");
        }
        Ok(DistillationModel {
            trainable: TrainableSet {
                models: trainable,
                loss_parts: vec![],
            },
            frozen,
            slots,
            infer_model_name: arch.infer_model_name.clone(),
            frozen_bn: if frozen_bn_uses_batch_stats {
                BnMode::Train
            } else {
                BnMode::Eval
            },
            train_bn: BnMode::Train,
        })
    }

    pub fn slot(&self, key: &str) -> Result<&ModelSlot> {
        self.slots.iter().find(|s| s.key == key).ok_or_else(|| {
            let known: Vec<_> = self.slots.iter().map(|s| s.key.as_str()).collect();
            anyhow!("no model named {key:?}; models: {}", known.join(", "))
        })
    }
}

impl<B: ConvAutodiffBackend> DistillationModel<B> {
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
                self.trainable.models[slot.index].forward(x.clone(), self.train_bn, &slot.taps)
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
}

impl<B: AutodiffBackend> DistillationModel<B> {
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
        if !self.trainable.loss_parts.is_empty() {
            let path = dir.join(LOSS_PARTS_FILE);
            self.trainable
                .loss_parts
                .clone()
                .save_file(&path, &recorder())
                .with_context(|| format!("saving the losses' layers to {}", path.display()))?;
        }
        Ok(())
    }

    /// Loads the losses' trainable layers (when the model has any) from a checkpoint directory.
    pub fn load_loss_parts(&mut self, dir: &Path, device: &B::Device) -> Result<()> {
        if self.trainable.loss_parts.is_empty() {
            return Ok(());
        }
        let file = dir.join(format!("{LOSS_PARTS_FILE}.mpk"));
        let ctx = || {
            format!(
                "loading the losses' trainable layers from {}",
                file.display()
            )
        };
        if !file.is_file() {
            bail!(
                "{}: file not found (was the checkpoint written for another Loss config?)",
                ctx()
            );
        }
        let parts = std::mem::take(&mut self.trainable.loss_parts);
        let expected = weights::named_shapes(&parts);
        let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            parts.load_file(&file, &recorder(), device)
        }))
        .map_err(|_| anyhow!("the file holds layers of a different structure"))
        .with_context(ctx)?
        .with_context(ctx)?;
        let diff = weights::shape_differences(&expected, &weights::named_shapes(&loaded));
        if !diff.is_empty() {
            bail!("{}: shapes differ: {}", ctx(), diff.join("; "));
        }
        self.trainable.loss_parts = loaded;
        Ok(())
    }

    /// Loads the weights of model `key` from a file written by [`Self::save`], or from a
    /// PyTorch, Paddle or safetensors file (see [`import`]).
    pub fn load_model(&mut self, key: &str, file: &Path, device: &B::Device) -> Result<()> {
        let slot = self.slot(key)?.clone();
        let ctx = || format!("loading weights for model {key} from {}", file.display());
        if !file.is_file() {
            bail!("{}: file not found", ctx());
        }
        // PyTorch, Paddle and safetensors files are imported by name; anything else is a
        // kd-launch record.
        let foreign = import::Format::of(file).is_some();
        if slot.spec.frozen {
            let m = self.frozen[slot.index].clone();
            self.frozen[slot.index] = if foreign {
                import::load_into(m, file, device)
            } else {
                load_checked(m, file, device)
            }
            .with_context(ctx)?;
        } else {
            let m = self.trainable.models[slot.index].clone();
            // A trained model may start from weights for another class count (ImageNet
            // weights, a new task): its classifier then starts fresh, as in PaddleClas. A frozen
            // model's must fit — a teacher with a random head teaches nothing.
            self.trainable.models[slot.index] = if foreign {
                import::load_into_with(m, file, device, true)
            } else {
                load_checked(m, file, device)
            }
            .with_context(ctx)?;
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

    /// A model entry `{name: <name><extra>}`, e.g. `extra = ", stem: cifar"`.
    pub(crate) fn spec(name: &str, class_num: usize, extra: &str) -> ModelSpec {
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

    fn running_mean_of_teacher(
        model: &DistillationModel<burn::backend::Autodiff<Flex>>,
    ) -> Vec<f32> {
        let Backbone::ResNet(r) = &model.frozen[0] else {
            panic!("the teacher is a ResNet")
        };
        r.stem[0]
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
}
