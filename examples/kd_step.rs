//! Benchmark of one KD training step (frozen teacher forward, student forward/backward, CE + KL,
//! Momentum step) on the CPU backend with random data — the Rust side of
//! `bench/torch_kd_step.py`. Run: `cargo run --release --example kd_step -- --steps 5`.
//!
//! `--config cfg.yaml` times that config's models and losses instead (weights random, nothing
//! loaded; `--size` and `--batch` set the input), e.g. to compare the cost of distillation losses:
//! `cargo run --release --example kd_step -- --config configs/quickstart/dkd.yaml --size 28`.

use kd_engine::arch::DistillationModel;
use kd_engine::burn::optim::{GradientsParams, Optimizer};
use kd_engine::burn::tensor::{Distribution, Int, Tensor, TensorData};
use kd_engine::engine::trainable::TrainableSet;
use kd_engine::engine::CpuBackend as B;
use kd_engine::loss::{CombinedLoss, LossContext};
use kd_engine::nn::layers;
use kd_engine::Config;
use std::path::Path;
use std::time::Instant;

mod common;
use common::arg;

fn main() -> anyhow::Result<()> {
    let batch: usize = arg("--batch", "64").parse()?;
    let size: usize = arg("--size", "32").parse()?;
    let classes: usize = arg("--classes", "100").parse()?;
    let steps: usize = arg("--steps", "5").parse()?;
    let warmup: usize = arg("--warmup", "1").parse()?;
    let threads: usize = arg("--threads", "1").parse()?;
    let (teacher, student, stem) = (
        arg("--teacher", "ResNet34"),
        arg("--student", "ResNet18"),
        arg("--stem", "cifar"),
    );
    let conv = arg("--conv", "kd");
    layers::set_cpu_conv(conv == "kd");
    kd_engine::engine::init_cpu_threads(Some(threads));
    kd_engine::engine::keep_freed_memory();
    let no_teacher = teacher == "none";
    // `stem` is a key of the plain ResNets only (PP-LCNet and MobileNetV3 have one stem).
    let stem_of = |name: &str| {
        if name.starts_with("ResNet") && !name.contains("_vd") {
            format!(", stem: {stem}")
        } else {
            String::new()
        }
    };
    let (ts, ss) = (stem_of(&teacher), stem_of(&student));
    let yaml = if no_teacher {
        format!("Arch: {{name: {student}, class_num: {classes}{ss}}}\nLoss:\n  Train:\n    - CELoss: {{weight: 1.0}}\n")
    } else {
        format!(
            "Arch:\n  name: DistillationModel\n  class_num: {classes}\n  freeze_params_list: [True, False]\n  models:\n    - Teacher: {{name: {teacher}{ts}}}\n    - Student: {{name: {student}{ss}}}\n  infer_model_name: Student\nLoss:\n  Train:\n    - DistillationGTCELoss: {{weight: 1.0, model_names: [Student]}}\n    - DistillationKLDivLoss: {{weight: 1.0, model_name_pairs: [[Student, Teacher]], temperature: 4}}\n"
        )
    };
    let config = arg("--config", "");
    let cfg = if config.is_empty() {
        let tree = kd_engine::config::parse_yaml(&yaml, Path::new("bench.yaml"))?;
        Config::from_tree(tree, Path::new("bench.yaml"), vec![])?
    } else {
        Config::load(Path::new(&config), &[])?
    };
    let classes = cfg.arch.models[0].class_num;
    let device = Default::default();
    let mut model = DistillationModel::<B>::new(&cfg.arch, false, &device)?;
    let loss = CombinedLoss::new(&cfg.train_loss, &cfg.arch)?;
    let mut loss_parts = loss.init_parts(&device);
    let mut optim = kd_engine::burn::optim::SgdConfig::new()
        .with_momentum(Some(
            kd_engine::burn::optim::momentum::MomentumConfig::new()
                .with_momentum(0.9)
                .with_dampening(0.0),
        ))
        .with_weight_decay(Some(kd_engine::burn::optim::decay::WeightDecayConfig::new(
            1e-4,
        )))
        .init::<B, TrainableSet<B>>();
    let labels: Vec<i64> = (0..batch).map(|i| (i * 7 % classes) as i64).collect();
    let mut timed = 0.0;
    let mut last = 0.0f32;
    for step in 0..warmup + steps {
        let x = Tensor::<B, 4>::random(
            [batch, 3, size, size],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        let y = Tensor::<B, 1, Int>::from_data(TensorData::new(labels.clone(), [batch]), &device);
        let start = Instant::now();
        let outputs = model.forward_train(x);
        let values = loss.forward(&LossContext {
            outputs: &outputs,
            labels: y,
            epoch: 1,
            default_model: &cfg.arch.infer_model_name,
            parts: &loss_parts,
            mode: kd_engine::nn::BnMode::Train,
            seed: 0,
            step: step as u64,
        })?;
        last = values.total.clone().into_data().to_vec::<f32>().unwrap()[0];
        let set = TrainableSet::take(&mut model, &mut loss_parts);
        let grads = GradientsParams::from_grads(values.total.backward(), &set);
        optim
            .step(0.1, set, grads)
            .put_back(&mut model, &mut loss_parts);
        let dt = start.elapsed().as_secs_f64();
        if step >= warmup {
            timed += dt;
        }
    }
    println!("last loss={last:.4}");
    println!(
        "RESULT kd_launch_kd_step img_per_s={:.3} step_s={:.6} threads={threads} batch={batch} conv={conv} teacher={teacher} student={student} config={config}",
        (batch * steps) as f64 / timed,
        timed / steps as f64
    );
    Ok(())
}
