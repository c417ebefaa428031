"""EnsembleModel maths against plain references; fast path against the sequential path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from downscale.ensemble import EnsembleError, EnsembleModel
from downscale.routing import em_prior
from tiny import tiny_model

V = 128
MODES = ("logit_mean", "prob_mean", "routed", "weighted")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)


def _students(arch: str = "llama", n: int = 3, **kw):
    return [tiny_model(arch, seed=10 + i, vocab_size=V, **kw) for i in range(n)]


def _ids(B: int = 3, T: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _ens(students, mode, **kw):
    n = len(students)
    w = kw.pop("weights", [float(x) for x in np.linspace(1, 2, n) / np.linspace(1, 2, n).sum()])
    return EnsembleModel(students, mode=mode, weights=w, prior=kw.pop("prior", None), **kw)


@torch.no_grad()
def _student_logits(students, ids):
    return torch.stack([s(input_ids=ids).logits for s in students])  # [n, B, T, V]


@pytest.mark.parametrize("fast", [True, False])
def test_logit_mean_and_prob_mean_equal_hand_computed(fast):
    students = _students()
    ids = _ids()
    z = _student_logits(students, ids)
    ens = _ens(students, "logit_mean", fast=fast)
    assert ens.uses_fast_path == fast
    torch.testing.assert_close(ens(ids).logits, z.mean(0), atol=1e-5, rtol=0)
    ens.mode = "prob_mean"
    torch.testing.assert_close(ens(ids).logits, torch.log(torch.softmax(z, -1).mean(0)), atol=1e-5, rtol=0)
    ens.mode = "weighted"
    w = torch.tensor(ens.weights)[:, None, None, None]
    torch.testing.assert_close(ens(ids).logits, torch.log((torch.softmax(z, -1) * w).sum(0)), atol=1e-5, rtol=0)


def test_loss_is_hf_shifted_nll_of_the_combination():
    students = _students(n=2)
    ids = _ids()
    labels = ids.clone()
    labels[0, 5:9] = -100
    ens = _ens(students, "prob_mean")
    out = ens(ids, labels=labels)
    logp = torch.log_softmax(out.logits, -1)[:, :-1]
    tgt = labels[:, 1:]
    keep = tgt != -100
    manual = -logp.gather(-1, tgt.clamp(min=0)[..., None]).squeeze(-1)[keep].mean()
    assert out.loss is not None and abs(float(out.loss) - float(manual)) < 1e-5


@pytest.mark.parametrize("mode", MODES)
def test_one_student_ensemble_is_that_student(mode):
    (student,) = _students(n=1)
    ids = _ids()
    ref = student(input_ids=ids).logits
    ens = EnsembleModel([student], mode=mode, weights=[1.0], prior=[1.0])
    got = ens(ids).logits
    if mode == "logit_mean":
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.log_softmax(got, -1), torch.log_softmax(ref, -1), atol=1e-5, rtol=0)
    gen = ens.generate(ids[:, :4], max_new_tokens=6)
    hf = student.generate(ids[:, :4], max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(gen, hf)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("mode", MODES)
def test_fast_path_equals_sequential(arch, mode, monkeypatch):
    import downscale.fastpath as fastpath

    if mode == "prob_mean":  # the fast path's MLP over several row blocks (16 rows each), as on a CPU at scale
        monkeypatch.setattr(fastpath, "CPU_BLOCK_BYTES", 1)
    if mode in ("routed", "weighted"):  # masked GQA with the KV heads repeated before SDPA, as on CUDA
        monkeypatch.setattr(fastpath, "EXPAND_KV_FOR_MASK_ON", ("cpu",))
    calls: list[int] = []
    real_rep = torch.Tensor.repeat_interleave
    monkeypatch.setattr(torch.Tensor, "repeat_interleave", lambda t, *a, **k: calls.append(1) or real_rep(t, *a, **k))
    students = _students(arch, n=3, hidden=32, heads=4, kv_heads=2)
    ids = _ids(B=3, T=20)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    mask[2, :2] = 0
    # small chunks: the combination runs over several position chunks
    ens = _ens(students, mode, prior=[0.2, 0.5, 0.3], chunk_bytes=4 * 3 * 3 * V * 6, router_prefix=9)
    assert ens.uses_fast_path, ens.fallback_reason
    fast = ens(ids).logits
    assert calls == []  # no mask: SDPA's own GQA
    fast_pad = ens(ids, attention_mask=mask).logits
    assert bool(calls) == (mode in ("routed", "weighted"))  # K and V repeated in each layer where asked
    ens.fast = False
    slow = ens(ids).logits
    slow_pad = ens(ids, attention_mask=mask).logits
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast_pad[mask.bool()], slow_pad[mask.bool()], atol=1e-5, rtol=0)


def test_different_shapes_fall_back_to_sequential():
    students = [tiny_model("llama", seed=1, vocab_size=V, intermediate=64),
                tiny_model("llama", seed=2, vocab_size=V, intermediate=48),
                tiny_model("qwen2", seed=3, vocab_size=V)]
    ens = EnsembleModel(students, mode="logit_mean")
    assert not ens.uses_fast_path and "student 1" in ens.fallback_reason
    ids = _ids()
    torch.testing.assert_close(ens(ids).logits, _student_logits(students, ids).mean(0), atol=1e-5, rtol=0)
    ens.mode = "prob_mean"
    g1 = ens.generate(ids[:, :3], max_new_tokens=5)
    g2 = ens.generate(ids[:, :3], max_new_tokens=5, use_cache=False)
    assert torch.equal(g1, g2)


def test_left_padding_scores_like_no_padding():
    students = _students(n=2)
    ids = _ids(B=1, T=12)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones_like(ids)], dim=1)
    for mode in ("logit_mean", "routed"):
        for fast in (True, False):
            ens = _ens(students, mode, fast=fast)
            a = ens(ids).logits
            b = ens(padded, attention_mask=mask).logits[:, 4:]
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_greedy_generate_with_cache_equals_without(mode, fast):
    students = _students(n=3)
    ens = _ens(students, mode, prior=[0.3, 0.3, 0.4], fast=fast, router_top_k=2)
    prompt = _ids(B=2, T=5, seed=3)
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0
    cached = ens.generate(prompt, max_new_tokens=10, attention_mask=mask)
    uncached = ens.generate(prompt, max_new_tokens=10, attention_mask=mask, use_cache=False)
    assert cached.shape == (2, 15)
    assert torch.equal(cached, uncached)


def test_sampling_is_seeded_and_respects_top_k():
    students = _students(n=2)
    ens = _ens(students, "prob_mean")
    prompt = _ids(B=2, T=4)
    a = ens.generate(prompt, max_new_tokens=8, do_sample=True, top_k=5, generator=torch.Generator().manual_seed(1))
    b = ens.generate(prompt, max_new_tokens=8, do_sample=True, top_k=5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    c = ens.generate(prompt, max_new_tokens=1, do_sample=True, top_k=1, generator=torch.Generator().manual_seed(2))
    assert torch.equal(c, ens.generate(prompt, max_new_tokens=1))  # top-1 sampling is greedy


def test_bayes_weights_are_the_causal_posterior():
    students = _students(n=3)
    ids = _ids(B=2, T=16)
    prior = [0.5, 0.3, 0.2]
    ens = _ens(students, "routed", prior=prior)
    w = ens.router_weights(ids)  # [n, B, T]
    logp = torch.log_softmax(_student_logits(students, ids), -1)
    tok = logp[:, :, :-1].gather(-1, ids[None, :, 1:, None].expand(3, -1, -1, 1)).squeeze(-1)  # [n, B, T-1]
    evidence = torch.cat([torch.zeros(3, 2, 1), tok.cumsum(-1)], dim=-1).double()
    post = torch.softmax(torch.tensor(prior).log()[:, None, None].double() + evidence, dim=0)
    torch.testing.assert_close(w.double(), post, atol=1e-5, rtol=0)
    mix = torch.logsumexp(logp + post.float().log()[..., None], dim=0)
    torch.testing.assert_close(ens(ids).logits, mix, atol=1e-5, rtol=0)


def test_router_prefix_freezes_and_top_k_keeps_k():
    students = _students(n=3)
    ids = _ids(B=2, T=16)
    ens = _ens(students, "routed", router_prefix=5, router_top_k=2)
    w = ens.router_weights(ids)
    for t in range(5, 16):
        torch.testing.assert_close(w[:, :, t], w[:, :, 4])
    assert not torch.allclose(w[:, :, 4], w[:, :, 1])
    assert int((w > 0).sum(0).max()) <= 2
    torch.testing.assert_close(w.sum(0), torch.ones(2, 16))


class KeywordClusterer:
    """A stand-in for the data stage's clusterer: distance to cluster i falls with the count of its keyword."""

    def __init__(self, keywords: list[str]):
        self.keywords = keywords
        self.calls = 0

    def distances(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        return np.array([[10.0 / (1 + t.count(k)) for k in self.keywords] for t in texts])


def test_cluster_router_uses_prefix_text(tmp_path):
    from transformers import AutoTokenizer

    from tiny import make_tokenizer

    texts = ["license warranty software", "def return import class", "river bridge boats"] * 5
    tok = AutoTokenizer.from_pretrained(make_tokenizer(tmp_path / "tok", texts, vocab_size=300))
    students = [tiny_model(seed=i, vocab_size=len(tok)) for i in range(2)]
    clusterer = KeywordClusterer(["def", "license"])
    ens = EnsembleModel(students, mode="routed", router="cluster", clusterer=clusterer, tokenizer=tok,
                        router_temperature=1.0)
    ids = torch.tensor([tok("def return def import license def")["input_ids"]])
    w = ens.router_weights(ids)  # [2, 1, T]
    for t in range(ids.shape[1]):
        text = tok.decode(ids[0, :t + 1].tolist())
        d = torch.tensor([10.0 / (1 + text.count(k)) for k in ["def", "license"]])
        torch.testing.assert_close(w[:, 0, t], torch.softmax(-d, 0))
    assert w[0, 0, -1] > 0.9
    logp = torch.log_softmax(_student_logits(students, ids), -1)
    torch.testing.assert_close(ens(ids).logits, torch.logsumexp(logp + w.log()[..., None], 0), atol=1e-5, rtol=0)
    ens.fast = False
    torch.testing.assert_close(ens(ids).logits, torch.logsumexp(logp + w.log()[..., None], 0), atol=1e-5, rtol=0)
    prompt = ids[:, :3]
    assert torch.equal(ens.generate(prompt, max_new_tokens=6), ens.generate(prompt, max_new_tokens=6, use_cache=False))


def test_em_prior_recovers_mixture_weights():
    rng = np.random.default_rng(0)
    # 300 blocks: 3/4 clearly from student 0, 1/4 from student 1 (20 nats apart).
    src = rng.random(300) < 0.75
    ll = np.where(src, [[-100.0], [-120.0]], [[-120.0], [-100.0]])
    prior, info = em_prior(ll, smoothing=0.0)
    assert abs(prior[0] - src.mean()) < 1e-6 and info["argmax_counts"][0] == int(src.sum())
    smooth, _ = em_prior(ll[:, :2] * 0 + np.array([[-1.0], [-50.0]]), smoothing=1.0)
    assert smooth.min() > 0 and abs(smooth.sum() - 1) < 1e-12


def test_bad_inputs_raise_one_line():
    students = _students(n=2)
    with pytest.raises(EnsembleError, match="unknown mode"):
        EnsembleModel(students, mode="median")
    with pytest.raises(EnsembleError, match="sum to 1"):
        EnsembleModel(students, mode="weighted", weights=[0.5, 0.6])
    with pytest.raises(EnsembleError, match="non-negative"):
        EnsembleModel(students, mode="weighted", weights=[1.5, -0.5])
    with pytest.raises(EnsembleError, match="expected 2 weights"):
        EnsembleModel(students, mode="weighted", weights=[1.0])
    with pytest.raises(EnsembleError, match="needs weights"):
        EnsembleModel(students, mode="weighted")
    with pytest.raises(EnsembleError, match="vocabulary"):
        EnsembleModel([students[0], tiny_model(vocab_size=V + 8)])


def test_bf16_autocast_runs_close_to_fp32():
    students = _students(n=2)
    ids = _ids()
    ens = _ens(students, "prob_mean")
    ref = ens(ids).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ens(ids).logits
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert float((got - ref).abs().max()) < 0.1
    assert math.isfinite(float(ens(ids, labels=ids).loss))


def _domain_blocks(tok, texts: list[str], T: int = 32) -> np.ndarray:
    ids: list[int] = []
    for t in texts:
        ids += tok(t)["input_ids"] + [tok.eos_token_id]
    n = len(ids) // T
    return np.asarray(ids[: n * T], dtype=np.int64).reshape(n, T)


def test_bayes_routing_finds_the_right_specialist(tmp_path):
    from transformers import AutoTokenizer

    from tiny import domain_text, make_tokenizer, train_briefly

    domains = ("code", "legal")
    texts = {d: domain_text(d, n_docs=30, seed=i) for i, d in enumerate(domains)}
    tok = AutoTokenizer.from_pretrained(make_tokenizer(tmp_path / "tok", [t for v in texts.values() for t in v]))
    train = {d: _domain_blocks(tok, texts[d][:24]) for d in domains}
    test = {d: torch.as_tensor(_domain_blocks(tok, texts[d][24:])) for d in domains}
    students = [train_briefly(tiny_model(seed=i, vocab_size=len(tok)), train[d], steps=40, seed=i)
                for i, d in enumerate(domains)]
    ens = EnsembleModel(students, mode="routed", prior=[0.5, 0.5])
    for i, d in enumerate(domains):
        w = ens.router_weights(test[d])  # [2, B, T]
        assert float(w[i, :, 8:].mean()) > 0.9, (d, w[i].mean(0))  # after an 8-token prefix: the specialist
        assert float(w[i, :, 0].mean()) == pytest.approx(0.5)  # before any evidence: the prior
    # the routed mixture is about as good as the right specialist on each domain, and beats the plain mixture
    for i, d in enumerate(domains):
        routed = float(ens(test[d], labels=test[d]).loss)
        ens.mode = "prob_mean"
        uniform = float(ens(test[d], labels=test[d]).loss)
        ens.mode = "routed"
        with torch.no_grad():
            own = float(students[i](input_ids=test[d], labels=test[d]).loss)
        assert routed < uniform and routed < own + 0.1, (d, routed, uniform, own)


def test_mixture_from_logits_is_exact_even_for_very_unlikely_tokens():
    from downscale.routing import mixture_from_logits

    z = torch.randn(3, 4, 50) * 3
    z[:, 1, 7] = -200.0  # ~200 nats below the rest under every student: the fast sum underflows here
    z[0, 2, :] += 500.0  # huge logits
    log_w = torch.log_softmax(torch.randn(3, 4), dim=0)
    ref = torch.logsumexp(torch.log_softmax(z.double(), -1) + log_w.double()[..., None], dim=0)
    got, lse = mixture_from_logits(z, log_w)
    torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-6)
    assert torch.isfinite(got).all() and float(got[1, 7]) < -150
    torch.testing.assert_close(lse, torch.logsumexp(z, -1))


def test_stacking_keeps_students_intact_and_follows_dtype_changes():
    students = _students(n=3)
    ids = _ids()
    before = _student_logits(students, ids)
    ens = _ens(students, "prob_mean")
    fast = ens(ids).logits
    after = _student_logits(students, ids)  # the students now run on views of the stacked weights
    assert torch.equal(before, after)
    ens.double()  # moves the students: the stack is rebuilt from the new weights
    fast64 = ens(ids).logits
    assert fast64.dtype == torch.float32 and ens.uses_fast_path
    ens.fast = False
    torch.testing.assert_close(fast64, ens(ids).logits, atol=1e-9, rtol=0)
    torch.testing.assert_close(fast64, fast, atol=1e-5, rtol=0)


def test_wrapped_linear_layers_fall_back_to_sequential():
    class Scaled(torch.nn.Module):  # e.g. an adapter wrapper: not a plain Linear
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) * 0.5

    students = _students(n=2)
    students[1].model.layers[0].mlp.down_proj = Scaled(students[1].model.layers[0].mlp.down_proj)
    ens = EnsembleModel(students, mode="logit_mean")
    assert not ens.uses_fast_path and "down_proj" in ens.fallback_reason
    ids = _ids()
    torch.testing.assert_close(ens(ids).logits, _student_logits(students, ids).mean(0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_sum_nll_equals_the_nll_of_forward_chunk_by_chunk(mode, fast):
    """sum_nll (evaluation without the [B, T, V] scores) equals the NLL of forward's scores, also when the
    combination runs in many small chunks."""
    students = _students()
    ids = _ids(B=2, T=20)
    ens = _ens(students, mode, fast=fast)
    logp = torch.log_softmax(ens(ids).logits[:, :-1].float(), -1)
    ref = float(-logp.gather(-1, ids[:, 1:, None]).sum())
    small = _ens(students, mode, fast=fast, chunk_bytes=4 * 3 * 2 * V * 3)  # 3 positions per chunk
    total, count = small.sum_nll(ids)
    assert count == 2 * 19
    assert total == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("mode", ["logit_mean", "prob_mean"])
def test_sequential_path_applies_each_head_chunk_by_chunk(mode, monkeypatch):
    """Students of different shapes (no fast path) never produce their full [B, T, V] logits: each output head
    sees at most one chunk of positions; a student whose head cannot be split off runs whole; the scores
    equal each student's own logits combined."""
    import downscale.ensemble as ensemble_mod

    students = _students(n=2) + [tiny_model("llama", seed=99, vocab_size=V, hidden=48)]
    ids = _ids(B=2, T=20)
    ref_z = _student_logits(students, ids)  # [n, B, T, V]
    ref = ref_z.mean(0) if mode == "logit_mean" else torch.logsumexp(torch.log_softmax(ref_z, -1), 0) - math.log(3)
    seen: list[int] = []
    for s in students:
        s.lm_head.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
    ens = _ens(students, mode, chunk_bytes=4 * 3 * 2 * V * 3)  # 3 positions per chunk (x n for logit_mean)
    assert not ens.uses_fast_path and "hidden_size" in ens.fallback_reason
    torch.testing.assert_close(ens(ids).logits, ref, atol=2e-5, rtol=0)
    per_chunk = 9 if mode == "logit_mean" else 3
    assert seen and max(seen) <= per_chunk and sum(seen) == 3 * 20

    seen.clear()  # the third student's head cannot be split off: it runs whole, the others stay chunked
    real = ensemble_mod.split_head
    monkeypatch.setattr(ensemble_mod, "split_head", lambda s: None if s is students[2] else real(s))
    torch.testing.assert_close(ens(ids).logits, ref, atol=2e-5, rtol=0)
    assert sorted(seen)[-1] == 20 and sum(seen) == 3 * 20


@torch.no_grad()
def test_stacked_heads_are_cast_once_under_autocast_and_recast_when_changed():
    """Under bf16 autocast the stacked heads (not parameters, so outside autocast's cast cache) are cast once and
    reused by every chunk, giving the same logits as autocast's own cast; an in-place change of a student's head
    (the stack's storage) is seen."""
    from downscale.fastpath import StackedStudents

    students = _students(n=2)
    stack = StackedStudents(students)
    h = torch.randn(2, 5, students[0].config.hidden_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = stack._head("cpu")
        assert first.dtype == torch.bfloat16 and stack._head("cpu") is first  # cached
        got = stack.logits(h)
        ref = torch.bmm(h, stack.head_vnd.permute(1, 2, 0))  # autocast casts both operands itself
        assert torch.equal(got, ref)
        torch.testing.assert_close(stack.mean_logits(h).float(), ref.float().mean(0), atol=0.05, rtol=0.02)
        students[1].lm_head.weight.mul_(2.0)  # tied: the stack's storage, in place
        second = stack._head("cpu")
        assert second is not first and torch.equal(second[:, 1], (stack.head_vnd[:, 1]).to(torch.bfloat16))
        stack.head_vnd[:, 0].mul_(3.0)  # through the stack itself
        assert torch.equal(stack._head("cpu")[:, 0], stack.head_vnd[:, 0].to(torch.bfloat16))
    assert stack._head("cpu") is stack.head_vnd  # no autocast: the fp32 stack itself


def test_chunk_bytes_default_follows_the_device():
    from downscale.ensemble import DEFAULT_CHUNK_BYTES

    ens = _ens(_students(n=2), "prob_mean")
    assert ens.chunk_bytes == DEFAULT_CHUNK_BYTES  # on the CPU
    ens.chunk_bytes = 1234
    assert ens.chunk_bytes == 1234


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("n", [1, 3])
def test_products_split_over_output_rows_equal_the_whole_products(arch, n, monkeypatch):
    """On a CPU, products of few rows split each student's output rows into blocks (so that the threads share
    them); the logits (scoring, a padded batch, the heads, the mean of logits) and greedy decoding equal the unsplit
    products."""
    import downscale.fastpath as fastpath
    from downscale.fastpath import StackedStudents, _out_split

    students = _students(arch, n=n, hidden=32, heads=4, kv_heads=2)
    stack = StackedStudents(students)
    ids = _ids(B=2, T=12)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    pad = fastpath.padded_causal_mask(mask, ids.shape[1])

    def run():
        h = stack.hidden(ids, pos, pad)
        flat = h.reshape(n, -1, h.shape[-1])
        return stack.logits(flat), stack.mean_logits(flat)

    monkeypatch.setattr(fastpath, "SPLIT_PER_THREAD", 6)  # one thread here (the fixture): 6 blocks in all
    x = torch.zeros(n, 24, 32)
    gate_up, heads = stack.layers[0]["gate_up"], stack.head_vnd.transpose(0, 1)
    s = _out_split(x, gate_up)
    assert s > 1 and gate_up.shape[1] % s == 0  # the products below are split
    assert (_out_split(x, heads) > 1) == (n == 1)  # several students' heads are a strided view: whole
    split = run()
    ens = EnsembleModel(students, mode="logit_mean")
    gen_split = ens.generate(ids[:1, :5], max_new_tokens=6)
    monkeypatch.setattr(fastpath, "SPLIT_MAX_ROWS", 0)  # off
    assert _out_split(x, stack.layers[0]["gate_up"]) == 1
    whole = run()
    for a, b in zip(split, whole, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert torch.equal(ens.generate(ids[:1, :5], max_new_tokens=6), gen_split)
