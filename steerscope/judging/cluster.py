"""Behaviour clusters: group completions by meaning and label each group.

Completions are embedded (all-MiniLM-L6-v2: the whole text and its last words, so an appended
phrase or a drift of topic at the end separates a completion from its plain twin; judging.change),
clustered by agglomerative clustering on cosine
distance with a distance threshold (so the number of behaviours is found, not fixed), and each
cluster is labelled by its most typical completion (closest to the centroid) and its most
distinctive words (smoothed log-ratio of in-cluster to overall word frequency). A 2-D map comes
from the top two principal components of the embeddings.

The embedder is uncased and English-only, so completions in capitals, in another language or full
of symbols are first put in surface groups (`judging.surface`): each such group is one behaviour,
labelled ("in French", "written in capitals", "with ✨ symbols"); the rest is clustered by meaning.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

import torch

_WORD = re.compile(r"[^\W\d_][^\W\d_']+")  # words of any alphabet ("lumière" is one word)
_STOP = set(
    "the a an and or of to in on for with is are was were be been it its this that i you he she we they my your "
    "our their me him her them as at by from but not so if then than there here have has had do does did can "
    "will would could should just also very about into over more most some any all what which who how when".split()
)


@dataclass
class Cluster:
    id: int
    size: int
    typical: str
    words: list[str]
    surface: str = ""  # "in French", "written in capitals", ... for a surface group; "" when grouped by meaning


@dataclass
class Clustering:
    labels: list[int]  # cluster of each text
    clusters: list[Cluster]
    xy: list[tuple[float, float]]  # 2-D map coordinates


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text) if w.lower() not in _STOP]


def cluster_texts(texts: list[str], embeddings=None, threshold: float = 0.35) -> Clustering:
    """`threshold`: cosine distance below which groups merge (average linkage); `embeddings`: a
    `judging.change.Texts` of `texts`, or their (n, dim) meaning embeddings, or None (computed)."""
    if not texts:
        return Clustering([], [], [])
    from .change import Texts
    from .surface import label

    rep = embeddings if isinstance(embeddings, Texts) else Texts.of(texts, embeddings)
    e = rep.meaning.double()
    feats = rep.features().double()
    groups = rep.groups
    plain = [i for i, g in enumerate(groups) if not g]
    keys: list[tuple[str, int | str]] = [("surface", g) for g in groups]  # surface groups: one behaviour each
    if len(plain) == 1:
        keys[plain[0]] = ("meaning", 0)
    elif plain:
        from sklearn.cluster import AgglomerativeClustering

        sub = (
            AgglomerativeClustering(n_clusters=None, metric="cosine", linkage="average", distance_threshold=threshold)
            .fit_predict(feats[plain].numpy())
            .tolist()
        )
        for i, c in zip(plain, sub):
            keys[i] = ("meaning", c)
    # renumber by size, largest first
    order = [c for c, _ in Counter(keys).most_common()]
    remap = {c: i for i, c in enumerate(order)}
    labels = [remap[c] for c in keys]
    overall = Counter(w for t in texts for w in _words(t))
    n_all = sum(overall.values()) or 1
    clusters = []
    for c in range(len(order)):
        idx = [i for i, l in enumerate(labels) if l == c]
        centroid = e[idx].mean(0)
        typical = texts[max(idx, key=lambda i: float(e[i] @ centroid))]
        inside = Counter(w for i in idx for w in _words(texts[i]))
        n_in = sum(inside.values()) or 1
        score = {w: inside[w] * math.log(((inside[w] + 0.5) / n_in) / ((overall[w] + 0.5) / n_all)) for w in inside}
        kind, key = order[c]
        clusters.append(
            Cluster(
                c,
                len(idx),
                typical,
                [w for w, _ in sorted(score.items(), key=lambda x: -x[1])[:5]],
                label(key) if kind == "surface" else "",
            )
        )
    centred = e - e.mean(0)
    if len(texts) >= 2:
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        xy = (
            (centred @ vh[:2].T)
            if vh.shape[0] >= 2
            else torch.cat([centred @ vh[:1].T, torch.zeros(len(texts), 1, dtype=e.dtype)], 1)
        )
    else:
        xy = torch.zeros(1, 2, dtype=e.dtype)
    return Clustering(labels, clusters, [(float(x), float(y)) for x, y in xy])
