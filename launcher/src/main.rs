//! `kd-launch`: the command line. It parses arguments, sets up logging and signals, and hands one
//! job to the engine library; it holds no tensor code.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use kd_engine::config::Config;
use kd_engine::engine::{self, InferSource, RunOptions};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Parser, Debug)]
#[command(
    name = "kd-launch",
    version,
    about = "Knowledge distillation for image classifiers (PaddleClas-compatible configs)"
)]
struct Cli {
    /// GPU ids to use, e.g. `0` (one id: a single worker in this process, the debugging mode).
    #[arg(long, global = true)]
    gpus: Option<String>,
    /// Number of worker processes (CPU).
    #[arg(long, global = true)]
    nproc: Option<usize>,
    /// CPU compute threads (default: all cores; also KD_THREADS).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Clone)]
struct ConfigArgs {
    /// PaddleClas-style YAML config.
    #[arg(short = 'c', long = "config")]
    config: PathBuf,
    /// Overrides `Key.path=value` (numeric segments index lists); repeatable.
    #[arg(short = 'o', long = "override", num_args = 1.., action = clap::ArgAction::Append)]
    overrides: Vec<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate a config, build its models and losses, print what would run.
    Check(ConfigArgs),
    /// Train (distill) as the config says.
    Train(ConfigArgs),
    /// Evaluate weights (`-o Global.pretrained_model=<checkpoint dir>`).
    Eval(ConfigArgs),
    /// Export the `infer_model_name` model to `Global.save_inference_dir`.
    Export(ConfigArgs),
    /// Classify images with an export (`--model`) or a config and checkpoint (`-c`).
    Infer {
        #[arg(short = 'c', long = "config", conflicts_with = "model")]
        config: Option<PathBuf>,
        #[arg(short = 'o', long = "override", num_args = 1.., action = clap::ArgAction::Append)]
        overrides: Vec<String>,
        /// Directory written by `kd-launch export`.
        #[arg(long)]
        model: Option<PathBuf>,
        /// An image file or a directory of images (default: Infer.infer_imgs).
        #[arg(long)]
        images: Option<PathBuf>,
    },
    /// Prepare a bundled dataset.
    Dataset {
        #[command(subcommand)]
        which: DatasetCommand,
    },
}

#[derive(Subcommand, Debug)]
enum DatasetCommand {
    /// Fashion-MNIST IDX files (Debian's dataset-fashion-mnist) → PNG files + list files.
    FashionMnist {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = kd_engine::data::fashion_mnist::DEFAULT_SOURCE)]
        source: PathBuf,
        #[arg(long, default_value_t = 60000)]
        train_count: usize,
        #[arg(long, default_value_t = 10000)]
        val_count: usize,
    },
    /// SSLD training list: a labelled list plus every image under --unlabeled with label 0.
    SsldList {
        /// The labelled list file (`<path> <label>` lines).
        #[arg(long)]
        list: PathBuf,
        /// A directory of unlabelled images (searched recursively).
        #[arg(long)]
        unlabeled: PathBuf,
        /// The dataset's `image_root`; list paths are written relative to it.
        #[arg(long)]
        image_root: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
}

fn load(args: &ConfigArgs, device_override: Option<&str>) -> Result<Config> {
    let mut overrides = args.overrides.clone();
    if let Some(d) = device_override {
        overrides.push(format!("Global.device={d}"));
    }
    let cfg = Config::load(&args.config, &overrides)?;
    for w in &cfg.warnings {
        tracing::warn!("{w}");
    }
    Ok(cfg)
}

/// Parses `--gpus` / `--nproc` into (device override, local device index).
fn placement(cli: &Cli) -> Result<(Option<&'static str>, usize)> {
    if cli.nproc.is_some_and(|n| n > 1) {
        bail!("--nproc {}: multi-process training is not available in this version; run one worker (omit --nproc)", cli.nproc.unwrap());
    }
    match &cli.gpus {
        None => Ok((None, 0)),
        Some(list) => {
            let ids: Vec<usize> = list
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| {
                    s.trim()
                        .parse()
                        .with_context(|| format!("--gpus {list:?}: {s:?} is not a GPU id"))
                })
                .collect::<Result<_>>()?;
            match ids.as_slice() {
                [] => Ok((None, 0)),
                [one] => Ok((Some("gpu"), *one)),
                _ => bail!("--gpus {list}: multi-GPU training is not available in this version; give one GPU id"),
            }
        }
    }
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    engine::keep_freed_memory();
    let (device_override, local_device) = placement(&cli)?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                eprintln!("second interrupt: exiting now");
                std::process::exit(130);
            }
            eprintln!("interrupt: stopping after the current step and saving `latest` (press Ctrl-C again to exit now)");
        })
        .context("cannot install the Ctrl-C handler")?;
    }
    let opts = || RunOptions {
        stop: stop.clone(),
        progress: std::io::stdout().is_terminal(),
        local_device,
        ..Default::default()
    };
    match &cli.command {
        Command::Check(a) => {
            let cfg = load(a, device_override)?;
            println!("{}", engine::check(&cfg)?);
            println!("config OK");
        }
        Command::Train(a) => {
            let cfg = load(a, device_override)?;
            engine::init_cpu_threads(cli.threads);
            let s = engine::run_train(&cfg, opts())?;
            let ckpt = s.output_dir.display();
            if s.stopped_early {
                println!("stopped; resume with: -o Global.checkpoints={ckpt}/latest");
                std::process::exit(130);
            }
            println!(
                "done: {} epochs, best top1 {:.5} at epoch {}; checkpoints in {ckpt}/{{latest,best_model,epoch_N}}",
                s.state.epoch, s.state.best_top1, s.state.best_epoch
            );
        }
        Command::Eval(a) => {
            let cfg = load(a, device_override)?;
            engine::init_cpu_threads(cli.threads);
            let r = engine::run_eval(&cfg, opts())?;
            println!("eval: {} samples, {}", r.samples, r.averages.format(5));
        }
        Command::Export(a) => {
            let cfg = load(a, device_override)?;
            let dir = engine::run_export(&cfg, opts())?;
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
        } => {
            engine::init_cpu_threads(cli.threads);
            let results = match (config, model) {
                (_, Some(dir)) => {
                    if device_override == Some("gpu") {
                        bail!("infer --model runs on the CPU in this version; omit --gpus");
                    }
                    engine::run_infer(InferSource::Export(dir), images.as_deref(), opts())?
                }
                (Some(c), None) => {
                    let cfg = load(
                        &ConfigArgs {
                            config: c.clone(),
                            overrides: overrides.clone(),
                        },
                        device_override,
                    )?;
                    engine::run_infer(InferSource::Config(&cfg), images.as_deref(), opts())?
                }
                (None, None) => bail!("infer needs --model <export dir> or -c <config>"),
            };
            for r in results {
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
    Ok(())
}
