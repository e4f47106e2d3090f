//! Typed config sections. Parsing reads the keys PaddleClas's engine reads; names, algorithms and
//! transforms are kept as `(name, params)` specs that the registries in `arch`, `loss`, `data` and
//! `optim` turn into objects (and reject with the list of known names).

use super::tree::{apply_override, load_yaml, ConfigError, ConfigResult, Node};
use serde_yaml::Value;
use std::path::{Path, PathBuf};

/// A named entry with its parameters, e.g. a loss `DistillationDKDLoss: {temperature: 4}`.
#[derive(Clone, Debug)]
pub struct Spec {
    pub name: String,
    pub params: Node,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Gpu,
}

#[derive(Clone, Debug)]
pub struct GlobalConfig {
    pub checkpoints: Option<PathBuf>,
    pub pretrained_model: Option<PathBuf>,
    pub output_dir: PathBuf,
    pub device: DeviceKind,
    pub save_interval: usize,
    pub eval_during_train: bool,
    pub eval_interval: usize,
    pub start_eval_epoch: usize,
    pub epochs: usize,
    pub print_batch_step: usize,
    pub image_shape: [usize; 3],
    pub save_inference_dir: PathBuf,
    pub seed: u64,
    /// kd-launch extension: run the frozen teacher's BatchNorm on batch statistics during
    /// training, as PaddleClas does (it only sets `trainable=False`). Default: eval mode.
    pub frozen_bn_uses_batch_stats: bool,
    /// kd-launch extension: decode/augment threads (defaults to `DataLoader.Train.loader.num_workers`).
    pub threads: Option<usize>,
    /// kd-launch extension: trainable models' BatchNorm takes its batch statistics over this many
    /// interleaved splits of each batch (1 = the whole batch). With `k` and batch `k·b`, one worker
    /// computes what `k` workers with batch `b` compute (see `BnMode::TrainSplits`).
    pub bn_stat_splits: usize,
    /// kd-launch extension: where `pretrained: True` finds released weights (default: the
    /// `KD_LAUNCH_WEIGHTS` variable, else `~/.cache/kd-launch/weights`).
    pub pretrained_dir: PathBuf,
    /// kd-launch extension: eval batches the frozen teacher is scored on before training
    /// (0 = no check). A teacher at chance level is warned about loudly.
    pub teacher_check_batches: usize,
}

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

#[derive(Clone, Debug)]
pub struct LossSpec {
    pub name: String,
    pub weight: f64,
    pub params: Node,
}

#[derive(Clone, Debug)]
pub struct LrConfig {
    pub name: String,
    pub learning_rate: f64,
    pub warmup_epoch: f64,
    pub warmup_start_lr: f64,
    pub by_epoch: bool,
    pub params: Node,
}

#[derive(Clone, Debug)]
pub struct OptimizerConfig {
    pub name: String,
    pub momentum: f64,
    pub weight_decay: f64,
    pub use_nesterov: bool,
    pub lr: LrConfig,
}

#[derive(Clone, Debug)]
pub struct DatasetConfig {
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

#[derive(Clone, Debug)]
pub struct MetricSpec {
    /// `None` for a plain TopkAcc (single model).
    pub model_key: Option<String>,
    pub topk: Vec<usize>,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub file: PathBuf,
    /// The tree after overrides (saved beside checkpoints as `config.yaml`).
    pub tree: Value,
    pub global: GlobalConfig,
    pub arch: ArchConfig,
    pub train_loss: Vec<LossSpec>,
    pub eval_loss: Vec<LossSpec>,
    pub optimizer: Option<OptimizerConfig>,
    pub train_data: Option<LoaderSection>,
    pub eval_data: Option<LoaderSection>,
    pub infer: Option<InferConfig>,
    pub train_metric: Vec<MetricSpec>,
    pub eval_metric: Vec<MetricSpec>,
    /// Warnings met while loading (created override keys, unsupported features enabled).
    pub warnings: Vec<String>,
}

impl Config {
    /// Loads `path`, applies `overrides` (`Key.path=value`), and validates.
    pub fn load(path: &Path, overrides: &[String]) -> ConfigResult<Config> {
        let mut tree = load_yaml(path)?;
        let mut warnings = vec![];
        for o in overrides {
            if let Some(w) = apply_override(&mut tree, o, path)? {
                warnings.push(w);
            }
        }
        Self::from_tree(tree, path, warnings)
    }

    pub fn from_tree(tree: Value, path: &Path, mut warnings: Vec<String>) -> ConfigResult<Config> {
        let root = Node::root(tree.clone(), path);
        let empty = Node {
            value: Value::Mapping(Default::default()),
            path: String::new(),
            file: root.file.clone(),
        };
        let global_node = root.get("Global").unwrap_or_else(|| empty.clone());
        let data = root.get("DataLoader");
        let train_data = data
            .as_ref()
            .and_then(|d| d.get("Train"))
            .map(|n| parse_loader(&n))
            .transpose()?;
        let eval_data = data
            .as_ref()
            .and_then(|d| d.get("Eval"))
            .map(|n| parse_loader(&n))
            .transpose()?;
        let global = parse_global(&global_node, train_data.as_ref())?;
        let arch = parse_arch(&root.require("Arch")?, &global_node)?;
        let (train_loss, eval_loss) = match root.get("Loss") {
            Some(l) => (
                l.get("Train")
                    .map(|n| parse_losses(&n))
                    .transpose()?
                    .unwrap_or_default(),
                l.get("Eval")
                    .map(|n| parse_losses(&n))
                    .transpose()?
                    .unwrap_or_default(),
            ),
            None => (vec![], vec![]),
        };
        let optimizer = root
            .get("Optimizer")
            .map(|n| parse_optimizer(&n))
            .transpose()?;
        let infer = root.get("Infer").map(|n| parse_infer(&n)).transpose()?;
        let (train_metric, eval_metric) = match root.get("Metric") {
            Some(m) => (
                m.get("Train")
                    .map(|n| parse_metrics(&n))
                    .transpose()?
                    .unwrap_or_default(),
                m.get("Eval")
                    .map(|n| parse_metrics(&n))
                    .transpose()?
                    .unwrap_or_default(),
            ),
            None => (vec![], vec![]),
        };
        if let Some(amp) = root.get("AMP") {
            if amp.bool_or("use_amp", false)? {
                warnings.push(format!(
                    "{}: AMP.use_amp is set; mixed precision is not yet supported, training runs in fp32",
                    path.display()
                ));
            }
        }
        if root.get("EMA").is_some() {
            warnings.push(format!(
                "{}: EMA is configured; EMA is not yet supported and is ignored",
                path.display()
            ));
        }
        Ok(Config {
            file: path.to_path_buf(),
            tree,
            global,
            arch,
            train_loss,
            eval_loss,
            optimizer,
            train_data,
            eval_data,
            infer,
            train_metric,
            eval_metric,
            warnings,
        })
    }

    pub fn train_section(&self) -> ConfigResult<&LoaderSection> {
        self.train_data
            .as_ref()
            .ok_or_else(|| self.missing("DataLoader.Train"))
    }
    pub fn eval_section(&self) -> ConfigResult<&LoaderSection> {
        self.eval_data
            .as_ref()
            .ok_or_else(|| self.missing("DataLoader.Eval"))
    }
    pub fn optimizer(&self) -> ConfigResult<&OptimizerConfig> {
        self.optimizer
            .as_ref()
            .ok_or_else(|| self.missing("Optimizer"))
    }
    fn missing(&self, key: &str) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            key: key.into(),
            message: "missing (required for this command)".into(),
        }
    }
}

fn opt_path(n: &Node, key: &str) -> ConfigResult<Option<PathBuf>> {
    Ok(n.str(key)?.filter(|s| !s.is_empty()).map(PathBuf::from))
}

fn parse_global(g: &Node, train: Option<&LoaderSection>) -> ConfigResult<GlobalConfig> {
    let device = match g.str_or("device", "cpu")?.to_ascii_lowercase().as_str() {
        "cpu" => DeviceKind::Cpu,
        "gpu" | "cuda" => DeviceKind::Gpu,
        other => {
            return Err(g
                .require("device")?
                .error(format!("unknown device {other:?}; expected cpu or gpu")));
        }
    };
    let image_shape = match g.usize_list("image_shape")? {
        None => [3, 224, 224],
        Some(v) if v.len() == 3 => [v[0], v[1], v[2]],
        Some(_) => {
            return Err(g
                .require("image_shape")?
                .error("expected [channels, height, width]"))
        }
    };
    let positive = |key: &str, default: usize| -> ConfigResult<usize> {
        let v = g.usize_or(key, default)?;
        if v == 0 {
            return Err(g.require(key)?.error("must be at least 1"));
        }
        Ok(v)
    };
    Ok(GlobalConfig {
        checkpoints: opt_path(g, "checkpoints")?,
        pretrained_model: opt_path(g, "pretrained_model")?,
        output_dir: opt_path(g, "output_dir")?.unwrap_or_else(|| PathBuf::from("./output/")),
        device,
        save_interval: positive("save_interval", 1)?,
        eval_during_train: g.bool_or("eval_during_train", true)?,
        eval_interval: positive("eval_interval", 1)?,
        start_eval_epoch: g.usize_or("start_eval_epoch", 0)?,
        epochs: positive("epochs", 1)?,
        print_batch_step: positive("print_batch_step", 10)?,
        image_shape,
        save_inference_dir: opt_path(g, "save_inference_dir")?
            .unwrap_or_else(|| PathBuf::from("./inference")),
        seed: g
            .get("seed")
            .map(|n| n.as_usize())
            .transpose()?
            .map(|s| s as u64)
            .unwrap_or(42),
        frozen_bn_uses_batch_stats: g.bool_or("frozen_bn_uses_batch_stats", false)?,
        threads: g
            .usize("threads")?
            .or(train.map(|t| t.num_workers))
            .filter(|&t| t > 0),
        bn_stat_splits: positive("bn_stat_splits", 1)?,
        pretrained_dir: opt_path(g, "pretrained_dir")?
            .unwrap_or_else(crate::weights::import::default_weights_dir),
        teacher_check_batches: g.usize_or("teacher_check_batches", 4)?,
    })
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

fn parse_model(
    key: String,
    params: Node,
    class_num: usize,
    frozen: bool,
) -> ConfigResult<ModelSpec> {
    let name = params.require("name")?.as_str()?;
    Ok(ModelSpec {
        key,
        class_num: params.usize_or("class_num", class_num)?,
        pretrained: parse_pretrained(&params)?,
        return_patterns: params.str_list("return_patterns")?.unwrap_or_default(),
        frozen,
        name,
        params,
    })
}

fn parse_arch(a: &Node, global: &Node) -> ConfigResult<ArchConfig> {
    let name = a.require("name")?.as_str()?;
    // Global.class_num is the deprecated spelling of Arch.class_num.
    let class_num = match a.usize("class_num")? {
        Some(c) => c,
        None => global.usize_or("class_num", 1000)?,
    };
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
    let entries = a.require("models")?.items()?;
    let freeze = freeze_list(a, entries.len(), "Arch.models")?;
    let mut models = vec![];
    let mut attention = vec![];
    for (entry, frozen) in entries.iter().zip(freeze) {
        let (key, params) = entry.single_key_entry()?;
        if models.iter().any(|m: &ModelSpec| m.key == key) {
            return Err(entry.error(format!("model name `{key}` appears twice")));
        }
        if params.str("name")?.as_deref() == Some("AttentionModel") {
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
        None => global
            .str("infer_model_name")?
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

fn parse_losses(n: &Node) -> ConfigResult<Vec<LossSpec>> {
    n.items()?
        .iter()
        .map(|e| {
            let (name, params) = e.single_key_entry()?;
            let weight = params.f64_or("weight", 1.0)?;
            Ok(LossSpec {
                name,
                weight,
                params,
            })
        })
        .collect()
}

fn parse_optimizer(o: &Node) -> ConfigResult<OptimizerConfig> {
    let name = o.str_or("name", "Momentum")?;
    let mut weight_decay = o.f64_or("weight_decay", 0.0)?;
    if let Some(r) = o.get("regularizer") {
        let kind = r.str_or("name", "L2")?;
        if !kind.eq_ignore_ascii_case("L2") {
            return Err(r.error(format!("regularizer {kind:?} is not supported (only L2)")));
        }
        weight_decay = r.f64_or("coeff", 0.0)?;
    }
    let lr = o.require("lr")?;
    let lr = LrConfig {
        name: lr.str_or("name", "ConstLR")?,
        learning_rate: lr.require("learning_rate")?.as_f64()?,
        warmup_epoch: lr.f64_or("warmup_epoch", 0.0)?,
        warmup_start_lr: lr.f64_or("warmup_start_lr", 0.0)?,
        by_epoch: lr.bool_or("by_epoch", false)?,
        params: lr,
    };
    Ok(OptimizerConfig {
        name,
        momentum: o.f64_or("momentum", 0.9)?,
        weight_decay,
        use_nesterov: o.bool_or("use_nesterov", false)?,
        lr,
    })
}

fn parse_specs(n: &Node) -> ConfigResult<Vec<Spec>> {
    n.items()?
        .iter()
        .map(|e| {
            e.single_key_entry()
                .map(|(name, params)| Spec { name, params })
        })
        .collect()
}

fn parse_loader(n: &Node) -> ConfigResult<LoaderSection> {
    let d = n.require("dataset")?;
    let dataset = DatasetConfig {
        name: d.str_or("name", "ImageNetDataset")?,
        image_root: PathBuf::from(d.require("image_root")?.as_str()?),
        cls_label_path: PathBuf::from(d.require("cls_label_path")?.as_str()?),
        delimiter: d.str("delimiter")?,
        transforms: d
            .get("transform_ops")
            .map(|t| parse_specs(&t))
            .transpose()?
            .unwrap_or_default(),
    };
    let s = n.require("sampler")?;
    let batch_size = s.require("batch_size")?.as_usize()?;
    if batch_size == 0 {
        return Err(s.require("batch_size")?.error("must be at least 1"));
    }
    let sampler = SamplerConfig {
        batch_size,
        drop_last: s.bool_or("drop_last", false)?,
        shuffle: s.bool_or("shuffle", false)?,
    };
    let num_workers = n
        .get("loader")
        .map(|l| l.usize_or("num_workers", 0))
        .transpose()?
        .unwrap_or(0);
    Ok(LoaderSection {
        dataset,
        sampler,
        num_workers,
    })
}

fn parse_infer(n: &Node) -> ConfigResult<InferConfig> {
    let (topk, class_id_map_file) = match n.get("PostProcess") {
        Some(p) => (p.usize_or("topk", 5)?, opt_path(&p, "class_id_map_file")?),
        None => (5, None),
    };
    Ok(InferConfig {
        infer_imgs: opt_path(n, "infer_imgs")?,
        batch_size: n.usize_or("batch_size", 10)?.max(1),
        transforms: n
            .get("transforms")
            .map(|t| parse_specs(&t))
            .transpose()?
            .unwrap_or_default(),
        topk,
        class_id_map_file,
    })
}

fn parse_metrics(n: &Node) -> ConfigResult<Vec<MetricSpec>> {
    n.items()?
        .iter()
        .map(|e| {
            let (name, p) = e.single_key_entry()?;
            match name.as_str() {
                "DistillationTopkAcc" | "TopkAcc" => Ok(MetricSpec {
                    model_key: p.str("model_key")?,
                    topk: p.usize_list("topk")?.unwrap_or_else(|| vec![1, 5]),
                }),
                other => Err(e.error(format!(
                    "unknown metric {other:?}; known: TopkAcc, DistillationTopkAcc"
                ))),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/paddleclas-configs")
    }

    #[test]
    fn every_shipped_paddleclas_config_loads_unchanged() {
        let mut n = 0;
        for entry in std::fs::read_dir(reference_dir()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
                continue;
            }
            let cfg = Config::load(&path, &[]).unwrap_or_else(|e| panic!("{e}"));
            assert!(cfg.arch.distillation, "{}", path.display());
            assert!(!cfg.train_loss.is_empty());
            assert!(cfg.optimizer.is_some());
            n += 1;
        }
        assert_eq!(n, 13);
    }

    #[test]
    fn dkd_config_reads_the_expected_values() {
        let cfg = Config::load(
            &reference_dir().join("resnet34_distill_resnet18_dkd.yaml"),
            &[
                "Global.epochs=3".into(),
                "Loss.Train.1.DistillationDKDLoss.temperature=4".into(),
            ],
        )
        .unwrap();
        assert_eq!(cfg.global.epochs, 3);
        assert_eq!(cfg.arch.models[0].key, "Teacher");
        assert!(cfg.arch.models[0].frozen);
        assert_eq!(cfg.arch.models[0].pretrained, Pretrained::Released);
        assert_eq!(cfg.arch.infer_model_name, "Student");
        assert_eq!(
            cfg.train_loss[1].params.f64("temperature").unwrap(),
            Some(4.0)
        );
        let opt = cfg.optimizer.unwrap();
        assert_eq!(opt.weight_decay, 1e-4); // the YAML has the string-free scalar 1e-4
        assert_eq!(opt.lr.name, "MultiStepDecay");
        assert_eq!(cfg.train_data.unwrap().sampler.batch_size, 128);
        assert_eq!(cfg.infer.unwrap().topk, 5);
    }

    #[test]
    fn bad_value_error_names_file_and_key() {
        let e = Config::load(
            &reference_dir().join("resnet34_distill_resnet18_dkd.yaml"),
            &["Global.epochs=abc".into()],
        )
        .unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("resnet34_distill_resnet18_dkd.yaml") && s.contains("Global.epochs"),
            "{s}"
        );
    }

    #[test]
    fn afd_anchors_resolve() {
        let cfg = Config::load(
            &reference_dir().join("resnet34_distill_resnet18_afd.yaml"),
            &[],
        )
        .unwrap();
        // An AttentionModel becomes its backbone plus an AFD transform; anchors feed both.
        let teacher = &cfg.arch.models[0];
        assert_eq!(
            (teacher.key.as_str(), teacher.name.as_str()),
            ("Teacher", "ResNet34")
        );
        assert!(teacher.frozen, "inner freeze_params_list [True, False]");
        assert!(!cfg.arch.models[1].frozen);
        assert_eq!(teacher.return_patterns.len(), 16);
        let t = &cfg.arch.attention[0];
        assert_eq!((t.name.as_str(), t.qk_dim), ("LinearTransformTeacher", 128));
        assert_eq!(t.keys, teacher.return_patterns);
        assert_eq!(cfg.arch.attention[1].keys.len(), 8);
    }

    #[test]
    fn amp_enabled_is_reported() {
        let cfg = Config::load(&reference_dir().join("PPLCNet_x2_5_dml.yaml"), &[]).unwrap();
        assert!(cfg.warnings.iter().any(|w| w.contains("AMP")));
    }
}
