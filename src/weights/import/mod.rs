//! Weights made elsewhere: PyTorch state dicts (`.pth`/`.pt`, torchvision's or timm's ResNet
//! naming, timm's ResNet-D as PaddleClas's vd), safetensors (the same naming, or kd-launch's own),
//! and PaddleClas `.pdparams`; and
//! `pretrained: True` resolved to the publisher's released file in a local weights directory.
//!
//! Every import goes through [`weights::load_named`](super::named::load_named), so a file that leaves any weight of the
//! model unset, or holds one the model lacks, is refused with the names: a teacher is never
//! silently half-loaded.

pub mod pickle;
pub mod tensors;

use super::named::{self as weights, NamedTensor};
use crate::arch::{Backbone, ModelSpec};
use anyhow::{bail, Context, Result};
use burn::tensor::backend::Backend;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The file formats kd-launch reads besides its own `.mpk` records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `torch.save` zip checkpoints.
    Torch,
    /// `paddle.save` pickles.
    Paddle,
    Safetensors,
}

impl Format {
    /// By extension: `.pth`/`.pt`/`.bin`/`.ckpt`, `.pdparams`, `.safetensors`.
    pub fn of(path: &Path) -> Option<Self> {
        match path.extension()?.to_str()? {
            "pth" | "pt" | "bin" | "ckpt" => Some(Format::Torch),
            "pdparams" => Some(Format::Paddle),
            "safetensors" => Some(Format::Safetensors),
            _ => None,
        }
    }
}

/// Which project's parameter names a file uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Naming {
    /// kd-launch's own (PaddleClas's structure, `running_mean`).
    KdLaunch,
    /// PaddleClas: kd-launch's names with BatchNorm statistics as `_mean` / `_variance`.
    PaddleClas,
    /// torchvision / timm ResNets: `conv1`, `bn1`, `layer{1..4}.{i}`, `downsample`, `fc` as
    /// `[out, in]`.
    Torchvision,
}

impl Naming {
    fn detect(names: &BTreeMap<String, NamedTensor>) -> Self {
        if names
            .keys()
            .any(|k| k.ends_with("._mean") || k.ends_with("._variance"))
        {
            Naming::PaddleClas
        } else if names
            .keys()
            .any(|k| k.starts_with("layer1.") || k == "conv1.weight")
        {
            Naming::Torchvision
        } else {
            Naming::KdLaunch
        }
    }
}

/// Reads the float tensors of a PyTorch, Paddle or safetensors file.
pub fn read(path: &Path) -> Result<tensors::FileTensors> {
    let format = Format::of(path).with_context(|| {
        format!(
            "{}: unknown weight format (expected .mpk, .pth/.pt/.bin/.ckpt, .pdparams or .safetensors)",
            path.display()
        )
    })?;
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    match format {
        Format::Torch => tensors::read_torch(&bytes),
        Format::Paddle => tensors::read_paddle(&bytes),
        Format::Safetensors => tensors::read_safetensors(&bytes),
    }
    .with_context(|| format!("reading {}", path.display()))
}

/// Renames (and re-lays out) a torchvision-style ResNet state dict to kd-launch's names.
/// Blocks are numbered across stages, so the per-stage counts come from the file itself.
fn from_torchvision(src: BTreeMap<String, NamedTensor>) -> BTreeMap<String, NamedTensor> {
    let mut per_stage: BTreeMap<usize, usize> = BTreeMap::new();
    for k in src.keys() {
        if let Some((stage, block)) = layer_block(k) {
            let n = per_stage.entry(stage).or_default();
            *n = (*n).max(block + 1);
        }
    }
    let first_block =
        |stage: usize| -> usize { per_stage.range(..stage).map(|(_, n)| n).sum::<usize>() };
    let bn_or_conv = |part: &str| -> Option<String> {
        // conv{j} → conv{j-1}.conv, bn{j} → conv{j-1}.bn (PaddleClas numbers from 0).
        let (kind, j) = if let Some(j) = part.strip_prefix("conv") {
            ("conv", j)
        } else {
            ("bn", part.strip_prefix("bn")?)
        };
        let j: usize = j.parse().ok()?;
        Some(format!("conv{}.{kind}", j.checked_sub(1)?))
    };
    // timm's ResNet-D (`resnet50d`, ...: PaddleClas's vd) has a deep stem — `conv1.{0,3,6}` with
    // BatchNorms `conv1.{1,4}` and `bn1` — and projections `downsample.{1,2}` after an average
    // pool at `downsample.0`.
    let deep_stem = src.contains_key("conv1.0.weight");
    let pooled_projection: std::collections::BTreeSet<(usize, usize)> = src
        .keys()
        .filter(|k| k.contains(".downsample.2."))
        .filter_map(|k| layer_block(k))
        .collect();
    let mut out = BTreeMap::new();
    for (k, mut t) in src {
        let parts: Vec<&str> = k.split('.').collect();
        let name = match parts.as_slice() {
            ["conv1", rest] => format!("stem.0.conv.{rest}"),
            ["conv1", i, rest] if deep_stem => match *i {
                "0" => format!("stem.0.conv.{rest}"),
                "1" => format!("stem.0.bn.{rest}"),
                "3" => format!("stem.1.conv.{rest}"),
                "4" => format!("stem.1.bn.{rest}"),
                "6" => format!("stem.2.conv.{rest}"),
                _ => k.clone(),
            },
            ["bn1", rest] if deep_stem => format!("stem.2.bn.{rest}"),
            ["bn1", rest] => format!("stem.0.bn.{rest}"),
            ["fc", "weight"] if t.shape.len() == 2 => {
                t = transpose(&t);
                "fc.weight".into()
            }
            ["fc", rest] => format!("fc.{rest}"),
            [layer, _, "downsample", i, rest] if layer.starts_with("layer") => {
                let Some((stage, b)) = layer_block(&k) else {
                    out.insert(k.clone(), t);
                    continue;
                };
                let (conv, bn) = if pooled_projection.contains(&(stage, b)) {
                    ("1", "2")
                } else {
                    ("0", "1")
                };
                let part = match *i {
                    i if i == conv => "conv",
                    i if i == bn => "bn",
                    _ => {
                        out.insert(k.clone(), t);
                        continue;
                    }
                };
                format!("blocks.{}.short.{part}.{rest}", first_block(stage) + b)
            }
            [layer, _, part, rest] if layer.starts_with("layer") => {
                match (layer_block(&k), bn_or_conv(part)) {
                    (Some((stage, b)), Some(p)) => {
                        format!("blocks.{}.{p}.{rest}", first_block(stage) + b)
                    }
                    _ => k.clone(),
                }
            }
            _ => k.clone(),
        };
        out.insert(name, t);
    }
    out
}

/// `layer{s}.{i}.…` → `(s, i)`.
fn layer_block(name: &str) -> Option<(usize, usize)> {
    let mut it = name.split('.');
    let stage = it.next()?.strip_prefix("layer")?.parse().ok()?;
    let block = it.next()?.parse().ok()?;
    Some((stage, block))
}

fn transpose(t: &NamedTensor) -> NamedTensor {
    let (r, c) = (t.shape[0], t.shape[1]);
    let mut values = vec![0.0; r * c];
    for i in 0..r {
        for j in 0..c {
            values[j * r + i] = t.values[i * c + j];
        }
    }
    NamedTensor {
        shape: vec![c, r],
        values,
    }
}

/// Maps a file's names to kd-launch's; returns the naming it recognised.
pub fn to_kd_names(src: BTreeMap<String, NamedTensor>) -> (Naming, BTreeMap<String, NamedTensor>) {
    let naming = Naming::detect(&src);
    let out = match naming {
        Naming::KdLaunch => src,
        Naming::Torchvision => from_torchvision(src),
        Naming::PaddleClas => src
            .into_iter()
            .map(|(k, t)| {
                let k = if let Some(p) = k.strip_suffix("._mean") {
                    format!("{p}.running_mean")
                } else if let Some(p) = k.strip_suffix("._variance") {
                    format!("{p}.running_var")
                } else {
                    k
                };
                (k, t)
            })
            .collect(),
    };
    (naming, out)
}

/// Loads a PyTorch, Paddle or safetensors file into `model`; every weight must be set.
pub fn load_into<B: Backend>(
    model: Backbone<B>,
    file: &Path,
    device: &B::Device,
) -> Result<Backbone<B>> {
    load_into_with(model, file, device, false)
}

/// [`load_into`]; with `new_head`, a classifier (`fc`) whose shape differs from the file's keeps
/// its fresh initialisation (with a warning) — what PaddleClas does when ImageNet weights
/// start a model for another class count. Every other weight must still come from the file.
pub fn load_into_with<B: Backend>(
    model: Backbone<B>,
    file: &Path,
    device: &B::Device,
    new_head: bool,
) -> Result<Backbone<B>> {
    let read = read(file)?;
    let (naming, named) = to_kd_names(read.tensors);
    // Module paths start with the backbone's variant (`ResNet.blocks.0…`); files do not, except
    // kd-launch's own exports.
    let own = weights::named_shapes(&model);
    let variant = own
        .keys()
        .next()
        .and_then(|k| k.split('.').next().map(str::to_string))
        .unwrap_or_default();
    let prefix = format!("{variant}.");
    let mut named: BTreeMap<String, NamedTensor> = if named.keys().all(|k| k.starts_with(&prefix)) {
        named
    } else {
        named
            .into_iter()
            .map(|(k, t)| (format!("{prefix}{k}"), t))
            .collect()
    };
    if new_head {
        for head in ["fc.weight", "fc.bias"].map(|h| format!("{prefix}{h}")) {
            if let (Some(mine), Some(theirs)) = (own.get(&head), named.get(&head)) {
                if *mine != theirs.shape {
                    tracing::warn!(
                        "{}: {head} has shape {:?}, the model {:?}: the classifier keeps its \
                         initial weights (another class count)",
                        file.display(),
                        theirs.shape,
                        mine
                    );
                    // Rare: only then are the model's values read out.
                    let initial = weights::named_tensors(&model).remove(&head);
                    named.insert(head, initial.expect("the model has its own head"));
                }
            }
        }
    }
    // The one structural difference between the projects' ResNet18/34: a projection in the
    // first block (PaddleClas's `use_first_short_conv`). Say so rather than list its names.
    let first_projection = format!("{prefix}blocks.0.short.conv.weight");
    let model_has = own.contains_key(&first_projection);
    let file_has = named.contains_key(&first_projection);
    let hint = match (model_has, file_has) {
        (true, false) => {
            "; the file's ResNet has no projection in its first block (torchvision's \
             and timm's layout): set `use_first_short_conv: False` on this model"
        }
        (false, true) => {
            "; the file's ResNet has a projection in its first block (PaddleClas's \
             layout): set `use_first_short_conv: True` on this model"
        }
        _ => "",
    };
    let model = weights::load_named(model, &named, device)
        .with_context(|| format!("{} (read as {naming:?} names){hint}", file.display()))?;
    tracing::debug!(
        "{}: {naming:?} names, {} tensors, skipped {:?}",
        file.display(),
        named.len(),
        read.skipped
    );
    Ok(model)
}

/// Where the publisher distributes a backbone's released ImageNet weights.
pub const PADDLECLAS_URL: &str =
    "https://paddle-imagenet-models-name.bj.bcebos.com/dygraph/legendary_models";

/// The file name of the released weights `pretrained: True` asks for (PaddleClas's naming:
/// `<Backbone>_pretrained.pdparams`, `<Backbone>_ssld_pretrained.pdparams` with `use_ssld`).
pub fn released_file_name(spec: &ModelSpec) -> Result<String> {
    let ssld = spec
        .params
        .bool_or("use_ssld", false)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(format!(
        "{}{}_pretrained.pdparams",
        spec.name,
        if ssld { "_ssld" } else { "" }
    ))
}

/// The local directory of released weights: `KD_LAUNCH_WEIGHTS`, else
/// `$XDG_CACHE_HOME/kd-launch/weights`, else `~/.cache/kd-launch/weights`.
pub fn default_weights_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KD_LAUNCH_WEIGHTS").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("kd-launch").join("weights")
}

/// Resolves `pretrained: True` to the released file in `dir`; nothing is downloaded, so a
/// missing file is an error saying which file, where, and where to get it.
pub fn resolve_released(spec: &ModelSpec, dir: &Path) -> Result<PathBuf> {
    let name = released_file_name(spec)?;
    let file = dir.join(&name);
    if file.is_file() {
        return Ok(file);
    }
    bail!(
        "Arch model {}: `pretrained: True` needs {name} in the weights directory {} (set by \
         Global.pretrained_dir or KD_LAUNCH_WEIGHTS); kd-launch downloads nothing. PaddleClas \
         publishes it at {PADDLECLAS_URL}/{name} — fetch it into that directory, or set \
         `pretrained:` to a file path",
        spec.key,
        dir.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize]) -> NamedTensor {
        let n = shape.iter().product();
        NamedTensor {
            shape: shape.to_vec(),
            values: (0..n).map(|i| i as f32).collect(),
        }
    }

    #[test]
    fn torchvision_names_number_blocks_across_stages() {
        let src: BTreeMap<String, NamedTensor> = [
            ("conv1.weight", t(&[2, 3, 1, 1])),
            ("bn1.running_var", t(&[2])),
            ("layer1.0.conv2.weight", t(&[1])),
            ("layer1.1.bn1.weight", t(&[1])),
            ("layer2.0.downsample.0.weight", t(&[1])),
            ("layer2.0.downsample.1.running_mean", t(&[1])),
            ("layer2.1.conv1.weight", t(&[1])),
            ("fc.weight", t(&[2, 3])),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let (naming, out) = to_kd_names(src);
        assert_eq!(naming, Naming::Torchvision);
        let keys: Vec<&str> = out.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "blocks.0.conv1.conv.weight",
                "blocks.1.conv0.bn.weight",
                "blocks.2.short.bn.running_mean",
                "blocks.2.short.conv.weight",
                "blocks.3.conv0.conv.weight",
                "fc.weight",
                "stem.0.bn.running_var",
                "stem.0.conv.weight",
            ]
        );
        // torch's Linear is [out, in]; burn's is [in, out].
        assert_eq!(out["fc.weight"].shape, [3, 2]);
        assert_eq!(out["fc.weight"].values, [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
    }

    #[test]
    fn paddle_statistics_are_renamed() {
        let src: BTreeMap<String, NamedTensor> = [
            ("blocks.0.conv0.bn._mean".to_string(), t(&[1])),
            ("blocks.0.conv0.bn._variance".to_string(), t(&[1])),
            ("fc.weight".to_string(), t(&[2, 3])),
        ]
        .into_iter()
        .collect();
        let (naming, out) = to_kd_names(src);
        assert_eq!(naming, Naming::PaddleClas);
        assert!(out.contains_key("blocks.0.conv0.bn.running_mean"));
        assert!(out.contains_key("blocks.0.conv0.bn.running_var"));
        // Paddle's Linear is [in, out] like burn's: unchanged.
        assert_eq!(out["fc.weight"].shape, [2, 3]);
    }
}
