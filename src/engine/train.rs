//! Training as a small [`Trainer`]: built once (models, losses, data, optimizer, resume, replicas
//! synchronised, the frozen teacher checked), then epochs of [`Trainer::step`] (frozen teacher
//! forward off the graph, student forward/backward, combined loss, gradient exchange, optimizer
//! step on the per-iteration schedule) and [`Trainer::end_epoch`] (running statistics synced,
//! eval every `eval_interval` epochs, `latest` / `best_model` / `epoch_N` checkpoints).

use super::checkpoint::{self, TrainState, OPTIMIZER_FILE};
use super::evaluate::{check_teachers, evaluate, EvalData};
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
use crate::weights::recorder;
use anyhow::{bail, Context, Result};
use burn::optim::{GradientsParams, Optimizer};
use burn::record::Recorder;
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
}

impl<'a, B: ConvAutodiffBackend> Trainer<'a, B> {
    /// Builds everything a run needs and checks what can be checked before step 1. The order of
    /// random draws is fixed: seed, models, the losses' layers, then weights from files.
    pub fn new(cfg: &'a Config, device: B::Device, mut opts: RunOptions) -> Result<Self> {
        require_trainable_weights(cfg)?;
        let g = &cfg.global;
        let rank = opts.collective.rank();
        let world = opts.collective.world_size();
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
            // not, same files or not), and draws its own random numbers (dropout) from here on.
            let coll = opts.collective.as_mut();
            let set = TrainableSet::take(&mut model, &mut loss_parts);
            replicas::broadcast_from_main(set, coll)?.put_back(&mut model, &mut loss_parts);
            model.frozen = replicas::broadcast_from_main(std::mem::take(&mut model.frozen), coll)?;
            B::seed(&device, g.seed.wrapping_add(rank as u64));
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
    /// request and a non-finite-loss vote), optimizer step.
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
        let set = TrainableSet::take(&mut self.model, &mut self.loss_parts);
        let mut grads = GradientsParams::from_grads(values.total.backward(), &set);
        // The stop request and a diverged loss travel with the gradients, so every rank
        // stops, or fails, after the same step.
        let mut votes = [
            self.opts.stop.load(Ordering::SeqCst) as u8 as f32,
            !total.is_finite() as u8 as f32,
        ];
        let synced =
            replicas::all_reduce_grads(&set, &mut grads, &mut votes, self.opts.collective.as_mut());
        let sync = match synced {
            Ok(s) => s,
            Err(e) => {
                set.put_back(&mut self.model, &mut self.loss_parts);
                return Err(e);
            }
        };
        if votes[1] > 0.0 {
            set.put_back(&mut self.model, &mut self.loss_parts);
            bail!(
                "loss is not finite at epoch {epoch}, iteration {i} (here {total}; on {} of {} ranks): \
                 training diverged (lower the learning rate?)",
                votes[1],
                self.opts.collective.world_size()
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
            stop: votes[0] > 0.0,
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
            let report = evaluate(
                &self.model,
                data,
                self.cfg,
                self.eval_loss.as_ref(),
                epoch,
                self.opts.collective.as_mut(),
            )?;
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
            recorder()
                .record(optim.to_record(), tmp.join(OPTIMIZER_FILE))
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
    let record = recorder()
        .load(file.clone(), device)
        .with_context(|| format!("loading optimizer state {}.mpk", file.display()))?;
    // `load_record` consumes the optimizer; a fresh one stands in for the moment it is moved out.
    let placeholder: Optim<B> = burn::optim::SgdConfig::new().init();
    let loaded = std::mem::replace(optim, placeholder).load_record(record);
    *optim = loaded;
    Ok(state)
}
