//! Losses: one registry from PaddleClas's config names to formulas, one generic wrapper for
//! `model_name_pairs` / `model_names` / `key`, and the combined (weighted) loss with
//! PaddleClas's term names. Losses with their own trainable layers (MGD, PEFD, AFD) keep them in
//! [`parts::LossPart`]s, trained and saved with the models.

pub mod functional;
pub mod parts;

use crate::arch::{ModelOutput, Outputs};
use crate::config::{ArchConfig, LossSpec, Node};
use crate::nn::BnMode;
use anyhow::{anyhow, bail, Result};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use functional::{Distance, DmlAct, RkdVariant};
use parts::LossPart;

/// Loss names the registry knows.
pub const LOSSES: &[&str] = &[
    "CELoss",
    "DistillationCELoss",
    "DistillationDMLLoss",
    "DistillationDistanceLoss",
    "DistillationGTCELoss",
    "DistillationKLDivLoss",
    "DistillationDKDLoss",
    "DistillationWSLLoss",
    "DistillationDISTLoss",
    "DistillationSKDLoss",
    "DistillationRKDLoss",
    "DistillationPairLoss",
    "AFDLoss",
];

/// `base_loss_name`s of `DistillationPairLoss`.
pub const PAIR_LOSSES: &[&str] = &["MGDLoss", "PEFDLoss"];

/// The formula of a loss entry, with its parameters.
#[derive(Clone, Debug, PartialEq)]
pub enum Formula {
    /// Hard-label CE (optionally label-smoothed); `CELoss_<model>`.
    GtCe { epsilon: Option<f64> },
    /// Soft-label CE against the pair's second model (`DistillationCELoss`); `CELoss_<A>_<B>`.
    SoftCe,
    /// Deep mutual learning's symmetric KL; `DMLLoss_<A>_<B>_<pair index>`.
    Dml {
        act: DmlAct,
        sum_across_class_dim: bool,
    },
    /// Distance between outputs (often feature maps via `key`); `loss_<mode>_loss_<mode>_<pair index>`.
    Distance { mode: Distance },
    /// Hinton KD; `loss_kldiv_<A>_<B>`.
    Kl { temperature: f64 },
    /// Decoupled KD with an optional linear warm-up over `warmup` epochs; `loss_dkd_<A>_<B>`.
    Dkd {
        temperature: f64,
        alpha: f64,
        beta: f64,
        warmup: Option<f64>,
        teacher_target: bool,
    },
    /// Weighted soft labels; `wsl_loss_<A>_<B>`.
    Wsl {
        temperature: f64,
        teacher_target: bool,
    },
    /// DIST's inter/intra-class Pearson relations; `loss_dist_<A>_<B>`.
    Dist { beta: f64, gamma: f64 },
    /// Spherical KD; `skd_loss_<A>_<B>`.
    Skd {
        temperature: f64,
        multiplier: f64,
        alpha: f64,
        teacher_target: bool,
    },
    /// Relational KD on `(student key, teacher key)` outputs;
    /// `loss_angle_<i>_<A>_<B>` and `loss_dist_<i>_<A>_<B>`.
    Rkd {
        keys: Vec<(String, String)>,
        target_size: Option<usize>,
        variant: RkdVariant,
        /// kd-launch extensions (PaddleClas applies the entry's one weight to both terms).
        angle_weight: f64,
        distance_weight: f64,
    },
    /// `DistillationPairLoss` with `base_loss_name: MGDLoss`; `<name>_<i>_<A>_<B>`.
    Mgd {
        s_key: String,
        t_key: String,
        student_channels: usize,
        teacher_channels: usize,
        alpha: f64,
        lambda: f64,
    },
    /// `DistillationPairLoss` with `base_loss_name: PEFDLoss`; `<name>_<i>_<A>_<B>`.
    Pefd {
        s_key: String,
        t_key: String,
        student_channel: usize,
        teacher_channel: usize,
        projectors: usize,
    },
    /// Attention-based feature distillation over all tapped maps; `loss_afd`.
    Afd {
        student_keys: Vec<String>,
        teacher_keys: Vec<String>,
        student_channels: Vec<usize>,
        teacher_channels: Vec<usize>,
        qk_dim: usize,
    },
}

impl LossTerm {
    /// Whether the loss has its own trainable layers (a [`LossPart`]).
    pub fn has_part(&self) -> bool {
        matches!(
            self.formula,
            Formula::Mgd { .. } | Formula::Pefd { .. } | Formula::Afd { .. }
        )
    }
}

impl Formula {
    /// Whether the formula reads one logit (or `key`) tensor per model.
    fn reads_logits(&self) -> bool {
        !matches!(
            self,
            Formula::Distance { .. }
                | Formula::Rkd { .. }
                | Formula::Mgd { .. }
                | Formula::Pefd { .. }
                | Formula::Afd { .. }
        )
    }
}

/// Which model outputs a loss reads.
#[derive(Clone, Debug, PartialEq)]
pub enum Binding {
    /// Plain `CELoss`: the only (or inference) model's logits.
    Plain,
    /// `model_names`: a ground-truth loss per model.
    Models(Vec<String>),
    /// `model_name_pairs`: a loss per (student-side, teacher-side) pair.
    Pairs(Vec<(String, String)>),
}

/// One `Loss.Train` / `Loss.Eval` entry, resolved.
#[derive(Clone, Debug)]
pub struct LossTerm {
    pub config_name: String,
    pub weight: f64,
    pub formula: Formula,
    pub binding: Binding,
    /// `key` into a model's output dict (`logits`, or a `return_patterns` feature map).
    pub key: Option<String>,
    /// The entry's `name` (the prefix of its logged terms) where PaddleClas has one.
    pub name: String,
}

/// What a loss sees of the batch.
pub struct LossContext<'a, B: Backend> {
    pub outputs: &'a Outputs<B>,
    pub labels: Tensor<B, 1, Int>,
    /// 1-based epoch (for warm-ups).
    pub epoch: usize,
    /// The model that a plain (unwrapped) loss applies to.
    pub default_model: &'a str,
    /// The trainable parts of the losses, as made by [`CombinedLoss::init_parts`].
    pub parts: &'a [LossPart<B>],
    /// BatchNorm mode of the loss parts' layers (Train while training).
    pub mode: BnMode,
    /// `Global.seed` and the global step: random masks (MGD) are drawn from them, so a resumed
    /// run draws the same masks.
    pub seed: u64,
    pub step: u64,
}

fn teacher_target(p: &Node) -> Result<bool> {
    Ok(p.bool_or("use_target_as_gt", false)?)
}

fn dml_act(p: &Node) -> Result<DmlAct> {
    // `act: None` (null after PaddleClas's literal evaluation) means no activation.
    let raw = p.value.as_mapping().and_then(|m| m.get("act"));
    Ok(match raw {
        None => DmlAct::Softmax,
        Some(v) if v.is_null() => DmlAct::Identity,
        Some(_) => match p.require("act")?.as_str()?.as_str() {
            "softmax" => DmlAct::Softmax,
            "sigmoid" => DmlAct::Sigmoid,
            "None" => DmlAct::Identity,
            other => bail!(
                "{}",
                p.error(format!(
                    "act must be softmax, sigmoid or None, got {other:?}"
                ))
            ),
        },
    })
}

fn required_usize(p: &Node, key: &str) -> Result<usize> {
    Ok(p.require(key)?.as_usize()?)
}

/// `[[C, H, W], ...]` shapes; only the channels are used (spatial sizes come from the maps).
fn channels(p: &Node, key: &str) -> Result<Vec<usize>> {
    p.require(key)?
        .items()?
        .iter()
        .map(|s| {
            let dims = s.items()?;
            match dims.first() {
                Some(c) if !dims.is_empty() => Ok(c.as_usize()?),
                _ => bail!("{}", s.error("expected [channels, height, width]")),
            }
        })
        .collect()
}

fn build_term(spec: &LossSpec, arch: &ArchConfig) -> Result<LossTerm> {
    let p = &spec.params;
    let e = |m: String| anyhow!("{}", p.error(m));
    let mut binding_override = None;
    let (formula, known, default_name): (Formula, &[&str], &str) = match spec.name.as_str() {
        "CELoss" | "DistillationGTCELoss" => (
            Formula::GtCe {
                epsilon: p.f64("epsilon")?,
            },
            &["epsilon"],
            "CELoss",
        ),
        "DistillationCELoss" => (Formula::SoftCe, &[], "CELoss"),
        "DistillationDMLLoss" => (
            Formula::Dml {
                act: dml_act(p)?,
                sum_across_class_dim: p.bool_or("sum_across_class_dim", false)?,
            },
            &["act", "sum_across_class_dim"],
            "DMLLoss",
        ),
        "DistillationDistanceLoss" => {
            let mode = match p.str_or("mode", "l2")?.as_str() {
                "l2" => Distance::L2,
                "l1" => Distance::L1,
                "smooth_l1" => Distance::SmoothL1,
                other => {
                    return Err(e(format!(
                        "mode must be l2, l1 or smooth_l1, got {other:?}"
                    )))
                }
            };
            (Formula::Distance { mode }, &["mode"], "loss_")
        }
        "DistillationKLDivLoss" => (
            Formula::Kl {
                temperature: p.f64_or("temperature", 4.0)?,
            },
            &["temperature"],
            "loss_kldiv",
        ),
        "DistillationDKDLoss" => (
            Formula::Dkd {
                temperature: p.f64_or("temperature", 1.0)?,
                alpha: p.f64_or("alpha", 1.0)?,
                beta: p.f64_or("beta", 1.0)?,
                warmup: p.f64("warmup")?,
                teacher_target: teacher_target(p)?,
            },
            &["temperature", "alpha", "beta", "warmup", "use_target_as_gt"],
            "loss_dkd",
        ),
        "DistillationWSLLoss" => (
            Formula::Wsl {
                temperature: p.f64_or("temperature", 2.0)?,
                teacher_target: teacher_target(p)?,
            },
            &["temperature", "use_target_as_gt"],
            "wsl_loss",
        ),
        "DistillationDISTLoss" => (
            Formula::Dist {
                beta: p.f64_or("beta", 1.0)?,
                gamma: p.f64_or("gamma", 1.0)?,
            },
            &["beta", "gamma"],
            "loss_dist",
        ),
        "DistillationSKDLoss" => (
            Formula::Skd {
                temperature: p.f64_or("temperature", 1.0)?,
                multiplier: p.f64_or("multiplier", 2.0)?,
                alpha: p.f64_or("alpha", 0.9)?,
                teacher_target: teacher_target(p)?,
            },
            &["temperature", "multiplier", "alpha", "use_target_as_gt"],
            "skd_loss",
        ),
        "DistillationRKDLoss" => {
            let s = p.str_list("student_keepkeys")?.unwrap_or_default();
            let t = p.str_list("teacher_keepkeys")?.unwrap_or_default();
            if s.len() != t.len() || s.is_empty() {
                return Err(e(format!(
                    "student_keepkeys and teacher_keepkeys must name the same number (≥ 1) of outputs, got {} and {}",
                    s.len(),
                    t.len()
                )));
            }
            if p.get("model_name_pairs").is_none() {
                binding_override = Some(Binding::Pairs(vec![(
                    "Student".to_string(),
                    "Teacher".to_string(),
                )]));
            }
            let variant = match p.str_or("variant", "paddleclas")?.as_str() {
                "paddleclas" => RkdVariant::Paddle,
                "paper" => RkdVariant::Paper,
                other => {
                    return Err(e(format!(
                        "variant must be paddleclas or paper, got {other:?}"
                    )))
                }
            };
            (
                Formula::Rkd {
                    keys: s.into_iter().zip(t).collect(),
                    target_size: p.usize("target_size")?,
                    variant,
                    angle_weight: p.f64_or("angle_weight", 1.0)?,
                    distance_weight: p.f64_or("distance_weight", 1.0)?,
                },
                &[
                    "student_keepkeys",
                    "teacher_keepkeys",
                    "target_size",
                    "variant",
                    "angle_weight",
                    "distance_weight",
                ],
                "loss",
            )
        }
        "DistillationPairLoss" => {
            let base = p.require("base_loss_name")?.as_str()?;
            let s_key = p.require("s_key")?.as_str()?;
            let t_key = p.require("t_key")?.as_str()?;
            match base.as_str() {
                "MGDLoss" => (
                    Formula::Mgd {
                        s_key,
                        t_key,
                        student_channels: required_usize(p, "student_channels")?,
                        teacher_channels: required_usize(p, "teacher_channels")?,
                        alpha: p.f64_or("alpha_mgd", 1.756)?,
                        lambda: p.f64_or("lambda_mgd", 0.15)?,
                    },
                    &[
                        "base_loss_name",
                        "s_key",
                        "t_key",
                        "student_channels",
                        "teacher_channels",
                        "alpha_mgd",
                        "lambda_mgd",
                    ],
                    "loss",
                ),
                "PEFDLoss" => (
                    Formula::Pefd {
                        s_key,
                        t_key,
                        student_channel: required_usize(p, "student_channel")?,
                        teacher_channel: required_usize(p, "teacher_channel")?,
                        projectors: p.usize_or("num_projectors", 3)?,
                    },
                    &[
                        "base_loss_name",
                        "s_key",
                        "t_key",
                        "student_channel",
                        "teacher_channel",
                        "num_projectors",
                    ],
                    "loss",
                ),
                other => {
                    return Err(anyhow!(
                        "{}",
                        p.require("base_loss_name")?.error(format!(
                            "unknown base loss {other:?}; known: {}",
                            PAIR_LOSSES.join(", ")
                        ))
                    ))
                }
            }
        }
        "AFDLoss" => {
            let pair = p
                .str_list("model_name_pair")?
                .unwrap_or_else(|| vec!["Student".into(), "Teacher".into()]);
            let [s, t] = pair.as_slice() else {
                return Err(e("model_name_pair must be [student, teacher]".into()));
            };
            for (keys, want) in [
                ("student_keys", ["bilinear_key", "value"]),
                ("teacher_keys", ["query", "value"]),
            ] {
                if let Some(k) = p.str_list(keys)? {
                    if k != want {
                        return Err(e(format!(
                            "{keys} must be {want:?} (the LinearTransform outputs), got {k:?}"
                        )));
                    }
                }
            }
            let transform = |model: &str, kind: &str| {
                arch.attention
                    .iter()
                    .find(|a| a.model == model && a.name == kind)
                    .ok_or_else(|| {
                        e(format!(
                            "AFDLoss needs Arch model {model} to be an AttentionModel with a {kind}"
                        ))
                    })
            };
            let (ts, tt) = (
                transform(s, "LinearTransformStudent")?,
                transform(t, "LinearTransformTeacher")?,
            );
            let (student_channels, teacher_channels) =
                (channels(p, "s_shapes")?, channels(p, "t_shapes")?);
            if student_channels.len() != ts.keys.len() || teacher_channels.len() != tt.keys.len() {
                return Err(e(format!(
                    "s_shapes/t_shapes list {} and {} maps, the transforms read {} and {}",
                    student_channels.len(),
                    teacher_channels.len(),
                    ts.keys.len(),
                    tt.keys.len()
                )));
            }
            // The transforms' own shape lists (PaddleClas sizes their layers from them) must agree.
            for (transform, key, ours) in [
                (ts, "s_shapes", &student_channels),
                (tt, "t_shapes", &teacher_channels),
                (ts, "t_shapes", &teacher_channels),
            ] {
                if transform.params.get(key).is_some() && channels(&transform.params, key)? != *ours
                {
                    return Err(anyhow!(
                        "{}",
                        transform
                            .params
                            .require(key)?
                            .error(format!("channels differ from AFDLoss.{key} ({ours:?})"))
                    ));
                }
            }
            let qk_dim = p.usize_or("qk_dim", tt.qk_dim)?;
            if ts.qk_dim != qk_dim || tt.qk_dim != qk_dim {
                return Err(e(format!(
                    "qk_dim differs between AFDLoss ({qk_dim}) and the LinearTransforms ({}, {})",
                    ts.qk_dim, tt.qk_dim
                )));
            }
            binding_override = Some(Binding::Pairs(vec![(s.clone(), t.clone())]));
            (
                Formula::Afd {
                    student_keys: ts.keys.clone(),
                    teacher_keys: tt.keys.clone(),
                    student_channels,
                    teacher_channels,
                    qk_dim,
                },
                &[
                    "model_name_pair",
                    "student_keys",
                    "teacher_keys",
                    "s_shapes",
                    "t_shapes",
                    "qk_dim",
                ],
                "loss_afd",
            )
        }
        other => bail!(
            "{}",
            p.error(format!(
                "unknown loss {other:?}; known losses: {}",
                LOSSES.join(", ")
            ))
        ),
    };
    match &formula {
        Formula::Kl { temperature }
        | Formula::Dkd { temperature, .. }
        | Formula::Wsl { temperature, .. }
        | Formula::Skd { temperature, .. }
            if *temperature <= 0.0 =>
        {
            return Err(e(format!(
                "temperature must be positive, got {temperature}"
            )));
        }
        Formula::GtCe { epsilon: Some(eps) } if !(0.0..1.0).contains(eps) => {
            return Err(e(format!("epsilon must be in [0, 1), got {eps}")));
        }
        Formula::Dkd {
            warmup: Some(w), ..
        } if *w <= 0.0 => return Err(e(format!("warmup must be positive, got {w}"))),
        Formula::Mgd { lambda, .. } if !(0.0..=1.0).contains(lambda) => {
            return Err(e(format!("lambda_mgd must be in [0, 1], got {lambda}")));
        }
        Formula::Pefd { projectors: 0, .. } => {
            return Err(e("num_projectors must be at least 1".into()))
        }
        _ => {}
    }
    let mut known = known.to_vec();
    known.extend(["weight", "model_name_pairs", "model_names", "key", "name"]);
    p.warn_unknown_keys(&known);
    let binding = match binding_override {
        Some(b) => b,
        None => binding(spec, p)?,
    };
    let pair_loss = !matches!(formula, Formula::GtCe { .. });
    match (&binding, pair_loss) {
        (Binding::Pairs(_), false) => bail!(
            "{}",
            p.error(format!(
                "{} takes model_names, not model_name_pairs",
                spec.name
            ))
        ),
        (Binding::Models(_), true) | (Binding::Plain, true) => {
            bail!(
                "{}",
                p.error(format!(
                    "{} needs model_name_pairs: [[Student, Teacher]]",
                    spec.name
                ))
            )
        }
        _ => {}
    }
    let key = p.str("key")?;
    if let Some(k) = &key {
        if k != "logits" && formula.reads_logits() {
            bail!(
                "{}",
                p.require("key")?.error(format!(
                    "{} reads logits; key {k:?} names a feature map",
                    spec.name
                ))
            );
        }
    }
    let name = match &formula {
        Formula::Dkd { .. }
        | Formula::Wsl { .. }
        | Formula::Skd { .. }
        | Formula::Dist { .. }
        | Formula::Mgd { .. }
        | Formula::Pefd { .. }
        | Formula::Afd { .. } => p.str_or("name", default_name)?,
        _ => default_name.to_string(),
    };
    Ok(LossTerm {
        config_name: spec.name.clone(),
        weight: spec.weight,
        formula,
        binding,
        key,
        name,
    })
}

fn binding(spec: &LossSpec, p: &Node) -> Result<Binding> {
    if let Some(pairs) = p.get("model_name_pairs") {
        let mut out = vec![];
        for item in pairs.items()? {
            let names = item
                .items()?
                .iter()
                .map(Node::as_str)
                .collect::<Result<Vec<_>, _>>()?;
            match names.as_slice() {
                [a, b] => out.push((a.clone(), b.clone())),
                _ => bail!("{}", item.error("each pair must be [model_a, model_b]")),
            }
        }
        return Ok(Binding::Pairs(out));
    }
    if let Some(names) = p.str_list("model_names")? {
        return Ok(Binding::Models(names));
    }
    if spec.name.starts_with("Distillation") {
        bail!(
            "{}",
            p.error(format!(
                "{} needs model_names or model_name_pairs",
                spec.name
            ))
        );
    }
    Ok(Binding::Plain)
}

/// The weighted sum of a config's losses.
#[derive(Clone, Debug)]
pub struct CombinedLoss {
    pub terms: Vec<LossTerm>,
}

/// Named loss values of one batch; the total is named `loss`.
pub struct LossValues<B: Backend> {
    pub terms: Vec<(String, Tensor<B, 1>)>,
    pub total: Tensor<B, 1>,
}

impl<B: Backend> LossValues<B> {
    /// Adds every term and the total (`loss`) to `avg`, weighted by the batch size `n`;
    /// returns the total.
    pub fn record(&self, avg: &mut crate::metric::Averages, n: usize) -> f32 {
        use burn::tensor::ElementConversion;
        for (name, v) in &self.terms {
            avg.add(name, v.clone().into_scalar().elem::<f32>() as f64, n);
        }
        let total: f32 = self.total.clone().into_scalar().elem();
        avg.add("loss", total as f64, n);
        total
    }
}

impl CombinedLoss {
    /// Resolves the entries of `Loss.Train` / `Loss.Eval` (`arch` supplies AFD's transforms).
    pub fn new(specs: &[LossSpec], arch: &ArchConfig) -> Result<Self> {
        if specs.is_empty() {
            bail!("no losses configured (Loss.Train is empty)");
        }
        let loss = CombinedLoss {
            terms: specs
                .iter()
                .map(|s| build_term(s, arch))
                .collect::<Result<Vec<_>>>()?,
        };
        if let [t] = loss.terms.as_slice() {
            let names = term_names(t);
            if names.len() > 1 {
                tracing::warn!(
                    "{} is the only loss and yields {} terms ({}): kd-launch trains on their sum; PaddleClas would use only the first",
                    t.config_name,
                    names.len(),
                    names.join(", ")
                );
            }
        }
        Ok(loss)
    }

    /// The losses of `Loss.Eval`: as [`Self::new`], without losses that have trainable layers
    /// (they are fitted during training and have no meaning as an evaluation metric).
    pub fn for_eval(specs: &[LossSpec], arch: &ArchConfig) -> Result<Self> {
        let loss = Self::new(specs, arch)?;
        for (t, spec) in loss.terms.iter().zip(specs) {
            if t.has_part() {
                bail!(
                    "{}",
                    spec.params.error(format!(
                        "{} trains its own layers and cannot be an eval loss (use CELoss in Loss.Eval)",
                        t.config_name
                    ))
                );
            }
        }
        Ok(loss)
    }

    /// Checks that every model a loss names exists.
    pub fn check_models(&self, models: &[&str]) -> Result<()> {
        for t in &self.terms {
            let names: Vec<&String> = match &t.binding {
                Binding::Plain => vec![],
                Binding::Models(m) => m.iter().collect(),
                Binding::Pairs(p) => p.iter().flat_map(|(a, b)| [a, b]).collect(),
            };
            for n in names {
                if !models.contains(&n.as_str()) {
                    bail!(
                        "loss {} refers to model {n:?}, but the models are: {}",
                        t.config_name,
                        models.join(", ")
                    );
                }
            }
        }
        Ok(())
    }

    /// The trainable layers of the losses that have them (MGD, PEFD, AFD), in term order.
    pub fn init_parts<B: Backend>(&self, device: &B::Device) -> Vec<LossPart<B>> {
        self.terms
            .iter()
            .filter_map(|t| match &t.formula {
                Formula::Mgd {
                    student_channels,
                    teacher_channels,
                    ..
                } => Some(LossPart::Mgd(parts::Mgd::new(
                    *student_channels,
                    *teacher_channels,
                    device,
                ))),
                Formula::Pefd {
                    student_channel,
                    teacher_channel,
                    projectors,
                    ..
                } => Some(LossPart::Pefd(parts::Pefd::new(
                    *student_channel,
                    *teacher_channel,
                    *projectors,
                    device,
                ))),
                Formula::Afd {
                    student_channels,
                    teacher_channels,
                    qk_dim,
                    ..
                } => Some(LossPart::Afd(parts::Afd::new(
                    teacher_channels,
                    student_channels,
                    *qk_dim,
                    device,
                ))),
                _ => None,
            })
            .collect()
    }

    /// The names of the logged terms, in order (for `check`).
    pub fn term_names(&self) -> Vec<String> {
        self.terms
            .iter()
            .flat_map(term_names)
            .chain(["loss".to_string()])
            .collect()
    }

    pub fn forward<B: Backend>(&self, ctx: &LossContext<B>) -> Result<LossValues<B>> {
        // PaddleClas's CombinedLoss skips the weights when there is a single entry.
        let apply_weights = self.terms.len() > 1;
        let mut terms = vec![];
        let mut total: Option<Tensor<B, 1>> = None;
        let mut next_part = 0;
        for (index, t) in self.terms.iter().enumerate() {
            let part = if t.has_part() {
                next_part += 1;
                Some(ctx.parts.get(next_part - 1).ok_or_else(|| {
                    anyhow!(
                        "{} has no trainable part (loss parts not initialised)",
                        t.config_name
                    )
                })?)
            } else {
                None
            };
            for (name, value) in evaluate(t, index, part, ctx)? {
                let weighted = if apply_weights {
                    value.mul_scalar(t.weight)
                } else {
                    value
                };
                total = Some(match total {
                    Some(s) => s.add(weighted.clone()),
                    None => weighted.clone(),
                });
                terms.push((name, weighted));
            }
        }
        Ok(LossValues {
            terms,
            total: total.expect("at least one term"),
        })
    }
}

fn term_names(t: &LossTerm) -> Vec<String> {
    let base = match &t.formula {
        Formula::Distance { mode } => {
            let m = match mode {
                Distance::L2 => "l2",
                Distance::L1 => "l1",
                Distance::SmoothL1 => "smooth_l1",
            };
            format!("loss_{m}_loss_{m}")
        }
        _ => t.name.clone(),
    };
    match (&t.binding, &t.formula) {
        (Binding::Plain, _) => vec![base],
        (Binding::Models(ms), _) => ms.iter().map(|m| format!("{base}_{m}")).collect(),
        (Binding::Pairs(_), Formula::Afd { .. }) => vec![base],
        // PaddleClas's Distance wrapper names terms by pair index only, DML appends the index,
        // the pair wrapper puts it first, RKD names each key pair's two terms.
        (Binding::Pairs(ps), Formula::Distance { .. }) => {
            (0..ps.len()).map(|i| format!("{base}_{i}")).collect()
        }
        (Binding::Pairs(ps), Formula::Dml { .. }) => ps
            .iter()
            .enumerate()
            .map(|(i, (a, b))| format!("{base}_{a}_{b}_{i}"))
            .collect(),
        (Binding::Pairs(ps), Formula::Mgd { .. } | Formula::Pefd { .. }) => ps
            .iter()
            .enumerate()
            .map(|(i, (a, b))| format!("{base}_{i}_{a}_{b}"))
            .collect(),
        (Binding::Pairs(ps), Formula::Rkd { keys, .. }) => ps
            .iter()
            .flat_map(|(a, b)| {
                (0..keys.len()).flat_map(move |i| {
                    [
                        format!("loss_angle_{i}_{a}_{b}"),
                        format!("loss_dist_{i}_{a}_{b}"),
                    ]
                })
            })
            .collect(),
        (Binding::Pairs(ps), _) => ps.iter().map(|(a, b)| format!("{base}_{a}_{b}")).collect(),
    }
}

/// The outputs of model `name`.
fn output<'a, B: Backend>(ctx: &'a LossContext<B>, name: &str) -> Result<&'a ModelOutput<B>> {
    ctx.outputs
        .get(name)
        .ok_or_else(|| anyhow!("no output for model {name:?}"))
}

/// Feature map `key` of model `model` (a `return_patterns` entry).
fn feature<'a, B: Backend>(
    o: &'a ModelOutput<B>,
    model: &str,
    key: &str,
) -> Result<&'a Tensor<B, 4>> {
    o.feature(key).ok_or_else(|| {
        anyhow!("model {model} has no feature {key:?} (add it to its return_patterns)")
    })
}

/// Output `key` of a model as `[N, D]`: `logits`, or a feature map flattened after an optional
/// adaptive average pool to `pool × pool` (RKD's `target_size`).
fn embedding<B: Backend>(
    o: &ModelOutput<B>,
    model: &str,
    key: &str,
    pool: Option<usize>,
) -> Result<Tensor<B, 2>> {
    if key == "logits" {
        return Ok(o.logits.clone());
    }
    let mut f = feature(o, model, key)?.clone();
    if let Some(size) = pool {
        f = burn::tensor::module::adaptive_avg_pool2d(f, [size, size]);
    }
    let [n, c, h, w] = f.dims();
    Ok(f.reshape([n, c * h * w]))
}

/// MGD's channel mask `[N, C, 1, 1]`: 0 with probability `lambda`, drawn from (seed, step, term).
fn mgd_mask<B: Backend>(
    n: usize,
    c: usize,
    lambda: f64,
    ctx: &LossContext<B>,
    term: usize,
    device: &B::Device,
) -> Tensor<B, 4> {
    use rand::{Rng, SeedableRng};
    let seed = ctx
        .seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(ctx.step.wrapping_mul(0x2545_F491_4F6C_DD1D))
        .wrapping_add(term as u64);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let values: Vec<f32> = (0..n * c)
        .map(|_| {
            if rng.random::<f64>() < lambda {
                0.0
            } else {
                1.0
            }
        })
        .collect();
    Tensor::from_data(TensorData::new(values, [n, c, 1, 1]), device)
}

fn evaluate<B: Backend>(
    t: &LossTerm,
    index: usize,
    part: Option<&LossPart<B>>,
    ctx: &LossContext<B>,
) -> Result<Vec<(String, Tensor<B, 1>)>> {
    let names = term_names(t);
    let logits = |o: &ModelOutput<B>, model: &str| -> Result<Tensor<B, 2>> {
        match t.key.as_deref() {
            None | Some("logits") => Ok(o.logits.clone()),
            Some(k) => embedding(o, model, k, None),
        }
    };
    let values: Vec<Tensor<B, 1>> = match (&t.binding, &t.formula) {
        (Binding::Plain, Formula::GtCe { epsilon }) => {
            vec![functional::cross_entropy(
                output(ctx, ctx.default_model)?.logits.clone(),
                ctx.labels.clone(),
                *epsilon,
            )]
        }
        (Binding::Models(ms), Formula::GtCe { epsilon }) => ms
            .iter()
            .map(|m| {
                Ok(functional::cross_entropy(
                    output(ctx, m)?.logits.clone(),
                    ctx.labels.clone(),
                    *epsilon,
                ))
            })
            .collect::<Result<_>>()?,
        (
            Binding::Pairs(ps),
            Formula::Afd {
                student_keys,
                teacher_keys,
                student_channels,
                teacher_channels,
                ..
            },
        ) => {
            let (s, tch) = &ps[0];
            let (os, ot) = (output(ctx, s)?, output(ctx, tch)?);
            let fs = student_keys
                .iter()
                .map(|k| feature(os, s, k).cloned())
                .collect::<Result<Vec<_>>>()?;
            let ft = teacher_keys
                .iter()
                .map(|k| feature(ot, tch, k).cloned())
                .collect::<Result<Vec<_>>>()?;
            for (i, (f, k)) in fs.iter().zip(student_keys).enumerate() {
                check_channels(t, &format!("s_shapes[{i}]"), f, student_channels[i], s, k)?;
            }
            for (i, (f, k)) in ft.iter().zip(teacher_keys).enumerate() {
                check_channels(t, &format!("t_shapes[{i}]"), f, teacher_channels[i], tch, k)?;
            }
            let Some(LossPart::Afd(afd)) = part else {
                bail!("AFDLoss: its trainable part is missing");
            };
            vec![afd.forward(&fs, &ft, ctx.mode)]
        }
        (Binding::Pairs(ps), f) => {
            let mut out = vec![];
            for (a, b) in ps {
                let (oa, ob) = (output(ctx, a)?, output(ctx, b)?);
                match f {
                    Formula::Distance { mode } => {
                        let v = match t.key.as_deref() {
                            None | Some("logits") => {
                                functional::distance(oa.logits.clone(), ob.logits.clone(), *mode)
                            }
                            Some(k) => functional::distance(
                                feature(oa, a, k)?.clone(),
                                feature(ob, b, k)?.clone(),
                                *mode,
                            ),
                        };
                        out.push(v);
                    }
                    Formula::Rkd {
                        keys,
                        target_size,
                        variant,
                        angle_weight,
                        distance_weight,
                    } => {
                        for (sk, tk) in keys {
                            let es = embedding(oa, a, sk, *target_size)?;
                            let et = embedding(ob, b, tk, *target_size)?;
                            out.push(
                                functional::rkd_angle(es.clone(), et.clone(), *variant)
                                    .mul_scalar(*angle_weight),
                            );
                            out.push(
                                functional::rkd_distance(es, et, *variant)
                                    .mul_scalar(*distance_weight),
                            );
                        }
                    }
                    Formula::Mgd {
                        s_key,
                        t_key,
                        alpha,
                        lambda,
                        student_channels,
                        teacher_channels,
                    } => {
                        let (fs, ft) = (feature(oa, a, s_key)?, feature(ob, b, t_key)?);
                        check_channels(t, "student_channels", fs, *student_channels, a, s_key)?;
                        check_channels(t, "teacher_channels", ft, *teacher_channels, b, t_key)?;
                        let [n, c, _, _] = ft.dims();
                        let mask = mgd_mask(n, c, *lambda, ctx, index, &ft.device());
                        let Some(LossPart::Mgd(mgd)) = part else {
                            bail!("MGDLoss: its trainable part is missing");
                        };
                        check_spatial(fs, ft, &t.config_name)?;
                        out.push(mgd.forward(fs.clone(), ft.clone(), mask, *alpha));
                    }
                    Formula::Pefd {
                        s_key,
                        t_key,
                        student_channel,
                        teacher_channel,
                        ..
                    } => {
                        let (fs, ft) = (feature(oa, a, s_key)?, feature(ob, b, t_key)?);
                        check_channels(t, "student_channel", fs, *student_channel, a, s_key)?;
                        check_channels(t, "teacher_channel", ft, *teacher_channel, b, t_key)?;
                        let Some(LossPart::Pefd(pefd)) = part else {
                            bail!("PEFDLoss: its trainable part is missing");
                        };
                        check_spatial(fs, ft, &t.config_name)?;
                        out.push(pefd.forward(fs.clone(), ft.clone()));
                    }
                    _ => {
                        let (s, tch) = (logits(oa, a)?, logits(ob, b)?);
                        out.push(logit_loss(f, s, tch, ctx)?);
                    }
                }
            }
            out
        }
        _ => unreachable!("bindings validated in build_term"),
    };
    debug_assert_eq!(names.len(), values.len());
    Ok(names.into_iter().zip(values).collect())
}

/// The channels a loss's layers were built for must be those of the map it is given.
fn check_channels<B: Backend>(
    t: &LossTerm,
    key: &str,
    map: &Tensor<B, 4>,
    expected: usize,
    model: &str,
    tap: &str,
) -> Result<()> {
    let got = map.dims()[1];
    if got != expected {
        bail!(
            "{}.{key} is {expected}, but model {model}'s {tap:?} has {got} channels",
            t.config_name
        );
    }
    Ok(())
}

fn check_spatial<B: Backend>(fs: &Tensor<B, 4>, ft: &Tensor<B, 4>, loss: &str) -> Result<()> {
    let (s, t) = (fs.dims(), ft.dims());
    if s[2..] != t[2..] {
        bail!(
            "{loss}: student map {s:?} and teacher map {t:?} differ in height/width; pick s_key/t_key of equal resolution"
        );
    }
    Ok(())
}

/// The losses between two logit tensors.
fn logit_loss<B: Backend>(
    f: &Formula,
    s: Tensor<B, 2>,
    tch: Tensor<B, 2>,
    ctx: &LossContext<B>,
) -> Result<Tensor<B, 1>> {
    let target = |from_teacher| functional::target_labels(ctx.labels.clone(), &tch, from_teacher);
    Ok(match f {
        Formula::Kl { temperature } => functional::kl_div(s, tch, *temperature),
        Formula::SoftCe => functional::soft_cross_entropy(s, tch),
        Formula::Dml {
            act,
            sum_across_class_dim,
        } => functional::dml(s, tch, *act, *sum_across_class_dim),
        Formula::Dkd {
            temperature,
            alpha,
            beta,
            warmup,
            teacher_target,
        } => {
            let y = target(*teacher_target);
            let v = functional::dkd(s, tch, y, *temperature, *alpha, *beta);
            match warmup {
                Some(w) => v.mul_scalar((ctx.epoch as f64 / w).min(1.0)),
                None => v,
            }
        }
        Formula::Wsl {
            temperature,
            teacher_target,
        } => {
            let y = target(*teacher_target);
            functional::wsl(s, tch, y, *temperature)
        }
        Formula::Dist { beta, gamma } => functional::dist(s, tch, *beta, *gamma),
        Formula::Skd {
            temperature,
            multiplier,
            alpha,
            teacher_target,
        } => {
            let y = target(*teacher_target);
            functional::skd(s, tch, y, *temperature, *multiplier, *alpha)
        }
        other => bail!("internal: {other:?} is not a logit loss"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::ModelOutput;
    use burn::backend::Flex;
    use burn::tensor::TensorData;
    use std::path::Path;

    fn specs(yaml: &str) -> Vec<LossSpec> {
        let v: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
        let node = Node::root(v, Path::new("t.yaml"));
        node.items()
            .unwrap()
            .iter()
            .map(|e| {
                let (name, params) = e.single_key_entry().unwrap();
                LossSpec {
                    weight: params.f64_or("weight", 1.0).unwrap(),
                    name,
                    params,
                }
            })
            .collect()
    }

    fn combined(specs: &[LossSpec]) -> Result<CombinedLoss> {
        let arch = ArchConfig {
            name: "DistillationModel".into(),
            models: vec![],
            infer_model_name: "Student".into(),
            distillation: true,
            attention: vec![],
        };
        CombinedLoss::new(specs, &arch)
    }

    fn outputs() -> (Outputs<Flex>, Tensor<Flex, 1, Int>) {
        let d = Default::default();
        let t = |v: Vec<f32>| ModelOutput {
            logits: Tensor::<Flex, 2>::from_data(TensorData::new(v, [2, 3]), &d),
            features: vec![],
            feature_names: vec![],
        };
        let mut o = Outputs::new();
        o.insert(
            "Student".to_string(),
            t(vec![1.0, 2.0, 0.5, -1.0, 0.0, 3.0]),
        );
        o.insert("Teacher".to_string(), t(vec![2.0, 1.0, 0.0, 0.0, 0.5, 2.5]));
        (
            o,
            Tensor::from_data(TensorData::new(vec![1i64, 2], [2]), &d),
        )
    }

    fn run(
        l: &CombinedLoss,
        o: &Outputs<Flex>,
        y: &Tensor<Flex, 1, Int>,
        epoch: usize,
    ) -> Result<LossValues<Flex>> {
        l.forward(&LossContext {
            outputs: o,
            labels: y.clone(),
            epoch,
            default_model: "Student",
            parts: &[],
            mode: BnMode::Train,
            seed: 42,
            step: 0,
        })
    }

    fn value(t: &Tensor<Flex, 1>) -> f32 {
        t.clone().into_data().to_vec::<f32>().unwrap()[0]
    }

    #[test]
    fn terms_are_weighted_named_and_summed() {
        let l = combined(&specs(
            "[{DistillationGTCELoss: {weight: 0.5, model_names: [Student]}}, {DistillationDKDLoss: {weight: 2.0, model_name_pairs: [[Student, Teacher]], temperature: 2}}]",
        ))
        .unwrap();
        assert_eq!(
            l.term_names(),
            ["CELoss_Student", "loss_dkd_Student_Teacher", "loss"]
        );
        let (o, y) = outputs();
        let v = run(&l, &o, &y, 1).unwrap();
        let ce = value(&functional::cross_entropy(
            o["Student"].logits.clone(),
            y.clone(),
            None,
        ));
        let dkd = value(&functional::dkd(
            o["Student"].logits.clone(),
            o["Teacher"].logits.clone(),
            y,
            2.0,
            1.0,
            1.0,
        ));
        assert!((value(&v.terms[0].1) - 0.5 * ce).abs() < 1e-6);
        assert!((value(&v.terms[1].1) - 2.0 * dkd).abs() < 1e-5);
        assert!((value(&v.total) - (0.5 * ce + 2.0 * dkd)).abs() < 1e-5);
    }

    #[test]
    fn dml_and_soft_ce_terms_are_named_as_in_paddleclas() {
        let l = combined(&specs(
            "[{DistillationDMLLoss: {model_name_pairs: [[Student, Teacher], [Teacher, Student]], act: None}}, {DistillationCELoss: {model_name_pairs: [[Student, Teacher]]}}]",
        ))
        .unwrap();
        assert_eq!(
            l.terms[0].formula,
            Formula::Dml {
                act: functional::DmlAct::Identity,
                sum_across_class_dim: false
            }
        );
        assert_eq!(
            l.term_names(),
            [
                "DMLLoss_Student_Teacher_0",
                "DMLLoss_Teacher_Student_1",
                "CELoss_Student_Teacher",
                "loss"
            ]
        );
    }

    #[test]
    fn distance_reads_feature_maps_by_return_pattern() {
        let l = combined(&specs(
            "[{DistillationDistanceLoss: {mode: l1, key: blocks5, model_name_pairs: [[Student, Teacher]]}}, {CELoss: {}}]",
        ))
        .unwrap();
        assert_eq!(l.term_names(), ["loss_l1_loss_l1_0", "CELoss", "loss"]);
        let (mut o, y) = outputs();
        let d = Default::default();
        for (name, v) in [("Student", 1.0f32), ("Teacher", 3.5)] {
            let m = o.get_mut(name).unwrap();
            m.features = vec![Tensor::<Flex, 4>::full([2, 2, 2, 2], v, &d)];
            m.feature_names = vec!["blocks5".into()];
        }
        let v = run(&l, &o, &y, 1).unwrap();
        assert!((value(&v.terms[0].1) - 2.5).abs() < 1e-6);
        o.get_mut("Teacher").unwrap().feature_names = vec!["blocks4".into()];
        let e = run(&l, &o, &y, 1).err().unwrap();
        assert!(e.to_string().contains("blocks5"), "{e}");
    }

    #[test]
    fn a_single_entry_ignores_its_weight_as_paddleclas_does() {
        let l = combined(&specs(
            "[{DistillationKLDivLoss: {weight: 3.0, model_name_pairs: [[Student, Teacher]]}}]",
        ))
        .unwrap();
        let (o, y) = outputs();
        let v = run(&l, &o, &y, 1).unwrap();
        let kl = value(&functional::kl_div(
            o["Student"].logits.clone(),
            o["Teacher"].logits.clone(),
            4.0,
        ));
        assert!((value(&v.total) - kl).abs() < 1e-6);
    }

    #[test]
    fn dkd_warmup_ramps_linearly() {
        let l = combined(&specs(
            "[{DistillationDKDLoss: {model_name_pairs: [[Student, Teacher]], warmup: 4}}]",
        ))
        .unwrap();
        let (o, y) = outputs();
        let at = |epoch| value(&run(&l, &o, &y, epoch).unwrap().total);
        assert!((at(1) * 4.0 - at(4)).abs() < 1e-5);
        assert_eq!(at(4), at(9));
    }

    #[test]
    fn bad_entries_are_explained() {
        let e = combined(&specs("[{FancyLoss: {}}]"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown loss") && e.contains("DistillationDKDLoss"),
            "{e}"
        );
        let e = combined(&specs(
            "[{DistillationKLDivLoss: {model_names: [Student]}}]",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("model_name_pairs"), "{e}");
        let l = combined(&specs(
            "[{DistillationKLDivLoss: {model_name_pairs: [[Student, Ghost]]}}]",
        ))
        .unwrap();
        assert!(l
            .check_models(&["Student", "Teacher"])
            .unwrap_err()
            .to_string()
            .contains("Ghost"));
    }

    #[test]
    fn new_losses_are_named_as_in_paddleclas() {
        let l = combined(&specs(
            "[{DistillationWSLLoss: {model_name_pairs: [[Student, Teacher]]}}, {DistillationSKDLoss: {model_name_pairs: [[Student, Teacher]], temperature: 1}}, {DistillationDISTLoss: {model_name_pairs: [[Student, Teacher]], name: my_dist}}, {DistillationRKDLoss: {student_keepkeys: [logits, f], teacher_keepkeys: [logits, f]}}, {DistillationPairLoss: {base_loss_name: PEFDLoss, model_name_pairs: [[Student, Teacher]], s_key: f, t_key: f, student_channel: 2, teacher_channel: 2}}]",
        ))
        .unwrap();
        assert_eq!(
            l.term_names(),
            [
                "wsl_loss_Student_Teacher",
                "skd_loss_Student_Teacher",
                "my_dist_Student_Teacher",
                "loss_angle_0_Student_Teacher",
                "loss_dist_0_Student_Teacher",
                "loss_angle_1_Student_Teacher",
                "loss_dist_1_Student_Teacher",
                "loss_0_Student_Teacher",
                "loss"
            ]
        );
    }

    /// Outputs with a `[2, C, 2, 2]` feature map `f` per model.
    fn with_features(c: usize) -> (Outputs<Flex>, Tensor<Flex, 1, Int>) {
        let (mut o, y) = outputs();
        let d = Default::default();
        for (name, v) in [("Student", 0.5f32), ("Teacher", -1.0)] {
            let m = o.get_mut(name).unwrap();
            m.features = vec![Tensor::<Flex, 4>::random(
                [2, c, 2, 2],
                burn::tensor::Distribution::Normal(v as f64, 1.0),
                &d,
            )];
            m.feature_names = vec!["f".into()];
        }
        (o, y)
    }

    #[test]
    fn each_entry_uses_its_own_trainable_part() {
        let l = combined(&specs(
            "[{DistillationPairLoss: {base_loss_name: PEFDLoss, model_name_pairs: [[Student, Teacher]], s_key: f, t_key: f, student_channel: 3, teacher_channel: 3}}, {CELoss: {}}, {DistillationPairLoss: {base_loss_name: MGDLoss, model_name_pairs: [[Student, Teacher]], s_key: f, t_key: f, student_channels: 3, teacher_channels: 3, name: loss_mgd}}]",
        ))
        .unwrap();
        let d = Default::default();
        let parts = l.init_parts::<Flex>(&d);
        assert!(matches!(
            parts.as_slice(),
            [LossPart::Pefd(_), LossPart::Mgd(_)]
        ));
        fn ctx<'a>(
            outputs: &'a Outputs<Flex>,
            y: &Tensor<Flex, 1, Int>,
            parts: &'a [LossPart<Flex>],
        ) -> LossContext<'a, Flex> {
            LossContext {
                outputs,
                labels: y.clone(),
                epoch: 1,
                default_model: "Student",
                parts,
                mode: BnMode::Train,
                seed: 1,
                step: 0,
            }
        }
        let (o, y) = with_features(3);
        let v = l.forward(&ctx(&o, &y, &parts)).unwrap();
        assert!(value(&v.total).is_finite());
        // Parts in the wrong order are an error, not a silent mix-up.
        let swapped: Vec<_> = parts.into_iter().rev().collect();
        let e = l.forward(&ctx(&o, &y, &swapped)).err().unwrap().to_string();
        assert!(e.contains("PEFDLoss"), "{e}");
        // Channels the layers were not built for name the config key.
        let (o4, _) = with_features(4);
        let fresh = l.init_parts::<Flex>(&d);
        let e = l.forward(&ctx(&o4, &y, &fresh)).err().unwrap().to_string();
        assert!(
            e.contains("student_channel is 3") && e.contains("4 channels"),
            "{e}"
        );
    }

    #[test]
    fn losses_with_layers_are_refused_as_eval_losses() {
        let s = specs(
            "[{DistillationPairLoss: {base_loss_name: MGDLoss, model_name_pairs: [[Student, Teacher]], s_key: f, t_key: f, student_channels: 3, teacher_channels: 3}}]",
        );
        let arch = ArchConfig {
            name: "DistillationModel".into(),
            models: vec![],
            infer_model_name: "Student".into(),
            distillation: true,
            attention: vec![],
        };
        let e = CombinedLoss::for_eval(&s, &arch).unwrap_err().to_string();
        assert!(e.contains("cannot be an eval loss"), "{e}");
        assert!(CombinedLoss::for_eval(&specs("[{CELoss: {}}]"), &arch).is_ok());
    }

    #[test]
    fn mgd_masks_repeat_per_step_and_drop_lambda_of_channels() {
        let (o, y) = outputs();
        let ctx = |step| LossContext {
            outputs: &o,
            labels: y.clone(),
            epoch: 1,
            default_model: "Student",
            parts: &[],
            mode: BnMode::Train,
            seed: 42,
            step,
        };
        let mask = |step| -> Vec<f32> {
            mgd_mask::<Flex>(64, 64, 0.15, &ctx(step), 1, &Default::default())
                .into_data()
                .to_vec()
                .unwrap()
        };
        assert_eq!(mask(7), mask(7));
        assert_ne!(mask(7), mask(8));
        let dropped = mask(7).iter().filter(|&&v| v == 0.0).count() as f64 / 4096.0;
        assert!((dropped - 0.15).abs() < 0.03, "dropped {dropped}");
    }
}
