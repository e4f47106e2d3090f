//! The weighted sum of a config's losses (PaddleClas's `CombinedLoss`), with its term names, and
//! what a loss sees of a batch.

use super::binding::{read_key, Binding};
use super::registry::{LossKind, LossPart, TermInput};
use crate::arch::ArchConfig;
use crate::arch::Outputs;
use crate::config::LossSpec;
use crate::nn::BnMode;
use anyhow::{anyhow, bail, Result};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

/// One `Loss.Train` / `Loss.Eval` entry, resolved.
#[derive(Clone, Debug)]
pub struct LossTerm {
    pub config_name: String,
    pub weight: f64,
    pub loss: LossKind,
    pub binding: Binding,
    /// `key` into a model's output dict (`logits`, or a `return_patterns` feature map).
    pub key: Option<String>,
}

impl LossTerm {
    /// Resolves one entry: the loss's own keys (checked), then its models, then `key`.
    pub fn new(spec: &LossSpec, arch: &ArchConfig) -> Result<Self> {
        let p = &spec.params;
        let loss = LossKind::from_config(&spec.name, p, arch)?;
        let binding = loss.binding(&spec.name, p)?;
        let key = read_key(&spec.name, p, loss.reads_feature_maps())?;
        Ok(LossTerm {
            config_name: spec.name.clone(),
            weight: spec.weight,
            loss,
            binding,
            key,
        })
    }

    /// Whether the loss has its own trainable layers (a [`LossPart`]).
    pub fn has_part(&self) -> bool {
        self.loss.has_part()
    }

    /// The names of the entry's logged terms.
    pub fn term_names(&self) -> Vec<String> {
        self.loss.term_names(&self.binding)
    }
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
                .map(|s| LossTerm::new(s, arch))
                .collect::<Result<Vec<_>>>()?,
        };
        if let [t] = loss.terms.as_slice() {
            let names = t.term_names();
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
            for n in t.binding.models() {
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
            .filter_map(|t| t.loss.init_part(device))
            .collect()
    }

    /// The names of the logged terms, in order (for `check`).
    pub fn term_names(&self) -> Vec<String> {
        self.terms
            .iter()
            .flat_map(LossTerm::term_names)
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
            let names = t.term_names();
            let values = t.loss.forward(&TermInput {
                ctx,
                binding: &t.binding,
                key: t.key.as_deref(),
                config_name: &t.config_name,
                index,
                part,
            })?;
            debug_assert_eq!(names.len(), values.len());
            for (name, value) in names.into_iter().zip(values) {
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

#[cfg(test)]
mod tests {
    use super::super::ce::cross_entropy;
    use super::super::dkd::dkd;
    use super::super::kl::kl_div;
    use super::super::testing::{combined, outputs, run, specs, value, with_features};
    use super::*;
    use burn::backend::Flex;

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
        let ce = value(&cross_entropy(o["Student"].logits.clone(), y.clone(), None));
        let dkd = value(&dkd(
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
    fn a_single_entry_ignores_its_weight_as_paddleclas_does() {
        let l = combined(&specs(
            "[{DistillationKLDivLoss: {weight: 3.0, model_name_pairs: [[Student, Teacher]]}}]",
        ))
        .unwrap();
        let (o, y) = outputs();
        let v = run(&l, &o, &y, 1).unwrap();
        let kl = value(&kl_div(
            o["Student"].logits.clone(),
            o["Teacher"].logits.clone(),
            4.0,
        ));
        assert!((value(&v.total) - kl).abs() < 1e-6);
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
        let arch = super::super::testing::arch();
        let e = CombinedLoss::for_eval(&s, &arch).unwrap_err().to_string();
        assert!(e.contains("cannot be an eval loss"), "{e}");
        assert!(CombinedLoss::for_eval(&specs("[{CELoss: {}}]"), &arch).is_ok());
    }
}
