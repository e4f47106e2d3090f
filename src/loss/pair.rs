//! `DistillationPairLoss`: a feature-map loss between `s_key` of the first and `t_key` of the
//! second model of each pair, chosen by `base_loss_name`.

use super::binding::Binding;
use super::common::config_error;
use super::mgd::MgdLossConfig;
use super::pefd::PefdLossConfig;
use super::registry::{DistillLoss, LossPart, TermInput};
use crate::arch::ArchConfig;
use crate::config::Node;
use anyhow::Result;
use burn::config::Config;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// `base_loss_name`s of `DistillationPairLoss`.
pub const PAIR_LOSSES: &[&str] = &["MGDLoss", "PEFDLoss"];

/// The loss a `DistillationPairLoss` applies, with its own keys.
#[derive(Config, Debug, PartialEq)]
pub enum PairBase {
    Mgd(MgdLossConfig),
    Pefd(PefdLossConfig),
}

/// A [`PairBase`] loss of the maps `s_key` / `t_key` of each pair; terms
/// `<name>_<pair index>_<A>_<B>`. Both have trainable layers.
#[derive(Config, Debug, PartialEq)]
pub struct PairLossConfig {
    /// `base_loss_name`, with the base loss's keys.
    pub base: PairBase,
    /// The first model's feature map.
    pub s_key: String,
    /// The second model's feature map.
    pub t_key: String,
    /// Prefix of the term names.
    #[config(default = "String::from(\"loss\")")]
    pub name: String,
}

/// One pair's maps, as a [`PairBase`] loss gets them.
pub struct PairMaps<'a, B: Backend> {
    /// The models of the pair.
    pub a: &'a str,
    pub b: &'a str,
    pub s_key: &'a str,
    pub t_key: &'a str,
    /// `s_key` of model a and `t_key` of model b, `[N, C, H, W]`.
    pub student: &'a Tensor<B, 4>,
    pub teacher: &'a Tensor<B, 4>,
}

impl DistillLoss for PairLossConfig {
    const READS_FEATURE_MAPS: bool = true;
    const HAS_PART: bool = true;

    fn from_config(p: &Node, _arch: &ArchConfig) -> Result<Self> {
        let base_loss_name = p.require("base_loss_name")?;
        let base = base_loss_name.as_str()?;
        let s_key = p.require("s_key")?.as_str()?;
        let t_key = p.require("t_key")?.as_str()?;
        let base = match base.as_str() {
            "MGDLoss" => PairBase::Mgd(MgdLossConfig::from_config(p)?),
            "PEFDLoss" => PairBase::Pefd(PefdLossConfig::from_config(p)?),
            other => {
                return Err(config_error(
                    &base_loss_name,
                    format!(
                        "unknown base loss {other:?}; known: {}",
                        PAIR_LOSSES.join(", ")
                    ),
                ))
            }
        };
        let mut c = Self::new(base, s_key, t_key);
        c.name = p.str_or("name", &c.name)?;
        Ok(c)
    }

    /// PaddleClas's pair wrapper puts the pair index first.
    fn term_names(&self, binding: &Binding) -> Vec<String> {
        binding
            .pairs()
            .iter()
            .enumerate()
            .map(|(i, (a, b))| format!("{}_{i}_{a}_{b}", self.name))
            .collect()
    }

    fn forward<B: Backend>(&self, input: &TermInput<B>) -> Result<Vec<Tensor<B, 1>>> {
        input.map_pairs(|pair| {
            let (student, teacher) = pair.features(&self.s_key, &self.t_key)?;
            let maps = PairMaps {
                a: pair.a,
                b: pair.b,
                s_key: &self.s_key,
                t_key: &self.t_key,
                student,
                teacher,
            };
            match &self.base {
                PairBase::Mgd(mgd) => mgd.forward_maps(input, &maps),
                PairBase::Pefd(pefd) => pefd.forward_maps(input, &maps),
            }
        })
    }

    fn init_part<B: Backend>(&self, device: &B::Device) -> Option<LossPart<B>> {
        Some(match &self.base {
            PairBase::Mgd(mgd) => LossPart::Mgd(mgd.init(device)),
            PairBase::Pefd(pefd) => LossPart::Pefd(pefd.init(device)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{combined, specs};

    #[test]
    fn pair_terms_put_the_pair_index_first() {
        let l = combined(&specs(
            "[{DistillationPairLoss: {base_loss_name: PEFDLoss, model_name_pairs: [[Student, Teacher]], s_key: f, t_key: f, student_channel: 2, teacher_channel: 2}}]",
        ))
        .unwrap();
        assert_eq!(l.term_names(), ["loss_0_Student_Teacher", "loss"]);
    }

    #[test]
    fn unknown_base_losses_list_the_known_ones() {
        let e = combined(&specs(
            "[{DistillationPairLoss: {base_loss_name: FooLoss, model_name_pairs: [[Student, Teacher]], s_key: f, t_key: f}}]",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("known: MGDLoss, PEFDLoss"), "{e}");
    }
}
