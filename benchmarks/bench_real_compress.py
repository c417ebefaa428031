"""Compress on the real SmolLM2-135M: loss right after pruning per shape family, per importance method (and
random), at 0.6 and 0.4 of the base; the shape search's choice and its time, beside the split policy's shape and
the same students without the least-squares refit (``compress.reconstruct``).

Runs the compress stage itself (``pipeline.run_stage(..., force=True)``) on a run directory whose data and
base stages are complete, e.g. after ``downscale run configs/smollm2-135m_to_3.yaml`` (or ``downscale data`` +
``downscale base`` of it). Each variant rewrites ``students/``; the importance scores are cached, so each
method's calibration pass runs once.

    .venv/bin/python benchmarks/bench_real_compress.py [--config configs/smollm2-135m_to_3.yaml]
        [--targets 0.6,0.4] [--methods activation,taylor,magnitude,random] [--out FILE.json] [--reuse]
        [run.dir=A-COPY-OF-THE-RUN]   (each variant rewrites students/: point it at a copy, `cp -a`)

The "policy" rows are the split policy's shape (what compress chose before the search); the family rows are
the best candidate of each family on the search blocks (mean over students of the mean NLL on held-out train
blocks of each student's own shard); the method rows are the validation loss (pooled over the three domains,
mean over students) of students of the searched shape cut with each importance method (search off).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _compress(config: str, overrides: list[str]) -> tuple[dict, float]:
    from downscale import pipeline
    from downscale.config import load_config

    cfg = load_config(config, overrides)
    t = time.time()
    pipeline.run_stage(cfg, "compress", force=True, log=lambda m: None)
    return json.loads((cfg.run_dir / "students" / "compress.json").read_text()), time.time() - t


def _reused(args, target: float) -> tuple[dict | None, float | None]:
    """The run directory's compress.json and the stage's seconds, when it was made at ``target`` with the search on
    and the config's other compress settings; else (None, None)."""
    from downscale import pipeline
    from downscale.config import load_config

    cfg = load_config(args.config, args.overrides)
    path = cfg.run_dir / "students" / "compress.json"
    if not path.is_file():
        return None, None
    rep = json.loads(path.read_text())
    if not rep["plan"].get("target_params"):  # made with an explicit shape (a method row), not at a target
        return None, None
    made_at = rep["plan"]["target_params"] / rep["base"]["params"]["total"]
    same = (abs(made_at - target) < 1e-3 and rep.get("search") and rep["settings"]["importance"] ==
            cfg.compress.importance and rep["settings"]["calibration"] == cfg.compress.calibration)
    if not same:
        return None, None
    return rep, pipeline.load_manifest(cfg.run_dir)["stages"]["compress"].get("seconds")


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "smollm2-135m_to_3.yaml"))
    ap.add_argument("--targets", default="0.6,0.4")
    ap.add_argument("--methods", default="activation,taylor,magnitude,random")
    ap.add_argument("--out", default=None)
    ap.add_argument("--reuse", action="store_true", help="use the run directory's students/compress.json for the "
                    "target it was made at (its search and baselines), instead of running that search again")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every variant (e.g. run.dir=...)")
    args = ap.parse_args()
    out: dict = {"config": args.config, "targets": {}}
    for target in [float(t) for t in args.targets.split(",")]:
        rep, secs = _reused(args, target) if args.reuse else (None, None)
        if rep is None:
            rep, secs = _compress(args.config, [*args.overrides, f"compress.target_params={target}"])
        else:
            print(f"== target {target}: the run directory's compress.json (its stage took {secs:.0f}s in a "
                  f"`downscale run`) is reused", flush=True)
        shape = rep["plan"]["chosen"]["shape"]
        search = rep["search"] or {}
        families: dict[str, dict] = {}
        for c in search.get("candidates", []):
            fam = c["family"].removeprefix("policy (").removesuffix(")")
            if c.get("loss") is not None and (fam not in families or c["loss"] < families[fam]["loss"]):
                families[fam] = c
        row = {"seconds": round(secs, 1), "search_seconds": search.get("seconds"), "chosen": rep["plan"]["chosen"],
               "policy_shape": rep["plan"]["student"]["shape"],
               "base_val_pooled": rep["base"]["val_loss"]["pooled"],
               "policy_search_loss": (search.get("policy") or {}).get("loss"),
               "chosen_search_loss": (search.get("chosen") or {}).get("loss"),
               "families": families, "grid_size": search.get("grid_size"),
               "students": [{"shard": s["shard"], "val": s["val_loss"],
                             "random": (s.get("random_baseline") or {}).get("val_loss"),
                             "unsearched": (s.get("unsearched") or {}).get("val_loss"),
                             "without_reconstruct": (s.get("without_reconstruct") or {}).get("val_loss")}
                            for s in rep["students"]],
               "methods": {}}
        print(f"== target {target}: chosen {shape} by {rep['plan']['chosen']['by']} in {secs:.0f}s "
              f"(search {search.get('seconds')}s over {search.get('grid_size')} grid shapes)", flush=True)
        for s in row["students"]:
            print(f"   student {s['shard']}: val pooled {s['val']['pooled']:.3f} (own {s['val'][s['shard']]:.3f}); "
                  f"random importance {s['random']['pooled'] if s['random'] else float('nan'):.3f}; split "
                  f"policy's shape {s['unsearched']['pooled'] if s['unsearched'] else float('nan'):.3f}; without the "
                  f"refit {s['without_reconstruct']['pooled'] if s['without_reconstruct'] else float('nan'):.3f}",
                  flush=True)
        for fam, c in sorted(families.items(), key=lambda kv: kv[1]["loss"]):
            print(f"   family {fam:<26} best {c['loss']:.3f}  {c['shape']}", flush=True)
        fixed = [f"compress.shape.{k}={v}" for k, v in shape.items()]
        for method in args.methods.split(","):
            rep_m, secs_m = _compress(args.config, [*args.overrides, f"compress.target_params={target}",
                                                    f"compress.importance={method}", "compress.search.enabled=false",
                                                    "compress.search.random_baseline=false", *fixed])
            pooled = [s["val_loss"]["pooled"] for s in rep_m["students"]]
            own = [s["val_loss"][s["shard"]] for s in rep_m["students"]]
            row["methods"][method] = {"val_pooled_mean": _mean(pooled), "val_pooled": pooled,
                                      "val_own_mean": _mean(own), "seconds": round(secs_m, 1)}
            print(f"   importance {method:<10} val pooled {_mean(pooled):.3f} (per student "
                  f"{', '.join(f'{x:.3f}' for x in pooled)}; own shard {_mean(own):.3f}) in {secs_m:.0f}s", flush=True)
        out["targets"][str(target)] = row
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
