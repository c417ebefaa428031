"""Splits, packing and the trained tokenizer of the data stage (no stage run here)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from downscale.data import packing
from downscale.data.sources import Document


def _docs(n: int, prefix: str = "doc") -> list[Document]:
    return [Document(f"{prefix} number {i} " + "word " * (i % 7), f"mem[{i}]") for i in range(n)]


def _texts(parts: dict[str, list[Document]]) -> dict[str, set[str]]:
    return {s: {d.text for d in docs} for s, docs in parts.items()}


# --------------------------------------------------------------------------- splits


def test_splits_are_disjoint_deterministic_and_seeded():
    docs = _docs(400)
    a, _ = packing.assign_splits(docs, seed=0, val_fraction=0.1, test_fraction=0.1)
    b, _ = packing.assign_splits(list(reversed(docs)), seed=0, val_fraction=0.1, test_fraction=0.1)
    ta, tb = _texts(a), _texts(b)
    assert ta == tb  # the assignment does not depend on the input order
    assert [d.text for d in a["train"]] == [d.text for d in b["train"]]  # nor does the packing order
    assert not (ta["train"] & ta["test"]) and not (ta["train"] & ta["val"]) and not (ta["val"] & ta["test"])
    assert ta["train"] | ta["val"] | ta["test"] == {d.text for d in docs}
    # Fractions are roughly honoured (400 documents: 40 expected in each held-out split).
    assert 20 <= len(ta["test"]) <= 60 and 20 <= len(ta["val"]) <= 60
    other = _texts(packing.assign_splits(docs, seed=1, val_fraction=0.1, test_fraction=0.1)[0])
    assert other["test"] != ta["test"]


def test_adding_documents_moves_no_old_document():
    old = _docs(200)
    new = old + _docs(100, prefix="later")
    a = packing.assign_splits(old, 3, 0.1, 0.1)[0]
    b = packing.assign_splits(new, 3, 0.1, 0.1)[0]
    for split in a:
        assert _texts(a)[split] <= _texts(b)[split]


def test_split_key_groups_documents():
    # A module's code and its docstrings share a split key, so they always share a split.
    docs = [Document(f"code of module {i}", f"c{i}", split_key=f"m{i}") for i in range(100)]
    docs += [Document(f"docstrings of module {i}", f"d{i}", split_key=f"m{i}") for i in range(100)]
    parts = packing.assign_splits(docs, 0, 0.2, 0.2)[0]
    where = {d.origin: s for s, ds in parts.items() for d in ds}
    assert all(where[f"c{i}"] == where[f"d{i}"] for i in range(100))
    assert {where[f"c{i}"] for i in range(100)} == {"train", "val", "test"}


def test_empty_heldout_split_borrows_from_train():
    docs = _docs(3)
    parts, borrowed = packing.assign_splits(docs, 0, 0.01, 0.01)
    assert all(len(parts[s]) >= 1 for s in ("train", "val", "test"))
    assert sum(borrowed.values()) >= 1
    assert sum(len(v) for v in parts.values()) == 3


# --------------------------------------------------------------------------- packing


def _char_encoder(texts: list[str]) -> list[list[int]]:
    return [[ord(c) - ord("a") + 1 for c in t] for t in texts]  # 'a' -> 1, ...; 0 is EOS


def test_pack_places_eos_after_every_document_and_counts():
    texts = ["abc", "de", "fghij", "k", "lmnopq"]
    docs = [Document(t, str(i)) for i, t in enumerate(texts)]
    packed = packing.pack(docs, _char_encoder, eos_id=0, block_size=4, dtype=np.dtype(np.uint16))
    stream = [v for t in texts for v in [ord(c) - 96 for c in t] + [0]]
    assert packed.tokens_read == sum(len(t) + 1 for t in texts) == len(stream) == 22
    assert packed.blocks.shape == (5, 4) and packed.blocks.dtype == np.uint16
    assert packed.blocks.ravel().tolist() == stream[:20]
    assert packed.partial_block == 2 and packed.over_budget == 0
    assert packed.documents == packed.documents_available == 5
    # EOS sits exactly after each document: cumulative lengths + 1.
    ends = np.cumsum([len(t) + 1 for t in texts]) - 1
    flat = packed.blocks.ravel()
    assert np.flatnonzero(flat == 0).tolist() == [e for e in ends if e < flat.size]


def test_pack_budget_and_document_cap():
    docs = [Document("abcdefghij" * 3, str(i)) for i in range(10)]  # 30 ids + EOS each
    packed = packing.pack(docs, _char_encoder, 0, block_size=8, dtype=np.dtype(np.uint16), budget=50)
    assert packed.tokens == 48 and packed.over_budget == 62 - 50 and packed.partial_block == 2
    assert packed.documents == 2
    capped = packing.pack(docs, _char_encoder, 0, block_size=8, dtype=np.dtype(np.uint16), budget=80, doc_cap=10)
    flat = capped.blocks.ravel()
    assert capped.documents_capped == capped.documents and capped.capped_tokens == 21 * capped.documents
    assert flat[9] == 0 and flat[19] == 0 and flat[:9].tolist() == list(range(1, 10))
    assert packing.max_doc_tokens(None, 8) is None
    assert packing.max_doc_tokens(1600, 8) == 100 and packing.max_doc_tokens(16, 8) == 8


def test_unigram_entropy_and_dtype():
    uniform = np.array([0, 1, 2, 3] * 50)
    assert packing.unigram_entropy(uniform, 10) == pytest.approx(math.log(4))
    skew = np.array([0] * 90 + [1] * 10)
    assert packing.unigram_entropy(skew, 2) == pytest.approx(-(0.9 * math.log(0.9) + 0.1 * math.log(0.1)))
    assert packing.unigram_entropy(np.zeros(0, dtype=np.int64), 2) is None
    assert packing.token_dtype(8192) == np.uint16 and packing.token_dtype(65535) == np.uint16
    assert packing.token_dtype(65536) == np.uint32 and packing.token_dtype(128256) == np.uint32


def test_write_blocks_roundtrip(tmp_path):
    blocks = np.arange(24, dtype=np.uint32).reshape(3, 8)
    packing.write_blocks(tmp_path / "s" / "train.bin", blocks)
    back = np.fromfile(tmp_path / "s" / "train.bin", dtype=np.uint32).reshape(-1, 8)
    assert np.array_equal(back, blocks)
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["train.bin"]  # no temporary left behind


def test_bpe_training_texts_share_per_shard():
    a = [Document("a" * 100, "a0"), Document("b" * 100, "a1")]
    b = [Document("c" * 30, "b0")]
    texts, chars = packing.bpe_training_texts([a, b], train_chars=120)
    assert texts == ["a" * 60, "c" * 30] and chars == 90


# --------------------------------------------------------------------------- tokenizer


VARIED = [
    "def f(x):\n\treturn x ** 2  # squares\r\n",
    "Ünïcödé façade — naïve café; 日本語のテキスト; emoji 🙂🚀; Ω≈ç√∫",
    "   leading spaces and trailing   \n\n\n",
    "The text mentions <|endoftext|> literally, and <|end of text|>.",
    "a",
    "",
    "tabs\tand\u00a0non-breaking\u2009spaces, zero\u200bwidth",
]


def test_bpe_roundtrip_and_special_tokens(tmp_path):
    from transformers import AutoTokenizer

    from downscale.data.tokenizer import EOS, batch_encoder, save_tokenizer, train_bpe

    corpus = ["the license shall apply to the software " * 5, "def return import class " * 5] * 20 + VARIED
    tok = train_bpe(corpus, vocab_size=400, min_frequency=1)
    assert tok.eos_token == EOS and tok.eos_token_id == 0 and tok.bos_token_id == 0 and tok.pad_token_id == 0
    save_tokenizer(tok, tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded.eos_token_id == 0 and len(loaded) == len(tok) <= 400
    encode = batch_encoder(loaded)
    ids = encode(VARIED)
    for text, row in zip(VARIED, ids, strict=True):
        assert loaded.decode(row) == text
        assert loaded.decode(loaded.encode(text, add_special_tokens=False)) == text
    # The literal special-token string inside a document is text, not an EOS.
    assert 0 not in ids[3] and len(ids[3]) > 3
    assert loaded.encode("x", add_special_tokens=False) == encode(["x"])[0]  # no BOS added


def test_cap_only_when_budget_binds_and_raised_to_fill():
    docs = [Document("a" * n, str(n)) for n in (30, 5, 40, 3)]  # 31 + 6 + 41 + 4 = 82 tokens with EOS
    u16 = np.dtype(np.uint16)
    fits = packing.pack(docs, _char_encoder, 0, 4, u16, budget=100, doc_cap=8)
    assert fits.documents_capped == 0 and fits.tokens_read == 82  # fits in the budget: nothing capped
    binds = packing.pack(docs, _char_encoder, 0, 4, u16, budget=60, doc_cap=8)
    # cap 8 could give only 8 + 6 + 8 + 4 = 26 < 60: raised to the smallest cap that fills 60 (25).
    assert binds.tokens_read == 25 + 6 + 25 + 4 and binds.tokens == 60 and binds.documents_capped == 2
    assert binds.documents == 4 and binds.over_budget == 0
