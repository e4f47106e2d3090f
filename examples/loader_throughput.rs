//! Data-loader throughput alone (read → decode → augment → batch), for a config's
//! `DataLoader.Train` section: `cargo run --release --example loader_throughput -- -c cfg.yaml --threads 2`.
//! Compare the printed img/s with the training step's ips to see whether the step waits on data.

use kd_engine::data::{Loader, Placement};
use kd_engine::Config;
use std::path::PathBuf;
use std::time::Instant;

mod common;
use common::arg;

fn main() -> anyhow::Result<()> {
    let cfg = Config::load(&PathBuf::from(arg("-c", "configs/quickstart/kd.yaml")), &[])?;
    let threads: usize = arg("--threads", "2").parse()?;
    let max_batches: usize = arg("--batches", "1000000").parse()?;
    let at = Placement {
        seed: 1,
        rank: 0,
        world: 1,
        threads,
    };
    let (loader, sampler) = Loader::from_section(cfg.train_section()?, at, true)?;
    let batches: Vec<Vec<usize>> = sampler.batches(0).into_iter().take(max_batches).collect();
    let start = Instant::now();
    let mut images = 0;
    for b in loader.epoch(batches, 0) {
        images += b?.labels.len();
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "RESULT loader img_per_s={:.1} images={images} threads={threads} secs={secs:.2}",
        images as f64 / secs
    );
    Ok(())
}
