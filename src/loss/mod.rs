//! Losses: one registry from PaddleClas's config names to formulas, one generic wrapper for
//! `model_name_pairs` / `model_names` / `key`, and the combined (weighted) loss with
//! PaddleClas's term names.

pub mod functional;

use crate::arch::{ModelOutput, Outputs};
use crate::config::{LossSpec, Node};
use anyhow::{anyhow, bail, Result};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

/// Loss names the registry knows.
pub const LOSSES: &[&str] = &[
    "CELoss",
    "DistillationCELoss",
    "DistillationDMLLoss",
    "DistillationDistanceLoss",
    "DistillationGTCELoss",
    "DistillationKLDivLoss",
    "DistillationDKDLoss",
];

/// The formula of a loss entry, with its parameters.
#[derive(Clone, Debug, PartialEq)]
pub enum Formula {
    /// Hard-label CE (optionally label-smoothed); `CELoss_<model>`.
    GtCe { epsilon: Option<f64> },
    /// Soft-label CE against the pair's second model (`DistillationCELoss`); `CELoss_<A>_<B>`.
    SoftCe,
    /// Deep mutual learning's symmetric KL; `DMLLoss_<A>_<B>_<pair index>`.
    Dml {
        act: functional::DmlAct,
        sum_across_class_dim: bool,
    },
    /// Distance between outputs (often feature maps via `key`); `loss_<mode>_loss_<mode>_<pair index>`.
    Distance { mode: functional::Distance },
    /// Hinton KD; `loss_kldiv_<A>_<B>`.
    Kl { temperature: f64 },
    /// Decoupled KD with an optional linear warm-up over `warmup` epochs; `loss_dkd_<A>_<B>`.
    Dkd {
        temperature: f64,
        alpha: f64,
        beta: f64,
        warmup: Option<f64>,
    },
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
    /// `key` into a model's output dict; only `logits` (or none) for these logit losses.
    pub key: Option<String>,
}

/// What a loss sees of the batch.
pub struct LossContext<'a, B: Backend> {
    pub outputs: &'a Outputs<B>,
    pub labels: Tensor<B, 1, Int>,
    /// 1-based epoch (for warm-ups).
    pub epoch: usize,
    /// The model that a plain (unwrapped) loss applies to.
    pub default_model: &'a str,
}

fn build_term(spec: &LossSpec) -> Result<LossTerm> {
    let p = &spec.params;
    let e = |m: String| anyhow!("{}", p.error(m));
    let (formula, known): (Formula, &[&str]) = match spec.name.as_str() {
        "CELoss" | "DistillationGTCELoss" => (
            Formula::GtCe {
                epsilon: p.f64("epsilon")?,
            },
            &["epsilon"],
        ),
        "DistillationCELoss" => (Formula::SoftCe, &[]),
        "DistillationDMLLoss" => {
            // `act: None` (null after PaddleClas's literal evaluation) means no activation.
            let raw = p.value.as_mapping().and_then(|m| m.get("act"));
            let act = match raw {
                None => functional::DmlAct::Softmax,
                Some(v) if v.is_null() => functional::DmlAct::Identity,
                Some(_) => match p.require("act")?.as_str()?.as_str() {
                    "softmax" => functional::DmlAct::Softmax,
                    "sigmoid" => functional::DmlAct::Sigmoid,
                    "None" => functional::DmlAct::Identity,
                    other => {
                        return Err(e(format!(
                            "act must be softmax, sigmoid or None, got {other:?}"
                        )))
                    }
                },
            };
            (
                Formula::Dml {
                    act,
                    sum_across_class_dim: p.bool_or("sum_across_class_dim", false)?,
                },
                &["act", "sum_across_class_dim"],
            )
        }
        "DistillationDistanceLoss" => {
            let mode = match p.str_or("mode", "l2")?.as_str() {
                "l2" => functional::Distance::L2,
                "l1" => functional::Distance::L1,
                "smooth_l1" => functional::Distance::SmoothL1,
                other => {
                    return Err(e(format!(
                        "mode must be l2, l1 or smooth_l1, got {other:?}"
                    )))
                }
            };
            (Formula::Distance { mode }, &["mode"])
        }
        "DistillationKLDivLoss" => (
            Formula::Kl {
                temperature: p.f64_or("temperature", 4.0)?,
            },
            &["temperature"],
        ),
        "DistillationDKDLoss" => (
            Formula::Dkd {
                temperature: p.f64_or("temperature", 1.0)?,
                alpha: p.f64_or("alpha", 1.0)?,
                beta: p.f64_or("beta", 1.0)?,
                warmup: p.f64("warmup")?,
            },
            &["temperature", "alpha", "beta", "warmup", "use_target_as_gt"],
        ),
        other => bail!(
            "{}",
            p.error(format!(
                "unknown loss {other:?}; known losses: {}",
                LOSSES.join(", ")
            ))
        ),
    };
    match &formula {
        Formula::Kl { temperature } | Formula::Dkd { temperature, .. } if *temperature <= 0.0 => {
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
        _ => {}
    }
    let mut known = known.to_vec();
    known.extend(["weight", "model_name_pairs", "model_names", "key", "name"]);
    p.warn_unknown_keys(&known);
    let binding = binding(spec, p)?;
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
        if k != "logits" && !matches!(formula, Formula::Distance { .. }) {
            bail!(
                "{}",
                p.require("key")?.error(format!(
                    "{} reads logits; key {k:?} names a feature map",
                    spec.name
                ))
            );
        }
    }
    Ok(LossTerm {
        config_name: spec.name.clone(),
        weight: spec.weight,
        formula,
        binding,
        key,
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
    pub fn new(specs: &[LossSpec]) -> Result<Self> {
        if specs.is_empty() {
            bail!("no losses configured (Loss.Train is empty)");
        }
        Ok(CombinedLoss {
            terms: specs.iter().map(build_term).collect::<Result<_>>()?,
        })
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
        for t in &self.terms {
            for (name, value) in evaluate(t, ctx)? {
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

fn suffix(formula: &Formula) -> &'static str {
    match formula {
        Formula::GtCe { .. } | Formula::SoftCe => "CELoss",
        Formula::Dml { .. } => "DMLLoss",
        Formula::Distance { mode } => match mode {
            functional::Distance::L2 => "loss_l2_loss_l2",
            functional::Distance::L1 => "loss_l1_loss_l1",
            functional::Distance::SmoothL1 => "loss_smooth_l1_loss_smooth_l1",
        },
        Formula::Kl { .. } => "loss_kldiv",
        Formula::Dkd { .. } => "loss_dkd",
    }
}

fn term_names(t: &LossTerm) -> Vec<String> {
    let base = suffix(&t.formula);
    match &t.binding {
        Binding::Plain => vec![base.to_string()],
        Binding::Models(ms) => ms.iter().map(|m| format!("{base}_{m}")).collect(),
        // PaddleClas's Distance wrapper names terms by pair index only, DML appends the index,
        // the others do not.
        Binding::Pairs(ps) if matches!(t.formula, Formula::Distance { .. }) => {
            (0..ps.len()).map(|i| format!("{base}_{i}")).collect()
        }
        Binding::Pairs(ps) if matches!(t.formula, Formula::Dml { .. }) => ps
            .iter()
            .enumerate()
            .map(|(i, (a, b))| format!("{base}_{a}_{b}_{i}"))
            .collect(),
        Binding::Pairs(ps) => ps.iter().map(|(a, b)| format!("{base}_{a}_{b}")).collect(),
    }
}

/// The outputs of model `name`.
fn output<'a, B: Backend>(ctx: &'a LossContext<B>, name: &str) -> Result<&'a ModelOutput<B>> {
    ctx.outputs
        .get(name)
        .ok_or_else(|| anyhow!("no output for model {name:?}"))
}

fn evaluate<B: Backend>(t: &LossTerm, ctx: &LossContext<B>) -> Result<Vec<(String, Tensor<B, 1>)>> {
    let names = term_names(t);
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
        (Binding::Pairs(ps), f) => ps
            .iter()
            .map(|(a, b)| {
                let (oa, ob) = (output(ctx, a)?, output(ctx, b)?);
                if let Formula::Distance { mode } = f {
                    return match t.key.as_deref() {
                        None | Some("logits") => Ok(functional::distance(
                            oa.logits.clone(),
                            ob.logits.clone(),
                            *mode,
                        )),
                        Some(k) => {
                            let fa = oa.feature(k).ok_or_else(|| {
                                anyhow!("model {a} has no feature {k:?} (return_patterns)")
                            })?;
                            let fb = ob.feature(k).ok_or_else(|| {
                                anyhow!("model {b} has no feature {k:?} (return_patterns)")
                            })?;
                            Ok(functional::distance(fa.clone(), fb.clone(), *mode))
                        }
                    };
                }
                let (s, tch) = (oa.logits.clone(), ob.logits.clone());
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
                    } => {
                        let v = functional::dkd(
                            s,
                            tch,
                            ctx.labels.clone(),
                            *temperature,
                            *alpha,
                            *beta,
                        );
                        match warmup {
                            Some(w) => v.mul_scalar((ctx.epoch as f64 / w).min(1.0)),
                            None => v,
                        }
                    }
                    Formula::GtCe { .. } | Formula::Distance { .. } => {
                        unreachable!("handled above")
                    }
                })
            })
            .collect::<Result<_>>()?,
        _ => unreachable!("bindings validated in build_term"),
    };
    Ok(names.into_iter().zip(values).collect())
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
        })
    }

    fn value(t: &Tensor<Flex, 1>) -> f32 {
        t.clone().into_data().to_vec::<f32>().unwrap()[0]
    }

    #[test]
    fn terms_are_weighted_named_and_summed() {
        let l = CombinedLoss::new(&specs(
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
        let l = CombinedLoss::new(&specs(
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
        let l = CombinedLoss::new(&specs(
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
        let l = CombinedLoss::new(&specs(
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
        let l = CombinedLoss::new(&specs(
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
        let e = CombinedLoss::new(&specs("[{FancyLoss: {}}]"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown loss") && e.contains("DistillationDKDLoss"),
            "{e}"
        );
        let e = CombinedLoss::new(&specs(
            "[{DistillationKLDivLoss: {model_names: [Student]}}]",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("model_name_pairs"), "{e}");
        let l = CombinedLoss::new(&specs(
            "[{DistillationKLDivLoss: {model_name_pairs: [[Student, Ghost]]}}]",
        ))
        .unwrap();
        assert!(l
            .check_models(&["Student", "Teacher"])
            .unwrap_err()
            .to_string()
            .contains("Ghost"));
    }
}
