//! Collectives: the engine's only view of other workers. The single-process implementation is a
//! no-op; MPI (CPU, multi-node) and NCCL (GPU) implementations plug in behind the same trait.

use anyhow::Result;

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
    fn barrier(&mut self) -> Result<()>;
    fn is_main(&self) -> bool {
        self.rank() == 0
    }
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
    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }
}
