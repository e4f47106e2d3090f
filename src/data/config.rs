//! The `DataLoader.Train` / `DataLoader.Eval` sections and `Infer`. Transform parameters are the
//! transforms' own (see [`super::transforms::Transform::from_spec`]).

use crate::config::{ConfigResult, Node, Spec};
use std::path::PathBuf;

#[derive(Clone, Debug)]
pub struct DatasetConfig {
    /// Its config section (`DataLoader.Train.dataset`), for messages.
    pub key: String,
    pub name: String,
    pub image_root: PathBuf,
    pub cls_label_path: PathBuf,
    pub delimiter: Option<String>,
    pub transforms: Vec<Spec>,
}

#[derive(Clone, Debug)]
pub struct SamplerConfig {
    pub batch_size: usize,
    pub drop_last: bool,
    pub shuffle: bool,
}

#[derive(Clone, Debug)]
pub struct LoaderSection {
    pub dataset: DatasetConfig,
    pub sampler: SamplerConfig,
    pub num_workers: usize,
}

#[derive(Clone, Debug)]
pub struct InferConfig {
    pub infer_imgs: Option<PathBuf>,
    pub batch_size: usize,
    pub transforms: Vec<Spec>,
    pub topk: usize,
    pub class_id_map_file: Option<PathBuf>,
}

/// The samplers whose batches kd-launch's sampler makes (it shards across workers as
/// `DistributedBatchSampler` does; with one worker that is `BatchSampler`).
const SAMPLERS: &[&str] = &["DistributedBatchSampler", "BatchSampler"];

/// A path-valued key; empty means absent.
pub fn opt_path(n: &Node, key: &str) -> ConfigResult<Option<PathBuf>> {
    Ok(n.str(key)?.filter(|s| !s.is_empty()).map(PathBuf::from))
}

/// `key` of `n`, an integer of at least 1 (`default` when absent).
fn positive(n: &Node, key: &str, default: usize) -> ConfigResult<usize> {
    let v = n.usize_or(key, default)?;
    if v == 0 {
        return Err(n.require(key)?.error("must be at least 1"));
    }
    Ok(v)
}

impl LoaderSection {
    /// Parses `DataLoader.Train` or `DataLoader.Eval`; what kd-launch does differently from the
    /// config's request is added to `warnings`.
    pub fn parse(n: &Node, warnings: &mut Vec<String>) -> ConfigResult<LoaderSection> {
        let d = n.require("dataset")?;
        let dataset = DatasetConfig {
            key: d.path.clone(),
            name: d.str_or("name", "ImageNetDataset")?,
            image_root: PathBuf::from(d.require("image_root")?.as_str()?),
            cls_label_path: PathBuf::from(d.require("cls_label_path")?.as_str()?),
            delimiter: d.str("delimiter")?,
            transforms: d
                .get("transform_ops")
                .map(|t| Spec::list(&t))
                .transpose()?
                .unwrap_or_default(),
        };
        let s = n.require("sampler")?;
        s.require("batch_size")?;
        let sampler = SamplerConfig {
            batch_size: positive(&s, "batch_size", 1)?,
            drop_last: s.bool_or("drop_last", false)?,
            shuffle: s.bool_or("shuffle", false)?,
        };
        if let Some(name) = s.str("name")? {
            if !SAMPLERS.contains(&name.as_str()) {
                warnings.push(format!(
                    "{}: {}.name: sampler {name} is not implemented; batches are drawn as \
                     DistributedBatchSampler draws them",
                    s.file.display(),
                    s.path
                ));
            }
        }
        let loader = n.get_or_empty("loader");
        // Paddle's DataLoader moves batches between worker processes through shared memory;
        // kd-launch's loader threads share the process's memory anyway.
        loader.accept(&["use_shared_memory"]);
        Ok(LoaderSection {
            dataset,
            sampler,
            num_workers: loader.usize_or("num_workers", 0)?,
        })
    }
}

impl InferConfig {
    /// Parses `Infer`; what kd-launch does differently from the config's request is added to
    /// `warnings`.
    pub fn parse(n: &Node, warnings: &mut Vec<String>) -> ConfigResult<InferConfig> {
        let post = n.get_or_empty("PostProcess");
        if let Some(name) = post.str("name")? {
            if name != "Topk" {
                warnings.push(format!(
                    "{}: {}.name: post-processing {name} is not implemented; infer reports the \
                     top-k classes (Topk)",
                    post.file.display(),
                    post.path
                ));
            }
        }
        Ok(InferConfig {
            infer_imgs: opt_path(n, "infer_imgs")?,
            batch_size: positive(n, "batch_size", 10)?,
            transforms: n
                .get("transforms")
                .map(|t| Spec::list(&t))
                .transpose()?
                .unwrap_or_default(),
            topk: positive(&post, "topk", 5)?,
            class_id_map_file: opt_path(&post, "class_id_map_file")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_yaml;
    use std::path::Path;

    const LOADER: &str = "dataset: {image_root: ., cls_label_path: l.txt, transform_ops: [{DecodeImage: {to_rgb: True}}]}, sampler: {batch_size: 2}, loader: {num_workers: 1}";

    fn root(yaml: &str) -> Node {
        Node::root(
            parse_yaml(yaml, Path::new("d.yaml")).unwrap(),
            Path::new("d.yaml"),
        )
    }

    fn report(root: &Node) -> Vec<String> {
        root.unread_keys().iter().map(|k| k.to_string()).collect()
    }

    #[test]
    fn zero_sizes_name_file_and_key() {
        let e = LoaderSection::parse(
            &root("{dataset: {image_root: ., cls_label_path: l}, sampler: {batch_size: 0}}"),
            &mut vec![],
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "d.yaml: sampler.batch_size: must be at least 1"
        );
        for (yaml, key) in [
            ("Infer: {batch_size: 0}", "Infer.batch_size"),
            ("Infer: {PostProcess: {topk: 0}}", "Infer.PostProcess.topk"),
            ("Infer: {PostProcess: {topk: -1}}", "Infer.PostProcess.topk"),
        ] {
            let r = root(yaml);
            let e = InferConfig::parse(&r.require("Infer").unwrap(), &mut vec![])
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(&format!("d.yaml: {key}: ")), "{e}");
        }
    }

    #[test]
    fn unknown_keys_of_dataset_sampler_and_loader_are_reported() {
        let r = root(
            "DataLoader: {Train: {dataset: {image_root: ., cls_label_path: l, delimeter: ','}, sampler: {batch_size: 2, shufle: True}, loader: {num_worker: 2, use_shared_memory: True}}}",
        );
        let train = r.require("DataLoader").unwrap().require("Train").unwrap();
        let sec = LoaderSection::parse(&train, &mut vec![]).unwrap();
        assert!(!sec.sampler.shuffle);
        assert_eq!(
            report(&r),
            [
                "d.yaml: DataLoader.Train.dataset.delimeter: unknown key, ignored; did you mean `DataLoader.Train.dataset.delimiter`?",
                "d.yaml: DataLoader.Train.sampler.shufle: unknown key, ignored; did you mean `DataLoader.Train.sampler.shuffle`?",
                "d.yaml: DataLoader.Train.loader.num_worker: unknown key, ignored; did you mean `DataLoader.Train.loader.num_workers`?",
            ]
        );
        // Transform parameters are the transforms' own: not reported until they are built.
        let r = root(&format!("{{{LOADER}}}"));
        LoaderSection::parse(&r, &mut vec![]).unwrap();
        assert!(report(&r).is_empty(), "{:?}", report(&r));
    }

    #[test]
    fn unknown_infer_keys_are_reported_and_other_samplers_warned_about() {
        let r = root(
            "Infer: {infer_img: x.jpg, PostProcess: {name: Topk, top_k: 3}}\nS: {dataset: {image_root: ., cls_label_path: l}, sampler: {name: PKSampler, batch_size: 2}}",
        );
        let inf = InferConfig::parse(&r.require("Infer").unwrap(), &mut vec![]).unwrap();
        assert_eq!((inf.topk, inf.infer_imgs), (5, None));
        let mut warnings = vec![];
        LoaderSection::parse(&r.require("S").unwrap(), &mut warnings).unwrap();
        assert_eq!(
            report(&r),
            [
                "d.yaml: Infer.infer_img: unknown key, ignored; did you mean `Infer.infer_imgs`?",
                "d.yaml: Infer.PostProcess.top_k: unknown key, ignored; did you mean `Infer.PostProcess.topk`?",
            ]
        );
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].starts_with("d.yaml: S.sampler.name: sampler PKSampler"),
            "{warnings:?}"
        );
    }
}
