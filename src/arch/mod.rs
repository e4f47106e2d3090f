//! Backbones (the registry from config names), their feature taps, and the distillation model: a
//! set of named sub-models, some frozen, whose outputs the losses read by name and key.

pub mod backbone;
pub mod config;
pub mod mobilenet_v3;
pub mod pplcnet;
pub mod resnet;
pub mod taps;

use crate::nn::cpu_conv::ConvAutodiffBackend;
use crate::nn::BnMode;
use anyhow::{anyhow, bail, Result};
pub use backbone::{Backbone, BACKBONES};
use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
pub use config::{ArchConfig, AttentionTransform, ModelSpec, Pretrained};
use std::collections::BTreeMap;
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

/// Where a named model lives and what it returns.
#[derive(Clone, Debug)]
pub struct ModelSlot {
    pub key: String,
    pub spec: ModelSpec,
    pub taps: Vec<usize>,
    /// Index into `trainable` or `frozen`.
    pub index: usize,
}

/// A DistillationModel (or a single backbone): named sub-models, frozen ones kept off the
/// autodiff graph on the inner backend.
pub struct DistillationModel<B: AutodiffBackend> {
    /// The trained models (the optimizer sees them through the engine's `TrainableSet`).
    pub trainable: Vec<Backbone<B>>,
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
            trainable,
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
                self.trainable[slot.index].forward(x.clone(), self.train_bn, &slot.taps)
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
        valid: &[Backbone<B::InnerBackend>],
        x: Tensor<B::InnerBackend, 4>,
    ) -> Outputs<B::InnerBackend> {
        self.slots
            .iter()
            .map(|slot| {
                let m = if slot.spec.frozen {
                    &self.frozen[slot.index]
                } else {
                    &valid[slot.index]
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
            self.trainable[slot.index].valid()
        };
        Ok((slot.spec.clone(), m))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::Node;
    use burn::backend::Flex;
    use std::path::Path;

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
        let root = Node::root(serde_yaml::from_str(yaml).unwrap(), Path::new("t.yaml"));
        let arch = ArchConfig::parse(&root, &root.get_or_empty("Global")).unwrap();
        let x = Tensor::random(
            [4, 3, 8, 8],
            burn::tensor::Distribution::Normal(1.0, 1.0),
            &Default::default(),
        );
        for paddle_mode in [false, true] {
            let model = DistillationModel::<burn::backend::Autodiff<Flex>>::new(
                &arch,
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
}
