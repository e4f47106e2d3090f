//! Collectives over MPI (rsmpi against the system's Open MPI): the ranks of an `mpirun` job,
//! on one node or many.

use super::Collective;
use anyhow::{bail, Result};
use mpi::collective::SystemOperation;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;

pub struct MpiCollective {
    // Dropped last: finalises MPI.
    world: SimpleCommunicator,
    _universe: mpi::environment::Universe,
    scratch: Vec<f32>,
}

// SAFETY: MPI is initialised with `Threading::Funneled` and the engine calls a collective from
// one thread at a time (the training loop's); moving the handle to that thread is allowed.
unsafe impl Send for MpiCollective {}

impl MpiCollective {
    pub fn init() -> Result<Self> {
        let Some((universe, _level)) = mpi::initialize_with_threading(mpi::Threading::Funneled)
        else {
            bail!("MPI was already initialised in this process");
        };
        Ok(MpiCollective {
            world: universe.world(),
            _universe: universe,
            scratch: vec![],
        })
    }
}

impl Collective for MpiCollective {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }
    fn world_size(&self) -> usize {
        self.world.size() as usize
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        self.scratch.clear();
        self.scratch.extend_from_slice(buf);
        self.world
            .all_reduce_into(&self.scratch[..], buf, SystemOperation::sum());
        Ok(())
    }
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        self.world.process_at_rank(root as i32).broadcast_into(buf);
        Ok(())
    }
    fn broadcast_bytes(&mut self, buf: &mut [u8], root: usize) -> Result<()> {
        self.world.process_at_rank(root as i32).broadcast_into(buf);
        Ok(())
    }
    fn barrier(&mut self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }
    fn kind(&self) -> &'static str {
        "mpi"
    }
}
