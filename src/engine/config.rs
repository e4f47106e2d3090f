//! The whole config: the `Global` section, which the engine owns, and every other section parsed
//! by its component (`arch`, `data`, `optim`, `metric`; losses stay specs until `loss` builds
//! them). Also the report of keys nobody read, which a command asks for once it has built
//! everything it uses.

use crate::arch::ArchConfig;
use crate::config::{apply_override, load_yaml, ConfigError, ConfigResult, LossSpec, Node};
use crate::data::config::opt_path;
use crate::data::{InferConfig, LoaderSection};
use crate::metric::MetricSpec;
use crate::optim::OptimizerConfig;
use serde_yaml::Value;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// burn-flex with kd-launch's CPU convolution.
    Cpu,
    /// burn-cuda (feature `cuda`), gradients over NCCL.
    Gpu,
    /// burn-wgpu (feature `wgpu`): Vulkan, Metal or DX12 adapters, Mesa's lavapipe on a machine
    /// without a GPU; gradients over the host collectives.
    Wgpu,
}

impl DeviceKind {
    /// The config spelling.
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Gpu => "gpu",
            DeviceKind::Wgpu => "wgpu",
        }
    }
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
    /// The tree as the sections were read from it: its read log says which keys were used.
    root: Node,
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
        let global_node = root.get_or_empty("Global");
        let data = root.get_or_empty("DataLoader");
        let train_data = data
            .get("Train")
            .map(|n| LoaderSection::parse(&n, &mut warnings))
            .transpose()?;
        let eval_data = data
            .get("Eval")
            .map(|n| LoaderSection::parse(&n, &mut warnings))
            .transpose()?;
        let global = parse_global(&global_node, train_data.as_ref())?;
        let arch = ArchConfig::parse(&root.require("Arch")?, &global_node)?;
        let loss = root.get_or_empty("Loss");
        let list = |n: Option<Node>| -> ConfigResult<Vec<LossSpec>> {
            Ok(n.map(|n| LossSpec::list(&n))
                .transpose()?
                .unwrap_or_default())
        };
        let (train_loss, eval_loss) = (list(loss.get("Train"))?, list(loss.get("Eval"))?);
        let optimizer = root
            .get("Optimizer")
            .map(|n| OptimizerConfig::parse(&n))
            .transpose()?;
        let infer = root
            .get("Infer")
            .map(|n| InferConfig::parse(&n, &mut warnings))
            .transpose()?;
        let metric = root.get_or_empty("Metric");
        let list = |n: Option<Node>| -> ConfigResult<Vec<MetricSpec>> {
            Ok(n.map(|n| MetricSpec::list(&n))
                .transpose()?
                .unwrap_or_default())
        };
        let (train_metric, eval_metric) = (list(metric.get("Train"))?, list(metric.get("Eval"))?);
        if let Some(amp) = root.get("AMP") {
            if amp.bool_or("use_amp", false)? {
                warnings.push(format!(
                    "{}: AMP.use_amp is set; mixed precision is not yet supported, training runs in fp32",
                    path.display()
                ));
            }
            // PaddleClas's mixed-precision settings: meaningless in fp32, and `use_amp` above
            // already says that fp32 is what runs.
            amp.accept(&[
                "use_fp16_test",
                "scale_loss",
                "use_dynamic_loss_scaling",
                "use_promote",
                "level",
            ]);
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
            root,
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

    /// One line per key of the file that nothing has read, in sections that were read (see
    /// [`Node::unread_keys`]). Meaningful once the command has built everything it uses (models,
    /// losses, transforms): parameters of components it does not build are not reported.
    pub fn unknown_key_warnings(&self) -> Vec<String> {
        self.root
            .unread_keys()
            .iter()
            .map(ToString::to_string)
            .collect()
    }
}

fn parse_global(g: &Node, train: Option<&LoaderSection>) -> ConfigResult<GlobalConfig> {
    let device = match g.str_or("device", "cpu")?.to_ascii_lowercase().as_str() {
        "cpu" => DeviceKind::Cpu,
        "gpu" | "cuda" => DeviceKind::Gpu,
        "wgpu" | "vulkan" => DeviceKind::Wgpu,
        other => {
            return Err(g.require("device")?.error(format!(
                "unknown device {other:?}; expected cpu, gpu or wgpu"
            )));
        }
    };
    let image_shape = match g.usize_list("image_shape")? {
        None => [3, 224, 224],
        Some(v) if v.len() == 3 && !v.contains(&0) => [v[0], v[1], v[2]],
        Some(v) => {
            return Err(g.require("image_shape")?.error(format!(
                "expected [channels, height, width], each at least 1, got {v:?}"
            )))
        }
    };
    let positive = |key: &str, default: usize| -> ConfigResult<usize> {
        let v = g.usize_or(key, default)?;
        if v == 0 {
            return Err(g.require(key)?.error("must be at least 1"));
        }
        Ok(v)
    };
    // Keys of PaddleClas's engine that change nothing kd-launch does: VisualDL logging (kd-launch
    // logs to the console and workerlog files), dynamic-to-static compilation, and the DALI
    // loader (kd-launch has its own).
    g.accept(&["use_visualdl", "to_static", "use_dali"]);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::Pretrained;

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

    /// Each value checked when the config loads fails with the file and the key path.
    #[test]
    fn out_of_range_values_name_file_and_key() {
        let file = reference_dir().join("resnet34_distill_resnet18_dkd.yaml");
        for (o, key) in [
            ("Global.epochs=0", "Global.epochs"),
            ("Global.print_batch_step=0", "Global.print_batch_step"),
            ("Global.save_interval=0", "Global.save_interval"),
            ("Global.eval_interval=0", "Global.eval_interval"),
            ("Global.bn_stat_splits=0", "Global.bn_stat_splits"),
            ("Global.image_shape=[3, 0, 224]", "Global.image_shape"),
            ("Global.image_shape=[3, 224]", "Global.image_shape"),
            ("Global.device=tpu", "Global.device"),
            (
                "DataLoader.Train.sampler.batch_size=0",
                "DataLoader.Train.sampler.batch_size",
            ),
            (
                "DataLoader.Eval.sampler.batch_size=0",
                "DataLoader.Eval.sampler.batch_size",
            ),
            ("Infer.batch_size=0", "Infer.batch_size"),
            ("Infer.PostProcess.topk=0", "Infer.PostProcess.topk"),
            (
                "Metric.Eval.0.DistillationTopkAcc.topk=[0]",
                "Metric.Eval[0].DistillationTopkAcc.topk",
            ),
            (
                "Optimizer.lr.learning_rate=-0.1",
                "Optimizer.lr.learning_rate",
            ),
            ("Optimizer.lr.learning_rate=0", "Optimizer.lr.learning_rate"),
            ("Optimizer.momentum=-0.9", "Optimizer.momentum"),
            ("Optimizer.weight_decay=-1e-4", "Optimizer.weight_decay"),
            ("Optimizer.lr.warmup_epoch=-1", "Optimizer.lr.warmup_epoch"),
            (
                "Optimizer.lr.warmup_start_lr=-0.1",
                "Optimizer.lr.warmup_start_lr",
            ),
            ("Arch.pretrained_list=[a, b]", "Arch.pretrained_list"),
        ] {
            let e = Config::load(&file, &[o.into()]).unwrap_err().to_string();
            let want = format!("{}: {key}: ", file.display());
            assert!(e.starts_with(&want), "{o}: {e}");
        }
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

    /// An unknown key in each section the config itself reads (and at the top level) is
    /// reported when loading is done, with the path and the nearest known key; the sections
    /// read by components (model, loss and transform parameters) only once those are built.
    #[test]
    fn unknown_keys_are_reported_with_path_and_suggestion() {
        let file = reference_dir().join("resnet34_distill_resnet18_dkd.yaml");
        let cases = [
            ("Globl.epochs=3", "Globl", Some("Global")),
            ("Global.epoch=5", "Global.epoch", Some("Global.epochs")),
            (
                "Arch.infer_model_nam=Student",
                "Arch.infer_model_nam",
                Some("Arch.infer_model_name"),
            ),
            (
                "Optimizer.momentun=0.8",
                "Optimizer.momentun",
                Some("Optimizer.momentum"),
            ),
            (
                "Optimizer.lr.gama=0.5",
                "Optimizer.lr.gama",
                Some("Optimizer.lr.gamma"),
            ),
            (
                "DataLoader.Train.dataset.cls_label_pth=x",
                "DataLoader.Train.dataset.cls_label_pth",
                Some("DataLoader.Train.dataset.cls_label_path"),
            ),
            (
                "DataLoader.Eval.sampler.drop_lats=True",
                "DataLoader.Eval.sampler.drop_lats",
                Some("DataLoader.Eval.sampler.drop_last"),
            ),
            (
                "DataLoader.Train.loader.num_worker=2",
                "DataLoader.Train.loader.num_worker",
                Some("DataLoader.Train.loader.num_workers"),
            ),
            (
                "Infer.batchsize=2",
                "Infer.batchsize",
                Some("Infer.batch_size"),
            ),
            (
                "Metric.Train.0.DistillationTopkAcc.top_k=[1]",
                "Metric.Train[0].DistillationTopkAcc.top_k",
                Some("Metric.Train[0].DistillationTopkAcc.topk"),
            ),
            ("AMP.use_ampp=True", "AMP.use_ampp", Some("AMP.use_amp")),
            ("Global.wandb=True", "Global.wandb", None),
        ];
        for (o, path, suggestion) in cases {
            let cfg = Config::load(&file, &[o.into()]).unwrap();
            let mut want = format!("{}: {path}: unknown key, ignored", file.display());
            if let Some(s) = suggestion {
                want.push_str(&format!("; did you mean `{s}`?"));
            }
            assert_eq!(cfg.unknown_key_warnings(), [want], "{o}");
        }
        let clean = Config::load(&file, &[]).unwrap();
        assert!(clean.unknown_key_warnings().is_empty());
    }
}
