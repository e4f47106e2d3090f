//! Running a command in this process: loading its config, connecting the group's collective,
//! and calling the engine (or the dataset tools); prints the command's result.

use crate::cli::{Cli, Command, ConfigArgs, DatasetCommand};
use crate::role::{worker_threads, Device};
use anyhow::{bail, Result};
use kd_engine::engine::{self, DeviceKind, InferSource, RunOptions};
use kd_engine::parallel::{Exchange, Rendezvous};
use kd_engine::Config;
use std::io::IsTerminal;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// The config a command names, on the device the role decides: `--nproc` workers on the CPU
/// whatever the config says; `--gpus` workers on the config's GPU backend (wgpu when
/// `Global.device` says so, else CUDA).
pub fn load_config(args: &ConfigArgs, device: Device) -> Result<Config> {
    let mut cfg = Config::load(&args.config, &args.overrides)?;
    match device {
        Device::FromConfig => {}
        Device::Cpu => cfg.global.device = DeviceKind::Cpu,
        Device::Gpu(_) => {
            if cfg.global.device == DeviceKind::Cpu {
                cfg.global.device = DeviceKind::Gpu;
            }
        }
    }
    for w in &cfg.warnings {
        tracing::warn!("{w}");
    }
    Ok(cfg)
}

/// Runs the command in this process as rank `rank` of the group `rendezvous` describes.
pub fn run_job(
    cli: &Cli,
    rendezvous: Rendezvous,
    rank: usize,
    device: Device,
    stop: Arc<AtomicBool>,
) -> Result<i32> {
    let local_device = match device {
        Device::Gpu(id) => Some(id),
        Device::FromConfig | Device::Cpu => None,
    };
    let collective = |cfg: &Config| -> Result<Box<dyn kd_engine::parallel::Collective>> {
        let exchange = if cfg.global.device == DeviceKind::Gpu {
            gpu_exchange()?
        } else {
            Exchange::Host
        };
        kd_engine::parallel::connect(&rendezvous, exchange, local_device.unwrap_or(0))
    };
    let single = rendezvous == Rendezvous::Single;
    if !single {
        tracing::info!(
            "kd-launch worker: rank {rank} ({}) on host {} (pid {}), device {}",
            rendezvous_kind(&rendezvous),
            hostname(),
            std::process::id(),
            match device {
                Device::FromConfig => "from the config".to_string(),
                Device::Cpu => "cpu".to_string(),
                Device::Gpu(g) => format!("{g} of --gpus"),
            }
        );
    }
    let threads = worker_threads(cli.threads, &rendezvous);
    if !single && !cli.command.distributed() && rank != 0 {
        tracing::info!("rank {rank}: this command runs on rank 0 only");
        return Ok(0);
    }
    let opts = |collective: Box<dyn kd_engine::parallel::Collective>| RunOptions {
        stop: stop.clone(),
        collective,
        progress: single && std::io::stdout().is_terminal(),
        local_device,
    };
    match &cli.command {
        Command::Check(a) => {
            let cfg = load_config(a, device)?;
            println!("{}", engine::check(&cfg)?);
            println!("config OK");
        }
        Command::Train(a) => {
            let cfg = load_config(a, device)?;
            engine::init_cpu_threads(threads);
            let s = engine::run_train(&cfg, opts(collective(&cfg)?))?;
            let ckpt = s.output_dir.display();
            if s.stopped_early {
                if rank == 0 {
                    println!("stopped; resume with: -o Global.checkpoints={ckpt}/latest");
                }
                return Ok(130);
            }
            if rank == 0 {
                println!(
                    "done: {} epochs, best top1 {:.5} at epoch {}; checkpoints in {ckpt}/{{latest,best_model,epoch_N}}",
                    s.state.epoch, s.state.best_top1, s.state.best_epoch
                );
            }
        }
        Command::Eval(a) => {
            let cfg = load_config(a, device)?;
            engine::init_cpu_threads(threads);
            let r = engine::run_eval(&cfg, opts(collective(&cfg)?))?;
            if rank == 0 {
                println!("eval: {} samples, {}", r.samples, r.averages.format(5));
            }
        }
        Command::Export(a) => {
            let cfg = load_config(a, device)?;
            let dir = engine::run_export(&cfg, opts(Box::new(kd_engine::parallel::SingleProcess)))?;
            println!(
                "exported model {} to {}",
                cfg.arch.infer_model_name,
                dir.display()
            );
        }
        Command::Infer {
            config,
            overrides,
            model,
            images,
            logits,
        } => {
            engine::init_cpu_threads(threads);
            let opts = opts(Box::new(kd_engine::parallel::SingleProcess));
            let results = match (config, model) {
                (_, Some(dir)) => {
                    if matches!(device, Device::Gpu(_)) {
                        bail!("infer --model runs on the CPU in this version; omit --gpus");
                    }
                    engine::run_infer(InferSource::Export(dir), images.as_deref(), opts)?
                }
                (Some(c), None) => {
                    let cfg = load_config(
                        &ConfigArgs {
                            config: c.clone(),
                            overrides: overrides.clone(),
                        },
                        device,
                    )?;
                    engine::run_infer(InferSource::Config(&cfg), images.as_deref(), opts)?
                }
                (None, None) => bail!("infer needs --model <export dir> or -c <config>"),
            };
            for mut r in results {
                if !logits {
                    r.logits = None;
                }
                println!("{}", serde_json::to_string(&r)?);
            }
        }
        Command::Dataset {
            which:
                DatasetCommand::FashionMnist {
                    out,
                    source,
                    train_count,
                    val_count,
                },
        } => {
            let (t, v) =
                kd_engine::data::fashion_mnist::convert(source, out, *train_count, *val_count)?;
            println!(
                "wrote {t} training and {v} validation images with list files to {}",
                out.display()
            );
        }
        Command::Dataset {
            which:
                DatasetCommand::Synthetic {
                    out,
                    train_count,
                    val_count,
                    size,
                    classes,
                    seed,
                },
        } => {
            engine::init_cpu_threads(threads);
            let spec = kd_engine::data::synthetic::SyntheticSpec {
                train_count: *train_count,
                val_count: *val_count,
                size: *size,
                classes: *classes,
                seed: *seed,
            };
            let (t, v) = kd_engine::data::synthetic::generate(out, &spec)?;
            println!(
                "wrote {t} training and {v} validation {size}x{size} images with list files to {}",
                out.display()
            );
        }
        Command::Dataset {
            which:
                DatasetCommand::SsldList {
                    list,
                    unlabeled,
                    image_root,
                    out,
                },
        } => {
            let (l, u) = kd_engine::data::ssld::write_list(list, unlabeled, image_root, out)?;
            println!(
                "wrote {}: {l} labelled lines + {u} unlabelled images (label 0)",
                out.display()
            );
        }
    }
    Ok(0)
}

/// How CUDA workers exchange gradients: NCCL in device memory; `KD_GPU_COLLECTIVE=host`: over
/// the rendezvous connections (workers sharing a GPU, which NCCL refuses);
/// `KD_GPU_COLLECTIVE=nccl`: NCCL even for one worker (to check its path on one GPU).
pub fn gpu_exchange() -> Result<Exchange> {
    match std::env::var("KD_GPU_COLLECTIVE").as_deref() {
        Err(_) | Ok("") => Ok(Exchange::Nccl),
        Ok("host") => Ok(Exchange::Host),
        Ok("nccl") => Ok(Exchange::NcclAlways),
        Ok(other) => bail!("KD_GPU_COLLECTIVE={other:?}: expected host or nccl"),
    }
}

fn rendezvous_kind(rv: &Rendezvous) -> &'static str {
    match rv {
        Rendezvous::Single => "single",
        Rendezvous::Tcp { .. } => "tcp",
        Rendezvous::Mpi => "mpi",
    }
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    if ok {
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "?".into()
    }
}
