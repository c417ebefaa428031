"""Routers of the ensemble: which students speak for which prefix.

Two routers give each position t of a sequence a weight per student, w_i(t), that sums to 1 over
the students; the routed prediction is the mixture  sum_i w_i(t) p_i(. | x_<=t).

- ``bayes``: Bayesian model averaging with a causal posterior. With evidence
  E_i(t) = sum_{s=1..t} log p_i(x_s | x_<s) (only tokens already seen; the first token has no
  prediction and adds nothing),  log w_i(t) = log prior_i + E_i(t) / temperature, normalised.
  temperature 1 is exact BMA; above 1 the posterior is flatter. With ``prefix`` P the evidence
  stops growing after the first P tokens (x_0..x_{P-1}): per-sequence routing frozen after a prefix.
- ``cluster``: c-BTM. The decoded text of the prefix seen so far (at most P tokens) is embedded
  by the data stage's clusterer; log w_i(t) = -distance_i / temperature, normalised (softmax of
  minus the squared Euclidean distance to centroid i). Before the prefix is complete the weights
  come from the text seen so far (from the first token on): no position waits, and every weight
  is causal.

Both take an optional top-k: only the k largest weights at each position are kept, renormalised.

The prior of the Bayes router is estimated by ``em_prior`` on validation blocks (see there).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROUTERS = ("bayes", "cluster")


def normalise_log_weights(scores: torch.Tensor, top_k: int | None = None) -> torch.Tensor:
    """Log-normalise ``scores`` [n, ...] over the students (dim 0), keeping only the ``top_k`` largest
    at each position (the others get log weight -inf). Ties keep the lower student index."""
    n = scores.shape[0]
    if top_k is not None and top_k < n:
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep.scatter_(0, scores.topk(top_k, dim=0).indices, True)
        scores = scores.masked_fill(~keep, float("-inf"))
    return scores - torch.logsumexp(scores, dim=0, keepdim=True)


def bayes_log_weights(evidence: torch.Tensor, log_prior: torch.Tensor, temperature: float = 1.0,
                      top_k: int | None = None) -> torch.Tensor:
    """Posterior log weights [n, ...] from summed log-likelihoods ``evidence`` [n, ...] and ``log_prior`` [n]."""
    shape = (-1,) + (1,) * (evidence.dim() - 1)
    return normalise_log_weights(log_prior.view(shape).to(evidence) + evidence / temperature, top_k)


def causal_evidence(lp: torch.Tensor, columns: int, limit: int | None = None) -> torch.Tensor:
    """Bayes evidence [n, B, columns] (float64) at each predicting position t from ``lp`` [n, B, m], each student's
    log-probability of the next token (``lp[..., s] = log p_i(x_{s+1} | x_<=s)``): the sum over s < min(t, limit)
    (the tokens x_1 .. x_min(t, limit) already seen; ``limit`` = router prefix - 1, None: no limit)."""
    n, B, m = lp.shape
    k = max(0, min(m, columns - 1, m if limit is None else limit))
    ev = torch.zeros(n, B, columns, dtype=torch.float64, device=lp.device)
    if k:
        cum = lp[..., :k].double().cumsum(-1)
        ev[..., 1:k + 1] = cum
        ev[..., k + 1:] = cum[..., -1:]
    return ev


def mixture(logp: torch.Tensor, log_w: torch.Tensor) -> torch.Tensor:
    """log sum_i w_i p_i: ``logp`` [n, ..., V] per-student log-probabilities, ``log_w`` [n, ...] -> [..., V]."""
    return torch.logsumexp(logp + log_w[..., None], dim=0)


def mixture_from_logits(z: torch.Tensor, log_w: torch.Tensor | None = None,
                        lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The mixture log sum_i w_i softmax(z_i) from raw logits, and each student's log-normaliser.

    ``z`` [n, ..., V] fp32 logits; ``log_w`` [n, ...] log weights (None: uniform 1/n); ``lse``
    [n, ...] the students' logsumexp over the vocabulary when already computed. Returns
    (log-probs [..., V], lse [n, ...]). Computed as m + log sum_i exp(z_i - lse_i + log w_i - m) with
    one shift m per position (the largest log-prob of any student), i.e. a few simple passes over the
    n logit tensors instead of log_softmax + an element-wise logsumexp over students. Positions
    whose sum falls below 1e-30 (a token < ~69 nats below the top under every student: fp32 would
    lose precision) are recomputed exactly with logsumexp.
    """
    n = z.shape[0]
    if lse is None:
        lse = torch.logsumexp(z, dim=-1)  # [n, ...]
    a = (log_w if log_w is not None else torch.full_like(lse, -math.log(n))) - lse  # [n, ...]
    m = (z.amax(dim=-1) + a).amax(dim=0)  # [...]
    shift = (a - m)[..., None]
    t = torch.add(z, shift).exp_()  # [n, ..., V]
    s = t.sum(dim=0)  # [..., V]
    del t
    out = s.log().add_(m[..., None])
    bad = (s < 1e-30).any(dim=-1)  # [...]
    if bool(bad.any()):
        out[bad] = torch.logsumexp(z[:, bad] + a[:, bad][..., None], dim=0)
    return out, lse


def em_prior(seq_loglik: np.ndarray, smoothing: float = 1.0, max_iter: int = 500,
             tol: float = 1e-10) -> tuple[np.ndarray, dict]:
    """Maximum-a-posteriori mixture weights of a sequence-level mixture, by EM.

    ``seq_loglik`` [n, M]: log p_i(block_m), each student's summed log-likelihood of each validation
    block. The model is the one the Bayes router assumes: a block comes from one student's
    distribution, chosen with probability prior_i. EM alternates responsibilities
    r_im ∝ prior_i p_i(block_m) and prior_i = (sum_m r_im + smoothing) / (M + n * smoothing);
    ``smoothing`` is a symmetric Dirichlet pseudo-count that keeps every student's prior above zero
    (a zero prior would silence a student for ever). Returns (prior [n], info).
    """
    seq_loglik = np.asarray(seq_loglik, dtype=np.float64)
    n, m = seq_loglik.shape
    prior = np.full(n, 1.0 / n)
    if m == 0:
        return prior, {"iterations": 0, "blocks": 0, "log_likelihood": None}
    prev, ll, iterations = -np.inf, -np.inf, 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 (reported after the loop)
        joint = np.log(prior)[:, None] + seq_loglik  # [n, M]
        norm = np.logaddexp.reduce(joint, axis=0)  # [M]
        resp = np.exp(joint - norm)
        ll = float(norm.sum())
        prior = (resp.sum(1) + smoothing) / (m + n * smoothing)
        if abs(ll - prev) <= tol * max(1.0, abs(ll)):
            break
        prev = ll
    wins = np.bincount(seq_loglik.argmax(0), minlength=n)
    return prior, {"iterations": iterations, "blocks": m, "log_likelihood": ll, "argmax_counts": wins.tolist()}


def load_clusterer(cluster_dir: str | Path) -> Any:
    """The data stage's clusterer saved in ``cluster_dir`` (cluster i <-> shard i <-> student i)."""
    from downscale.data.cluster import Clusterer

    return Clusterer.load(Path(cluster_dir))


class ClusterRouter:
    """c-BTM routing through the data stage's clusterer (``downscale.data.cluster.Clusterer``, or any
    object with ``distances(texts) -> np.ndarray [N, n]``; see ``load_clusterer``).

    ``log_weights(ids, mask, positions)`` decodes, for every position t, the real tokens whose
    position id is at most min(t, prefix - 1), asks the clusterer for squared distances to the
    centroids, and returns log softmax(-d / temperature) (top-k) as [n, B, q]. Distances of a text
    already seen are cached.
    """

    def __init__(self, clusterer: Any, decode: Callable[[list[int]], str], n: int,
                 prefix: int | None = None, temperature: float = 1.0, top_k: int | None = None):
        self.clusterer = clusterer
        self.decode, self.n, self.prefix = decode, n, prefix
        self.temperature, self.top_k = temperature, top_k
        self._cache: dict[tuple[int, ...], np.ndarray] = {}

    def distances(self, prefixes: list[tuple[int, ...]]) -> np.ndarray:
        """Squared distances [len(prefixes), n] of the decoded token prefixes."""
        todo = sorted({p for p in prefixes if p not in self._cache})
        if todo:
            d = np.asarray(self.clusterer.distances([self.decode(list(p)) for p in todo]), dtype=np.float64)
            if d.ndim != 2 or d.shape[1] != self.n:
                raise ValueError(f"the clusterer gave distances of shape {d.shape}; expected [N, {self.n}] "
                                 f"(cluster i <-> student i)")
            for p, row in zip(todo, d, strict=True):
                self._cache[p] = row
            if len(self._cache) > 100_000:  # bound the memory of long evaluations
                self._cache.clear()
                for p, row in zip(todo, d, strict=True):
                    self._cache[p] = row
        return np.stack([self._cache[p] for p in prefixes]) if prefixes else np.zeros((0, self.n))

    def log_weights(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, start: int) -> torch.Tensor:
        """Log weights [n, B, q] for the last ``q = ids.shape[1] - start`` positions of ``ids`` [B, S]
        (the whole sequence so far), ``mask`` [B, S] (1 = real token), ``positions`` [B, S] position ids."""
        B, S = ids.shape
        limit = math.inf if self.prefix is None else self.prefix - 1
        ids_l, mask_l, pos_l = ids.tolist(), mask.tolist(), positions.tolist()
        keys: list[tuple[int, ...]] = []
        for b in range(B):
            real = [(tok, p) for tok, m, p in zip(ids_l[b], mask_l[b], pos_l[b], strict=True) if m]
            for t in range(start, S):
                upto = min(pos_l[b][t], limit)
                keys.append(tuple(tok for tok, p in real if p <= upto))
        d = torch.as_tensor(self.distances(keys), dtype=torch.float32).view(B, S - start, self.n)
        scores = (-d / self.temperature).permute(2, 0, 1)  # [n, B, q]
        return normalise_log_weights(scores, self.top_k).to(ids.device)
