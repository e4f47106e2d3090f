//! Collectives over TCP between the workers of one launch, through rank 0 (a star): every
//! rank sends its buffer to rank 0, which sums them in rank order and sends the result back.
//! Summing in a fixed order makes the result bitwise identical on every rank and from run to
//! run. This is how CPU workers started by `kd-launch --nproc N` exchange gradients, and how GPU
//! workers exchange the NCCL unique id, with no MPI installed.

use super::Collective;
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// First bytes of every connection: a stray client on the port is refused, not misread.
const MAGIC: u32 = 0x6b64_6c31; // "kdl1"

/// One rank's connections: rank 0 holds one stream per other rank, the others one to rank 0.
pub struct TcpCollective {
    rank: usize,
    world: usize,
    /// Rank 0: `peers[r - 1]` is rank `r`. Others: `peers[0]` is rank 0.
    peers: Vec<TcpStream>,
    scratch: Vec<u8>,
}

impl TcpCollective {
    /// Forms the group: rank 0 listens on `addr`, the others connect to it (retrying until
    /// `timeout`, since rank 0 may start later).
    pub fn connect(addr: &str, rank: usize, world: usize, timeout: Duration) -> Result<Self> {
        if rank >= world {
            bail!("rank {rank} is not below the world size {world}");
        }
        let target: SocketAddr = addr
            .to_socket_addrs()
            .with_context(|| format!("rendezvous address {addr:?}"))?
            .next()
            .with_context(|| format!("rendezvous address {addr:?} resolves to nothing"))?;
        let deadline = Instant::now() + timeout;
        let mut peers = vec![];
        if rank == 0 {
            let listener = TcpListener::bind(target)
                .with_context(|| format!("rank 0 cannot listen on {target}"))?;
            listener.set_nonblocking(true)?;
            let mut by_rank: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
            while by_rank.iter().any(Option::is_none) {
                match listener.accept() {
                    Ok((mut s, from)) => {
                        s.set_nonblocking(false)?;
                        s.set_read_timeout(Some(Duration::from_secs(10)))?;
                        let hello = read_u32s::<3>(&mut s);
                        s.set_read_timeout(None)?;
                        match hello {
                            Ok([MAGIC, r, w]) if w as usize == world && (1..world).contains(&(r as usize)) => {
                                if by_rank[r as usize - 1].is_some() {
                                    bail!("two workers claim rank {r} (from {from})");
                                }
                                s.set_nodelay(true)?;
                                by_rank[r as usize - 1] = Some(s);
                            }
                            Ok([MAGIC, r, w]) => bail!(
                                "a worker from {from} says it is rank {r} of {w}, but this group has {world} ranks"
                            ),
                            _ => tracing::warn!("ignoring a connection from {from} that is not a kd-launch worker"),
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            let missing: Vec<String> = by_rank
                                .iter()
                                .enumerate()
                                .filter(|(_, s)| s.is_none())
                                .map(|(i, _)| (i + 1).to_string())
                                .collect();
                            bail!(
                                "rendezvous on {target}: ranks {} did not connect within {timeout:?}",
                                missing.join(", ")
                            );
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(e).context("accepting a worker connection"),
                }
            }
            peers = by_rank
                .into_iter()
                .map(|s| s.expect("all connected"))
                .collect();
        } else {
            let mut s = loop {
                match TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() < deadline => {
                        tracing::debug!("rank {rank}: rank 0 not reachable yet at {target}: {e}");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => {
                        return Err(e).with_context(|| {
                            format!(
                                "rank {rank}: cannot reach rank 0 at {target} within {timeout:?}"
                            )
                        })
                    }
                }
            };
            s.set_nodelay(true)?;
            for v in [MAGIC, rank as u32, world as u32] {
                s.write_all(&v.to_le_bytes())?;
            }
            peers.push(s);
        }
        Ok(TcpCollective {
            rank,
            world,
            peers,
            scratch: vec![],
        })
    }

    fn peer_error(&self, peer: usize, e: std::io::Error) -> anyhow::Error {
        anyhow::anyhow!(
            "rank {}: lost rank {peer}: {e} (did it stop or crash?)",
            self.rank
        )
    }

    /// Rank 0's view: the stream to rank `r`.
    fn stream(&mut self, r: usize) -> &mut TcpStream {
        &mut self.peers[if self.rank == 0 { r - 1 } else { 0 }]
    }

    fn send(&mut self, to: usize, buf: &[u8]) -> Result<()> {
        let s = self.stream(to);
        let r = s
            .write_all(&(buf.len() as u64).to_le_bytes())
            .and_then(|_| s.write_all(buf));
        r.map_err(|e| self.peer_error(to, e))
    }

    /// Receives one message from `from` into `self.scratch`, which must have `expected` bytes.
    fn recv(&mut self, from: usize, expected: usize) -> Result<()> {
        let mut len = [0u8; 8];
        let me = self.rank;
        let s = self.stream(from);
        if let Err(e) = s.read_exact(&mut len) {
            return Err(self.peer_error(from, e));
        }
        let len = u64::from_le_bytes(len) as usize;
        if len != expected {
            bail!(
                "rank {me}: rank {from} sent {len} bytes where {expected} were expected: the ranks disagree on \
                 what they exchange (different configs or models?)"
            );
        }
        self.scratch.resize(len, 0);
        let mut scratch = std::mem::take(&mut self.scratch);
        let r = self.stream(from).read_exact(&mut scratch);
        self.scratch = scratch;
        r.map_err(|e| self.peer_error(from, e))
    }

    /// Overwrites `buf` on every rank with rank `root`'s bytes.
    fn broadcast_raw(&mut self, buf: &mut [u8], root: usize) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        if self.rank == 0 {
            if root != 0 {
                self.recv(root, buf.len())?;
                buf.copy_from_slice(&self.scratch);
            }
            for r in (1..self.world).filter(|&r| r != root) {
                self.send(r, buf)?;
            }
        } else {
            if self.rank == root {
                self.send(0, buf)?;
            } else {
                self.recv(0, buf.len())?;
                buf.copy_from_slice(&self.scratch);
            }
        }
        Ok(())
    }
}

fn read_u32s<const N: usize>(s: &mut TcpStream) -> std::io::Result<[u32; N]> {
    let mut out = [0u32; N];
    for v in &mut out {
        let mut b = [0u8; 4];
        s.read_exact(&mut b)?;
        *v = u32::from_le_bytes(b);
    }
    Ok(out)
}

fn as_bytes(buf: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding or invalid bit patterns; u8 has alignment 1.
    unsafe { std::slice::from_raw_parts(buf.as_ptr().cast(), std::mem::size_of_val(buf)) }
}

fn as_bytes_mut(buf: &mut [f32]) -> &mut [u8] {
    // SAFETY: as above, and every byte pattern is a valid f32.
    unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast(), std::mem::size_of_val(buf)) }
}

impl Collective for TcpCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let bytes = std::mem::size_of_val(buf);
        if self.rank == 0 {
            for r in 1..self.world {
                self.recv(r, bytes)?;
                for (v, b) in buf.iter_mut().zip(self.scratch.chunks_exact(4)) {
                    *v += f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            for r in 1..self.world {
                self.send(r, as_bytes(buf))?;
            }
        } else {
            self.send(0, as_bytes(buf))?;
            self.recv(0, bytes)?;
            as_bytes_mut(buf).copy_from_slice(&self.scratch);
        }
        Ok(())
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        self.broadcast_raw(as_bytes_mut(buf), root)
    }

    fn broadcast_bytes(&mut self, buf: &mut [u8], root: usize) -> Result<()> {
        self.broadcast_raw(buf, root)
    }

    fn barrier(&mut self) -> Result<()> {
        let mut one = [1.0f32];
        self.all_reduce_sum(&mut one)
    }

    fn kind(&self) -> &'static str {
        "tcp"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_addr() -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    }

    /// Runs `f(rank)` on `world` threads joined by real sockets.
    pub(crate) fn on_ranks<T: Send + 'static>(
        world: usize,
        f: impl Fn(TcpCollective) -> T + Send + Sync + Clone + 'static,
    ) -> Vec<T> {
        let addr = free_addr();
        let handles: Vec<_> = (0..world)
            .map(|r| {
                let (addr, f) = (addr.clone(), f.clone());
                std::thread::spawn(move || {
                    f(TcpCollective::connect(&addr, r, world, Duration::from_secs(20)).unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn all_reduce_broadcast_and_barrier_over_real_sockets() {
        let out = on_ranks(3, |mut c| {
            let r = c.rank() as f32;
            let mut sum = vec![r, 10.0 * r, 1.0];
            c.all_reduce_sum(&mut sum).unwrap();
            let mut mean = vec![r; 5];
            c.all_reduce_mean(&mut mean).unwrap();
            let mut b = vec![r + 0.5; 4];
            c.broadcast(&mut b, 2).unwrap();
            let mut id = [c.rank() as u8; 16];
            c.broadcast_bytes(&mut id, 0).unwrap();
            c.barrier().unwrap();
            (sum, mean, b, id)
        });
        for (sum, mean, b, id) in out {
            assert_eq!(sum, vec![3.0, 30.0, 3.0]);
            assert_eq!(mean, vec![1.0; 5]);
            assert_eq!(b, vec![2.5; 4]);
            assert_eq!(id, [0u8; 16]);
        }
    }

    #[test]
    fn mismatched_buffers_and_lost_peers_are_errors() {
        let out = on_ranks(2, |mut c| {
            let mut buf = vec![0.0f32; 2 + c.rank()];
            c.all_reduce_sum(&mut buf).err().map(|e| format!("{e:#}"))
        });
        assert!(out[0].as_deref().unwrap().contains("disagree"), "{out:?}");
        let out = on_ranks(2, |mut c| {
            if c.rank() == 1 {
                return None; // drops its connection
            }
            let mut buf = vec![0.0f32; 2];
            c.all_reduce_sum(&mut buf).err().map(|e| format!("{e:#}"))
        });
        assert!(
            out[0].as_deref().unwrap().contains("lost rank 1"),
            "{out:?}"
        );
    }
}
