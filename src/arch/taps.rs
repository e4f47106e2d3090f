//! Feature taps: which intermediate outputs a model returns besides its logits.
//!
//! Every backbone lists its tap names in forward order (`Backbone::tap_names`), using
//! PaddleClas's layer names (`blocks[3]`, `blocks5`, `avg_pool`). A config's `return_patterns`
//! are resolved once, at build time, to indices into that list; the forward pass then collects
//! the tapped tensors with a [`Taps`].

use super::ModelSpec;
use anyhow::{anyhow, Result};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// Collects the tapped outputs during one forward pass, in the order the indices were asked for.
pub struct Taps<'a, B: Backend> {
    wanted: &'a [usize],
    got: Vec<Option<Tensor<B, 4>>>,
}

impl<'a, B: Backend> Taps<'a, B> {
    pub fn new(wanted: &'a [usize]) -> Self {
        Taps {
            wanted,
            got: vec![None; wanted.len()],
        }
    }

    /// Offers the output of tap `index`; kept for each request of that index.
    pub fn offer(&mut self, index: usize, x: &Tensor<B, 4>) {
        for (slot, &w) in self.got.iter_mut().zip(self.wanted) {
            if w == index {
                *slot = Some(x.clone());
            }
        }
    }

    /// The tapped tensors, in request order.
    ///
    /// # Panics
    /// When a requested index was never offered: indices come from [`parse_taps`], which only
    /// returns positions in the backbone's own `tap_names`.
    pub fn finish(self) -> Vec<Tensor<B, 4>> {
        self.got
            .into_iter()
            .zip(self.wanted)
            .map(|(t, i)| t.unwrap_or_else(|| panic!("tap {i} was not produced by the forward")))
            .collect()
    }
}

/// Position of `pattern` among `names`. `blocksN` is also accepted for `blocks[N]` (an older
/// kd-launch spelling of the ResNet block taps).
fn tap_index(pattern: &str, names: &[String]) -> Option<usize> {
    if let Some(i) = names.iter().position(|n| n == pattern) {
        return Some(i);
    }
    let n = pattern.strip_prefix("blocks")?.parse::<usize>().ok()?;
    let bracketed = format!("blocks[{n}]");
    names.iter().position(|n| *n == bracketed)
}

/// `names` for an error message, a run of `blocks[0]`, `blocks[1]`, ... shortened to its ends.
fn describe(names: &[String]) -> String {
    let is_block = |n: &String| n.starts_with("blocks[");
    let blocks: Vec<&String> = names.iter().filter(|n| is_block(n)).collect();
    let mut parts = vec![];
    let mut listed_blocks = false;
    for n in names {
        if !is_block(n) {
            parts.push(n.clone());
        } else if !listed_blocks {
            listed_blocks = true;
            parts.push(match blocks.as_slice() {
                [one] => one.to_string(),
                [first, .., last] => format!("{first} .. {last}"),
                [] => unreachable!("n is a block"),
            });
        }
    }
    parts.join(", ")
}

/// The taps of a network made of one flat list of blocks: `blocks[0]` .. `blocks[n-1]`, then
/// `avg_pool` (the globally pooled features, `[N, C, 1, 1]`).
pub fn block_list_taps(blocks: usize) -> Vec<String> {
    (0..blocks)
        .map(|i| format!("blocks[{i}]"))
        .chain(["avg_pool".to_string()])
        .collect()
}

/// Resolves `spec.return_patterns` to indices into `tap_names` (a backbone's
/// `Backbone::tap_names`), in the config's order; an unknown pattern is an error listing the
/// valid ones.
pub fn parse_taps(spec: &ModelSpec, tap_names: &[String]) -> Result<Vec<usize>> {
    spec.return_patterns
        .iter()
        .map(|p| {
            tap_index(p, tap_names).ok_or_else(|| {
                anyhow!(
                    "{}",
                    spec.params.error(format!(
                        "return_patterns: {p:?} is not a layer of {}; valid: {}",
                        spec.name,
                        describe(tap_names)
                    ))
                )
            })
        })
        .collect()
}

/// The patterns a model returns: its `return_patterns`, or, when there are none, the stages
/// picked by `return_stages` (PaddleClas's TheseusLayer: `True` for every entry of the
/// backbone's `stages_pattern`, an index or a list of indices for some). As in PaddleClas,
/// `return_patterns` wins when both are given; out-of-range stage indices are an error here
/// (PaddleClas drops them with a warning).
pub fn resolve_return_patterns(spec: &ModelSpec, stage_names: &[String]) -> Result<Vec<String>> {
    let Some(node) = spec.params.get("return_stages") else {
        return Ok(spec.return_patterns.clone());
    };
    if !spec.return_patterns.is_empty() {
        tracing::warn!(
            "{}: {}: return_stages is ignored because return_patterns is set (as in PaddleClas)",
            node.file.display(),
            node.path
        );
        return Ok(spec.return_patterns.clone());
    }
    let err = |m: String| anyhow!("{}", node.error(m));
    let picked: Vec<usize> = match &node.value {
        serde_yaml::Value::Bool(true) => (0..stage_names.len()).collect(),
        serde_yaml::Value::Bool(false) => vec![],
        serde_yaml::Value::Sequence(_) => node
            .items()?
            .iter()
            .map(|n| n.as_usize())
            .collect::<Result<_, _>>()?,
        _ => vec![node.as_usize()?],
    };
    picked
        .into_iter()
        .map(|i| {
            stage_names.get(i).cloned().ok_or_else(|| {
                err(format!(
                    "stage {i} does not exist; {} has stages 0 .. {} ({})",
                    spec.name,
                    stage_names.len().saturating_sub(1),
                    stage_names.join(", ")
                ))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn exact_names_and_the_blocks_alias() {
        let resnet = names(&["blocks[0]", "blocks[1]", "blocks[2]", "avg_pool"]);
        assert_eq!(tap_index("blocks[2]", &resnet), Some(2));
        assert_eq!(tap_index("blocks1", &resnet), Some(1));
        assert_eq!(tap_index("avg_pool", &resnet), Some(3));
        assert_eq!(tap_index("blocks[3]", &resnet), None);
        assert_eq!(tap_index("blocks", &resnet), None);
        let lcnet = names(&["blocks2", "blocks3", "avg_pool"]);
        assert_eq!(tap_index("blocks3", &lcnet), Some(1));
        assert_eq!(tap_index("blocks[3]", &lcnet), None);
        assert_eq!(
            describe(&resnet),
            "blocks[0] .. blocks[2], avg_pool".to_string()
        );
        assert_eq!(describe(&lcnet), "blocks2, blocks3, avg_pool".to_string());
    }
}
