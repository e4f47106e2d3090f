//! Relational KD (`DistillationRKDLoss`).

use super::binding::{embedding, Binding};
use super::common::{accept_unused, config_error, safe_sqrt};
use super::distance::{distance, Distance};
use super::registry::{DistillLoss, TermInput};
use crate::arch::ArchConfig;
use crate::config::Node;
use anyhow::Result;
use burn::config::Config;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// How RKD's distance term treats the diagonal and the normalisation.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum RkdVariant {
    /// PaddleClas: every entry of the distance matrix (the diagonal is `sqrt(1e-12)`) and its mean.
    Paddle,
    /// Park et al.'s code: zero diagonal, normalised by the mean of the positive distances.
    Paper,
}

impl RkdVariant {
    /// The `variant` that selects it.
    pub fn variant(self) -> &'static str {
        match self {
            RkdVariant::Paddle => "paddleclas",
            RkdVariant::Paper => "paper",
        }
    }
}

/// Relational KD (Park et al. 2019) on `[N, D]` embeddings of each pair's outputs
/// (`student_keepkeys[i]` of the first model against `teacher_keepkeys[i]` of the second:
/// `logits`, or a feature map flattened after an optional pool to `target_size²`): the
/// [`rkd_angle`] term times `angle_weight` and the [`rkd_distance`] term times
/// `distance_weight`, named `loss_angle_<i>_<A>_<B>` and `loss_dist_<i>_<A>_<B>`.
/// `model_name_pairs` defaults to `[[Student, Teacher]]`.
#[derive(Config, Debug, PartialEq)]
pub struct RkdLossConfig {
    pub student_keepkeys: Vec<String>,
    pub teacher_keepkeys: Vec<String>,
    /// Adaptive average pool of feature maps to `target_size × target_size`; none by default.
    pub target_size: Option<usize>,
    /// kd-launch extension: `paddleclas` or `paper`.
    #[config(default = "RkdVariant::Paddle")]
    pub variant: RkdVariant,
    /// kd-launch extensions (PaddleClas applies the entry's one weight to both terms).
    #[config(default = 1.0)]
    pub angle_weight: f64,
    #[config(default = 1.0)]
    pub distance_weight: f64,
}

impl DistillLoss for RkdLossConfig {
    const READS_FEATURE_MAPS: bool = true;

    fn from_config(p: &Node, _arch: &ArchConfig) -> Result<Self> {
        let s = p.str_list("student_keepkeys")?.unwrap_or_default();
        let t = p.str_list("teacher_keepkeys")?.unwrap_or_default();
        if s.len() != t.len() || s.is_empty() {
            return Err(config_error(
                p,
                format!(
                    "student_keepkeys and teacher_keepkeys must name the same number (≥ 1) of outputs, got {} and {}",
                    s.len(),
                    t.len()
                ),
            ));
        }
        let mut c = Self::new(s, t);
        let variant = p.str_or("variant", c.variant.variant())?;
        c.variant = [RkdVariant::Paddle, RkdVariant::Paper]
            .into_iter()
            .find(|v| v.variant() == variant)
            .ok_or_else(|| {
                config_error(
                    p,
                    format!("variant must be paddleclas or paper, got {variant:?}"),
                )
            })?;
        c.target_size = p.usize("target_size")?;
        c.angle_weight = p.f64_or("angle_weight", c.angle_weight)?;
        c.distance_weight = p.f64_or("distance_weight", c.distance_weight)?;
        // Accepted as by every loss entry; the terms have fixed names.
        accept_unused(p, "name");
        Ok(c)
    }

    fn binding(&self, config_name: &str, p: &Node) -> Result<Binding> {
        if p.get("model_name_pairs").is_none() {
            return Ok(Binding::Pairs(vec![(
                "Student".to_string(),
                "Teacher".to_string(),
            )]));
        }
        Binding::read_pairs(config_name, p)
    }

    fn term_names(&self, binding: &Binding) -> Vec<String> {
        let keys = self.student_keepkeys.len();
        binding
            .pairs()
            .iter()
            .flat_map(|(a, b)| {
                (0..keys).flat_map(move |i| {
                    [
                        format!("loss_angle_{i}_{a}_{b}"),
                        format!("loss_dist_{i}_{a}_{b}"),
                    ]
                })
            })
            .collect()
    }

    fn forward<B: Backend>(&self, input: &TermInput<B>) -> Result<Vec<Tensor<B, 1>>> {
        let per_pair = input.map_pairs(|pair| {
            let mut out = vec![];
            for (sk, tk) in self.student_keepkeys.iter().zip(&self.teacher_keepkeys) {
                let es = embedding(pair.out_a, pair.a, sk, self.target_size)?;
                let et = embedding(pair.out_b, pair.b, tk, self.target_size)?;
                out.push(
                    rkd_angle(es.clone(), et.clone(), self.variant).mul_scalar(self.angle_weight),
                );
                out.push(rkd_distance(es, et, self.variant).mul_scalar(self.distance_weight));
            }
            Ok(out)
        })?;
        Ok(per_pair.into_iter().flatten().collect())
    }
}

/// Pairwise Euclidean distances `sqrt(max(|e_i|² + |e_j|² − 2 e_i·e_j, 1e-12))`.
///
/// The diagonal is set to its exact value `sqrt(1e-12)`: in f32 the expanded form cancels to
/// rounding noise of order `1e-7·|e_i|²` there, whose square root would dominate the mean.
fn pairwise_distances<B: Backend>(e: Tensor<B, 2>) -> Tensor<B, 2> {
    let [n, _] = e.dims();
    let sq = e.clone().square().sum_dim(1);
    let prod = e.clone().matmul(e.clone().transpose());
    let diagonal = Tensor::<B, 2>::eye(n, &e.device()).equal_elem(1.0);
    sq.clone()
        .add(sq.reshape([1, n]))
        .sub(prod.mul_scalar(2.0))
        .mask_fill(diagonal, 1e-12)
        .clamp_min(1e-12)
        .sqrt()
}

/// The teacher side of RKD: PaddleClas lets gradients reach a trainable teacher (mutual
/// learning); Park et al.'s code computes it without gradients.
fn rkd_teacher<B: Backend>(t: Tensor<B, 2>, variant: RkdVariant) -> Tensor<B, 2> {
    match variant {
        RkdVariant::Paddle => t,
        RkdVariant::Paper => t.detach(),
    }
}

/// RKD distance term (Park et al. 2019): Huber (δ = 1) between the student's and the teacher's
/// distance matrices, each divided by its mean (`+1e-12`). Inputs are `[N, D]` embeddings.
pub fn rkd_distance<B: Backend>(
    student: Tensor<B, 2>,
    teacher: Tensor<B, 2>,
    variant: RkdVariant,
) -> Tensor<B, 1> {
    let [n, _] = student.dims();
    let normalised = |e: Tensor<B, 2>| {
        let d = pairwise_distances(e);
        match variant {
            RkdVariant::Paddle => {
                let mean = d.clone().mean().reshape([1, 1]);
                d.div(mean.add_scalar(1e-12))
            }
            RkdVariant::Paper => {
                let diagonal = Tensor::<B, 2>::eye(n, &d.device()).equal_elem(1.0);
                let d = d.mask_fill(diagonal, 0.0);
                let positive = d.clone().greater_elem(0.0).float().sum().reshape([1, 1]);
                let mean = d.clone().sum().reshape([1, 1]).div(positive);
                d.div(mean)
            }
        }
    };
    distance(
        normalised(student),
        normalised(rkd_teacher(teacher, variant)),
        Distance::SmoothL1,
    )
}

/// RKD angle term: Huber (δ = 1) between the cosines `⟨ê_ji, ê_ki⟩` of all triplets, with
/// `ê = (e_j − e_i) / max(‖e_j − e_i‖, 1e-12)` (Paddle's `normalize`).
pub fn rkd_angle<B: Backend>(
    student: Tensor<B, 2>,
    teacher: Tensor<B, 2>,
    variant: RkdVariant,
) -> Tensor<B, 1> {
    let angles = |e: Tensor<B, 2>| {
        let [n, d] = e.dims();
        let diff = e.clone().reshape([1, n, d]).sub(e.reshape([n, 1, d]));
        let norm = safe_sqrt(diff.clone().square().sum_dim(2)).clamp_min(1e-12);
        let unit = diff.div(norm);
        unit.clone()
            .matmul(unit.swap_dims(1, 2))
            .reshape([n * n * n])
    };
    distance(
        angles(student),
        angles(rkd_teacher(teacher, variant)),
        Distance::SmoothL1,
    )
}

#[cfg(test)]
mod tests {
    use super::super::testing::{combined, specs};

    #[test]
    fn rkd_names_two_terms_per_key_pair() {
        let l = combined(&specs(
            "[{DistillationRKDLoss: {student_keepkeys: [logits, f], teacher_keepkeys: [logits, f]}}, {CELoss: {}}]",
        ))
        .unwrap();
        assert_eq!(
            l.term_names(),
            [
                "loss_angle_0_Student_Teacher",
                "loss_dist_0_Student_Teacher",
                "loss_angle_1_Student_Teacher",
                "loss_dist_1_Student_Teacher",
                "CELoss",
                "loss"
            ]
        );
    }
}
