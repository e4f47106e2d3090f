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
