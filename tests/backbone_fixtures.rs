//! The PaddleClas backbones' eval-mode forward pass against an independent PyTorch reference.
//!
//! `tests/data/backbone_fixtures.json` is written by `tools/gen_backbone_fixtures.py`, which runs
//! the PyTorch re-statement of PaddleClas's layer tables in `tools/count_params.py` (rerun it from
//! the repository root to regenerate). Both sides give every tensor a value from the same
//! formula of its position: the k-th tensor in module order (within a module: weight, bias,
//! running_mean, running_var, which is kd-launch's field order, so burn's traversal visits the
//! tensors in PyTorch's order), element i in PyTorch's row-major layout, s = a 32-bit integer
//! hash of (k, i) mapped to [-1, 1). Conv / linear weights are `gain · s · √(6 / fan_in)`,
//! their biases `0.1 s`; BatchNorm weight `1 + 0.2 s`, bias `0.1 s`, running mean `0.1 s`,
//! running variance `1 + 0.2 |s|`. burn's `Linear` weight is `[in, out]`, PyTorch's `[out, in]`:
//! it is filled in PyTorch's layout and transposed. The models are built with
//! `dropout_prob: null` (the reference heads have no dropout; Paddle's `downscale_in_infer`
//! scales by `1 - p` in eval mode, tested in `src/arch/backbone.rs`).
//!
//! Compared: the logits and one feature tap per model (PP-LCNet `blocks4`, MobileNetV3
//! `blocks[3]`, ResNet_vd `blocks[2]`), every element within `1e-4 · max|ref|` of its tensor.
//! The 35×35 input makes ResNet_vd's shortcut average pool run in ceil mode on a 9×9 map.

use kd_engine::arch::{parse_taps, Backbone};
use kd_engine::arch::{ModelSpec, Pretrained};
use kd_engine::burn::backend::Flex;
use kd_engine::burn::module::{Module, ModuleMapper, Param};
use kd_engine::burn::tensor::backend::Backend;
use kd_engine::burn::tensor::{Tensor, TensorData};
use kd_engine::config::Node;
use kd_engine::nn::BnMode;
use serde::Deserialize;
use std::path::Path;

type B = Flex;

const REL_TOL: f64 = 1e-4;

#[derive(Deserialize)]
struct Fixtures {
    models: Vec<Fixture>,
}

#[derive(Deserialize)]
struct Fixture {
    name: String,
    class_num: usize,
    gain: f64,
    tensors: usize,
    input_shape: [usize; 4],
    logits_shape: [usize; 2],
    logits: Vec<f64>,
    tap: String,
    tap_shape: [usize; 4],
    tap_values: Vec<f64>,
}

/// The generator's `unit`: element `i` of tensor `k`, a 32-bit hash mapped to [-1, 1).
fn unit(k: usize, i: usize) -> f64 {
    let mut x = (i as u32)
        .wrapping_mul(0x9E37_79B1)
        .wrapping_add((k as u32 + 1).wrapping_mul(0x85EB_CA77));
    x ^= x >> 15;
    x = x.wrapping_mul(0x2C1B_3C6D);
    x ^= x >> 12;
    x = x.wrapping_mul(0x297A_2D39);
    x ^= x >> 15;
    x as f64 / 2f64.powi(31) - 1.0
}

/// Gives every float tensor of a module the fixture formula's values, in traversal order.
struct Assign {
    gain: f64,
    /// `(field name, container type)` of the modules entered.
    path: Vec<(String, String)>,
    k: usize,
}

impl<Bk: Backend> ModuleMapper<Bk> for Assign {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path
            .push((name.to_string(), container_type.to_string()));
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<Bk, D>>) -> Param<Tensor<Bk, D>> {
        let (id, tensor, mapper) = param.consume();
        let (leaf, container) = self.path.last().cloned().unwrap_or_default();
        let batch_norm = container.contains("BatchNorm");
        let shape = tensor.dims();
        // PyTorch's layout: a Linear weight is [out, in] where burn's is [in, out].
        let linear = container.contains("Linear") && D == 2;
        assert!(D == 1 || D == 2 || D == 4, "{leaf}: rank {D}");
        assert!(
            D != 2 || linear,
            "{leaf} in {container}: unexpected 2-d tensor"
        );
        let numel: usize = shape.iter().product();
        let torch_dim0 = if linear { shape[1] } else { shape[0] };
        let fan_in = (numel / torch_dim0) as f64;
        let k = self.k;
        let value = |i: usize| -> f32 {
            let s = unit(k, i);
            let v = match (leaf.as_str(), batch_norm, D) {
                ("running_mean", true, 1) => 0.1 * s,
                ("running_var", true, 1) => 1.0 + 0.2 * s.abs(),
                ("weight", true, 1) => 1.0 + 0.2 * s,
                ("bias", true, 1) => 0.1 * s,
                ("weight", false, 2 | 4) => self.gain * s * (6.0 / fan_in).sqrt(),
                ("bias", false, 1) => 0.1 * s,
                other => panic!("unexpected tensor {other:?} in {container}"),
            };
            v as f32
        };
        let values: Vec<f32> = (0..numel).map(value).collect();
        let device = tensor.device();
        let new = if linear {
            let t =
                Tensor::<Bk, 2>::from_data(TensorData::new(values, [shape[1], shape[0]]), &device);
            Tensor::<Bk, D>::from_data(t.transpose().into_data(), &device)
        } else {
            Tensor::<Bk, D>::from_data(TensorData::new(values, shape), &device)
        };
        self.k += 1;
        Param::from_mapped_value(id, new, mapper)
    }
}

fn spec(f: &Fixture) -> ModelSpec {
    let yaml = format!("{{name: {}, dropout_prob: null}}", f.name);
    ModelSpec {
        key: "m".into(),
        name: f.name.clone(),
        class_num: f.class_num,
        pretrained: Pretrained::None,
        return_patterns: vec![f.tap.clone()],
        frozen: false,
        params: Node::root(
            serde_yaml::from_str(&yaml).unwrap(),
            Path::new("backbone_fixtures.yaml"),
        ),
    }
}

/// Largest `|got - want|`, failing past `REL_TOL · max|want|`.
fn compare(what: &str, got: &[f32], want: &[f64]) -> (f64, f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    let (mut worst, mut at) = (0f64, 0);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = (*g as f64 - w).abs();
        assert!(d.is_finite(), "{what}[{i}]: {g} vs {w}");
        if d > worst {
            (worst, at) = (d, i);
        }
    }
    assert!(
        worst <= REL_TOL * scale,
        "{what}: element {at} is {} where the reference has {} (|diff| {worst:.3e} > {REL_TOL} · \
         max|ref| {scale:.4})",
        got[at],
        want[at]
    );
    (worst, worst / scale)
}

#[test]
fn eval_forward_matches_the_pytorch_reference() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/backbone_fixtures.json"),
    )
    .unwrap();
    let fixtures: Fixtures = serde_json::from_str(&text).unwrap();
    assert_eq!(fixtures.models.len(), 3);
    let device = Default::default();
    for f in &fixtures.models {
        let s = spec(f);
        let model = Backbone::<B>::from_spec(&s, &device).unwrap();
        let taps = parse_taps(&s, &model.tap_names()).unwrap();
        let mut assign = Assign {
            gain: f.gain,
            path: vec![],
            k: 0,
        };
        let model = model.map(&mut assign);
        assert_eq!(assign.k, f.tensors, "{}: tensor count", f.name);

        let n: usize = f.input_shape.iter().product();
        let x: Vec<f32> = (0..n)
            .map(|i| (0.5 * (0.37 * i as f64).sin()) as f32)
            .collect();
        let x = Tensor::<B, 4>::from_data(TensorData::new(x, f.input_shape), &device);
        let out = model.forward(x, BnMode::Eval, &taps);

        assert_eq!(out.logits.dims(), f.logits_shape, "{}", f.name);
        assert_eq!(out.features[0].dims(), f.tap_shape, "{}", f.name);
        let logits: Vec<f32> = out.logits.into_data().to_vec().unwrap();
        let tap: Vec<f32> = out.features[0].clone().into_data().to_vec().unwrap();
        let (dl, rl) = compare(&format!("{} logits", f.name), &logits, &f.logits);
        let (dt, rt) = compare(&format!("{} {}", f.name, f.tap), &tap, &f.tap_values);
        eprintln!(
            "{}: logits max |diff| {dl:.2e} ({rl:.1e} of max|ref|), {} max |diff| {dt:.2e} \
             ({rt:.1e})",
            f.name, f.tap
        );
    }
}
