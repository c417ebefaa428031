"""The offline teacher cache: contents vs the model's own logits, KD equal to online KD at k = V,
resume after an interruption (byte-for-byte), invalidation by fingerprint, the run layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from downscale import kd
from downscale.teacher_cache import TeacherCache, TeacherCacheError, build_teacher_cache, cache_fingerprints


def _blocks(n=10, t=16, vocab=128, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (n, t)).astype(np.uint16)


def _teacher(vocab=128, seed=3, hidden=32):
    from tiny import tiny_model

    return tiny_model(vocab_size=vocab, hidden=hidden, seed=seed)


def _build(model, blocks, out, **kw):
    args = dict(top_k=8, temperature=1.0, batch_size=3, fingerprints={"teacher": "base-A", "data": "data-1"},
                progress=False)
    return build_teacher_cache(model, blocks, out, **(args | kw))


def test_build_stores_topk_logprobs_and_tail_of_the_teacher(tmp_path):
    model, blocks = _teacher(), _blocks()
    meta = _build(model, blocks, tmp_path / "c", top_k=8, temperature=2.0, logprob_dtype="float32")
    cache = TeacherCache.open(tmp_path / "c", expect={"teacher": "base-A", "data": "data-1", "top_k": 8,
                                                       "temperature": 2.0})
    assert meta["complete"] and not (tmp_path / "c.partial").exists()
    assert (meta["n_blocks"], meta["block_size"], meta["positions"], meta["vocab_size"]) == (10, 16, 15, 128)
    assert cache.ids.shape == (10, 15, 8) and cache.ids.dtype == np.uint16 and cache.tail.dtype == np.float32
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(blocks.astype(np.int64))).logits[:, :-1]  # [n, T-1, V]
    logp = torch.log_softmax(logits.double() / 2.0, -1)
    vals, ids = torch.topk(logp, 8, -1)
    cached_ids = torch.from_numpy(cache.ids.astype(np.int64))
    # the stored ids carry the k largest log-probs, most probable first (compared by value: robust to ties)
    torch.testing.assert_close(logp.gather(-1, cached_ids), vals, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.from_numpy(np.array(cache.logprobs)).double(), vals, atol=1e-5, rtol=1e-5)
    assert (cached_ids == ids).float().mean() > 0.99
    tail = torch.log1p(-vals.exp().sum(-1))
    torch.testing.assert_close(torch.from_numpy(np.array(cache.tail)).double(), tail, atol=1e-5, rtol=1e-5)
    # rows of sparse_teacher follow the listed blocks, then positions
    st = cache.sparse_teacher(np.array([4, 1]))
    assert st.ids.shape == (30, 8) and st.ids.dtype == torch.int64 and st.temperature == 2.0
    assert torch.equal(st.ids[15:], cached_ids[1]) and torch.equal(st.ids[:15], cached_ids[4])
    with pytest.raises(IndexError):
        cache.sparse_teacher([10])


@pytest.mark.parametrize("kind, amp", [("forward_kl", None), ("jsd", None), ("reverse_kl", None),
                                       ("forward_kl", torch.bfloat16)])
def test_cached_kd_with_full_vocab_equals_online_kd(tmp_path, kind, amp):
    """Cache built (under the same autocast as training, if any) with k = V gives online KD's values and grads."""
    from downscale.models import autocast
    from tiny import tiny_model

    vocab, T, cpu = 64, 1.5, torch.device("cpu")
    teacher, blocks = _teacher(vocab=vocab, hidden=32), _blocks(n=4, t=12, vocab=vocab, seed=1)
    _build(teacher, blocks, tmp_path / "c", top_k=vocab, temperature=T, logprob_dtype="float32", batch_size=4,
           amp_dtype=amp)
    cache = TeacherCache.open(tmp_path / "c")
    assert np.isneginf(cache.tail).all()
    student = tiny_model(vocab_size=vocab, hidden=16, heads=2, kv_heads=1, seed=5)
    ids = torch.as_tensor(blocks[[2, 0, 3]].astype(np.int64))
    with torch.no_grad(), autocast(cpu, amp):
        th = teacher.get_decoder()(input_ids=ids).last_hidden_state[:, :-1].reshape(-1, 32)
    online = kd.DenseTeacher(th, teacher.get_output_embeddings().weight)
    cached = cache.sparse_teacher([2, 0, 3])
    labels = ids[:, 1:].reshape(-1)
    results = []
    for target in (online, cached):
        student.zero_grad()
        with autocast(cpu, amp):
            hs = student.get_decoder()(input_ids=ids).last_hidden_state[:, :-1].reshape(-1, 16)
            loss, stats = kd.distill_loss(hs, student.get_output_embeddings().weight, labels, target,
                                          kd_ratio=0.8, kind=kind, temperature=T, chunk_tokens=7)
        loss.backward()
        results.append((loss.item(), stats["kd"], {n: p.grad.clone() for n, p in student.named_parameters()}))
    assert results[1][0] == pytest.approx(results[0][0], abs=1e-6)
    assert results[1][1] == pytest.approx(results[0][1], abs=1e-6)
    for name, grad in results[0][2].items():
        torch.testing.assert_close(results[1][2][name], grad, atol=1e-6, rtol=1e-5)


def test_fp16_cache_kd_is_close_to_fp32(tmp_path):
    teacher, blocks = _teacher(), _blocks(n=6)
    _build(teacher, blocks, tmp_path / "f32", top_k=16, logprob_dtype="float32")
    _build(teacher, blocks, tmp_path / "f16", top_k=16)  # the default
    c32, c16 = TeacherCache.open(tmp_path / "f32"), TeacherCache.open(tmp_path / "f16")
    assert c16.logprobs.dtype == np.float16 and c16.meta["logprob_dtype"] == "float16"
    assert np.array_equal(c32.ids, c16.ids)
    g = torch.Generator().manual_seed(0)
    hid, w = torch.randn(6 * 15, 8, generator=g), torch.randn(128, 8, generator=g)
    labels = torch.as_tensor(blocks[:, 1:].astype(np.int64)).reshape(-1)
    d32 = kd.distill_loss(hid, w, labels, c32.sparse_teacher(range(6)), kd_ratio=1.0)[1]["kd"]
    d16 = kd.distill_loss(hid, w, labels, c16.sparse_teacher(range(6)), kd_ratio=1.0)[1]["kd"]
    assert d16 == pytest.approx(d32, rel=1e-3) and d16 != d32


def _timeless(meta: dict) -> dict:
    """``meta`` without the arrays' modification times (the rest of their checksums kept)."""
    return {**meta, "checksums": {k: [v[0], v[2]] for k, v in meta["checksums"].items()}}


def test_a_changed_cache_is_refused_and_a_garbled_row_never_reaches_the_loss(tmp_path) -> None:
    """The arrays' size, modification time and fingerprint are in meta.json: a truncated or garbled array is refused
    when the cache is opened; a build with the same settings rebuilds it instead of returning it. A garble that the
    open does not see (here: the modification time put back, as a copy tool might) is caught on the rows read."""
    import os

    from downscale.teacher_cache import TeacherCacheError

    model, blocks = _teacher(), _blocks(n=6)
    good = _build(model, blocks, tmp_path / "c", batch_size=2)
    lp = tmp_path / "c" / "logprobs.npy"
    st = lp.stat()
    data = bytearray(lp.read_bytes())
    data[-64:] = b"\xff" * 64  # NaN in float16, in the last block
    lp.write_bytes(bytes(data))
    with pytest.raises(TeacherCacheError, match="logprobs.npy: changed since it was written"):
        TeacherCache.open(tmp_path / "c")
    os.utime(lp, ns=(st.st_atime_ns, st.st_mtime_ns))  # the cheap check passes now
    cache = TeacherCache.open(tmp_path / "c")
    cache.sparse_teacher([0, 1])  # clean rows
    with pytest.raises(TeacherCacheError, match="garbled"):
        cache.sparse_teacher([5])
    del cache
    (tmp_path / "c" / "tail.npy").write_bytes((tmp_path / "c" / "tail.npy").read_bytes()[:100])
    with pytest.raises(TeacherCacheError, match=r"tail.npy: truncated"):
        TeacherCache.open(tmp_path / "c")
    seen = []
    rebuilt = _build(model, blocks, tmp_path / "c", batch_size=2, on_batch=lambda done, n: seen.append(done))
    assert seen and _timeless(rebuilt) == _timeless(good)
    TeacherCache.open(tmp_path / "c").sparse_teacher([5])


def test_interrupted_build_resumes_and_equals_an_uninterrupted_one_byte_for_byte(tmp_path):
    model, blocks = _teacher(), _blocks(n=9)
    meta_full = _build(model, blocks, tmp_path / "full", batch_size=2)

    def interrupt(done, n):
        if done >= 4:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        _build(model, blocks, tmp_path / "c", batch_size=2, on_batch=interrupt)
    assert not (tmp_path / "c").exists()
    partial = json.loads((tmp_path / "c.partial" / "meta.json").read_text())
    assert partial["blocks_done"] == 4 and partial["complete"] is False
    with pytest.raises(FileNotFoundError, match="interrupted build exists"):
        TeacherCache.open(tmp_path / "c")
    seen = []
    meta = _build(model, blocks, tmp_path / "c", batch_size=2, on_batch=lambda done, n: seen.append(done))
    assert seen == [6, 8, 9]  # continued after the last complete batch, did not start again
    assert _timeless(meta) == _timeless(meta_full)
    for name in ("ids.npy", "logprobs.npy", "tail.npy"):
        assert (tmp_path / "c" / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name
    assert _timeless(json.loads((tmp_path / "c" / "meta.json").read_text())) == _timeless(meta_full)
    # a complete cache with the same settings is reused as it is
    seen.clear()
    _build(model, blocks, tmp_path / "c", batch_size=2, on_batch=lambda done, n: seen.append(done))
    assert seen == []


def test_open_refuses_another_base_data_setting_and_incomplete_caches(tmp_path):
    model, blocks = _teacher(), _blocks(n=4)
    _build(model, blocks, tmp_path / "c", top_k=4)
    TeacherCache.open(tmp_path / "c", expect={"teacher": "base-A", "data": "data-1", "top_k": 4})
    for expect, what in (({"teacher": "base-B"}, "another base"), ({"data": "data-2"}, "another data"),
                         ({"top_k": 8}, "another top_k"), ({"temperature": 2.0}, "another temperature"),
                         ({"tokenizer": "abc"}, "another tokenizer")):
        with pytest.raises(TeacherCacheError, match=what) as err:
            TeacherCache.open(tmp_path / "c", expect=expect)
        assert str(tmp_path / "c") in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="not found"):
        TeacherCache.open(tmp_path / "nothing")
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    (tmp_path / "c" / "meta.json").write_text(json.dumps(meta | {"complete": False}))
    with pytest.raises(TeacherCacheError, match="incomplete"):
        TeacherCache.open(tmp_path / "c")
    (tmp_path / "c" / "meta.json").write_text(json.dumps(meta))
    data = (tmp_path / "c" / "tail.npy").read_bytes()
    (tmp_path / "c" / "tail.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(TeacherCacheError, match="tail.npy"):
        TeacherCache.open(tmp_path / "c")
    # building again with other settings replaces the cache
    _build(model, blocks, tmp_path / "c", top_k=6)
    assert TeacherCache.open(tmp_path / "c", expect={"top_k": 6}).ids.shape == (4, 15, 6)


def test_bad_build_arguments(tmp_path):
    model = _teacher()
    with pytest.raises(ValueError, match="top_k"):
        _build(model, _blocks(n=2), tmp_path / "c", top_k=129)
    with pytest.raises(ValueError, match="logprob_dtype"):
        _build(model, _blocks(n=2), tmp_path / "c", logprob_dtype="bfloat16")
    with pytest.raises(ValueError, match="blocks"):
        _build(model, _blocks(n=2)[:, :1], tmp_path / "c")


def test_cache_on_a_run_layout_is_invalidated_when_the_base_changes(tmp_path):
    from downscale.data.blocks import open_split
    from tiny import domain_text, make_run_data, tiny_model

    run = tmp_path / "run"
    top = make_run_data(run, {"code": domain_text("code", 24), "legal": domain_text("legal", 24, seed=1)},
                        block_size=16, vocab_size=300)
    base = tiny_model(vocab_size=top["vocab_size"], seed=0)
    base.save_pretrained(run / "base")
    expect = cache_fingerprints(run, "code", top_k=16, temperature=1.0)
    blocks = open_split(run, "code", "train")
    out = run / "work" / "teacher_cache" / "code"
    build_teacher_cache(base, blocks, out, top_k=16, batch_size=4, fingerprints=expect, progress=False)
    cache = TeacherCache.open(out, expect=expect)
    assert cache.n_blocks == len(blocks) and cache.meta["fingerprints"]["tokenizer"] == expect["tokenizer"]
    st = cache.sparse_teacher(np.arange(len(blocks)))
    with torch.no_grad():
        logits = base(input_ids=torch.as_tensor(np.asarray(blocks, dtype=np.int64))).logits[:, :-1]
    flat = logits.reshape(-1, logits.shape[-1])
    top1 = flat.gather(1, st.ids[:, :1]).squeeze(1)  # the first stored id is the most probable (up to ties)
    torch.testing.assert_close(top1, flat.max(-1).values, atol=1e-6, rtol=0)
    tiny_model(vocab_size=top["vocab_size"], seed=1).save_pretrained(run / "base")  # the base changed
    with pytest.raises(TeacherCacheError, match="another base"):
        TeacherCache.open(out, expect=cache_fingerprints(run, "code", top_k=16, temperature=1.0))
