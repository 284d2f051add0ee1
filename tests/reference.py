"""Short, independent reference implementations: loops and textbook formulas, no shortcuts
shared with the code under test."""

from __future__ import annotations

import itertools
import math

import numpy as np


def brute_force_acc(y_true, y_pred) -> float:
    """Best accuracy over every one-to-one map between clusters and classes (exhaustive)."""
    y_true, y_pred = list(y_true), list(y_pred)
    classes, clusters = sorted(set(y_true)), sorted(set(y_pred))
    best = 0
    if len(clusters) <= len(classes):
        maps = (dict(zip(clusters, p, strict=True)) for p in itertools.permutations(classes, len(clusters)))
    else:  # each class gets its own cluster; the other clusters match nothing
        maps = ({k: c for c, k in zip(classes, p, strict=True)} for p in itertools.permutations(clusters, len(classes)))
    for m in maps:
        best = max(best, sum(m.get(k) == c for c, k in zip(y_true, y_pred, strict=True)))
    return best / len(y_true)


def ari_pairs(y_true, y_pred) -> float:
    """Adjusted Rand index from the four pair counts over all n(n-1)/2 pairs (Hubert-Arabie)."""
    tp = fp = fn = tn = 0
    for i, j in itertools.combinations(range(len(y_true)), 2):
        same_class, same_cluster = y_true[i] == y_true[j], y_pred[i] == y_pred[j]
        tp += same_class and same_cluster
        fn += same_class and not same_cluster
        fp += same_cluster and not same_class
        tn += not same_class and not same_cluster
    return 2 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def _entropy(labels) -> float:
    n = len(labels)
    return -sum(c / n * math.log(c / n) for c in (list(labels).count(v) for v in set(labels)))


def mutual_information(y_true, y_pred) -> float:
    n = len(y_true)
    mi = 0.0
    for c in set(y_true):
        for k in set(y_pred):
            n_ck = sum(1 for a, b in zip(y_true, y_pred, strict=True) if a == c and b == k)
            if n_ck:
                n_c, n_k = list(y_true).count(c), list(y_pred).count(k)
                mi += n_ck / n * math.log(n * n_ck / (n_c * n_k))
    return mi


def nmi_arithmetic(y_true, y_pred) -> float:
    """I(C; K) / ((H(C) + H(K)) / 2)."""
    return mutual_information(y_true, y_pred) / ((_entropy(y_true) + _entropy(y_pred)) / 2)


def homogeneity(y_true, y_pred) -> float:
    """1 - H(C | K) / H(C) = I(C; K) / H(C)."""
    h = _entropy(y_true)
    return 1.0 if h == 0 else mutual_information(y_true, y_pred) / h


def cm_terms_loops(x, gamma, mu, alpha) -> dict[str, float]:
    """E1..E4 of the CM loss written as explicit sums over i, k and l (k != l in E3)."""
    x, gamma, mu = (np.asarray(a, dtype=np.float64) for a in (x, gamma, mu))
    n, k_ = gamma.shape
    e1 = e2 = e3 = 0.0
    for i in range(n):
        x_bar = sum(gamma[i, k] * mu[k] for k in range(k_))
        e1 += float(np.sum((x[i] - x_bar) ** 2))
        for k in range(k_):
            e2 += gamma[i, k] * (1 - gamma[i, k]) * float(mu[k] @ mu[k])
            for m in range(k_):
                if m != k:
                    e3 -= gamma[i, k] * gamma[i, m] * float(mu[k] @ mu[m])
    return {"E1": e1, "E2": e2, "E3": e3, "E4": dirichlet_loops(gamma, alpha)}


def dirichlet_loops(gamma, alpha) -> float:
    """sum_k (1 - alpha_k) log(mean_i gamma_ik); a vector alpha is paired in sorted order."""
    gamma = np.asarray(gamma, dtype=np.float64)
    log_mean = [math.log(sum(gamma[:, k]) / len(gamma)) for k in range(gamma.shape[1])]
    if np.ndim(alpha) == 0:
        return sum((1 - float(alpha)) * v for v in log_mean)
    return sum((1 - a) * v for a, v in zip(sorted(alpha), sorted(log_mean), strict=True))


def aecm_terms_numpy(x, x_rec, z, gamma, mu, alpha, beta, lam) -> dict[str, float]:
    """The AE-CM loss terms (Eq. 10) with explicit NumPy sums."""
    x, x_rec, z, gamma, mu = (np.asarray(a, dtype=np.float64) for a in (x, x_rec, z, gamma, mu))
    k_ = mu.shape[0]
    gram = np.array([[mu[a] @ mu[b] for b in range(k_)] for a in range(k_)])
    return {
        "L_rec": beta * float(np.sum((x - x_rec) ** 2)),
        "E1": float(sum(np.sum((z[i] - gamma[i] @ mu) ** 2) for i in range(len(z)))),
        "E2": float(np.sum(gamma * (1 - gamma))),
        "E4": dirichlet_loops(gamma, alpha),
        "L_orth": lam * float(np.sum(np.abs(gram - np.eye(k_)))),
    }


def sinkhorn_numpy(scores, eps: float, n_iters: int):
    """Sinkhorn-Knopp in float64 NumPy as written in METHODS 1.2: Q = exp(S^T / eps) normalised
    to total 1, then n_iters x (cluster sums -> 1/K, sample sums -> 1/B); returns (B Q)^T.
    Exact for scores whose spread over eps stays within float64's exponent range."""
    s = np.asarray(scores, dtype=np.float64).T
    q = np.exp((s - s.max()) / eps)
    q /= q.sum()
    k, b = q.shape
    for _ in range(n_iters):
        q /= q.sum(axis=1, keepdims=True) * k
        q /= q.sum(axis=0, keepdims=True) * b
    return (q * b).T


def mmd_loops(x, y, bandwidth: float) -> float:
    """Unbiased MMD^2 with w(a, b) = exp(-||a - b||^2 / bandwidth), by explicit double loops."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)

    def w(a, b):
        return math.exp(-float(((a - b) ** 2).sum()) / bandwidth)

    n, m = len(x), len(y)
    xx = sum(w(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(w(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(w(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def kmeans_loss(z, r) -> float:
    """sum_i min_k ||z_i - r_k||^2, the k-means loss of codes ``z`` ``(B, p)`` and centres ``r`` ``(K, p)``."""
    z, r = np.asarray(z, dtype=np.float64), np.asarray(r, dtype=np.float64)
    return float(((z[:, None] - r[None]) ** 2).sum(-1).min(1).sum())
