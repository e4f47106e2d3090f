//! The `Arch` section: one backbone, or a `DistillationModel` of named models (some frozen, some
//! PaddleClas `AttentionModel`s). A model's own parameters beyond those read here are the
//! backbone's (see [`super::Backbone::from_spec`]).

use crate::config::{ConfigResult, Node};
use serde_yaml::Value;
use std::path::PathBuf;

#[derive(Clone, Debug, PartialEq)]
pub enum Pretrained {
    None,
    /// `pretrained: True`: the publisher's released weights, from `Global.pretrained_dir`.
    Released,
    Path(PathBuf),
}

#[derive(Clone, Debug)]
pub struct ModelSpec {
    /// The model's key in the distillation outputs (`Teacher`, `Student`, ...).
    pub key: String,
    /// Backbone name (`ResNet18`, `resnet8x4`, ...).
    pub name: String,
    pub class_num: usize,
    pub pretrained: Pretrained,
    pub return_patterns: Vec<String>,
    pub frozen: bool,
    pub params: Node,
}

#[derive(Clone, Debug)]
pub struct ArchConfig {
    /// `DistillationModel`, or the backbone's name for a plain (single-model) config.
    pub name: String,
    pub models: Vec<ModelSpec>,
    pub infer_model_name: String,
    /// True for `name: DistillationModel`: outputs are a dict keyed by model name.
    pub distillation: bool,
    /// The AFD transforms of `AttentionModel` entries (their backbones are in `models`).
    pub attention: Vec<AttentionTransform>,
}

/// The `LinearTransformTeacher` / `LinearTransformStudent` half of a PaddleClas
/// `AttentionModel` (AFD). kd-launch keeps these layers with the AFD loss (they are trained
/// with it and saved in its checkpoint file); the model's backbone becomes an ordinary model.
#[derive(Clone, Debug)]
pub struct AttentionTransform {
    /// The model key (`Teacher`, `Student`).
    pub model: String,
    /// `LinearTransformTeacher` or `LinearTransformStudent`.
    pub name: String,
    pub qk_dim: usize,
    /// The backbone's `return_patterns` the transform reads, in order.
    pub keys: Vec<String>,
    pub params: Node,
}

impl ArchConfig {
    /// Parses `Arch`; `global` is `Global`, for the deprecated `Global.class_num` and
    /// `Global.infer_model_name` spellings.
    pub fn parse(a: &Node, global: &Node) -> ConfigResult<ArchConfig> {
        let name = a.require("name")?.as_str()?;
        // Both spellings are read whichever is used, so neither is reported as unknown.
        let global_class_num = global.usize("class_num")?;
        let global_infer_model_name = global.str("infer_model_name")?;
        let class_num = a.usize("class_num")?.or(global_class_num).unwrap_or(1000);
        if name != "DistillationModel" {
            let model = parse_model("model".into(), a.clone(), class_num, false)?;
            return Ok(ArchConfig {
                infer_model_name: model.key.clone(),
                models: vec![model],
                name,
                distillation: false,
                attention: vec![],
            });
        }
        reject_pretrained_list(a)?;
        let entries = a.require("models")?.items()?;
        let freeze = freeze_list(a, entries.len(), "Arch.models")?;
        let mut models = vec![];
        let mut attention = vec![];
        for (entry, frozen) in entries.iter().zip(freeze) {
            let (key, params) = entry.single_key_entry()?;
            if models.iter().any(|m: &ModelSpec| m.key == key) {
                return Err(entry.error(format!("model name `{key}` appears twice")));
            }
            if params.preview().str("name")?.as_deref() == Some("AttentionModel") {
                let (model, transform) = parse_attention_model(key, &params, class_num, frozen)?;
                models.push(model);
                attention.push(transform);
            } else {
                models.push(parse_model(key, params, class_num, frozen)?);
            }
        }
        if models.is_empty() {
            return Err(a.require("models")?.error("needs at least one model"));
        }
        let infer_model_name = match a.str("infer_model_name")? {
            Some(n) => n,
            None => global_infer_model_name
                .unwrap_or_else(|| models.last().expect("non-empty").key.clone()),
        };
        if !models.iter().any(|m| m.key == infer_model_name) {
            let known: Vec<_> = models.iter().map(|m| m.key.as_str()).collect();
            return Err(a.require("infer_model_name")?.error(format!(
                "`{infer_model_name}` is not one of the models ({})",
                known.join(", ")
            )));
        }
        Ok(ArchConfig {
            name,
            models,
            infer_model_name,
            distillation: true,
            attention,
        })
    }
}

fn parse_pretrained(n: &Node) -> ConfigResult<Pretrained> {
    Ok(match n.get("pretrained") {
        None => Pretrained::None,
        Some(p) => match &p.value {
            Value::Bool(true) => Pretrained::Released,
            Value::Bool(false) => Pretrained::None,
            Value::String(s) if s.is_empty() => Pretrained::None,
            Value::String(s) => Pretrained::Path(PathBuf::from(s)),
            _ => return Err(p.error("expected true, false or a path")),
        },
    })
}

/// A model entry. Its generic keys are read through a preview: the mapping's other keys are the
/// backbone's, and it is the backbone, when built, that makes them count.
fn parse_model(
    key: String,
    params: Node,
    class_num: usize,
    frozen: bool,
) -> ConfigResult<ModelSpec> {
    let generic = params.preview();
    Ok(ModelSpec {
        key,
        name: generic.require("name")?.as_str()?,
        class_num: generic.usize_or("class_num", class_num)?,
        pretrained: parse_pretrained(&generic)?,
        return_patterns: generic.str_list("return_patterns")?.unwrap_or_default(),
        frozen,
        params,
    })
}

/// PaddleClas's `DistillationModel` / `AttentionModel` load `pretrained_list[i]` into model `i`;
/// kd-launch takes each model's own `pretrained` instead, and says so rather than train from
/// other weights than asked. (Null, as the shipped configs have it, is absent.)
fn reject_pretrained_list(n: &Node) -> ConfigResult<()> {
    match n.get("pretrained_list") {
        None => Ok(()),
        Some(p) => Err(
            p.error("is not supported by kd-launch: give each model its own `pretrained: <path>`")
        ),
    }
}

/// `freeze_params_list` of `node`: one bool per model (all false when absent).
fn freeze_list(node: &Node, models: usize, what: &str) -> ConfigResult<Vec<bool>> {
    let Some(f) = node.get("freeze_params_list") else {
        return Ok(vec![false; models]);
    };
    let v = f
        .items()?
        .iter()
        .map(Node::as_bool)
        .collect::<ConfigResult<Vec<_>>>()?;
    if v.len() != models {
        return Err(f.error(format!("has {} entries but {what} has {models}", v.len())));
    }
    Ok(v)
}

/// An AFD `AttentionModel`: `models: [<backbone>, <LinearTransformTeacher|Student>]` with its own
/// `freeze_params_list` (the backbone may be frozen; the transform must train).
fn parse_attention_model(
    key: String,
    params: &Node,
    class_num: usize,
    frozen: bool,
) -> ConfigResult<(ModelSpec, AttentionTransform)> {
    reject_pretrained_list(params)?;
    let entries = params.require("models")?.items()?;
    if entries.len() != 2 {
        return Err(params.require("models")?.error(format!(
            "an AttentionModel has two models (a backbone and a LinearTransformTeacher/Student), got {}",
            entries.len()
        )));
    }
    let inner_frozen = freeze_list(params, 2, "the AttentionModel's models")?;
    if frozen {
        return Err(params.error(
            "Arch.freeze_params_list freezes this AttentionModel, whose LinearTransform must train; freeze its backbone in its own freeze_params_list instead",
        ));
    }
    if inner_frozen[1] {
        return Err(params.require("freeze_params_list")?.error(
            "the LinearTransform of an AttentionModel must be trainable (freeze only its backbone)",
        ));
    }
    let (_, backbone) = entries[0].single_key_entry()?;
    let mut model = parse_model(key.clone(), backbone, class_num, inner_frozen[0])?;
    let (_, t) = entries[1].single_key_entry()?;
    let name = t.require("name")?.as_str()?;
    if name != "LinearTransformTeacher" && name != "LinearTransformStudent" {
        return Err(t.error(format!(
            "expected LinearTransformTeacher or LinearTransformStudent, got {name:?}"
        )));
    }
    let keys = t
        .require("keys")?
        .items()?
        .iter()
        .map(Node::as_str)
        .collect::<ConfigResult<Vec<_>>>()?;
    for k in &keys {
        if !model.return_patterns.contains(k) {
            return Err(t
                .require("keys")?
                .error(format!("{k:?} is not among the backbone's return_patterns")));
        }
    }
    // The shapes PaddleClas sizes the transform's layers from: the AFD loss, which owns those
    // layers here, reads them and checks them against its own s_shapes / t_shapes.
    t.accept(&["s_shapes", "t_shapes"]);
    // Outputs are dicts keyed by return pattern; keep the key so AFD finds the maps.
    model.key = key.clone();
    Ok((
        model,
        AttentionTransform {
            model: key,
            name,
            qk_dim: t.usize_or("qk_dim", 128)?,
            keys,
            params: t,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_yaml;
    use std::path::Path;

    fn arch(yaml: &str) -> (Node, ConfigResult<ArchConfig>) {
        let root = Node::root(
            parse_yaml(yaml, Path::new("a.yaml")).unwrap(),
            Path::new("a.yaml"),
        );
        let global = root.get_or_empty("Global");
        let parsed = ArchConfig::parse(&root.require("Arch").unwrap(), &global);
        (root, parsed)
    }

    #[test]
    fn a_model_entry_is_reported_once_its_backbone_reads_it() {
        let (root, cfg) = arch(
            "Arch: {name: DistillationModel, models: [{Student: {name: resnet8, stme: cifar}}]}",
        );
        let cfg = cfg.unwrap();
        // Only the generic keys have been read, through a preview: nothing to report yet.
        assert!(root.unread_keys().is_empty());
        let params = &cfg.models[0].params;
        params.str("stem").unwrap();
        let report: Vec<String> = root.unread_keys().iter().map(|k| k.to_string()).collect();
        assert_eq!(
            report,
            ["a.yaml: Arch.models[0].Student.stme: unknown key, ignored; did you mean `Arch.models[0].Student.stem`?"]
        );
    }

    #[test]
    fn an_unknown_arch_key_is_reported() {
        let (root, cfg) = arch(
            "Arch: {name: DistillationModel, infer_model_nam: Student, models: [{Student: {name: resnet8}}]}",
        );
        cfg.unwrap();
        let report: Vec<String> = root.unread_keys().iter().map(|k| k.to_string()).collect();
        assert_eq!(
            report,
            ["a.yaml: Arch.infer_model_nam: unknown key, ignored; did you mean `Arch.infer_model_name`?"]
        );
    }

    #[test]
    fn a_pretrained_list_is_refused() {
        let (_, cfg) = arch(
            "Arch: {name: DistillationModel, pretrained_list: [a, b], models: [{Student: {name: resnet8}}]}",
        );
        let e = cfg.unwrap_err().to_string();
        assert!(
            e.starts_with("a.yaml: Arch.pretrained_list: is not supported"),
            "{e}"
        );
    }
}
