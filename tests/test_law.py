"""The law module: the downscaling guarantee, the ensemble-law fit, Chinchilla, and ``downscale law``."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from downscale import law
from downscale.law import (
    chinchilla_loss,
    compute_optimal,
    downscaling_guarantee,
    downscaling_lhs,
    downscaling_n_min,
    ensemble_law,
    fit_ensemble_law,
    fit_results,
    flops_for_loss,
    law_cli,
    smallest_ensemble_beating,
    tokens_for_loss,
)

PAPER = dict(a=0.83, b=0.83, gamma=1.08, delta=0.29, n0=8.03)


def _literal_lhs(n: int, a: float, gamma: float) -> float:
    """The poster's formula exactly as written."""
    return ((n**a - 1) / n ** (a + gamma)) * (n - 1) ** gamma


# --------------------------------------------------------------------------- the guarantee


def test_n_min_is_7_for_the_papers_constants():
    assert downscaling_n_min(**PAPER) == 7
    rhs = 1 / (0.83 * 8.03**0.29)
    assert _literal_lhs(6, 0.83, 1.08) < rhs <= _literal_lhs(7, 0.83, 1.08)


def test_lhs_matches_the_literal_formula_and_n1_is_zero():
    assert downscaling_lhs(1, 0.83, 1.08) == 0.0
    for n in range(2, 40):
        assert downscaling_lhs(n, 0.83, 1.08) == pytest.approx(_literal_lhs(n, 0.83, 1.08), rel=1e-12)
    # Far beyond where the literal formula overflows, the lhs still tends to 1 from below.
    assert 0.999 < downscaling_lhs(10**15, 0.83, 1.08) < 1.0


def test_guarantee_table():
    out = downscaling_guarantee(**PAPER, l0=2.0)
    assert out["n_min"] == 7
    assert out["rhs"] == pytest.approx(1 / (0.83 * 8.03**0.29))
    assert [r["n"] for r in out["lhs"]] == list(range(1, 17))
    assert [r["satisfied"] for r in out["lhs"]] == [False] * 6 + [True] * 10
    assert out["lhs"][0]["lhs"] == 0.0
    assert out["lhs"][6]["lhs"] == pytest.approx(_literal_lhs(7, 0.83, 1.08))
    assert out["predicted_loss_at_n_min"] == pytest.approx(2.0 - 0.83 + 0.83 / 7**0.83)
    assert out["lhs"][0]["predicted_loss"] == pytest.approx(2.0)  # one model: the base's loss


def test_bisection_equals_a_brute_force_scan():
    rng = np.random.default_rng(0)
    for _ in range(60):
        a, b = rng.uniform(0.1, 2.0), rng.uniform(0.2, 3.0)
        gamma, delta, n0 = rng.uniform(0.0, 2.0), rng.uniform(-0.5, 1.0), rng.uniform(0.05, 100.0)
        rhs = 1 / (b * n0**delta)
        scan = next((n for n in range(1, 3001) if downscaling_lhs(n, a, gamma) >= rhs), None)
        assert downscaling_n_min(a, b, gamma, delta, n0, max_n=3000) == scan


def test_edge_cases_huge_base_impossible_and_max_n():
    assert downscaling_n_min(0.83, 0.83, 1.08, 0.29, 1e5) == 2  # a huge base: two students already satisfy it
    assert downscaling_n_min(0.83, 0.5, 1.08, 0.29, 0.5) is None  # rhs >= 1: never
    out = downscaling_guarantee(0.83, 0.5, 1.08, 0.29, 0.5)
    assert out["n_min"] is None and "rhs >= 1" in out["why_none"]
    assert downscaling_n_min(**PAPER, max_n=6) is None
    assert downscaling_n_min(**PAPER, max_n=7) == 7
    with pytest.raises(ValueError):
        downscaling_n_min(0.83, -1.0, 1.08, 0.29, 8.03)


# --------------------------------------------------------------------------- the CLI


def test_cli_json_in_a_subprocess():
    cmd = [sys.executable, "-m", "downscale.cli", "law", "--a", "0.83", "--b", "0.83", "--gamma", "1.08",
           "--delta", "0.29", "--n0", "8.03", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["n_min"] == 7
    assert len(out["lhs"]) == 16 and out["lhs"][6] == {"n": 7, "lhs": pytest.approx(0.67827, abs=1e-5),
                                                        "satisfied": True}


def test_cli_defaults_and_table(capsys):
    assert law_cli(["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_min"] == 7
    assert law_cli(["--l0", "2.5"]) == 0
    text = capsys.readouterr().out
    assert "n_min = 7" in text and "predicted ensemble loss" in text


@pytest.mark.parametrize("argv, needle", [
    (["--a", "-1"], "--a"),
    (["--n0", "abc"], "--n0"),
    (["--n0", "8.03e9"], "billions"),
    (["--gamma", "nan"], "--gamma"),
    (["--max-n", "0"], "--max-n"),
    (["--bogus"], "--bogus"),
    (["chinchilla"], "--flops"),
    (["chinchilla", "--flops", "1e21", "--fit", "kaplan"], "--fit"),
    (["chinchilla", "--flops", "-5"], "--flops"),
    (["fit"], "results"),
    (["fit", "/nonexistent/results.json"], "RESULTS_JSON"),
])
def test_cli_bad_input_exits_2_with_one_line(capsys, argv, needle):
    assert law_cli(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], captured.err
    assert captured.out == ""


def test_cli_bad_input_in_a_subprocess_has_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "downscale.cli", "law", "--b", "zero"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--b" in proc.stderr and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- the ensemble-law fit


@pytest.mark.parametrize("truth", [(2.0, 1.0, 0.8), (3.1, 0.45, 1.3), (1.2, 2.5, 0.5)])
def test_fit_recovers_constants_noise_free(truth):
    m = np.arange(1, 9)
    fit = fit_ensemble_law(m, ensemble_law(m, *truth))
    assert fit["status"] == "fit" and fit["dof"] == 5
    for got, want in zip((fit["L_inf"], fit["B"], fit["a"]), truth, strict=True):
        assert got == pytest.approx(want, rel=1e-4)
    assert fit["r2"] == pytest.approx(1.0, abs=1e-9)


def test_fit_recovers_constants_with_mild_noise():
    rng = np.random.default_rng(1)
    truth = (2.0, 1.0, 0.8)
    m = np.arange(1, 9)
    worst = 0.0
    for _ in range(20):
        y = ensemble_law(m, *truth) + rng.normal(0, 0.001, size=len(m))
        fit = fit_ensemble_law(m, y)
        worst = max(worst, *(abs(g / w - 1) for g, w in zip((fit["L_inf"], fit["B"], fit["a"]), truth, strict=True)))
        assert fit["r2"] > 0.999
    assert worst < 0.05


def test_fit_with_few_points():
    truth = (2.0, 1.0, 0.83)
    three = fit_ensemble_law([1, 2, 3], ensemble_law(np.array([1, 2, 3]), *truth))
    assert three["status"] == "exact" and three["dof"] == 0 and "by construction" in three["note"]
    assert three["a"] == pytest.approx(0.83, rel=1e-3)
    two = fit_ensemble_law([1, 2], ensemble_law(np.array([1, 2]), *truth))
    assert two["under_determined"] and two["status"] == "under-determined" and two["fixed"] == {"a": 0.83}
    assert two["L_inf"] == pytest.approx(2.0, rel=1e-6) and two["B"] == pytest.approx(1.0, rel=1e-6)
    one = fit_ensemble_law([3], [2.5])
    assert one["status"] == "insufficient" and one["L_inf"] is None
    fixed = fit_ensemble_law(np.arange(1, 6), ensemble_law(np.arange(1, 6), 2.0, 1.0, 0.6), fix_a=0.6)
    assert fixed["fixed"] == {"a": 0.6} and fixed["B"] == pytest.approx(1.0, rel=1e-6)
    with pytest.raises(ValueError):
        fit_ensemble_law([0, 1, 2], [1.0, 2.0, 3.0])


def test_fit_of_a_rising_curve_gives_negative_B():
    m = np.arange(1, 6)
    fit = fit_ensemble_law(m, ensemble_law(m, 3.0, -0.5, 1.0))
    assert fit["B"] == pytest.approx(-0.5, rel=1e-3) and "rises" in fit["note"]
    assert smallest_ensemble_beating(fit, base_loss=2.4) is None
    assert smallest_ensemble_beating(fit, base_loss=2.6) == 1


def test_smallest_ensemble_beating():
    fit = {"L_inf": 2.0, "B": 1.0, "a": 1.0}
    # L(m) = 2 + 1/m < 2.3  <=>  m > 3.33
    assert smallest_ensemble_beating(fit, 2.3) == 4
    assert smallest_ensemble_beating(fit, 2.25) == 5  # L(4) = 2.25 is not below
    assert smallest_ensemble_beating(fit, 3.5) == 1
    assert smallest_ensemble_beating(fit, 2.0) is None
    assert smallest_ensemble_beating(fit, 1.9) is None
    assert smallest_ensemble_beating({"L_inf": None, "B": None, "a": None}, 2.0) is None
    for base in np.linspace(2.001, 2.9, 50):  # agrees with a scan
        scan = next(m for m in range(1, 10**4) if 2.0 + 1.0 / m < base)
        assert smallest_ensemble_beating(fit, float(base)) == scan


def test_fit_results_and_cli_fit(tmp_path, capsys):
    m = np.arange(1, 5)
    curve = [{"m": int(k), "loss": float(ensemble_law(k, 2.0, 1.0, 0.8)), "subsets": 1} for k in m]
    results = {"ensemble_size_curve": curve, "base": {"loss": 2.5}, "other": "ignored"}
    out = fit_results(results)
    assert out["fit"]["status"] == "fit"
    # 2 + 1/m^0.8 < 2.5  <=>  m > 2^(1/0.8) = 2.38
    assert out["m_beats_base"] == 3 and out["observed_m_beats_base"] == 3
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    assert law_cli(["fit", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["m_beats_base"] == 3
    assert law_cli(["fit", str(path)]) == 0
    assert "predicted smallest ensemble beating it: 3" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"base": {"loss": 2.0}}))
    assert law_cli(["fit", str(bad)]) == 2
    assert "ensemble_size_curve" in capsys.readouterr().err
    bad.write_text("{not json")
    assert law_cli(["fit", str(bad)]) == 2
    assert "JSON" in capsys.readouterr().err


# --------------------------------------------------------------------------- Chinchilla


@pytest.mark.parametrize("fit", ["hoffmann", "besiroglu"])
@pytest.mark.parametrize("flops", [1e18, 1e21, 5.76e23, 1e26])
def test_compute_optimal_closed_form_equals_numeric_minimum(fit, flops):
    opt = compute_optimal(flops, fit)
    assert 6 * opt["n_params"] * opt["tokens"] == pytest.approx(flops, rel=1e-12)

    def loss_at(log_n: float) -> float:
        n = math.exp(log_n)
        return chinchilla_loss(n, flops / (6 * n), fit)

    res = minimize_scalar(loss_at, bounds=(math.log(1e3), math.log(flops / 6)), method="bounded",
                          options={"xatol": 1e-10})
    assert math.exp(res.x) == pytest.approx(opt["n_params"], rel=1e-3)
    assert res.fun == pytest.approx(opt["loss"], rel=1e-9)


def test_chinchilla_published_constants_and_inverses():
    assert chinchilla_loss(1e9, 1e12, "hoffmann") == pytest.approx(1.69 + 406.4 / 1e9**0.34 + 410.7 / 1e12**0.28)
    assert chinchilla_loss(1e9, 1e12, "besiroglu") == pytest.approx(
        1.8172 + 482.01 / 1e9**0.3478 + 2085.43 / 1e12**0.3658)
    # The refit's allocation is near the famous ~20 tokens per parameter at Chinchilla's budget.
    assert 15 < compute_optimal(5.76e23, "besiroglu")["tokens_per_param"] < 25
    for fit in ("hoffmann", "besiroglu"):
        for target in (2.0, 2.3, 3.0):
            inv = flops_for_loss(target, fit)
            assert compute_optimal(inv["flops"], fit)["loss"] == pytest.approx(target, rel=1e-10)
            d = tokens_for_loss(1e9, target, fit)
            if d is not None:
                assert chinchilla_loss(1e9, d, fit) == pytest.approx(target, rel=1e-10)
        assert flops_for_loss(law.get_fit(fit).E, fit) is None
    assert tokens_for_loss(1e6, 1.8, "hoffmann") is None  # below a 1M-parameter model's floor
    with pytest.raises(ValueError):
        law.get_fit("kaplan")


def test_cli_chinchilla(capsys):
    assert law_cli(["chinchilla", "--flops", "1e21", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_params"] == pytest.approx(compute_optimal(1e21)["n_params"])
    assert law_cli(["chinchilla", "--loss", "2.2", "--fit", "besiroglu", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["flops"] == pytest.approx(flops_for_loss(2.2, "besiroglu")["flops"])
    assert law_cli(["chinchilla", "--params", "7e9", "--loss", "2.0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["flops"] == pytest.approx(6 * 7e9 * tokens_for_loss(7e9, 2.0))
    assert law_cli(["chinchilla", "--params", "1e6", "--loss", "1.8"]) == 0
    assert "unreachable" in capsys.readouterr().out
