//! `kd-launch`: the command line. It decides where the job runs (this process, local worker
//! processes, or mpirun ranks), sets up logging and signals, and hands the job to the engine
//! library; it holds no tensor code.

mod mpirun;
mod spawn;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use kd_engine::engine::{self, InferSource, RunOptions};
use kd_engine::parallel::Rendezvous;
use kd_engine::Config;
use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "kd-launch",
    version,
    about = "Knowledge distillation for image classifiers (PaddleClas-compatible configs)",
    after_help = "Placement: no --gpus/--nproc (or one device) runs the job in this process, the debugging \
mode; --gpus 0,1,.. or --nproc N starts one worker process per device (train, eval); --hostfile H --np N \
runs the ranks under Open MPI's mpirun (build with --features mpi)."
)]
struct Cli {
    /// GPU ids, e.g. `0,1,2,3`: one worker per GPU (one id: a single worker in this process).
    #[arg(long, global = true)]
    gpus: Option<String>,
    /// Number of CPU worker processes (1: this process).
    #[arg(long, global = true)]
    nproc: Option<usize>,
    /// An MPI hostfile (`<host> slots=<n>` lines, see hosts.example): run the job under mpirun.
    #[arg(long, global = true, requires = "np")]
    hostfile: Option<PathBuf>,
    /// Number of MPI ranks for --hostfile.
    #[arg(long, global = true)]
    np: Option<usize>,
    /// An extra argument for mpirun (repeatable), e.g. `--mpirun-arg=--oversubscribe`.
    #[arg(long = "mpirun-arg", global = true, allow_hyphen_values = true)]
    mpirun_args: Vec<String>,
    /// CPU compute threads per worker (default: cores / workers; also KD_THREADS).
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Directory for `workerlog.<rank>` files (default: the config's Global.output_dir).
    #[arg(long, global = true)]
    log_dir: Option<PathBuf>,
    /// Show every rank's output on the console, not only rank 0's (and others' warnings).
    #[arg(long, global = true)]
    log_all_ranks: bool,
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
        /// Also print every class's logit (e.g. to compare with an ONNX runtime).
        #[arg(long)]
        logits: bool,
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

impl Command {
    /// Commands that run on every worker of a multi-worker launch (the others run once).
    fn distributed(&self) -> bool {
        matches!(self, Command::Train(_) | Command::Eval(_))
    }

    fn config_args(&self) -> Option<&ConfigArgs> {
        match self {
            Command::Check(a) | Command::Train(a) | Command::Eval(a) | Command::Export(a) => {
                Some(a)
            }
            _ => None,
        }
    }
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

/// The device a job runs on.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Device {
    /// As the config's `Global.device` says.
    FromConfig,
    /// The CPU, whatever the config says (`--nproc` workers).
    Cpu,
    /// This GPU.
    Gpu(usize),
}

/// Where this process's job runs.
enum Role {
    /// In this process, alone (no devices listed, or one): the debugging mode.
    Foreground { device: Device },
    /// One worker of a group (started by a kd-launch launcher, by hand, or by mpirun).
    Worker {
        rendezvous: Rendezvous,
        rank: usize,
        device: Device,
    },
    /// Start one worker process per device and supervise them.
    Launcher { devices: Vec<Option<usize>> },
    /// Run the job under mpirun.
    Mpi { hostfile: PathBuf, np: usize },
}

fn parse_gpus(list: &str) -> Result<Vec<usize>> {
    let ids: Vec<usize> = list
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.trim()
                .parse()
                .with_context(|| format!("--gpus {list:?}: {s:?} is not a GPU id"))
        })
        .collect::<Result<_>>()?;
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    if sorted.len() != ids.len() {
        bail!("--gpus {list}: a GPU is listed twice");
    }
    Ok(ids)
}

fn env_usize(name: &str) -> Result<Option<usize>> {
    match std::env::var(name) {
        Err(_) => Ok(None),
        Ok(v) => v
            .parse()
            .map(Some)
            .with_context(|| format!("environment variable {name}={v:?} is not a number")),
    }
}

/// The device of an env-started worker: the launcher's `KD_LAUNCH_DEVICE` (`cpu` or
/// `gpu:<id>`), else `--gpus`'s `LOCAL_RANK`-th id, else the config's device.
fn worker_device(gpus: &[usize], local_rank: usize) -> Result<Device> {
    if let Ok(d) = std::env::var(spawn::DEVICE_VAR) {
        return match d.strip_prefix("gpu:") {
            Some(id) => Ok(Device::Gpu(
                id.parse()
                    .with_context(|| format!("{}={d}", spawn::DEVICE_VAR))?,
            )),
            None if d == "cpu" => Ok(Device::Cpu),
            None => bail!("{}={d:?}: expected cpu or gpu:<id>", spawn::DEVICE_VAR),
        };
    }
    if gpus.is_empty() {
        return Ok(Device::FromConfig);
    }
    gpus.get(local_rank)
        .copied()
        .map(Device::Gpu)
        .with_context(|| {
            format!(
                "LOCAL_RANK {local_rank}, but --gpus lists only {} GPUs",
                gpus.len()
            )
        })
}

fn role(cli: &Cli) -> Result<Role> {
    let gpus = cli
        .gpus
        .as_deref()
        .map(parse_gpus)
        .transpose()?
        .unwrap_or_default();
    if let Some((rank, _world, local)) = mpirun::worker_rank() {
        return Ok(Role::Worker {
            rendezvous: Rendezvous::Mpi,
            rank,
            device: worker_device(&gpus, local)?,
        });
    }
    // torch.distributed's env:// convention: set by our launcher, or by hand to debug one rank.
    if let (Some(rank), Some(world), Ok(addr), Ok(port)) = (
        env_usize("RANK")?,
        env_usize("WORLD_SIZE")?,
        std::env::var("MASTER_ADDR"),
        std::env::var("MASTER_PORT"),
    ) {
        let timeout = env_usize("KD_RENDEZVOUS_TIMEOUT")?.unwrap_or(300);
        return Ok(Role::Worker {
            rendezvous: if world > 1 {
                Rendezvous::Tcp {
                    addr: format!("{addr}:{port}"),
                    rank,
                    world,
                    timeout: Duration::from_secs(timeout as u64),
                }
            } else {
                Rendezvous::Single
            },
            rank,
            device: worker_device(&gpus, env_usize("LOCAL_RANK")?.unwrap_or(rank))?,
        });
    }
    if let Some(hostfile) = &cli.hostfile {
        if cli.nproc.is_some() {
            bail!("--hostfile runs --np ranks; --nproc is for local launches");
        }
        let np = cli.np.context("--hostfile needs --np N")?;
        if np == 0 {
            bail!("--np must be at least 1");
        }
        return Ok(Role::Mpi {
            hostfile: hostfile.clone(),
            np,
        });
    }
    if cli.np.is_some() {
        bail!("--np goes with --hostfile; for local CPU workers use --nproc");
    }
    let devices: Vec<Option<usize>> = match (cli.nproc, gpus.is_empty()) {
        (Some(_), false) => {
            bail!("--nproc and --gpus both given: --gpus starts one worker per listed GPU")
        }
        (Some(0), true) => bail!("--nproc must be at least 1"),
        (Some(n), true) => vec![None; n],
        (None, false) => gpus.iter().copied().map(Some).collect(),
        (None, true) => vec![None],
    };
    if devices.len() > 1 && cli.command.distributed() {
        Ok(Role::Launcher { devices })
    } else {
        if devices.len() > 1 {
            tracing::info!(
                "this command runs once: running it in this process on the first device"
            );
        }
        Ok(Role::Foreground {
            device: devices[0].map_or(Device::FromConfig, Device::Gpu),
        })
    }
}

/// kd-launch's arguments minus the launch placement ones (`--hostfile`, `--np`, `--mpirun-arg`):
/// what each worker is started with.
fn worker_args() -> Vec<OsString> {
    let mut out = vec![];
    let mut skip_next = false;
    for a in std::env::args_os().skip(1) {
        if std::mem::take(&mut skip_next) {
            continue;
        }
        let s = a.to_string_lossy();
        if ["--hostfile", "--np", "--mpirun-arg"].contains(&s.as_ref()) {
            skip_next = true;
            continue;
        }
        if ["--hostfile=", "--np=", "--mpirun-arg="]
            .iter()
            .any(|p| s.starts_with(p))
        {
            continue;
        }
        out.push(a);
    }
    out
}

/// Sets once on Ctrl-C (SIGINT), SIGTERM, or SIGUSR1 (what mpirun forwards to its ranks); a
/// second Ctrl-C or SIGTERM exits at once.
fn install_signals() -> Result<Arc<AtomicBool>> {
    static USR1: AtomicBool = AtomicBool::new(false);
    extern "C" fn on_usr1(_: libc::c_int) {
        USR1.store(true, Ordering::SeqCst);
    }
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
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe {
        libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t);
    }
    let watched = stop.clone();
    std::thread::spawn(move || loop {
        if USR1.swap(false, Ordering::SeqCst) && !watched.swap(true, Ordering::SeqCst) {
            eprintln!(
                "stop requested (SIGUSR1): stopping after the current step and saving `latest`"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    });
    Ok(stop)
}

/// Log lines go to stderr; an MPI rank also writes them to `<log_dir>/workerlog.<rank>`, and
/// only rank 0 (or every rank with --log-all-ranks) to the console.
fn init_logging(file: Option<std::fs::File>, console: bool) {
    struct Tee {
        file: Option<std::fs::File>,
        console: bool,
    }
    impl std::io::Write for Tee {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Some(f) = &mut self.file {
                f.write_all(buf)?;
            }
            if self.console {
                std::io::stderr().write_all(buf)?;
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let ansi = file.is_none() && std::io::stderr().is_terminal();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_target(false)
        .with_ansi(ansi)
        .with_writer(Mutex::new(Tee { file, console }))
        .init();
}

fn main() {
    let cli = Cli::parse();
    let code = match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

/// The output directory a config names (for worker logs), if it loads.
fn config_output_dir(cli: &Cli) -> Option<PathBuf> {
    let a = cli.command.config_args()?;
    Config::load(&a.config, &a.overrides)
        .ok()
        .map(|c| c.global.output_dir)
}

fn run(cli: &Cli) -> Result<i32> {
    let mpi_rank = mpirun::worker_rank();
    match mpi_rank {
        Some((rank, _, _)) => {
            let dir = spawn::log_dir(cli.log_dir.as_deref(), config_output_dir(cli).as_deref());
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let path = dir.join(format!("workerlog.{rank}"));
            let file = std::fs::File::create(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            init_logging(Some(file), rank == 0 || cli.log_all_ranks);
        }
        None => init_logging(None, true),
    }
    engine::keep_freed_memory();
    let stop = install_signals()?;
    match role(cli)? {
        Role::Foreground { device } => run_job(cli, Rendezvous::Single, 0, device, stop),
        Role::Worker {
            rendezvous,
            rank,
            device,
        } => run_job(cli, rendezvous, rank, device, stop),
        Role::Launcher { devices } => {
            if devices.iter().any(Option::is_some) && !cfg!(feature = "cuda") {
                bail!(
                    "--gpus: this kd-launch was built without GPU support: rebuild with \
                     `cargo build --release --features cuda` (or use --nproc N for CPU workers)"
                );
            }
            if let Some(a) = cli.command.config_args() {
                load(a, None)?; // a bad config fails here, once, not in every worker
            }
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let threads = cli
                .threads
                .or_else(|| env_usize("KD_THREADS").ok().flatten())
                .unwrap_or((cores / devices.len()).max(1));
            let launch = spawn::Launch {
                log_dir: spawn::log_dir(cli.log_dir.as_deref(), config_output_dir(cli).as_deref()),
                devices,
                args: worker_args(),
                all_ranks_to_console: cli.log_all_ranks,
                threads_per_worker: Some(threads),
            };
            spawn::run(&launch, &stop)
        }
        Role::Mpi { hostfile, np } => {
            if !kd_engine::parallel::MPI_AVAILABLE {
                bail!("--hostfile: {}", kd_engine::parallel::MPI_MISSING);
            }
            if let Some(a) = cli.command.config_args() {
                load(a, None)?;
            }
            mpirun::run(
                &hostfile,
                np,
                &worker_args(),
                &cli.mpirun_args,
                cli.threads,
                &stop,
            )
        }
    }
}

/// Runs the command in this process as rank `rank` of the group `rendezvous` describes.
fn run_job(
    cli: &Cli,
    rendezvous: Rendezvous,
    rank: usize,
    device: Device,
    stop: Arc<AtomicBool>,
) -> Result<i32> {
    let (device_override, local_device) = match device {
        Device::FromConfig => (None, 0),
        Device::Cpu => (Some("cpu"), 0),
        Device::Gpu(id) => (Some("gpu"), id),
    };
    let collective = |cfg: &Config| -> Result<Box<dyn kd_engine::parallel::Collective>> {
        // NCCL refuses two ranks on one GPU; KD_GPU_COLLECTIVE=host sends GPU workers'
        // gradients over the rendezvous connections instead (e.g. to test on one GPU).
        let nccl = cfg.global.device == kd_engine::engine::DeviceKind::Gpu
            && std::env::var("KD_GPU_COLLECTIVE").as_deref() != Ok("host");
        kd_engine::parallel::connect(&rendezvous, nccl, local_device)
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
                Device::Gpu(g) => format!("gpu {g}"),
            }
        );
    }
    // mpirun ranks share their node's cores unless told otherwise.
    let threads =
        cli.threads.or_else(
            || match (&rendezvous, env_usize("KD_THREADS").ok().flatten()) {
                (Rendezvous::Mpi, None) => {
                    let local = env_usize("OMPI_COMM_WORLD_LOCAL_SIZE")
                        .ok()
                        .flatten()
                        .unwrap_or(1)
                        .max(1);
                    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                    Some((cores / local).max(1))
                }
                _ => None,
            },
        );
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
            let cfg = load(a, device_override)?;
            println!("{}", engine::check(&cfg)?);
            println!("config OK");
        }
        Command::Train(a) => {
            let cfg = load(a, device_override)?;
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
            let cfg = load(a, device_override)?;
            engine::init_cpu_threads(threads);
            let r = engine::run_eval(&cfg, opts(collective(&cfg)?))?;
            if rank == 0 {
                println!("eval: {} samples, {}", r.samples, r.averages.format(5));
            }
        }
        Command::Export(a) => {
            let cfg = load(a, device_override)?;
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
                    let cfg = load(
                        &ConfigArgs {
                            config: c.clone(),
                            overrides: overrides.clone(),
                        },
                        device_override,
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
