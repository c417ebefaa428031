"""The combine stage on a fake run: artifacts, the prior, save/load round trip, bad inputs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from downscale import models, pipeline
from downscale._io import read_json, write_json_atomic
from downscale.config import ExperimentConfig
from downscale.data.blocks import open_split
from downscale.ensemble import EnsembleError, load_ensemble
from downscale.models import save_causal_lm
from downscale.pipeline import StageError
from tiny import fake_data_run, make_tokenizer, mark_complete, tiny_model, train_briefly

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)


def _make_run(tmp_path, train_steps: int = 0, **combine):
    """A fake run with data complete and specialized students (optionally trained on their own shard)."""
    cfg = fake_data_run(tmp_path, combine=combine) if combine else fake_data_run(tmp_path)
    run = cfg.run_dir
    vocab = json.loads((run / "data" / "meta.json").read_text())["vocab_size"]
    for i, shard in enumerate(["code", "legal", "prose"]):
        m = tiny_model(seed=i, vocab_size=vocab)
        if train_steps:
            train_briefly(m, open_split(run, shard, "train"), steps=train_steps, seed=i)
        save_causal_lm(m, run / "specialized" / str(i), tokenizer_dir=run / "tokenizer")
    for stage, out in (("base", "base"), ("compress", "students")):  # upstream of specialize, unused here
        (run / out).mkdir(exist_ok=True)
        (run / out / "placeholder.txt").write_text("not used by combine")
        mark_complete(cfg, stage)
    mark_complete(cfg, "specialize")
    return cfg


def _with(cfg: ExperimentConfig, **combine) -> ExperimentConfig:
    tree = cfg.model_dump(mode="json")
    tree["combine"].update(combine)
    return ExperimentConfig.model_validate(tree)


def test_combine_writes_a_loadable_ensemble(tmp_path):
    cfg = _make_run(tmp_path, train_steps=30, modes=["logit_mean", "prob_mean", "routed", "weighted"],
                    weights=[0.2, 0.3, 0.5])
    entry = pipeline.run_stage(cfg, "combine", log=lambda m: None)
    assert entry["status"] == "complete"
    run = cfg.run_dir
    spec = read_json(run / "ensemble" / "ensemble.json")
    assert spec["students"] == ["specialized/0", "specialized/1", "specialized/2"]
    assert spec["modes"] == ["logit_mean", "prob_mean", "routed", "weighted"] and spec["default_mode"] == "logit_mean"
    assert spec["weights"] == [0.2, 0.3, 0.5] and spec["router"]["kind"] == "bayes"
    assert (run / "ensemble" / "tokenizer" / "tokenizer.json").is_file()
    prior = np.array(spec["prior"])
    assert abs(prior.sum() - 1) < 1e-9 and (prior > 0).all()
    # each student was trained on its own shard: each shard's val blocks favour their own student, so the
    # EM prior is near the share of val blocks per shard (well away from the uniform prior after smoothing)
    blocks = spec["prior_estimate"]["blocks_per_shard"]
    share = np.array([blocks[s] for s in ["code", "legal", "prose"]], dtype=float) / sum(blocks.values())
    assert spec["prior_estimate"]["argmax_counts"] == [blocks[s] for s in ["code", "legal", "prose"]]
    m = sum(blocks.values())
    assert np.allclose(prior, (share * m + 1) / (m + 3), atol=1e-3)
    val = entry["summary"]["val_loss"]
    for i, s in enumerate(["code", "legal", "prose"]):
        assert val[f"student {i}"][s] == min(val[f"student {j}"][s] for j in range(3))
    # loads with one call, in every mode, and equals the hand-computed combination of the folders
    ids = torch.as_tensor(np.asarray(open_split(run, "legal", "test")[:2], dtype=np.int64))
    ens = load_ensemble(run / "ensemble")
    assert ens.mode == "logit_mean" and ens.prior == pytest.approx(spec["prior"])
    z = torch.stack([s(input_ids=ids).logits for s in ens.students]).detach()
    torch.testing.assert_close(ens(ids).logits, z.mean(0), atol=1e-5, rtol=0)
    for mode in spec["modes"]:
        loaded = load_ensemble(run / "ensemble" / "ensemble.json", mode=mode)
        again = load_ensemble(run / "ensemble", mode=mode, fast=False)
        torch.testing.assert_close(loaded(ids).logits, again(ids).logits, atol=1e-5, rtol=0)
        text = loaded.generate_text(["license warranty", "def return"], max_new_tokens=8)
        assert len(text) == 2 and all(isinstance(t, str) and t for t in text), (mode, text)
    # students already in memory (the evaluate stage's) are used, not loaded again; the others are loaded
    mine = models.load_causal_lm(run / "specialized" / "1")
    reuse = load_ensemble(run / "ensemble", loaded={run / "specialized" / "1": mine})
    assert reuse.students[1] is mine and reuse.students[0] is not mine
    torch.testing.assert_close(reuse(ids).logits, ens(ids).logits, atol=1e-5, rtol=0)


def test_combine_rejects_students_with_another_vocabulary(tmp_path):
    cfg = _make_run(tmp_path)
    run = cfg.run_dir
    bad = run / "specialized" / "1"
    shutil.rmtree(bad)
    save_causal_lm(tiny_model(vocab_size=400), bad, tokenizer_dir=run / "tokenizer")
    with pytest.raises(StageError, match=r"specialized/1/config.json: .*`downscale specialize` writes it again"):
        pipeline.run_stage(cfg, "combine", force=True, log=lambda m: None)  # changed behind the manifest's back
    pipeline.record_complete(cfg, "specialize")  # as if specialize had made it
    with pytest.raises(StageError) as err:
        pipeline.run_stage(cfg, "combine", force=True, log=lambda m: None)
    assert str(bad) in str(err.value) and "vocab" in str(err.value) and "\n" not in str(err.value)


def test_combine_rejects_students_with_another_tokenizer(tmp_path):
    cfg = _make_run(tmp_path)
    run = cfg.run_dir
    other = make_tokenizer(tmp_path / "other_tok", ["completely different text here"] * 20, vocab_size=280)
    for f in other.iterdir():
        shutil.copy2(f, run / "specialized" / "2" / f.name)
    pipeline.record_complete(cfg, "specialize")  # as if specialize had made it (else: refused as changed on disk)
    with pytest.raises(StageError, match="tokenizer differs") as err:
        pipeline.run_stage(cfg, "combine", log=lambda m: None)
    assert str(run / "specialized" / "2") in str(err.value)


def test_combine_rejects_a_missing_student_and_weights_of_the_wrong_length(tmp_path):
    cfg = _make_run(tmp_path)
    run = cfg.run_dir
    # caught when the config is validated (one weight per student), before any stage runs
    with pytest.raises((StageError, ValueError), match="combine.weights has 2 weights but there are 3 students"):
        pipeline.run_stage(_with(cfg, modes=["weighted"], weights=[0.5, 0.5]), "combine", log=lambda m: None)
    shutil.rmtree(run / "specialized" / "2")
    with pytest.raises(StageError, match=r"specialized/2/\S+: missing"):  # against the manifest's file table
        pipeline.run_stage(cfg, "combine", log=lambda m: None)
    pipeline.record_complete(cfg, "specialize")  # as if specialize had made it so
    with pytest.raises(StageError, match="missing student folder") as err:
        pipeline.run_stage(cfg, "combine", log=lambda m: None)
    assert str(run / "specialized" / "2") in str(err.value)


@pytest.mark.parametrize(("combine", "message"), [
    ({"modes": ["weighted"], "weights": [0.7, -0.2, 0.5]}, "non-negative"),
    ({"modes": ["weighted"], "weights": [0.5, 0.2, 0.2]}, "sum to 1"),
    ({"modes": ["weighted"]}, "set combine.weights"),
    ({"modes": ["median"]}, "expected 'logit_mean'"),
    ({"modes": ["logit_mean"], "default_mode": "prob_mean"}, "default_mode"),
])
def test_bad_combine_config_is_one_line(tmp_path, combine, message):
    from downscale.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({"data": {"sources": [{"name": "a", "kind": "builtin", "builtin": "legal"}]},
                                "combine": combine}))
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path)
    assert "combine" in str(err.value) and "\n" not in str(err.value)


def test_load_ensemble_bad_inputs(tmp_path):
    cfg = _make_run(tmp_path, modes=["logit_mean", "weighted"], weights=[0.2, 0.3, 0.5])
    pipeline.run_stage(cfg, "combine", log=lambda m: None)
    ens_dir = cfg.run_dir / "ensemble"
    with pytest.raises(EnsembleError, match="unknown mode 'median'"):
        load_ensemble(ens_dir, mode="median")
    spec = read_json(ens_dir / "ensemble.json")
    write_json_atomic(ens_dir / "ensemble.json", {**spec, "weights": [0.5, 0.6, -0.1]})
    with pytest.raises(EnsembleError, match="weights must be finite and non-negative"):
        load_ensemble(ens_dir, mode="weighted")
    write_json_atomic(ens_dir / "ensemble.json", {**spec, "weights": [0.5, 0.6, 0.1]})
    with pytest.raises(EnsembleError, match="sum to 1"):
        load_ensemble(ens_dir, mode="weighted")
    write_json_atomic(ens_dir / "ensemble.json", spec)
    shutil.rmtree(cfg.run_dir / "specialized" / "1")
    with pytest.raises(EnsembleError, match=r"students\[1\]: missing student folder") as err:
        load_ensemble(ens_dir)
    assert str(ens_dir / "ensemble.json") in str(err.value)
    with pytest.raises(EnsembleError, match="no ensemble here"):
        load_ensemble(tmp_path / "nowhere")


def test_cli_combine_runs_and_bad_students_are_one_line(tmp_path, capsys):
    """`downscale combine CONFIG` end to end through the CLI; then a student with another vocabulary: exit 2
    and one line naming the folder. An EnsembleError (e.g. a broken ensemble folder) is a StageError too."""
    from downscale.cli import main

    cfg = _make_run(tmp_path)
    path = tmp_path / "exp.yaml"
    path.write_text(cfg.to_yaml())
    assert main(["combine", str(path)]) == 0
    assert (cfg.run_dir / "ensemble" / "ensemble.json").is_file()
    bad = cfg.run_dir / "specialized" / "0"
    shutil.rmtree(bad)
    save_causal_lm(tiny_model(vocab_size=400), bad, tokenizer_dir=cfg.run_dir / "tokenizer")
    capsys.readouterr()
    assert main(["combine", str(path), "combine.prior=uniform"]) == 2  # changed behind the manifest's back
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("downscale: error")]
    assert len(err) == 1 and err[0].startswith(f"downscale: error: {bad}/") and "`downscale specialize`" in err[0]
    pipeline.record_complete(cfg, "specialize")  # as if specialize had made it
    assert main(["combine", str(path), "combine.prior=uniform"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("downscale: error")]
    assert len(err) == 1 and err[0].startswith(f"downscale: error: {bad}: vocab_size 400"), err
    with pytest.raises(StageError) as exc:
        load_ensemble(cfg.run_dir / "ensemble")
    assert isinstance(exc.value, EnsembleError) and isinstance(exc.value, ValueError)
    assert "\n" not in str(exc.value) and "students[0]" in str(exc.value)
