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
MIN_WINDOWS_PER_SPEAKER = 4
PRUNING_CANDIDATES = 14  # values of p tried, spread geometrically
MIN_PRUNING, MAX_PRUNING_SHARE = 2, 0.25  # p from 2 neighbours to a quarter of the embeddings
SUMMARY_ITERATIONS = 8  # k-means passes when summarising a long recording
SUMMARY_ROWS = 2048  # rows compared with the centres at a time (a 13 MB block)
# Two clusters are one voice when they are this alike relative to how alike each is within (see
# _merge_same_voice): parts of one synthetic voice measured 0.96-0.98, two close voices of one gender 0.92-0.96.
SAME_VOICE = 0.965
# Below that, down to CLOSE_VOICE, the pair is one voice only if its windows' nearest neighbours cross between
# the two (see _mixing): measured on the corpus, 0.18-0.76 of what random labels would give for parts of one
# voice, 0.03-0.16 for two voices.
CLOSE_VOICE, MIXED = 0.95, 0.15
NEIGHBOURS = 10
SEED = 20261202  # clustering is deterministic: the same recording gives the same speakers


@dataclass
class Clusters:
    labels: np.ndarray  # one cluster number per embedding, 0..count-1
    centroids: np.ndarray  # (count, dim), unit norm
    affinity_size: int  # rows (= columns) of the largest affinity matrix built


def working_dtype(n: int):
    """float64 for what enters the affinity matrix whole (as measured on the corpus), float32 for a recording
    long enough to be summarised first: its copies of every embedding then cost half (22 MB less per copy for
    3 hours' 11,000 windows)."""
    return np.float64 if n <= MAX_CLUSTERED else np.float32


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


def _nearest(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """The most similar centre of each row (unit vectors), SUMMARY_ROWS rows at a time: the similarity block
    stays at SUMMARY_ROWS x centres whatever the length of `x`."""
    out = np.empty(x.shape[0], dtype=int)
    for first in range(0, x.shape[0], SUMMARY_ROWS):
        out[first:first + SUMMARY_ROWS] = np.argmax(x[first:first + SUMMARY_ROWS] @ centres.T, axis=1)
    return out


def _summarise(x: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """`size` centres standing for the rows of `x` (spherical k-means started from rows spread evenly in
    time), and which centre each row belongs to. Work: SUMMARY_ITERATIONS x rows x size dot products."""
    centres = x[np.linspace(0, x.shape[0] - 1, size).round().astype(int)]
    for _ in range(SUMMARY_ITERATIONS):
        labels = _nearest(x, centres)
        sums = np.zeros_like(centres)
        np.add.at(sums, labels, x)
        used = np.bincount(labels, minlength=size) > 0
        centres = np.where(used[:, None], _unit(sums), centres)
    labels = _nearest(x, centres)
    used = np.unique(labels)  # centres left empty stand for nothing
    remap = np.full(size, -1)
    remap[used] = np.arange(used.size)
    return centres[used], remap[labels]


def _laplacian_spectrum(similarity: np.ndarray, p: int, with_vectors: int = 0):
    """Eigenvalues (and the first `with_vectors` eigenvectors) of the Laplacian of the graph that keeps each
    row's p largest similarities, made symmetric."""
    from scipy.linalg import eigh

    keep = np.argpartition(-similarity, p, axis=1)[:, :p]
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


def _similarity(points: np.ndarray, regions: np.ndarray | None) -> np.ndarray:
    """Cosine similarities, with each point's own and its overlapping neighbours' (the windows just before and
    after it in the same speech region: they share half their audio) pushed to the bottom. Otherwise a
    point's nearest neighbours are those, the graph falls apart into runs of consecutive windows, and the
    eigengap counts runs instead of voices (one voice was found as 8 to 12 speakers that way)."""
    similarity = points @ points.T
    np.fill_diagonal(similarity, -2.0)
    if regions is not None and regions.shape[0] > 1:
        same = regions[1:] == regions[:-1]
        i = np.flatnonzero(same)
        similarity[i, i + 1] = similarity[i + 1, i] = -2.0
    return similarity


def _mixing(similarity: np.ndarray, first: np.ndarray, second: np.ndarray) -> float:
    """How much the two clusters' windows are each other's nearest neighbours: the share of each window's
    NEIGHBOURS most similar windows (within the pair) that lie in the other cluster, over the share random
    labels would give, averaged. Where k-means cut one voice in two, neighbours still cross the cut; two
    voices keep theirs to themselves."""
    union = np.concatenate([first, second])
    k = min(NEIGHBOURS, union.size - 1)
    if k < 1:
        return 0.0
    in_second = np.zeros(union.size, dtype=bool)
    in_second[first.size:] = True
    nearest = np.argpartition(-similarity[np.ix_(union, union)], k - 1, axis=1)[:, :k]
    crossing = (in_second[nearest] != in_second[:, None]).mean(axis=1)
    expected = np.where(in_second, first.size, second.size) / (union.size - 1)
    return float(np.mean(crossing / expected))


def _merge_same_voice(similarity: np.ndarray, labels: np.ndarray, min_k: int) -> np.ndarray:
    """Merge clusters that are one voice cut in parts. A pair's likeness is its mean cross-similarity over
    the geometric mean of its two mean within-cluster similarities; the most alike pair that is at least
    SAME_VOICE alike, or CLOSE_VOICE alike with windows that mix (_mixing at least MIXED), is merged, and so on
    while one is. The eigengap alone splits one voice into several on short recordings (20 windows of one
    voice gave 11 clusters), and likeness alone could not tell one female voice in two parts (0.963) from two
    male voices (0.959)."""
    valid = similarity > -1.5  # not itself nor an overlapping neighbour
    labels = labels.copy()
    while np.unique(labels).size > min_k:
        groups = [np.flatnonzero(labels == c) for c in np.unique(labels)]
        own = []
        for g in groups:
            block, ok = similarity[np.ix_(g, g)], valid[np.ix_(g, g)]
            own.append(float(block[ok].mean()) if ok.any() else np.nan)
        # A cluster too small to say how alike it is within is taken to be as alike as the others are.
        known = [o for o in own if not np.isnan(o)]
        own = [o if not np.isnan(o) else (float(np.mean(known)) if known else 0.0) for o in own]
        pairs = []
        for i in range(len(groups)):
            for j in range(i + 1, len(groups)):
                block, ok = similarity[np.ix_(groups[i], groups[j])], valid[np.ix_(groups[i], groups[j])]
                cross = float(block[ok].mean()) if ok.any() else -1.0
                likeness = cross / np.sqrt(max(own[i], 1e-6) * max(own[j], 1e-6))
                if likeness >= CLOSE_VOICE:
                    pairs.append((likeness, i, j))
        merge = next(((i, j) for likeness, i, j in sorted(pairs, reverse=True)
                      if likeness >= SAME_VOICE or _mixing(similarity, groups[i], groups[j]) >= MIXED), None)
        if merge is None:
            break
        labels[groups[merge[1]]] = labels[groups[merge[0]][0]]
    return labels


def cluster(embeddings: np.ndarray, num_speakers: int | None = None, min_speakers: int | None = None,
            max_speakers: int | None = None, regions: np.ndarray | None = None) -> Clusters:
    """Group unit-norm embeddings (one per window, in time order) by speaker; `regions`: the speech region of
    each window, so that overlapping windows are not taken for evidence of one voice."""
    x = np.asarray(embeddings, dtype=working_dtype(len(embeddings)))
    if x.size and np.abs(np.linalg.norm(x, axis=-1) - 1).max() > 1e-5:  # unit rows (diarize's) are not copied
        x = _unit(x)
    n = x.shape[0]
    if n == 0:
        return Clusters(np.zeros(0, dtype=int), np.zeros((0, x.shape[1] if x.ndim == 2 else 0)), 0)
    rng = np.random.default_rng(SEED)
    members = np.arange(n)
    points = x
    if n > MAX_CLUSTERED:
        points, members = _summarise(x, MAX_CLUSTERED)
        points = points.astype(np.float64)
        regions = None  # centres have no place in time
    m = points.shape[0]
    if num_speakers is not None:
        min_k = max_k = num_speakers
    else:
        min_k = max(1, min_speakers or 1)
        # A voice counts when it has at least MIN_WINDOWS_PER_SPEAKER windows (about 3 s of speech).
        max_k = max(min_k, max_speakers or min(AUTO_MAX_SPEAKERS, max(1, n // MIN_WINDOWS_PER_SPEAKER)))
    max_k = min(max_k, m - 1) if m > 2 else 1
    min_k = min(min_k, max_k)
    if max_k <= 1:
        labels = np.zeros(m, dtype=int)
    else:
        similarity = _similarity(points, regions)
        k, p = _choose(similarity, min_k, max_k)
        if k == 1:
            labels = np.zeros(m, dtype=int)
        else:
            _, vectors = _laplacian_spectrum(similarity, p, with_vectors=k)
            labels = _kmeans(_unit(vectors), k, rng, iterations=30, restarts=5)
            if num_speakers is None:
                labels = _merge_same_voice(similarity, labels, min_k)
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
