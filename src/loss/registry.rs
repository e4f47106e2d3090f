//! The one registry from PaddleClas's loss names to the losses: adding a loss is a file that
//! implements [`DistillLoss`] for its config and a line in the `registry!` invocation below
//! (and, for a loss with trainable layers, a [`LossPart`] variant).

use super::afd::{self, Afd};
use super::binding::{output, Binding, ModelPair};
use super::mgd::Mgd;
use super::pefd::Pefd;
use super::{ce, dist, distance, dkd, dml, kl, pair, rkd, skd, wsl, LossContext};
use crate::arch::ArchConfig;
use crate::config::Node;
use anyhow::{bail, Result};
use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// A loss of `Loss.Train` / `Loss.Eval` as configured: it reads its own keys, names its terms
/// and computes them. Implemented by each loss's typed config.
pub trait DistillLoss: Sized {
    /// Whether `key` may name a feature map; for the other losses, `key` must be `logits`.
    const READS_FEATURE_MAPS: bool = false;
    /// Whether the loss has trainable layers of its own ([`Self::init_part`] makes them).
    const HAS_PART: bool = false;

    /// Reads and checks the loss's own keys in its entry `p` (`arch` supplies AFD's transforms).
    /// `weight` is read with the entry, the binding keys by [`Self::binding`], `key` by
    /// [`super::binding::read_key`].
    fn from_config(p: &Node, arch: &ArchConfig) -> Result<Self>;

    /// The models the loss reads; by default pairs (`model_name_pairs`).
    fn binding(&self, config_name: &str, p: &Node) -> Result<Binding> {
        Binding::read_pairs(config_name, p)
    }

    /// The names of the logged terms, in the order of [`Self::forward`]'s values.
    fn term_names(&self, binding: &Binding) -> Vec<String>;

    /// The (unweighted) terms of one batch.
    fn forward<B: Backend>(&self, input: &TermInput<B>) -> Result<Vec<Tensor<B, 1>>>;

    /// The loss's trainable layers, freshly initialised (losses with [`Self::HAS_PART`]).
    fn init_part<B: Backend>(&self, _device: &B::Device) -> Option<LossPart<B>> {
        None
    }
}

/// What one loss entry computes from.
pub struct TermInput<'a, B: Backend> {
    pub ctx: &'a LossContext<'a, B>,
    pub binding: &'a Binding,
    /// The entry's `key`.
    pub key: Option<&'a str>,
    /// The entry's loss name (for messages).
    pub config_name: &'a str,
    /// The entry's position in the loss list (MGD draws its masks from it).
    pub index: usize,
    /// The entry's trainable layers, where it has them.
    pub part: Option<&'a LossPart<B>>,
}

impl<'a, B: Backend> TermInput<'a, B> {
    /// `f` of the outputs of each pair, in order.
    pub fn map_pairs<T>(&self, mut f: impl FnMut(ModelPair<'a, B>) -> Result<T>) -> Result<Vec<T>> {
        self.binding
            .pairs()
            .iter()
            .map(|(a, b)| {
                f(ModelPair {
                    a,
                    b,
                    out_a: output(self.ctx, a)?,
                    out_b: output(self.ctx, b)?,
                })
            })
            .collect()
    }

    /// `f(a, b)` of each pair's logits (or `key` outputs).
    pub fn map_logit_pairs(
        &self,
        mut f: impl FnMut(Tensor<B, 2>, Tensor<B, 2>) -> Tensor<B, 1>,
    ) -> Result<Vec<Tensor<B, 1>>> {
        self.map_pairs(|pair| {
            let (a, b) = pair.logits(self.key)?;
            Ok(f(a, b))
        })
    }
}

/// The trainable layers of one loss entry. The variant names are part of the checkpoint
/// record (`loss_parts.mpk`): keep them.
#[derive(Module, Debug)]
pub enum LossPart<B: Backend> {
    Mgd(Mgd<B>),
    Pefd(Pefd<B>),
    Afd(Afd<B>),
}

/// `registry! { "ConfigName" => Variant(config type), ... }` makes [`LOSSES`], the [`LossKind`]
/// enum and its dispatch to the [`DistillLoss`] methods.
macro_rules! registry {
    ($($config_name:literal => $variant:ident($ty:ty),)*) => {
        /// Loss names the registry knows.
        pub const LOSSES: &[&str] = &[$($config_name),*];

        /// A configured loss of any registered kind.
        #[derive(Clone, Debug, PartialEq)]
        pub enum LossKind {
            $($variant($ty),)*
        }

        impl LossKind {
            /// The loss `config_name` configured by its entry `p`.
            pub fn from_config(config_name: &str, p: &Node, arch: &ArchConfig) -> Result<Self> {
                match config_name {
                    $($config_name => Ok(LossKind::$variant(<$ty>::from_config(p, arch)?)),)*
                    other => bail!(
                        "{}",
                        p.error(format!(
                            "unknown loss {other:?}; known losses: {}",
                            LOSSES.join(", ")
                        ))
                    ),
                }
            }

            /// [`DistillLoss::READS_FEATURE_MAPS`].
            pub fn reads_feature_maps(&self) -> bool {
                match self {
                    $(LossKind::$variant(_) => <$ty as DistillLoss>::READS_FEATURE_MAPS,)*
                }
            }

            /// Whether the loss has its own trainable layers (a [`LossPart`]).
            pub fn has_part(&self) -> bool {
                match self {
                    $(LossKind::$variant(_) => <$ty as DistillLoss>::HAS_PART,)*
                }
            }

            /// [`DistillLoss::binding`].
            pub fn binding(&self, config_name: &str, p: &Node) -> Result<Binding> {
                match self {
                    $(LossKind::$variant(l) => l.binding(config_name, p),)*
                }
            }

            /// [`DistillLoss::term_names`].
            pub fn term_names(&self, binding: &Binding) -> Vec<String> {
                match self {
                    $(LossKind::$variant(l) => l.term_names(binding),)*
                }
            }

            /// [`DistillLoss::forward`].
            pub fn forward<B: Backend>(&self, input: &TermInput<B>) -> Result<Vec<Tensor<B, 1>>> {
                match self {
                    $(LossKind::$variant(l) => l.forward(input),)*
                }
            }

            /// [`DistillLoss::init_part`].
            pub fn init_part<B: Backend>(&self, device: &B::Device) -> Option<LossPart<B>> {
                match self {
                    $(LossKind::$variant(l) => l.init_part(device),)*
                }
            }
        }
    };
}

registry! {
    "CELoss" => Ce(ce::CeLossConfig),
    "DistillationCELoss" => SoftCe(ce::SoftCeLossConfig),
    "DistillationDMLLoss" => Dml(dml::DmlLossConfig),
    "DistillationDistanceLoss" => Distance(distance::DistanceLossConfig),
    "DistillationGTCELoss" => GtCe(ce::CeLossConfig),
    "DistillationKLDivLoss" => Kl(kl::KlDivLossConfig),
    "DistillationDKDLoss" => Dkd(dkd::DkdLossConfig),
    "DistillationWSLLoss" => Wsl(wsl::WslLossConfig),
    "DistillationDISTLoss" => Dist(dist::DistLossConfig),
    "DistillationSKDLoss" => Skd(skd::SkdLossConfig),
    "DistillationRKDLoss" => Rkd(rkd::RkdLossConfig),
    "DistillationPairLoss" => Pair(pair::PairLossConfig),
    "AFDLoss" => Afd(afd::AfdLossConfig),
}

#[cfg(test)]
mod tests {
    use super::super::testing::{combined, specs};

    #[test]
    fn unknown_losses_list_the_known_ones() {
        let e = combined(&specs("[{FancyLoss: {}}]"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown loss") && e.contains("DistillationDKDLoss"),
            "{e}"
        );
    }
}
