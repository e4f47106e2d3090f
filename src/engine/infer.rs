//! Inference on image files: from an export directory (no training config needed) or from a
//! config plus checkpoint, PaddleClas's `Topk` post-processing.

use super::export::{read_label_map, ExportMeta, FORMAT, META_FILE, WEIGHTS_FILE};
use super::setup::load_initial_weights;
use super::Config;
use crate::arch::{Backbone, DistillationModel, ModelSpec, Pretrained};
use crate::config::{Node, Spec};
use crate::data::transforms::{run_pipeline, Transform};
use crate::nn::cpu_conv::{ConvAutodiffBackend, ConvBackend};
use crate::nn::BnMode;
use crate::weights::named as weights;
use anyhow::{bail, Context, Result};
use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use rand::SeedableRng;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One image's result, with PaddleClas's field names.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct InferResult {
    pub class_ids: Vec<usize>,
    pub scores: Vec<f32>,
    pub file_name: String,
    pub label_names: Vec<String>,
    /// Every class's logit (printed with `infer --logits`; for comparing runtimes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logits: Option<Vec<f32>>,
}

pub enum InferSource<'a> {
    /// A directory written by `kd-launch export`.
    Export(&'a Path),
    /// A training config (its `Infer` section and `Global.pretrained_model`).
    Config(&'a Config),
}

const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png"];

/// An image file, or the image files under a directory (recursively, sorted).
pub fn image_list(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    if !path.is_dir() {
        bail!("{}: no such image file or directory", path.display());
    }
    let mut out = vec![];
    let mut stack = vec![path.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("cannot list {}", d.display()))? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
            {
                out.push(p);
            }
        }
    }
    out.sort();
    if out.is_empty() {
        bail!("{}: no images (.jpg, .jpeg, .png) found", path.display());
    }
    Ok(out)
}

fn specs_from_value(v: &serde_yaml::Value, file: &Path) -> Result<Vec<Spec>> {
    Ok(Spec::list(&Node::root_at(v.clone(), file, "transforms"))?)
}

/// A loaded inference model with its preprocessing.
pub struct Predictor<B: Backend> {
    pub model: Backbone<B>,
    pub transforms: Vec<Transform>,
    pub topk: usize,
    pub label_names: BTreeMap<usize, String>,
    pub batch_size: usize,
    device: B::Device,
}

impl<B: ConvBackend> Predictor<B> {
    pub fn from_export(dir: &Path, device: &B::Device) -> Result<Self> {
        let meta_path = dir.join(META_FILE);
        let text = std::fs::read_to_string(&meta_path).with_context(|| {
            format!(
                "{} is not a kd-launch export (missing {META_FILE})",
                dir.display()
            )
        })?;
        let meta: ExportMeta = serde_json::from_str(&text)
            .with_context(|| format!("{} is malformed", meta_path.display()))?;
        if meta.format != FORMAT {
            bail!(
                "{}: format {:?} is not {FORMAT:?}",
                meta_path.display(),
                meta.format
            );
        }
        let params = Node::root(meta.model.clone(), &meta_path);
        let spec = ModelSpec {
            key: "model".into(),
            name: params.require("name")?.as_str()?,
            class_num: meta.class_num,
            pretrained: Pretrained::None,
            return_patterns: vec![],
            frozen: true,
            params,
        };
        let model = Backbone::<B>::from_spec(&spec, device)?;
        let wfile = dir.join(WEIGHTS_FILE);
        let bytes =
            std::fs::read(&wfile).with_context(|| format!("cannot read {}", wfile.display()))?;
        let tensors = crate::weights::import::tensors::read_safetensors(&bytes)
            .with_context(|| format!("{} is not a valid safetensors file", wfile.display()))?
            .tensors;
        let model = weights::load_named(model, &tensors, device)
            .with_context(|| format!("loading {}", wfile.display()))?;
        let transforms =
            crate::data::transforms::build(&specs_from_value(&meta.transforms, &meta_path)?)?;
        Ok(Predictor {
            model,
            transforms,
            topk: meta.topk,
            label_names: meta.label_names,
            batch_size: 16,
            device: device.clone(),
        })
    }

    pub fn predict(&self, files: &[PathBuf]) -> Result<Vec<InferResult>> {
        let mut out = vec![];
        for chunk in files.chunks(self.batch_size.max(1)) {
            let mut pixels = vec![];
            let mut shape = None;
            for f in chunk {
                let bytes =
                    std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?;
                let mut rng = rand::rngs::StdRng::seed_from_u64(0);
                let (data, s) = run_pipeline(&self.transforms, bytes, &mut rng)
                    .with_context(|| format!("image {}", f.display()))?;
                if shape.is_some_and(|p| p != s) {
                    bail!("image {} has shape {s:?} after preprocessing, unlike the others in its batch", f.display());
                }
                shape = Some(s);
                pixels.extend(data);
            }
            let [c, h, w] = shape.expect("non-empty chunk");
            let x = Tensor::<B, 4>::from_data(
                TensorData::new(pixels, [chunk.len(), c, h, w]),
                &self.device,
            );
            let logits = self.model.forward(x, BnMode::Eval, &[]).logits;
            let raw: Vec<f32> = logits
                .clone()
                .into_data()
                .convert::<f32>()
                .to_vec()
                .expect("f32");
            let probs = softmax(logits, 1);
            let classes = probs.dims()[1];
            let k = self.topk.min(classes);
            let (vals, idx) = probs.sort_descending_with_indices(1);
            let vals: Vec<f32> = vals.into_data().convert::<f32>().to_vec().expect("f32");
            let idx: Vec<i64> = idx.into_data().convert::<i64>().to_vec().expect("i64");
            for (i, f) in chunk.iter().enumerate() {
                let row = i * classes..i * classes + k;
                let class_ids: Vec<usize> = idx[row.clone()].iter().map(|&c| c as usize).collect();
                out.push(InferResult {
                    label_names: class_ids
                        .iter()
                        .map(|c| self.label_names.get(c).cloned().unwrap_or_default())
                        .collect(),
                    class_ids,
                    scores: vals[row].to_vec(),
                    file_name: f.display().to_string(),
                    logits: Some(raw[i * classes..(i + 1) * classes].to_vec()),
                });
            }
        }
        Ok(out)
    }
}

/// `kd-launch infer`: predictions for `images` (default: `Infer.infer_imgs`).
pub fn infer<B: ConvAutodiffBackend>(
    source: InferSource,
    images: Option<&Path>,
    device: B::Device,
) -> Result<Vec<InferResult>> {
    let (predictor, default_images) = match source {
        InferSource::Export(dir) => (
            Predictor::<B::InnerBackend>::from_export(dir, &device)?,
            None,
        ),
        InferSource::Config(cfg) => {
            let inf = cfg
                .infer
                .as_ref()
                .with_context(|| format!("{}: Infer section missing", cfg.file.display()))?;
            let infer_has_weights = cfg.arch.models.iter().any(|m| {
                m.key == cfg.arch.infer_model_name && matches!(m.pretrained, Pretrained::Path(_))
            });
            if cfg.global.pretrained_model.is_none() && !infer_has_weights {
                bail!("{}: infer needs weights: -o Global.pretrained_model=<output_dir>/<arch>/best_model", cfg.file.display());
            }
            B::seed(&device, cfg.global.seed);
            let mut model = DistillationModel::<B>::new(&cfg.arch, false, &device)?;
            load_initial_weights(cfg, &mut model, &device)?;
            let (_, backbone) = model.infer_model()?;
            let label_names = match &inf.class_id_map_file {
                Some(p) if p.is_file() => read_label_map(p)?,
                _ => BTreeMap::new(),
            };
            let predictor = Predictor {
                model: backbone,
                transforms: crate::data::transforms::build(&inf.transforms)?,
                topk: inf.topk,
                label_names,
                batch_size: inf.batch_size,
                device: device.clone(),
            };
            super::log_unknown_keys(cfg, true);
            (predictor, inf.infer_imgs.clone())
        }
    };
    let images = match (images, &default_images) {
        (Some(p), _) => p.to_path_buf(),
        (None, Some(p)) => p.clone(),
        (None, None) => {
            bail!("no images given: pass --images <file or directory> (or set Infer.infer_imgs)")
        }
    };
    predictor.predict(&image_list(&images)?)
}
