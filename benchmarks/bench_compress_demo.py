"""Wall time of ``downscale compress configs/demo.yaml`` on a base of the demo's shape.

The demo's base (LLaMA, hidden 256, MLP 704, 6 layers, 8 heads, 4 KV heads, vocab 8192, tied) is
built with random weights in a fake run with three shards of random token blocks in the data
stage's layout (block 256; 400 train and 256 val blocks per shard, as the demo's 65,536 eval
tokens per shard give), then the real CLI runs the stage with the demo config. Random weights and
tokens cost the same time as trained ones. The issue asks for <= 2 minutes on 2 CPU cores.

    .venv/bin/python benchmarks/bench_compress_demo.py [--threads 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def build_fake_run(run_dir: Path) -> None:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from downscale import models, pipeline
    from downscale._io import write_json_atomic
    from downscale.config import load_config

    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"run.dir={run_dir}"], check_paths=False)
    vocab, block = cfg.data.tokenizer.vocab_size, cfg.data.block_size
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["def f(x): return x  # the license shall apply"] * 20, vocab_size=300,
                            min_frequency=1, special_tokens=["<|endoftext|>"], show_progress=False)
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(run_dir / "tokenizer")
    rng = np.random.default_rng(0)
    shards = [s.name for s in cfg.data.sources]
    for name in shards:
        for split, n in (("train", 400), ("val", 256), ("test", 16)):
            (run_dir / "data" / name).mkdir(parents=True, exist_ok=True)
            rng.integers(0, vocab, (n, block), dtype=np.uint16).tofile(run_dir / "data" / name / f"{split}.bin")
        write_json_atomic(run_dir / "data" / name / "meta.json", {"fake": True})
    write_json_atomic(run_dir / "data" / "meta.json", {"shards": shards, "block_size": block, "dtype": "uint16",
                                                       "vocab_size": vocab, "eos_token_id": 0})
    base = models.build_model(cfg.base.init, vocab_size=vocab, max_positions=block)
    models.save_causal_lm(base, run_dir / "base", tokenizer_dir=run_dir / "tokenizer")
    for name in ("data", "base"):  # recorded as the pipeline records a finished stage
        pipeline.record_complete(cfg, name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the CI machine has 2 cores)")
    ap.add_argument("--keep", default=None, help="build the run here and keep it")
    args = ap.parse_args()
    run_dir = Path(args.keep or tempfile.mkdtemp(prefix="bench_compress_"))
    build_fake_run(run_dir)
    cmd = [sys.executable, "-m", "downscale.cli", "compress", str(ROOT / "configs" / "demo.yaml"),
           f"run.dir={run_dir}", f"run.threads={args.threads}"]
    env = {**os.environ, "DOWNSCALE_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    sys.stderr.write(proc.stderr[-4000:])
    if proc.returncode:
        print(f"downscale compress failed with exit {proc.returncode}")
        return 1
    report = json.loads((run_dir / "students" / "compress.json").read_text())
    load = os.getloadavg()[0]
    print(f"downscale compress configs/demo.yaml: {wall:.1f}s wall, {cpu:.1f}s CPU, {args.threads} threads, "
          f"load average {load:.2f} (limit 120s wall on 2 idle cores)")
    print(f"  students: {len(report['students'])} x {report['students'][0]['params']['total']:,} params "
          f"({report['students'][0]['fraction_of_base']:.1%} of the base), per student "
          f"{[s['seconds'] for s in report['students']]} s")
    stage_s = json.loads((run_dir / "manifest.json").read_text())["stages"]["compress"]["seconds"]
    print(f"  time inside the stage (manifest): {stage_s}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
