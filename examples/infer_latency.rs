//! Latency of an exported model's forward pass in kd-launch (CPU, evaluation mode), the native
//! side of `bench/onnx_latency.sh` (onnxruntime on the same export's `inference.onnx` is the
//! other). Random input; the median over `--runs` after `--warmup` runs; preprocessing excluded.
//! Run: `cargo run --release --example infer_latency -- --model DIR --batch 32 --size 224`.

use kd_engine::burn::backend::Flex;
use kd_engine::burn::tensor::{Distribution, Tensor};
use kd_engine::engine::infer::Predictor;
use kd_engine::nn::BnMode;
use std::path::Path;
use std::time::Instant;

mod common;
use common::arg;

fn main() -> anyhow::Result<()> {
    let model = arg("--model", "");
    let batch: usize = arg("--batch", "1").parse()?;
    let size: usize = arg("--size", "224").parse()?;
    let runs: usize = arg("--runs", "20").parse()?;
    let warmup: usize = arg("--warmup", "3").parse()?;
    let threads: usize = arg("--threads", "1").parse()?;
    kd_engine::engine::init_cpu_threads(Some(threads));
    kd_engine::engine::keep_freed_memory();
    let device = Default::default();
    let p = Predictor::<Flex>::from_export(Path::new(&model), &device)?;
    let x = Tensor::<Flex, 4>::random([batch, 3, size, size], Distribution::Default, &device);
    let mut times = vec![];
    for i in 0..warmup + runs {
        let t = Instant::now();
        let y = p.model.forward(x.clone(), BnMode::Eval, &[]).logits;
        // Reading the result back makes the (lazy) backend finish the work.
        let _ = y.into_data();
        if i >= warmup {
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "RESULT kd-launch batch={batch} size={size} threads={threads} median_ms={:.3}",
        times[times.len() / 2]
    );
    Ok(())
}
