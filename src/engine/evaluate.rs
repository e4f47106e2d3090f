//! Evaluation: every model forward with BatchNorm on running statistics, the eval losses and
//! top-k metrics averaged over the (sharded, then reduced) eval set.

use super::finite::{self, ranks_phrase};
use super::setup::{batch_tensors, check_labels, load_initial_weights, loader_threads};
use super::Config;
use super::RunOptions;
use crate::arch::DistillationModel;
use crate::data::{Loader, Placement};
use crate::loss::{CombinedLoss, LossContext};
use crate::metric::Averages;
use crate::metric::{add_topk, metric_specs, non_finite_rows};
use crate::nn::cpu_conv::ConvAutodiffBackend;
use crate::parallel::Collective;
use anyhow::{anyhow, bail, Result};
use burn::module::AutodiffModule;
use burn::module::Module;
use burn::tensor::ElementConversion;
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

/// Logits of one model that held NaN or infinite values during an eval.
#[derive(Clone, Debug, PartialEq)]
pub struct NonFiniteLogits {
    pub model: String,
    pub frozen: bool,
    /// Per rank that met them: `(rank, images with a non-finite logit, images evaluated there)`.
    pub ranks: Vec<(usize, usize, usize)>,
}

/// An eval that met non-finite logits or a non-finite eval loss. It yields no metric: with NaN
/// the averages mean nothing (and top-k would have counted NaN rows as correct), so no
/// `best_model` may follow from it. Every rank holds the same one (the counts are reduced).
#[derive(Clone, Debug, PartialEq)]
pub struct NonFiniteEval {
    /// The epoch evaluated (0: weights with no training state).
    pub epoch: usize,
    pub world: usize,
    /// Models whose logits were not finite, in the config's order.
    pub logits: Vec<NonFiniteLogits>,
    /// Eval-loss terms that were not finite in some batch (`loss` is their weighted total).
    pub loss_terms: Vec<String>,
    /// Per rank with a non-finite eval loss: `(rank, batches, batches evaluated there)`.
    pub loss_ranks: Vec<(usize, usize, usize)>,
}

impl NonFiniteEval {
    /// Whether a trained (not frozen) model's logits were not finite: its weights diverged.
    pub fn trained_model_diverged(&self) -> bool {
        self.logits.iter().any(|l| !l.frozen)
    }

    /// `in 24 of 24 images` alone; `on rank 1 (3 of 12 images)` or
    /// `on ranks 0 and 1 (rank 0: …, rank 1: …)` between ranks.
    fn where_(&self, counts: &[(usize, usize, usize)], unit: &str) -> String {
        let each = |&(_, n, of): &(usize, usize, usize)| format!("{n} of {of} {unit}");
        if self.world == 1 {
            return counts
                .first()
                .map_or(String::new(), |c| format!("in {}", each(c)));
        }
        let ranks: Vec<usize> = counts.iter().map(|c| c.0).collect();
        let phrase = ranks_phrase(&ranks, self.world);
        match counts {
            [c] => format!("on {phrase} ({})", each(c)),
            _ => format!(
                "on {phrase} ({})",
                counts
                    .iter()
                    .map(|c| format!("rank {}: {}", c.0, each(c)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

impl std::fmt::Display for NonFiniteEval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts: Vec<String> = self
            .logits
            .iter()
            .map(|l| {
                format!(
                    "non-finite logits of {}model {} {}",
                    if l.frozen { "frozen " } else { "" },
                    l.model,
                    self.where_(&l.ranks, "images")
                )
            })
            .collect();
        if !self.loss_ranks.is_empty() {
            parts.push(format!(
                "a non-finite eval loss ({}) {}",
                self.loss_terms.join(", "),
                self.where_(&self.loss_ranks, "batches")
            ));
        }
        let what = match parts.as_slice() {
            [init @ .., last] if !init.is_empty() => format!("{} and {last}", init.join(", ")),
            _ => parts.join(""),
        };
        if self.epoch > 0 {
            write!(f, "eval at epoch {}: {what}", self.epoch)
        } else {
            write!(f, "eval: {what}")
        }
    }
}

impl std::error::Error for NonFiniteEval {}

/// This rank's count of non-finite values in an eval, laid out so that the ranks' counts can be
/// summed in one all-reduce without losing who saw what: one row per rank, each rank filling
/// its own.
struct NonFiniteCounts {
    /// Per rank: images, batches, batches with a non-finite eval loss, then per model the
    /// images with a non-finite logit, then per eval-loss term the batches where it was not
    /// finite.
    buf: Vec<f32>,
    models: usize,
    terms: usize,
    rank: usize,
}

impl NonFiniteCounts {
    const IMAGES: usize = 0;
    const BATCHES: usize = 1;
    const LOSS_BATCHES: usize = 2;
    const MODELS: usize = 3;

    fn new(world: usize, rank: usize, models: usize, terms: usize) -> Self {
        NonFiniteCounts {
            buf: vec![0.0; world * (Self::MODELS + models + terms)],
            models,
            terms,
            rank,
        }
    }

    fn row_len(&self) -> usize {
        Self::MODELS + self.models + self.terms
    }

    fn add(&mut self, column: usize, n: usize) {
        let at = self.rank * self.row_len() + column;
        self.buf[at] += n as f32; // exact below 2^24 images per rank
    }

    fn get(&self, rank: usize, column: usize) -> usize {
        self.buf[rank * self.row_len() + column] as usize
    }

    fn any_here(&self) -> bool {
        let row = self.rank * self.row_len();
        self.buf[row + Self::LOSS_BATCHES..row + Self::MODELS + self.models]
            .iter()
            .any(|&c| c > 0.0)
    }
}

/// Evaluates every model on the (sharded) eval set; every rank must call it (the metrics and
/// the counts of non-finite values are reduced), and every rank gets the same result. Logits or
/// an eval loss that are not finite fail it with a [`NonFiniteEval`] instead of a metric.
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
    let (rank, world) = (collective.rank(), collective.world_size());
    let terms: Vec<String> = eval_loss.map(CombinedLoss::term_names).unwrap_or_default();
    let mut counts = NonFiniteCounts::new(world, rank, model.slots.len(), terms.len());
    let mut avg = Averages::default();
    let iters = data.batches.len();
    let mut tick = Instant::now();
    let mut it = data.loader.epoch(data.batches.clone(), 0);
    let mut i = 0;
    while let Some(batch) = it.next() {
        let batch = batch?;
        let n = batch.labels.len();
        let (x, y) = batch_tensors::<B::InnerBackend>(&batch, &device);
        let outputs = model.forward_eval(&valid, x);
        counts.add(NonFiniteCounts::IMAGES, n);
        counts.add(NonFiniteCounts::BATCHES, 1);
        for (m, slot) in model.slots.iter().enumerate() {
            let bad = non_finite_rows(outputs[&slot.key].logits.clone());
            counts.add(NonFiniteCounts::MODELS + m, bad);
        }
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
            let total = values.record(&mut avg, n);
            let mut any = !total.is_finite();
            if any {
                counts.add(NonFiniteCounts::MODELS + counts.models + terms.len() - 1, 1);
            }
            for (name, v) in &values.terms {
                let value: f32 = v.clone().into_scalar().elem();
                if !value.is_finite() {
                    any = true;
                    if let Some(t) = terms.iter().position(|t| t == name) {
                        counts.add(NonFiniteCounts::MODELS + counts.models + t, 1);
                    }
                }
            }
            if any {
                counts.add(NonFiniteCounts::LOSS_BATCHES, 1);
            }
        }
        add_topk(&mut avg, &outputs, &y, &specs)?;
        if collective.is_main() && (i % cfg.global.print_batch_step == 0) {
            let bc = tick.elapsed().as_secs_f64();
            // Averages over non-finite values are no metric: say what happened instead.
            let values = if counts.any_here() {
                " non-finite logits or eval loss (reported at the end)".to_string()
            } else {
                avg.format(5)
            };
            tracing::info!(
                "[Eval][Epoch {epoch}][Iter: {i}/{iters}]{values}, batch_cost: {bc:.5}s, reader_cost: {:.5}s, ips: {:.5} samples/s",
                it.last_wait.as_secs_f64(),
                n as f64 / bc.max(1e-9)
            );
        }
        tick = Instant::now();
        i += 1;
    }
    let avg = reduce(avg, collective)?;
    if world > 1 {
        collective.all_reduce_sum(&mut counts.buf)?;
    }
    let samples = (0..world)
        .map(|r| counts.get(r, NonFiniteCounts::IMAGES))
        .sum();
    if let Some(nf) = non_finite_eval(&counts, model, &terms, epoch, world) {
        return Err(anyhow::Error::new(nf));
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

/// What the reduced `counts` say was not finite, if anything.
fn non_finite_eval<B: ConvAutodiffBackend>(
    counts: &NonFiniteCounts,
    model: &DistillationModel<B>,
    terms: &[String],
    epoch: usize,
    world: usize,
) -> Option<NonFiniteEval> {
    let per_rank = |column: usize, of: usize| -> Vec<(usize, usize, usize)> {
        (0..world)
            .map(|r| (r, counts.get(r, column), counts.get(r, of)))
            .filter(|c| c.1 > 0)
            .collect()
    };
    let logits: Vec<NonFiniteLogits> = model
        .slots
        .iter()
        .enumerate()
        .map(|(m, slot)| NonFiniteLogits {
            model: slot.key.clone(),
            frozen: slot.spec.frozen,
            ranks: per_rank(NonFiniteCounts::MODELS + m, NonFiniteCounts::IMAGES),
        })
        .filter(|l| !l.ranks.is_empty())
        .collect();
    let loss_ranks = per_rank(NonFiniteCounts::LOSS_BATCHES, NonFiniteCounts::BATCHES);
    if logits.is_empty() && loss_ranks.is_empty() {
        return None;
    }
    let bad_terms: Vec<String> = terms
        .iter()
        .enumerate()
        .filter(|(t, _)| {
            (0..world).any(|r| counts.get(r, NonFiniteCounts::MODELS + counts.models + t) > 0)
        })
        .map(|(_, name)| name.clone())
        .collect();
    // The total (`loss`) follows its terms: name it only when no term explains it.
    let named: Vec<String> = bad_terms.iter().filter(|t| *t != "loss").cloned().collect();
    Some(NonFiniteEval {
        epoch,
        world,
        logits,
        loss_terms: if named.is_empty() { bad_terms } else { named },
        loss_ranks,
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
    let mut non_finite = vec![0usize; frozen.len()];
    let mut samples = 0;
    let first: Vec<Vec<usize>> = data.batches.iter().take(batches).cloned().collect();
    for batch in data.loader.epoch(first, 0) {
        let batch = batch?;
        let (x, y) = batch_tensors::<B::InnerBackend>(&batch, device);
        for ((c, bad), slot) in correct.iter_mut().zip(&mut non_finite).zip(&frozen) {
            let out = model.frozen[slot.index].forward(x.clone(), crate::nn::BnMode::Eval, &[]);
            *bad += non_finite_rows(out.logits.clone());
            *c += crate::metric::topk_correct(out.logits, y.clone(), &[1])[0];
        }
        samples += batch.labels.len();
    }
    // A teacher with NaN weights teaches NaN: refuse it before step 1, naming the tensors.
    if let Some((slot, &bad)) = frozen.iter().zip(&non_finite).find(|(_, &b)| b > 0) {
        let tensors = finite::non_finite_tensors(&model.frozen[slot.index]);
        let cause = if tensors.is_empty() {
            "its weights are finite, but overflow on these images (check the transforms)"
                .to_string()
        } else {
            format!(
                "its weights hold NaN or infinite values: {} (check its `pretrained` weights)",
                finite::describe(&tensors)
            )
        };
        bail!(
            "frozen model {} gives non-finite logits for {bad} of the first {samples} eval images: {cause}",
            slot.key
        );
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
    .map_err(|e| match e.downcast_ref::<NonFiniteEval>() {
        Some(nf) => anyhow!("{nf}: {}", weights_verdict(&model, nf)),
        None => e,
    })
}

/// Why an eval of `model` met non-finite values: which of its models' weights are not finite
/// (naming the tensors), or that finite weights overflow.
fn weights_verdict<B: ConvAutodiffBackend>(
    model: &DistillationModel<B>,
    nf: &NonFiniteEval,
) -> String {
    let bad: Vec<String> = model
        .slots
        .iter()
        .filter_map(|slot| {
            let tensors = if slot.spec.frozen {
                finite::non_finite_tensors(&model.frozen[slot.index])
            } else {
                finite::non_finite_tensors(&model.trainable[slot.index])
            };
            (!tensors.is_empty())
                .then(|| format!("model {}: {}", slot.key, finite::describe(&tensors)))
        })
        .collect();
    if bad.is_empty() {
        let models: Vec<&str> = nf.logits.iter().map(|l| l.model.as_str()).collect();
        format!(
            "the weights are finite but overflow on these images{}; no metric is reported",
            if models.is_empty() {
                String::new()
            } else {
                format!(" ({})", models.join(", "))
            }
        )
    } else {
        format!(
            "the weights hold NaN or infinite values ({}): they diverged in training; no metric \
             is reported (evaluate a checkpoint from before the divergence, e.g. best_model)",
            bad.join("; ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::{NonFiniteEval, NonFiniteLogits, TeacherCheck};

    #[test]
    fn a_non_finite_eval_names_models_ranks_and_loss_terms() {
        let nf = NonFiniteEval {
            epoch: 2,
            world: 2,
            logits: vec![NonFiniteLogits {
                model: "Student".into(),
                frozen: false,
                ranks: vec![(1, 37, 128)],
            }],
            loss_terms: vec!["CELoss".into()],
            loss_ranks: vec![(0, 1, 4), (1, 3, 4)],
        };
        assert_eq!(
            nf.to_string(),
            "eval at epoch 2: non-finite logits of model Student on rank 1 (37 of 128 images) and \
             a non-finite eval loss (CELoss) on ranks 0 and 1 (rank 0: 1 of 4 batches, rank 1: 3 of 4 batches)"
        );
        assert!(nf.trained_model_diverged());
        let single = NonFiniteEval {
            epoch: 0,
            world: 1,
            logits: vec![NonFiniteLogits {
                model: "Teacher".into(),
                frozen: true,
                ranks: vec![(0, 6, 6)],
            }],
            loss_terms: vec![],
            loss_ranks: vec![],
        };
        assert_eq!(
            single.to_string(),
            "eval: non-finite logits of frozen model Teacher in 6 of 6 images"
        );
        assert!(!single.trained_model_diverged());
    }

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
