//! Training: the step (frozen teacher forward off the graph, student forward/backward, combined
//! loss, optimizer step on the per-iteration schedule), logging in PaddleClas's shape, eval every
//! `eval_interval` epochs, and `latest` / `best_model` / `epoch_N` checkpoints.

use super::checkpoint::{self, TrainState, OPTIMIZER_FILE};
use super::evaluate::{evaluate, EvalData};
use super::{replicas, RunOptions};
use crate::arch::cpu_conv::ConvAutodiffBackend;
use crate::arch::{recorder, BnMode, DistillationModel, TrainableSet};
use crate::config::{Config, MetricSpec, Pretrained};
use crate::data::{ImageNetDataset, Loader, Placement};
use crate::loss::{CombinedLoss, LossContext};
use crate::metric::Averages;
use crate::optim::{sgd_config, LrSchedule};
use anyhow::{bail, Context, Result};
use burn::optim::{GradientsParams, Optimizer};
use burn::record::Recorder;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

/// What a finished (or stopped) training run leaves behind.
#[derive(Clone, Debug)]
pub struct TrainSummary {
    pub state: TrainState,
    pub output_dir: PathBuf,
    pub stopped_early: bool,
    /// The total training loss of every step this run took, in order.
    pub step_losses: Vec<f32>,
}

pub(crate) fn batch_tensors<B: Backend>(
    batch: &crate::data::Batch,
    device: &B::Device,
) -> (Tensor<B, 4>, Tensor<B, 1, Int>) {
    let x = Tensor::<B, 4>::from_data(TensorData::new(batch.images.clone(), batch.shape), device);
    let y = Tensor::<B, 1, Int>::from_data(
        TensorData::new(batch.labels.clone(), [batch.labels.len()]),
        device,
    );
    (x, y)
}

/// Threads for decoding and augmentation: the configured count, capped by the machine.
pub(crate) fn loader_threads(cfg: &Config) -> usize {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    cfg.global.threads.unwrap_or(cores).clamp(1, cores.max(1))
}

/// Metric specs, defaulting to top-1/top-5 of the inference model.
pub(crate) fn metric_specs(specs: &[MetricSpec], infer_model: &str) -> Vec<(String, Vec<usize>)> {
    if specs.is_empty() {
        return vec![(infer_model.to_string(), vec![1, 5])];
    }
    specs
        .iter()
        .map(|m| {
            (
                m.model_key
                    .clone()
                    .unwrap_or_else(|| infer_model.to_string()),
                m.topk.clone(),
            )
        })
        .collect()
}

/// Adds top-k accuracies of `logits` to `avg`; the first metric's names are `top{k}`, later ones
/// are prefixed with their model (`Teacher_top1`).
pub(crate) fn add_topk<B: Backend>(
    avg: &mut Averages,
    outputs: &crate::arch::Outputs<B>,
    labels: &Tensor<B, 1, Int>,
    specs: &[(String, Vec<usize>)],
) -> Result<()> {
    for (i, (model, ks)) in specs.iter().enumerate() {
        let out = outputs
            .get(model)
            .with_context(|| format!("Metric: no model named {model:?}"))?;
        let n = labels.dims()[0];
        let correct = crate::loss::functional::topk_correct(out.logits.clone(), labels.clone(), ks);
        for (k, c) in ks.iter().zip(correct) {
            let name = if i == 0 {
                format!("top{k}")
            } else {
                format!("{model}_top{k}")
            };
            avg.add(&name, c as f64 / n as f64, n);
        }
    }
    Ok(())
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

/// Loads per-model `pretrained` paths, then `Global.pretrained_model` (which wins, as in
/// PaddleClas: it is how eval/export/infer name the trained weights).
pub(crate) fn load_initial_weights<B: AutodiffBackend>(
    cfg: &Config,
    model: &mut DistillationModel<B>,
    device: &B::Device,
) -> Result<()> {
    if let Some(dir) = &cfg.global.pretrained_model {
        model
            .load_all(dir, device)
            .with_context(|| format!("Global.pretrained_model = {}", dir.display()))?;
        tracing::info!("loaded all models from {}", dir.display());
        return Ok(());
    }
    for spec in &cfg.arch.models {
        let file = match &spec.pretrained {
            Pretrained::None => None,
            Pretrained::Released => Some(crate::arch::import::resolve_released(
                spec,
                &cfg.global.pretrained_dir,
            )?),
            Pretrained::Path(p) => Some(
                checkpoint::resolve_model_file(p, &spec.key)
                    .with_context(|| format!("Arch model {}: pretrained", spec.key))?,
            ),
        };
        if let Some(file) = file {
            model.load_model(&spec.key, &file, device)?;
            tracing::info!(
                "model {}: loaded pretrained weights {}",
                spec.key,
                file.display()
            );
        }
    }
    Ok(())
}

pub fn train<B: ConvAutodiffBackend>(
    cfg: &Config,
    device: B::Device,
    mut opts: RunOptions,
) -> Result<TrainSummary> {
    super::require_trainable_weights(cfg)?;
    let g = &cfg.global;
    let rank = opts.collective.rank();
    let world = opts.collective.world_size();
    B::seed(&device, g.seed);
    let mut model = DistillationModel::<B>::new(&cfg.arch, g.frozen_bn_uses_batch_stats, &device)?;
    let keys: Vec<String> = model.slots.iter().map(|s| s.key.clone()).collect();
    let loss = CombinedLoss::new(&cfg.train_loss, &cfg.arch)?;
    loss.check_models(&keys.iter().map(String::as_str).collect::<Vec<_>>())?;
    let eval_loss = (!cfg.eval_loss.is_empty())
        .then(|| CombinedLoss::for_eval(&cfg.eval_loss, &cfg.arch))
        .transpose()?;
    model.trainable.loss_parts = loss.init_parts(&device);
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
    let schedule = LrSchedule::new(&opt_cfg.lr, g.epochs, iters)?;
    let mut optim: Optim<B> = sgd_config(opt_cfg)?.init();

    let arch_dir = g.output_dir.join(&cfg.arch.name);
    let mut state = TrainState {
        models: keys.clone(),
        infer_model_name: cfg.arch.infer_model_name.clone(),
        arch: cfg.arch.name.clone(),
        ..Default::default()
    };
    state.world_size = world;
    if let Some(ckpt) = &g.checkpoints {
        state = resume(&mut model, &mut optim, ckpt, &device)?;
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
        model.trainable = replicas::broadcast_from_main(model.trainable, coll)?;
        model.frozen = replicas::broadcast_from_main(model.frozen, coll)?;
        B::seed(&device, g.seed.wrapping_add(rank as u64));
        tracing::info!(
            "rank {rank} of {world} ({} collectives): replicas synchronised from rank 0",
            opts.collective.kind()
        );
    }
    // The frozen teacher is scored before step 1: a teacher at chance level (weights not
    // loaded, or for other data) is the "loss flat at ln(classes)" failure, cheap to catch here.
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
            super::evaluate::check_teachers(
                &model,
                data,
                g.teacher_check_batches,
                &device,
                opts.collective.is_main(),
            )?;
        }
    }
    let train_metrics = metric_specs(&cfg.train_metric, &cfg.arch.infer_model_name);
    let progress = opts
        .progress
        .then(|| indicatif::ProgressBar::new(iters as u64));
    let main = opts.collective.is_main();
    let mut stopped = false;
    let mut step_losses = vec![];

    'epochs: for epoch in state.epoch + 1..=g.epochs {
        let skip = std::mem::take(&mut state.step_in_epoch);
        let batches: Vec<Vec<usize>> = sampler.batches(epoch - 1).into_iter().skip(skip).collect();
        let mut avg = Averages::default();
        let mut timing = Averages::default();
        let mut tick = Instant::now();
        if let Some(pb) = &progress {
            pb.set_position(skip as u64);
            pb.set_message(format!("epoch {epoch}/{}", g.epochs));
        }
        let mut it = loader.epoch(batches, epoch);
        let mut i = skip;
        while let Some(batch) = it.next() {
            let batch = batch?;
            let reader = it.last_wait;
            let n = batch.labels.len();
            let (x, y) = batch_tensors::<B>(&batch, &device);
            let outputs = model.forward_train(x);
            let values = loss.forward(&LossContext {
                outputs: &outputs,
                labels: y.clone(),
                epoch,
                default_model: &cfg.arch.infer_model_name,
                parts: &model.trainable.loss_parts,
                mode: BnMode::Train,
                seed: g.seed,
                step: state.global_step as u64,
            })?;
            add_topk(&mut avg, &outputs, &y, &train_metrics)?;
            let total = values.record(&mut avg, n);
            step_losses.push(total);
            let mut grads = GradientsParams::from_grads(values.total.backward(), &model.trainable);
            // The stop request and a diverged loss travel with the gradients, so every rank
            // stops, or fails, after the same step.
            let mut votes = [
                opts.stop.load(Ordering::SeqCst) as u8 as f32,
                !total.is_finite() as u8 as f32,
            ];
            let sync = replicas::all_reduce_grads(
                &model.trainable,
                &mut grads,
                &mut votes,
                opts.collective.as_mut(),
            )?;
            if votes[1] > 0.0 {
                bail!(
                    "loss is not finite at epoch {epoch}, iteration {i} (here {total}; on {} of {world} ranks): \
                     training diverged (lower the learning rate?)",
                    votes[1]
                );
            }
            let stop_now = votes[0] > 0.0;
            let lr = schedule.at(state.global_step, epoch - 1);
            model.trainable = optim.step(lr, model.trainable, grads);
            state.global_step += 1;
            i += 1;
            let now = Instant::now();
            timing.add("batch_cost", (now - tick).as_secs_f64(), 1);
            timing.add("reader_cost", reader.as_secs_f64(), 1);
            timing.add("images", n as f64, 1);
            if world > 1 {
                timing.add("allreduce_cost", (sync.copy + sync.reduce).as_secs_f64(), 1);
            }
            tick = now;
            if let Some(pb) = &progress {
                pb.set_position(i as u64);
            }
            // Every rank logs (the launcher shows rank 0's lines and files all of them).
            if i.is_multiple_of(g.print_batch_step) || i == iters {
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
                    opt_cfg.lr.name,
                    avg.format(5),
                    timing.get("reader_cost").unwrap_or(0.0),
                    timing.get("images").unwrap_or(0.0) / bc.max(1e-9),
                    fmt_eta(bc * left as f64)
                );
            }
            if stop_now {
                stopped = true;
                if i < iters {
                    // Mid-epoch: save the position; the rest of the epoch runs on resume.
                    state.epoch = epoch - 1;
                    state.step_in_epoch = i;
                    drop(it);
                    sync_running_stats(&mut model, opts.collective.as_mut())?;
                    if main {
                        save(
                            &model,
                            &optim,
                            cfg,
                            &state,
                            &checkpoint::checkpoint_dir(&g.output_dir, &cfg.arch.name, "latest"),
                        )?;
                        tracing::info!(
                            "stopped on request at epoch {epoch} iteration {i}; resumable checkpoint saved in {}/latest",
                            arch_dir.display()
                        );
                    }
                    opts.collective.barrier()?;
                    break 'epochs;
                }
                // Last batch of the epoch: finish it (eval, checkpoints) below, then stop.
            }
        }
        drop(it);
        state.epoch = epoch;
        // Eval and checkpoints read the running statistics: make them the replicas' mean.
        sync_running_stats(&mut model, opts.collective.as_mut())?;
        if world > 1 {
            let fp = replicas::check_identical(&model.trainable, opts.collective.as_mut())?;
            tracing::info!("[Train][Epoch {epoch}] replicas identical on {world} ranks (fingerprint {fp:016x})");
        }
        if main {
            tracing::info!("[Train][Epoch {epoch}/{}][Avg]{}", g.epochs, avg.format(5));
        }
        let eval_now =
            epoch % g.eval_interval == 0 && epoch > g.start_eval_epoch || epoch == g.epochs;
        let mut improved = false;
        if let (Some(data), true) = (&eval_data, eval_now) {
            let report = evaluate(
                &model,
                data,
                cfg,
                eval_loss.as_ref(),
                epoch,
                opts.collective.as_mut(),
            )?;
            if report.top1 > state.best_top1 || state.best_epoch == 0 {
                state.best_top1 = report.top1;
                state.best_epoch = epoch;
                improved = true;
            }
            if main {
                tracing::info!("[Eval][Epoch {epoch}][best metric: {:.5}]", state.best_top1);
            }
        }
        if main {
            let dir = |name: &str| checkpoint::checkpoint_dir(&g.output_dir, &cfg.arch.name, name);
            save(&model, &optim, cfg, &state, &dir("latest"))?;
            if improved {
                save(&model, &optim, cfg, &state, &dir("best_model"))?;
                tracing::info!(
                    "[Eval][Epoch {epoch}] new best top1 {:.5}: saved {}",
                    state.best_top1,
                    dir("best_model").display()
                );
            }
            if epoch % g.save_interval == 0 {
                save(&model, &optim, cfg, &state, &dir(&format!("epoch_{epoch}")))?;
            }
        }
        opts.collective.barrier()?;
        if stopped && epoch == g.epochs {
            stopped = false; // the request came with the last step: the run is complete
        }
        if stopped {
            tracing::info!(
                "stopped on request after epoch {epoch}; resumable checkpoint saved in {}/latest",
                arch_dir.display()
            );
            break;
        }
    }
    if let Some(pb) = progress {
        pb.finish_and_clear();
    }
    Ok(TrainSummary {
        state,
        output_dir: arch_dir,
        stopped_early: stopped,
        step_losses,
    })
}

/// Averages BatchNorm running statistics over the replicas: the trainable models', and the
/// frozen ones' when they run on batch statistics (`frozen_bn_uses_batch_stats`).
fn sync_running_stats<B: AutodiffBackend>(
    model: &mut DistillationModel<B>,
    coll: &mut dyn crate::dist::Collective,
) -> Result<()> {
    if coll.world_size() == 1 {
        return Ok(());
    }
    let trainable = std::mem::replace(
        &mut model.trainable,
        TrainableSet {
            models: vec![],
            loss_parts: vec![],
        },
    );
    model.trainable = replicas::average_running_stats(trainable, coll)?;
    if model.frozen_bn.is_train() {
        model.frozen = replicas::average_running_stats(std::mem::take(&mut model.frozen), coll)?;
    }
    Ok(())
}

pub(crate) fn check_labels(ds: &ImageNetDataset, cfg: &Config, list: &Path) -> Result<()> {
    let classes = ds.num_classes();
    for m in &cfg.arch.models {
        if classes > m.class_num {
            bail!(
                "{} has label {} but model {} has class_num {} (set Arch.class_num)",
                list.display(),
                classes - 1,
                m.key,
                m.class_num
            );
        }
    }
    Ok(())
}

fn save<B: AutodiffBackend>(
    model: &DistillationModel<B>,
    optim: &Optim<B>,
    cfg: &Config,
    state: &TrainState,
    dir: &Path,
) -> Result<()> {
    checkpoint::write_atomic(dir, |tmp| {
        model.save(tmp)?;
        recorder()
            .record(optim.to_record(), tmp.join(OPTIMIZER_FILE))
            .context("saving optimizer state")?;
        std::fs::write(
            tmp.join(checkpoint::STATE_FILE),
            serde_json::to_string_pretty(state)?,
        )?;
        std::fs::write(tmp.join("config.yaml"), serde_yaml::to_string(&cfg.tree)?)?;
        Ok(())
    })
}

fn resume<B: AutodiffBackend>(
    model: &mut DistillationModel<B>,
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
    model.load_all(dir, device)?;
    model.load_loss_parts(dir, device)?;
    let file = dir.join(OPTIMIZER_FILE);
    let record = recorder()
        .load(file.clone(), device)
        .with_context(|| format!("loading optimizer state {}.mpk", file.display()))?;
    let fresh: Optim<B> = std::mem::replace(optim, sgd_config_placeholder());
    *optim = fresh.load_record(record);
    Ok(state)
}

// `load_record` consumes the optimizer; this stands in for the moment it is moved out.
fn sgd_config_placeholder<B: AutodiffBackend>() -> Optim<B> {
    burn::optim::SgdConfig::new().init()
}
