//! Batch sampling as PaddleClas's `DistributedBatchSampler`: one seeded permutation per epoch,
//! padded by repetition to a multiple of the world size, each rank taking every `world`-th index.
//! Evaluation does not pad (`pad: false`): ranks then hold at most one sample more than
//! another, and every sample is counted exactly once in the reduced metrics.

use rand::seq::SliceRandom;
use rand::SeedableRng;

#[derive(Clone, Debug)]
pub struct BatchSampler {
    pub len: usize,
    pub batch_size: usize,
    pub shuffle: bool,
    pub drop_last: bool,
    pub seed: u64,
    pub rank: usize,
    pub world: usize,
    /// Repeat samples so every rank gets the same count (training: ranks step together).
    pub pad: bool,
}

impl BatchSampler {
    /// This rank's indices for `epoch`, in order.
    pub fn indices(&self, epoch: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.len).collect();
        if self.shuffle {
            let mut rng = rand::rngs::StdRng::seed_from_u64(
                self.seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64),
            );
            idx.shuffle(&mut rng);
        }
        if self.pad {
            let total = self.len.div_ceil(self.world) * self.world;
            let pad: Vec<usize> = idx.iter().cycle().take(total - self.len).copied().collect();
            idx.extend(pad);
        }
        idx.into_iter()
            .skip(self.rank)
            .step_by(self.world)
            .collect()
    }

    pub fn batches(&self, epoch: usize) -> Vec<Vec<usize>> {
        let idx = self.indices(epoch);
        idx.chunks(self.batch_size)
            .filter(|c| !(self.drop_last && c.len() < self.batch_size))
            .map(<[usize]>::to_vec)
            .collect()
    }

    /// Batches per epoch on this rank.
    pub fn num_batches(&self) -> usize {
        let per_rank = if self.pad {
            self.len.div_ceil(self.world)
        } else {
            (self.len + self.world - 1 - self.rank.min(self.world - 1)) / self.world
        };
        if self.drop_last {
            per_rank / self.batch_size
        } else {
            per_rank.div_ceil(self.batch_size)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(
        len: usize,
        bs: usize,
        shuffle: bool,
        drop_last: bool,
        rank: usize,
        world: usize,
    ) -> BatchSampler {
        BatchSampler {
            len,
            batch_size: bs,
            shuffle,
            drop_last,
            seed: 7,
            rank,
            world,
            pad: true,
        }
    }

    #[test]
    fn covers_every_sample_once_and_is_seeded() {
        let a = s(10, 3, true, false, 0, 1);
        let mut all: Vec<usize> = a.batches(0).concat();
        assert_eq!(a.batches(0), a.batches(0));
        assert_ne!(a.batches(0), a.batches(1));
        assert_eq!(a.num_batches(), a.batches(0).len());
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        let d = s(10, 3, false, true, 0, 1);
        assert_eq!(
            d.batches(0),
            vec![vec![0, 1, 2], vec![3, 4, 5], vec![6, 7, 8]]
        );
        assert_eq!(d.num_batches(), 3);
    }

    #[test]
    fn ranks_get_disjoint_equal_shares_padded_by_repetition() {
        let r0 = s(5, 2, true, false, 0, 2).indices(3);
        let r1 = s(5, 2, true, false, 1, 2).indices(3);
        assert_eq!(r0.len(), 3);
        assert_eq!(r1.len(), 3);
        let mut all: Vec<usize> = r0.iter().chain(&r1).copied().collect();
        all.sort();
        all.dedup();
        assert_eq!(all, (0..5).collect::<Vec<_>>());
    }

    /// Issue 4 (b): with any world size, one epoch's shards are disjoint, equally long and cover
    /// every sample (training, padded by repetition); unpadded (eval) shards cover every sample
    /// exactly once.
    #[test]
    fn shards_cover_every_sample_exactly_once_per_epoch() {
        for len in [1, 7, 10, 64, 101] {
            for world in 1..=4 {
                for epoch in 0..3 {
                    let shards: Vec<Vec<usize>> = (0..world)
                        .map(|r| s(len, 3, true, false, r, world).batches(epoch).concat())
                        .collect();
                    let per = len.div_ceil(world);
                    assert!(shards.iter().all(|sh| sh.len() == per), "{len} {world}");
                    for r in 0..world {
                        assert_eq!(
                            s(len, 3, true, false, r, world).num_batches(),
                            per.div_ceil(3)
                        );
                    }
                    let mut all = shards.concat();
                    all.sort();
                    let mut uniq = all.clone();
                    uniq.dedup();
                    assert_eq!(uniq, (0..len).collect::<Vec<_>>(), "{len} {world}");
                    // Unpadded: exactly once, and num_batches matches each rank's share.
                    let mut once = vec![];
                    for r in 0..world {
                        let e = BatchSampler {
                            pad: false,
                            ..s(len, 3, false, false, r, world)
                        };
                        let b = e.batches(0);
                        assert_eq!(e.num_batches(), b.len(), "{len} {world} {r}");
                        once.extend(b.concat());
                    }
                    once.sort();
                    assert_eq!(once, (0..len).collect::<Vec<_>>());
                }
            }
        }
    }
}
