//! `kd-launch`: the command line. It decides where the job runs (this process, local worker
//! processes, or mpirun ranks), sets up logging and signals, and hands the job to the engine
//! library; it holds no tensor code.
//!
//! `cli`: the options; `role`: what this process is (alone, a rank of a group, a launcher) from
//! them and the environment; `signals`: the stop flag; `dispatch`: a command run in this
//! process; `spawn` / `mpirun`: starting local workers / an mpirun job.

mod cli;
mod dispatch;
mod logging;
mod mpirun;
mod role;
mod signals;
mod spawn;

use anyhow::{bail, Context, Result};
use clap::Parser;
use cli::Cli;
use dispatch::{load_config, run_job};
use kd_engine::engine;
use kd_engine::parallel::Rendezvous;
use kd_engine::Config;
use role::Role;
use std::ffi::OsString;
use std::path::PathBuf;

fn main() {
    quiet_wayland_probe();
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

/// Vulkan drivers (Mesa's lavapipe among them) try to reach a Wayland compositor when a wgpu
/// device starts, and without `XDG_RUNTIME_DIR` libwayland prints `error: XDG_RUNTIME_DIR is
/// invalid or not set` on stderr, once per adapter probe. kd-launch draws nothing on screen, so
/// pointing the variable at the temporary directory (where no compositor's socket is found)
/// only removes the noise. Done first in `main`, before any thread exists.
fn quiet_wayland_probe() {
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir());
    }
}

/// The output directory a config names (for worker logs), if it loads.
fn config_output_dir(cli: &Cli) -> Option<PathBuf> {
    let a = cli.command.config_args()?;
    Config::load(&a.config, &a.overrides)
        .ok()
        .map(|c| c.global.output_dir)
}

/// Sets up logging and signals, then runs the job where this process's role puts it: here, in
/// local worker processes, or under mpirun. Returns the exit code.
fn run(cli: &Cli) -> Result<i32> {
    let mpi_rank = mpirun::worker_rank();
    match mpi_rank {
        Some((rank, _, _)) => {
            let dir = spawn::log_dir(cli.log_dir.as_deref(), config_output_dir(cli).as_deref());
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let path = dir.join(format!("workerlog.{rank}"));
            let file = std::fs::File::create(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            logging::init(Some(file), rank == 0 || cli.log_all_ranks);
        }
        None => logging::init(None, true),
    }
    engine::keep_freed_memory();
    let stop = signals::install()?;
    match role::of_this_process(cli)? {
        Role::Foreground { device } => run_job(cli, Rendezvous::Single, 0, device, stop),
        Role::Worker {
            rendezvous,
            rank,
            device,
        } => run_job(cli, rendezvous, rank, device, stop),
        Role::Launcher { devices } => {
            let on_gpus = devices.iter().any(Option::is_some);
            if let Some(a) = cli.command.config_args() {
                // A bad config fails here, once, not in every worker.
                let device = if on_gpus {
                    role::Device::Gpu(0)
                } else {
                    role::Device::Cpu
                };
                let cfg = load_config(a, device)?;
                if let Some(missing) = engine::backend::missing_feature(cfg.global.device) {
                    bail!("--gpus: {missing} (or use --nproc N for CPU workers)");
                }
                if let Some(id) = role::repeated_gpu(&devices) {
                    if cfg.global.device == engine::DeviceKind::Gpu
                        && dispatch::gpu_exchange()? != kd_engine::parallel::Exchange::Host
                    {
                        bail!(
                            "--gpus lists GPU {id} twice: NCCL takes one worker per GPU \
                             (KD_GPU_COLLECTIVE=host lets workers share a GPU, with gradients over \
                             the host)"
                        );
                    }
                }
                if matches!(cli.command, cli::Command::Train(_)) {
                    // Rank 0 holds the run directory for the run; trying it here first refuses a
                    // run into a busy or unusable directory before the workers' logs, which go
                    // beside it, are truncated.
                    drop(engine::output_dir::claim_run_dir(&cfg)?);
                }
            }
            let threads = role::threads_per_local_worker(cli.threads, devices.len());
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
                load_config(a, role::Device::FromConfig)?;
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
