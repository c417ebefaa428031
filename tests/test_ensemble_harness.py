"""The lm-evaluation-harness adapter on a tiny ensemble (skipped when lm-eval is not installed)."""

from __future__ import annotations

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from downscale.ensemble import EnsembleModel  # noqa: E402
from downscale.harness import EnsembleLM  # noqa: E402
from tiny import domain_text, make_tokenizer, tiny_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (see conftest.py)


@pytest.fixture(params=["routed", "sparse"])
def lm(tmp_path, request):
    """The adapter over a routed ensemble, and over a sparse one (routed after 2 tokens, then one student)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(make_tokenizer(tmp_path / "tok", domain_text("legal") + domain_text("code")))
    students = [tiny_model(seed=i, vocab_size=len(tok)) for i in range(2)]
    return EnsembleLM(ensemble=EnsembleModel(students, mode=request.param, tokenizer=tok, sparse_prefix=2),
                      batch_size=3)


def _req(kind: str, args: tuple, i: int) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=i)


def test_registered_under_its_name():
    assert get_model("downscale-ensemble") is EnsembleLM


def test_loglikelihood_matches_the_ensemble(lm, monkeypatch):
    pairs = [("license warranty", " software shall"), ("def return", " import"), ("the", " notice party rights")]
    shapes = []
    real = lm.ens.forward
    monkeypatch.setattr(lm.ens, "forward", lambda ids, **kw: shapes.append((ids.shape[1], kw.get("logits_to_keep")))
                        or real(ids, **kw))
    got = lm.loglikelihood([_req("loglikelihood", p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    (width, keep), = shapes  # one batch; scores only for the positions that predict a continuation
    assert 0 < keep < width, shapes
    monkeypatch.undo()
    for (ctx, cont), (score, greedy) in zip(pairs, got, strict=True):
        c, w = lm.tok_encode(ctx), lm.tok_encode(ctx + cont)
        ids = torch.tensor([w])
        logp = torch.log_softmax(lm.ens(ids).logits, -1)[0]
        n = len(w) - len(c)
        ref = sum(float(logp[p - 1, w[p]]) for p in range(len(w) - n, len(w)))
        assert score == pytest.approx(ref, abs=1e-4)
        assert greedy == all(int(logp[p - 1].argmax()) == w[p] for p in range(len(w) - n, len(w)))


def test_rolling_is_the_total_log_likelihood(lm):
    text = "license warranty software shall party rights notice"
    (got,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", (text,), 0)], disable_tqdm=True)
    ids = [lm.eot_token_id] + lm.tok_encode(text)
    logp = torch.log_softmax(lm.ens(torch.tensor([ids])).logits, -1)[0]
    ref = sum(float(logp[p - 1, ids[p]]) for p in range(1, len(ids)))
    assert got == pytest.approx(ref, abs=1e-4)


def test_generate_until_returns_text_and_stops(lm):
    reqs = [_req("generate_until", ("license warranty", {"until": ["\n"], "max_gen_toks": 6}), 0),
            _req("generate_until", ("def", {"until": [" "], "max_gen_toks": 6, "do_sample": False}), 1)]
    out = lm.generate_until(reqs, disable_tqdm=True)
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    assert " " not in out[1] and "\n" not in out[0]
    ids = torch.tensor([lm.tok_encode("license warranty")])
    new = lm.ens.generate(ids, max_new_tokens=6, eos_token_id=lm.eot_token_id)[0, ids.shape[1]:]
    full = lm.tok_decode(new.tolist())
    assert full.split("\n")[0] == out[0]


def test_simple_evaluate_runs_a_local_task_on_a_saved_ensemble(tmp_path):
    """lm-eval end to end: model_args path=<ensemble folder>, a multiple-choice task from a local JSON file."""
    import json

    from lm_eval.tasks import TaskManager

    from downscale.ensemble_io import write_ensemble
    from downscale.models import save_causal_lm

    run = tmp_path / "run"
    tok_dir = make_tokenizer(run / "tokenizer", domain_text("legal") + domain_text("code"))
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tok_dir))
    for i in range(2):
        save_causal_lm(tiny_model(seed=i, vocab_size=vocab), run / "specialized" / str(i), tokenizer_dir=tok_dir)
    write_ensemble(run / "ensemble", {"students": ["specialized/0", "specialized/1"], "vocab_size": vocab,
                                      "modes": ["prob_mean"], "default_mode": "prob_mean", "weights": None,
                                      "router": {"kind": "bayes"}, "prior": [0.5, 0.5]}, tok_dir)
    rows = [{"q": "license warranty", "choices": ["software shall", "def return"], "label": 0},
            {"q": "def return", "choices": ["license", "import class"], "label": 1}] * 3
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'data.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{label}}'\n"
        "doc_to_choice: '{{choices}}'\nmetric_list:\n  - metric: acc\n    aggregation: mean\n"
        "    higher_is_better: true\n")
    res = lm_eval.simple_evaluate(model="downscale-ensemble", model_args=f"path={run / 'ensemble'}",
                                  tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
                                  batch_size=2)
    assert res["results"]["tiny_mc"]["sample_len"] == 6
    # the accuracy lm-eval reports is the argmax of the ensemble's own continuation log-likelihoods
    direct = EnsembleLM(path=str(run / "ensemble"))
    hits = 0
    for r in rows:
        reqs = [_req("loglikelihood", (r["q"], " " + c), 0) for c in r["choices"]]  # lm-eval's target delimiter
        scores = [s for s, _ in direct.loglikelihood(reqs, disable_tqdm=True)]
        hits += int(max(range(2), key=lambda k: scores[k]) == r["label"])
    assert res["results"]["tiny_mc"]["acc,none"] == pytest.approx(hits / len(rows))
