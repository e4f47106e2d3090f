//! The PaddleClas-specific generic config layer: YAML as PaddleClas reads it (Python literals,
//! anchors, `-o` overrides), the path-carrying [`Node`] that components parse their sections
//! through (errors carry the file and the key path, see [`ConfigError`]; lookups are recorded),
//! and the report of keys nobody read ([`UnknownKey`]).
//!
//! Typed sections live with the components that use them: `arch::config`, `data::config`,
//! `optim::config`, `metric`, and the whole `Config` in `engine::config`.
//! Sections are read through `Node`, not serde derives: PaddleClas's leniency (Python literals,
//! `1.0/255.0` strings, null as absent) and errors naming file and key come with it.

mod report;
mod tree;

pub use report::UnknownKey;
pub use tree::{
    apply_override, load_yaml, override_value, parse_yaml, python_literal, ConfigError,
    ConfigResult, Node,
};

/// A named entry `- Name: {params}` of a list (transforms, Infer transforms), which a
/// component's registry turns into an object, rejecting unknown names with the known ones.
#[derive(Clone, Debug)]
pub struct Spec {
    pub name: String,
    pub params: Node,
}

impl Spec {
    /// The entries of a list of `- Name: {params}`.
    pub fn list(n: &Node) -> ConfigResult<Vec<Spec>> {
        n.items()?
            .iter()
            .map(|e| {
                e.single_key_entry()
                    .map(|(name, params)| Spec { name, params })
            })
            .collect()
    }
}

/// A `Loss.Train` / `Loss.Eval` entry such as `DistillationDKDLoss: {weight: 1, temperature: 4}`.
#[derive(Clone, Debug)]
pub struct LossSpec {
    pub name: String,
    pub weight: f64,
    pub params: Node,
}

impl LossSpec {
    /// The entries of a `Loss.Train` or `Loss.Eval` list. Only `weight` is read here, through a
    /// preview: the other parameters belong to the loss, and a command that builds no loss is not
    /// told about them.
    pub fn list(n: &Node) -> ConfigResult<Vec<LossSpec>> {
        n.items()?
            .iter()
            .map(|e| {
                let (name, params) = e.single_key_entry()?;
                let weight = params.preview().f64_or("weight", 1.0)?;
                Ok(LossSpec {
                    name,
                    weight,
                    params,
                })
            })
            .collect()
    }
}
