//! Which model outputs a loss entry reads: PaddleClas's wrapper keys `model_name_pairs`,
//! `model_names` and `key`, and the lookups of logits and `return_patterns` feature maps in a
//! batch's outputs.

use super::common::config_error;
use super::LossContext;
use crate::arch::ModelOutput;
use crate::config::Node;
use anyhow::{anyhow, bail, Result};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// Which models a loss reads.
#[derive(Clone, Debug, PartialEq)]
pub enum Binding {
    /// Plain `CELoss`: the only (or inference) model's logits.
    Plain,
    /// `model_names`: a ground-truth loss per model.
    Models(Vec<String>),
    /// `model_name_pairs`: a loss per (student-side, teacher-side) pair.
    Pairs(Vec<(String, String)>),
}

impl Binding {
    /// `model_name_pairs`, else `model_names`, of the entry `p` of loss `config_name`; neither is
    /// [`Binding::Plain`], which only the non-`Distillation` losses may be.
    pub fn read(config_name: &str, p: &Node) -> Result<Binding> {
        if let Some(pairs) = p.get("model_name_pairs") {
            let mut out = vec![];
            for item in pairs.items()? {
                let names = item
                    .items()?
                    .iter()
                    .map(Node::as_str)
                    .collect::<Result<Vec<_>, _>>()?;
                match names.as_slice() {
                    [a, b] => out.push((a.clone(), b.clone())),
                    _ => bail!("{}", item.error("each pair must be [model_a, model_b]")),
                }
            }
            return Ok(Binding::Pairs(out));
        }
        if let Some(names) = p.str_list("model_names")? {
            return Ok(Binding::Models(names));
        }
        if config_name.starts_with("Distillation") {
            bail!(
                "{}",
                p.error(format!(
                    "{config_name} needs model_names or model_name_pairs"
                ))
            );
        }
        Ok(Binding::Plain)
    }

    /// [`Self::read`] for a loss between two models.
    pub fn read_pairs(config_name: &str, p: &Node) -> Result<Binding> {
        match Self::read(config_name, p)? {
            pairs @ Binding::Pairs(_) => Ok(pairs),
            Binding::Models(_) | Binding::Plain => bail!(
                "{}",
                p.error(format!(
                    "{config_name} needs model_name_pairs: [[Student, Teacher]]"
                ))
            ),
        }
    }

    /// [`Self::read`] for a loss of one model against the labels.
    pub fn read_models(config_name: &str, p: &Node) -> Result<Binding> {
        match Self::read(config_name, p)? {
            Binding::Pairs(_) => bail!(
                "{}",
                p.error(format!(
                    "{config_name} takes model_names, not model_name_pairs"
                ))
            ),
            other => Ok(other),
        }
    }

    /// Every model named (for checking that they exist).
    pub fn models(&self) -> Vec<&String> {
        match self {
            Binding::Plain => vec![],
            Binding::Models(m) => m.iter().collect(),
            Binding::Pairs(p) => p.iter().flat_map(|(a, b)| [a, b]).collect(),
        }
    }

    /// The pairs of a pair loss (built by [`Self::read_pairs`] or by the loss itself).
    pub fn pairs(&self) -> &[(String, String)] {
        match self {
            Binding::Pairs(ps) => ps,
            _ => unreachable!("pair losses are bound to model_name_pairs when built"),
        }
    }

    /// PaddleClas's default term names: `base`, `base_<model>` per model or `base_<A>_<B>` per
    /// pair.
    pub fn term_names(&self, base: &str) -> Vec<String> {
        match self {
            Binding::Plain => vec![base.to_string()],
            Binding::Models(ms) => ms.iter().map(|m| format!("{base}_{m}")).collect(),
            Binding::Pairs(ps) => ps.iter().map(|(a, b)| format!("{base}_{a}_{b}")).collect(),
        }
    }
}

/// The entry's `key` (an output of each model: `logits` or a `return_patterns` map). Losses
/// that read only logits refuse any other key.
pub fn read_key(config_name: &str, p: &Node, reads_feature_maps: bool) -> Result<Option<String>> {
    let key = p.str("key")?;
    if let Some(k) = &key {
        if k != "logits" && !reads_feature_maps {
            return Err(config_error(
                &p.require("key")?,
                format!("{config_name} reads logits; key {k:?} names a feature map"),
            ));
        }
    }
    Ok(key)
}

/// The outputs of model `name`.
pub fn output<'a, B: Backend>(ctx: &'a LossContext<B>, name: &str) -> Result<&'a ModelOutput<B>> {
    ctx.outputs
        .get(name)
        .ok_or_else(|| anyhow!("no output for model {name:?}"))
}

/// Feature map `key` of model `model` (a `return_patterns` entry).
pub fn feature<'a, B: Backend>(
    o: &'a ModelOutput<B>,
    model: &str,
    key: &str,
) -> Result<&'a Tensor<B, 4>> {
    o.feature(key).ok_or_else(|| {
        anyhow!("model {model} has no feature {key:?} (add it to its return_patterns)")
    })
}

/// Output `key` of a model as `[N, D]`: `logits`, or a feature map flattened after an optional
/// adaptive average pool to `pool × pool` (RKD's `target_size`).
pub fn embedding<B: Backend>(
    o: &ModelOutput<B>,
    model: &str,
    key: &str,
    pool: Option<usize>,
) -> Result<Tensor<B, 2>> {
    if key == "logits" {
        return Ok(o.logits.clone());
    }
    let mut f = feature(o, model, key)?.clone();
    if let Some(size) = pool {
        f = burn::tensor::module::adaptive_avg_pool2d(f, [size, size]);
    }
    let [n, c, h, w] = f.dims();
    Ok(f.reshape([n, c * h * w]))
}

/// The channels a loss's layers were built for (config key `key` of loss `config_name`) must be
/// those of the map `tap` of `model` it is given.
pub fn check_channels<B: Backend>(
    config_name: &str,
    key: &str,
    map: &Tensor<B, 4>,
    expected: usize,
    model: &str,
    tap: &str,
) -> Result<()> {
    let got = map.dims()[1];
    if got != expected {
        bail!("{config_name}.{key} is {expected}, but model {model}'s {tap:?} has {got} channels");
    }
    Ok(())
}

/// A student and a teacher map compared position by position must have the same height/width.
pub fn check_spatial<B: Backend>(fs: &Tensor<B, 4>, ft: &Tensor<B, 4>, loss: &str) -> Result<()> {
    let (s, t) = (fs.dims(), ft.dims());
    if s[2..] != t[2..] {
        bail!(
            "{loss}: student map {s:?} and teacher map {t:?} differ in height/width; pick s_key/t_key of equal resolution"
        );
    }
    Ok(())
}

/// The outputs of one `model_name_pairs` entry `[a, b]` (student side, teacher side).
pub struct ModelPair<'a, B: Backend> {
    pub a: &'a str,
    pub b: &'a str,
    pub out_a: &'a ModelOutput<B>,
    pub out_b: &'a ModelOutput<B>,
}

impl<B: Backend> ModelPair<'_, B> {
    /// Both models' `key` output as `[N, D]` (their logits without a key or with `logits`).
    pub fn logits(&self, key: Option<&str>) -> Result<(Tensor<B, 2>, Tensor<B, 2>)> {
        let logits = |o: &ModelOutput<B>, model: &str| -> Result<Tensor<B, 2>> {
            match key {
                None | Some("logits") => Ok(o.logits.clone()),
                Some(k) => embedding(o, model, k, None),
            }
        };
        Ok((logits(self.out_a, self.a)?, logits(self.out_b, self.b)?))
    }

    /// Feature map `key_a` of model a and `key_b` of model b.
    pub fn features(&self, key_a: &str, key_b: &str) -> Result<(&Tensor<B, 4>, &Tensor<B, 4>)> {
        Ok((
            feature(self.out_a, self.a, key_a)?,
            feature(self.out_b, self.b, key_b)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{combined, specs};

    #[test]
    fn bad_bindings_are_explained() {
        let e = combined(&specs(
            "[{DistillationKLDivLoss: {model_names: [Student]}}]",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("model_name_pairs"), "{e}");
        let l = combined(&specs(
            "[{DistillationKLDivLoss: {model_name_pairs: [[Student, Ghost]]}}]",
        ))
        .unwrap();
        assert!(l
            .check_models(&["Student", "Teacher"])
            .unwrap_err()
            .to_string()
            .contains("Ghost"));
    }
}
