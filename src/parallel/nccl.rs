//! Collectives over NCCL (cudarc's `nccl` module) for GPU workers. Rank 0 creates the NCCL
//! unique id and the bootstrap group (the launcher's TCP rendezvous, or MPI) hands it to the
//! others.
//!
//! Gradients are reduced where burn-cuda keeps them: [`Collective::all_reduce_sum_on_device`]
//! takes the flat gradient tensor of [`super::replicas::all_reduce_grads`], finds its device
//! address through burn-cuda's compute client, and runs NCCL in place on it, one call per
//! bucket. Host buffers (the start-up broadcast, BatchNorm statistics, a few flags per step)
//! stage through one device buffer: host → device, in-place collective, device → host.

use super::Collective;
use anyhow::{anyhow, ensure, Context, Result};
use burn::backend::Cuda;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};
use std::any::Any;
use std::ops::Range;
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
    fn reduces_alone(&self) -> bool {
        true
    }
    fn can_reduce_on_device(&self, flat: &dyn Any) -> bool {
        flat.is::<Tensor<Cuda, 1>>()
    }
    fn all_reduce_sum_on_device(&mut self, flat: &dyn Any, buckets: &[Range<usize>]) -> Result<()> {
        let flat = flat
            .downcast_ref::<Tensor<Cuda, 1>>()
            .context("NCCL reduces burn-cuda tensors only")?;
        let len = flat.dims()[0];
        ensure!(
            buckets.last().is_none_or(|b| b.end <= len),
            "buckets beyond the {len} floats of the gradient buffer"
        );
        let tensor = flat.clone().into_primitive().tensor();
        ensure!(
            tensor.dtype == DType::F32 && tensor.is_contiguous(),
            "the gradient buffer is not contiguous f32 ({:?})",
            tensor.dtype
        );
        // burn-cuda runs kernels on its own streams: the ones writing the buffer must be done
        // before NCCL's stream reads it.
        <Cuda as Backend>::sync(&tensor.device).map_err(|e| anyhow!("CUDA: {e:?}"))?;
        // Holding the resource keeps the allocation alive; its address includes the tensor's
        // offset into burn-cuda's memory pool.
        let resource = tensor
            .client
            .get_resource(tensor.handle.clone())
            .map_err(|e| anyhow!("CUDA: the gradient buffer's memory: {e:?}"))?;
        let address = resource.resource().ptr;
        // SAFETY: `address` is the start of `len` f32 of device memory on this GPU, allocated by
        // burn-cuda for `flat` and kept alive by `resource` until after the stream below is
        // synchronised; burn-cuda has no work in flight on it (synchronised above). The slice
        // is leaked, not dropped, so that cudarc never frees memory burn-cuda owns.
        let mut view: CudaSlice<f32> = unsafe { self.stream.upgrade_device_ptr(address, len) };
        let reduced = buckets.iter().try_for_each(|bucket| {
            self.comm
                .all_reduce_in_place(&mut view.slice_mut(bucket.clone()), &ReduceOp::Sum)
                .map(drop)
                .map_err(nccl_err)
        });
        let synced = self.stream.synchronize();
        view.leak();
        drop(resource);
        reduced?;
        synced?;
        Ok(())
    }
}
