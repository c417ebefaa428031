"""Discovering domains by clustering text, as c-BTM does: tf-idf -> truncated SVD -> L2 -> k-means.

The fitted clusterer is saved without pickle, so that the combine stage can route new text by
it (cluster i <-> shard ``cluster{i}`` <-> student i)::

    <dir>/clusterer.json   settings, the tf-idf vocabulary (terms in column order), cluster sizes
    <dir>/arrays.npz       idf [F], svd components [D, F], centroids [k, D] (float64, allow_pickle=False)

Usage::

    from downscale.data.cluster import Clusterer
    c = Clusterer.fit(texts, k=4, svd_dim=64, max_features=20000, seed=0)
    c.save(run_dir / "data" / "cluster")
    c = Clusterer.load(run_dir / "data" / "cluster")
    d = c.distances(["some text", ...])     # [N, k] squared Euclidean distances to the centroids
    labels = c.predict(texts)               # [N] argmin of the distances

Both the fitted and the loaded clusterer embed text with the same code from the same float64
arrays, so a loaded clusterer gives exactly the distances of the fitted one. The vectoriser is
scikit-learn's ``CountVectorizer`` with the saved vocabulary fixed; tf-idf weighting
(sublinear tf, smooth idf, L2 rows), the SVD projection and the distances are plain numpy.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from downscale._io import write_json_atomic

FORMAT = "downscale-clusterer/1"
JSON_NAME = "clusterer.json"
ARRAYS_NAME = "arrays.npz"
# The tokenisation of the tf-idf step: scikit-learn's default word pattern, lower-cased.
TOKEN_PATTERN = r"(?u)\b\w\w+\b"


class Clusterer:
    """A fitted tf-idf -> SVD -> k-means clusterer. Build it with ``fit`` or ``load``."""

    def __init__(self, vocabulary: list[str], idf: np.ndarray, components: np.ndarray, centroids: np.ndarray,
                 settings: dict | None = None, sizes: list[int] | None = None):
        self.vocabulary = list(vocabulary)
        self.idf = np.ascontiguousarray(idf, dtype=np.float64)  # [F]
        self.components = np.ascontiguousarray(components, dtype=np.float64)  # [D, F]
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float64)  # [k, D]
        self.settings = dict(settings or {})
        self.sizes = list(sizes) if sizes is not None else None
        n_features = len(self.vocabulary)
        if self.idf.shape != (n_features,) or self.components.shape[1] != n_features:
            raise ValueError(f"clusterer arrays do not match a vocabulary of {n_features} terms: idf "
                             f"{self.idf.shape}, components {self.components.shape}")
        if self.centroids.shape[1] != self.components.shape[0]:
            raise ValueError(f"centroids {self.centroids.shape} do not match components {self.components.shape}")
        self._vectorizer = None

    @property
    def k(self) -> int:
        """Number of clusters."""
        return int(self.centroids.shape[0])

    # ------------------------------------------------------------------ embedding and distances

    def _counts(self, texts: Sequence[str]):
        """Sparse term counts [N, F] over the fixed vocabulary."""
        if self._vectorizer is None:
            from sklearn.feature_extraction.text import CountVectorizer

            self._vectorizer = CountVectorizer(vocabulary={t: i for i, t in enumerate(self.vocabulary)},
                                               lowercase=True, token_pattern=TOKEN_PATTERN, dtype=np.float64)
        return self._vectorizer.transform(list(texts))

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """The L2-normalised SVD embedding [N, D] of each text's tf-idf vector."""
        x = _tfidf_rows(self, texts)  # [N, F] sparse
        z = np.asarray(x @ self.components.T, dtype=np.float64)  # [N, D]
        zn = np.linalg.norm(z, axis=1, keepdims=True)
        return z / np.where(zn > 0, zn, 1.0)

    def distances(self, texts: Sequence[str]) -> np.ndarray:
        """Squared Euclidean distance of each text's embedding to each centroid: [N, k] float64."""
        if isinstance(texts, str):
            raise TypeError("distances() takes a list of texts, not one string")
        return _sq_dist(self.embed(texts), self.centroids)

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        """The nearest cluster of each text: [N] int64."""
        return np.argmin(self.distances(texts), axis=1).astype(np.int64)

    # ------------------------------------------------------------------ fitting

    @classmethod
    def fit(cls, texts: Sequence[str], k: int, svd_dim: int = 64, max_features: int = 20000, seed: int = 0,
            n_init: int = 4) -> Clusterer:
        """Fit tf-idf (``max_features`` terms, English stop words dropped), a truncated SVD to
        ``svd_dim`` dimensions (capped by the data), L2 normalisation and k-means with ``k`` clusters.
        Clusters are numbered by size, largest first; ties by centroid order. Deterministic for a seed."""
        from sklearn.cluster import KMeans
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import CountVectorizer

        texts = list(texts)
        if len(texts) < k:
            raise ValueError(f"cannot fit {k} clusters on {len(texts)} documents")
        counter = CountVectorizer(lowercase=True, token_pattern=TOKEN_PATTERN, stop_words="english",
                                  max_features=max_features, dtype=np.float64)
        try:
            counts = counter.fit_transform(texts)
        except ValueError as exc:  # "empty vocabulary"
            raise ValueError(f"no words to cluster by in {len(texts)} documents ({exc})") from None
        vocab = [t for t, _ in sorted(counter.vocabulary_.items(), key=lambda kv: kv[1])]
        n_docs = counts.shape[0]
        df = np.bincount(counts.tocsr().indices, minlength=len(vocab)).astype(np.float64)  # [F]
        idf = np.log((1.0 + n_docs) / (1.0 + df)) + 1.0  # smooth idf, as scikit-learn
        dim = max(1, min(svd_dim, len(vocab) - 1, n_docs - 1))
        settings = {"format": FORMAT, "token_pattern": TOKEN_PATTERN, "lowercase": True, "stop_words": "english",
                    "sublinear_tf": True, "smooth_idf": True, "norm": "l2", "max_features": max_features,
                    "svd_dim": svd_dim, "svd_dim_used": dim, "k": k, "seed": seed, "n_init": n_init,
                    "fit_documents": n_docs}
        # Fit the SVD on exactly the tf-idf rows embed() computes, through a provisional clusterer.
        provisional = cls(vocab, idf, np.zeros((dim, len(vocab))), np.zeros((1, dim)), settings)
        tfidf = _tfidf_rows(provisional, texts)
        if dim >= 1 and len(vocab) > 1:
            svd = TruncatedSVD(n_components=dim, algorithm="randomized", n_iter=7, random_state=seed)
            svd.fit(tfidf)
            components = svd.components_.astype(np.float64)
        else:
            components = np.ones((1, len(vocab)), dtype=np.float64)
        embedder = cls(vocab, idf, components, np.zeros((1, components.shape[0])), settings)
        z = embedder.embed(texts)  # [N, D]
        km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(z)
        centroids = km.cluster_centers_.astype(np.float64)
        labels = np.argmin(_sq_dist(z, centroids), axis=1)
        sizes = np.bincount(labels, minlength=k)
        order = np.lexsort((np.arange(k), -sizes))  # largest cluster first
        return cls(vocab, idf, components, centroids[order], settings, sizes=[int(s) for s in sizes[order]])

    # ------------------------------------------------------------------ saving and loading

    def save(self, out_dir: str | Path) -> Path:
        """Write ``clusterer.json`` and ``arrays.npz`` into ``out_dir`` (each to a temporary name, then renamed)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        from downscale._io import temp_file_for

        fd, tmp = temp_file_for(out_dir / ARRAYS_NAME, suffix=".tmp.npz")  # the umask's mode, not mkstemp's 0600
        os.close(fd)
        try:
            np.savez(tmp, idf=self.idf, components=self.components, centroids=self.centroids)
            os.replace(tmp, out_dir / ARRAYS_NAME)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        write_json_atomic(out_dir / JSON_NAME, {"settings": {**self.settings, "format": FORMAT}, "sizes": self.sizes,
                                                "k": self.k, "vocabulary": self.vocabulary})
        return out_dir

    @classmethod
    def load(cls, cluster_dir: str | Path) -> Clusterer:
        """Read a clusterer saved by ``save`` (no pickle)."""
        cluster_dir = Path(cluster_dir)
        meta_path, arrays_path = cluster_dir / JSON_NAME, cluster_dir / ARRAYS_NAME
        for path in (meta_path, arrays_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no saved clusterer here (written by the data stage with "
                                        f"data.shard_by: cluster)")
        with open(meta_path, encoding="utf-8") as fh:
            meta = json.load(fh)
        fmt = meta.get("settings", {}).get("format")
        if fmt != FORMAT:
            raise ValueError(f"{meta_path}: unknown clusterer format {fmt!r}; expected {FORMAT!r}")
        with np.load(arrays_path, allow_pickle=False) as arrays:
            return cls(meta["vocabulary"], arrays["idf"], arrays["components"], arrays["centroids"],
                       meta["settings"], sizes=meta.get("sizes"))


def _tfidf_rows(clusterer: Clusterer, texts: Sequence[str]):
    """The L2-normalised sublinear tf-idf rows [N, F] (sparse), as ``Clusterer.embed`` computes them."""
    x = clusterer._counts(texts).tocsr()  # [N, F] raw counts
    x.data = 1.0 + np.log(x.data)  # sublinear tf
    x = x.multiply(clusterer.idf[None, :]).tocsr()
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())  # [N]
    return x.multiply((1.0 / np.where(norms > 0, norms, 1.0))[:, None]).tocsr()


def _sq_dist(z: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """[N, k] squared Euclidean distances between rows of z [N, D] and centroids [k, D]."""
    diff = z[:, None, :] - centroids[None, :, :]  # [N, k, D]
    return np.einsum("nkd,nkd->nk", diff, diff)
