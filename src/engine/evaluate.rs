//! Evaluation: every model forward with BatchNorm on running statistics, the eval losses and
//! top-k metrics averaged over the (sharded, then reduced) eval set.

use super::setup::{batch_tensors, check_labels, load_initial_weights, loader_threads};
use super::Config;
use super::RunOptions;
use crate::arch::DistillationModel;
use crate::data::{Loader, Placement};
use crate::loss::{CombinedLoss, LossContext};
use crate::metric::Averages;
use crate::metric::{add_topk, metric_specs};
use crate::nn::cpu_conv::ConvAutodiffBackend;
use crate::parallel::Collective;
use anyhow::{bail, Result};
use burn::module::AutodiffModule;
use burn::module::Module;
use std::time::Instant;

/// The eval set, loaded once per run.
pub struct EvalData {
    loader: Loader,
    batches: Vec<Vec<usize>>,
}

impl EvalData {
    pub fn new(cfg: &Config, rank: usize, world: usize) -> Result<Self> {
        let at = Placement {
            seed: cfg.global.seed,
            rank,
            world,
            threads: loader_threads(cfg),
        };
        let sec = cfg.eval_section()?;
        let (loader, sampler) = Loader::from_section(sec, at, false)?;
        check_labels(&loader.dataset, cfg, &sec.dataset.cls_label_path)?;
        Ok(EvalData {
            loader,
            batches: sampler.batches(0),
        })
    }
}

#[derive(Clone, Debug)]
pub struct EvalReport {
    /// Top-1 of the first eval metric (the one `best_model` follows).
    pub top1: f64,
    pub averages: Averages,
    /// Samples evaluated, over all ranks.
    pub samples: usize,
}

pub fn evaluate<B: ConvAutodiffBackend>(
    model: &DistillationModel<B>,
    data: &EvalData,
    cfg: &Config,
    eval_loss: Option<&CombinedLoss>,
    epoch: usize,
    collective: &mut dyn Collective,
) -> Result<EvalReport> {
    let device = model.trainable[0].devices()[0].clone();
    let valid = model.trainable.valid();
    let mut specs = metric_specs(&cfg.eval_metric, &cfg.arch.infer_model_name);
    // Mutual learning trains several models: report every trainable one (`<model>_top1`), not
    // only those the config's metrics name.
    for slot in model.slots.iter().filter(|s| !s.spec.frozen) {
        if !specs.iter().any(|(m, _)| *m == slot.key) {
            specs.push((slot.key.clone(), vec![1]));
        }
    }
    let mut avg = Averages::default();
    let iters = data.batches.len();
    let mut tick = Instant::now();
    let mut samples = 0;
    let mut it = data.loader.epoch(data.batches.clone(), 0);
    let mut i = 0;
    while let Some(batch) = it.next() {
        let batch = batch?;
        let n = batch.labels.len();
        let (x, y) = batch_tensors::<B::InnerBackend>(&batch, &device);
        let outputs = model.forward_eval(&valid, x);
        if let Some(l) = eval_loss {
            let values = l.forward(&LossContext {
                outputs: &outputs,
                labels: y.clone(),
                epoch,
                default_model: &cfg.arch.infer_model_name,
                // Eval losses have no layers of their own (`CombinedLoss::for_eval`).
                parts: &[],
                mode: crate::nn::BnMode::Eval,
                seed: cfg.global.seed,
                step: 0,
            })?;
            values.record(&mut avg, n);
        }
        add_topk(&mut avg, &outputs, &y, &specs)?;
        samples += n;
        if collective.is_main() && (i % cfg.global.print_batch_step == 0) {
            let bc = tick.elapsed().as_secs_f64();
            tracing::info!(
                "[Eval][Epoch {epoch}][Iter: {i}/{iters}]{}, batch_cost: {bc:.5}s, reader_cost: {:.5}s, ips: {:.5} samples/s",
                avg.format(5),
                it.last_wait.as_secs_f64(),
                n as f64 / bc.max(1e-9)
            );
        }
        tick = Instant::now();
        i += 1;
    }
    let avg = reduce(avg, collective)?;
    if collective.world_size() > 1 {
        let mut n = [samples as f32]; // exact below 2^24 samples
        collective.all_reduce_sum(&mut n)?;
        samples = n[0] as usize;
    }
    if collective.is_main() {
        tracing::info!("[Eval][Epoch {epoch}][Avg]{}", avg.format(5));
    }
    let top1 = avg.get("top1").unwrap_or(0.0);
    Ok(EvalReport {
        top1,
        averages: avg,
        samples,
    })
}

/// What the frozen-teacher check found for one model.
#[derive(Clone, Debug)]
pub struct TeacherCheck {
    pub model: String,
    pub top1: f64,
    pub samples: usize,
    /// Top-1 of guessing: one over the model's classes.
    pub chance: f64,
}

impl TeacherCheck {
    /// Near guessing: a teacher that teaches nothing (weights not loaded, or for other data),
    /// the "loss flat at ln(classes)" failure. Within 1.5× of chance, and with few classes
    /// within a tenth of the way from chance to perfect (so a 70 % two-class teacher passes).
    pub fn at_chance(&self) -> bool {
        self.top1 <= (1.5 * self.chance).min(self.chance + 0.1 * (1.0 - self.chance))
    }
}

/// Evaluates every frozen model on the first `batches` batches of this rank's eval shard,
/// before training starts, and (when `log`) logs each top-1 — loudly when it is at chance
/// level. Runs on each rank alone (no collectives); single-class models are not checked.
pub fn check_teachers<B: ConvAutodiffBackend>(
    model: &DistillationModel<B>,
    data: &EvalData,
    batches: usize,
    device: &B::Device,
    log: bool,
) -> Result<Vec<TeacherCheck>> {
    let frozen: Vec<_> = model
        .slots
        .iter()
        .filter(|s| s.spec.frozen && s.spec.class_num > 1)
        .collect();
    if frozen.is_empty() || batches == 0 {
        return Ok(vec![]);
    }
    let mut correct = vec![0usize; frozen.len()];
    let mut samples = 0;
    let first: Vec<Vec<usize>> = data.batches.iter().take(batches).cloned().collect();
    for batch in data.loader.epoch(first, 0) {
        let batch = batch?;
        let (x, y) = batch_tensors::<B::InnerBackend>(&batch, device);
        for (c, slot) in correct.iter_mut().zip(&frozen) {
            let out = model.frozen[slot.index].forward(x.clone(), crate::nn::BnMode::Eval, &[]);
            *c += crate::metric::topk_correct(out.logits, y.clone(), &[1])[0];
        }
        samples += batch.labels.len();
    }
    let checks: Vec<TeacherCheck> = frozen
        .iter()
        .zip(correct)
        .map(|(slot, c)| TeacherCheck {
            model: slot.key.clone(),
            top1: c as f64 / samples.max(1) as f64,
            samples,
            // The model's classes, not the eval list's (which may hold only some of them).
            chance: 1.0 / slot.spec.class_num.max(1) as f64,
        })
        .collect();
    if samples == 0 {
        return Ok(vec![]);
    }
    for c in checks.iter().filter(|_| log) {
        if c.at_chance() {
            tracing::warn!(
                "frozen model {} scores top-1 {:.4} on {} eval images, about chance ({:.4}): its weights are \
                 probably not loaded, or were trained for other data or preprocessing; distilling from it \
                 teaches nothing (the loss stays near ln(classes)). Check its `pretrained` and the transforms",
                c.model,
                c.top1,
                c.samples,
                c.chance
            );
        } else {
            tracing::info!(
                "frozen model {}: top-1 {:.4} on the first {} eval images (chance {:.4})",
                c.model,
                c.top1,
                c.samples,
                c.chance
            );
        }
    }
    Ok(checks)
}

/// Sums every average's `(sum, count)` across ranks so all print the global value. The names
/// come from rank 0, which always holds samples (it is dealt sample 0); a rank whose shard is
/// empty contributes zeros, so every rank makes the same calls with the same lengths.
fn reduce(avg: Averages, collective: &mut dyn Collective) -> Result<Averages> {
    if collective.world_size() == 1 {
        return Ok(avg);
    }
    let raw = avg.raw();
    let mut names: Vec<u8> = raw
        .iter()
        .map(|(n, _, _)| n.as_str())
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes();
    let mut len = [names.len() as f32];
    collective.broadcast(&mut len, 0)?;
    names.resize(len[0] as usize, 0);
    collective.broadcast_bytes(&mut names, 0)?;
    let names: Vec<String> = String::from_utf8_lossy(&names)
        .split('\n')
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .collect();
    let mut buf: Vec<f32> = names
        .iter()
        .flat_map(|name| {
            raw.iter()
                .find(|(n, _, _)| n == name)
                .map_or([0.0, 0.0], |(_, s, c)| [*s as f32, *c as f32])
        })
        .collect();
    collective.all_reduce_sum(&mut buf)?;
    let mut out = Averages::default();
    for (name, pair) in names.iter().zip(buf.chunks(2)) {
        if pair[1] > 0.0 {
            out.add(name, pair[0] as f64 / pair[1] as f64, pair[1] as usize);
        }
    }
    Ok(out)
}

/// `kd-launch eval`: load the weights in `Global.pretrained_model` (or `Global.checkpoints`) and evaluate.
pub fn eval_command<B: ConvAutodiffBackend>(
    cfg: &Config,
    device: B::Device,
    mut opts: RunOptions,
) -> Result<EvalReport> {
    let g = &cfg.global;
    B::seed(&device, g.seed);
    let mut model = DistillationModel::<B>::new(&cfg.arch, false, &device)?;
    match (&g.pretrained_model, &g.checkpoints) {
        (None, None) => bail!(
            "{}: eval needs weights: -o Global.pretrained_model=<output_dir>/<arch>/best_model",
            cfg.file.display()
        ),
        (Some(_), _) => load_initial_weights(cfg, &mut model, &device)?,
        (None, Some(dir)) => crate::weights::load_models(&mut model, dir, &device)?,
    }
    let eval_loss = (!cfg.eval_loss.is_empty())
        .then(|| CombinedLoss::for_eval(&cfg.eval_loss, &cfg.arch))
        .transpose()?;
    let data = EvalData::new(cfg, opts.collective.rank(), opts.collective.world_size())?;
    super::log_unknown_keys(cfg, opts.collective.is_main());
    let epoch = super::checkpoint::TrainState::read(
        g.pretrained_model
            .as_ref()
            .or(g.checkpoints.as_ref())
            .expect("checked above"),
    )
    .map(|s| s.epoch)
    .unwrap_or(0);
    evaluate(
        &model,
        &data,
        cfg,
        eval_loss.as_ref(),
        epoch,
        opts.collective.as_mut(),
    )
}

#[cfg(test)]
mod tests {
    use super::TeacherCheck;

    fn check(top1: f64, classes: usize) -> bool {
        TeacherCheck {
            model: "Teacher".into(),
            top1,
            samples: 100,
            chance: 1.0 / classes as f64,
        }
        .at_chance()
    }

    #[test]
    fn chance_level_is_within_half_again_of_guessing_or_a_tenth_of_the_way_up() {
        // 1000 classes: 1.5 × 0.001.
        assert!(check(0.0015, 1000) && !check(0.002, 1000));
        // 10 classes: 0.15.
        assert!(check(0.15, 10) && !check(0.16, 10));
        // 2 classes: 0.55, not 0.75 (a 70 % teacher teaches something).
        assert!(check(0.55, 2) && !check(0.56, 2) && !check(0.70, 2));
    }
}
