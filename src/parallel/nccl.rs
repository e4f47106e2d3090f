//! Collectives over NCCL (cudarc's `nccl` module) for GPU workers. Rank 0 creates the NCCL
//! unique id and the bootstrap group (the launcher's TCP rendezvous, or MPI) hands it to the
//! others. The engine hands over host buffers (gradients copied off the device), so each call
//! stages through one device buffer: host → device, in-place all-reduce, device → host.

use super::Collective;
use anyhow::{anyhow, Context, Result};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};
use std::sync::Arc;

pub struct NcclCollective {
    comm: Comm,
    stream: Arc<CudaStream>,
    /// The bootstrap group, kept for the barrier.
    bootstrap: Box<dyn Collective>,
    staging: Option<CudaSlice<f32>>,
}

// SAFETY: the communicator and stream are used from one thread at a time (the training loop's).
unsafe impl Send for NcclCollective {}

fn nccl_err(e: cudarc::nccl::result::NcclError) -> anyhow::Error {
    anyhow!("NCCL: {e:?}")
}

impl NcclCollective {
    pub fn new(mut bootstrap: Box<dyn Collective>, device: usize) -> Result<Self> {
        let rank = bootstrap.rank();
        let world = bootstrap.world_size();
        let mut raw = [0u8; 128];
        if rank == 0 {
            let id = Id::new()
                .map_err(nccl_err)
                .context("creating the NCCL unique id (is libnccl.so.2 on LD_LIBRARY_PATH?)")?;
            for (b, c) in raw.iter_mut().zip(id.internal()) {
                *b = *c as u8;
            }
        }
        bootstrap.broadcast_bytes(&mut raw, 0)?;
        let mut internal = [0 as std::ffi::c_char; 128];
        for (c, b) in internal.iter_mut().zip(raw) {
            *c = b as std::ffi::c_char;
        }
        let ctx = CudaContext::new(device).with_context(|| format!("CUDA device {device}"))?;
        let stream = ctx.default_stream();
        let comm = Comm::from_rank(stream.clone(), rank, world, Id::uninit(internal))
            .map_err(nccl_err)
            .with_context(|| {
                format!("NCCL communicator for rank {rank} of {world} on GPU {device}")
            })?;
        Ok(NcclCollective {
            comm,
            stream,
            bootstrap,
            staging: None,
        })
    }

    fn staged(&mut self, buf: &[f32]) -> Result<CudaSlice<f32>> {
        let mut dev = match self.staging.take() {
            Some(s) if s.len() == buf.len() => s,
            _ => self.stream.alloc_zeros::<f32>(buf.len())?,
        };
        self.stream.memcpy_htod(buf, &mut dev)?;
        Ok(dev)
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.comm.rank()
    }
    fn world_size(&self) -> usize {
        self.comm.world_size()
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        let mut dev = self.staged(buf)?;
        self.comm
            .all_reduce_in_place(&mut dev, &ReduceOp::Sum)
            .map_err(nccl_err)?;
        self.stream.memcpy_dtoh(&dev, buf)?;
        self.stream.synchronize()?;
        self.staging = Some(dev);
        Ok(())
    }
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        let mut dev = self.staged(buf)?;
        self.comm
            .broadcast_in_place(&mut dev, root as i32)
            .map_err(nccl_err)?;
        self.stream.memcpy_dtoh(&dev, buf)?;
        self.stream.synchronize()?;
        self.staging = Some(dev);
        Ok(())
    }
    fn broadcast_bytes(&mut self, buf: &mut [u8], root: usize) -> Result<()> {
        self.bootstrap.broadcast_bytes(buf, root)
    }
    fn barrier(&mut self) -> Result<()> {
        self.bootstrap.barrier()
    }
    fn kind(&self) -> &'static str {
        "nccl"
    }
}
