"""Who is who: speaker embeddings grouped by spectral clustering, the number of speakers found by the eigengap.

The affinity graph keeps each embedding's p most similar neighbours, and p is chosen the way NME-SC does
(Park et al., "Auto-Tuning Spectral Clustering for Speaker Diarization Using Normalized Maximum Eigengap",
2019): the p that makes the largest eigengap of the graph Laplacian largest for its size. No similarity
threshold is fixed: what separates two voices is learned from the recording itself, which is what a probe
with a fixed cosine threshold lacked (synthetic voices of one gender are all close in absolute terms).

Memory is bounded: at most MAX_CLUSTERED embeddings enter the affinity matrix (MAX_CLUSTERED² floats). A
longer recording is first summarised by k-means into MAX_CLUSTERED centres (work linear in its length), the
centres are clustered, and every embedding takes the speaker of its centre.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_CLUSTERED = 800  # embeddings in the affinity matrix at most: 800² float64 is 5 MB (about 10 min of speech)
MAX_SPEAKERS = 32  # the most a caller may ask for
AUTO_MAX_SPEAKERS = 12  # the most the automatic count considers, unless the caller says more
PRUNING_CANDIDATES = 14  # values of p tried, spread geometrically
MIN_PRUNING, MAX_PRUNING_SHARE = 2, 0.25  # p from 2 neighbours to a quarter of the embeddings
SUMMARY_ITERATIONS = 8  # k-means passes when summarising a long recording
SEED = 20261202  # clustering is deterministic: the same recording gives the same speakers


@dataclass
class Clusters:
    labels: np.ndarray  # one cluster number per embedding, 0..count-1
    centroids: np.ndarray  # (count, dim), unit norm
    affinity_size: int  # rows (= columns) of the largest affinity matrix built


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _lloyd(x: np.ndarray, k: int, rng: np.random.Generator, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """k-means of the rows of `x`: k-means++ seeding, then Lloyd's passes (SciPy)."""
    from scipy.cluster.vq import kmeans2

    return kmeans2(x, k, iter=iterations, minit="++", seed=rng)


def _kmeans(x: np.ndarray, k: int, rng: np.random.Generator, iterations: int, restarts: int) -> np.ndarray:
    """Labels of `x` in k groups, the best of `restarts` k-means runs by inertia."""
    best, best_inertia = None, np.inf
    for _ in range(restarts):
        centres, labels = _lloyd(x, k, rng, iterations)
        inertia = float(np.sum((x - centres[labels]) ** 2))
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    return best


def _summarise(x: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`size` centres standing for the rows of `x`, and which centre each row belongs to."""
    from scipy.cluster.vq import vq

    centres, _ = _lloyd(x, size, rng, SUMMARY_ITERATIONS)
    centres = _unit(centres[np.isfinite(centres).all(axis=1)])
    labels, _ = vq(x, centres)
    used = np.unique(labels)  # k-means may leave centres empty: keep those that stand for something
    remap = np.full(centres.shape[0], -1)
    remap[used] = np.arange(used.size)
    return centres[used], remap[labels]


def _laplacian_spectrum(similarity: np.ndarray, p: int, with_vectors: int = 0):
    """Eigenvalues (and the first `with_vectors` eigenvectors) of the Laplacian of the graph that keeps each
    row's p largest similarities, made symmetric."""
    from scipy.linalg import eigh

    keep = np.argpartition(-similarity, p, axis=1)[:, :p + 1]  # p neighbours and itself
    graph = np.zeros_like(similarity)
    np.put_along_axis(graph, keep, 1.0, axis=1)
    graph = (graph + graph.T) / 2
    np.fill_diagonal(graph, 0.0)
    laplacian = np.diag(graph.sum(axis=1)) - graph
    if with_vectors:
        values, vectors = eigh(laplacian)
        return values, vectors[:, :with_vectors]
    return eigh(laplacian, eigvals_only=True), None


def _choose(similarity: np.ndarray, min_k: int, max_k: int) -> tuple[int, int]:
    """(speakers, p): the pruning p whose largest eigengap within [min_k, max_k] is the most marked."""
    n = similarity.shape[0]
    top = max(MIN_PRUNING + 1, int(n * MAX_PRUNING_SHARE))
    candidates = np.unique(np.round(np.geomspace(MIN_PRUNING, top, PRUNING_CANDIDATES)).astype(int))
    candidates = candidates[candidates < n - 1]
    best = (np.inf, min_k, int(candidates[0]) if candidates.size else 1)
    for p in candidates:
        values, _ = _laplacian_spectrum(similarity, int(p))
        gaps = np.diff(values[:max_k + 1])  # gaps[i]: i + 1 connected groups
        window = gaps[min_k - 1:max_k]
        i = int(np.argmax(window))
        gap = float(window[i]) / (float(values[-1]) + 1e-10)
        ratio = p / (gap + 1e-10)
        if ratio < best[0]:
            best = (ratio, min_k + i, int(p))
    return best[1], best[2]


def cluster(embeddings: np.ndarray, num_speakers: int | None = None, min_speakers: int | None = None,
            max_speakers: int | None = None) -> Clusters:
    """Group unit-norm embeddings (one per window) by speaker."""
    x = _unit(np.asarray(embeddings, dtype=np.float64))
    n = x.shape[0]
    if n == 0:
        return Clusters(np.zeros(0, dtype=int), np.zeros((0, x.shape[1] if x.ndim == 2 else 0)), 0)
    rng = np.random.default_rng(SEED)
    members = np.arange(n)
    points = x
    if n > MAX_CLUSTERED:
        points, members = _summarise(x, MAX_CLUSTERED, rng)
    m = points.shape[0]
    if num_speakers is not None:
        min_k = max_k = num_speakers
    else:
        min_k = max(1, min_speakers or 1)
        max_k = max(min_k, max_speakers or AUTO_MAX_SPEAKERS)
    max_k = min(max_k, m - 1) if m > 2 else 1
    min_k = min(min_k, max_k)
    if max_k <= 1:
        labels = np.zeros(m, dtype=int)
    else:
        similarity = points @ points.T
        k, p = _choose(similarity, min_k, max_k)
        if k == 1:
            labels = np.zeros(m, dtype=int)
        else:
            _, vectors = _laplacian_spectrum(similarity, p, with_vectors=k)
            labels = _kmeans(_unit(vectors), k, rng, iterations=30, restarts=5)
    labels = labels[members]
    labels = np.unique(labels, return_inverse=True)[1]  # no empty cluster numbers
    centroids = _unit(np.stack([x[labels == c].mean(axis=0) for c in range(labels.max() + 1)]))
    return Clusters(labels=labels, centroids=centroids, affinity_size=m if max_k > 1 else 0)


def match_references(centroids: np.ndarray, references: dict[str, np.ndarray], min_similarity: float) -> dict[int, str]:
    """Cluster number -> known name, by the assignment of highest total cosine similarity (Hungarian);
    a pair less similar than `min_similarity` is no match, and the cluster keeps a letter."""
    from scipy.optimize import linear_sum_assignment

    if not references or centroids.shape[0] == 0:
        return {}
    names = list(references)
    refs = _unit(np.stack([np.asarray(references[name], dtype=np.float64) for name in names]))
    similarity = _unit(centroids) @ refs.T
    rows, cols = linear_sum_assignment(-similarity)
    return {int(r): names[c] for r, c in zip(rows, cols, strict=True) if similarity[r, c] >= min_similarity}
