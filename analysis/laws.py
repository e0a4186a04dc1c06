"""Scaling laws fitted with scipy, following the Chinchilla-refit practice (BRIEF section 5).

Two laws, both fitted per group of comparable runs (same corpus fingerprint, family, NE anchor, backbone
size and n-gram variant) and per loss split:

- the **ratio law** ``L = a + b * ln(ratio)``, ``ratio = total / activated`` (the paper's Fig. 2 axes: MoE
  loss is log-linear in the ratio). Fitted with a Huber loss on relative residuals ``(pred - L) / L``, the
  first-order form of a log-space residual, by iteratively reweighted least squares (exact for a linear
  model, and vectorised over bootstrap replicates, so 1,000 replicates cost milliseconds);
- the **parameter law** ``L = E + A / N_act^alpha + B / N_tot^beta`` in activated and total parameters.
  The activated term is what compute buys, the total term what sparsity (experts, or embedding tables)
  buys on top; at fixed ``N_act`` it gives the ratio law's slope ``-beta * B / N_tot^beta``, flattening as
  the total grows (the "sweet spot" of expert scaling). Fitted in log space,
  ``log L = logsumexp(e, a - alpha log N_act, b - beta log N_tot)`` with ``E = exp(e)`` and so on, with a
  Huber loss (delta 1e-3) on ``log L_pred - log L`` by L-BFGS-B (analytic gradient) from the best points of
  a grid of initial values. Sizes are centred on their geometric mean inside the fit, for conditioning.

Both report bootstrap confidence intervals (runs resampled with replacement) and a held-out check: fit on the
smaller models (lower ratio for the ratio law, lower activated size for the parameter law, or lower total
when the activated size does not vary enough) and predict the larger ones; the error is the mean absolute
error in loss units (``heldout_mae``) and relative to the loss (``heldout_mre``).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from embscale.analysis.store import loss_column, splits, usable

HUBER_DELTA = 1e-3
DEFAULT_BOOTSTRAP = 200
CI_LEVEL = 0.95

# Columns that make runs comparable along the ratio axis; a ratio law is fitted for each combination.
SERIES_KEYS = ("corpus_fingerprint", "family", "base_ratio", "width", "depth", "ngram_n", "ngram_k",
               "amplification", "sizing", "per_layer_kind")
# Columns that make runs comparable for the parameter law (sizes vary inside a group).
FAMILY_KEYS = ("corpus_fingerprint", "family", "base_ratio", "ngram_n", "ngram_k", "amplification", "sizing",
               "per_layer_kind")


# ----------------------------------------------------------------------------------------------------------
# BLAS threads

@functools.lru_cache(maxsize=1)
def _openblas_controls() -> tuple[tuple[object, object], ...]:
    """(get, set) thread-count functions of every OpenBLAS loaded in this process (numpy's and scipy's)."""
    try:
        with open("/proc/self/maps") as handle:
            paths = {line.split()[-1] for line in handle if "openblas" in line.lower() and "/" in line}
    except OSError:
        return ()
    controls = []
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas", "64_"), ("scipy_openblas", ""), ("openblas", ""),
                               ("openblas", "64_")):
            get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
            put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
            if get is not None and put is not None:
                controls.append((get, put))
                break
    return tuple(controls)


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run the block with OpenBLAS on one thread, then restore its thread counts.

    Every fit here works on tiny matrices (L-BFGS-B's 5-parameter updates, bootstrap line fits); OpenBLAS
    threads only add synchronisation, which on a busy 2-core machine made fits about 100x slower.
    """
    controls = _openblas_controls()
    saved = []
    for get, put in controls:
        try:
            saved.append((put, int(get())))
            put(1)
        except Exception:  # a library without the expected signature: leave it alone
            continue
    try:
        yield
    finally:
        for put, count in saved:
            put(count)


# ----------------------------------------------------------------------------------------------------------
# Huber machinery

def huber(r: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def percentile_ci(samples: np.ndarray, level: float = CI_LEVEL) -> tuple[np.ndarray, np.ndarray]:
    tail = (1.0 - level) / 2.0 * 100.0
    with np.errstate(all="ignore"):
        if np.isnan(samples).any():  # nanpercentile is slow: only when replicates failed
            lo, hi = np.nanpercentile(samples, [tail, 100.0 - tail], axis=0)
        else:
            lo, hi = np.percentile(samples, [tail, 100.0 - tail], axis=0)
    return lo, hi


def bootstrap_counts(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Resampling with replacement as integer weights: ``(n_boot, n)`` counts, each row summing to ``n``."""
    if n_boot <= 0:
        return np.zeros((0, n))
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


# ----------------------------------------------------------------------------------------------------------
# the ratio law: L = a + b ln(ratio)

def _irls_loglinear(u: np.ndarray, y: np.ndarray, weights: np.ndarray, delta: float,
                    iterations: int = 60) -> np.ndarray:
    """Huber-on-relative-residual line fits for each row of ``weights`` (``(B, n)``): returns ``(B, 2)``."""
    w0 = np.atleast_2d(weights)
    inv_y2 = 1.0 / (y * y)
    omega = w0 * inv_y2
    coef = np.zeros((w0.shape[0], 2))
    for _ in range(iterations):
        sw = omega.sum(axis=1)
        su = omega @ u
        sy = omega @ y
        suu = omega @ (u * u)
        suy = omega @ (u * y)
        den = sw * suu - su * su
        with np.errstate(divide="ignore", invalid="ignore"):
            # a replicate that drew a single distinct ratio has no slope
            b = np.where(den > 1e-9 * sw * suu, (sw * suy - su * sy) / den, np.nan)
            a = (sy - b * su) / sw
        new = np.stack([a, b], axis=1)
        if np.allclose(new, coef, rtol=1e-12, atol=1e-12, equal_nan=True):
            coef = new
            break
        coef = new
        r = (a[:, None] + b[:, None] * u[None, :] - y[None, :]) / y[None, :]
        scale = np.minimum(1.0, delta / np.maximum(np.abs(r), 1e-12))
        omega = w0 * scale * inv_y2
    return coef


@dataclass
class LogLinearFit:
    """``L = a + b * ln(ratio)`` with bootstrap draws of ``(a, b)`` and a held-out error."""

    a: float
    b: float
    n_runs: int
    ratio_min: float
    ratio_max: float
    boot: np.ndarray = field(repr=False)
    heldout_mae: float = math.nan
    heldout_mre: float = math.nan
    heldout_note: str = ""

    def predict(self, ratio: np.ndarray | float) -> np.ndarray:
        return self.a + self.b * np.log(np.asarray(ratio, dtype=float))

    def predict_band(self, ratio: np.ndarray, level: float = CI_LEVEL) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise bootstrap interval of the fitted line."""
        u = np.log(np.asarray(ratio, dtype=float))
        if len(self.boot) == 0:
            mean = self.predict(ratio)
            return mean, mean
        draws = self.boot[:, :1] + self.boot[:, 1:2] * u[None, :]
        return percentile_ci(draws, level)

    def ci(self, level: float = CI_LEVEL) -> dict[str, tuple[float, float]]:
        if len(self.boot) == 0:
            return {"a": (math.nan, math.nan), "b": (math.nan, math.nan)}
        lo, hi = percentile_ci(self.boot, level)
        return {"a": (float(lo[0]), float(hi[0])), "b": (float(lo[1]), float(hi[1]))}


@single_threaded_blas()
def fit_loglinear(ratio: Sequence[float], loss: Sequence[float], *, n_boot: int = 1000,
                  delta: float = HUBER_DELTA, seed: int = 0, heldout: bool = True,
                  design: Sequence[float] | None = None) -> LogLinearFit:
    """Fit ``L = a + b ln(ratio)`` robustly, with ``n_boot`` bootstrap replicates and a held-out check.

    Needs at least two distinct ratios; the held-out check needs four (three to fit, one to predict), counted
    on ``design`` (the target ratios, which group runs whose realised ratios differ by rounding) when given.
    """
    x = np.asarray(ratio, dtype=float)
    y = np.asarray(loss, dtype=float)
    size = x if design is None else np.asarray(design, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0) & np.isfinite(size)
    x, y, size = x[keep], y[keep], size[keep]
    if len(np.unique(x)) < 2:
        raise ValueError(f"a ratio law needs at least two distinct ratios, got {len(np.unique(x))}")
    u = np.log(x)
    point = _irls_loglinear(u, y, np.ones(len(x)), delta)[0]
    rng = np.random.default_rng(seed)
    boot = _irls_loglinear(u, y, bootstrap_counts(len(x), n_boot, rng), delta) if n_boot else np.zeros((0, 2))
    fit = LogLinearFit(float(point[0]), float(point[1]), len(x), float(x.min()), float(x.max()), boot)
    if heldout:
        train, test, note = heldout_split(size)
        fit.heldout_note = note
        if train is not None and len(np.unique(size[train])) >= 3:
            a, b = _irls_loglinear(u[train], y[train], np.ones(int(train.sum())), delta)[0]
            pred = a + b * u[test]
            fit.heldout_mae = float(np.mean(np.abs(pred - y[test])))
            fit.heldout_mre = float(np.mean(np.abs(pred - y[test]) / y[test]))
        elif not note:
            fit.heldout_note = "too few distinct sizes below the held-out ones"
    return fit


def heldout_split(size: np.ndarray, fraction: float = 0.25) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """Hold out the runs of the largest distinct sizes (at least one size, about ``fraction`` of the runs)."""
    values = np.unique(size)
    if len(values) < 4:
        return None, None, f"only {len(values)} distinct sizes (need 4)"
    held: list[float] = []
    for value in values[::-1]:
        held.append(value)
        if np.isin(size, held).mean() >= fraction or len(values) - len(held) <= 3:
            break
    cut = min(held)
    test = size >= cut
    return ~test, test, f"fit below {cut:.4g}, predict {int(test.sum())} runs at or above it"


# ----------------------------------------------------------------------------------------------------------
# the parameter law (and any sum of power laws): log L = logsumexp(e, a_i - alpha_i * log X_i)

def _powersum_objective(theta: np.ndarray, xt: np.ndarray, logy: np.ndarray, weights: np.ndarray,
                        delta: float, scale: float | None = None) -> tuple[float, np.ndarray]:
    """Huber loss of ``log(e^e + sum_i e^(a_i - alpha_i x_i)) - log y`` and its gradient.

    ``xt`` is ``(m, n)``: centred log sizes, one row per size variable. The value is scaled by
    ``1 / (delta^2 sum(w))`` so that it is of order one whatever delta and the number of runs (``scale``, when
    the caller has it: a fit evaluates this a hundred times with the same weights).
    """
    m = xt.shape[0]
    e = theta[0]
    terms = theta[1:1 + m, None] - theta[1 + m:, None] * xt        # (m, n)
    # two size variables (the parameter law): the max and sum over rows as one elementwise operation each,
    # which is what the reductions compute for two rows, at a fraction of their per-call cost
    if m == 2:
        top = np.maximum(np.maximum(terms[0], terms[1]), e)         # (n,)
    else:
        top = np.maximum(terms.max(axis=0), e)
    ex = np.exp(terms - top)                                        # (m, n)
    e0 = np.exp(e - top)                                            # (n,)
    total = e0 + (ex[0] + ex[1] if m == 2 else ex.sum(axis=0))
    r = top + np.log(total) - logy
    if scale is None:
        scale = 1.0 / (delta * delta * weights.sum())
    a = np.abs(r)
    value = float(weights @ np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))) * scale
    # dHuber/dr (r clipped to [-delta, delta], as np.clip), over the softmax denominator
    psi = np.minimum(np.maximum(r, -delta), delta) * weights * (scale / total)
    grad = np.empty_like(theta)
    grad[0] = psi @ e0
    grad[1:1 + m] = ex @ psi
    grad[1 + m:] = -((ex * xt) @ psi)
    return value, grad


def _grid_objective(grid: np.ndarray, xc: np.ndarray, logy: np.ndarray, delta: float) -> np.ndarray:
    """Objective (up to a constant factor) of every grid row, vectorised, in chunks to bound memory."""
    m = xc.shape[1]
    out = np.empty(len(grid))
    chunk = max(1, 2_000_000 // max(1, len(logy) * (m + 1)))
    for start in range(0, len(grid), chunk):
        g = grid[start:start + chunk]
        terms = np.empty((len(g), len(logy), m + 1))
        terms[:, :, 0] = g[:, :1]
        terms[:, :, 1:] = g[:, None, 1:1 + m] - g[:, None, 1 + m:] * xc[None, :, :]
        top = terms.max(axis=2)
        lse = top + np.log(np.exp(terms - top[:, :, None]).sum(axis=2))
        out[start:start + chunk] = huber(lse - logy[None, :], delta).sum(axis=1)
    return out


MAX_EXPONENT = 3.0  # the power laws' exponents are fitted in [0, MAX_EXPONENT]


def exponent_at_bound(alpha: float, max_exponent: float = MAX_EXPONENT) -> bool:
    """An exponent on (within 0.001 of) 0 or ``max_exponent``: the fit ran into its bound (near 0, the term is a
    constant that trades with E)."""
    return alpha <= 1e-3 or alpha >= max_exponent - 1e-3


@dataclass
class PowerSumFit:
    """``L = E + sum_i A_i / X_i^alpha_i``; ``names`` name the size variables."""

    names: tuple[str, ...]
    E: float
    A: np.ndarray
    alpha: np.ndarray
    x_ref: np.ndarray = field(repr=False)
    theta: np.ndarray = field(repr=False)
    n_runs: int = 0
    boot: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)), repr=False)
    objective: float = math.nan
    heldout_mae: float = math.nan
    heldout_mre: float = math.nan
    heldout_note: str = ""
    max_exponent: float = MAX_EXPONENT

    def exponent_at_bound(self, index: int) -> bool:
        """Whether exponent ``index`` ended on its bound (0 or ``max_exponent``): the runs do not determine it."""
        return exponent_at_bound(float(self.alpha[index]), self.max_exponent)

    def predict(self, *sizes: np.ndarray | float) -> np.ndarray:
        return powersum_predict(self.theta, self.x_ref, sizes)

    def params(self) -> dict[str, float]:
        out = {"E": self.E}
        for i, name in enumerate(self.names):
            out[f"A_{name}"] = float(self.A[i])
            out[f"alpha_{name}"] = float(self.alpha[i])
        return out

    def boot_params(self) -> np.ndarray:
        """Bootstrap draws as columns ``E, A_1.., alpha_1..``, in :meth:`params` order."""
        if len(self.boot) == 0:
            return np.zeros((0, 1 + 2 * len(self.names)))
        return np.stack([_theta_to_params(t, self.x_ref) for t in self.boot])

    def ci(self, level: float = CI_LEVEL) -> dict[str, tuple[float, float]]:
        keys = list(self.params())
        draws = self.boot_params()
        if len(draws) == 0:
            return {k: (math.nan, math.nan) for k in keys}
        lo, hi = percentile_ci(draws, level)
        return {k: (float(lo[i]), float(hi[i])) for i, k in enumerate(keys)}


def _theta_to_params(theta: np.ndarray, x_ref: np.ndarray) -> np.ndarray:
    m = len(x_ref)
    alpha = theta[1 + m:]
    log_a = theta[1:1 + m] + alpha * x_ref  # A_i / X^alpha = exp(a_c - alpha (log X - x_ref))
    # interleave as E, A_1, alpha_1, A_2, alpha_2 to match params()
    out = [math.exp(theta[0])]
    for i in range(m):
        out += [math.exp(min(log_a[i], 700.0)), alpha[i]]
    return np.array(out)


def powersum_predict(theta: np.ndarray, x_ref: np.ndarray, sizes: Sequence[np.ndarray | float]) -> np.ndarray:
    m = len(x_ref)
    arrays = np.broadcast_arrays(*[np.asarray(s, dtype=float) for s in sizes])
    total = np.exp(theta[0]) * np.ones(arrays[0].shape)
    for i in range(m):
        total = total + np.exp(theta[1 + i] - theta[1 + m + i] * (np.log(arrays[i]) - x_ref[i]))
    return total


def _default_grid(y: np.ndarray, m: int) -> np.ndarray:
    ymin = float(np.min(y))
    e_values = np.log(ymin * np.array([0.3, 0.6, 0.8, 0.95]))
    a_values = np.log(ymin * np.array([0.01, 0.05, 0.2, 0.6]))
    alpha_values = np.array([0.1, 0.3, 0.6, 1.0])
    rows = [[e, *a, *al] for e in e_values
            for a in itertools.product(a_values, repeat=m)
            for al in itertools.product(alpha_values, repeat=m)]
    return np.array(rows)


LBFGSB_OPTIONS = {"maxiter": 500, "ftol": 1e-9, "gtol": 1e-6}


def _minimise(start: np.ndarray, xt: np.ndarray, logy: np.ndarray, weights: np.ndarray, delta: float,
              bounds: list[tuple[float, float]]) -> tuple[np.ndarray, float]:
    used = weights > 0  # a bootstrap replicate leaves about a third of the runs out: drop them
    if not used.all():
        xt, logy, weights = xt[:, used], logy[used], weights[used]
    args = (np.ascontiguousarray(xt), logy, weights, delta, 1.0 / (delta * delta * weights.sum()))
    if _direct_lbfgsb_matches():
        return lbfgsb(_powersum_objective, start, args, bounds, **LBFGSB_OPTIONS)
    result = minimize(_powersum_objective, start, args=args, jac=True, method="L-BFGS-B", bounds=bounds,
                      options=LBFGSB_OPTIONS)
    return result.x, float(result.fun)


# ----------------------------------------------------------------------------------------------------------
# L-BFGS-B without scipy.optimize.minimize's per-evaluation bookkeeping

def lbfgsb(fun: Callable[..., tuple[float, np.ndarray]], x0: np.ndarray, args: tuple,
           bounds: Sequence[tuple[float | None, float | None]], *, maxiter: int, ftol: float, gtol: float,
           maxcor: int = 10, maxls: int = 20, maxfun: int = 15000) -> tuple[np.ndarray, float]:
    """``minimize(fun, x0, args, jac=True, method="L-BFGS-B", bounds=bounds, options=...)``: its ``(x, fun)``.

    The same loop around scipy's own L-BFGS-B routine (``scipy.optimize._lbfgsb.setulb``, scipy >= 1.15) as
    ``scipy.optimize._lbfgsb_py._minimize_lbfgsb``, with the same inputs, so the same iterates, without the
    layers ``minimize`` wraps around each evaluation (memoisation, copies, counters): they cost more than the
    parameter law's objective itself, and a parameter-law fit with its bootstrap is ~100 minimisations of
    ~100 evaluations. Used only where :func:`_direct_lbfgsb_matches` has found it to reproduce ``minimize``
    exactly; ``fun`` returns ``(value, gradient)``.
    """
    from scipy.optimize import _lbfgsb  # noqa: PLC0415 - private, so only here

    x0 = np.asarray(x0, dtype=np.float64).ravel()
    n = x0.size
    lower = np.array([-np.inf if lo is None else lo for lo, _ in bounds], dtype=np.float64)
    upper = np.array([np.inf if hi is None else hi for _, hi in bounds], dtype=np.float64)
    finite_lo, finite_hi = np.isfinite(lower), np.isfinite(upper)
    nbd = np.zeros(n, np.int32)
    nbd[finite_lo & ~finite_hi] = 1
    nbd[finite_lo & finite_hi] = 2
    nbd[~finite_lo & finite_hi] = 3
    low_bnd = np.where(finite_lo, lower, 0.0)
    upper_bnd = np.where(finite_hi, upper, 0.0)
    x = np.array(np.clip(x0, lower, upper), dtype=np.float64)
    factr = ftol / np.finfo(float).eps
    f: float | np.ndarray = np.array(0.0, dtype=np.float64)
    g = np.zeros((n,), dtype=np.float64)
    wa = np.zeros(2 * maxcor * n + 5 * n + 11 * maxcor * maxcor + 8 * maxcor, np.float64)
    iwa = np.zeros(3 * n, dtype=np.int32)
    task = np.zeros(2, dtype=np.int32)
    ln_task = np.zeros(2, dtype=np.int32)
    lsave = np.zeros(4, dtype=np.int32)
    isave = np.zeros(44, dtype=np.int32)
    dsave = np.zeros(29, dtype=np.float64)
    # minimize evaluates at the start point first, and again only where the routine asks at another point
    evaluated_x = x.copy()
    value, gradient = fun(evaluated_x.copy(), *args)
    nfev, iterations = 1, 0
    while True:
        g = np.asarray(g).astype(np.float64)
        _lbfgsb.setulb(maxcor, x, low_bnd, upper_bnd, nbd, f, g, factr, gtol, wa, iwa, task, lsave, isave, dsave,
                       maxls, ln_task)
        if task[0] == 3:  # the routine wants f and g at x
            if not (x == evaluated_x).all():  # np.array_equal, without its checks (same shape, float)
                evaluated_x = x.copy()
                value, gradient = fun(evaluated_x.copy(), *args)
                nfev += 1
            f, g = value, np.atleast_1d(gradient)
        elif task[0] == 1:  # a new iterate
            iterations += 1
            if iterations >= maxiter:
                task[0], task[1] = 5, 504
            elif nfev > maxfun:
                task[0], task[1] = 5, 502
        else:
            break
    return x, float(f)


@functools.cache
def _direct_lbfgsb_matches() -> bool:
    """Whether :func:`lbfgsb` gives exactly ``scipy.optimize.minimize``'s result here, checked once per process on
    a small parameter-law fit (a scipy whose routine takes other arguments, or iterates otherwise, falls back to
    ``minimize``)."""
    rng = np.random.default_rng(1)
    act = np.geomspace(1e7, 1e9, 12)
    tot = act * rng.choice([2.0, 4.0, 8.0, 16.0], size=12)
    y = 1.7 + 300 / act ** 0.3 + 90 / tot ** 0.25 + rng.normal(0.0, 0.002, size=12)
    logx = np.log(np.stack([act, tot], axis=1))
    xt = np.ascontiguousarray((logx - logx.mean(axis=0)).T)
    logy = np.log(y)
    weights = rng.multinomial(12, np.full(12, 1 / 12)).astype(np.float64) + 1.0
    args = (xt, logy, weights, HUBER_DELTA, 1.0 / (HUBER_DELTA ** 2 * weights.sum()))
    top = math.log(float(y.max()))
    bounds = [(math.log(0.02 * float(y.min())), top), (-20.0, top), (-20.0, top), (0.0, 3.0), (0.0, 3.0)]
    start = np.array([math.log(0.8 * float(y.min())), math.log(0.05), math.log(0.02), 0.3, 0.3])
    try:
        x, value = lbfgsb(_powersum_objective, start, args, bounds, **LBFGSB_OPTIONS)
    except Exception:  # noqa: BLE001 - another scipy's routine: use minimize
        return False
    expected = minimize(_powersum_objective, start, args=args, jac=True, method="L-BFGS-B", bounds=bounds,
                        options=LBFGSB_OPTIONS)
    return bool(np.array_equal(x, expected.x) and value == float(expected.fun))


Mapper = Callable[[Callable[..., Any], list[tuple]], list]


def _each(fn: Callable[..., Any], calls: list[tuple]) -> list:
    return [fn(*args) for args in calls]


def _replicate(start: np.ndarray, xt: np.ndarray, logy: np.ndarray, weights: np.ndarray, delta: float,
               bounds: list[tuple[float, float]]) -> np.ndarray:
    """One bootstrap replicate of :func:`fit_power_sum` (what its ``mapper`` is handed)."""
    return _minimise(start, xt, logy, weights, delta, bounds)[0]


@single_threaded_blas()
def fit_power_sum(sizes: Sequence[Sequence[float]], loss: Sequence[float], names: Sequence[str], *,
                  n_boot: int = DEFAULT_BOOTSTRAP, delta: float = HUBER_DELTA, seed: int = 0,
                  n_starts: int = 4, max_exponent: float = MAX_EXPONENT, mapper: Mapper | None = None
                  ) -> PowerSumFit:
    """Fit ``L = E + sum_i A_i / X_i^alpha_i`` in log space (Huber, L-BFGS-B from the best grid points).

    ``sizes`` holds one sequence per size variable (``X_i``), each as long as ``loss``. The grid (4 values of
    E, 4 of each A_i, 4 of each alpha_i) is scored in one vectorised pass; L-BFGS-B starts from its
    ``n_starts`` best points. Bootstrap replicates resample the runs and start from the point estimate.
    Bounds: E between 2% of the smallest loss and the largest loss, each term at the centre size below the
    largest loss, exponents in ``[0, max_exponent]``. ``mapper(fn, calls)`` computes the minimisations from the
    starts, then the replicates: ``[fn(*args) for args in calls]`` (the default; each is a function of its
    arguments alone, so another process may compute some of them).
    """
    y = np.asarray(loss, dtype=float)
    xs = np.stack([np.asarray(s, dtype=float) for s in sizes], axis=1)
    keep = np.isfinite(y) & (y > 0) & np.all(np.isfinite(xs) & (xs > 0), axis=1)
    y, xs = y[keep], xs[keep]
    m = xs.shape[1]
    if len(y) < 2 * m + 2:
        raise ValueError(f"a law with {2 * m + 1} parameters needs at least {2 * m + 2} runs, got {len(y)}")
    logx = np.log(xs)
    x_ref = logx.mean(axis=0)
    xc = logx - x_ref
    xt = np.ascontiguousarray(xc.T)
    logy = np.log(y)
    grid = _default_grid(y, m)
    scores = _grid_objective(grid, xc, logy, delta)
    top = math.log(float(y.max()))
    bounds = [(math.log(0.02 * float(y.min())), top)] + [(-20.0, top)] * m + [(0.0, max_exponent)] * m
    ones = np.ones(len(y))
    starts = [np.clip(grid[index], [b[0] for b in bounds], [b[1] for b in bounds])
              for index in np.argsort(scores)[:n_starts]]
    best_theta, best_value = None, math.inf
    for theta, value in (mapper or _each)(_minimise, [(start, xt, logy, ones, delta, bounds) for start in starts]):
        if value < best_value:
            best_theta, best_value = theta, value
    rng = np.random.default_rng(seed)
    calls = [(best_theta, xt, logy, counts, delta, bounds) for counts in bootstrap_counts(len(y), n_boot, rng)]
    boot = np.array((mapper or _each)(_replicate, calls)).reshape(-1, len(best_theta))
    params = _theta_to_params(best_theta, x_ref)
    return PowerSumFit(tuple(names), float(params[0]), params[1::2].copy(), params[2::2].copy(), x_ref,
                       best_theta, len(y), boot, best_value, max_exponent=max_exponent)


def fit_param_law(activated: Sequence[float], total: Sequence[float], loss: Sequence[float], *,
                  n_boot: int = DEFAULT_BOOTSTRAP, delta: float = HUBER_DELTA, seed: int = 0,
                  heldout: bool = True, mapper: Mapper | None = None) -> PowerSumFit:
    """``L = E + A / N_act^alpha + B / N_tot^beta`` (``alpha_act``, ``alpha_tot`` in the result's params;
    ``mapper``: :func:`fit_power_sum`)."""
    act = np.asarray(activated, dtype=float)
    tot = np.asarray(total, dtype=float)
    y = np.asarray(loss, dtype=float)
    fit = fit_power_sum([act, tot], y, ("act", "tot"), n_boot=n_boot, delta=delta, seed=seed, mapper=mapper)
    if heldout:
        size = act if len(np.unique(act)) >= 4 else tot
        train, test, note = heldout_split(size)
        fit.heldout_note = ("by activated size: " if size is act else "by total size: ") + note
        if train is not None and train.sum() >= 6:
            try:
                small = fit_power_sum([act[train], tot[train]], y[train], ("act", "tot"), n_boot=0, delta=delta,
                                      mapper=mapper)
            except ValueError as exc:
                fit.heldout_note = str(exc)
            else:
                pred = small.predict(act[test], tot[test])
                fit.heldout_mae = float(np.mean(np.abs(pred - y[test])))
                fit.heldout_mre = float(np.mean(np.abs(pred - y[test]) / y[test]))
    return fit


# ----------------------------------------------------------------------------------------------------------
# fitting whole runs tables

def group_label(keys: dict[str, object]) -> str:
    parts = []
    for name, value in keys.items():
        if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
            continue
        if name == "corpus_fingerprint":
            parts.append(f"corpus={str(value)[:8]}")
        else:
            parts.append(f"{name}={_fmt(value)}")
    return " ".join(parts)


def _fmt(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def present_keys(frame: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    return [k for k in keys if k in frame.columns]


def distinct_ratios(runs: pd.DataFrame) -> int:
    """Distinct design ratios: target ratios when known (realised ratios miss them by rounding), else the
    realised ratios to three significant digits."""
    if runs.empty:
        return 0
    if "target_ratio" in runs.columns and runs["target_ratio"].notna().all():
        return int(runs["target_ratio"].nunique())
    return int(np.unique(np.round(np.log(runs["ratio"].to_numpy(float)), 3)).size)


@dataclass
class RatioLaws:
    """Every ratio law of a runs table: ``fits[(group key tuple, split)]`` and a flat ``table``."""

    keys: list[str]
    fits: dict[tuple[tuple, str], LogLinearFit]
    table: pd.DataFrame


@single_threaded_blas()
def fit_ratio_laws(runs: pd.DataFrame, *, split_names: Sequence[str] | None = None,
                   n_boot: int = 1000, min_ratios: int = 3, seed: int = 0) -> RatioLaws:
    """A ratio law for every series (:data:`SERIES_KEYS`) with at least ``min_ratios`` distinct ratios."""
    data = usable(runs)
    keys = present_keys(data, SERIES_KEYS)
    split_names = list(split_names or splits(runs))
    fits: dict[tuple[tuple, str], LogLinearFit] = {}
    rows = []
    if data.empty:
        return RatioLaws(keys, fits, pd.DataFrame())
    for key, group in data.groupby(keys, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        for split in split_names:
            column = loss_column(split)
            if column not in group.columns:
                continue
            sub = group[np.isfinite(group[column]) & np.isfinite(group["ratio"])]
            if distinct_ratios(sub) < min_ratios:
                continue
            design = (sub["target_ratio"].to_numpy(float)
                      if "target_ratio" in sub.columns and sub["target_ratio"].notna().all() else None)
            fit = fit_loglinear(sub["ratio"].to_numpy(), sub[column].to_numpy(), n_boot=n_boot, seed=seed,
                                design=design)
            fits[(key, split)] = fit
            ci = fit.ci()
            rows.append({**dict(zip(keys, key, strict=True)), "split": split, "law": "ratio",
                         "label": group_label(dict(zip(keys, key, strict=True))),
                         "n_runs": fit.n_runs, "ratio_min": fit.ratio_min, "ratio_max": fit.ratio_max,
                         "a": fit.a, "a_lo": ci["a"][0], "a_hi": ci["a"][1],
                         "b": fit.b, "b_lo": ci["b"][0], "b_hi": ci["b"][1],
                         "heldout_mae": fit.heldout_mae, "heldout_mre": fit.heldout_mre,
                         "heldout_note": fit.heldout_note})
    return RatioLaws(keys, fits, pd.DataFrame(rows))


@dataclass
class ParamLaws:
    keys: list[str]
    fits: dict[tuple[tuple, str], PowerSumFit]
    table: pd.DataFrame
    skipped: list[str]


@single_threaded_blas()
def fit_param_laws(runs: pd.DataFrame, *, split_names: Sequence[str] | None = None,
                   n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0, min_runs: int = 8,
                   mapper: Mapper | None = None) -> ParamLaws:
    """The parameter law for every family group (:data:`FAMILY_KEYS`) whose sizes vary enough to fit it.

    A group needs ``min_runs`` usable runs, at least two distinct activated sizes and two distinct totals;
    groups that do not are listed in ``skipped`` with the reason. ``mapper``: how the bootstrap replicates are
    computed (:func:`fit_power_sum`).
    """
    data = usable(runs)
    keys = present_keys(data, FAMILY_KEYS)
    split_names = list(split_names or splits(runs))
    fits: dict[tuple[tuple, str], PowerSumFit] = {}
    rows, skipped = [], []
    if data.empty:
        return ParamLaws(keys, fits, pd.DataFrame(), ["no usable runs"])
    for key, group in data.groupby(keys, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        label = group_label(dict(zip(keys, key, strict=True)))
        group = group[np.isfinite(group["activated"]) & np.isfinite(group["total"])]
        if len(group) < min_runs or group["activated"].nunique() < 2 or group["total"].nunique() < 2:
            skipped.append(f"{label}: {len(group)} runs, {group['activated'].nunique()} activated sizes, "
                           f"{group['total'].nunique()} totals (need {min_runs}, 2, 2)")
            continue
        for split in split_names:
            column = loss_column(split)
            if column not in group.columns:
                continue
            sub = group[np.isfinite(group[column])]
            if len(sub) < min_runs:
                continue
            fit = fit_param_law(sub["activated"].to_numpy(), sub["total"].to_numpy(), sub[column].to_numpy(),
                                n_boot=n_boot, seed=seed, mapper=mapper)
            fits[(key, split)] = fit
            ci = fit.ci()
            row = {**dict(zip(keys, key, strict=True)), "split": split, "law": "param", "label": label,
                   "n_runs": fit.n_runs, "heldout_mae": fit.heldout_mae, "heldout_mre": fit.heldout_mre,
                   "heldout_note": fit.heldout_note}
            for name, value in fit.params().items():
                row[name] = value
                row[f"{name}_lo"], row[f"{name}_hi"] = ci[name]
            rows.append(row)
    return ParamLaws(keys, fits, pd.DataFrame(rows), skipped)
