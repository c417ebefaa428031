"""Laws: the downscaling guarantee, the ensemble power law and its fit, and Chinchilla.

Only numpy, scipy and the standard library are imported here, so ``downscale law`` starts fast.

Three pieces of maths, each a set of pure functions plus a ``downscale law`` sub-command:

1. **The downscaling guarantee** (Goel, Sengupta, Chakraborty, "Enough of Scaling LLMs! Let's
   Focus on Downscaling", arXiv 2505.00985; the poster in ``shared/seeds/000_*.txt``, section
   "Theoretical Guarantee of Downscaling Law"): for n in Z+ with

       ((n^a - 1) / n^(a+gamma)) * (n - 1)^gamma  >=  1 / (b * N0^delta)

   the expected ensemble loss ``L0 - b + b / n^a`` is below L0, the loss of the uncompressed
   base of N0 parameters. The poster does not state the unit of N0; with N0 in **billions**
   (8.03 for LLaMA-3-8B) and a = b = 0.83, gamma = 1.08, delta = 0.29 the smallest such n is 7
   (lhs 0.678 >= rhs 0.658; at n = 6 lhs is 0.636). The poster writes "n > 7 ... 8 or more
   compressed models": that is a rounding of the same inequality, which already holds at 7.
   Read literally, ``L0 - b + b / n^a < L0`` holds for every n >= 2 when a, b > 0; the
   inequality above is the condition the paper derives (from compression, domain-adaptation and
   ensemble laws, constants after Lobacheva et al. and Chen et al.) for that expression to be the
   ensemble's expected loss. We implement the poster's statement as written and report both.
2. **The ensemble power law** L(m) = L_inf + B / m^a (the form of Lobacheva et al., "On Power
   Laws in Deep Ensembles", 2020), fitted to a measured ensemble-size curve.
3. **Chinchilla** L(N, D) = E + A / N^alpha + B / D^beta (N parameters, D tokens), with the fit
   of Hoffmann et al. 2022 and the refit of Besiroglu et al. 2024, compute-optimal allocation
   under C = 6 N D (closed form, Hoffmann et al. eq. 4) and its inverse.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

# The constants of the poster's LLaMA-3-8B example (N0 in billions of parameters).
PAPER_CONSTANTS: dict[str, float] = {"a": 0.83, "b": 0.83, "gamma": 1.08, "delta": 0.29, "n0": 8.03}
DEFAULT_MAX_N = 10**6
MAX_N0_BILLIONS = 1e6  # 10^15 parameters: anything larger is almost surely a count in parameters, not billions


# =========================================================================== the downscaling guarantee


def downscaling_lhs(n: int, a: float, gamma: float) -> float:
    """Left-hand side ``((n^a - 1) / n^(a+gamma)) * (n - 1)^gamma`` for an integer n >= 1 (0 at n = 1).

    Computed as ``(1 - n^-a) * (1 - 1/n)^gamma`` in log space (the same quantity, no overflow
    for huge n).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n == 1:
        return 0.0
    ln = math.log(n)
    return -math.expm1(-a * ln) * math.exp(gamma * math.log1p(-1.0 / n))


def downscaling_rhs(b: float, delta: float, n0: float) -> float:
    """Right-hand side ``1 / (b * N0^delta)``, N0 in billions of parameters."""
    return 1.0 / (b * n0**delta)


def predicted_ensemble_loss(n: int, a: float, b: float, l0: float) -> float:
    """The poster's expected ensemble loss ``L0 - b + b / n^a`` for n students."""
    return l0 - b + b / float(n) ** a


def _check_constants(a: float, b: float, gamma: float, delta: float, n0: float) -> None:
    for name, v in (("a", a), ("b", b), ("gamma", gamma), ("delta", delta), ("n0", n0)):
        if not math.isfinite(v):
            raise ValueError(f"{name} must be finite, got {v}")
    if a <= 0 or b <= 0 or n0 <= 0:
        raise ValueError(f"a, b and n0 must be > 0 (got a={a}, b={b}, n0={n0})")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")


def downscaling_n_min(a: float, b: float, gamma: float, delta: float, n0: float,
                      max_n: int = DEFAULT_MAX_N) -> int | None:
    """The smallest integer n in [1, max_n] that satisfies the guarantee's inequality, or None.

    With a > 0 and gamma >= 0 the left-hand side ``(1 - n^-a) (1 - 1/n)^gamma`` is a product of
    two non-negative non-decreasing factors, so it is non-decreasing in n and below 1 for every
    finite n: the search is a bisection over [1, max_n], and a right-hand side >= 1 (b N0^delta
    <= 1) is impossible for every n.
    """
    _check_constants(a, b, gamma, delta, n0)
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    rhs = downscaling_rhs(b, delta, n0)
    if downscaling_lhs(max_n, a, gamma) < rhs:
        return None
    lo, hi = 1, max_n  # invariant: lhs(hi) >= rhs
    if downscaling_lhs(lo, a, gamma) >= rhs:
        return lo
    while hi - lo > 1:  # invariant: lhs(lo) < rhs <= lhs(hi)
        mid = (lo + hi) // 2
        if downscaling_lhs(mid, a, gamma) >= rhs:
            hi = mid
        else:
            lo = mid
    return hi


def downscaling_guarantee(a: float = PAPER_CONSTANTS["a"], b: float = PAPER_CONSTANTS["b"],
                          gamma: float = PAPER_CONSTANTS["gamma"], delta: float = PAPER_CONSTANTS["delta"],
                          n0: float = PAPER_CONSTANTS["n0"], l0: float | None = None,
                          max_n: int = DEFAULT_MAX_N, table_n: int = 16) -> dict[str, Any]:
    """The guarantee as a JSON-ready dict: ``n_min`` (None if no n <= max_n satisfies it), ``rhs``,
    ``lhs`` = [{n, lhs, satisfied[, predicted_loss]}] for n = 1..table_n, and, when ``l0`` is
    given, the predicted ensemble loss at n_min."""
    n_min = downscaling_n_min(a, b, gamma, delta, n0, max_n=max_n)
    rhs = downscaling_rhs(b, delta, n0)
    rows = []
    for n in range(1, table_n + 1):
        lhs = downscaling_lhs(n, a, gamma)
        row: dict[str, Any] = {"n": n, "lhs": lhs, "satisfied": bool(lhs >= rhs)}
        if l0 is not None:
            row["predicted_loss"] = predicted_ensemble_loss(n, a, b, l0)
        rows.append(row)
    out: dict[str, Any] = {
        "constants": {"a": a, "b": b, "gamma": gamma, "delta": delta, "n0_billions": n0},
        "inequality": "((n^a - 1) / n^(a+gamma)) * (n - 1)^gamma >= 1 / (b * N0^delta)",
        "rhs": rhs, "n_min": n_min, "max_n": max_n,
        "lhs_supremum": 1.0,  # the lhs tends to 1 from below as n grows (a > 0, gamma >= 0)
        "lhs": rows,
        "source": "Goel, Sengupta, Chakraborty, arXiv 2505.00985 (poster: 'Theoretical Guarantee of Downscaling Law')",
    }
    if n_min is None and rhs >= 1.0:
        out["why_none"] = "rhs >= 1 but the lhs is below 1 for every finite n: no ensemble size satisfies it"
    elif n_min is None:
        out["why_none"] = f"no n <= max_n={max_n} satisfies it"
    if l0 is not None:
        out["l0"] = l0
        out["predicted_loss_at_n_min"] = None if n_min is None else predicted_ensemble_loss(n_min, a, b, l0)
    return out


# =========================================================================== the ensemble power law

A_BOUNDS = (0.01, 10.0)  # the exponent a of L(m) = L_inf + B / m^a
DEFAULT_FIX_A = PAPER_CONSTANTS["a"]  # used when 2 points cannot determine all three constants


def ensemble_law(m: Any, l_inf: float, b: float, a: float) -> Any:
    """L(m) = L_inf + B / m^a (works on scalars and numpy arrays)."""
    if np.ndim(m):
        return l_inf + b * np.power(np.asarray(m, dtype=float), -a)
    return l_inf + b * float(m) ** -a


def _linear_given_a(x: np.ndarray, y: np.ndarray, a: float) -> tuple[float, float, float]:
    """Least-squares (L_inf, B) for a fixed a, with L_inf >= 0 (a loss in nats); returns (L_inf, B, SSE)."""
    from scipy.optimize import lsq_linear

    design = np.column_stack([np.ones_like(x), x ** -a])
    sol = lsq_linear(design, y, bounds=([0.0, -np.inf], [np.inf, np.inf]), method="bvls")
    l_inf, b = (float(v) for v in sol.x)
    resid = design @ sol.x - y
    return l_inf, b, float(resid @ resid)


def fit_ensemble_law(m: Sequence[float], loss: Sequence[float], *, fix_a: float | None = None) -> dict[str, Any]:
    """Fit L(m) = L_inf + B / m^a to an ensemble-size curve.

    Bounds: a in ``A_BOUNDS``, L_inf >= 0, B free (a curve that rises with m gives B < 0).
    Start values are robust: the exponent is profiled on a log grid (for each a, L_inf and B are
    a bounded linear least-squares problem), refined by a bounded scalar minimisation, then
    polished by ``scipy.optimize.least_squares`` on all three constants.

    With 3+ distinct m all three constants are fitted (``status`` "fit"; "exact" when there are
    exactly 3 points: then R^2 = 1 by construction and says nothing about fit quality). With 2
    distinct m, a is fixed (``fix_a``, default the poster's a = 0.83) and ``under_determined`` is
    True. With fewer there is no fit (``status`` "insufficient", constants None). Passing
    ``fix_a`` always fixes a.

    Returns a JSON-ready dict: L_inf, B, a, r2, rmse, points, dof, status, fixed, note.
    """
    from scipy.optimize import least_squares, minimize_scalar

    x = np.asarray(m, dtype=float)
    y = np.asarray(loss, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"m and loss must be 1-D and of one length (got shapes {x.shape} and {y.shape})")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("m and loss must be finite numbers")
    if np.any(x < 1):
        raise ValueError(f"ensemble sizes m must be >= 1, got {x.tolist()}")
    if fix_a is not None and not (A_BOUNDS[0] <= fix_a <= A_BOUNDS[1]):
        raise ValueError(f"fix_a must lie in {A_BOUNDS}, got {fix_a}")
    distinct = len(np.unique(x))
    base = {"form": "L(m) = L_inf + B / m^a", "points": int(len(x)), "distinct_m": distinct,
            "L_inf": None, "B": None, "a": None, "r2": None, "rmse": None, "dof": None,
            "under_determined": False, "fixed": {}, "status": "insufficient", "note": ""}
    if distinct < 2:
        base["note"] = f"{distinct} distinct ensemble size(s): at least 2 are needed (3 to fit the exponent)"
        return base

    if fix_a is None and distinct == 2:
        fix_a = DEFAULT_FIX_A
        base["under_determined"] = True
    if fix_a is not None:
        l_inf, b, sse = _linear_given_a(x, y, fix_a)
        a = float(fix_a)
        base["fixed"] = {"a": a}
        n_params = 2
    else:
        grid = np.geomspace(A_BOUNDS[0], A_BOUNDS[1], 121)
        sses = np.array([_linear_given_a(x, y, g)[2] for g in grid])
        k = int(np.argmin(sses))
        lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
        res = minimize_scalar(lambda g: _linear_given_a(x, y, g)[2], bounds=(lo, hi), method="bounded",
                              options={"xatol": 1e-10})
        a = float(res.x) if res.fun <= sses[k] else float(grid[k])
        l_inf, b, sse = _linear_given_a(x, y, a)
        # Polish all three together from the profiled start (bounded).
        start = np.clip([l_inf, b, a], [0.0, -np.inf, A_BOUNDS[0]], [np.inf, np.inf, A_BOUNDS[1]])
        pol = least_squares(lambda p: p[0] + p[1] * x ** -p[2] - y, start,
                            bounds=([0.0, -np.inf, A_BOUNDS[0]], [np.inf, np.inf, A_BOUNDS[1]]),
                            xtol=1e-14, ftol=1e-14, gtol=1e-14)
        if 2 * pol.cost < sse:
            l_inf, b, a = (float(v) for v in pol.x)
            sse = float(2 * pol.cost)
        n_params = 3

    resid_ss = sse
    total_ss = float(np.sum((y - y.mean()) ** 2))
    dof = int(len(x) - n_params)
    notes = []
    if base["under_determined"]:
        notes.append(f"only 2 distinct ensemble sizes: a fixed at {fix_a:g}, only L_inf and B fitted "
                     "(under-determined: treat the prediction as a guess)")
    elif fix_a is not None:
        notes.append(f"a fixed at {fix_a:g} by the caller")
    if dof == 0:
        notes.append("as many points as fitted constants: R^2 = 1 by construction when the curve is matched")
    if fix_a is None and (math.isclose(a, A_BOUNDS[0], rel_tol=1e-6) or math.isclose(a, A_BOUNDS[1], rel_tol=1e-6)):
        notes.append(f"the exponent a sits at its bound {a:g}: the power law does not describe this curve well")
    if l_inf == 0.0:
        notes.append("L_inf hit its bound 0")
    if b < 0:
        notes.append("B < 0: the loss rises with ensemble size")
    base.update({
        "L_inf": l_inf, "B": b, "a": a,
        "r2": None if total_ss == 0 else 1.0 - resid_ss / total_ss,
        "rmse": math.sqrt(resid_ss / len(x)), "dof": dof,
        "status": "under-determined" if base["under_determined"] else ("exact" if dof == 0 else "fit"),
        "note": "; ".join(notes),
    })
    return base


def smallest_ensemble_beating(fit: dict[str, Any], base_loss: float, max_m: int = 10**12) -> int | None:
    """The smallest integer m >= 1 with L(m) < base_loss under a fit from :func:`fit_ensemble_law`.

    None when the fit has no constants, when L_inf >= base_loss with B >= 0 (the curve never gets
    there), when the curve rises with m (B < 0) and L(1) is not already below, or when the answer
    exceeds ``max_m``.
    """
    l_inf, b, a = fit.get("L_inf"), fit.get("B"), fit.get("a")
    if l_inf is None or b is None or a is None:
        return None
    if ensemble_law(1, l_inf, b, a) < base_loss:
        return 1
    if b <= 0 or l_inf >= base_loss:
        return None
    # L(m) < base  <=>  m > (B / (base - L_inf))^(1/a)
    bound = (b / (base_loss - l_inf)) ** (1.0 / a)
    if not math.isfinite(bound) or bound >= max_m:
        return None
    m = max(1, math.floor(bound))
    while ensemble_law(m, l_inf, b, a) >= base_loss:  # float rounding near the bound
        m += 1
    while m > 1 and ensemble_law(m - 1, l_inf, b, a) < base_loss:
        m -= 1
    return m if m <= max_m else None


def fit_results(results: dict[str, Any], *, fix_a: float | None = None) -> dict[str, Any]:
    """Fit the ensemble law to an evaluate ``results.json`` (as a dict).

    Reads only ``results["ensemble_size_curve"]`` = [{"m", "loss", "subsets"}, ...] and
    ``results["base"]["loss"]``. Returns the fit, the base loss, the predicted smallest ensemble
    that beats the base (``m_beats_base``), and the smallest measured one (``observed_m_beats_base``).
    Raises ValueError naming the missing or malformed key.
    """
    curve = results.get("ensemble_size_curve") if isinstance(results, dict) else None
    if not isinstance(curve, list) or not curve:
        raise ValueError("results lack 'ensemble_size_curve' (expected a list of {m, loss, subsets})")
    try:
        m = [float(p["m"]) for p in curve]
        loss = [float(p["loss"]) for p in curve]
    except (KeyError, TypeError, ValueError):
        raise ValueError("'ensemble_size_curve' entries must be objects with numeric 'm' and 'loss'") from None
    base = results.get("base")
    if not isinstance(base, dict) or not isinstance(base.get("loss"), int | float):
        raise ValueError("results lack a numeric 'base.loss' (the base's pooled test loss)")
    base_loss = float(base["loss"])
    fit = fit_ensemble_law(m, loss, fix_a=fix_a)
    beats = [int(mi) for mi, li in sorted(zip(m, loss, strict=True)) if li < base_loss]
    return {"fit": fit, "base_loss": base_loss, "m_beats_base": smallest_ensemble_beating(fit, base_loss),
            "observed_m_beats_base": beats[0] if beats else None,
            "curve": [{"m": int(mi), "loss": li} for mi, li in zip(m, loss, strict=True)]}


# =========================================================================== Chinchilla


@dataclass(frozen=True)
class ChinchillaFit:
    """Constants of L(N, D) = E + A / N^alpha + B / D^beta (N parameters, D tokens, loss in nats/token)."""

    name: str
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    source: str


CHINCHILLA_FITS: dict[str, ChinchillaFit] = {
    "hoffmann": ChinchillaFit("hoffmann", 1.69, 406.4, 410.7, 0.34, 0.28,
                              "Hoffmann et al. 2022, Training Compute-Optimal LLMs, approach 3 (eq. 10)"),
    "besiroglu": ChinchillaFit("besiroglu", 1.8172, 482.01, 2085.43, 0.3478, 0.3658,
                               "Besiroglu et al. 2024, Chinchilla Scaling: A replication attempt"),
}


def get_fit(fit: str | ChinchillaFit = "hoffmann") -> ChinchillaFit:
    """A fit by name ('hoffmann', 'besiroglu') or the given one."""
    if isinstance(fit, ChinchillaFit):
        return fit
    try:
        return CHINCHILLA_FITS[fit]
    except KeyError:
        raise ValueError(f"unknown Chinchilla fit {fit!r}; known: {', '.join(CHINCHILLA_FITS)}") from None


def chinchilla_loss(n_params: float, tokens: float, fit: str | ChinchillaFit = "hoffmann") -> float:
    """L(N, D) = E + A / N^alpha + B / D^beta."""
    f = get_fit(fit)
    return f.E + f.A / n_params**f.alpha + f.B / tokens**f.beta


def _alloc_constants(f: ChinchillaFit) -> tuple[float, float]:
    """G of N_opt = G (C/6)^(beta/(alpha+beta)), and K of L_opt(C) = E + K (C/6)^(-alpha beta/(alpha+beta))."""
    s = f.alpha + f.beta
    g = (f.alpha * f.A / (f.beta * f.B)) ** (1.0 / s)
    k = f.A * g**-f.alpha + f.B * g**f.beta
    return g, k


def compute_optimal(flops: float, fit: str | ChinchillaFit = "hoffmann") -> dict[str, Any]:
    """Compute-optimal N*, D* for a budget C = 6 N D, in closed form (Hoffmann et al. eq. 4):
    N* = G (C/6)^(beta/(alpha+beta)), D* = (C/6) / N*, G = (alpha A / (beta B))^(1/(alpha+beta));
    and the loss there."""
    if not (flops > 0 and math.isfinite(flops)):
        raise ValueError(f"flops must be a positive finite number, got {flops}")
    f = get_fit(fit)
    g, _ = _alloc_constants(f)
    n = g * (flops / 6.0) ** (f.beta / (f.alpha + f.beta))
    d = flops / (6.0 * n)
    return {"fit": f.name, "flops": flops, "n_params": n, "tokens": d, "tokens_per_param": d / n,
            "loss": chinchilla_loss(n, d, f)}


def flops_for_loss(target_loss: float, fit: str | ChinchillaFit = "hoffmann") -> dict[str, Any] | None:
    """The smallest budget C (compute-optimal allocation) whose predicted loss is ``target_loss``,
    with N*, D* there: C = 6 (K / (L - E))^((alpha+beta)/(alpha beta)). None if L <= E."""
    f = get_fit(fit)
    if not target_loss > f.E:
        return None
    _, k = _alloc_constants(f)
    flops = 6.0 * (k / (target_loss - f.E)) ** ((f.alpha + f.beta) / (f.alpha * f.beta))
    return compute_optimal(flops, f) if math.isfinite(flops) else None


def tokens_for_loss(n_params: float, target_loss: float, fit: str | ChinchillaFit = "hoffmann") -> float | None:
    """Tokens D for a model of N parameters to reach ``target_loss``: D = (B / (L - E - A/N^alpha))^(1/beta).
    None when L <= E + A / N^alpha (the model is too small to get there on any amount of data)."""
    f = get_fit(fit)
    gap = target_loss - f.E - f.A / n_params**f.alpha
    if not gap > 0:
        return None
    d = (f.B / gap) ** (1.0 / f.beta)
    return d if math.isfinite(d) else None


# =========================================================================== the CLI


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so errors are one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


def _number(kind: str):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
        ok = math.isfinite(v) and {"a positive number": v > 0, "a number >= 0": v >= 0, "a number": True}[kind]
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}")
        return v
    return parse


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _guarantee_parser() -> _Parser:
    p = _Parser(prog="downscale law", description="The downscaling guarantee (arXiv 2505.00985): the smallest "
                "ensemble size n with ((n^a-1)/n^(a+gamma))(n-1)^gamma >= 1/(b N0^delta). Sub-commands: "
                "'downscale law fit RESULTS_JSON' (ensemble-law fit), 'downscale law chinchilla' (Chinchilla).")
    pos, num = _number("a positive number"), _number("a number")
    p.add_argument("--a", type=pos, default=PAPER_CONSTANTS["a"], help="ensemble-law exponent (default 0.83)")
    p.add_argument("--b", type=pos, default=PAPER_CONSTANTS["b"], help="ensemble-law scale (default 0.83)")
    p.add_argument("--gamma", type=_number("a number >= 0"), default=PAPER_CONSTANTS["gamma"],
                   help="compression-law exponent (default 1.08)")
    p.add_argument("--delta", type=num, default=PAPER_CONSTANTS["delta"], help="size exponent (default 0.29)")
    p.add_argument("--n0", type=pos, default=PAPER_CONSTANTS["n0"],
                   help="base size in BILLIONS of parameters (default 8.03, LLaMA-3-8B)")
    p.add_argument("--l0", type=pos, default=None, help="base test loss, to print the predicted ensemble loss")
    p.add_argument("--max-n", type=_positive_int, default=DEFAULT_MAX_N, help="largest n searched (default 10^6)")
    p.add_argument("--table-n", type=_positive_int, default=16, help="tabulate the lhs for n = 1..this (default 16)")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def _fit_parser() -> _Parser:
    p = _Parser(prog="downscale law fit", description="Fit L(m) = L_inf + B / m^a to the ensemble-size curve of "
                "an evaluate results.json and predict the smallest ensemble that beats the base.")
    p.add_argument("results", help="path to <run>/eval/results.json")
    p.add_argument("--fix-a", type=_number("a positive number"), default=None,
                   help=f"fix the exponent a (it is fixed at {DEFAULT_FIX_A} anyway when only 2 sizes exist)")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def _chinchilla_parser() -> _Parser:
    p = _Parser(prog="downscale law chinchilla", description="Chinchilla L(N, D) = E + A/N^alpha + B/D^beta. Give "
                "--flops (compute-optimal N, D, loss), --loss (the FLOPs to reach it), --params with --loss "
                "(tokens and FLOPs to train N to that loss) or --params with --tokens (the predicted loss).")
    pos = _number("a positive number")
    p.add_argument("--flops", type=pos, help="training budget C = 6 N D, in FLOPs")
    p.add_argument("--loss", type=pos, help="target loss (nats/token on the fit's data)")
    p.add_argument("--params", type=pos, help="model size N in parameters (not billions)")
    p.add_argument("--tokens", type=pos, help="training tokens D")
    p.add_argument("--fit", choices=sorted(CHINCHILLA_FITS), default="hoffmann", help="which published fit")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def _run_guarantee(args: argparse.Namespace) -> int:
    if args.n0 > MAX_N0_BILLIONS:
        raise _UsageError(f"argument --n0: expected the base size in billions of parameters (8.03 for "
                          f"LLaMA-3-8B), got {args.n0:g}")
    out = downscaling_guarantee(args.a, args.b, args.gamma, args.delta, args.n0, l0=args.l0, max_n=args.max_n,
                                table_n=args.table_n)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    c = out["constants"]
    print(f"downscaling guarantee (arXiv 2505.00985): a={c['a']:g} b={c['b']:g} gamma={c['gamma']:g} "
          f"delta={c['delta']:g} N0={c['n0_billions']:g}B")
    print(f"  {out['inequality']}")
    print(f"  rhs = {out['rhs']:.6f}")
    head = f"  {'n':>4}  {'lhs':>10}  ok" + ("  predicted loss" if args.l0 is not None else "")
    print(head)
    for r in out["lhs"]:
        extra = f"  {r['predicted_loss']:.4f}" if "predicted_loss" in r else ""
        print(f"  {r['n']:>4}  {r['lhs']:>10.6f}  {'yes' if r['satisfied'] else 'no '}{extra}")
    if out["n_min"] is None:
        print(f"  n_min: none ({out['why_none']})")
    else:
        line = f"  n_min = {out['n_min']}"
        if args.l0 is not None:
            line += f"; predicted ensemble loss there {out['predicted_loss_at_n_min']:.4f} (L0 = {args.l0:g})"
        print(line)
    return 0


def _run_fit(args: argparse.Namespace) -> int:
    path = Path(args.results)
    if not path.is_file():
        raise _UsageError(f"RESULTS_JSON: no such file {str(path)!r}")
    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _UsageError(f"RESULTS_JSON {str(path)!r}: not readable JSON ({exc})") from None
    try:
        out = fit_results(results, fix_a=args.fix_a)
    except ValueError as exc:
        raise _UsageError(f"RESULTS_JSON {str(path)!r}: {exc}") from None
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    fit = out["fit"]
    print(f"ensemble law {fit['form']} on {fit['points']} point(s) from {path}")
    for p in out["curve"]:
        print(f"  m={p['m']:<3} loss={p['loss']:.4f}")
    if fit["L_inf"] is None:
        print(f"  no fit: {fit['note']}")
    else:
        r2 = "n/a" if fit["r2"] is None else f"{fit['r2']:.4f}"
        print(f"  L_inf={fit['L_inf']:.4f}  B={fit['B']:.4f}  a={fit['a']:.4f}  R^2={r2}  status={fit['status']}")
        if fit["note"]:
            print(f"  note: {fit['note']}")
    print(f"  base loss {out['base_loss']:.4f}; predicted smallest ensemble beating it: {out['m_beats_base']}; "
          f"measured: {out['observed_m_beats_base']}")
    return 0


def _run_chinchilla(args: argparse.Namespace) -> int:
    f = get_fit(args.fit)
    if args.flops is not None:
        if any(v is not None for v in (args.loss, args.params, args.tokens)):
            raise _UsageError("argument --flops: give it alone (it answers the compute-optimal N, D and loss)")
        out: dict[str, Any] = {"question": "compute-optimal allocation", **compute_optimal(args.flops, f)}
    elif args.params is not None and args.tokens is not None:
        if args.loss is not None:
            raise _UsageError("argument --loss: not with both --params and --tokens")
        out = {"question": "loss of N params trained on D tokens", "fit": f.name, "n_params": args.params,
               "tokens": args.tokens, "flops": 6 * args.params * args.tokens,
               "loss": chinchilla_loss(args.params, args.tokens, f)}
    elif args.params is not None and args.loss is not None:
        d = tokens_for_loss(args.params, args.loss, f)
        out = {"question": "tokens and FLOPs to train N params to the loss", "fit": f.name, "n_params": args.params,
               "loss": args.loss, "tokens": d, "flops": None if d is None else 6 * args.params * d,
               "loss_floor_for_n": f.E + f.A / args.params**f.alpha}
    elif args.loss is not None and args.tokens is None:
        opt = flops_for_loss(args.loss, f)
        out = {"question": "compute-optimal FLOPs to reach the loss", "fit": f.name, "loss": args.loss,
               **({"flops": None, "n_params": None, "tokens": None} if opt is None else
                  {k: opt[k] for k in ("flops", "n_params", "tokens", "tokens_per_param")})}
    else:
        raise _UsageError("chinchilla: give --flops C, or --loss L, or --params N with --loss L or --tokens D")
    out["constants"] = asdict(f)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"Chinchilla ({f.source}): L = {f.E} + {f.A}/N^{f.alpha} + {f.B}/D^{f.beta}")
    print(f"  {out['question']}")
    for key in ("flops", "n_params", "tokens", "tokens_per_param", "loss", "loss_floor_for_n"):
        if key in out:
            v = out[key]
            print(f"  {key:<17} {'unreachable' if v is None else f'{v:.4g}'}")
    return 0


def law_cli(argv: list[str]) -> int:
    """``downscale law [fit RESULTS_JSON | chinchilla] ...``: returns the exit status (0 ok, 2 bad input,
    with one line on stderr)."""
    argv = list(argv)
    sub = argv[0] if argv and argv[0] in ("fit", "chinchilla") else None
    prog = f"downscale law {sub}" if sub else "downscale law"
    parser = {"fit": _fit_parser, "chinchilla": _chinchilla_parser, None: _guarantee_parser}[sub]()
    try:
        args = parser.parse_args(argv[1:] if sub else argv)
        return {"fit": _run_fit, "chinchilla": _run_chinchilla, None: _run_guarantee}[sub](args)
    except _UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # constants outside the maths' domain
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0) if isinstance(exc.code, int | None) else 2


if __name__ == "__main__":
    sys.exit(law_cli(sys.argv[1:]))
