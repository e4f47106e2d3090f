//! Export: the `infer_model_name` model alone, as `inference.safetensors` plus `inference.json`
//! (backbone, class count, image shape, preprocessing, label names) — everything `infer` needs
//! without the training config — and as `inference.onnx` for other runtimes.

use super::checkpoint;
use super::setup::load_initial_weights;
use super::Config;
use crate::arch::DistillationModel;
use crate::config::Spec;
use crate::weights::named as weights;
use anyhow::{bail, Context, Result};
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const WEIGHTS_FILE: &str = "inference.safetensors";
pub const META_FILE: &str = "inference.json";
/// The student as ONNX (opset 17; BatchNorm folded), preprocessing in its metadata.
pub const ONNX_FILE: &str = "inference.onnx";
pub const FORMAT: &str = "kd-launch-inference/1";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ExportMeta {
    pub format: String,
    /// The backbone's config entry (`name`, `class_num`, `stem`, ...).
    pub model: serde_yaml::Value,
    pub class_num: usize,
    pub image_shape: [usize; 3],
    /// Preprocessing as PaddleClas's `Infer.transforms` list.
    pub transforms: serde_yaml::Value,
    pub topk: usize,
    /// Class id → name, from `Infer.PostProcess.class_id_map_file`.
    pub label_names: BTreeMap<usize, String>,
    /// The checkpoint it came from.
    pub source: String,
}

/// Reads a PaddleClas class-id map (`<id> <name>` per line).
pub fn read_label_map(path: &Path) -> Result<BTreeMap<usize, String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read class_id_map_file {}", path.display()))?;
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let (id, name) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let id: usize = id.parse().with_context(|| {
            format!("{}:{}: expected `<class id> <name>`", path.display(), i + 1)
        })?;
        out.insert(id, name.trim().to_string());
    }
    Ok(out)
}

fn specs_value(specs: &[Spec]) -> serde_yaml::Value {
    serde_yaml::Value::Sequence(
        specs
            .iter()
            .map(|s| {
                let mut m = serde_yaml::Mapping::new();
                m.insert(s.name.clone().into(), s.params.value.clone());
                serde_yaml::Value::Mapping(m)
            })
            .collect(),
    )
}

/// `kd-launch export`: writes `Global.save_inference_dir`, returns its path.
pub fn export<B: AutodiffBackend>(cfg: &Config, device: B::Device) -> Result<PathBuf> {
    let g = &cfg.global;
    let source = match (&g.pretrained_model, &g.checkpoints) {
        (Some(p), _) | (None, Some(p)) => p.clone(),
        (None, None) => bail!(
            "{}: export needs weights: -o Global.pretrained_model=<output_dir>/<arch>/best_model",
            cfg.file.display()
        ),
    };
    // The export directory is made ready before the work, and held while its files are replaced.
    let _export_dir = super::output_dir::claim_export_dir(cfg)?;
    let mut model = DistillationModel::<B>::new(&cfg.arch, false, &device)?;
    if g.pretrained_model.is_some() {
        load_initial_weights(cfg, &mut model, &device)?;
    } else {
        crate::weights::load_models(&mut model, &source, &device)?;
    }
    let (spec, backbone) = model.infer_model()?;
    // An export of diverged weights would answer NaN for every image, far from the training
    // run that made it: refuse it, naming the tensors.
    let non_finite = super::finite::non_finite_tensors(&backbone);
    if !non_finite.is_empty() {
        bail!(
            "{}: the weights of model {} hold NaN or infinite values: {}; they cannot be exported \
             (export a checkpoint from before the divergence, e.g. best_model)",
            source.display(),
            spec.key,
            super::finite::describe(&non_finite)
        );
    }
    let transforms = match (&cfg.infer, &cfg.eval_data) {
        (Some(i), _) if !i.transforms.is_empty() => &i.transforms,
        (_, Some(e)) => &e.dataset.transforms,
        _ => bail!("{}: export needs Infer.transforms (or DataLoader.Eval transforms) to record the preprocessing", cfg.file.display()),
    };
    crate::data::transforms::build(transforms)?;
    super::log_unknown_keys(cfg, true);
    let label_names = match cfg
        .infer
        .as_ref()
        .and_then(|i| i.class_id_map_file.as_ref())
    {
        Some(p) if p.is_file() => read_label_map(p)?,
        Some(p) => {
            tracing::warn!(
                "class_id_map_file {} not found; the export has no label names",
                p.display()
            );
            BTreeMap::new()
        }
        None => BTreeMap::new(),
    };
    let mut model_entry = spec.params.value.clone();
    if let Some(m) = model_entry.as_mapping_mut() {
        m.insert("class_num".into(), (spec.class_num as u64).into());
        m.remove("pretrained");
        m.remove("return_patterns");
    }
    let meta = ExportMeta {
        format: FORMAT.into(),
        model: model_entry,
        class_num: spec.class_num,
        image_shape: g.image_shape,
        transforms: specs_value(transforms),
        topk: cfg.infer.as_ref().map(|i| i.topk).unwrap_or(5),
        label_names,
        source: source.display().to_string(),
    };
    let tensors = weights::named_tensors(&backbone);
    let bytes = weights::save_safetensors(
        &tensors,
        Some([("format".to_string(), FORMAT.to_string())].into()),
    )?;
    // The export directory may hold other files (PaddleClas writes into it): replace only ours,
    // each atomically, weights first so the metadata never points at missing weights.
    let dir = g.save_inference_dir.clone();
    checkpoint::write_file_atomic(&dir.join(WEIGHTS_FILE), &bytes)?;
    let meta_json = serde_json::to_string_pretty(&meta)?;
    // The same model for other runtimes, with what a deployment needs to feed it.
    let onnx = super::onnx::model_bytes(
        &backbone,
        g.image_shape,
        spec.class_num,
        &[
            ("kd_launch_export", meta_json.clone()),
            ("preprocess", serde_json::to_string(&meta.transforms)?),
            ("image_shape", serde_json::to_string(&meta.image_shape)?),
            ("label_names", serde_json::to_string(&meta.label_names)?),
        ],
    )?;
    checkpoint::write_file_atomic(&dir.join(ONNX_FILE), &onnx)?;
    checkpoint::write_file_atomic(&dir.join(META_FILE), meta_json.as_bytes())?;
    Ok(dir)
}
