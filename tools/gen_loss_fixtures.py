#!/usr/bin/env python3
"""Generate reference fixtures for the knowledge-distillation loss formulas.

This is an independent float64 reference (numpy only) of the loss formulas in
`src/loss/` (one file per loss), written straight from the formulas (not from
any library's code). The logit losses:

  ce   cross-entropy with hard labels, optionally label-smoothed:
         target = onehot(y)  or  (1-eps)*onehot(y) + eps/C
         L = mean_n( -sum_c target * log_softmax(z_s) )
  kl   Hinton KD:  p_t = softmax(z_t/T), log p_s = log_softmax(z_s/T)
         L = T^2 * sum_{n,c} p_t * (log p_t - log p_s) / N
  dkd  Decoupled KD (Zhao et al. 2022, as PaddleClas computes it):
         m = onehot(y), p = softmax(z/T)
         b = [sum_c p*m, sum_c p*(1-m)]                         ([N, 2])
         TCKD = T^2 * sum_{n,2} b_t * (log b_t - log b_s) / N
         q_t = softmax(z_t/T - 1000 m), log q_s = log_softmax(z_s/T - 1000 m)
         NCKD = T^2 * sum_{n,c} q_t * (log q_t - log q_s) / N   (0*log 0 taken as 0)
         L = alpha*TCKD + beta*NCKD
       log b is computed as a log-sum-exp of the log-probabilities, so that it stays finite
       when a probability underflows (the "large" cases); for the ordinary cases the script
       asserts it equals log(sum p) computed directly.

For every case, dL/dz_s (the gradient w.r.t. the student logits) is computed by central
finite differences in float64 -- independent of any autodiff -- at two step sizes, and the
script asserts that they agree (max abs difference < 1e-7). For ce and kl it also checks the
finite-difference gradient against the closed forms (softmax - target)/N and T*(p_s - p_t)/N.

Further logit/embedding losses (formulas in the docstrings of their functions below): soft CE,
DML, distance, WSL (its per-sample weight is detached, so its reference gradient holds the
weight fixed), DIST, SKD, RKD distance (PaddleClas and paper variants) and angle.

Losses with their own layers ("part_cases": MGD, PEFD, AFD) take every weight as an input; the
case lists the inputs, the value, and finite-difference gradients for some inputs (student
features and one or two weights).

Cases: N=4, C=7, logits ~ 2*normal (rng seed 2026); one "large" case per loss with logits
~ 30*normal (values in roughly the +-100 range), flagged with "large": true. Logits are
rounded to float32 before use, so the f32 Rust test reads exactly the inputs evaluated here.

Rerun from the repository root:

    python3 tools/gen_loss_fixtures.py

which writes tests/data/loss_fixtures.json (path relative to this script's repository);
`python3 tools/gen_loss_fixtures.py -` writes the JSON to stdout instead, and any other
argument is taken as the output path. The output is deterministic. It is read by
tests/loss_fixtures.rs.
"""

import json
import os
import sys

import numpy as np

SEED = 2026
N, C = 4, 7
H_STEPS = (1e-5, 2e-5)  # two finite-difference steps whose results must agree
FD_AGREE = 1e-7


# ---------------------------------------------------------------- formulas (float64)

def log_softmax(x):
    """log softmax along the last axis, shifted by the row max."""
    x = np.asarray(x, dtype=np.float64)
    mx = x.max(axis=-1, keepdims=True)
    s = x - mx
    return s - np.log(np.exp(s).sum(axis=-1, keepdims=True))


def softmax(x):
    return np.exp(log_softmax(x))


def logsumexp(x, axis=-1):
    mx = x.max(axis=axis, keepdims=True)
    return (mx + np.log(np.exp(x - mx).sum(axis=axis, keepdims=True))).squeeze(axis)


def onehot(y, c):
    m = np.zeros((len(y), c), dtype=np.float64)
    m[np.arange(len(y)), y] = 1.0
    return m


def xlogx_ratio(p, log_p, log_q):
    """sum p*(log p - log q), with terms where p == 0 taken as 0."""
    terms = np.where(p > 0.0, p * (log_p - log_q), 0.0)
    return terms.sum()


def cross_entropy(zs, y, epsilon=None):
    n, c = zs.shape
    target = onehot(y, c)
    if epsilon is not None:
        target = (1.0 - epsilon) * target + epsilon / c
    return float(np.mean(-(target * log_softmax(zs)).sum(axis=1)))


def kl_div(zs, zt, T):
    n = zs.shape[0]
    log_ps = log_softmax(zs / T)
    log_pt = log_softmax(zt / T)
    pt = np.exp(log_pt)
    return float(T * T * xlogx_ratio(pt, log_pt, log_ps) / n)


def binary_log_probs(z, m):
    """[log sum_c p*m, log sum_c p*(1-m)] with p = softmax(z), as log-sum-exps of log p."""
    log_p = log_softmax(z)
    neg_inf = np.full_like(log_p, -np.inf)
    log_target = logsumexp(np.where(m > 0, log_p, neg_inf))
    log_other = logsumexp(np.where(m > 0, neg_inf, log_p))
    return np.stack([log_target, log_other], axis=1)


def binary_probs_direct(z, m):
    p = softmax(z)
    return np.stack([(p * m).sum(axis=1), (p * (1.0 - m)).sum(axis=1)], axis=1)


def dkd(zs, zt, y, T, alpha, beta):
    n, c = zs.shape
    m = onehot(y, c)
    log_bs = binary_log_probs(zs / T, m)
    log_bt = binary_log_probs(zt / T, m)
    bt = np.exp(log_bt)
    tckd = T * T * xlogx_ratio(bt, log_bt, log_bs) / n
    log_qs = log_softmax(zs / T - 1000.0 * m)
    log_qt = log_softmax(zt / T - 1000.0 * m)
    qt = np.exp(log_qt)
    nckd = T * T * xlogx_ratio(qt, log_qt, log_qs) / n
    return float(alpha * tckd + beta * nckd)


def wsl(zs, zt, y, T):
    """WSLLoss: soft CE at T weighted per sample by 1 - exp(-max(ce_s / (ce_t + 1e-7), 0))."""
    m = onehot(y, zs.shape[1])
    ce_s = -(m * log_softmax(zs)).sum(axis=1)
    ce_t = -(m * log_softmax(zt)).sum(axis=1)
    w = 1.0 - np.exp(-np.maximum(ce_s / (ce_t + 1e-7), 0.0))
    kd = -(softmax(zt / T) * log_softmax(zs / T)).sum(axis=1)
    return float(T * T * np.mean(kd * w))


def wsl_weight_is_constant(zs, zt, y, T):
    """The WSL weight is detached: the reference gradient treats it as a constant."""
    m = onehot(y, zs.shape[1])
    ce_s = -(m * log_softmax(zs)).sum(axis=1)
    ce_t = -(m * log_softmax(zt)).sum(axis=1)
    w = 1.0 - np.exp(-np.maximum(ce_s / (ce_t + 1e-7), 0.0))
    return lambda z: float(T * T * np.mean(-(softmax(zt / T) * log_softmax(z / T)).sum(axis=1) * w))


def pearson_rows(a, b):
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((a * a).sum(axis=1)) * np.sqrt((b * b).sum(axis=1)) + 1e-8
    return (a * b).sum(axis=1) / den


def dist(zs, zt, beta, gamma):
    """DISTLoss: beta (1 - mean row Pearson) + gamma (1 - mean column Pearson) of softmaxes."""
    ys, yt = softmax(zs), softmax(zt)
    inter = 1.0 - pearson_rows(ys, yt).mean()
    intra = 1.0 - pearson_rows(ys.T, yt.T).mean()
    return float(beta * inter + gamma * intra)


def skd(zs, zt, y, T, multiplier, alpha):
    """SKDLoss: layer-normalised (eps 1e-7) logits x multiplier; alpha T^2 softCE + (1-alpha) CE."""
    def ln(z):
        mu = z.mean(axis=1, keepdims=True)
        var = ((z - mu) ** 2).mean(axis=1, keepdims=True)
        return (z - mu) / np.sqrt(var + 1e-7) * multiplier
    s, t = ln(zs), ln(zt)
    kd = np.mean(-(softmax(t / T) * log_softmax(s / T)).sum(axis=1)) * T * T
    ce = np.mean(-(onehot(y, zs.shape[1]) * log_softmax(s)).sum(axis=1))
    return float(alpha * kd + (1.0 - alpha) * ce)


def huber(a, b):
    d = np.abs(a - b)
    return float(np.mean(np.where(d < 1.0, 0.5 * d * d, d - 0.5)))


def pdist(e):
    sq = (e * e).sum(axis=1)
    return np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * e @ e.T, 1e-12))


def rkd_distance(s, t, variant):
    """RKD distance term: Huber between distance matrices over their means (paddle) or with a
    zeroed diagonal over the mean positive distance (paper)."""
    def norm(e):
        d = pdist(e)
        if variant == "paddle":
            return d / (d.mean() + 1e-12)
        d = d.copy()
        np.fill_diagonal(d, 0.0)
        return d / d[d > 0].mean()
    return huber(norm(s), norm(t))


def rkd_angle(s, t):
    """RKD angle term: Huber between cosines of (e_j - e_i, e_k - e_i) over all triplets."""
    def angles(e):
        diff = e[None, :, :] - e[:, None, :]
        n = np.sqrt((diff * diff).sum(axis=2, keepdims=True))
        u = diff / np.maximum(n, 1e-12)
        return np.einsum("ijd,ikd->ijk", u, u).ravel()
    return huber(angles(s), angles(t))


def conv_same(x, w, b):
    """Stride-1 'same' convolution, x [N,Ci,H,W], w [Co,Ci,k,k], b [Co]."""
    k = w.shape[2]
    p = k // 2
    n, ci, h, wd = x.shape
    xp = np.zeros((n, ci, h + 2 * p, wd + 2 * p))
    xp[:, :, p:p + h, p:p + wd] = x
    out = np.zeros((n, w.shape[0], h, wd))
    for dy in range(k):
        for dx in range(k):
            out += np.einsum("nchw,oc->nohw", xp[:, :, dy:dy + h, dx:dx + wd], w[:, :, dy, dx])
    return out + b[None, :, None, None]


def mgd(fs, ft, mask, w0, b0, w1, b1, alpha):
    """MGD: alpha * mean((conv(relu(conv(fs * mask))) - ft)^2) with a given channel mask."""
    g = conv_same(np.maximum(conv_same(fs * mask, w0, b0), 0.0), w1, b1)
    return float(alpha * np.mean((g - ft) ** 2))


def pefd(fs, ft, ws, bs):
    """PEFD: mean of relu(1x1 conv) projections; mean over samples of 1 - cosine (flattened)."""
    proj = sum(np.maximum(conv_same(fs, w, b), 0.0) for w, b in zip(ws, bs)) / len(ws)
    a = proj.reshape(len(fs), -1)
    t = ft.reshape(len(ft), -1)
    cos = (a / np.sqrt((a * a).sum(1, keepdims=True)) * (t / np.sqrt((t * t).sum(1, keepdims=True)))).sum(1)
    return float(np.mean(1.0 - cos))


def linear_bn(x, w, b, relu):
    """Linear (x @ w + b) then BatchNorm1D in training mode (batch mean, biased variance,
    eps 1e-5, unit scale, zero shift), optionally ReLU."""
    y = x @ w + b
    y = (y - y.mean(axis=0)) / np.sqrt(y.var(axis=0) + 1e-5)
    return np.maximum(y, 0.0) if relu else y


def adaptive_avg_pool(x, oh, ow):
    n, c, h, w = x.shape
    out = np.zeros((n, c, oh, ow))
    for i in range(oh):
        h0, h1 = (i * h) // oh, -((-(i + 1) * h) // oh)
        for j in range(ow):
            w0, w1 = (j * w) // ow, -((-(j + 1) * w) // ow)
            out[:, :, i, j] = x[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
    return out


def l2n(x, axis):
    return x / np.maximum(np.sqrt((x * x).sum(axis=axis, keepdims=True)), 1e-12)


def afd(fs, ft, q_w, q_b, k_w, k_b, bl_w, bl_b, p_t, p_s, qk):
    """AFD (Ji et al. 2021 as in PaddleClas): teacher queries, student bilinear keys, attention
    over student maps per teacher map, attention-weighted squared distances of L2-normalised
    spatial energies, summed over teacher maps."""
    n, t, s = ft[0].shape[0], len(ft), len(fs)
    query = np.stack([linear_bn(f.mean(axis=(2, 3)), w, b, False) for f, w, b in zip(ft, q_w, q_b)], axis=1)
    value_t = [l2n((f * f).mean(axis=1).reshape(n, -1), 1) for f in ft]
    key = np.stack([linear_bn(f.mean(axis=(2, 3)), w, b, True) for f, w, b in zip(fs, k_w, k_b)], axis=1)
    bilinear = linear_bn(key.reshape(n * s, qk), bl_w, bl_b, False).reshape(n, s, t, qk)
    shapes, which = [], []
    for f in ft:
        shp = f.shape[1:]
        if shp not in shapes:
            shapes.append(shp)
        which.append(shapes.index(shp))
    value_s = [l2n(np.stack([adaptive_avg_pool((f * f).mean(axis=1, keepdims=True), h, w).reshape(n, h * w)
                             for f in fs], axis=1), 2) for (_, h, w) in shapes]
    logit = (np.einsum("bstq,btq->bts", bilinear, query) + (p_t @ p_s.T)[None]) / np.sqrt(qk)
    att = np.exp(logit - logit.max(axis=2, keepdims=True))
    att /= att.sum(axis=2, keepdims=True)
    total = 0.0
    for i, vt in enumerate(value_t):
        diff = ((value_s[which[i]] - vt[:, None, :]) ** 2).mean(axis=2)
        total += (diff * att[:, i, :]).sum(axis=1).mean()
    return float(total)


# ---------------------------------------------------------------- finite differences

def soft_ce(zs, zt):
    """DistillationCELoss: mean_n( -sum_c softmax(z_t) * log_softmax(z_s) )."""
    return float(np.mean(-np.sum(softmax(zt) * log_softmax(zs), axis=-1)))


def dml(zs, zt, act, sum_across_class_dim):
    """DMLLoss: symmetric KL of act(z_s), act(z_t), k(a, b) = b*log((b+eps)/(a+eps))*C, eps 1e-12."""
    eps = 1e-12
    if act == "softmax":
        p, q = softmax(zs), softmax(zt)
    elif act == "sigmoid":
        p, q = 1.0 / (1.0 + np.exp(-zs)), 1.0 / (1.0 + np.exp(-zt))
    else:
        p, q = zs, zt
    c = zs.shape[-1]
    k = lambda a, b: b * np.log((b + eps) / (a + eps)) * c
    loss = (k(p, q) + k(q, p)) / 2.0
    return float(loss.sum(axis=1).mean() if sum_across_class_dim else loss.mean())


def distance(zs, zt, mode):
    """DistanceLoss: mean over all elements of (d^2 | |d| | Huber(delta=1)) with d = z_s - z_t."""
    d = zs - zt
    if mode == "l2":
        return float(np.mean(d * d))
    if mode == "l1":
        return float(np.mean(np.abs(d)))
    a = np.abs(d)
    return float(np.mean(np.where(a < 1.0, 0.5 * d * d, a - 0.5)))


def fd_grad(f, zs, h):
    g = np.zeros_like(zs)
    for idx in np.ndindex(zs.shape):
        zp = zs.copy()
        zm = zs.copy()
        zp[idx] += h
        zm[idx] -= h
        g[idx] = (f(zp) - f(zm)) / (2.0 * h)
    return g


def stable_fd_grad(f, zs, name):
    g1 = fd_grad(f, zs, H_STEPS[0])
    g2 = fd_grad(f, zs, H_STEPS[1])
    diff = np.abs(g1 - g2).max()
    assert diff < FD_AGREE, f"{name}: finite-difference gradient unstable (max diff {diff:.3e})"
    assert np.all(np.isfinite(g1)), f"{name}: non-finite gradient"
    return g1


# ---------------------------------------------------------------- cases

def f32(x):
    """Rounded to f32 so the Rust test sees exactly these inputs."""
    return np.asarray(x, dtype=np.float32).astype(np.float64)


def tensor(x):
    return {"shape": list(x.shape), "data": [float(v) for v in x.ravel()]}


def grads_of(f, inputs, names, case):
    """Finite-difference gradients of f(**inputs) w.r.t. each input in names."""
    out = {}
    for name in names:
        def g(v, name=name):
            args = dict(inputs)
            args[name] = v
            return f(**args)
        out[name] = [float(v) for v in stable_fd_grad(g, inputs[name], f"{case}:{name}").ravel()]
    return out


def make_part_cases(rng):
    """Losses with their own layers: MGD, PEFD, AFD, with every weight given as an input."""
    cases = []

    # MGD: N=2, C=3 (student = teacher channels, no align), 4x4 maps, a fixed channel mask.
    fs, ft = f32(rng.standard_normal((2, 3, 4, 4))), f32(rng.standard_normal((2, 3, 4, 4)))
    mask = np.array([[1, 0, 1], [1, 1, 0]], dtype=np.float64).reshape(2, 3, 1, 1)
    inputs = dict(fs=fs, ft=ft, mask=mask,
                  w0=f32(0.3 * rng.standard_normal((3, 3, 3, 3))), b0=f32(0.1 * rng.standard_normal(3)),
                  w1=f32(0.3 * rng.standard_normal((3, 3, 3, 3))), b1=f32(0.1 * rng.standard_normal(3)))
    f = lambda alpha=1.756, **kw: mgd(alpha=alpha, **kw)
    cases.append(dict(name="mgd", loss="mgd", params=dict(alpha=1.756),
                      inputs={k: tensor(v) for k, v in inputs.items()},
                      value=f(**inputs), grads=grads_of(f, inputs, ["fs", "w0"], "mgd")))

    # PEFD: N=3, 4 -> 5 channels, 2x2 maps, 3 projectors.
    inputs = dict(fs=f32(rng.standard_normal((3, 4, 2, 2))), ft=f32(rng.standard_normal((3, 5, 2, 2))))
    for i in range(3):
        inputs[f"w{i}"] = f32(0.5 * rng.standard_normal((5, 4, 1, 1)))
        inputs[f"b{i}"] = f32(0.1 * rng.standard_normal(5))
    f = lambda fs, ft, w0, b0, w1, b1, w2, b2: pefd(fs, ft, [w0, w1, w2], [b0, b1, b2])
    cases.append(dict(name="pefd", loss="pefd", params={},
                      inputs={k: tensor(v) for k, v in inputs.items()},
                      value=f(**inputs), grads=grads_of(f, inputs, ["fs", "w1"], "pefd")))

    # AFD: N=3; student maps [2,4,4], [3,2,2]; teacher maps [2,4,4], [4,2,2], [4,2,2]; qk 3.
    n, qk = 3, 3
    s_shapes = [(2, 4, 4), (3, 2, 2)]
    t_shapes = [(2, 4, 4), (4, 2, 2), (4, 2, 2)]
    inputs = {}
    for i, shp in enumerate(s_shapes):
        inputs[f"fs{i}"] = f32(rng.standard_normal((n,) + shp))
    for i, shp in enumerate(t_shapes):
        inputs[f"ft{i}"] = f32(rng.standard_normal((n,) + shp))
    for i, shp in enumerate(t_shapes):
        inputs[f"q_w{i}"] = f32(rng.standard_normal((shp[0], qk)))
        inputs[f"q_b{i}"] = f32(0.1 * rng.standard_normal(qk))
    for i, shp in enumerate(s_shapes):
        inputs[f"k_w{i}"] = f32(rng.standard_normal((shp[0], qk)))
        inputs[f"k_b{i}"] = f32(0.1 * rng.standard_normal(qk))
    inputs["bl_w"] = f32(rng.standard_normal((qk, qk * len(t_shapes))))
    inputs["bl_b"] = f32(0.1 * rng.standard_normal(qk * len(t_shapes)))
    inputs["p_t"] = f32(rng.standard_normal((len(t_shapes), qk)))
    inputs["p_s"] = f32(rng.standard_normal((len(s_shapes), qk)))

    def f(**kw):
        return afd([kw["fs0"], kw["fs1"]], [kw["ft0"], kw["ft1"], kw["ft2"]],
                   [kw["q_w0"], kw["q_w1"], kw["q_w2"]], [kw["q_b0"], kw["q_b1"], kw["q_b2"]],
                   [kw["k_w0"], kw["k_w1"]], [kw["k_b0"], kw["k_b1"]],
                   kw["bl_w"], kw["bl_b"], kw["p_t"], kw["p_s"], qk)
    cases.append(dict(name="afd", loss="afd", params=dict(qk_dim=qk),
                      inputs={k: tensor(v) for k, v in inputs.items()},
                      value=f(**inputs), grads=grads_of(f, inputs, ["fs0", "fs1", "p_s", "bl_w"], "afd")))
    for c in cases:
        print(f"{c['name']:20s} value={c['value']!r}", file=sys.stderr)
    return cases


def main():
    rng = np.random.default_rng(SEED)

    def draw(scale):
        # Round to f32 so the Rust test (f32 tensors) sees exactly the inputs used here.
        zs = (scale * rng.standard_normal((N, C))).astype(np.float32).astype(np.float64)
        zt = (scale * rng.standard_normal((N, C))).astype(np.float32).astype(np.float64)
        y = rng.integers(0, C, size=N)
        return zs, zt, y

    # (name, loss, params, scale)
    specs = [
        ("ce", "ce", dict(epsilon=None), 2.0),
        ("ce_eps0.1", "ce", dict(epsilon=0.1), 2.0),
        ("kl_T4", "kl", dict(temperature=4.0), 2.0),
        ("kl_T1", "kl", dict(temperature=1.0), 2.0),
        ("dkd_T1_a1_b1", "dkd", dict(temperature=1.0, alpha=1.0, beta=1.0), 2.0),
        ("dkd_T4_a1_b8", "dkd", dict(temperature=4.0, alpha=1.0, beta=8.0), 2.0),
        ("ce_eps0.1_large", "ce", dict(epsilon=0.1), 30.0),
        ("kl_T1_large", "kl", dict(temperature=1.0), 30.0),
        ("dkd_T1_a1_b8_large", "dkd", dict(temperature=1.0, alpha=1.0, beta=8.0), 30.0),
        ("softce", "softce", dict(), 2.0),
        ("softce_large", "softce", dict(), 30.0),
        ("dml_softmax", "dml", dict(act="softmax", sum_across_class_dim=False), 2.0),
        ("dml_softmax_sum", "dml", dict(act="softmax", sum_across_class_dim=True), 2.0),
        ("dml_sigmoid", "dml", dict(act="sigmoid", sum_across_class_dim=False), 2.0),
        ("distance_l2", "distance", dict(mode="l2"), 2.0),
        ("distance_l1", "distance", dict(mode="l1"), 2.0),
        ("distance_smooth_l1", "distance", dict(mode="smooth_l1"), 0.5),
        ("wsl_T2", "wsl", dict(temperature=2.0), 2.0),
        ("wsl_T2_large", "wsl", dict(temperature=2.0), 30.0),
        ("dist_b1_g2", "dist", dict(beta=1.0, gamma=2.0), 2.0),
        ("dist_large", "dist", dict(beta=1.0, gamma=1.0), 30.0),
        ("skd_T1", "skd", dict(temperature=1.0, multiplier=2.0, alpha=0.9), 2.0),
        ("skd_T4_large", "skd", dict(temperature=4.0, multiplier=2.0, alpha=0.9), 30.0),
        ("rkd_distance_paddle", "rkd_distance", dict(variant="paddle"), 2.0),
        ("rkd_distance_paper", "rkd_distance", dict(variant="paper"), 2.0),
        ("rkd_angle", "rkd_angle", dict(), 2.0),
    ]

    cases = []
    for name, loss, params, scale in specs:
        zs, zt, y = draw(scale)
        large = scale > 2.0
        if loss == "ce":
            eps = params["epsilon"]
            f = lambda z, y=y, eps=eps: cross_entropy(z, y, eps)
            full = dict(epsilon=eps, temperature=None, alpha=None, beta=None)
        elif loss == "kl":
            T = params["temperature"]
            f = lambda z, zt=zt, T=T: kl_div(z, zt, T)
            full = dict(epsilon=None, temperature=T, alpha=None, beta=None)
        elif loss == "softce":
            f = lambda z, zt=zt: soft_ce(z, zt)
            full = dict(epsilon=None, temperature=None, alpha=None, beta=None)
        elif loss == "dml":
            act, across = params["act"], params["sum_across_class_dim"]
            f = lambda z, zt=zt, act=act, across=across: dml(z, zt, act, across)
            full = dict(epsilon=None, temperature=None, alpha=None, beta=None, act=act, sum_across_class_dim=across)
        elif loss == "distance":
            mode = params["mode"]
            f = lambda z, zt=zt, mode=mode: distance(z, zt, mode)
            full = dict(epsilon=None, temperature=None, alpha=None, beta=None, mode=mode)
        elif loss == "wsl":
            T = params["temperature"]
            # The per-sample weight is detached: differentiate with it held at the inputs' value.
            f = wsl_weight_is_constant(zs, zt, y, T)
            assert abs(f(zs) - wsl(zs, zt, y, T)) < 1e-12
            full = dict(epsilon=None, temperature=T, alpha=None, beta=None)
        elif loss == "dist":
            bb, g = params["beta"], params["gamma"]
            f = lambda z, zt=zt, bb=bb, g=g: dist(z, zt, bb, g)
            full = dict(epsilon=None, temperature=None, alpha=None, beta=bb, gamma=g)
        elif loss == "skd":
            T, mult, al = params["temperature"], params["multiplier"], params["alpha"]
            f = lambda z, zt=zt, y=y, T=T, mult=mult, al=al: skd(z, zt, y, T, mult, al)
            full = dict(epsilon=None, temperature=T, alpha=al, beta=None, multiplier=mult)
        elif loss == "rkd_distance":
            v = params["variant"]
            f = lambda z, zt=zt, v=v: rkd_distance(z, zt, v)
            full = dict(epsilon=None, temperature=None, alpha=None, beta=None, variant=v)
        elif loss == "rkd_angle":
            f = lambda z, zt=zt: rkd_angle(z, zt)
            full = dict(epsilon=None, temperature=None, alpha=None, beta=None)
        else:
            T, a, b = params["temperature"], params["alpha"], params["beta"]
            f = lambda z, zt=zt, y=y, T=T, a=a, b=b: dkd(z, zt, y, T, a, b)
            full = dict(epsilon=None, temperature=T, alpha=a, beta=b)

        value = f(zs)
        assert np.isfinite(value), f"{name}: non-finite loss"
        grad = stable_fd_grad(f, zs, name)

        # Cross-checks against closed forms / direct formulas.
        if loss == "ce":
            target = onehot(y, C)
            if full["epsilon"] is not None:
                target = (1.0 - full["epsilon"]) * target + full["epsilon"] / C
            analytic = (softmax(zs) - target) / N
            assert np.abs(analytic - grad).max() < 1e-8, f"{name}: FD vs analytic"
        elif loss == "kl":
            T = full["temperature"]
            analytic = T * (softmax(zs / T) - softmax(zt / T)) / N
            assert np.abs(analytic - grad).max() < 1e-8, f"{name}: FD vs analytic"
        if loss == "dkd" and not large:
            m = onehot(y, C)
            T = full["temperature"]
            for z in (zs, zt):
                direct = np.log(binary_probs_direct(z / T, m))
                assert np.abs(direct - binary_log_probs(z / T, m)).max() < 1e-12, f"{name}: log b"

        case = {
            "name": name,
            "loss": loss,
            "large": large,
            "n": N,
            "c": C,
            "student": [float(v) for v in zs.ravel()],
        }
        if loss != "ce":
            case["teacher"] = [float(v) for v in zt.ravel()]
        case["labels"] = [int(v) for v in y]
        case["params"] = full
        case["value"] = value
        case["grad_student"] = [float(v) for v in grad.ravel()]
        cases.append(case)
        print(f"{name:20s} large={str(large):5s} value={value!r}", file=sys.stderr)

    part_cases = make_part_cases(rng)

    text = json.dumps(
        {
            "generator": "tools/gen_loss_fixtures.py (numpy float64; gradients by central finite differences)",
            "cases": cases,
            "part_cases": part_cases,
        },
        indent=1,
    ) + "\n"

    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data", "loss_fixtures.json")
    if out == "-":
        sys.stdout.write(text)
    else:
        with open(out, "w") as fh:
            fh.write(text)
        print(f"wrote {out} ({len(text)} bytes, {len(cases)} cases)", file=sys.stderr)


if __name__ == "__main__":
    main()
