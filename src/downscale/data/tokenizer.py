"""The run's tokenizer: a ByteLevel BPE trained on the training split, or the base model's own.

Either way it is saved in ``<run>/tokenizer/`` so that ``AutoTokenizer.from_pretrained`` loads it,
and every later stage (and every student) shares it. The trained BPE has ``<|endoftext|>`` as id 0,
used as bos, eos and pad; it adds no special tokens when encoding and decodes byte-exactly
(``decode(encode(x)) == x`` for any text; ``clean_up_tokenization_spaces`` is off).

Documents are encoded with the fast (Rust) tokenizer in batches. Special-token strings that occur
inside a document (``<|endoftext|>`` in a text about tokenizers) are encoded as plain text, so the
only separator tokens in the packed data are the ones the packer puts between documents
(``data.doc_separator``: see ``doc_separator``).
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


def load_base_tokenizer(name_or_path: str, revision: str | None, trust_remote_code: bool, config_file: str,
                        gguf_file: str | None = None) -> Any:
    """The base model's tokenizer: a hub id or local folder, ``package:<name>`` (an installed package's
    folder), or with ``gguf_file`` the tokenizer stored in that GGUF file. It must have an EOS token.
    Nothing is written to the source."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from downscale.config import ConfigError, remote_code_refusal, resolve_base_path

    hf_logging.set_verbosity_error()  # as every other stage has it (models.quiet_transformers): errors speak for us

    try:
        folder = resolve_base_path(name_or_path, config_file)
    except ConfigError as exc:
        raise StageError(str(exc)) from None
    what = f"{name_or_path!r}" + (f" (GGUF file {gguf_file!r})" if gguf_file else "")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tok = AutoTokenizer.from_pretrained(folder, revision=revision, trust_remote_code=trust_remote_code, **kwargs)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; the user needs one line
        refused = remote_code_refusal(exc, config_file, name_or_path)
        if refused is not None:
            raise StageError(str(refused)) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        key = "base.gguf_file" if gguf_file else "base.name_or_path"
        raise StageError(f"{config_file}: {key}: cannot load a tokenizer from {what}: {first[:300]}") from None
    if tok.eos_token_id is None:
        raise StageError(f"{name_or_path}: the tokenizer has no EOS token (base.name_or_path, used by "
                         f"data.tokenizer.kind: base); packing needs one between documents")
    return tok


def doc_separator(tok: Any, setting: str, kind: str, config_file: str) -> tuple[str, int]:
    """The token packed between documents, as (token, id), for ``data.doc_separator``.

    ``auto``: with the base's tokenizer (``kind == "base"``), ``<|endoftext|>`` if the vocabulary has it
    (the document separator of GPT-2-style pretraining, SmolLM2's included, whose eos is the chat
    turn's end), else the eos, else the bos; with a trained BPE its eos. Any other value must be a
    token of the vocabulary (a StageError naming ``data.doc_separator`` otherwise)."""
    vocab = tok.get_vocab()  # added (special) tokens included
    if setting != "auto":
        if setting not in vocab:
            raise StageError(f"{config_file}: data.doc_separator: {setting!r} is not a token of the run's tokenizer "
                             f"({type(tok).__name__}, {len(tok)} tokens); use auto or one of its tokens, e.g. "
                             f"{tok.eos_token!r}")
        return setting, int(vocab[setting])
    candidates = [EOS, tok.eos_token, tok.bos_token] if kind == "base" else [tok.eos_token]
    for token in candidates:
        if token is not None and token in vocab:
            return str(token), int(vocab[token])
    raise StageError(f"{config_file}: data.doc_separator: auto found no separator (no {EOS}, eos or bos in the "
                     f"tokenizer's vocabulary); name one of its tokens")


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
