"""Reference implementations of SPEC §6.2/§6.3 for tiny inputs, written for reading.

``permutohedral_filter_reference`` follows the lattice step by step (elevate, enclosing simplex,
barycentric weights, vertices, splat into a dict, d+1 blur passes, slice) in NumPy float64;
the C++/CUDA kernels must reproduce it to rounding. ``dense_gaussian_reference`` is the exact
O(N²) Gaussian sum the lattice approximates, and ``dense_crf_reference`` the mean-field loop
of §6.3 on top of the reference lattice.
"""
from __future__ import annotations

import math

import numpy as np


def elevate(f: np.ndarray) -> np.ndarray:
    """Embed a feature vector (d,) into the hyperplane Σe = 0 of R^{d+1} (SPEC §6.2 "Elevate")."""
    d = f.shape[0]
    scale = [math.sqrt(2.0 / 3.0) * (d + 1) / math.sqrt((i + 1) * (i + 2)) for i in range(d)]
    c = [f[i] * scale[i] for i in range(d)]
    e = np.zeros(d + 1)
    e[d] = -d * c[d - 1]
    for j in range(d - 1, 0, -1):
        e[j] = sum(c[j:]) - j * c[j - 1]
    e[0] = sum(c)
    return e


def enclosing_simplex(e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remainder-0 point ``rem0`` and the ``rank`` of each coordinate (SPEC §6.2)."""
    d = e.shape[0] - 1
    down = np.floor(e / (d + 1))
    up = np.ceil(e / (d + 1))
    # Nearest multiple of d+1; exact halves round down.
    r = np.where(up * (d + 1) - e < e - down * (d + 1), up, down)
    rem0 = (r * (d + 1)).astype(np.int64)
    total = int(r.sum())
    resid = e - rem0
    rank = np.zeros(d + 1, dtype=np.int64)
    for i in range(d + 1):
        # How many residuals are larger; among equal ones the lower index counts as larger.
        rank[i] = sum(1 for j in range(d + 1) if resid[j] > resid[i] or (resid[j] == resid[i] and j < i))
    rank += total
    for i in range(d + 1):
        if rank[i] < 0:
            rank[i] += d + 1
            rem0[i] += d + 1
        elif rank[i] > d:
            rank[i] -= d + 1
            rem0[i] -= d + 1
    return rem0, rank


def barycentric(e: np.ndarray, rem0: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """Barycentric weights (d+1,) of the point in its simplex (SPEC §6.2)."""
    d = e.shape[0] - 1
    b = np.zeros(d + 2)
    for i in range(d + 1):
        v = (e[i] - rem0[i]) / (d + 1)
        b[d - rank[i]] += v
        b[d - rank[i] + 1] -= v
    b[0] += 1.0 + b[d + 1]
    return b[: d + 1]


def simplex_vertices(rem0: np.ndarray, rank: np.ndarray) -> list[tuple[int, ...]]:
    """Keys (first d coordinates) of the d+1 vertices, remainder k = 0..d."""
    d = rem0.shape[0] - 1
    keys = []
    for k in range(d + 1):
        key = [int(rem0[i] + (k if rank[i] <= d - k else k - (d + 1))) for i in range(d)]
        keys.append(tuple(key))
    return keys


def permutohedral_filter_reference(features: np.ndarray, values: np.ndarray, transpose: bool = False) -> np.ndarray:
    """Lattice filter of ``values`` (N,C) with ``features`` (N,d), unnormalised (SPEC §6.2)."""
    features = np.asarray(features, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    n, d = features.shape
    splat: dict[tuple[int, ...], np.ndarray] = {}
    corners = []
    for i in range(n):
        e = elevate(features[i])
        rem0, rank = enclosing_simplex(e)
        b = barycentric(e, rem0, rank)
        keys = simplex_vertices(rem0, rank)
        corners.append((keys, b))
        for key, w in zip(keys, b):
            splat[key] = splat.get(key, np.zeros(values.shape[1])) + w * values[i]
    lattice = splat
    order = range(d, -1, -1) if transpose else range(d + 1)
    for j in order:
        step = np.full(d, -1)
        if j < d:
            step[j] += d + 1
        zero = np.zeros(values.shape[1])
        lattice = {
            key: v + 0.5 * (lattice.get(tuple(np.add(key, step)), zero) + lattice.get(tuple(np.subtract(key, step)), zero))
            for key, v in lattice.items()
        }
    alpha = 1.0 / (1.0 + 2.0 ** (-d))
    out = np.zeros_like(values)
    for i, (keys, b) in enumerate(corners):
        out[i] = alpha * sum(w * lattice[key] for key, w in zip(keys, b))
    return out


def dense_gaussian_reference(features: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Exact Σ_j exp(-½‖f_i − f_j‖²) v_j over all pairs, self term included."""
    f = np.asarray(features, dtype=np.float64)
    sq = ((f[:, None, :] - f[None, :, :]) ** 2).sum(-1)
    return np.exp(-0.5 * sq) @ np.asarray(values, dtype=np.float64)


def crf_features_reference(image_hw3: np.ndarray, pos_xy_std: float, bi_xy_std: float, bi_rgb_std: float):
    """Gaussian (x, y)/pos_xy_std and bilateral (x, y, r, g, b) features of SPEC §6.3."""
    h, w, _ = image_hw3.shape
    y, x = np.mgrid[0:h, 0:w]
    xy = np.stack([x.ravel(), y.ravel()], 1).astype(np.float64)
    rgb = image_hw3.reshape(-1, 3).astype(np.float64)
    return xy / pos_xy_std, np.concatenate([xy / bi_xy_std, rgb / bi_rgb_std], 1)


def dense_crf_reference(image_hw3: np.ndarray, probs_khw: np.ndarray, num_iter: int = 10, pos_xy_std: float = 1,
                        pos_w: float = 3, bi_xy_std: float = 67, bi_rgb_std: float = 3, bi_w: float = 4,
                        filter_fn=permutohedral_filter_reference) -> np.ndarray:
    """Mean-field inference of SPEC §6.3 in float64; returns Q (K,H,W)."""
    k, h, w = probs_khw.shape
    feat_g, feat_b = crf_features_reference(image_hw3, pos_xy_std, bi_xy_std, bi_rgb_std)
    neg_unary = np.log(np.clip(probs_khw.reshape(k, -1).T.astype(np.float64), 1e-5, 1.0))
    kernels = []
    for feat, weight in ((feat_g, pos_w), (feat_b, bi_w)):
        eta = 1.0 / np.sqrt(filter_fn(feat, np.ones((h * w, 1)))[:, 0] + 1e-20)
        kernels.append((feat, eta, weight))

    def softmax(x):
        x = np.exp(x - x.max(1, keepdims=True))
        return x / x.sum(1, keepdims=True)

    q = softmax(neg_unary)
    for _ in range(num_iter):
        logits = neg_unary.copy()
        for feat, eta, weight in kernels:
            logits += weight * eta[:, None] * filter_fn(feat, eta[:, None] * q)
        q = softmax(logits)
    return q.T.reshape(k, h, w)
