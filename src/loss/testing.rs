//! Test helpers: loss entries from YAML and a small batch of outputs.

use super::{CombinedLoss, LossContext, LossValues};
use crate::arch::ArchConfig;
use crate::arch::{ModelOutput, Outputs};
use crate::config::{LossSpec, Node};
use crate::nn::BnMode;
use anyhow::Result;
use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use std::path::Path;

/// The entries of a `Loss.Train` list written in YAML.
pub fn specs(yaml: &str) -> Vec<LossSpec> {
    let v: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
    let node = Node::root(v, Path::new("t.yaml"));
    node.items()
        .unwrap()
        .iter()
        .map(|e| {
            let (name, params) = e.single_key_entry().unwrap();
            LossSpec {
                weight: params.f64_or("weight", 1.0).unwrap(),
                name,
                params,
            }
        })
        .collect()
}

/// A distillation arch without AFD transforms.
pub fn arch() -> ArchConfig {
    ArchConfig {
        name: "DistillationModel".into(),
        models: vec![],
        infer_model_name: "Student".into(),
        distillation: true,
        attention: vec![],
    }
}

pub fn combined(specs: &[LossSpec]) -> Result<CombinedLoss> {
    CombinedLoss::new(specs, &arch())
}

/// `[2, 3]` logits of a Student and a Teacher, and labels.
pub fn outputs() -> (Outputs<Flex>, Tensor<Flex, 1, Int>) {
    let d = Default::default();
    let t = |v: Vec<f32>| ModelOutput {
        logits: Tensor::<Flex, 2>::from_data(TensorData::new(v, [2, 3]), &d),
        features: vec![],
        feature_names: vec![],
    };
    let mut o = Outputs::new();
    o.insert(
        "Student".to_string(),
        t(vec![1.0, 2.0, 0.5, -1.0, 0.0, 3.0]),
    );
    o.insert("Teacher".to_string(), t(vec![2.0, 1.0, 0.0, 0.0, 0.5, 2.5]));
    (
        o,
        Tensor::from_data(TensorData::new(vec![1i64, 2], [2]), &d),
    )
}

/// Outputs with a `[2, C, 2, 2]` feature map `f` per model.
pub fn with_features(c: usize) -> (Outputs<Flex>, Tensor<Flex, 1, Int>) {
    let (mut o, y) = outputs();
    let d = Default::default();
    for (name, v) in [("Student", 0.5f32), ("Teacher", -1.0)] {
        let m = o.get_mut(name).unwrap();
        m.features = vec![Tensor::<Flex, 4>::random(
            [2, c, 2, 2],
            burn::tensor::Distribution::Normal(v as f64, 1.0),
            &d,
        )];
        m.feature_names = vec!["f".into()];
    }
    (o, y)
}

/// A context without loss parts.
pub fn context<'a>(
    o: &'a Outputs<Flex>,
    y: &Tensor<Flex, 1, Int>,
    epoch: usize,
    step: u64,
) -> LossContext<'a, Flex> {
    LossContext {
        outputs: o,
        labels: y.clone(),
        epoch,
        default_model: "Student",
        parts: &[],
        mode: BnMode::Train,
        seed: 42,
        step,
    }
}

pub fn run(
    l: &CombinedLoss,
    o: &Outputs<Flex>,
    y: &Tensor<Flex, 1, Int>,
    epoch: usize,
) -> Result<LossValues<Flex>> {
    l.forward(&context(o, y, epoch, 0))
}

pub fn value(t: &Tensor<Flex, 1>) -> f32 {
    t.clone().into_data().to_vec::<f32>().unwrap()[0]
}
