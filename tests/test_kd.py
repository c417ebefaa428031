"""Distillation losses (downscale.kd) against plain references written independently here: explicit
probabilities, ratios and sums in float64, gradients from autograd on those references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from downscale import kd

KINDS = kd.KINDS
BETA, ALPHA = 0.3, 0.2


# --------------------------------------------------------------------------- independent references


def ref_divergence(s_logits: torch.Tensor, t_logits: torch.Tensor, kind: str, T: float = 1.0) -> torch.Tensor:
    """Per-token divergence from explicit softmax probabilities and log-ratios (float64)."""
    s, t = s_logits.double() / T, t_logits.double() / T
    es, et = torch.exp(s - s.max(-1, keepdim=True).values), torch.exp(t - t.max(-1, keepdim=True).values)
    q, p = es / es.sum(-1, keepdim=True), et / et.sum(-1, keepdim=True)
    return ref_on_probs(q, p, kind)


def ref_on_probs(q: torch.Tensor, p: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "forward_kl":
        return (p * torch.log(p / q)).sum(-1)
    if kind == "reverse_kl":
        return (q * torch.log(q / p)).sum(-1)
    if kind == "jsd":
        m = BETA * p + (1 - BETA) * q
        return BETA * (p * torch.log(p / m)).sum(-1) + (1 - BETA) * (q * torch.log(q / m)).sum(-1)
    m = ALPHA * p + (1 - ALPHA) * q
    return (p * torch.log(p / m)).sum(-1)


def ref_objective(z, t, labels, kind, kd_ratio, T):
    """kd_ratio * T^2 * mean KD + (1 - kd_ratio) * mean CE over non-ignored rows (float64)."""
    keep = labels != -100
    z, t, y = z[keep].double(), t[keep].double(), labels[keep]
    logz = z - torch.log(torch.exp(z - z.max(-1, keepdim=True).values).sum(-1, keepdim=True)) \
        - z.max(-1, keepdim=True).values
    ce = -logz[torch.arange(len(y)), y].mean()
    return (1 - kd_ratio) * ce + kd_ratio * T * T * ref_divergence(z, t, kind, T).mean()


def _data(n=37, h=8, v=50, th=6, seed=0, ignore=(3, 10, 11)):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g)
    t_hid = torch.randn(n, th, generator=g)
    t_w = torch.randn(v, th, generator=g)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[list(ignore)] = -100
    return hid, w, t_hid, t_w, labels


def _loss_and_grads(hid, w, labels, teacher, **kw):
    h, ww = hid.clone().requires_grad_(), w.clone().requires_grad_()
    loss, stats = kd.distill_loss(h, ww, labels, teacher, **kw)
    gh, gw = torch.autograd.grad(loss, [h, ww])
    return loss.detach(), stats, gh, gw


def _ref_grads(hid, w, t_logits, labels, kind, kd_ratio, T):
    h, ww = hid.double().requires_grad_(), w.double().requires_grad_()
    ref = ref_objective(h @ ww.T, t_logits.double(), labels, kind, kd_ratio, T)
    gh, gw = torch.autograd.grad(ref, [h, ww])
    return ref.detach(), gh, gw


# --------------------------------------------------------------------------- objective vs references


def test_kd_ratio_zero_is_exactly_cross_entropy():
    hid, w, t_hid, t_w, labels = _data()
    for teacher in (None, kd.DenseTeacher(t_hid, t_w)):
        loss, stats, gh, gw = _loss_and_grads(hid, w, labels, teacher, kd_ratio=0.0, chunk_tokens=5)
        h, ww = hid.clone().requires_grad_(), w.clone().requires_grad_()
        ref = F.cross_entropy(h @ ww.T, labels, ignore_index=-100)
        rh, rw = torch.autograd.grad(ref, [h, ww])
        assert loss.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-6)
        torch.testing.assert_close(gh, rh, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(gw, rw, atol=1e-6, rtol=1e-5)
        assert stats["tokens"] == 34 and stats["ce"] == pytest.approx(ref.item(), rel=1e-6)
        assert math.isnan(stats["kd"]) == (teacher is None)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_kd_ratio_one_is_exactly_the_kd(kind, T):
    hid, w, t_hid, t_w, labels = _data(seed=1)
    t_logits = t_hid @ t_w.T
    loss, stats, gh, gw = _loss_and_grads(hid, w, labels, kd.LogitTeacher(t_logits), kd_ratio=1.0, kind=kind,
                                          temperature=T, beta=BETA, alpha=ALPHA, chunk_tokens=8)
    ref, rh, rw = _ref_grads(hid, w, t_logits, labels, kind, 1.0, T)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert stats["kd"] == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(gh.double(), rh, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(gw.double(), rw, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1.0, 0.7, 2.0])
def test_mixed_objective_matches_reference(kind, T):
    hid, w, t_hid, t_w, labels = _data(seed=2)
    loss, stats, gh, gw = _loss_and_grads(hid, w, labels, kd.DenseTeacher(t_hid, t_w), kd_ratio=0.3, kind=kind,
                                          temperature=T, beta=BETA, alpha=ALPHA, chunk_tokens=6)
    ref, rh, rw = _ref_grads(hid, w, t_hid @ t_w.T, labels, kind, 0.3, T)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert stats["loss"] == pytest.approx(0.7 * stats["ce"] + 0.3 * stats["kd"], rel=1e-6)
    torch.testing.assert_close(gh.double(), rh, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(gw.double(), rw, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_kd_divergence_matches_reference_on_random_logits(kind):
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(4, 9, 30, generator=g) * 3, torch.randn(4, 9, 30, generator=g) * 3
    for T in (1.0, 3.0):
        got = kd.kd_divergence(s, t, kind, temperature=T, beta=BETA, alpha=ALPHA)
        assert got.shape == (4, 9) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref_divergence(s, t, kind, T), atol=1e-6, rtol=1e-5)
        assert bool((got >= -1e-6).all())  # divergences are non-negative
    same = kd.kd_divergence(s, s, kind, beta=BETA, alpha=ALPHA)
    assert same.abs().max() < 1e-6


def test_jsd_matches_trl_definition_and_limits():
    """JSD(beta) = beta KL(p||M) + (1-beta) KL(q||M), M = beta p + (1-beta) q (TRL's generalized_jsd_loss)."""
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(5, 12, generator=g), torch.randn(5, 12, generator=g)
    lq, lp = torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1)
    for beta in (0.1, 0.5, 0.9):
        mix = torch.logsumexp(torch.stack([lq + math.log(1 - beta), lp + math.log(beta)]), dim=0)
        trl = beta * F.kl_div(mix, lp, reduction="none", log_target=True).sum(-1) + \
            (1 - beta) * F.kl_div(mix, lq, reduction="none", log_target=True).sum(-1)
        torch.testing.assert_close(kd.kd_divergence(s, t, "jsd", beta=beta).double(), trl, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- chunking and teacher forms


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_equals_unchunked(kind):
    hid, w, t_hid, t_w, labels = _data(n=53, seed=5, ignore=(0, 17, 18, 52))
    teacher = kd.DenseTeacher(t_hid, t_w)
    kw = dict(kd_ratio=0.6, kind=kind, temperature=1.5, beta=BETA, alpha=ALPHA)
    full = _loss_and_grads(hid, w, labels, teacher, chunk_tokens=1000, **kw)
    for chunk in (1, 7, 16):  # 7 and 16 do not divide the 49 counted rows
        part = _loss_and_grads(hid, w, labels, teacher, chunk_tokens=chunk, **kw)
        assert part[0].item() == pytest.approx(full[0].item(), abs=1e-6)
        torch.testing.assert_close(part[2], full[2], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(part[3], full[3], atol=1e-6, rtol=1e-5)
    assert full[2][[0, 17, 18, 52]].abs().max() == 0  # ignored rows get no gradient


def test_dense_hidden_teacher_equals_logit_teacher():
    hid, w, t_hid, t_w, labels = _data(seed=6)
    for kind in KINDS:
        kw = dict(kd_ratio=0.5, kind=kind, temperature=2.0, beta=BETA, alpha=ALPHA, chunk_tokens=9)
        a = _loss_and_grads(hid, w, labels, kd.DenseTeacher(t_hid, t_w), **kw)
        b = _loss_and_grads(hid, w, labels, kd.LogitTeacher(t_hid @ t_w.T), **kw)
        assert a[0].item() == pytest.approx(b[0].item(), abs=1e-6)
        torch.testing.assert_close(a[2], b[2], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(a[3], b[3], atol=1e-6, rtol=1e-5)


def _sparse_from_logits(t_logits: torch.Tensor, k: int, T: float) -> kd.SparseTeacher:
    logp = torch.log_softmax(t_logits / T, -1)
    vals, ids = torch.topk(logp, k, -1)
    tail = torch.logsumexp(logp.scatter(1, ids, float("-inf")), -1) if k < t_logits.shape[1] else \
        torch.full((t_logits.shape[0],), float("-inf"))
    return kd.SparseTeacher(ids, vals, tail, T)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_sparse_teacher_with_full_vocab_equals_online(kind, T):
    hid, w, t_hid, t_w, labels = _data(seed=7)
    t_logits = t_hid @ t_w.T
    kw = dict(kd_ratio=0.7, kind=kind, temperature=T, beta=BETA, alpha=ALPHA, chunk_tokens=10)
    online = _loss_and_grads(hid, w, labels, kd.DenseTeacher(t_hid, t_w), **kw)
    cached = _loss_and_grads(hid, w, labels, _sparse_from_logits(t_logits, w.shape[0], T), **kw)
    assert torch.isinf(_sparse_from_logits(t_logits, w.shape[0], T).tail_logmass).all()
    assert cached[0].item() == pytest.approx(online[0].item(), abs=1e-6)
    torch.testing.assert_close(cached[2], online[2], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cached[3], online[3], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_topk_matches_bin_reference(kind):
    """k < V: the student's distribution collapsed onto the teacher's top-k ids + one rest bin."""
    hid, w, t_hid, t_w, labels = _data(seed=8, ignore=())
    T, k = 1.5, 6
    t_logits = t_hid @ t_w.T * 2
    teacher = _sparse_from_logits(t_logits, k, T)
    loss, _, gh, _ = _loss_and_grads(hid, w, labels, teacher, kd_ratio=1.0, kind=kind, temperature=T, beta=BETA,
                                     alpha=ALPHA, chunk_tokens=11)
    h = hid.double().requires_grad_()
    z = (h @ w.double().T) / T
    q = torch.exp(z) / torch.exp(z).sum(-1, keepdim=True)
    q_top = q.gather(1, teacher.ids)
    q_bins = torch.cat([q_top, 1 - q_top.sum(-1, keepdim=True)], 1)
    p_bins = torch.cat([teacher.logprobs.double().exp(), teacher.tail_logmass.double().exp()[:, None]], 1)
    assert torch.allclose(p_bins.sum(-1), torch.ones(len(p_bins), dtype=torch.float64), atol=1e-6)
    ref = T * T * ref_on_probs(q_bins, p_bins, kind).mean()
    (rh,) = torch.autograd.grad(ref, [h])
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(gh.double(), rh, atol=1e-6, rtol=1e-4)


def test_sparse_concat_and_to():
    a = _sparse_from_logits(torch.randn(3, 20), 4, 1.0)
    b = _sparse_from_logits(torch.randn(2, 20), 4, 1.0)
    c = kd.SparseTeacher.concat([a, b]).to("cpu")
    assert len(c) == 5 and torch.equal(c.ids[3:], b.ids) and c.temperature == 1.0
    with pytest.raises(ValueError, match="differ"):
        kd.SparseTeacher.concat([a, _sparse_from_logits(torch.randn(2, 20), 5, 1.0)])


# --------------------------------------------------------------------------- precision, autograd plumbing


def test_bf16_inputs_use_fp32_maths():
    hid, w, t_hid, t_w, labels = _data(seed=9)
    hb, wb = hid.bfloat16(), w.bfloat16()
    loss, stats, gh, gw = _loss_and_grads(hb, wb, labels, kd.DenseTeacher(t_hid.bfloat16(), t_w.bfloat16()),
                                          kd_ratio=0.5, chunk_tokens=7)
    assert loss.dtype == torch.float32 and gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    z = (hb @ wb.T).double()  # the bf16 logits, then exact maths
    t = (t_hid.bfloat16() @ t_w.bfloat16().T).double()
    ref = ref_objective(z, t, labels, "forward_kl", 0.5, 1.0)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    # under autocast, fp32 inputs give the same bf16 head matmuls
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto, _ = kd.distill_loss(hid, w, labels, kd.DenseTeacher(t_hid, t_w), kd_ratio=0.5, chunk_tokens=7)
    explicit, _ = kd.distill_loss(hid, w, labels, kd.DenseTeacher(t_hid, t_w), kd_ratio=0.5, chunk_tokens=7,
                                  matmul_dtype=torch.bfloat16)
    fp32, _ = kd.distill_loss(hid, w, labels, kd.DenseTeacher(t_hid, t_w), kd_ratio=0.5, chunk_tokens=7)
    assert auto.item() == explicit.item() and auto.dtype == torch.float32
    assert auto.item() != fp32.item() and auto.item() == pytest.approx(fp32.item(), rel=2e-2)


def test_backward_scales_with_upstream_gradient_and_no_grad_path():
    hid, w, t_hid, t_w, labels = _data(seed=10)
    teacher = kd.DenseTeacher(t_hid, t_w)
    h, ww = hid.clone().requires_grad_(), w.clone().requires_grad_()
    loss, _ = kd.distill_loss(h, ww, labels, teacher, kd_ratio=0.5, kind="jsd")
    (3.0 * loss).backward()
    _, _, gh, gw = _loss_and_grads(hid, w, labels, teacher, kd_ratio=0.5, kind="jsd")
    torch.testing.assert_close(h.grad, 3 * gh)
    torch.testing.assert_close(ww.grad, 3 * gw)
    with torch.no_grad():
        nl, _ = kd.distill_loss(hid, w, labels, teacher, kd_ratio=0.5, kind="jsd")
    assert not nl.requires_grad and nl.item() == pytest.approx(loss.item(), abs=1e-6)
    h2 = hid.clone().requires_grad_()  # gradient to the hidden states only (frozen head)
    l2, _ = kd.distill_loss(h2, w, labels, teacher, kd_ratio=0.5, kind="jsd")
    l2.backward()
    torch.testing.assert_close(h2.grad, gh)


def test_all_rows_ignored_gives_zero_loss():
    hid, w, _, _, labels = _data()
    h = hid.clone().requires_grad_()
    loss, stats = kd.distill_loss(h, w, torch.full_like(labels, -100), None, kd_ratio=0.0)
    loss.backward()
    assert loss.item() == 0.0 and stats["tokens"] == 0 and h.grad.abs().max() == 0


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kw, match", [
    (dict(kind="jsd", beta=0.0), "beta must be strictly between 0 and 1"),
    (dict(kind="jsd", beta=1.0), "beta must be strictly between 0 and 1"),
    (dict(kind="skew_kl", alpha=1.0), "alpha must be strictly between 0 and 1"),
    (dict(kind="skew_kl", alpha=-0.1), "alpha must be strictly between 0 and 1"),
    (dict(temperature=0.0), "temperature must be"),
    (dict(temperature=-1.0), "temperature must be"),
    (dict(kd_ratio=1.5), r"kd_ratio must be in \[0, 1\]"),
    (dict(kd_ratio=-0.1), r"kd_ratio must be in \[0, 1\]"),
    (dict(kind="kl"), "kd loss must be one of forward_kl, reverse_kl, jsd, skew_kl"),
])
def test_range_errors(kw, match):
    hid, w, t_hid, t_w, labels = _data()
    args = dict(kd_ratio=0.5, kind="forward_kl") | kw
    with pytest.raises(ValueError, match=match):
        kd.distill_loss(hid, w, labels, kd.DenseTeacher(t_hid, t_w), **args)


def test_config_validates_kd_ranges():
    from pydantic import ValidationError

    from downscale.config import SpecializeConfig

    for bad in (dict(jsd_beta=1.0), dict(skew_alpha=0.0), dict(temperature=0.0), dict(kd_ratio=1.1),
                dict(kd_loss="kl"), dict(cache_top_k=0), dict(kd_chunk_tokens=0)):
        with pytest.raises(ValidationError):
            SpecializeConfig(**bad)
    ok = SpecializeConfig(kd_loss="jsd", jsd_beta=0.2, temperature=2.0)
    kd.check_kd_args(ok.kd_loss, kd_ratio=ok.kd_ratio, temperature=ok.temperature, beta=ok.jsd_beta,
                     alpha=ok.skew_alpha)
    for name in ("kd_ratio", "kd_loss", "jsd_beta", "skew_alpha", "temperature", "teacher", "teacher_quant",
                 "cache_top_k", "kd_chunk_tokens", "cache_logprob_dtype"):
        assert SpecializeConfig.model_fields[name].description, name


def test_input_errors():
    hid, w, t_hid, t_w, labels = _data()
    with pytest.raises(ValueError, match="no teacher targets"):
        kd.distill_loss(hid, w, labels, None, kd_ratio=0.5)
    with pytest.raises(ValueError, match="rows"):
        kd.distill_loss(hid, w, labels, kd.DenseTeacher(t_hid[:-1], t_w), kd_ratio=0.5)
    with pytest.raises(ValueError, match="token ids"):
        kd.distill_loss(hid, w, labels.clamp_min(0) + 50, None, kd_ratio=0.0)
    sparse = _sparse_from_logits(t_hid @ t_w.T, 5, 2.0)
    with pytest.raises(ValueError, match="temperature 2.0"):
        kd.distill_loss(hid, w, labels, sparse, kd_ratio=0.5, temperature=1.0)


# --------------------------------------------------------------------------- vocabulary check


def test_check_same_vocab(tmp_path):
    from tiny import domain_text, make_tokenizer, tiny_model

    s, t = tiny_model(vocab_size=128, seed=0), tiny_model(vocab_size=128, seed=1, hidden=48)
    kd.check_same_vocab(s, t)
    kd.check_same_vocab(s.config, t)
    with pytest.raises(kd.VocabularyMismatch, match="config vocab_size 128 \\(student\\) vs 136 \\(teacher\\)"):
        kd.check_same_vocab(s, tiny_model(vocab_size=136))
    padded = tiny_model(vocab_size=128, seed=2)
    padded.resize_token_embeddings(144)
    padded.config.vocab_size = 128  # a config that does not count the padded rows
    with pytest.raises(kd.VocabularyMismatch, match="input embedding rows 128 \\(student\\) vs 144"):
        kd.check_same_vocab(s, padded)
    a = make_tokenizer(tmp_path / "a", domain_text("code", 20), vocab_size=300)
    b = make_tokenizer(tmp_path / "b", domain_text("legal", 20), vocab_size=300)
    a2 = make_tokenizer(tmp_path / "a2", domain_text("code", 20), vocab_size=300)
    kd.check_same_vocab(s, t, a, a2)
    assert kd.tokenizer_hash(a) == kd.tokenizer_hash(a2) != kd.tokenizer_hash(b)
    with pytest.raises(kd.VocabularyMismatch, match="tokenizer .* differs from the teacher's"):
        kd.check_same_vocab(s, t, a, b)
    with pytest.raises(ValueError, match="no tokenizer files"):
        kd.check_same_vocab(s, t, a, tmp_path)


# --------------------------------------------------------------------------- it trains


def test_distillation_steps_lower_kd_on_a_tiny_model():
    from tiny import tiny_model

    torch.manual_seed(0)
    teacher = tiny_model(vocab_size=96, hidden=48, layers=2, seed=1)
    student = tiny_model(vocab_size=96, hidden=32, layers=1, seed=2).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 96, (4, 24), generator=g)

    def step_loss():
        hs = student.get_decoder()(input_ids=ids).last_hidden_state[:, :-1].reshape(-1, 32)
        with torch.no_grad():
            ht = teacher.get_decoder()(input_ids=ids).last_hidden_state[:, :-1].reshape(-1, 48)
        target = kd.DenseTeacher(ht, teacher.get_output_embeddings().weight)
        return kd.distill_loss(hs, student.get_output_embeddings().weight, ids[:, 1:].reshape(-1), target,
                               kd_ratio=1.0, kind="forward_kl", chunk_tokens=16)

    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    first, stats0 = step_loss()
    first.backward()
    with_grad = [n for n, p in student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(with_grad) == len(list(student.parameters()))  # gradients reach every parameter
    opt.step()
    for _ in range(15):
        opt.zero_grad()
        loss, _ = step_loss()
        loss.backward()
        opt.step()
    _, stats1 = step_loss()
    assert stats1["kd"] < 0.5 * stats0["kd"], (stats0, stats1)


def test_fp16_gradients_survive_loss_scaling():
    """fp16 inputs under a GradScaler-style loss scale: the per-token gradients (~1/n) must not underflow."""
    g = torch.Generator().manual_seed(11)
    n, h, v = 3000, 16, 500
    hid, w = torch.randn(n, h, generator=g) * 0.3, torch.randn(v, h, generator=g) * 0.3
    labels = torch.randint(0, v, (n,), generator=g)
    teacher = kd.DenseTeacher(torch.randn(n, h, generator=g), torch.randn(v, h, generator=g))

    def grads(dtype, scale):
        hh, ww = hid.to(dtype).clone().requires_grad_(), w.to(dtype).clone().requires_grad_()
        loss, _ = kd.distill_loss(hh, ww, labels, teacher, kd_ratio=0.5, chunk_tokens=700)
        (loss * scale).backward()
        assert hh.grad.dtype == dtype and ww.grad.dtype == dtype
        return hh.grad.float() / scale, ww.grad.float() / scale

    ref_h, ref_w = grads(torch.float32, 1.0)
    got_h, got_w = grads(torch.float16, 65536.0)
    assert (got_h - ref_h).norm() / ref_h.norm() < 5e-3 and (got_w - ref_w).norm() / ref_w.norm() < 5e-3


def test_default_chunk_is_larger_on_a_gpu() -> None:
    """The measured table: ~96 MiB per [chunk, V] fp32 temporary on a CPU (fp32 and bf16), in a multiple of 256
    tokens (64 below that), 256 MiB on CUDA (launch-bound otherwise); an explicit chunk always wins; never below 16."""
    from downscale.kd import auto_chunk_tokens

    assert auto_chunk_tokens(128256) == 192 and auto_chunk_tokens(128256, device="cpu") == 192
    assert auto_chunk_tokens(49152) == 512 == auto_chunk_tokens(49152, dtype=torch.bfloat16)
    assert auto_chunk_tokens(128256, device=torch.device("cuda")) == 523
    assert auto_chunk_tokens(128256, device="cuda", dtype=torch.bfloat16) == 523
    assert auto_chunk_tokens(8192, device="cuda") == 8192 and auto_chunk_tokens(8192) == 3072
    assert auto_chunk_tokens(128256, 100, device="cuda") == 100
    assert auto_chunk_tokens(10**9) == 16
