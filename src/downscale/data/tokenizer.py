"""The run's tokenizer: a ByteLevel BPE trained on the training split, or the base model's own.

Either way it is saved in ``<run>/tokenizer/`` so that ``AutoTokenizer.from_pretrained`` loads it,
and every later stage (and every student) shares it. The trained BPE has ``<|endoftext|>`` as id 0,
used as bos, eos and pad; it adds no special tokens when encoding and decodes byte-exactly
(``decode(encode(x)) == x`` for any text; ``clean_up_tokenization_spaces`` is off).

Documents are encoded with the fast (Rust) tokenizer in batches. Special-token strings that occur
inside a document (``<|endoftext|>`` in a text about tokenizers) are encoded as plain text, so the
only EOS tokens in the packed data are the ones the packer puts between documents.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from downscale.pipeline import StageError

EOS = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2, length: int | None = None) -> Any:
    """Train a ByteLevel BPE on ``texts``; return it wrapped as a ``PreTrainedTokenizerFast`` with
    ``<|endoftext|>`` (id 0) as bos/eos/pad."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer(add_prefix_space=False, trim_offsets=False)
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS],
                            show_progress=False, length=length)
    if bpe.token_to_id(EOS) != 0:  # the trainer puts special tokens first; make sure of it
        raise RuntimeError(f"{EOS} got id {bpe.token_to_id(EOS)}, expected 0")
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, pad_token=EOS,
                                   clean_up_tokenization_spaces=False)


def load_base_tokenizer(name_or_path: str, revision: str | None, trust_remote_code: bool, config_file: str) -> Any:
    """The base model's tokenizer (hub id or local folder). It must have an EOS token."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; the user needs one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StageError(f"{config_file}: base.name_or_path: cannot load a tokenizer from {name_or_path!r}: "
                         f"{first[:300]}") from None
    if tok.eos_token_id is None:
        raise StageError(f"{name_or_path}: the tokenizer has no EOS token (base.name_or_path, used by "
                         f"data.tokenizer.kind: base); packing needs one between documents")
    return tok


def save_tokenizer(tok: Any, out_dir: str | Path) -> Path:
    """Save ``tok`` into ``out_dir`` (a staging folder: the pipeline renames it into place)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    return out_dir


def batch_encoder(tok: Any) -> Callable[[list[str]], list[list[int]]]:
    """A function encoding a list of documents to token ids: no special tokens added, special-token
    strings inside the text encoded as text, no truncation. Uses the Rust tokenizer when there is one."""
    backend = getattr(tok, "backend_tokenizer", None) if getattr(tok, "is_fast", False) else None
    if backend is not None:
        from tokenizers import Tokenizer

        fast = Tokenizer.from_str(backend.to_str())  # a private copy: the settings below stay local
        fast.no_truncation()
        fast.no_padding()
        fast.encode_special_tokens = True
        encode = getattr(fast, "encode_batch_fast", fast.encode_batch)

        def run(texts: list[str]) -> list[list[int]]:
            return [e.ids for e in encode(texts, add_special_tokens=False)]

        return run

    def run_slow(texts: list[str]) -> list[list[int]]:
        out = tok(texts, add_special_tokens=False, split_special_tokens=True, truncation=False, verbose=False)
        return list(out["input_ids"])

    return run_slow


def tokenizer_info(tok: Any, kind: str, source: str) -> dict:
    """What meta.json records about the tokenizer."""
    return {"kind": kind, "source": source, "class": type(tok).__name__, "vocab_size": len(tok),
            "eos_token": tok.eos_token, "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id,
            "pad_token_id": tok.pad_token_id, "is_fast": bool(getattr(tok, "is_fast", False))}
