#!/usr/bin/env python3
"""Generate reference fixtures for the knowledge-distillation loss formulas.

This is an independent float64 reference (numpy only) of the three loss formulas in
`src/loss/functional.rs`, written straight from the formulas (not from any library's code):

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

    text = json.dumps(
        {
            "generator": "tools/gen_loss_fixtures.py (numpy float64; gradients by central finite differences)",
            "cases": cases,
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
