"""Data stage: read the sources, shard them, make the tokenizer, pack every split into token blocks.

Writes ``<run>/data/`` (layout in ``downscale.data.blocks``) and ``<run>/tokenizer/``:

1. Read each source (``downscale.data.sources``; the builtin corpus in ``downscale.data.builtin``),
   decode, drop documents under ``data.min_doc_chars``, and drop exact duplicates across the corpus, then
   near-duplicates when ``data.near_dup.enabled`` (MinHash + LSH, ``downscale.data.neardup``).
2. Shard: one shard per source (``shard_by: source``; the source name is the shard name), or
   ``shard_by: cluster``: every document into ``cluster.k`` shards ``cluster0..`` by tf-idf -> SVD ->
   k-means fitted on (at most ``cluster.fit_documents``) training documents; the clusterer is saved
   in ``data/cluster/`` for the combine stage's router.
3. Split each shard by document hash (``downscale.data.packing``).
4. Tokenizer: train a ByteLevel BPE on the train splits (at most ``tokenizer.train_chars``
   characters, an equal share per shard), or copy the base model's.
5. Pack each split, documents separated by ``data.doc_separator`` (train up to ``max_tokens_per_shard`` /
   the source's ``max_tokens``; val and test up to ``max_eval_tokens_per_shard``) and write
   ``<shard>/{train,val,test}.bin`` and the meta files.

Nothing here depends on the time or the machine's load: the same config, seed and inputs give
the same files byte for byte.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from downscale._io import write_json_atomic
from downscale.data import neardup, packing
from downscale.data.blocks import SPLITS
from downscale.data.sources import Document, SourceReport, dedupe, read_source
from downscale.pipeline import StageContext, StageError

PREDICT_BATCH = 512


def run(ctx: StageContext) -> dict:
    """Run the data stage; returns the summary stored in the manifest."""
    cfg, dcfg = ctx.cfg, ctx.cfg.data
    config_file = getattr(cfg, "_source", "<config>")
    seed = cfg.run.seed
    out = ctx.output("data")
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t = time.perf_counter()

    # 1. read -----------------------------------------------------------------------------------
    per_source: list[list[Document]] = []
    reports: list[SourceReport] = []
    for i, src in enumerate(dcfg.sources):
        t_src = time.perf_counter()
        docs, report = read_source(src, i, dcfg, config_file)
        per_source.append(docs)
        reports.append(report)
        what = src.builtin if src.kind == "builtin" else (src.dataset if src.kind == "hf" else ", ".join(src.paths))
        ctx.log(f"[data] source {src.name} ({src.kind} {what}): {len(docs)} documents, "
                f"{sum(len(d.text) for d in docs) / 1e6:.2f}M characters from {len(report.files)} files "
                f"in {time.perf_counter() - t_src:.1f}s; skipped {dict(report.skipped) or 'none'}")
    per_source = dedupe(per_source, reports)
    times["read"] = time.perf_counter() - t
    if dcfg.near_dup.enabled:
        t = time.perf_counter()
        nd = dcfg.near_dup
        per_source = neardup.near_dedupe(per_source, reports, nd.threshold, nd.num_perm, nd.ngram, seed=seed)
        times["near_dup"] = time.perf_counter() - t
        dropped = {r.name: r.skipped["near_duplicate"] for r in reports}
        ctx.log(f"[data] near-duplicates (MinHash, Jaccard >= {nd.threshold}, {nd.ngram}-word shingles): dropped "
                f"{sum(dropped.values())} documents ({', '.join(f'{k} {v}' for k, v in dropped.items())}) in "
                f"{times['near_dup']:.1f}s")

    # 2. shard, 3. split --------------------------------------------------------------------------
    t = time.perf_counter()
    shard_info: dict[str, dict] = {}
    if dcfg.shard_by == "source":
        shards: dict[str, list[Document]] = {}
        for i, (src, docs, report) in enumerate(zip(dcfg.sources, per_source, reports, strict=True)):
            if not docs:
                raise StageError(f"{config_file}: data.sources.{i} ({src.name}): no documents left after "
                                 f"filtering ({report.documents} kept; skipped {dict(report.skipped) or 'none'}); "
                                 f"check its files and data.min_doc_chars")
            shards[src.name] = docs
            shard_info[src.name] = {"sources": [report.to_json()]}
    else:
        shards = _cluster_shards(ctx, per_source, reports, config_file, shard_info)
    splits = {}
    for name, docs in shards.items():
        splits[name], borrowed = packing.assign_splits(docs, seed, dcfg.val_fraction, dcfg.test_fraction)
        shard_info[name]["borrowed_from_train"] = borrowed
    times["shard"] = time.perf_counter() - t

    # 4. tokenizer -----------------------------------------------------------------------------
    t = time.perf_counter()
    tok, tok_info = _make_tokenizer(ctx, splits, config_file)
    sep_token, sep = tok_info["doc_separator"]["token"], tok_info["doc_separator"]["id"]
    times["tokenizer"] = time.perf_counter() - t

    # 5. tokenize and pack -----------------------------------------------------------------------
    t = time.perf_counter()
    from downscale.data.tokenizer import batch_encoder

    encode = batch_encoder(tok)
    vocab = len(tok)
    dtype = packing.token_dtype(vocab)
    block = dcfg.block_size
    summary_shards = {}
    for i, (name, parts) in enumerate(splits.items()):
        meta = {"name": name, "documents": {}, "tokens": {}, "blocks": {}, "splits": {}, "budget": {}}
        train_budget = dcfg.max_tokens_per_shard
        if dcfg.shard_by == "source" and dcfg.sources[i].max_tokens is not None:
            train_budget = dcfg.sources[i].max_tokens
        for split in SPLITS:
            budget = train_budget if split == "train" else dcfg.max_eval_tokens_per_shard
            packed = packing.pack(parts[split], encode, sep, block, dtype, budget=budget, desc=f"{name}/{split}",
                                  doc_cap=packing.max_doc_tokens(budget, block))
            if packed.blocks.shape[0] == 0:
                _no_blocks(config_file, name, split, packed, block)
            packing.write_blocks(out / name / f"{split}.bin", packed.blocks)
            meta["documents"][split], meta["tokens"][split] = packed.documents, packed.tokens
            meta["blocks"][split] = int(packed.blocks.shape[0])
            meta["splits"][split], meta["budget"][split] = packed.to_json(), budget
            if split == "train":
                meta["unigram_entropy"] = packing.unigram_entropy(packed.blocks, vocab)
        meta.update(shard_info[name])
        write_json_atomic(out / name / "meta.json", meta)
        summary_shards[name] = {"tokens": meta["tokens"], "documents": meta["documents"],
                                "unigram_entropy": round(meta["unigram_entropy"], 4)}
        ctx.log(f"[data] shard {name}: tokens train {meta['tokens']['train']:,} / val {meta['tokens']['val']:,} / "
                f"test {meta['tokens']['test']:,} ({meta['documents']['train']}/{meta['documents']['val']}/"
                f"{meta['documents']['test']} documents); unigram entropy {meta['unigram_entropy']:.3f} nats")
    times["pack"] = time.perf_counter() - t

    top = {"shards": list(splits), "block_size": block, "dtype": dtype.name, "vocab_size": vocab,
           "eos_token_id": int(tok.eos_token_id), "doc_separator": {"token": sep_token, "id": sep},
           "seed": seed, "shard_by": dcfg.shard_by, "tokenizer": tok_info,
           "split_method": {"val_fraction": dcfg.val_fraction, "test_fraction": dcfg.test_fraction,
                            "hash": "blake2b(seed, split key) -> [0,1): test below test_fraction, then val"},
           "min_doc_chars": dcfg.min_doc_chars, "on_bad_utf8": dcfg.on_bad_utf8,
           "python": sys.version.split()[0],
           "sources": [{k: v for k, v in r.to_json().items() if k != "files"} | {"files": len(r.files)}
                       for r in reports]}
    if dcfg.shard_by == "cluster":
        top["cluster"] = {"dir": "cluster", "k": dcfg.cluster.k}
        write_json_atomic(out / "sources.json", [r.to_json() for r in reports])
    write_json_atomic(out / "meta.json", top)
    ctx.log("[data] " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
    return {"shards": summary_shards, "vocab_size": vocab, "dtype": dtype.name, "block_size": block,
            "seconds": {k: round(v, 2) for k, v in times.items()}}


def _no_blocks(config_file: str, shard: str, split: str, packed: packing.Packed, block: int) -> None:
    field = {"train": "data.block_size", "val": "data.val_fraction", "test": "data.test_fraction"}[split]
    raise StageError(f"{config_file}: {field}: shard {shard} has {packed.tokens_read} {split} tokens in "
                     f"{packed.documents_available} documents, less than one block of {block} tokens; add documents, "
                     f"raise {field if split != 'train' else 'the token budget'} or lower data.block_size")


def _make_tokenizer(ctx: StageContext, splits: dict[str, dict[str, list[Document]]], config_file: str):
    from downscale.data import tokenizer as tokmod

    cfg, tcfg = ctx.cfg, ctx.cfg.data.tokenizer
    if tcfg.kind == "bpe":
        texts, chars = packing.bpe_training_texts([parts["train"] for parts in splits.values()], tcfg.train_chars)
        tok = tokmod.train_bpe(texts, tcfg.vocab_size, tcfg.min_frequency, length=len(texts))
        info = tokmod.tokenizer_info(tok, "bpe", "trained on the train splits")
        info.update(requested_vocab_size=tcfg.vocab_size, min_frequency=tcfg.min_frequency, train_chars=chars,
                    train_documents=len(texts))
        ctx.log(f"[data] trained a ByteLevel BPE of {len(tok)} tokens on {chars / 1e6:.2f}M characters "
                f"({len(texts)} train documents)")
    else:
        tok = tokmod.load_base_tokenizer(cfg.base.name_or_path, cfg.base.revision, cfg.base.trust_remote_code,
                                         config_file, gguf_file=cfg.base.gguf_file)
        info = tokmod.tokenizer_info(tok, "base", cfg.base.name_or_path)
        info.update(revision=cfg.base.revision, gguf_file=cfg.base.gguf_file)
        ctx.log(f"[data] using the base model's tokenizer ({type(tok).__name__}, {len(tok)} tokens, "
                f"eos {tok.eos_token!r})")
    token, token_id = tokmod.doc_separator(tok, cfg.data.doc_separator, tcfg.kind, config_file)
    info["doc_separator"] = {"token": token, "id": token_id, "setting": cfg.data.doc_separator}
    ctx.log(f"[data] documents are separated by {token!r} (id {token_id}; data.doc_separator: "
            f"{cfg.data.doc_separator})")
    tokmod.save_tokenizer(tok, ctx.output("tokenizer"))
    return tok, info


def _cluster_shards(ctx: StageContext, per_source: list[list[Document]], reports: list[SourceReport],
                    config_file: str, shard_info: dict[str, dict]) -> dict[str, list[Document]]:
    """k-means shards of all documents; the clusterer is fitted on training documents only."""
    from downscale import progress
    from downscale.data.cluster import Clusterer

    dcfg, seed = ctx.cfg.data, ctx.cfg.run.seed
    ccfg = dcfg.cluster
    docs = [d for ds in per_source for d in ds]
    source_of = [r.name for r, ds in zip(reports, per_source, strict=True) for _ in ds]
    if len(docs) < ccfg.k:
        raise StageError(f"{config_file}: data.cluster.k: {ccfg.k} clusters need at least as many documents; "
                         f"the sources hold {len(docs)} after filtering")
    train = []
    for d in docs:
        key = d.split_key if d.split_key is not None else d.text
        if packing.split_of(packing.unit_hash(seed, "split", key), dcfg.val_fraction, dcfg.test_fraction) == "train":
            train.append((packing.unit_hash(seed, "order", d.text), d.text))
    train.sort(key=lambda t: t[0])
    fit_texts = [text for _, text in train[: ccfg.fit_documents]]
    if len(fit_texts) < ccfg.k:
        raise StageError(f"{config_file}: data.cluster.k: {ccfg.k} clusters need at least as many training "
                         f"documents; there are {len(fit_texts)}")
    t = time.perf_counter()
    try:
        clusterer = Clusterer.fit(fit_texts, ccfg.k, ccfg.svd_dim, ccfg.max_features, seed)
    except ValueError as exc:
        raise StageError(f"{config_file}: data.cluster: {exc}") from None
    labels = np.empty(len(docs), dtype=np.int64)
    for start in progress.bar(range(0, len(docs), PREDICT_BATCH), desc="cluster", unit="batch", leave=False,
                              disable=None):
        labels[start:start + PREDICT_BATCH] = clusterer.predict([d.text for d in docs[start:start + PREDICT_BATCH]])
    clusterer.save(ctx.output("data") / "cluster")
    ctx.log(f"[data] clustered {len(docs)} documents into {ccfg.k} shards (fitted on {len(fit_texts)}, svd "
            f"{clusterer.components.shape[0]}, {len(clusterer.vocabulary)} terms) in {time.perf_counter() - t:.1f}s; "
            f"sizes {np.bincount(labels, minlength=ccfg.k).tolist()}")
    shards = {}
    for c in range(ccfg.k):
        members = np.flatnonzero(labels == c)
        name = f"cluster{c}"
        if len(members) == 0:
            raise StageError(f"{config_file}: data.cluster.k: cluster {c} of {ccfg.k} got no documents; "
                             f"lower data.cluster.k")
        shards[name] = [docs[j] for j in members]
        by_source: dict[str, int] = {}
        for j in members:
            by_source[source_of[j]] = by_source.get(source_of[j], 0) + 1
        shard_info[name] = {"cluster": {"index": c, "documents": int(len(members)), "fit_size": clusterer.sizes[c]},
                            "source_documents": by_source, "sources_file": "../sources.json"}
    return shards
