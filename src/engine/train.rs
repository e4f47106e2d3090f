//! Training as a small [`Trainer`]: built once (models, losses, data, optimizer, resume, replicas
//! synchronised, the frozen teacher checked), then epochs of [`Trainer::step`] (frozen teacher
//! forward off the graph, student forward/backward, combined loss, gradient exchange, optimizer
//! step on the per-iteration schedule) and [`Trainer::end_epoch`] (running statistics synced,
//! eval every `eval_interval` epochs, `latest` / `best_model` / `epoch_N` checkpoints).

use super::checkpoint::{self, TrainState, OPTIMIZER_FILE};
use super::evaluate::{check_teachers, evaluate, EvalData, NonFiniteEval};
use super::finite::{self, ranks_phrase};
use super::output_dir::{claim_run_dir, RunDirLock};
use super::setup::{
    batch_tensors, check_labels, load_initial_weights, loader_threads, require_trainable_weights,
};
use super::trainable::{load_loss_parts, save_loss_parts, TrainableSet};
use super::{Config, RunOptions};
use crate::arch::DistillationModel;
use crate::data::{Batch, BatchSampler, Loader, Placement};
use crate::loss::LossPart;
use crate::loss::{CombinedLoss, LossContext};
use crate::metric::{add_topk, metric_specs, Averages};
use crate::nn::cpu_conv::ConvAutodiffBackend;
use crate::nn::BnMode;
use crate::optim::{sgd_config, LrSchedule};
use crate::parallel::replicas::{self, SyncCost};
use anyhow::{bail, Context, Result};
use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// What a finished (or stopped) training run leaves behind.
#[derive(Clone, Debug)]
pub struct TrainSummary {
    pub state: TrainState,
    pub output_dir: PathBuf,
    pub stopped_early: bool,
    /// The total training loss of every step this run took, in order.
    pub step_losses: Vec<f32>,
}

fn fmt_eta(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    format!("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

type Optim<B> = burn::optim::adaptor::OptimizerAdaptor<
    burn::optim::Sgd<<B as AutodiffBackend>::InnerBackend>,
    TrainableSet<B>,
    B,
>;

/// Trains `cfg` on `device`: [`Trainer::new`] then [`Trainer::run`].
pub fn train<B: ConvAutodiffBackend>(
    cfg: &Config,
    device: B::Device,
    opts: RunOptions,
) -> Result<TrainSummary> {
    Trainer::<B>::new(cfg, device, opts)?.run()
}

/// One step's outcome, as every rank agreed on it.
struct StepDone {
    /// The run was asked to stop (Ctrl-C / SIGTERM on any rank).
    stop: bool,
    lr: f64,
    sync: SyncCost,
}

/// The flags every rank adds to a step's gradient all-reduce: the stop request, then one row per
/// rank of what that rank found not finite (each rank sets only its own row), so after the sum
/// every rank knows which ranks saw what, and all stop after the same step. A few floats per
/// rank beside millions of gradients.
struct StepVotes {
    buf: Vec<f32>,
    world: usize,
    rank: usize,
    /// Flags per rank: loss, gradients, then the logits of each frozen model.
    kinds: usize,
}

impl StepVotes {
    const LOSS: usize = 0;
    const GRADIENTS: usize = 1;
    const TEACHERS: usize = 2;

    fn new(world: usize, rank: usize, frozen_models: usize) -> Self {
        let kinds = Self::TEACHERS + frozen_models;
        StepVotes {
            buf: vec![0.0; 1 + world * kinds],
            world,
            rank,
            kinds,
        }
    }

    fn set_stop(&mut self, stop: bool) {
        self.buf[0] = stop as u8 as f32;
    }

    /// A stop asked on any rank.
    fn stop(&self) -> bool {
        self.buf[0] > 0.0
    }

    /// This rank's slot for `kind`.
    fn own(&self, kind: usize) -> usize {
        1 + self.rank * self.kinds + kind
    }

    fn mark(&mut self, kind: usize, non_finite: bool) {
        let at = self.own(kind);
        self.buf[at] = non_finite as u8 as f32;
    }

    /// The ranks that voted `kind`.
    fn ranks(&self, kind: usize) -> Vec<usize> {
        (0..self.world)
            .filter(|r| self.buf[1 + r * self.kinds + kind] > 0.0)
            .collect()
    }

    fn any(&self, kinds: std::ops::Range<usize>) -> bool {
        kinds.into_iter().any(|k| !self.ranks(k).is_empty())
    }

    /// `non-finite logits of frozen model Teacher on rank 1; non-finite loss on ranks 0 and 1`
    /// (without ranks in a single process); `None` when all was finite. The frozen models'
    /// logits come first: they explain a loss that follows them.
    fn non_finite(&self, frozen: &[String]) -> Option<String> {
        let what = |kind: usize| match kind {
            Self::LOSS => "loss".to_string(),
            Self::GRADIENTS => "gradients".to_string(),
            t => format!("logits of frozen model {}", frozen[t - Self::TEACHERS]),
        };
        let order = (Self::TEACHERS..self.kinds).chain([Self::LOSS, Self::GRADIENTS]);
        let parts: Vec<String> = order
            .filter_map(|kind| {
                let ranks = self.ranks(kind);
                (!ranks.is_empty()).then(|| {
                    if self.world == 1 {
                        format!("non-finite {}", what(kind))
                    } else {
                        format!(
                            "non-finite {} on {}",
                            what(kind),
                            ranks_phrase(&ranks, self.world)
                        )
                    }
                })
            })
            .collect();
        (!parts.is_empty()).then(|| parts.join("; "))
    }
}

/// How an epoch's steps ended.
enum EpochEnd {
    /// Every batch ran; `stop_requested` when a stop came with the last one.
    Completed {
        averages: Averages,
        stop_requested: bool,
    },
    /// Stopped on request before the last batch; `latest` holds the position.
    StoppedMidEpoch,
}

/// A training run's state between steps.
pub struct Trainer<'a, B: ConvAutodiffBackend> {
    cfg: &'a Config,
    device: B::Device,
    opts: RunOptions,
    model: DistillationModel<B>,
    /// The losses' own trainable layers, in the order of their loss entries.
    loss_parts: Vec<LossPart<B>>,
    loss: CombinedLoss,
    eval_loss: Option<CombinedLoss>,
    /// Always `Some` between epochs (see [`Self::train_epoch`]).
    loader: Option<Loader>,
    sampler: BatchSampler,
    /// Batches per epoch on this rank.
    iters: usize,
    eval_data: Option<EvalData>,
    schedule: LrSchedule,
    /// Always `Some` between calls; `None` only while a step moves it.
    optim: Option<Optim<B>>,
    state: TrainState,
    train_metrics: Vec<(String, Vec<usize>)>,
    step_losses: Vec<f32>,
    /// Rank 0's hold on the run directory, released when the run ends (or the process dies).
    _run_dir: Option<RunDirLock>,
}

impl<'a, B: ConvAutodiffBackend> Trainer<'a, B> {
    /// Builds everything a run needs and checks what can be checked before step 1. The order of
    /// random draws is fixed: seed, models, the losses' layers, then weights from files.
    pub fn new(cfg: &'a Config, device: B::Device, mut opts: RunOptions) -> Result<Self> {
        require_trainable_weights(cfg)?;
        let g = &cfg.global;
        let rank = opts.collective.rank();
        let world = opts.collective.world_size();
        // What this run resumes from, and where it writes, are checked before any work: found
        // wanting after an epoch, that epoch is lost. Rank 0 writes the checkpoints.
        if let Some(ckpt) = &g.checkpoints {
            TrainState::read(ckpt)
                .with_context(|| format!("{}: Global.checkpoints", cfg.file.display()))?;
        }
        let run_dir = opts
            .collective
            .is_main()
            .then(|| claim_run_dir(cfg))
            .transpose()?;
        B::seed(&device, g.seed);
        let mut model =
            DistillationModel::<B>::new(&cfg.arch, g.frozen_bn_uses_batch_stats, &device)?;
        let keys: Vec<String> = model.slots.iter().map(|s| s.key.clone()).collect();
        let loss = CombinedLoss::new(&cfg.train_loss, &cfg.arch)?;
        loss.check_models(&keys.iter().map(String::as_str).collect::<Vec<_>>())?;
        let eval_loss = (!cfg.eval_loss.is_empty())
            .then(|| CombinedLoss::for_eval(&cfg.eval_loss, &cfg.arch))
            .transpose()?;
        let mut loss_parts = loss.init_parts(&device);
        if g.bn_stat_splits > 1 {
            model.train_bn = BnMode::TrainSplits(g.bn_stat_splits);
        }
        load_initial_weights(cfg, &mut model, &device)?;

        let section = cfg.train_section()?;
        let at = Placement {
            seed: g.seed,
            rank,
            world,
            threads: loader_threads(cfg),
        };
        let (loader, sampler) = Loader::from_section(section, at, true)?;
        check_labels(&loader.dataset, cfg, &section.dataset.cls_label_path)?;
        let iters = sampler.num_batches();
        if iters == 0 {
            bail!(
                "{}: DataLoader.Train yields no batch ({} samples, batch_size {}, drop_last)",
                cfg.file.display(),
                sampler.len,
                sampler.batch_size
            );
        }
        let eval_data = if g.eval_during_train {
            cfg.eval_data
                .as_ref()
                .map(|_| EvalData::new(cfg, rank, world))
                .transpose()?
        } else {
            None
        };

        let opt_cfg = cfg.optimizer()?;
        let schedule = LrSchedule::new(&opt_cfg.lr, g.epochs, iters);
        let mut optim: Optim<B> = sgd_config(opt_cfg)?.init();
        // Models, losses, loaders and the schedule are built: the config's keys are all read now.
        super::log_unknown_keys(cfg, opts.collective.is_main());

        let mut state = TrainState {
            models: keys,
            infer_model_name: cfg.arch.infer_model_name.clone(),
            arch: cfg.arch.name.clone(),
            world_size: world,
            ..Default::default()
        };
        if let Some(ckpt) = &g.checkpoints {
            state = resume(&mut model, &mut loss_parts, &mut optim, ckpt, &device)?;
            if state.world_size != world {
                // Positions count per-worker batches, whose size in samples changed with the world.
                if state.step_in_epoch > 0 {
                    tracing::warn!(
                        "{} was written mid-epoch by {} workers; with {world} the interrupted epoch restarts from its beginning",
                        ckpt.display(),
                        state.world_size
                    );
                }
                state.step_in_epoch = 0;
                state.global_step = state.epoch * iters;
                state.world_size = world;
            }
            tracing::info!(
                "resumed from {}: {} epochs and {} batches done, best top1 {:.5} (epoch {})",
                ckpt.display(),
                state.epoch,
                state.step_in_epoch,
                state.best_top1,
                state.best_epoch
            );
        }
        if world > 1 {
            // Every replica starts from rank 0's weights, buffers and frozen models (same seed or
            // not, same files or not). Each draws its own dropout masks: `step` seeds them from
            // (seed, rank, step).
            let coll = opts.collective.as_mut();
            let set = TrainableSet::take(&mut model, &mut loss_parts);
            replicas::broadcast_from_main(set, coll)?.put_back(&mut model, &mut loss_parts);
            model.frozen = replicas::broadcast_from_main(std::mem::take(&mut model.frozen), coll)?;
            tracing::info!(
                "rank {rank} of {world} ({} collectives): replicas synchronised from rank 0",
                opts.collective.kind()
            );
        }
        // The frozen teacher is scored before step 1: a teacher at chance level (weights not
        // loaded, or for other data) is the "loss flat at ln(classes)" failure, cheap to catch.
        if g.teacher_check_batches > 0 && cfg.eval_data.is_some() {
            // With evaluation off, its data may be absent: then there is nothing to check on.
            let built = match &eval_data {
                Some(_) => None,
                None => match EvalData::new(cfg, rank, world) {
                    Ok(d) => Some(d),
                    Err(e) => {
                        tracing::warn!("frozen-model check skipped: no eval data ({e:#})");
                        None
                    }
                },
            };
            if let Some(data) = eval_data.as_ref().or(built.as_ref()) {
                // Every rank checks its own shard; rank 0 speaks for them.
                check_teachers(
                    &model,
                    data,
                    g.teacher_check_batches,
                    &device,
                    opts.collective.is_main(),
                )?;
            }
        }
        Ok(Trainer {
            train_metrics: metric_specs(&cfg.train_metric, &cfg.arch.infer_model_name),
            cfg,
            device,
            opts,
            model,
            loss_parts,
            loss,
            eval_loss,
            loader: Some(loader),
            sampler,
            iters,
            eval_data,
            schedule,
            optim: Some(optim),
            state,
            step_losses: vec![],
            _run_dir: run_dir,
        })
    }

    fn arch_dir(&self) -> PathBuf {
        self.cfg.global.output_dir.join(&self.cfg.arch.name)
    }

    /// Runs the remaining epochs; stops early (with a resumable `latest`) on request.
    pub fn run(mut self) -> Result<TrainSummary> {
        let epochs = self.cfg.global.epochs;
        let progress = self
            .opts
            .progress
            .then(|| indicatif::ProgressBar::new(self.iters as u64));
        let mut stopped = false;
        for epoch in self.state.epoch + 1..=epochs {
            let EpochEnd::Completed {
                averages,
                stop_requested,
            } = self.train_epoch(epoch, progress.as_ref())?
            else {
                // Stopped mid-epoch: the position is saved, the rest of the epoch runs on resume.
                stopped = true;
                break;
            };
            self.end_epoch(epoch, &averages)?;
            // A stop requested with the last batch of an epoch takes effect after its eval and
            // checkpoints; with the last epoch's, the run is simply complete.
            stopped = stop_requested && epoch < epochs;
            if stopped {
                tracing::info!(
                    "stopped on request after epoch {epoch}; resumable checkpoint saved in {}/latest",
                    self.arch_dir().display()
                );
                break;
            }
        }
        if let Some(pb) = progress {
            pb.finish_and_clear();
        }
        Ok(TrainSummary {
            output_dir: self.arch_dir(),
            state: self.state,
            stopped_early: stopped,
            step_losses: self.step_losses,
        })
    }

    /// One epoch's steps (from the resume position).
    fn train_epoch(
        &mut self,
        epoch: usize,
        progress: Option<&indicatif::ProgressBar>,
    ) -> Result<EpochEnd> {
        let g = &self.cfg.global;
        let iters = self.iters;
        let skip = std::mem::take(&mut self.state.step_in_epoch);
        let batches: Vec<Vec<usize>> = self
            .sampler
            .batches(epoch - 1)
            .into_iter()
            .skip(skip)
            .collect();
        let mut avg = Averages::default();
        let mut timing = Averages::default();
        let mut tick = Instant::now();
        if let Some(pb) = progress {
            pb.set_position(skip as u64);
            pb.set_message(format!("epoch {epoch}/{}", g.epochs));
        }
        // The loader is lent out for the epoch: its batch iterator borrows it while steps
        // borrow the trainer mutably.
        let loader = self.loader.take().expect("loader present between epochs");
        let mut stop_requested = false;
        let result = (|| -> Result<bool> {
            let mut it = loader.epoch(batches, epoch);
            let mut i = skip;
            while let Some(batch) = it.next() {
                let batch = batch?;
                let reader = it.last_wait;
                let n = batch.labels.len();
                let done = self.step(&batch, epoch, i, &mut avg)?;
                i += 1;
                let now = Instant::now();
                timing.add("batch_cost", (now - tick).as_secs_f64(), 1);
                timing.add("reader_cost", reader.as_secs_f64(), 1);
                timing.add("images", n as f64, 1);
                if self.opts.collective.world_size() > 1 {
                    let comm: Duration = done.sync.copy + done.sync.reduce;
                    timing.add("allreduce_cost", comm.as_secs_f64(), 1);
                }
                tick = now;
                if let Some(pb) = progress {
                    pb.set_position(i as u64);
                }
                // Every rank logs (the launcher shows rank 0's lines and files all of them).
                if i.is_multiple_of(g.print_batch_step) || i == iters {
                    self.log_step(epoch, i, done.lr, &avg, &timing);
                }
                if done.stop && i < iters {
                    drop(it);
                    self.stop_mid_epoch(epoch, i)?;
                    return Ok(true);
                }
                // A stop with the epoch's last batch: finish it (eval, checkpoints) first.
                stop_requested |= done.stop;
            }
            Ok(false)
        })();
        self.loader = Some(loader);
        Ok(if result? {
            EpochEnd::StoppedMidEpoch
        } else {
            EpochEnd::Completed {
                averages: avg,
                stop_requested,
            }
        })
    }

    /// One training step on `batch`: forward, loss, backward, gradient exchange (with the stop
    /// request and votes on a non-finite loss, frozen-model logits or gradients), optimizer
    /// step. Anything non-finite on any rank fails the step on every rank, before its update.
    fn step(
        &mut self,
        batch: &Batch,
        epoch: usize,
        i: usize,
        avg: &mut Averages,
    ) -> Result<StepDone> {
        let g = &self.cfg.global;
        let n = batch.labels.len();
        // Dropout draws its masks from the backend's random stream, whose position a checkpoint
        // cannot hold: seeded per step from (seed, rank, step), a resumed run draws the masks
        // the uninterrupted one draws (as MGD's masks are drawn from (seed, step)).
        B::seed(
            &self.device,
            g.seed
                ^ (self.opts.collective.rank() as u64).wrapping_mul(0xD1B5_4A32_D192_ED03)
                ^ (self.state.global_step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let (x, y) = batch_tensors::<B>(batch, &self.device);
        let outputs = self.model.forward_train(x);
        let values = self.loss.forward(&LossContext {
            outputs: &outputs,
            labels: y.clone(),
            epoch,
            default_model: &self.cfg.arch.infer_model_name,
            parts: &self.loss_parts,
            mode: BnMode::Train,
            seed: g.seed,
            step: self.state.global_step as u64,
        })?;
        add_topk(avg, &outputs, &y, &self.train_metrics)?;
        let total = values.record(avg, n);
        self.step_losses.push(total);
        // What this rank found not finite, voted with the gradients (see `StepVotes`).
        let frozen: Vec<String> = self
            .model
            .slots
            .iter()
            .filter(|s| s.spec.frozen)
            .map(|s| s.key.clone())
            .collect();
        let coll = self.opts.collective.as_mut();
        let mut votes = StepVotes::new(coll.world_size(), coll.rank(), frozen.len());
        votes.set_stop(self.opts.stop.load(Ordering::SeqCst));
        votes.mark(StepVotes::LOSS, !total.is_finite());
        for (t, key) in frozen.iter().enumerate() {
            let logits = outputs[key].logits.clone();
            votes.mark(StepVotes::TEACHERS + t, finite::any_non_finite(logits));
        }
        let set = TrainableSet::take(&mut self.model, &mut self.loss_parts);
        let mut grads = GradientsParams::from_grads(values.total.backward(), &set);
        // The stop request and what was not finite travel with the gradients, so every rank
        // stops, or fails, after the same step, and knows which ranks saw what.
        let grads_slot = votes.own(StepVotes::GRADIENTS);
        let synced =
            replicas::all_reduce_grads(&set, &mut grads, &mut votes.buf, Some(grads_slot), coll);
        let sync = match synced {
            Ok(s) => s,
            Err(e) => {
                set.put_back(&mut self.model, &mut self.loss_parts);
                return Err(e);
            }
        };
        if let Some(what) = votes.non_finite(&frozen) {
            set.put_back(&mut self.model, &mut self.loss_parts);
            let hint = if votes.any(StepVotes::TEACHERS..votes.kinds) {
                "A frozen model gives non-finite outputs: check its weights (`pretrained`) and the preprocessing"
            } else {
                "Training diverged: lower the learning rate"
            };
            bail!(
                "training stopped at epoch {epoch}, iteration {i}, before its update: {what}. {hint}. \
                 Nothing was saved; {}",
                self.kept_checkpoints()
            );
        }
        let lr = self.schedule.at(self.state.global_step, epoch - 1);
        let optim = self
            .optim
            .as_mut()
            .expect("optimizer present between steps");
        optim
            .step(lr, set, grads)
            .put_back(&mut self.model, &mut self.loss_parts);
        self.state.global_step += 1;
        Ok(StepDone {
            stop: votes.stop(),
            lr,
            sync,
        })
    }

    fn log_step(&self, epoch: usize, i: usize, lr: f64, avg: &Averages, timing: &Averages) {
        let g = &self.cfg.global;
        let iters = self.iters;
        let bc = timing.get("batch_cost").unwrap_or(0.0);
        let left = (g.epochs - epoch) * iters + (iters - i);
        let comm = timing
            .get("allreduce_cost")
            .map(|c| format!(", allreduce_cost: {c:.5}s"))
            .unwrap_or_default();
        tracing::info!(
            "[Train][Epoch {epoch}/{}][Iter: {}/{iters}]lr({}): {lr:.8}, {}, batch_cost: {bc:.5}s, reader_cost: {:.5}s{comm}, ips: {:.5} samples/s, eta: {}",
            g.epochs,
            i - 1,
            self.cfg.optimizer().map(|o| o.lr.name.as_str()).unwrap_or("?"),
            avg.format(5),
            timing.get("reader_cost").unwrap_or(0.0),
            timing.get("images").unwrap_or(0.0) / bc.max(1e-9),
            fmt_eta(bc * left as f64)
        );
    }

    /// Saves the position inside `epoch` (after `i` batches) in `latest` and stops.
    fn stop_mid_epoch(&mut self, epoch: usize, i: usize) -> Result<()> {
        self.state.epoch = epoch - 1;
        self.state.step_in_epoch = i;
        self.sync_running_stats()?;
        self.refuse_non_finite_weights(&format!("at epoch {epoch}, iteration {i}"))?;
        if self.opts.collective.is_main() {
            self.save("latest")?;
            tracing::info!(
                "stopped on request at epoch {epoch} iteration {i}; resumable checkpoint saved in {}/latest",
                self.arch_dir().display()
            );
        }
        self.opts.collective.barrier()
    }

    /// After an epoch: running statistics averaged over the replicas (and the replicas checked
    /// identical), the epoch's averages logged, eval when due, checkpoints.
    fn end_epoch(&mut self, epoch: usize, averages: &Averages) -> Result<()> {
        let g = &self.cfg.global;
        self.state.epoch = epoch;
        let main = self.opts.collective.is_main();
        let world = self.opts.collective.world_size();
        // Eval and checkpoints read the running statistics: make them the replicas' mean.
        self.sync_running_stats()?;
        if world > 1 {
            let set = TrainableSet::take(&mut self.model, &mut self.loss_parts);
            let fp = replicas::check_identical(&set, self.opts.collective.as_mut());
            set.put_back(&mut self.model, &mut self.loss_parts);
            let fp = fp?;
            tracing::info!(
                "[Train][Epoch {epoch}] replicas identical on {world} ranks (fingerprint {fp:016x})"
            );
        }
        if main {
            tracing::info!(
                "[Train][Epoch {epoch}/{}][Avg]{}",
                g.epochs,
                averages.format(5)
            );
        }
        let eval_now = epoch.is_multiple_of(g.eval_interval) && epoch > g.start_eval_epoch
            || epoch == g.epochs;
        let mut improved = false;
        if let (Some(data), true) = (&self.eval_data, eval_now) {
            // Non-finite logits or eval loss fail the epoch here, before any of its checkpoints.
            let report = evaluate(
                &self.model,
                data,
                self.cfg,
                self.eval_loss.as_ref(),
                epoch,
                self.opts.collective.as_mut(),
            )
            .map_err(|e| match e.downcast_ref::<NonFiniteEval>() {
                Some(nf) => {
                    let hint = if nf.trained_model_diverged() {
                        "the trained weights diverged: lower the learning rate"
                    } else {
                        "a frozen model gives non-finite outputs: check its weights (`pretrained`)"
                    };
                    anyhow::anyhow!(
                        "{nf}: {hint}. No checkpoint of epoch {epoch} was written; {}",
                        self.kept_checkpoints()
                    )
                }
                None => e,
            })?;
            if report.top1 > self.state.best_top1 || self.state.best_epoch == 0 {
                self.state.best_top1 = report.top1;
                self.state.best_epoch = epoch;
                improved = true;
            }
            if main {
                tracing::info!(
                    "[Eval][Epoch {epoch}][best metric: {:.5}]",
                    self.state.best_top1
                );
            }
        }
        // Without an eval this epoch, non-finite weights would still reach `latest`.
        self.refuse_non_finite_weights(&format!("after epoch {epoch}"))?;
        if main {
            self.save("latest")?;
            if improved {
                self.save("best_model")?;
                tracing::info!(
                    "[Eval][Epoch {epoch}] new best top1 {:.5}: saved {}",
                    self.state.best_top1,
                    self.checkpoint_dir("best_model").display()
                );
            }
            if epoch.is_multiple_of(g.save_interval) {
                self.save(&format!("epoch_{epoch}"))?;
            }
        }
        self.opts.collective.barrier()
    }

    /// Averages BatchNorm running statistics over the replicas: the trainable models', and the
    /// frozen ones' when they run on batch statistics (`frozen_bn_uses_batch_stats`).
    fn sync_running_stats(&mut self) -> Result<()> {
        let coll = self.opts.collective.as_mut();
        if coll.world_size() == 1 {
            return Ok(());
        }
        let set = TrainableSet::take(&mut self.model, &mut self.loss_parts);
        replicas::average_running_stats(set, coll)?.put_back(&mut self.model, &mut self.loss_parts);
        if self.model.frozen_bn.is_train() {
            self.model.frozen =
                replicas::average_running_stats(std::mem::take(&mut self.model.frozen), coll)?;
        }
        Ok(())
    }

    /// Fails when a model's weights or the losses' layers hold NaN or infinite values, naming
    /// the tensors: such weights must not reach a checkpoint. Every rank checks (the replicas
    /// are identical), so all stop together without a collective.
    fn refuse_non_finite_weights(&self, when: &str) -> Result<()> {
        let mut bad: Vec<String> = vec![];
        for slot in &self.model.slots {
            let tensors = if slot.spec.frozen {
                finite::non_finite_tensors(&self.model.frozen[slot.index])
            } else {
                finite::non_finite_tensors(&self.model.trainable[slot.index])
            };
            if !tensors.is_empty() {
                bad.push(format!(
                    "model {}: {}",
                    slot.key,
                    finite::describe(&tensors)
                ));
            }
        }
        let tensors = finite::non_finite_tensors(&self.loss_parts);
        if !tensors.is_empty() {
            bad.push(format!(
                "the losses' layers: {}",
                finite::describe(&tensors)
            ));
        }
        if bad.is_empty() {
            return Ok(());
        }
        bail!(
            "the weights are not finite {when} ({}): training diverged: lower the learning rate. \
             No checkpoint was written; {}",
            bad.join("; "),
            self.kept_checkpoints()
        )
    }

    /// What a run that fails now leaves on disk, for its error message.
    fn kept_checkpoints(&self) -> String {
        let dir = self.arch_dir();
        if self.state.best_epoch > 0 {
            format!(
                "best_model (top1 {:.5}, epoch {}) and latest in {} are the last good ones",
                self.state.best_top1,
                self.state.best_epoch,
                dir.display()
            )
        } else {
            format!(
                "the checkpoints already in {} (if any) are untouched",
                dir.display()
            )
        }
    }

    fn checkpoint_dir(&self, name: &str) -> PathBuf {
        checkpoint::checkpoint_dir(&self.cfg.global.output_dir, &self.cfg.arch.name, name)
    }

    /// Writes checkpoint `name` (`latest`, `best_model`, `epoch_N`) atomically.
    fn save(&self, name: &str) -> Result<()> {
        let optim = self
            .optim
            .as_ref()
            .expect("optimizer present between steps");
        checkpoint::write_atomic(&self.checkpoint_dir(name), |tmp| {
            crate::weights::save_models(&self.model, tmp)?;
            save_loss_parts(&self.loss_parts, tmp)?;
            crate::weights::save_record::<B, _>(optim.to_record(), &tmp.join(OPTIMIZER_FILE))
                .context("saving optimizer state")?;
            std::fs::write(
                tmp.join(checkpoint::STATE_FILE),
                serde_json::to_string_pretty(&self.state)?,
            )?;
            std::fs::write(
                tmp.join("config.yaml"),
                serde_yaml::to_string(&self.cfg.tree)?,
            )?;
            Ok(())
        })
    }
}

/// Loads models, the losses' layers and the optimizer state from checkpoint `dir`.
fn resume<B: AutodiffBackend>(
    model: &mut DistillationModel<B>,
    loss_parts: &mut Vec<LossPart<B>>,
    optim: &mut Optim<B>,
    dir: &Path,
    device: &B::Device,
) -> Result<TrainState> {
    let state = TrainState::read(dir)?;
    let keys: Vec<&String> = model.slots.iter().map(|s| &s.key).collect();
    if state.models.iter().collect::<Vec<_>>() != keys {
        bail!(
            "checkpoint {} holds models {:?}, but the config has {:?}",
            dir.display(),
            state.models,
            keys
        );
    }
    crate::weights::load_models(model, dir, device)?;
    *loss_parts = load_loss_parts(std::mem::take(loss_parts), dir, device)?;
    let file = dir.join(OPTIMIZER_FILE);
    let record = crate::weights::load_record(&file, device).context("loading optimizer state")?;
    // `load_record` consumes the optimizer; a fresh one stands in for the moment it is moved out.
    let placeholder: Optim<B> = burn::optim::SgdConfig::new().init();
    let loaded = std::mem::replace(optim, placeholder).load_record(record);
    *optim = loaded;
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::StepVotes;

    /// The votes of `world` ranks after the sum: `marks` are (rank, kind) pairs.
    fn voted(world: usize, frozen: usize, marks: &[(usize, usize)]) -> StepVotes {
        let mut sum = StepVotes::new(world, 0, frozen);
        for &(rank, kind) in marks {
            let mut own = StepVotes::new(world, rank, frozen);
            own.mark(kind, true);
            for (s, o) in sum.buf.iter_mut().zip(&own.buf) {
                *s += o;
            }
        }
        sum
    }

    #[test]
    fn step_votes_name_what_was_not_finite_and_on_which_ranks() {
        let frozen = ["Teacher".to_string()];
        assert_eq!(voted(2, 1, &[]).non_finite(&frozen), None);
        let v = voted(
            2,
            1,
            &[
                (1, StepVotes::TEACHERS),
                (0, StepVotes::LOSS),
                (1, StepVotes::LOSS),
                (1, StepVotes::GRADIENTS),
            ],
        );
        assert_eq!(
            v.non_finite(&frozen).unwrap(),
            "non-finite logits of frozen model Teacher on rank 1; non-finite loss on ranks 0 and 1; \
             non-finite gradients on rank 1"
        );
        assert!(v.any(StepVotes::TEACHERS..v.kinds));
        assert!(!v.stop());
        // One process: no ranks named.
        let v = voted(1, 0, &[(0, StepVotes::GRADIENTS)]);
        assert_eq!(v.non_finite(&[]).unwrap(), "non-finite gradients");
    }
}
