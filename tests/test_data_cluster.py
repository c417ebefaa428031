"""The c-BTM clusterer: topic recovery, exact save/load, no pickle."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from downscale.data.cluster import Clusterer
from tiny import domain_text


def _two_topics(n: int = 60) -> tuple[list[str], np.ndarray]:
    code = domain_text("code", n, words_per_doc=40, seed=1)
    legal = domain_text("legal", n, words_per_doc=40, seed=2)
    texts = [t for pair in zip(code, legal, strict=True) for t in pair]  # interleaved
    truth = np.array([0, 1] * n)
    return texts, truth


def _purity(labels: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(np.bincount(truth[labels == c]).max() for c in np.unique(labels))
    return hits / len(truth)


def test_recovers_two_topics():
    texts, truth = _two_topics()
    c = Clusterer.fit(texts, k=2, svd_dim=8, max_features=500, seed=0)
    labels = c.predict(texts)
    assert _purity(labels, truth) >= 0.95
    assert sorted(c.sizes) == sorted(np.bincount(labels, minlength=2).tolist())
    # New text of one topic goes to the cluster holding that topic.
    new = domain_text("legal", 5, words_per_doc=30, seed=99)
    legal_cluster = np.bincount(labels[truth == 1]).argmax()
    assert (c.predict(new) == legal_cluster).all()


def test_loaded_equals_fitted(tmp_path):
    texts, _ = _two_topics(30)
    c = Clusterer.fit(texts, k=3, svd_dim=6, max_features=300, seed=3)
    c.save(tmp_path / "cluster")
    assert sorted(p.name for p in (tmp_path / "cluster").iterdir()) == ["arrays.npz", "clusterer.json"]
    loaded = Clusterer.load(tmp_path / "cluster")
    probe = texts[:7] + ["", "completely unseen words zzz", "License shall warranty déjà vu"]
    d_fit, d_load = c.distances(probe), loaded.distances(probe)
    assert d_fit.shape == (len(probe), 3) and d_fit.dtype == np.float64
    assert np.array_equal(d_fit, d_load)
    assert np.array_equal(c.predict(probe), loaded.predict(probe))
    assert np.array_equal(c.predict(probe), d_fit.argmin(axis=1))
    # Squared distances of unit vectors to centroids: non-negative and bounded.
    assert (d_fit >= 0).all() and (d_fit <= 4 + 1e-9).all()
    # Saved without pickle: the npz holds plain arrays, the JSON the vocabulary in column order.
    with zipfile.ZipFile(tmp_path / "cluster" / "arrays.npz") as zf:
        assert sorted(zf.namelist()) == ["centroids.npy", "components.npy", "idf.npy"]
    meta = json.loads((tmp_path / "cluster" / "clusterer.json").read_text())
    assert meta["vocabulary"] == c.vocabulary and meta["k"] == 3


def test_fit_is_deterministic():
    texts, _ = _two_topics(20)
    a = Clusterer.fit(texts, k=2, svd_dim=4, max_features=200, seed=5)
    b = Clusterer.fit(texts, k=2, svd_dim=4, max_features=200, seed=5)
    assert np.array_equal(a.centroids, b.centroids) and a.vocabulary == b.vocabulary


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot fit 5 clusters on 2 documents"):
        Clusterer.fit(["a b c", "d e f"], k=5)
    with pytest.raises(FileNotFoundError, match="no saved clusterer"):
        Clusterer.load(tmp_path)
    c = Clusterer.fit(_two_topics(10)[0], k=2, svd_dim=3, max_features=100)
    with pytest.raises(TypeError):
        c.distances("one string")


def test_combine_router_loads_the_saved_clusterer(tmp_path):
    """The combine stage's c-BTM router reads the folder the data stage writes and routes by it."""
    from downscale.routing import ClusterRouter, load_clusterer

    texts, truth = _two_topics(30)
    fitted = Clusterer.fit(texts, k=2, svd_dim=6, max_features=300, seed=0)
    fitted.save(tmp_path / "cluster")
    loaded = load_clusterer(tmp_path / "cluster")
    words = sorted({w for t in texts for w in t.split()})
    router = ClusterRouter(loaded, decode=lambda ids: " ".join(words[i] for i in ids), n=2)
    prefixes = [tuple(words.index(w) for w in t.split()[:12]) for t in texts[:10]]
    d = router.distances(prefixes)
    assert d.shape == (10, 2)
    assert np.array_equal(d.argmin(axis=1), fitted.predict([" ".join(t.split()[:12]) for t in texts[:10]]))
    assert _purity(d.argmin(axis=1), truth[:10]) >= 0.9
