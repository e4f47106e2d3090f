//! Data parallelism: the collectives (the engine's only view of other workers) and, in
//! [`replicas`], what keeps the replicas identical over them (start-up broadcast, gradient
//! buckets, BatchNorm statistics, fingerprints). Named `parallel`, not `dist`, so it is not
//! mistaken for the DIST loss.
//!
//! Collectives: Implementations: [`SingleProcess`]
//! (a no-op), [`tcp::TcpCollective`] (the workers of one `kd-launch --nproc/--gpus` launch,
//! through rank 0), `mpi::MpiCollective` (feature `mpi`: ranks started by `mpirun`, across
//! nodes) and `nccl::NcclCollective` (feature `cuda`: GPU workers; its unique id travels over
//! one of the others).

pub mod flat;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod replicas;
pub mod tcp;

use anyhow::Result;
use std::any::Any;
use std::ops::Range;
use std::time::Duration;

/// Rank, world size and the collective operations training needs, on flat `f32` buffers.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// In-place sum across ranks.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()>;
    /// In-place mean across ranks.
    fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<()> {
        self.all_reduce_sum(buf)?;
        let n = self.world_size() as f32;
        if n > 1.0 {
            buf.iter_mut().for_each(|v| *v /= n);
        }
        Ok(())
    }
    /// Overwrites `buf` on every rank with `root`'s contents.
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()>;
    /// [`Collective::broadcast`] of raw bytes (e.g. an NCCL unique id).
    fn broadcast_bytes(&mut self, buf: &mut [u8], root: usize) -> Result<()>;
    fn barrier(&mut self) -> Result<()>;
    /// Whether [`Collective::all_reduce_sum_on_device`] reaches `flat`'s memory: a `Tensor<B, 1>`
    /// of f32 of the caller's backend, passed as `Any` because only the collective knows which
    /// backends' memory it reaches (NCCL: burn-cuda's). If not, the caller goes through the
    /// host ([`Collective::all_reduce_sum`]).
    fn can_reduce_on_device(&self, _flat: &dyn Any) -> bool {
        false
    }
    /// Sums `flat` across ranks in place, where it lies in device memory, one call per range of
    /// `buckets`; only for a `flat` that [`Collective::can_reduce_on_device`] accepted.
    fn all_reduce_sum_on_device(
        &mut self,
        _flat: &dyn Any,
        _buckets: &[Range<usize>],
    ) -> Result<()> {
        anyhow::bail!("{}: no device-memory all-reduce", self.kind())
    }
    /// Whether gradients go through this collective even when it has one rank: NCCL asked for
    /// by `KD_GPU_COLLECTIVE=nccl` on one GPU, to run its path where there is one GPU.
    fn reduces_alone(&self) -> bool {
        false
    }
    fn is_main(&self) -> bool {
        self.rank() == 0
    }
    /// A short name for logs (`tcp`, `mpi`, `nccl`).
    fn kind(&self) -> &'static str;
}

/// One process: every operation is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&mut self, _buf: &mut [f32], _root: usize) -> Result<()> {
        Ok(())
    }
    fn broadcast_bytes(&mut self, _buf: &mut [u8], _root: usize) -> Result<()> {
        Ok(())
    }
    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }
    fn kind(&self) -> &'static str {
        "single"
    }
}

/// Whether this build can join an `mpirun` job (cargo feature `mpi`).
pub const MPI_AVAILABLE: bool = cfg!(feature = "mpi");

/// What to install and rebuild when MPI is asked of a build without it.
pub const MPI_MISSING: &str =
    "this kd-launch was built without MPI: install Open MPI and libclang \
     (Debian/Ubuntu: `apt-get install libopenmpi-dev openmpi-bin libclang-dev`) and rebuild with \
     `cargo build --release --features mpi`";

/// How a worker finds the others.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rendezvous {
    /// No other workers.
    Single,
    /// Workers of one `kd-launch` launch: rank 0 listens on `addr` (`MASTER_ADDR:MASTER_PORT`).
    Tcp {
        addr: String,
        rank: usize,
        world: usize,
        timeout: Duration,
    },
    /// Ranks of an `mpirun` job (`MPI_Init` tells rank and size).
    Mpi,
}

/// How a worker's gradients travel between workers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exchange {
    /// Over the group's own connections (TCP or MPI, through host memory): CPU and wgpu
    /// workers, and CUDA ones with `KD_GPU_COLLECTIVE=host` (e.g. two on one GPU, which NCCL
    /// refuses).
    Host,
    /// NCCL in device memory whenever there are other workers: CUDA workers' default.
    Nccl,
    /// NCCL even for a worker alone (`KD_GPU_COLLECTIVE=nccl`): its path run on one GPU.
    NcclAlways,
}

/// Joins the group `rv` describes. With NCCL (feature `cuda`), on device `local_device`,
/// bootstrapped by the TCP or MPI group.
pub fn connect(
    rv: &Rendezvous,
    exchange: Exchange,
    local_device: usize,
) -> Result<Box<dyn Collective>> {
    let base: Box<dyn Collective> = match rv {
        Rendezvous::Single if exchange == Exchange::NcclAlways => Box::new(SingleProcess),
        Rendezvous::Single => return Ok(Box::new(SingleProcess)),
        Rendezvous::Tcp {
            addr,
            rank,
            world,
            timeout,
        } => Box::new(tcp::TcpCollective::connect(addr, *rank, *world, *timeout)?),
        Rendezvous::Mpi => mpi_collective()?,
    };
    match exchange {
        Exchange::Host => Ok(base),
        Exchange::Nccl | Exchange::NcclAlways => nccl_collective(base, local_device),
    }
}

#[cfg(feature = "mpi")]
fn mpi_collective() -> Result<Box<dyn Collective>> {
    Ok(Box::new(mpi::MpiCollective::init()?))
}

#[cfg(not(feature = "mpi"))]
fn mpi_collective() -> Result<Box<dyn Collective>> {
    anyhow::bail!("{MPI_MISSING}")
}

#[cfg(feature = "cuda")]
fn nccl_collective(base: Box<dyn Collective>, local_device: usize) -> Result<Box<dyn Collective>> {
    Ok(Box::new(nccl::NcclCollective::new(base, local_device)?))
}

#[cfg(not(feature = "cuda"))]
fn nccl_collective(
    _base: Box<dyn Collective>,
    _local_device: usize,
) -> Result<Box<dyn Collective>> {
    anyhow::bail!("GPU workers need NCCL, which this kd-launch was built without: rebuild with `--features cuda`")
}
