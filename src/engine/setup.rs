//! What every command does before its work: weights loaded as the config says, labels checked
//! against the models, loader threads chosen, batches made into tensors.

use super::checkpoint;
use super::Config;
use crate::arch::DistillationModel;
use crate::arch::Pretrained;
use crate::data::ImageNetDataset;
use anyhow::{bail, Context, Result};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use std::path::Path;

pub(crate) fn batch_tensors<B: Backend>(
    batch: &crate::data::Batch,
    device: &B::Device,
) -> (Tensor<B, 4>, Tensor<B, 1, Int>) {
    let x = Tensor::<B, 4>::from_data(TensorData::new(batch.images.clone(), batch.shape), device);
    let y = Tensor::<B, 1, Int>::from_data(
        TensorData::new(batch.labels.clone(), [batch.labels.len()]),
        device,
    );
    (x, y)
}

/// Threads for decoding and augmentation: the configured count, capped by the machine.
pub(crate) fn loader_threads(cfg: &Config) -> usize {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    cfg.global.threads.unwrap_or(cores).clamp(1, cores.max(1))
}

/// Loads per-model `pretrained` paths, then `Global.pretrained_model` (which wins, as in
/// PaddleClas: it is how eval/export/infer name the trained weights).
pub(crate) fn load_initial_weights<B: AutodiffBackend>(
    cfg: &Config,
    model: &mut DistillationModel<B>,
    device: &B::Device,
) -> Result<()> {
    if let Some(dir) = &cfg.global.pretrained_model {
        crate::weights::load_models(model, dir, device)
            .with_context(|| format!("Global.pretrained_model = {}", dir.display()))?;
        tracing::info!("loaded all models from {}", dir.display());
        return Ok(());
    }
    for spec in &cfg.arch.models {
        let file = match &spec.pretrained {
            Pretrained::None => None,
            Pretrained::Released => Some(crate::weights::import::resolve_released(
                spec,
                &cfg.global.pretrained_dir,
            )?),
            Pretrained::Path(p) => Some(
                checkpoint::resolve_model_file(p, &spec.key)
                    .with_context(|| format!("Arch model {}: pretrained", spec.key))?,
            ),
        };
        if let Some(file) = file {
            crate::weights::load_model(model, &spec.key, &file, device)?;
            tracing::info!(
                "model {}: loaded pretrained weights {}",
                spec.key,
                file.display()
            );
        }
    }
    Ok(())
}

/// Fails when a label of `list` (read into `ds`) is beyond a model's `class_num`, naming the
/// first such line of the list.
pub(crate) fn check_labels(ds: &ImageNetDataset, cfg: &Config, list: &Path) -> Result<()> {
    let classes = ds.num_classes();
    let Some(m) = cfg.arch.models.iter().find(|m| classes > m.class_num) else {
        return Ok(());
    };
    let Some(first) = ds.samples.iter().find(|s| s.label as usize >= m.class_num) else {
        return Ok(());
    };
    // The line as written (the dataset keeps only its path and label): read again, as this
    // is the failing path.
    let text = std::fs::read_to_string(list)
        .ok()
        .and_then(|t| {
            t.lines()
                .nth(first.line - 1)
                .map(|l| format!(" in {:?}", l.trim()))
        })
        .unwrap_or_default();
    bail!(
        "{}:{}: label {} is out of range for model {} (class_num {}){text}; set Arch.class_num \
         (the list's largest label is {})",
        list.display(),
        first.line,
        first.label,
        m.key,
        m.class_num,
        classes - 1
    )
}

/// Fails unless `cfg` can train (as opposed to `check`, which only warns): every
/// `pretrained: True` must find its released file before any work starts.
pub(crate) fn require_trainable_weights(cfg: &Config) -> Result<()> {
    for m in &cfg.arch.models {
        if m.pretrained == Pretrained::Released {
            crate::weights::import::resolve_released(m, &cfg.global.pretrained_dir)
                .with_context(|| cfg.file.display().to_string())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn a_label_beyond_class_num_names_the_list_line() {
        let dir = tempfile::tempdir().unwrap();
        let list = dir.path().join("train.txt");
        std::fs::write(&list, "a.png 1\n\nb.png 12\nc.png 11\n").unwrap();
        let sample = |label, line| crate::data::dataset::Sample {
            path: PathBuf::from("x.png"),
            label,
            line,
        };
        let ds = ImageNetDataset {
            samples: vec![sample(1, 1), sample(12, 3), sample(11, 4)],
        };
        let tree = serde_yaml::from_str(
            "Arch: {name: DistillationModel, models: [{Teacher: {name: resnet8, class_num: 20}}, \
             {Student: {name: resnet8, class_num: 10}}]}",
        )
        .unwrap();
        let cfg = Config::from_tree(tree, Path::new("c.yaml"), vec![]).unwrap();
        let e = check_labels(&ds, &cfg, &list).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}:3: label 12 is out of range for model Student (class_num 10) in \"b.png 12\"; \
                 set Arch.class_num (the list's largest label is 12)",
                list.display()
            )
        );
        let fits = ImageNetDataset {
            samples: vec![sample(1, 1), sample(9, 2)],
        };
        assert!(check_labels(&fits, &cfg, &list).is_ok());
    }
}
