"""Loss curves: the final-loss estimate of a run and the data law ``L(D) = E + A * D^(-alpha)`` in tokens.

The curve fit uses the same log-space Huber fit as the parameter law (:func:`analysis.laws.fit_power_sum`),
on the evaluations after a warm-up fraction of the run. Extrapolation to a longer budget comes with an
interval, either from the fit's covariance (Gauss-Newton on the log residuals, propagated by the delta
method: fast, but optimistic, since consecutive evaluations are correlated) or from a bootstrap over the
evaluations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.special import ndtri

from embscale.analysis.laws import HUBER_DELTA, PowerSumFit, fit_power_sum, percentile_ci, powersum_predict
from embscale.analysis.store import DEFAULT_LAST_K


def final_loss(values: Sequence[float], last_k: int = DEFAULT_LAST_K) -> tuple[float, float]:
    """Mean and standard deviation of the last ``last_k`` finite evaluations (NaN when there are none)."""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)][-last_k:]
    if len(finite) == 0:
        return math.nan, math.nan
    return float(finite.mean()), float(finite.std(ddof=1)) if len(finite) > 1 else 0.0


@dataclass
class CurveFit:
    """``L(D) = E + A * D^(-alpha)`` fitted to one run's curve."""

    fit: PowerSumFit
    tokens_min: float
    tokens_max: float
    covariance: np.ndarray | None

    @property
    def E(self) -> float:
        return self.fit.E

    @property
    def A(self) -> float:
        return float(self.fit.A[0])

    @property
    def alpha(self) -> float:
        return float(self.fit.alpha[0])

    def predict(self, tokens: np.ndarray | float) -> np.ndarray:
        return self.fit.predict(tokens)

    def extrapolate(self, tokens: np.ndarray | float, level: float = 0.95) -> tuple[np.ndarray, np.ndarray,
                                                                                   np.ndarray]:
        """Predicted loss at ``tokens`` with a ``level`` interval: ``(mean, low, high)``.

        Uses the bootstrap draws when the fit has them, the covariance otherwise.
        """
        d = np.atleast_1d(np.asarray(tokens, dtype=float))
        mean = self.predict(d)
        if len(self.fit.boot):
            draws = np.stack([powersum_predict(t, self.fit.x_ref, [d]) for t in self.fit.boot])
            lo, hi = percentile_ci(draws, level)
            return mean, lo, hi
        if self.covariance is None:
            return mean, np.full_like(mean, np.nan), np.full_like(mean, np.nan)
        jac = _log_jacobian(self.fit.theta, np.log(d) - self.fit.x_ref[0])
        var = np.einsum("ni,ij,nj->n", jac, self.covariance, jac)
        half = float(ndtri(0.5 + level / 2.0)) * np.sqrt(np.maximum(var, 0.0))
        # the interval is symmetric in log loss
        return mean, mean * np.exp(-half), mean * np.exp(half)


def _log_jacobian(theta: np.ndarray, xc: np.ndarray) -> np.ndarray:
    """d log L / d theta for theta = (e, a, alpha) at centred log tokens ``xc``."""
    t0 = np.full_like(xc, theta[0])
    t1 = theta[1] - theta[2] * xc
    top = np.maximum(t0, t1)
    p0, p1 = np.exp(t0 - top), np.exp(t1 - top)
    s = p0 + p1
    p0, p1 = p0 / s, p1 / s
    return np.stack([p0, p1, -p1 * xc], axis=1)


def fit_loss_curve(tokens: Sequence[float], loss: Sequence[float], *, skip_fraction: float = 0.1,
                   n_boot: int = 0, delta: float = HUBER_DELTA, seed: int = 0) -> CurveFit:
    """Fit ``L(D) = E + A D^-alpha`` to evaluations with ``D`` above ``skip_fraction`` of the last.

    ``n_boot > 0`` resamples the evaluations for the extrapolation interval; otherwise the interval comes
    from the covariance of the log-residual fit.
    """
    d = np.asarray(tokens, dtype=float)
    y = np.asarray(loss, dtype=float)
    keep = np.isfinite(d) & np.isfinite(y) & (d > 0) & (y > 0)
    d, y = d[keep], y[keep]
    if len(d) == 0:
        raise ValueError("no finite (tokens, loss) points to fit")
    keep = d >= skip_fraction * d.max()
    d, y = d[keep], y[keep]
    if len(d) < 4:
        raise ValueError(f"a loss curve fit needs at least 4 evaluations after warm-up, got {len(d)}")
    fit = fit_power_sum([d], y, ("tokens",), n_boot=n_boot, delta=delta, seed=seed)
    covariance = None
    if not n_boot:
        xc = np.log(d) - fit.x_ref[0]
        jac = _log_jacobian(fit.theta, xc)
        resid = np.log(fit.predict(d)) - np.log(y)
        dof = max(1, len(d) - 3)
        sigma2 = float(resid @ resid) / dof
        try:
            covariance = sigma2 * np.linalg.inv(jac.T @ jac)
        except np.linalg.LinAlgError:
            covariance = sigma2 * np.linalg.pinv(jac.T @ jac)
    return CurveFit(fit, float(d.min()), float(d.max()), covariance)


def fit_run_curves(curves: pd.DataFrame, run_ids: Sequence[str], column: str = "train_loss", *,
                   skip_fraction: float = 0.1) -> dict[str, CurveFit]:
    """Curve fits of several runs' ``column`` (runs that cannot be fitted are left out)."""
    out: dict[str, CurveFit] = {}
    wanted = set(run_ids)
    for run_id, group in curves[curves["run_id"].isin(wanted)].groupby("run_id", sort=False):
        if column not in group.columns:
            continue
        try:
            out[str(run_id)] = fit_loss_curve(group["tokens"].to_numpy(), group[column].to_numpy(),
                                              skip_fraction=skip_fraction)
        except ValueError:
            continue
    return out
