"""The report: tables and plots from ``eval/results.json``.

``write_report(results, out_dir)`` writes ``report.md``, ``loss_vs_ensemble_size.png`` and
``loss_vs_params.png``. Everything shown is what was measured; when the ensemble loses to the base
or to the control, the report says so in its first lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from downscale._io import write_text_atomic


def _fmt_params(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _fmt_num(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _sci(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def verdict(results: dict) -> str:
    """One or two sentences: did the ensemble beat the base (and the control)? As measured."""
    v = results["verdict"]
    if v.get("best_ensemble") is None:
        return "No ensemble was evaluated."
    diff = v["margin_vs_base"]
    size = v.get("ensemble_params_fraction_of_base", 0)
    text = (f"The best ensemble, {v['best_ensemble']}, {'BEATS' if v['ensemble_beats_base'] else 'does NOT beat'} "
            f"the base: pooled test loss {v['best_ensemble_loss']:.4f} vs {v['base_loss']:.4f} nats/token "
            f"({'-' if diff > 0 else '+'}{abs(diff):.4f}), with {size:.2f}x the base's parameters in total.")
    if v.get("best_ensemble_flops_ratio") is not None:
        text += f" It runs at {v['best_ensemble_flops_ratio']:.2f}x the base's inference FLOPs per token."
    if "control_loss" in v:
        text += (f" Against the compute-matched control ({v['control_loss']:.4f}) it "
                 f"{'wins' if v['ensemble_beats_control'] else 'loses'}.")
    if "at_inference_cost" in v:
        cheap = v.get("best_at_most_base_cost")
        if cheap is None:
            text += " At equal inference cost: no ensemble runs at or below the base's FLOPs per token."
        else:
            text += (f" At equal inference cost: the best ensemble that costs at most the base per token, "
                     f"{cheap['name']} ({cheap['loss']:.4f}), {cheap['statement']}.")
    return text


def main_table(results: dict) -> str:
    """The Markdown table of every row: loss per domain and pooled, perplexity, parameters, FLOPs, speed."""
    shards = results["shards"]
    head = ["model", *shards, "pooled", "ppl", "params", "active", "FLOPs/tok", "tok/s", "peak MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    best = {s: min(r["loss"][s] for r in results["rows"]) for s in [*shards, "pooled"]}
    for r in results["rows"]:
        cells = [r["name"]]
        for s in [*shards, "pooled"]:
            val = f"{r['loss'][s]:.4f}"
            cells.append(f"**{val}**" if abs(r["loss"][s] - best[s]) < 1e-12 else val)
        cells += [f"{r['perplexity']['pooled']:.2f}", _fmt_params(r["params"]), _fmt_params(r["active_params"]),
                  _sci(r.get("flops_per_token")),
                  _fmt_num(r.get("throughput_tokens_per_s"), 0), _fmt_num(r.get("peak_memory_mb"), 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(results: dict, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    plots = _plots(results, out_dir)
    shards = results["shards"]
    md: list[str] = [f"# downscale report: {results['run']}", "", "## Verdict", "", verdict(results), ""]
    md += ["## Test loss (nats/token; pooled = total NLL / total tokens)", "",
           f"Every row is scored on the same test blocks: {sum(results['test_tokens'].values())} predicted tokens "
           f"from {len(shards)} shards, context {results['context']}. Bold: best in the column. "
           "'active' = parameters run per token; FLOPs per token are forward FLOPs at this context. "
           "peak MB is measured on CUDA only.", "", main_table(results), ""]
    md += ["## Winner per domain", "", "| domain | winner | loss |", "|---|---|---|"]
    md += [f"| {s} | {w['name']} | {w['loss']:.4f} |" for s, w in results["winners"].items()]
    oracle = next((r for r in results["rows"] if r["kind"] == "oracle"), None)
    if oracle:
        md += ["", "The oracle picks, for each domain, the specialized student that is best on it (chosen on the "
               "test set itself: an upper bound for routing by domain): "
               + ", ".join(f"{s} -> {p}" for s, p in oracle["picks"].items()) + "."]
    md += _inference_md(results, plots)
    md += ["", "## Ensemble size", "",
           f"The downscaling-law comparison (`ensemble_size_curve` in results.json, what `downscale law` reads) "
           f"uses mode **{results.get('curve_mode', 'logit_mean')}**. A routed subset is the routed ensemble of "
           "those students (the prior restricted to them); sparse subsets keep at most m students.", ""]
    for mode, pts in results["ensemble_size_curves"].items():
        lf = results["law_fit"].get(mode, {})
        fit = lf.get("fit") or {"status": "not fitted", "note": lf.get("error", "no fit")}
        md += [f"**{mode}**: mean loss over subsets of m students: "
               + ", ".join(f"m={p['m']}: {p['loss']:.4f} ({p['subsets']} subsets)" for p in pts) + "."]
        if fit.get("L_inf") is not None:
            md += [f"Fit L(m) = L_inf + B / m^a: L_inf = {fit['L_inf']:.4f}, B = {fit['B']:.4f}, a = {fit['a']:.3f}, "
                   f"R^2 = {_fmt_num(fit.get('r2'))} ({fit['status']}{'; ' + fit['note'] if fit.get('note') else ''})."
                   f" Smallest ensemble predicted to beat the base: "
                   f"{results['law_fit'][mode].get('m_beats_base') or 'none (L_inf is not below the base)'}.", ""]
        else:
            md += [f"Fit: {fit.get('note') or fit['status']}", ""]
    md += [f"![loss vs ensemble size]({plots['curve']})", ""]
    g = results["downscaling_guarantee"]
    md += ["## The downscaling guarantee for this base", "",
           f"With the paper's constants (a={g['constants']['a']}, b={g['constants']['b']}, "
           f"gamma={g['constants']['gamma']}, delta={g['constants']['delta']}) and N0 = "
           f"{results['base']['params'] / 1e9:.4g}B parameters, the smallest ensemble the law guarantees to beat "
           + (f"the base is n = {g['n_min']}" if g.get("n_min") is not None else
              "the base: none within the searched range (the law gives no guarantee for a base this small)")
           + f" (right-hand side {g['rhs']:.4f}). This run used "
           f"{len(results['ensemble_size_curve'])} students. The law's constants were fitted to large models; at "
           "this scale they are a reference, not a prediction.", ""]
    md += ["## Parameters", "", f"![loss vs parameters]({plots['params']})", ""]
    md += compression_md(results.get("compression") or {})
    md += quality_md(results.get("data_quality") or {}, out_dir, results["rows"])
    md += _ledger_md(results)
    text = "\n".join(md) + "\n"
    write_text_atomic(out_dir / "report.md", text)
    return out_dir / "report.md"


def compression_summary(comp: dict, top: int = 10) -> dict:
    """What the report shows of ``students/compress.json``: the chosen shape and how, the candidates the
    search scored (best ``top``), and per student the loss right after pruning beside its baselines."""
    if not comp:
        return {}
    search = comp.get("search") or {}
    out = {"chosen": (comp.get("plan") or {}).get("chosen"), "policy_shape": (comp.get("plan") or {}).get("student"),
           "importance": (comp.get("settings") or {}).get("importance"), "base_val_loss": comp["base"]["val_loss"],
           "reconstruct": (comp.get("settings") or {}).get("reconstruct"),
           "candidates": (search.get("candidates") or [])[:top], "grid_size": search.get("grid_size"),
           "ranked_by": search.get("ranked_by"), "search_seconds": search.get("seconds"), "students": []}
    for st in comp.get("students", []):
        out["students"].append({"index": st["index"], "shard": st["shard"], "val_loss": st["val_loss"],
                                "random_baseline": (st.get("random_baseline") or {}).get("val_loss"),
                                "unsearched": (st.get("unsearched") or {}).get("val_loss"),
                                "without_reconstruct": (st.get("without_reconstruct") or {}).get("val_loss")})
    return out


def compression_md(comp: dict) -> list[str]:
    """The report's compression section (empty without compress.json)."""
    if not comp or not comp.get("students"):
        return []
    ch = comp.get("chosen") or {}
    shape = ch.get("shape") or {}
    md = ["## Compression", "",
          f"Students of {_fmt_params((ch.get('params') or {}).get('total'))} parameters "
          f"({ch.get('fraction_of_base', 0):.1%} of the base), shape chosen by {ch.get('by', '?')}: hidden "
          f"{shape.get('hidden_size')}, MLP {shape.get('intermediate_size')}, heads {shape.get('num_heads')}/"
          f"{shape.get('num_kv_heads')} (query/KV), {shape.get('num_layers')} layers; importance "
          f"{comp.get('importance')}"
          f"{'; kept projections refit by least squares' if comp.get('reconstruct') else ''}. Validation loss right "
          "after pruning (pooled, nats/token), beside a student of the same shape cut with random importance, the "
          "split policy's shape (what the search replaced) and the same student without the refit:",
          "", "| student | shard | pruned | random importance | split policy's shape | without refit |",
          "|---|---|---|---|---|---|"]
    for st in comp["students"]:
        rnd, uns = st.get("random_baseline") or {}, st.get("unsearched") or {}
        wr = st.get("without_reconstruct") or {}
        md.append(f"| {st['index']} | {st['shard']} | {st['val_loss']['pooled']:.3f} | "
                  f"{_fmt_num(rnd.get('pooled'), 3)} | {_fmt_num(uns.get('pooled'), 3)} | "
                  f"{_fmt_num(wr.get('pooled'), 3)} |")
    md.append(f"| base | | {comp['base_val_loss']['pooled']:.3f} | | | |")
    if comp.get("candidates"):
        md += ["", f"Shape search: {comp.get('grid_size')} grid shapes, best {len(comp['candidates'])} of those scored "
               f"({comp.get('ranked_by')}; mean NLL on held-out train blocks of each student's own shard, ranked "
               f"by the blocks a shape survived to, then by loss; "
               f"{_fmt_num(comp.get('search_seconds'), 0)} s):", "",
               "| cut | hidden | MLP | heads | layers | params | loss | blocks |", "|---|---|---|---|---|---|---|---|"]
        for c in comp["candidates"]:
            s = c["shape"]
            md.append(f"| {c['family']} | {s['hidden_size']} | {s['intermediate_size']} | {s['num_heads']}/"
                      f"{s['num_kv_heads']} | {s['num_layers']} | {c['fraction_of_base']:.1%} | "
                      f"{_fmt_num(c.get('loss'), 3)} | {c.get('blocks_scored', '-')} |")
    return md + [""]


def quality_md(quality: dict, out_dir: Path, rows: list[dict] | None = None) -> list[str]:
    """The data pruning by quality (``quality.enabled``): per student's shard, the band of the base's NLL per
    document, what was kept and dropped, a plot of each shard's score distribution with its band, and with
    ``evaluate.quality_ablation`` each student against its twin trained on the unpruned shard."""
    if not quality:
        return []
    md = ["## Data pruned by quality", "",
          "Each training document of a student's shard was scored by the base's mean NLL per token (its first "
          "`quality.score_tokens` tokens); the documents inside the band of percentiles were kept, re-packed and "
          "trained on (the same steps and tokens as without pruning).", "",
          "| student | shard | band (percentiles) | band (nats/token) | documents kept | dropped low / high | "
          "tokens kept | mean NLL all -> kept |", "|---|---|---|---|---|---|---|---|"]
    for i, q in quality.items():
        d, t, sm = q["documents"], q["tokens"], q["score_mean"]
        md.append(f"| {i} | {q['shard']} | {q['band'][0]:g}-{q['band'][1]:g} | {_fmt_num(q['thresholds'][0])}-"
                  f"{_fmt_num(q['thresholds'][1])} | {d['kept']} of {d['scored'] + d['unscored']} | "
                  f"{d['dropped_low']} / {d['dropped_high']} | {t['kept']:,} of {t['before']:,} | "
                  f"{_fmt_num(sm['all'])} -> {_fmt_num(sm['kept'])} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(quality), figsize=(3.2 * len(quality), 2.8), squeeze=False)
    for ax, (i, q) in zip(axes[0], quality.items(), strict=True):
        counts, edges = q["histogram"]["counts"], q["histogram"]["edges"]
        if counts:
            ax.stairs(counts, edges, fill=True, alpha=0.6)
        for x in q["thresholds"]:
            if x is not None and x == x:  # NaN when nothing was scored
                ax.axvline(x, color="r", lw=1)
        ax.set_title(f"student {i} ({q['shard']})", fontsize=9)
        ax.set_xlabel("base NLL per token (document mean)", fontsize=8)
    axes[0][0].set_ylabel("documents")
    fig.tight_layout()
    _save_fig(fig, out_dir / "data_quality.png")
    plt.close(fig)
    md += ["", "![document scores and the kept band](data_quality.png)", ""]
    pairs = [(next((p for p in rows or [] if p["name"] == r["pairs_with"]), None), r) for r in rows or []
             if r["kind"] == "ablation"]
    if pairs:
        md += ["The ablation (`evaluate.quality_ablation`): each student specialized again on its unpruned shard, "
               "the same steps, tokens and settings. Test loss, pooled (own shard in brackets):", "",
               "| student | pruned data | unpruned data | difference |", "|---|---|---|---|"]
        for p, r in pairs:
            if p is None:
                continue
            shard = next((q["shard"] for q in quality.values() if r["pairs_with"].endswith(f"({q['shard']})")), None)
            own = (f" ({p['loss'][shard]:.4f})", f" ({r['loss'][shard]:.4f})") if shard else ("", "")
            md.append(f"| {p['name']} | {p['loss']['pooled']:.4f}{own[0]} | {r['loss']['pooled']:.4f}{own[1]} | "
                      f"{p['loss']['pooled'] - r['loss']['pooled']:+.4f} |")
        md.append("")
    return md


def _inference_md(results: dict, plots: dict[str, str]) -> list[str]:
    """Each ensemble against the base at its inference cost (FLOPs per token), and the two frontier plots."""
    v = results["verdict"]
    rows = v.get("at_inference_cost") or []
    if not rows:
        return []
    by_name = {r["name"]: r for r in results["rows"]}
    md = ["", "## Inference cost", "",
          "Each ensemble against the base at what it costs to run: forward FLOPs per token at this context "
          "(sparse: what really ran, averaged over positions, the routing prefix included).", "",
          "| ensemble | pooled | active params | FLOPs/tok | x base | verdict |", "|---|---|---|---|---|---|"]
    for e in rows:
        r = by_name.get(e["name"], {})
        md.append(f"| {e['name']} | {e['loss']:.4f} | {_fmt_params(r.get('active_params'))} | "
                  f"{_sci(r.get('flops_per_token'))} | {e['flops_ratio']:.2f} | {e['statement']} |")
    sp = next((r for r in results["rows"] if r.get("sparse")), None)
    if sp:
        info = sp["sparse"]
        md += ["", f"Sparse routing: the {info['router']} router reads the first {info['prefix']} tokens of each "
               f"sequence (every student runs there), then the top {info['top_k']} run alone; sequences routed to "
               f"each student: {info['sequences_routed']}; fraction of positions each student ran on: "
               f"{', '.join(f'{x:.2f}' for x in info['active_fraction'])}."]
    md += ["", f"![loss vs inference FLOPs]({plots['inference']})", "",
           f"![loss vs training FLOPs]({plots['training']})", "",
           "Training FLOPs: the base at its own training cost when trained here, else a Chinchilla compute-optimal "
           "estimate for its size (an imported base was trained elsewhere); the students and ensembles add the "
           "pipeline's ledger (compress + specialize) to it, the control its own training."]
    return md


def _ledger_md(results: dict) -> list[str]:
    led = results["ledger"]
    md = ["## Compute ledger", "",
          f"Training FLOPs = 6 N D, teacher and calibration passes = 2 N D. Energy = wall time x "
          f"{led['assumptions']['device_watts']:.0f} W per device; CO2 at {led['assumptions']['grid_gco2_per_kwh']:.0f}"
          " gCO2e/kWh. These are estimates from wall time, not metered.", "",
          "| stage | FLOPs | tokens | wall s | kWh | kg CO2e |", "|---|---|---|---|---|---|"]
    for r in led["stages"]:
        md.append(f"| {r['stage']} | {_sci(r['flops'])} | {_sci(r['tokens'])} | {r['seconds']:.1f} | "
                  f"{r['kwh']:.4f} | {r['co2_kg']:.4f} |")
    t = led["pipeline_total"]
    md.append(f"| **pipeline total** (without the control) | {_sci(t['flops'])} | {_sci(t['tokens'])} | "
              f"{t['seconds']:.1f} | {t['kwh']:.4f} | {t['co2_kg']:.4f} |")
    md += ["", "Beside it, training a model of the base's size compute-optimally from scratch, by the Chinchilla fits "
           "(their losses are on Chinchilla's data and tokenizer, so only the compute is comparable):", ""]
    for name, fs in led["from_scratch"].items():
        md.append(f"- {name}: {_sci(fs['tokens'])} tokens, {_sci(fs['flops'])} FLOPs.")
    return [*md, ""]


def _plots(results: dict, out_dir: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from downscale.law import ensemble_law

    names = {"curve": "loss_vs_ensemble_size.png", "params": "loss_vs_params.png",
             "inference": "loss_vs_inference_flops.png", "training": "loss_vs_training_flops.png"}
    base_loss = results["base"]["loss"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, pts in results["ensemble_size_curves"].items():
        ms = np.array([p["m"] for p in pts])
        ax.errorbar(ms, [p["loss"] for p in pts], yerr=[[p["loss"] - p["min"] for p in pts],
                                                        [p["max"] - p["loss"] for p in pts]],
                    marker="o", capsize=3, label=f"{mode} (measured)")
        fit = results["law_fit"].get(mode, {}).get("fit") or {}
        if fit.get("L_inf") is not None:
            grid = np.linspace(1, max(ms.max(), 2), 100)
            ax.plot(grid, ensemble_law(grid, fit["L_inf"], fit["B"], fit["a"]), "--", alpha=0.7,
                    label=f"{mode} fit")
    ax.axhline(base_loss, color="k", lw=1, label="base")
    control = results["verdict"].get("control_loss")
    if control is not None:
        ax.axhline(control, color="gray", lw=1, ls=":", label="control")
    ax.set_xlabel("students in the ensemble (m)")
    ax.set_ylabel("pooled test loss (nats/token)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_fig(fig, out_dir / names["curve"])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    _scatter_rows(ax, results["rows"], "params")
    ax.set_xscale("log")
    ax.set_xlabel("total parameters")
    ax.set_ylabel("pooled test loss (nats/token)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_fig(fig, out_dir / names["params"])
    plt.close(fig)

    # the frontier at inference: pooled loss against forward FLOPs per token, every row
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _scatter_rows(ax, results["rows"], "flops_per_token", annotate=("ensemble", "oracle", "control"))
    ax.axhline(base_loss, color="k", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("inference FLOPs per token (forward)")
    ax.set_ylabel("pooled test loss (nats/token)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_fig(fig, out_dir / names["inference"])
    plt.close(fig)

    # and at training: what each row cost to make, in total
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (label, x), group in _training_points(results).items():
        for r in group:
            ax.scatter([x], [r["loss"]["pooled"]], marker=MARKERS.get(r["kind"], "o"), s=60)
            ax.annotate(r.get("mode") or r["kind"], (x, r["loss"]["pooled"]), fontsize=7, xytext=(4, 2),
                        textcoords="offset points")
        ax.axvline(x, color="gray", lw=0.5, ls=":")
        # the group's name along its line, inside the axes (x in data, y in axes fraction)
        ax.text(x, 0.98, label, rotation=90, fontsize=7, va="top", ha="right", transform=ax.get_xaxis_transform())
    ax.set_xscale("log")
    ax.set_xlabel("total training FLOPs to make the model")
    ax.set_ylabel("pooled test loss (nats/token)")
    fig.tight_layout()
    _save_fig(fig, out_dir / names["training"])
    plt.close(fig)
    return names


MARKERS = {"base": "s", "pruned": "v", "specialized": "o", "ensemble": "*", "control": "D", "oracle": "P"}


def _scatter_rows(ax: Any, rows: list[dict], x_key: str, annotate: tuple[str, ...] = ()) -> None:
    """Pooled loss against ``row[x_key]``, one marker per kind of row (rows without that value left out); rows of
    the ``annotate`` kinds labelled with their mode."""
    for kind, marker in MARKERS.items():
        pts = [r for r in rows if r["kind"] == kind and r.get(x_key)]
        if not pts:
            continue
        ax.scatter([r[x_key] for r in pts], [r["loss"]["pooled"] for r in pts], marker=marker, s=60, label=kind)
        if kind in annotate:
            for r in pts:
                ax.annotate(r.get("mode") or kind, (r[x_key], r["loss"]["pooled"]), fontsize=7, xytext=(4, 2),
                            textcoords="offset points")


def _training_points(results: dict) -> dict[tuple[str, float], list[dict]]:
    """(label, total training FLOPs) -> the rows made at that cost: the base (its pretraining here, or a
    compute-optimal from-scratch estimate), the pruned and specialized students and ensembles (the base plus the
    pipeline's ledger), the control (the base plus its training)."""
    led = results["ledger"]
    trained = next((r["flops"] for r in led["stages"] if r["stage"].startswith("base (pretraining)")), None)
    base_x = trained or ((led.get("from_scratch") or {}).get("hoffmann") or {}).get("flops") or 1.0
    pipe = sum(r["flops"] for r in led["stages"]
               if not r["stage"].startswith(("base", "control")))
    control = next((r["flops"] for r in led["stages"] if r["stage"].startswith("control")), None)
    out: dict[tuple[str, float], list[dict]] = {}
    rows = results["rows"]
    out[("base" + ("" if trained else " (from-scratch estimate)"), base_x)] = [r for r in rows if r["kind"] == "base"]
    made = [r for r in rows if r["kind"] in ("specialized", "ensemble", "oracle")]
    if made:
        out[("base + pipeline", base_x + pipe)] = made
    if control is not None:
        out[("base + control", base_x + control)] = [r for r in rows if r["kind"] == "control"]
    return out


def _save_fig(fig: Any, path: Path) -> None:
    import os

    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
