"""The saved form of an ensemble: ``<run>/ensemble/ensemble.json`` plus its tokenizer and router files.

``ensemble.json`` (JSON, no pickle)::

    {"format": "downscale-ensemble", "version": 1,
     "students": ["specialized/0", ...],         # HF folders, relative to the run directory (the
                                                  # ensemble folder's parent) or absolute
     "student_fingerprints": ["<hash>", ...],      # downscale._io.dir_fingerprint of each, at combine time
     "vocab_size": 8192,
     "tokenizer": "tokenizer", "tokenizer_hash": "<hash>",   # folder inside the ensemble folder
     "modes": ["logit_mean", "prob_mean", "routed"], "default_mode": "logit_mean",
     "weights": [0.5, 0.5] | null,                # mode weighted
     "router": {"kind": "bayes" | "cluster", "prefix": int | null, "temperature": float,
                "top_k": int | null, "cluster_dir": "cluster" | null},   # cluster_dir inside the folder
     "sparse": {"top_k": 1, "prefix": 16},         # mode sparse (absent: these defaults)
     "prior": [..n floats..],                     # the Bayes router's prior (EM on validation blocks)
     "prior_estimate": {...},                     # how the prior was estimated (blocks, iterations, ...)
     "fast_path": true, "versions": {...}}

``load_ensemble(path, mode=None, device="cpu", dtype=torch.float32)`` reads it back; every
problem (a missing student, a changed tokenizer, bad weights, an unknown mode) is one
``EnsembleError`` line naming the file and the field.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import torch

from downscale._io import dir_fingerprint, read_json, write_json_atomic
from downscale.ensemble import EnsembleError, EnsembleModel, check_mode, check_weights

FORMAT, VERSION = "downscale-ensemble", 1
ENSEMBLE_FILE = "ensemble.json"
# The files that define a tokenizer's behaviour (tokenizer_config.json also holds volatile fields
# such as model_max_length, so it is copied but not hashed).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "special_tokens_map.json")
TOKENIZER_COPY = (*TOKENIZER_FILES, "tokenizer_config.json", "chat_template.jinja")


def tokenizer_hash(folder: str | Path) -> str | None:
    """Hash of the tokenizer files in ``folder`` (None when it holds none)."""
    folder = Path(folder)
    h, found = hashlib.sha256(), False
    for name in TOKENIZER_FILES:
        f = folder / name
        if f.is_file():
            found = True
            h.update(name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16] if found else None


def copy_tokenizer(src: str | Path, dst: str | Path) -> Path:
    """Copy the tokenizer files of ``src`` into the folder ``dst``."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_COPY:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    return dst


def student_vocab_size(folder: str | Path) -> int:
    """``vocab_size`` from a student folder's config.json."""
    cfg = read_json(Path(folder) / "config.json")
    return int(cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size"))


def check_students(folders: list[Path], reference_tokenizer: Path | None = None) -> dict:
    """Check that the student folders exist, are HF model folders, share one vocabulary size and one
    tokenizer (hash of the tokenizer files, against ``reference_tokenizer`` or the first student that
    has them). Raises EnsembleError naming the offending folder. Returns {"vocab_size", "tokenizer_dir",
    "tokenizer_hash", "without_tokenizer": [...]}."""
    for f in folders:
        if not (f / "config.json").is_file():
            raise EnsembleError(f"{f}: missing student (no config.json): expected a Hugging Face model folder")
    sizes = [student_vocab_size(f) for f in folders]
    common = max(sizes, key=lambda v: (sizes.count(v), -sizes.index(v)))  # the majority (ties: the first)
    for f, size in zip(folders, sizes, strict=True):
        if size != common:
            others = [str(g) for g, v in zip(folders, sizes, strict=True) if v == common]
            raise EnsembleError(f"{f}: vocab_size {size} differs from the {common} of {', '.join(others)}; the "
                                f"students of an ensemble must share one vocabulary")
    ref_dir = reference_tokenizer if reference_tokenizer is not None and tokenizer_hash(reference_tokenizer) else None
    if ref_dir is None:
        ref_dir = next((f for f in folders if tokenizer_hash(f)), None)
    if ref_dir is None:
        raise EnsembleError(f"{folders[0]}: no tokenizer files in any student folder (nor a run tokenizer)")
    ref = tokenizer_hash(ref_dir)
    missing = []
    for f in folders:
        h = tokenizer_hash(f)
        if h is None:
            missing.append(str(f))
        elif h != ref:
            raise EnsembleError(f"{f}: its tokenizer differs from {ref_dir}'s; the students of an ensemble must "
                                f"share one tokenizer")
    from transformers import AutoTokenizer

    n_tokens = len(AutoTokenizer.from_pretrained(str(ref_dir)))
    if n_tokens > sizes[0]:
        raise EnsembleError(f"{ref_dir}: the tokenizer has {n_tokens} tokens but the students' vocab_size is "
                            f"{sizes[0]}")
    return {"vocab_size": sizes[0], "tokenizer_dir": ref_dir, "tokenizer_hash": ref, "without_tokenizer": missing}


def write_ensemble(out_dir: str | Path, spec: dict, tokenizer_dir: str | Path,
                   cluster_dir: str | Path | None = None) -> Path:
    """Write an ensemble folder: ``ensemble.json`` (from ``spec``; the format, version, tokenizer and
    router folder names are filled in), the tokenizer files, and a copy of the clusterer folder."""
    from downscale._io import package_versions

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    copy_tokenizer(tokenizer_dir, out_dir / "tokenizer")
    spec = {"format": FORMAT, "version": VERSION, **spec, "tokenizer": "tokenizer",
            "tokenizer_hash": tokenizer_hash(out_dir / "tokenizer")}
    router = dict(spec.get("router") or {})
    if cluster_dir is not None:
        dst = out_dir / "cluster"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(cluster_dir, dst)
        router["cluster_dir"] = "cluster"
    else:
        router.setdefault("cluster_dir", None)
    spec["router"] = router
    spec.setdefault("versions", package_versions())
    write_json_atomic(out_dir / ENSEMBLE_FILE, spec)
    return out_dir / ENSEMBLE_FILE


def read_spec(path: str | Path) -> tuple[dict, Path, Path]:
    """(spec, ensemble folder, run directory) of an ensemble folder or its ensemble.json."""
    path = Path(path)
    file = path / ENSEMBLE_FILE if path.is_dir() or path.suffix != ".json" else path
    if not file.is_file():
        raise EnsembleError(f"{file}: no ensemble here (run `downscale combine` first)")
    try:
        spec = read_json(file)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EnsembleError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise EnsembleError(f"{file}: format: expected {FORMAT!r}")
    if spec.get("version") != VERSION:
        raise EnsembleError(f"{file}: version: expected {VERSION}; got {spec.get('version')!r}")
    for key in ("students", "modes", "default_mode", "vocab_size", "tokenizer", "router"):
        if key not in spec:
            raise EnsembleError(f"{file}: {key}: required field is missing")
    if not isinstance(spec["students"], list) or not spec["students"]:
        raise EnsembleError(f"{file}: students: expected a non-empty list of folders")
    for i, m in enumerate(spec["modes"]):
        check_mode(m, f"{file}: modes[{i}]")
    check_mode(spec["default_mode"], f"{file}: default_mode")
    return spec, file.parent, file.parent.parent


def student_folders(spec: dict, run_dir: Path) -> list[Path]:
    return [Path(p) if Path(p).is_absolute() else run_dir / p for p in spec["students"]]


def load_ensemble(path: str | Path, mode: str | None = None, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, fast: bool | None = None,
                  loaded: dict[Path, torch.nn.Module] | None = None, verify: bool = True) -> EnsembleModel:
    """Load a saved ensemble (see the module docs). ``fast``: None follows the saved ``fast_path``. ``loaded``:
    students already in memory (folder -> model, in ``dtype`` on ``device``), used instead of a second copy (the
    evaluate stage holds the specialized students already: n more 1B students in fp32 would be ~4n GB); the fast
    path then stacks their weights in place (they stay usable one by one). ``verify``: refuse a student folder
    whose fingerprint differs from the one recorded at combine time (``student_fingerprints``)."""
    from transformers import AutoTokenizer

    from downscale import models

    spec, ens_dir, run_dir = read_spec(path)
    file = ens_dir / ENSEMBLE_FILE
    folders = student_folders(spec, run_dir)
    for i, f in enumerate(folders):
        if not (f / "config.json").is_file():
            raise EnsembleError(f"{file}: students[{i}]: missing student folder {f}")
        size = student_vocab_size(f)
        if size != int(spec["vocab_size"]):
            raise EnsembleError(f"{file}: students[{i}]: {f} has vocab_size {size}, the ensemble {spec['vocab_size']}")
    recorded = spec.get("student_fingerprints")
    if verify and recorded is not None:
        if len(recorded) != len(folders):
            raise EnsembleError(f"{file}: student_fingerprints: {len(recorded)} for {len(folders)} students")
        for i, (f, fp) in enumerate(zip(folders, recorded, strict=True)):
            if dir_fingerprint(f) != fp:
                raise EnsembleError(f"{file}: students[{i}]: {f} changed since the ensemble was made (its prior and "
                                    f"router were fitted to the student it held then): run `downscale combine` "
                                    f"again, or pass verify=False to load it as it is")
    tok_dir = ens_dir / spec["tokenizer"]
    if tokenizer_hash(tok_dir) != spec.get("tokenizer_hash"):
        raise EnsembleError(f"{file}: tokenizer_hash: the tokenizer in {tok_dir} changed since the ensemble was saved")
    mode = check_mode(mode if mode is not None else spec["default_mode"], f"{file}: mode")
    if spec.get("weights") is not None:
        check_weights(spec["weights"], len(folders), f"{file}: weights")
    router: dict[str, Any] = spec["router"]
    cluster_dir = ens_dir / router["cluster_dir"] if router.get("cluster_dir") else None
    if mode in ("routed", "sparse") and router.get("kind") == "cluster" and (cluster_dir is None or
                                                                        not cluster_dir.exists()):
        raise EnsembleError(f"{file}: router.cluster_dir: the clusterer folder is missing")
    have = {Path(k).resolve(): m for k, m in (loaded or {}).items()}
    students = [m if (m := have.get(f.resolve())) is not None else models.load_causal_lm(f, dtype=dtype, device=device)
                for f in folders]
    for s in students:
        s.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    try:
        return EnsembleModel(
            students, mode=mode, weights=spec.get("weights"), prior=spec.get("prior"),
            router=router.get("kind", "bayes"), router_prefix=router.get("prefix"),
            router_temperature=float(router.get("temperature", 1.0)), router_top_k=router.get("top_k"),
            cluster_dir=cluster_dir, tokenizer=tokenizer,
            fast=bool(spec.get("fast_path", True)) if fast is None else fast,
            sparse_top_k=int((spec.get("sparse") or {}).get("top_k", 1)),
            sparse_prefix=int((spec.get("sparse") or {}).get("prefix", 16)))
    except EnsembleError as exc:
        raise EnsembleError(f"{file}: {exc}") from None

