"""Mode ``sparse`` (downscale.sparse): routed once per sequence from its prefix, then only the chosen students run.

The equalities the mode promises: with top_k = n it is mode ``routed`` with ``router_prefix`` = the prefix; with
top_k = 1 every position after the prefix gets the chosen student's own log-probabilities; generation decodes
with the chosen student alone; what runs is counted."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from downscale.ensemble import EnsembleError, EnsembleModel
from tiny import tiny_model

V = 128
PRIOR = [0.5, 0.3, 0.2]
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)


def _students(n: int = 3):
    return [tiny_model(seed=10 + i, vocab_size=V) for i in range(n)]


def _ids(B: int = 4, T: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, V, (B, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _own_logprobs(students, ids) -> torch.Tensor:
    return torch.stack([torch.log_softmax(s(input_ids=ids).logits, -1) for s in students])  # [n, B, T, V]


def _chosen(logp: torch.Tensor, ids: torch.Tensor, prior: list[float], prefix: int, k: int = 1) -> torch.Tensor:
    """The Bayes decision, computed by hand: the k students of highest prior x likelihood of x_1 .. x_{P-1}."""
    lp = logp[:, :, :-1].gather(-1, ids[None, :, 1:, None].expand(len(prior), -1, -1, 1)).squeeze(-1)
    post = torch.tensor(prior).log()[:, None] + lp[:, :, :prefix - 1].sum(-1)  # [n, B]
    return post.topk(k, dim=0).indices  # [k, B]


@pytest.mark.parametrize("prefix", [1, 6, 30])
def test_top_k_n_equals_routed_frozen_after_the_prefix(prefix):
    students, ids = _students(), _ids()
    sparse = EnsembleModel(students, mode="sparse", prior=PRIOR, sparse_top_k=3, sparse_prefix=prefix)
    routed = EnsembleModel(students, mode="routed", prior=PRIOR, router_prefix=prefix)
    torch.testing.assert_close(sparse(ids).logits, routed(ids).logits, atol=2e-5, rtol=0)
    a, b = sparse.sum_nll(ids), routed.sum_nll(ids)
    assert a[1] == b[1] and a[0] == pytest.approx(b[0], rel=1e-5)
    assert sparse.sparse_stats.active_fraction() == [1.0, 1.0, 1.0]  # every student ran everywhere (twice counted)


def test_top_1_is_the_chosen_students_own_scores_after_the_prefix():
    students, ids, P = _students(), _ids(B=6, seed=3), 8
    ens = EnsembleModel(students, mode="sparse", prior=PRIOR, sparse_top_k=1, sparse_prefix=P)
    logp = _own_logprobs(students, ids)
    chosen = _chosen(logp, ids, PRIOR, P)[0]  # [B]
    out = ens(ids).logits
    for b in range(ids.shape[0]):
        torch.testing.assert_close(out[b, P - 1:], logp[chosen[b], b, P - 1:], atol=2e-5, rtol=0)
    # in the prefix: the causal posterior mixture of all students (mode routed there)
    routed = EnsembleModel(students, mode="routed", prior=PRIOR, router_prefix=P)
    torch.testing.assert_close(out[:, :P - 1], routed(ids).logits[:, :P - 1], atol=2e-5, rtol=0)
    # the loss agrees with the logits, and what ran is counted: every student on the prefix, the chosen one after it
    ens.sparse_stats.reset()
    total, count = ens.sum_nll(ids)
    ref = -torch.log_softmax(out[:, :-1], -1).gather(-1, ids[:, 1:, None]).sum()
    assert count == ids.shape[0] * (ids.shape[1] - 1) and total == pytest.approx(float(ref), rel=1e-5)
    st, (B, T) = ens.sparse_stats, ids.shape
    assert st.positions == B * T
    for i in range(3):
        assert st.student_positions[i] == B * (P - 1) + int((chosen == i).sum()) * (T - P + 1)
        assert st.sequences[i] == int((chosen == i).sum())
    sizes = [1.0, 1.0, 1.0]
    assert st.active(sizes) == pytest.approx((3 * (P - 1) + (T - P + 1)) / T)


def test_top_2_mixes_the_two_chosen_with_renormalised_weights():
    students, ids, P = _students(), _ids(B=3, seed=5), 5
    ens = EnsembleModel(students, mode="sparse", prior=PRIOR, sparse_top_k=2, sparse_prefix=P)
    logp = _own_logprobs(students, ids)
    lp = logp[:, :, :-1].gather(-1, ids[None, :, 1:, None].expand(3, -1, -1, 1)).squeeze(-1)
    post = torch.tensor(PRIOR).log()[:, None] + lp[:, :, :P - 1].sum(-1)
    out = ens(ids).logits
    for b in range(3):
        top = post[:, b].topk(2).indices
        w = torch.log_softmax(post[top, b], 0)
        want = torch.logsumexp(logp[top, b, P - 1:] + w[:, None, None], 0)
        torch.testing.assert_close(out[b, P - 1:], want, atol=2e-5, rtol=0)


def test_padded_batches_route_each_row_on_its_own_tokens():
    students = _students()
    ens = EnsembleModel(students, mode="sparse", prior=PRIOR, sparse_top_k=1, sparse_prefix=4)
    rows = [_ids(B=1, T=t, seed=t)[0] for t in (9, 14, 6)]
    W = 14
    right = torch.zeros(3, W, dtype=torch.long)
    left = torch.zeros(3, W, dtype=torch.long)
    mr, ml = torch.zeros(3, W, dtype=torch.long), torch.zeros(3, W, dtype=torch.long)
    for b, r in enumerate(rows):
        right[b, :len(r)], mr[b, :len(r)] = r, 1
        left[b, W - len(r):], ml[b, W - len(r):] = r, 1
    out_r, out_l = ens(right, attention_mask=mr).logits, ens(left, attention_mask=ml).logits
    for b, r in enumerate(rows):
        alone = ens(r[None]).logits[0]
        torch.testing.assert_close(out_r[b, :len(r)], alone, atol=1e-5, rtol=0)
        torch.testing.assert_close(out_l[b, W - len(r):], alone, atol=1e-5, rtol=0)
    # logits_to_keep keeps the last positions, as in the other modes
    torch.testing.assert_close(ens(right, attention_mask=mr, logits_to_keep=3).logits, out_r[:, -3:])


def test_greedy_generation_decodes_with_the_chosen_student_alone():
    students = _students()
    prompt = _ids(B=3, T=7, seed=11)
    ens = EnsembleModel(students, mode="sparse", prior=PRIOR, sparse_top_k=1, sparse_prefix=4)
    logp = _own_logprobs(students, prompt)
    chosen = _chosen(logp, prompt, PRIOR, prefix=prompt.shape[1])[0]  # generation routes on the whole prompt
    ens.sparse_stats.reset()
    out = ens.generate(prompt, max_new_tokens=8, eos_token_id=None)
    for b in range(3):
        s = students[int(chosen[b])]
        want = s.generate(prompt[b:b + 1], max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0,
                          min_new_tokens=8)
        assert torch.equal(out[b], want[0]), (b, out[b], want[0])
    st = ens.sparse_stats  # the prompt by all three (the Bayes decision), then 7 decode steps by one student per row
    assert st.positions == 3 * 7 + 3 * 7
    assert sum(st.student_positions) == 3 * (3 * 7) + 3 * 7


def test_generation_with_top_k_n_equals_routed_frozen_at_the_prompt():
    students = _students()
    prompt = _ids(B=2, T=6, seed=12)
    sparse = EnsembleModel(students, mode="sparse", prior=PRIOR, sparse_top_k=3)
    routed = EnsembleModel(students, mode="routed", prior=PRIOR, router_prefix=prompt.shape[1])
    assert torch.equal(sparse.generate(prompt, max_new_tokens=6, eos_token_id=None),
                       routed.generate(prompt, max_new_tokens=6, eos_token_id=None))


def test_left_padded_generation_equals_each_prompt_alone():
    students = _students()
    ens = EnsembleModel(students, mode="sparse", prior=PRIOR, sparse_top_k=1)
    a, b = _ids(B=1, T=8, seed=20)[0], _ids(B=1, T=5, seed=21)[0]
    ids = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.zeros(2, 8, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, 3:], mask[1, 3:] = b, 1
    out = ens.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=None)
    assert torch.equal(out[0, 8:], ens.generate(a[None], max_new_tokens=5, eos_token_id=None)[0, 8:])
    assert torch.equal(out[1, 8:], ens.generate(b[None], max_new_tokens=5, eos_token_id=None)[0, 5:])


@pytest.mark.parametrize("top_k", [1, 2])
def test_fast_path_generation_equals_the_students_one_by_one(top_k):
    """Sparse generation on the stacked fast path (the prompt read stacked, each chosen student decoding as a stack
    of one) gives the tokens and the counts of the students' own forwards, left-padded rows included."""
    students = _students()
    ids, mask = _ids(B=3, T=9, seed=30), torch.ones(3, 9, dtype=torch.long)
    ids[1, :4], mask[1, :4] = 0, 0
    out, counts = {}, {}
    for fast in (True, False):
        ens = EnsembleModel(students, mode="sparse", prior=PRIOR, sparse_top_k=top_k, fast=fast)
        assert ens.uses_fast_path == fast
        out[fast] = ens.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None)
        counts[fast] = ens.sparse_stats.as_dict()
    assert torch.equal(out[True], out[False])
    assert counts[True] == counts[False]
    assert sorted(counts[True]["sequences_routed"]) != [0, 0, 0] and sum(counts[True]["sequences_routed"]) == 3 * top_k


def test_selected_student_is_kept_and_follows_changes_of_its_head():
    """The stack of one that sparse decoding selects is made once per student (its head copy is 90 MB at SmolLM2's
    size), and made again when the head changed in place: generation then equals the one-by-one path again."""
    students = _students()
    ens = EnsembleModel(students, mode="sparse", prior=PRIOR, sparse_top_k=1)
    stack = ens._stacked()
    first = stack.select(1)
    assert stack.select(1) is first and stack.select(0) is not first
    ids = _ids(B=2, T=9, seed=31)
    before = ens.generate(ids, max_new_tokens=5, eos_token_id=None)
    assert stack.select(1) is first  # generation reuses it
    with torch.no_grad():
        students[1].lm_head.weight.mul_(1.5)  # tied: the embedding too, through the stack's storage
    again = stack.select(1)
    assert again is not first and torch.equal(again.head_vnd[:, 0], students[1].lm_head.weight)
    after = ens.generate(ids, max_new_tokens=5, eos_token_id=None)
    ens.fast = False
    assert torch.equal(after, ens.generate(ids, max_new_tokens=5, eos_token_id=None))
    assert before.shape == after.shape


class _WordTokenizer:
    """decode() gives one word per id, enough for the cluster router."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{i}" for i in ids)


class _IdClusterer:
    """Distance to cluster i falls with the number of ids equal to i mod 3 in the text."""

    def __init__(self):
        self.texts: list[str] = []

    def distances(self, texts: list[str]) -> np.ndarray:
        self.texts += texts
        return np.array([[10.0 / (1 + sum(int(w[1:]) % 3 == i for w in t.split())) for i in range(3)]
                         for t in texts])


def test_cluster_router_sparse_equals_routed_and_decides_without_a_student():
    students, ids = _students(), _ids(B=3, T=20, seed=7)
    kw = dict(router="cluster", tokenizer=_WordTokenizer())
    sparse = EnsembleModel(students, mode="sparse", clusterer=_IdClusterer(), sparse_top_k=3, sparse_prefix=6, **kw)
    routed = EnsembleModel(students, mode="routed", clusterer=_IdClusterer(), router_prefix=6, **kw)
    torch.testing.assert_close(sparse(ids).logits, routed(ids).logits, atol=2e-5, rtol=0)
    # top-1: the cluster of the first 6 tokens' text decides; after it, that student's own scores
    one = EnsembleModel(students, mode="sparse", clusterer=_IdClusterer(), sparse_top_k=1, sparse_prefix=6, **kw)
    logp = _own_logprobs(students, ids)
    out = one(ids).logits
    for b in range(3):
        counts = [sum(int(x) % 3 == i for x in ids[b, :6].tolist()) for i in range(3)]
        c = int(np.argmin([10.0 / (1 + n) for n in counts]))
        torch.testing.assert_close(out[b, 5:], logp[c, b, 5:], atol=2e-5, rtol=0)
    # generation: the prompt's text decides, so only the chosen student reads the prompt
    one.sparse_stats.reset()
    prompt = ids[:, :5]
    gen = one.generate(prompt, max_new_tokens=4, eos_token_id=None)
    assert sum(one.sparse_stats.student_positions) == 3 * 5 + 3 * 3
    for b in range(3):
        counts = [sum(int(x) % 3 == i for x in prompt[b].tolist()) for i in range(3)]
        c = int(np.argmin([10.0 / (1 + n) for n in counts]))
        want = students[c].generate(prompt[b:b + 1], max_new_tokens=4, do_sample=False, eos_token_id=None,
                                    pad_token_id=0, min_new_tokens=4)
        assert torch.equal(gen[b], want[0])


@pytest.mark.parametrize("columns, limit", [(9, None), (9, 4), (10, None), (3, 7), (1, None)])
def test_causal_evidence_sums_the_tokens_seen_up_to_the_limit(columns, limit):
    from downscale.routing import causal_evidence

    lp = torch.randn(3, 2, 9, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    got = causal_evidence(lp, columns, limit)
    for t in range(columns):
        upto = min(t, 9 if limit is None else limit)  # lp[..., s] scores x_{s+1}: seen at t when s < t
        torch.testing.assert_close(got[..., t], lp[..., :upto].sum(-1))


def test_bad_sparse_settings_are_one_line_errors():
    students = _students(2)
    with pytest.raises(EnsembleError, match="sparse_top_k: expected 1 to 2"):
        EnsembleModel(students, mode="sparse", sparse_top_k=3)
    with pytest.raises(EnsembleError, match="sparse_prefix"):
        EnsembleModel(students, mode="sparse", sparse_prefix=0)
    with pytest.raises(EnsembleError, match="router 'cluster' needs the clusterer"):
        EnsembleModel(students, mode="sparse", router="cluster")
    ens = EnsembleModel(students, mode="sparse")
    with pytest.raises(EnsembleError, match="generate"):
        ens(_ids(), use_cache=True)
