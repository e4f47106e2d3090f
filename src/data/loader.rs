//! The loader: reads, decodes and augments batches on a pool of threads, ahead of the training
//! step, and hands them over in sampler order. Randomness is per sample (seed, epoch, index), so
//! batches do not depend on the number of threads or on scheduling.

use super::dataset::ImageNetDataset;
use super::transforms::{run_pipeline, Transform};
use anyhow::{anyhow, bail, Context, Result};
use rand::SeedableRng;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One batch, NCHW `f32` pixels and labels.
#[derive(Clone, Debug)]
pub struct Batch {
    pub images: Vec<f32>,
    pub shape: [usize; 4],
    pub labels: Vec<i64>,
}

pub struct Loader {
    pub dataset: Arc<ImageNetDataset>,
    pub transforms: Arc<Vec<Transform>>,
    pub threads: usize,
    /// Batches prepared ahead of the consumer.
    pub prefetch: usize,
    pub seed: u64,
}

fn sample_seed(seed: u64, epoch: usize, index: usize) -> u64 {
    // SplitMix-style mixing so neighbouring indices get unrelated streams.
    let mut z = seed
        ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (index as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Prepares one batch (used by the worker threads, and directly by tests and benchmarks).
pub fn load_batch(
    ds: &ImageNetDataset,
    transforms: &[Transform],
    indices: &[usize],
    seed: u64,
    epoch: usize,
) -> Result<Batch> {
    let mut images = vec![];
    let mut labels = vec![];
    let mut shape: Option<[usize; 3]> = None;
    for &i in indices {
        let s = &ds.samples[i];
        let bytes = std::fs::read(&s.path)
            .with_context(|| format!("cannot read image {}", s.path.display()))?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(sample_seed(seed, epoch, i));
        let (data, sh) = run_pipeline(transforms, bytes, &mut rng)
            .with_context(|| format!("image {}", s.path.display()))?;
        match shape {
            None => shape = Some(sh),
            Some(first) if first != sh => bail!(
                "image {} came out of the transforms as {:?} but the batch's first image is {:?}: add a crop or resize",
                s.path.display(),
                sh,
                first
            ),
            _ => {}
        }
        images.extend_from_slice(&data);
        labels.push(s.label);
    }
    let [c, h, w] = shape.ok_or_else(|| anyhow!("empty batch"))?;
    Ok(Batch {
        images,
        shape: [indices.len(), c, h, w],
        labels,
    })
}

/// Batches of one epoch, in order, with the time the consumer waited for each.
pub struct EpochIter {
    rx: Option<Receiver<(usize, Result<Batch>)>>,
    pending: BTreeMap<usize, Result<Batch>>,
    next: usize,
    total: usize,
    workers: Vec<JoinHandle<()>>,
    /// Time the last `next()` call blocked waiting for data.
    pub last_wait: Duration,
}

/// Where a worker sits among the others, and how it loads (from the config's `Global`).
#[derive(Clone, Copy, Debug)]
pub struct Placement {
    pub seed: u64,
    pub rank: usize,
    pub world: usize,
    pub threads: usize,
}

impl Loader {
    /// Dataset, transforms, sampler and loader of a `DataLoader.<mode>` section. `train` keeps
    /// the section's shuffle/drop_last; evaluation never shuffles or drops.
    pub fn from_section(
        sec: &super::LoaderSection,
        at: Placement,
        train: bool,
    ) -> Result<(Loader, super::BatchSampler)> {
        let d = &sec.dataset;
        if d.name != "ImageNetDataset" {
            bail!(
                "DataLoader dataset {:?} is not supported; known: ImageNetDataset",
                d.name
            );
        }
        let ds = ImageNetDataset::from_list(
            &d.image_root,
            &d.cls_label_path,
            d.delimiter.as_deref(),
            &d.key,
        )?;
        let sampler = super::BatchSampler {
            len: ds.len(),
            batch_size: sec.sampler.batch_size,
            shuffle: train && sec.sampler.shuffle,
            drop_last: train && sec.sampler.drop_last,
            seed: at.seed,
            rank: at.rank,
            world: at.world,
            pad: train,
        };
        let transforms = super::transforms::build(&d.transforms)?;
        let loader = Loader {
            dataset: Arc::new(ds),
            transforms: Arc::new(transforms),
            threads: at.threads,
            prefetch: at.threads * 2,
            seed: at.seed,
        };
        Ok((loader, sampler))
    }

    pub fn epoch(&self, batches: Vec<Vec<usize>>, epoch: usize) -> EpochIter {
        let total = batches.len();
        let batches = Arc::new(batches);
        let cursor = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = sync_channel(self.prefetch.max(1));
        let workers = (0..self.threads.max(1))
            .map(|_| {
                let (tx, batches, cursor) = (tx.clone(), batches.clone(), cursor.clone());
                let (ds, tf, seed) = (self.dataset.clone(), self.transforms.clone(), self.seed);
                std::thread::spawn(move || loop {
                    let i = cursor.fetch_add(1, Ordering::Relaxed);
                    if i >= batches.len() {
                        break;
                    }
                    let b = load_batch(&ds, &tf, &batches[i], seed, epoch);
                    if tx.send((i, b)).is_err() {
                        break; // consumer gone
                    }
                })
            })
            .collect();
        EpochIter {
            rx: Some(rx),
            pending: BTreeMap::new(),
            next: 0,
            total,
            workers,
            last_wait: Duration::ZERO,
        }
    }
}

impl Iterator for EpochIter {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.next >= self.total {
            return None;
        }
        let start = Instant::now();
        let out = loop {
            if let Some(b) = self.pending.remove(&self.next) {
                break b;
            }
            match self.rx.as_ref().expect("receiver lives until drop").recv() {
                Ok((i, b)) => {
                    self.pending.insert(i, b);
                }
                Err(_) => break Err(anyhow!("data loader threads stopped unexpectedly")),
            }
        };
        self.last_wait = start.elapsed();
        self.next += 1;
        Some(out)
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        // Closing the channel makes blocked senders fail, so every worker exits.
        self.rx.take();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::dataset::Sample;

    fn dataset(dir: &std::path::Path, n: usize) -> ImageNetDataset {
        let samples = (0..n)
            .map(|i| {
                let path = dir.join(format!("{i}.png"));
                image::RgbImage::from_pixel(4, 4, image::Rgb([i as u8, 0, 0]))
                    .save(&path)
                    .unwrap();
                Sample {
                    path,
                    label: i as i64,
                    line: i + 1,
                }
            })
            .collect();
        ImageNetDataset { samples }
    }

    #[test]
    fn batches_arrive_in_order_whatever_the_thread_count() {
        let dir = tempfile::tempdir().unwrap();
        let ds = Arc::new(dataset(dir.path(), 9));
        let batches = vec![vec![3, 1], vec![0, 8, 2], vec![5]];
        let run = |threads| {
            let l = Loader {
                dataset: ds.clone(),
                transforms: Arc::new(vec![]),
                threads,
                prefetch: 2,
                seed: 1,
            };
            l.epoch(batches.clone(), 0)
                .map(|b| b.unwrap())
                .collect::<Vec<_>>()
        };
        let one = run(1);
        let four = run(4);
        assert_eq!(one.len(), 3);
        for (a, b) in one.iter().zip(&four) {
            assert_eq!(a.labels, b.labels);
            assert_eq!(a.images, b.images);
        }
        assert_eq!(one[1].labels, vec![0, 8, 2]);
        assert_eq!(one[1].shape, [3, 3, 4, 4]);
        assert_eq!(one[1].images[16 * 3], 8.0); // first pixel, channel 0, of sample 8
    }

    #[test]
    fn a_bad_image_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut ds = dataset(dir.path(), 2);
        std::fs::write(&ds.samples[1].path, b"garbage").unwrap();
        ds.samples[1].label = 1;
        let l = Loader {
            dataset: Arc::new(ds),
            transforms: Arc::new(vec![]),
            threads: 2,
            prefetch: 1,
            seed: 0,
        };
        let out: Vec<_> = l.epoch(vec![vec![0], vec![1]], 0).collect();
        let e = format!("{:#}", out[1].as_ref().unwrap_err());
        assert!(e.contains("1.png"), "{e}");
    }
}
