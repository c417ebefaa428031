"""Shared builders for tests: tiny random models, a tiny tokenizer, fake run directories.

Nothing here touches the network. Import as ``from tiny import ...`` (tests/ is on sys.path
through conftest.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from downscale._io import write_json_atomic

WORDS = {
    "code": "def return import class self for in if else while yield lambda print range len none true".split(),
    "legal": "license warranty liability copyright permission notice software shall party rights".split(),
    "prose": "the river flows under an old bridge where children watch boats and birds sing".split(),
}


def tiny_config(arch: str = "llama", vocab_size: int = 128, hidden: int = 32, intermediate: int = 64,
                layers: int = 2, heads: int = 4, kv_heads: int = 2, tied: bool = True, head_dim: int | None = None):
    """A tiny HF config of a supported family."""
    from transformers import AutoConfig

    kwargs = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  head_dim=head_dim or hidden // heads, max_position_embeddings=256, tie_word_embeddings=tied,
                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if arch in ("qwen2", "mistral"):
        kwargs["sliding_window"] = None
    return AutoConfig.for_model(arch, **kwargs)


def tiny_model(arch: str = "llama", seed: int = 0, **kwargs):
    """A tiny random causal LM (fp32, SDPA attention, eval mode)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **kwargs), attn_implementation="sdpa")
    return model.eval()


def domain_text(domain: str, n_docs: int = 40, words_per_doc: int = 60, seed: int = 0) -> list[str]:
    """Synthetic documents drawn from one small word list: distinct domains, learnable statistics."""
    rng = np.random.default_rng(seed)
    vocab = WORDS[domain]
    return [" ".join(rng.choice(vocab, size=words_per_doc)) for _ in range(n_docs)]


def make_tokenizer(out_dir: str | Path, texts: list[str], vocab_size: int = 300) -> Path:
    """Train a tiny ByteLevel BPE with ``<|endoftext|>`` (id 0) as bos/eos/pad; save as an HF tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    out_dir = Path(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def make_run_data(run_dir: str | Path, shards: dict[str, list[str]], block_size: int = 32, vocab_size: int = 300,
                  eval_docs: int = 4) -> dict:
    """Write ``<run>/tokenizer/`` and ``<run>/data/`` in the data stage's layout (see
    downscale.data.blocks) from raw documents per shard: the last ``2 * eval_docs`` documents of
    each shard become val and test. Returns the top-level meta."""
    from transformers import AutoTokenizer

    run_dir = Path(run_dir)
    all_texts = [t for docs in shards.values() for t in docs]
    make_tokenizer(run_dir / "tokenizer", all_texts, vocab_size=vocab_size)
    tok = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    eos = tok.eos_token_id
    dtype = np.uint16
    for name, docs in shards.items():
        splits = {"train": docs[: -2 * eval_docs], "val": docs[-2 * eval_docs: -eval_docs], "test": docs[-eval_docs:]}
        meta = {"documents": {}, "tokens": {}, "blocks": {}}
        for split, split_docs in splits.items():
            ids: list[int] = []
            for doc in split_docs:
                ids.extend(tok(doc)["input_ids"])
                ids.append(eos)
            n = len(ids) // block_size
            arr = np.asarray(ids[: n * block_size], dtype=dtype).reshape(n, block_size)
            (run_dir / "data" / name).mkdir(parents=True, exist_ok=True)
            arr.tofile(run_dir / "data" / name / f"{split}.bin")
            meta["documents"][split], meta["tokens"][split], meta["blocks"][split] = len(split_docs), int(arr.size), n
        write_json_atomic(run_dir / "data" / name / "meta.json", meta)
    top = {"shards": list(shards), "block_size": block_size, "dtype": np.dtype(dtype).name,
           "vocab_size": len(tok), "eos_token_id": eos}
    write_json_atomic(run_dir / "data" / "meta.json", top)
    return top


def train_briefly(model, blocks: np.ndarray, steps: int = 60, lr: float = 3e-3, batch: int = 8, seed: int = 0):
    """A few plain AdamW steps of next-token CE on ``blocks`` [N, T]: a model that has learnt something."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    data = torch.as_tensor(np.asarray(blocks, dtype=np.int64))
    for _ in range(steps):
        idx = torch.randint(0, len(data), (batch,), generator=g)
        x = data[idx]
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def tiny_experiment(tmp_path: str | Path, shards: tuple[str, ...] = ("code", "legal", "prose"), **sections):
    """An ExperimentConfig for a run in ``tmp_path / "run"`` with a tiny base; ``sections`` override
    top-level sections (dicts merged one level deep)."""
    from downscale.config import ExperimentConfig

    tree = {
        "run": {"name": "tiny", "dir": str(Path(tmp_path) / "run"), "seed": 0, "precision": "fp32"},
        "data": {"sources": [{"name": s, "kind": "builtin", "builtin": "python_code"} for s in shards],
                 "block_size": 32},
        "base": {"init": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4,
                          "num_kv_heads": 2},
                 "train": {"max_steps": 6, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "eval_every": 3,
                           "eval_batches": 1, "save_every": 2, "log_every": 1}},
    }
    for key, val in sections.items():
        tree[key] = {**tree.get(key, {}), **val} if isinstance(val, dict) else val
    return ExperimentConfig.model_validate(tree)


def mark_complete(cfg, stage_name: str) -> None:
    """Record ``stage_name`` as complete in the run's manifest, as pipeline.run_stage would after writing
    its outputs (which must already exist under the run directory)."""
    from downscale import pipeline

    pipeline.record_complete(cfg, stage_name)


def fake_data_run(tmp_path: str | Path, n_docs: int = 40, **sections):
    """A tiny experiment whose data stage is faked (tokenizer + blocks from synthetic domains) and
    marked complete. Returns the config."""
    cfg = tiny_experiment(tmp_path, **sections)
    shards = {name: domain_text(dom, n_docs, seed=i) for i, (name, dom) in
              enumerate(zip([s.name for s in cfg.data.sources], WORDS, strict=False))}
    make_run_data(cfg.run_dir, shards, block_size=cfg.data.block_size)
    mark_complete(cfg, "data")
    return cfg
