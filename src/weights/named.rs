//! Weights by name: every float tensor of a module under its field path (`blocks.0.conv0.conv.weight`),
//! read out for export and written back for import, with missing, unexpected and mis-shaped names
//! reported together.

use anyhow::{bail, Result};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use std::collections::BTreeMap;

/// A named tensor: shape and row-major `f32` values.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

#[derive(Default)]
struct Path(Vec<String>);

impl Path {
    fn enter(&mut self, name: &str) {
        self.0.push(name.to_string());
    }
    fn exit(&mut self) {
        self.0.pop();
    }
    fn name(&self) -> String {
        self.0.join(".")
    }
}

/// Walks every float tensor with its dotted name; values are read only when asked for.
struct Collect {
    path: Path,
    with_values: bool,
    out: BTreeMap<String, NamedTensor>,
}

impl<B: Backend> ModuleVisitor<B> for Collect {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
        let shape = p.shape().dims::<D>().to_vec();
        let values = if self.with_values {
            p.val()
                .into_data()
                .convert::<f32>()
                .to_vec::<f32>()
                .expect("f32 data")
        } else {
            vec![]
        };
        self.out
            .insert(self.path.name(), NamedTensor { shape, values });
    }
}

fn collect<B: Backend, M: Module<B>>(
    module: &M,
    with_values: bool,
) -> BTreeMap<String, NamedTensor> {
    let mut c = Collect {
        path: Path::default(),
        with_values,
        out: BTreeMap::new(),
    };
    module.visit(&mut c);
    c.out
}

/// The name → shape map of every float tensor of `module`.
pub fn named_shapes<B: Backend, M: Module<B>>(module: &M) -> BTreeMap<String, Vec<usize>> {
    collect(module, false)
        .into_iter()
        .map(|(k, t)| (k, t.shape))
        .collect()
}

/// Describes how two name → shape maps differ (empty when they are equal).
pub fn shape_differences(
    expected: &BTreeMap<String, Vec<usize>>,
    found: &BTreeMap<String, Vec<usize>>,
) -> Vec<String> {
    let mut out = vec![];
    for (k, v) in expected {
        match found.get(k) {
            None => out.push(format!("missing {k}")),
            Some(f) if f != v => out.push(format!("{k}: expected {v:?}, file has {f:?}")),
            _ => {}
        }
    }
    out.extend(
        found
            .keys()
            .filter(|k| !expected.contains_key(*k))
            .map(|k| format!("unexpected {k}")),
    );
    out
}

/// All float tensors of `module` (parameters and BatchNorm running statistics) by name.
pub fn named_tensors<B: Backend, M: Module<B>>(module: &M) -> BTreeMap<String, NamedTensor> {
    collect(module, true)
}

struct Assign<'a, B: Backend> {
    path: Path,
    source: &'a BTreeMap<String, NamedTensor>,
    device: B::Device,
    missing: Vec<String>,
    mismatched: Vec<String>,
    used: Vec<String>,
}

impl<B: Backend> ModuleMapper<B> for Assign<'_, B> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.enter(name);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let name = self.path.name();
        let (id, tensor, mapper) = param.consume();
        let tensor = match self.source.get(&name) {
            None => {
                self.missing.push(name);
                tensor
            }
            Some(src) if src.shape != tensor.dims().to_vec() => {
                self.mismatched.push(format!(
                    "{name}: expected {:?}, file has {:?}",
                    tensor.dims(),
                    src.shape
                ));
                tensor
            }
            Some(src) => {
                self.used.push(name);
                let require_grad = tensor.is_require_grad();
                let t = Tensor::<B, D>::from_data(
                    TensorData::new(src.values.clone(), src.shape.clone()),
                    &self.device,
                );
                if require_grad {
                    t.require_grad()
                } else {
                    t
                }
            }
        };
        Param::from_mapped_value(id, tensor, mapper)
    }
}

/// Replaces every float tensor of `module` with the same-named one in `source`. Any missing,
/// unexpected or mis-shaped name is an error listing all of them (a silently partial load is
/// how a teacher ends up untrained).
pub fn load_named<B: Backend, M: Module<B>>(
    module: M,
    source: &BTreeMap<String, NamedTensor>,
    device: &B::Device,
) -> Result<M> {
    let mut a = Assign {
        path: Path::default(),
        source,
        device: device.clone(),
        missing: vec![],
        mismatched: vec![],
        used: vec![],
    };
    let module = module.map(&mut a);
    let unexpected: Vec<&String> = source
        .keys()
        .filter(|k| !a.used.contains(k))
        .filter(|k| !a.mismatched.iter().any(|m| m.starts_with(&format!("{k}:"))))
        .collect();
    // Long lists (another architecture altogether) are cut: the first names tell the story.
    fn listed<S: AsRef<str>>(names: &[S], sep: &str) -> String {
        const SHOWN: usize = 12;
        let mut s = names
            .iter()
            .take(SHOWN)
            .map(|n| n.as_ref())
            .collect::<Vec<_>>()
            .join(sep);
        if names.len() > SHOWN {
            s.push_str(&format!("{sep}… ({} in all)", names.len()));
        }
        s
    }
    let mut problems = vec![];
    if !a.missing.is_empty() {
        problems.push(format!("missing: {}", listed(&a.missing, ", ")));
    }
    if !a.mismatched.is_empty() {
        problems.push(format!("shape mismatch: {}", listed(&a.mismatched, "; ")));
    }
    if !unexpected.is_empty() {
        problems.push(format!("unexpected: {}", listed(&unexpected, ", ")));
    }
    if !problems.is_empty() {
        bail!("weights do not fit the model ({})", problems.join("; "));
    }
    Ok(module)
}

/// Writes named tensors as a safetensors file (f32).
pub fn save_safetensors(
    tensors: &BTreeMap<String, NamedTensor>,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(k, t)| {
            (
                k.clone(),
                t.values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                t.shape.clone(),
            )
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(k, b, s)| {
            Ok((
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)?,
            ))
        })
        .collect::<Result<_>>()?;
    Ok(safetensors::serialize(views, metadata)?)
}
