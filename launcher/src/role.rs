//! This process's role in a job, from the command line and the environment: a job alone in this
//! process, one rank of a group (torchrun-style `RANK`/`WORLD_SIZE`/`MASTER_ADDR`/`MASTER_PORT`,
//! or Open MPI's `OMPI_COMM_WORLD_*` under mpirun), the launcher of local workers, or the
//! launcher of an mpirun job; and the device and compute threads that go with it.

use crate::cli::Cli;
use crate::{mpirun, spawn};
use anyhow::{bail, Context, Result};
use kd_engine::parallel::Rendezvous;
use std::path::PathBuf;
use std::time::Duration;

/// The device a job runs on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Device {
    /// As the config's `Global.device` says.
    FromConfig,
    /// The CPU, whatever the config says (`--nproc` workers).
    Cpu,
    /// This GPU.
    Gpu(usize),
}

/// Where this process's job runs.
pub enum Role {
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
    if ids.is_empty() {
        bail!("--gpus {list:?}: no GPU id");
    }
    Ok(ids)
}

/// A GPU `--gpus` lists more than once, if any: workers can share a GPU over the host
/// collectives (wgpu, or CUDA with `KD_GPU_COLLECTIVE=host`), not over NCCL.
pub fn repeated_gpu(ids: &[Option<usize>]) -> Option<usize> {
    let mut seen = std::collections::HashSet::new();
    ids.iter().flatten().copied().find(|id| !seen.insert(*id))
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

/// What this process is in the job: the command line's placement options, unless the
/// environment says it is a started worker (an mpirun rank, or torchrun-style variables).
pub fn of_this_process(cli: &Cli) -> Result<Role> {
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

/// Compute threads of a worker running its job here: `--threads`; else, for an mpirun rank
/// without `KD_THREADS`, its share of the node's cores (mpirun ranks share their node's cores
/// unless told otherwise); else `None` (the engine's own default, which reads `KD_THREADS`).
pub fn worker_threads(cli_threads: Option<usize>, rendezvous: &Rendezvous) -> Option<usize> {
    cli_threads.or_else(
        || match (rendezvous, env_usize("KD_THREADS").ok().flatten()) {
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
    )
}

/// Compute threads of each of `workers` local worker processes: `--threads`, else `KD_THREADS`,
/// else an equal share of this machine's cores.
pub fn threads_per_local_worker(cli_threads: Option<usize>, workers: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cli_threads
        .or_else(|| env_usize("KD_THREADS").ok().flatten())
        .unwrap_or((cores / workers).max(1))
}
