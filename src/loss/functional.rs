//! The loss formulas, as functions of logits (PaddleClas's math as summarised in
//! `../shared/reference/paddleclas-loss-math.md`; the independent reference is `tools/gen_loss_fixtures.py`).
//! All are generic over the backend so the same code computes training (autodiff) and eval losses.

use burn::tensor::activation::{log_softmax, sigmoid, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};

/// A large negative number that masks a logit out of a softmax without producing NaN.
const MASK: f32 = -1.0e30;

fn one_hot<B: Backend>(labels: Tensor<B, 1, Int>, classes: usize) -> Tensor<B, 2> {
    labels.one_hot::<2>(classes).float()
}

/// `log Σ exp` along dim 1, keeping the dim: `[N, C] → [N, 1]`.
fn logsumexp<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let max = x.clone().max_dim(1).detach();
    x.sub(max.clone()).exp().sum_dim(1).log().add(max)
}

/// Cross-entropy with hard labels, mean over the batch; with `epsilon`, label smoothing
/// `(1-ε)·onehot + ε/C` as Paddle's `label_smooth`.
pub fn cross_entropy<B: Backend>(
    logits: Tensor<B, 2>,
    labels: Tensor<B, 1, Int>,
    epsilon: Option<f64>,
) -> Tensor<B, 1> {
    let [_, c] = logits.dims();
    let mut target = one_hot(labels, c);
    if let Some(eps) = epsilon {
        target = target.mul_scalar(1.0 - eps).add_scalar(eps / c as f64);
    }
    soft_cross_entropy_with(log_softmax(logits, 1), target)
}

fn soft_cross_entropy_with<B: Backend>(log_p: Tensor<B, 2>, target: Tensor<B, 2>) -> Tensor<B, 1> {
    log_p.mul(target).sum_dim(1).neg().mean()
}

/// Soft-label cross-entropy against a teacher (`DistillationCELoss`):
/// `mean_n −Σ_c softmax(z_t)·log softmax(z_s)`.
pub fn soft_cross_entropy<B: Backend>(
    student: Tensor<B, 2>,
    teacher: Tensor<B, 2>,
) -> Tensor<B, 1> {
    soft_cross_entropy_with(log_softmax(student, 1), softmax(teacher, 1))
}

/// The activation DML compares outputs after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmlAct {
    Softmax,
    Sigmoid,
    /// The outputs already are probabilities.
    Identity,
}

/// Deep mutual learning's symmetric KL: with `k(a, b) = b·log((b+ε)/(a+ε))·C` (ε = 1e-12),
/// the mean over all elements of `(k(p, q) + k(q, p)) / 2` — a batch-mean symmetric KL —
/// or, with `sum_across_class_dim`, the sum over classes averaged over the batch.
pub fn dml<B: Backend>(
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
    act: DmlAct,
    sum_across_class_dim: bool,
) -> Tensor<B, 1> {
    let [_, c] = a.dims();
    let (p, q) = match act {
        DmlAct::Softmax => (softmax(a, 1), softmax(b, 1)),
        DmlAct::Sigmoid => (sigmoid(a), sigmoid(b)),
        DmlAct::Identity => (a, b),
    };
    let eps = 1e-12;
    let (lp, lq) = (
        p.clone().add_scalar(eps).log(),
        q.clone().add_scalar(eps).log(),
    );
    let k_pq = q.mul(lq.clone() - lp.clone());
    let k_qp = p.mul(lp - lq);
    let loss = (k_pq + k_qp).mul_scalar(c as f64 / 2.0);
    if sum_across_class_dim {
        loss.sum_dim(1).mean()
    } else {
        loss.mean()
    }
}

/// Feature distance (`DistanceLoss`): `l2` mean squared error, `l1` mean absolute error,
/// `smooth_l1` Huber with δ = 1 (Paddle's defaults), each averaged over all elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Distance {
    L2,
    L1,
    SmoothL1,
}

pub fn distance<B: Backend, const D: usize>(
    a: Tensor<B, D>,
    b: Tensor<B, D>,
    mode: Distance,
) -> Tensor<B, 1> {
    let d = a.sub(b);
    match mode {
        Distance::L2 => d.square().mean(),
        Distance::L1 => d.abs().mean(),
        Distance::SmoothL1 => {
            let abs = d.clone().abs();
            let small = abs.clone().lower_elem(1.0);
            let quadratic = d.square().mul_scalar(0.5);
            let linear = abs.sub_scalar(0.5);
            linear.mask_where(small, quadratic).mean()
        }
    }
}

/// Hinton KD: `T² · Σ p_t (log p_t − log p_s) / N` with `p = softmax(z/T)`.
pub fn kl_div<B: Backend>(
    student: Tensor<B, 2>,
    teacher: Tensor<B, 2>,
    temperature: f64,
) -> Tensor<B, 1> {
    let [n, _] = student.dims();
    let log_ps = log_softmax(student.div_scalar(temperature), 1);
    let log_pt = log_softmax(teacher.div_scalar(temperature), 1);
    let pt = log_pt.clone().exp();
    pt.mul(log_pt.sub(log_ps))
        .sum()
        .mul_scalar(temperature * temperature / n as f64)
}

/// Decoupled KD (Zhao et al. 2022): `α·TCKD + β·NCKD`.
///
/// PaddleClas computes `log(b_s)` of the binary target/non-target probabilities directly, which is
/// `-inf` (then NaN) once a probability underflows; here both are log-sum-exps of the logits, equal
/// where PaddleClas is finite and finite everywhere else.
pub fn dkd<B: Backend>(
    student: Tensor<B, 2>,
    teacher: Tensor<B, 2>,
    labels: Tensor<B, 1, Int>,
    temperature: f64,
    alpha: f64,
    beta: f64,
) -> Tensor<B, 1> {
    let [n, c] = student.dims();
    let gt = one_hot(labels, c).equal_elem(1.0);
    let zs = student.div_scalar(temperature);
    let zt = teacher.div_scalar(temperature);
    let scale = temperature * temperature / n as f64;

    // Binary (target, non-target) log-probabilities: log b₁ = z_y − lse(z), log b₂ = lse(z without y) − lse(z).
    let binary = |z: Tensor<B, 2>| {
        let all = logsumexp(z.clone());
        let target = z.clone().mask_fill(gt.clone().bool_not(), MASK);
        let target = logsumexp(target).sub(all.clone());
        let other = logsumexp(z.mask_fill(gt.clone(), MASK)).sub(all);
        Tensor::cat(vec![target, other], 1)
    };
    let log_bs = binary(zs.clone());
    let log_bt = binary(zt.clone());
    let tckd = log_bt
        .clone()
        .exp()
        .mul(log_bt.sub(log_bs))
        .sum()
        .mul_scalar(scale);

    // Non-target distributions: the target logit pushed down by 1000, as in the paper's code.
    let push = gt.float().mul_scalar(1000.0);
    let log_qs = log_softmax(zs.sub(push.clone()), 1);
    let log_qt = log_softmax(zt.sub(push), 1);
    let nckd = log_qt
        .clone()
        .exp()
        .mul(log_qt.sub(log_qs))
        .sum()
        .mul_scalar(scale);
    tckd.mul_scalar(alpha).add(nckd.mul_scalar(beta))
}

/// Top-k accuracy (fraction of samples whose label is among the k largest logits), per k.
pub fn topk_correct<B: Backend>(
    logits: Tensor<B, 2>,
    labels: Tensor<B, 1, Int>,
    ks: &[usize],
) -> Vec<usize> {
    let [n, c] = logits.dims();
    let target = logits.clone().gather(1, labels.reshape([n, 1]));
    // Rank of the label = number of logits strictly greater than it (ties count in its favour).
    let rank: Vec<i64> = logits
        .greater(target.expand([n, c]))
        .int()
        .sum_dim(1)
        .into_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .expect("int data");
    ks.iter()
        .map(|&k| rank.iter().filter(|&&r| (r as usize) < k).count())
        .collect()
}

/// Hard labels, or the teacher's arg-max when a loss is told to use it as ground truth
/// (`use_target_as_gt`).
pub fn target_labels<B: Backend>(
    labels: Tensor<B, 1, Int>,
    teacher: &Tensor<B, 2>,
    from_teacher: bool,
) -> Tensor<B, 1, Int> {
    if from_teacher {
        let [n, _] = teacher.dims();
        teacher.clone().argmax(1).reshape([n])
    } else {
        labels
    }
}

/// Weighted soft labels (Zhou et al. 2021, `WSLLoss`): the soft CE
/// `−Σ_c softmax(z_t/T)·log softmax(z_s/T)` of each sample, weighted by
/// `1 − exp(−max(CE_s / (CE_t + 1e-7), 0))` where `CE` are the hard-label cross-entropies at
/// T = 1 of the detached logits; `T² · mean_n`.
pub fn wsl<B: Backend>(
    student: Tensor<B, 2>,
    teacher: Tensor<B, 2>,
    labels: Tensor<B, 1, Int>,
    temperature: f64,
) -> Tensor<B, 1> {
    let [_, c] = student.dims();
    let y = one_hot(labels, c);
    let ce = |z: Tensor<B, 2>| log_softmax(z.detach(), 1).mul(y.clone()).sum_dim(1).neg();
    let ratio = ce(student.clone())
        .div(ce(teacher.clone()).add_scalar(1e-7))
        .clamp_min(0.0);
    let weight = ratio.neg().exp().neg().add_scalar(1.0);
    let soft = log_softmax(student.div_scalar(temperature), 1)
        .mul(softmax(teacher.div_scalar(temperature), 1))
        .sum_dim(1)
        .neg();
    soft.mul(weight)
        .mean()
        .mul_scalar(temperature * temperature)
}

/// `sqrt(max(x, 1e-24))`: a norm whose gradient stays finite at zero (its value differs only
/// below 1e-12, where every caller adds a larger epsilon anyway).
fn safe_sqrt<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    x.clamp_min(1e-24).sqrt()
}

/// Mean over rows of the Pearson correlation of `a[n,:]` and `b[n,:]`, with PaddleClas's
/// cosine `Σ a·b / (‖a‖·‖b‖ + 1e-8)` of the row-centred vectors.
fn mean_row_pearson<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 1> {
    let a = a.clone().sub(a.mean_dim(1));
    let b = b.clone().sub(b.mean_dim(1));
    let norm = |x: Tensor<B, 2>| safe_sqrt(x.square().sum_dim(1));
    let denom = norm(a.clone()).mul(norm(b.clone())).add_scalar(1e-8);
    a.mul(b).sum_dim(1).div(denom).mean()
}

/// DIST (Huang et al. 2022, `DISTLoss`): `β·(1 − inter) + γ·(1 − intra)`, the mean Pearson
/// correlations of the softmax outputs per sample (inter-class) and per class (intra-class).
/// As in PaddleClas there is no temperature.
pub fn dist<B: Backend>(
    student: Tensor<B, 2>,
    teacher: Tensor<B, 2>,
    beta: f64,
    gamma: f64,
) -> Tensor<B, 1> {
    let (ys, yt) = (softmax(student, 1), softmax(teacher, 1));
    let inter = mean_row_pearson(ys.clone(), yt.clone())
        .neg()
        .add_scalar(1.0);
    let intra = mean_row_pearson(ys.transpose(), yt.transpose())
        .neg()
        .add_scalar(1.0);
    inter.mul_scalar(beta).add(intra.mul_scalar(gamma))
}

/// Spherical KD (Guo et al. 2020, `SKDLoss`): both logits layer-normalised over the classes
/// (no affine, ε = 1e-7) and scaled by `multiplier`; then
/// `α·T²·softCE(z_s/T, z_t/T) + (1 − α)·CE(z_s, y)` on the normalised logits.
pub fn skd<B: Backend>(
    student: Tensor<B, 2>,
    teacher: Tensor<B, 2>,
    labels: Tensor<B, 1, Int>,
    temperature: f64,
    multiplier: f64,
    alpha: f64,
) -> Tensor<B, 1> {
    let norm = |z: Tensor<B, 2>| {
        let centred = z.clone().sub(z.mean_dim(1));
        let var = centred.clone().square().mean_dim(1);
        centred
            .div(var.add_scalar(1e-7).sqrt())
            .mul_scalar(multiplier)
    };
    let (zs, zt) = (norm(student), norm(teacher));
    let kd = soft_cross_entropy(
        zs.clone().div_scalar(temperature),
        zt.div_scalar(temperature),
    )
    .mul_scalar(temperature * temperature);
    let ce = cross_entropy(zs, labels, None);
    kd.mul_scalar(alpha).add(ce.mul_scalar(1.0 - alpha))
}

/// How RKD's distance term treats the diagonal and the normalisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RkdVariant {
    /// PaddleClas: every entry of the distance matrix (the diagonal is `sqrt(1e-12)`) and its mean.
    Paddle,
    /// Park et al.'s code: zero diagonal, normalised by the mean of the positive distances.
    Paper,
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
