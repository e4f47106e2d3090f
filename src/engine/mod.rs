//! The engine: commands a worker runs (check, train, eval, infer, export), generic over burn's
//! backends and chosen at run time from `Global.device`.

pub mod backend;
pub mod checkpoint;
pub mod config;
pub mod evaluate;
pub mod export;
pub mod finite;
pub mod infer;
pub mod onnx;
pub mod output_dir;
pub mod setup;
pub mod train;
pub mod trainable;

use crate::arch::Pretrained;
use crate::parallel::Collective;
use anyhow::Result;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

pub use backend::CpuBackend;
#[cfg(feature = "cuda")]
pub use backend::CudaBackend;
#[cfg(feature = "wgpu")]
pub use backend::WgpuBackend;
pub use config::{Config, DeviceKind, GlobalConfig};
pub use evaluate::EvalReport;
pub use infer::{InferResult, InferSource};
pub use train::TrainSummary;

/// What a worker is told besides the config.
pub struct RunOptions {
    /// Set (e.g. by a signal handler) to stop training after the current step, saving `latest`.
    pub stop: Arc<AtomicBool>,
    /// Other workers (single-process: a no-op).
    pub collective: Box<dyn Collective>,
    /// Draw a progress bar (when stdout is a terminal).
    pub progress: bool,
    /// The device on this machine `--gpus` chose: a CUDA ordinal, or an index into the wgpu
    /// adapter list; `None`: the backend's default (GPU 0, wgpu's preferred adapter). Ignored
    /// on the CPU.
    pub local_device: Option<usize>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            stop: Arc::new(AtomicBool::new(false)),
            collective: Box::new(crate::parallel::SingleProcess),
            progress: false,
            local_device: None,
        }
    }
}

/// `kd-launch train` on the device `Global.device` names.
pub fn run_train(cfg: &Config, opts: RunOptions) -> Result<TrainSummary> {
    crate::with_backend!(cfg, opts, |B, dev| train::train::<B>(cfg, dev, opts))
}

/// `kd-launch eval`.
pub fn run_eval(cfg: &Config, opts: RunOptions) -> Result<EvalReport> {
    crate::with_backend!(cfg, opts, |B, dev| evaluate::eval_command::<B>(
        cfg, dev, opts
    ))
}

/// `kd-launch export`; returns the export directory.
pub fn run_export(cfg: &Config, opts: RunOptions) -> Result<std::path::PathBuf> {
    crate::with_backend!(cfg, opts, |B, dev| export::export::<B>(cfg, dev))
}

/// `kd-launch infer`: from an export (CPU) or from a config (its device).
pub fn run_infer(
    source: InferSource,
    images: Option<&std::path::Path>,
    opts: RunOptions,
) -> Result<Vec<InferResult>> {
    match source {
        InferSource::Export(_) => infer::infer::<CpuBackend>(source, images, Default::default()),
        InferSource::Config(cfg) => crate::with_backend!(cfg, opts, |B, dev| infer::infer::<B>(
            InferSource::Config(cfg),
            images,
            dev
        )),
    }
}

/// Asks glibc's allocator to keep freed memory instead of returning it to the kernel: CPU
/// training allocates and frees the same large activation buffers every step, and re-faulting
/// their pages cost about a tenth of a ResNet step here.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before training starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

/// Sets the CPU thread pool size once (compute threads for the flex backend).
pub fn init_cpu_threads(threads: Option<usize>) {
    let n = threads
        .or_else(|| {
            std::env::var("KD_THREADS")
                .ok()
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
    // Fails only if the pool was already built, which is fine.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n.max(1))
        .build_global();
}

/// `kd-launch check`: validate, build the models and losses, and describe them.
pub fn check(cfg: &Config) -> Result<String> {
    let mut out = vec![];
    if let Some(missing) = backend::missing_feature(cfg.global.device) {
        out.push(format!("warning: {missing}"));
    }
    let model = crate::arch::DistillationModel::<CpuBackend>::new(
        &cfg.arch,
        cfg.global.frozen_bn_uses_batch_stats,
        &Default::default(),
    )?;
    out.push(format!("config: {}", cfg.file.display()));
    for slot in &model.slots {
        let params = if slot.spec.frozen {
            model.frozen[slot.index].num_trainable_params()
        } else {
            model.trainable[slot.index].num_trainable_params()
        };
        let mut line = format!(
            "model {}: {} ({} classes), {:.3}M parameters, {}",
            slot.key,
            slot.spec.name,
            slot.spec.class_num,
            params as f64 / 1e6,
            if slot.spec.frozen {
                "frozen"
            } else {
                "trainable"
            }
        );
        if !slot.spec.return_patterns.is_empty() {
            line.push_str(&format!(
                ", features {}",
                slot.spec.return_patterns.join(" ")
            ));
        }
        out.push(line);
        match &slot.spec.pretrained {
            Pretrained::None => {}
            Pretrained::Released => {
                match crate::weights::import::resolve_released(
                    &slot.spec,
                    &cfg.global.pretrained_dir,
                ) {
                    Ok(f) => out.push(format!(
                        "model {}: released weights {}",
                        slot.key,
                        f.display()
                    )),
                    Err(e) => out.push(format!("warning: {e:#}")),
                }
            }
            Pretrained::Path(p) => match checkpoint::resolve_model_file(p, &slot.key) {
                Ok(f) => out.push(format!(
                    "model {}: pretrained weights {}",
                    slot.key,
                    f.display()
                )),
                Err(e) => out.push(format!("warning: model {}: {e:#}", slot.key)),
            },
        }
    }
    out.push(format!("infer model: {}", cfg.arch.infer_model_name));
    let loss = crate::loss::CombinedLoss::new(&cfg.train_loss, &cfg.arch)?;
    loss.check_models(
        &model
            .slots
            .iter()
            .map(|s| s.key.as_str())
            .collect::<Vec<_>>(),
    )?;
    out.push(format!(
        "train loss terms: {}",
        loss.term_names().join(", ")
    ));
    let parts = loss.init_parts::<CpuBackend>(&Default::default());
    if !parts.is_empty() {
        use burn::module::Module;
        out.push(format!(
            "losses' own trainable layers: {:.3}M parameters (incl. BatchNorm statistics)",
            parts.num_params() as f64 / 1e6
        ));
    }
    if !cfg.eval_loss.is_empty() {
        out.push(format!(
            "eval loss terms: {}",
            crate::loss::CombinedLoss::for_eval(&cfg.eval_loss, &cfg.arch)?
                .term_names()
                .join(", ")
        ));
    }
    if let Some(o) = &cfg.optimizer {
        crate::optim::sgd_config(o)?;
        crate::optim::LrSchedule::new(&o.lr, cfg.global.epochs, 1);
        out.push(format!(
            "optimizer: {} (momentum {}, weight decay {}), lr {} {} over {} epochs",
            o.name, o.momentum, o.weight_decay, o.lr.name, o.lr.learning_rate, cfg.global.epochs
        ));
    }
    for (name, sec) in [("Train", &cfg.train_data), ("Eval", &cfg.eval_data)] {
        if let Some(sec) = sec {
            crate::data::transforms::build(&sec.dataset.transforms)?;
            let list = &sec.dataset.cls_label_path;
            let state = if list.is_file() {
                "found"
            } else {
                "not found here"
            };
            out.push(format!(
                "data {name}: {} ({state}), batch {}",
                list.display(),
                sec.sampler.batch_size
            ));
        }
    }
    if let Some(inf) = &cfg.infer {
        crate::data::transforms::build(&inf.transforms)?;
    }
    for w in &cfg.warnings {
        out.push(format!("warning: {w}"));
    }
    // Everything the config describes has been built above: every key is now read or unknown.
    for w in cfg.unknown_key_warnings() {
        out.push(format!("warning: {w}"));
    }
    Ok(out.join("\n"))
}

/// Logs the config's keys that nothing read (see [`Config::unknown_key_warnings`]): called by
/// each command once it has built everything it uses and before any work, and only where `log`
/// (rank 0, so a group says it once).
pub(crate) fn log_unknown_keys(cfg: &Config, log: bool) {
    if log {
        for w in cfg.unknown_key_warnings() {
            tracing::warn!("{w}");
        }
    }
}
