"""Scaling-law fits, loss curves, crossovers and Pareto frontiers on data with a known answer."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from embscale.analysis import frontier, laws, synthetic
from embscale.analysis.curves import final_loss, fit_loss_curve


def test_param_law_recovers_known_exponents_inside_bootstrap_intervals() -> None:
    truth = synthetic.TRUTH
    runs = synthetic.param_law_runs(noise=0.002, seed=1)
    fit = laws.fit_param_law(runs["activated"], runs["total"], runs["final_train_loss"], n_boot=60, seed=0)
    ci = fit.ci()
    params = fit.params()
    for name, true in (("alpha_act", truth.alpha), ("alpha_tot", truth.beta), ("E", truth.E["train"])):
        lo, hi = ci[name]
        assert lo <= true <= hi, (name, true, lo, hi)
        assert abs(params[name] - true) < 0.05 * true
    # the intervals are informative, not trivially wide
    assert ci["alpha_act"][1] - ci["alpha_act"][0] < 0.1
    assert ci["alpha_tot"][1] - ci["alpha_tot"][0] < 0.05


def test_param_law_through_a_runs_table_skips_groups_without_size_variation() -> None:
    runs = synthetic.param_law_runs(noise=0.001, seed=2)
    one_size = runs[runs["width"] == 1024].assign(family="ne", base_ratio=12.0)
    fits = laws.fit_param_laws(pd.concat([runs, one_size]), split_names=["train"], n_boot=5)
    assert len(fits.fits) == 1 and "1 activated sizes" in fits.skipped[0]
    row = fits.table.iloc[0]
    assert row["family"] == "moe" and row["alpha_act_lo"] <= row["alpha_act"] <= row["alpha_act_hi"]


def test_heldout_error_is_small_on_clean_data_and_large_for_a_wrong_law() -> None:
    clean = synthetic.param_law_runs(noise=0.0)
    fit = laws.fit_param_law(clean["activated"], clean["total"], clean["final_train_loss"], n_boot=0)
    assert "by activated size" in fit.heldout_note
    assert fit.heldout_mae < 2e-3 and fit.heldout_mre < 1e-3

    ratio = np.array([4, 6, 8, 12, 16, 24, 32, 48], dtype=float)
    line = laws.fit_loglinear(ratio, 3.0 - 0.1 * np.log(ratio), n_boot=0)
    assert line.heldout_mae < 1e-9
    # a power law in the ratio is not log-linear: extrapolating the line misses the largest ratios
    curved = laws.fit_loglinear(ratio, 2.0 + 1.5 * ratio**-0.5, n_boot=0)
    assert curved.heldout_mae > 100 * line.heldout_mae + 1e-3


def test_ratio_law_recovers_line_and_resists_an_outlier() -> None:
    rng = np.random.default_rng(3)
    ratio = np.repeat([4.0, 8, 16, 32, 64], 4)
    loss = 3.0 - 0.08 * np.log(ratio) + rng.normal(0, 0.002, len(ratio))
    loss[3] += 0.5  # a broken run
    fit = laws.fit_loglinear(ratio, loss, n_boot=500)
    ci = fit.ci()
    assert ci["b"][0] <= -0.08 <= ci["b"][1] and ci["a"][0] <= 3.0 <= ci["a"][1]
    ols = np.polyfit(np.log(ratio), loss, 1)
    assert abs(fit.b + 0.08) < abs(ols[0] + 0.08) / 5


def test_crossover_finder_recovers_a_known_crossover() -> None:
    runs = synthetic.ratio_lines_runs(crossover=21.0, noise=0.002, seed=4)
    fits = laws.fit_ratio_laws(runs, split_names=["train"], n_boot=400)
    table = frontier.crossovers(fits)
    assert len(table) == 1
    row = table.iloc[0]
    assert row["ci_lo"] <= 21.0 <= row["ci_hi"]
    assert abs(row["crossover"] - 21.0) < 2.0
    assert row["ne_wins_above"] and row["in_range"] and row["note"] == ""
    assert frontier.crossover_ratio(1.0, -0.1, 1.0, -0.1) != frontier.crossover_ratio(1.0, -0.1, 1.1, -0.2)
    assert math.isnan(frontier.crossover_ratio(1.0, -0.1, 1.2, -0.1))


def test_pareto_frontier_on_a_hand_example() -> None:
    cost = [1.0, 2.0, 2.0, 3.0, 4.0, 5.0, 0.5, 3.0, np.nan, 6.0]
    loss = [5.0, 4.0, 3.0, 3.0, 1.0, 2.0, 6.0, 3.0, 0.1, 1.0]
    #       on   off  on   off  on   off  on   off  nan  off (ties the loss of a cheaper point)
    expected = [True, False, True, False, True, False, True, False, False, False]
    assert frontier.pareto_mask(cost, loss).tolist() == expected
    assert frontier.pareto_mask([1, 1], [2, 2]).tolist() == [True, True]  # duplicates are both kept
    assert frontier.pareto_mask([], []).tolist() == []

    runs = pd.DataFrame({"run_id": list("abcdef"), "family": ["moe"] * 3 + ["ne"] * 3, "fit_ok": True,
                         "total": [1, 2, 3, 1, 2, 3], "final_train_loss": [3.0, 2.0, 2.5, 2.9, 2.95, 1.0]})
    front = frontier.frontiers(runs, "train", ["total"])
    assert front.groupby("group")["run_id"].apply(list).to_dict() == {"moe": ["a", "b"], "ne": ["d", "f"]}
    overall = frontier.frontiers(runs, "train", ["total"], by=None)
    assert overall["run_id"].tolist() == ["d", "b", "f"]


def test_matched_pairs_and_loss_reduction() -> None:
    base = {"fit_ok": True, "corpus_fingerprint": "x", "depth": 10}
    rows = [
        {"run_id": "m1", "family": "moe", "target_ratio": 16, "width": 512, "seed": 0, "final_train_loss": 3.00},
        {"run_id": "m2", "family": "moe", "target_ratio": 16, "width": 512, "seed": 1, "final_train_loss": 3.02},
        {"run_id": "m3", "family": "moe", "target_ratio": 16, "width": 1024, "seed": 0, "final_train_loss": 2.80},
        {"run_id": "n1", "family": "ne", "target_ratio": 16, "width": 512, "seed": 0, "final_train_loss": 2.97},
        {"run_id": "n2", "family": "ne", "target_ratio": 16, "width": 512, "seed": 1, "final_train_loss": 3.01},
        {"run_id": "n3", "family": "ne", "target_ratio": 16, "width": 1024, "seed": 0, "final_train_loss": 2.90},
        {"run_id": "n4", "family": "ne", "target_ratio": 32, "width": 512, "seed": 0, "final_train_loss": 2.5},
    ]
    runs = pd.DataFrame([{**base, "base_ratio": 12.0 if r["family"] == "ne" else np.nan, "ratio": r["target_ratio"],
                          **r} for r in rows])
    pairs = frontier.matched_pairs(runs).set_index("run_id")
    assert sorted(pairs.index) == ["n1", "n2", "n3"]  # n4 has no MoE at ratio 32
    assert pairs.loc["n1", "moe_run_id"] == "m1" and pairs.loc["n1", "delta"] == pytest.approx(-0.03)
    assert pairs.loc["n3", "delta"] == pytest.approx(0.10)
    reduction = frontier.loss_reduction(runs, "train", by="width").set_index("width")
    assert reduction.loc[512, "delta"] == pytest.approx(-0.02) and reduction.loc[512, "n_pairs"] == 2
    assert reduction.loc[1024, "delta"] == pytest.approx(0.10)


def test_loss_curve_fit_and_extrapolation() -> None:
    rng = np.random.default_rng(5)
    tokens = np.linspace(1e8, 2e9, 60)
    truth = 2.0 + 400.0 * tokens**-0.3

    def observed() -> np.ndarray:
        return truth + rng.normal(0, 0.002, len(tokens))

    fit = fit_loss_curve(tokens, observed())
    assert abs(fit.alpha - 0.3) < 0.05 and abs(fit.E - 2.0) < 0.1
    target = 8e9
    mean, lo, hi = fit.extrapolate(target)
    true_value = 2.0 + 400.0 * target**-0.3
    assert lo[0] <= true_value <= hi[0] and abs(mean[0] - true_value) < 0.01
    boot = fit_loss_curve(tokens, observed(), n_boot=40)
    b_mean, b_lo, b_hi = boot.extrapolate([target])
    assert b_lo[0] < b_mean[0] < b_hi[0]
    with pytest.raises(ValueError, match="at least 4"):
        fit_loss_curve(tokens[:3], truth[:3])

    assert final_loss([3.0, 2.0, 1.0, 2.0, np.nan], last_k=3) == pytest.approx((5 / 3, np.std([2, 1, 2], ddof=1)))
    assert math.isnan(final_loss([np.nan])[0])


# ----- the fast paths of the parameter-law fit reproduce the plain ones exactly -----
def _objective_as_written(theta, xt, logy, weights, delta):
    """The parameter law's objective with the general reductions (as it was before its two-variable path)."""
    m = xt.shape[0]
    terms = theta[1:1 + m, None] - theta[1 + m:, None] * xt
    top = np.maximum(terms.max(axis=0), theta[0])
    ex = np.exp(terms - top)
    e0 = np.exp(theta[0] - top)
    total = e0 + ex.sum(axis=0)
    r = top + np.log(total) - logy
    scale = 1.0 / (delta * delta * weights.sum())
    a = np.abs(r)
    value = float(weights @ np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))) * scale
    psi = np.clip(r, -delta, delta) * weights * (scale / total)
    grad = np.empty_like(theta)
    grad[0] = psi @ e0
    grad[1:1 + m] = ex @ psi
    grad[1 + m:] = -((ex * xt) @ psi)
    return value, grad


def test_power_sum_objective_is_bitwise_the_general_form() -> None:
    rng = np.random.default_rng(3)
    for trial in range(300):
        m, n = (2, int(rng.integers(5, 200))) if trial % 4 else (int(rng.integers(1, 4)), 30)
        xt = np.ascontiguousarray(rng.normal(0.0, 2.0, (m, n)))
        logy = np.log(rng.uniform(1.5, 4.0, n))
        weights = rng.multinomial(n, np.full(n, 1.0 / n)).astype(float)
        theta = np.concatenate([[rng.normal()], rng.normal(0.0, 2.0, m), rng.uniform(0.0, 3.0, m)])
        delta = float(10 ** rng.uniform(-4, -1))
        expected = _objective_as_written(theta, xt, logy, weights, delta)
        for got in (laws._powersum_objective(theta, xt, logy, weights, delta),
                    laws._powersum_objective(theta, xt, logy, weights, delta, 1.0 / (delta * delta * weights.sum()))):
            assert got[0] == expected[0] and np.array_equal(got[1], expected[1])


def test_direct_lbfgsb_is_scipy_minimize_exactly() -> None:
    """The L-BFGS-B loop the fits use gives scipy.optimize.minimize's iterates to the last bit, on the bootstrap
    replicates of a real parameter-law fit (and is the one in use on this scipy)."""
    from scipy.optimize import minimize

    assert laws._direct_lbfgsb_matches()
    runs = synthetic.param_law_runs(noise=0.003, seed=4)
    y = runs["final_train_loss"].to_numpy()
    logx = np.log(runs[["activated", "total"]].to_numpy())
    xt = np.ascontiguousarray((logx - logx.mean(axis=0)).T)
    top = math.log(float(y.max()))
    bounds = [(math.log(0.02 * float(y.min())), top), (-20.0, top), (-20.0, top), (0.0, 3.0), (0.0, 3.0)]
    rng = np.random.default_rng(0)
    for weights in laws.bootstrap_counts(len(y), 12, rng):
        used = weights > 0
        args = (xt[:, used].copy(), np.log(y[used]), weights[used], laws.HUBER_DELTA)
        start = np.array([math.log(0.6 * float(y.min())), math.log(0.05 * float(y.min())),
                          math.log(0.2 * float(y.min())), 0.3, 0.6])
        x, value = laws.lbfgsb(laws._powersum_objective, start, args, bounds, **laws.LBFGSB_OPTIONS)
        expected = minimize(laws._powersum_objective, start, args=args, jac=True, method="L-BFGS-B",
                            bounds=bounds, options=laws.LBFGSB_OPTIONS)
        assert np.array_equal(x, expected.x) and value == float(expected.fun)


def test_param_laws_through_a_mapper_are_the_same_fits() -> None:
    """The bootstrap replicates of the parameter laws go through a mapper (shared with another process in
    `embscale plots`): they come back in the order asked, whatever order they were computed in."""
    runs = pd.concat([synthetic.param_law_runs(noise=0.002, seed=5),
                      synthetic.param_law_runs(noise=0.002, seed=6).assign(family="ne", base_ratio=12.0)])
    plain = laws.fit_param_laws(runs, split_names=["train"], n_boot=8)
    batches: list[int] = []

    def backwards(fn, calls):
        batches.append(len(calls))
        out = {index: fn(*calls[index]) for index in reversed(range(len(calls)))}
        return [out[index] for index in range(len(calls))]

    mapped = laws.fit_param_laws(runs, split_names=["train"], n_boot=8, mapper=backwards)
    # each group's fit: its 4 starts and 8 replicates, then the held-out fit's starts (no replicates)
    assert batches == [4, 8, 4, 0] * 2
    pd.testing.assert_frame_equal(plain.table, mapped.table)
    assert len(plain.fits) == len(mapped.fits) == 2
    for fit, again in zip(plain.fits.values(), mapped.fits.values(), strict=True):  # keys hold NaN: by order
        assert np.array_equal(fit.boot, again.boot) and fit.params() == again.params()


def test_an_exponent_the_runs_do_not_determine_is_flagged_at_its_bound() -> None:
    # the loss does not depend on the total: its exponent runs to a bound, which the fit says, not hides
    rng = np.random.default_rng(3)
    activated = np.repeat([1e6, 2e6, 4e6, 8e6, 16e6], 2)
    total = activated * rng.choice([2.0, 4.0, 8.0], size=activated.size)
    loss = 2.0 + 30.0 / activated**0.3 + rng.normal(0, 1e-4, activated.size)
    fit = laws.fit_param_law(activated, total, loss, n_boot=0, heldout=False)
    assert not fit.exponent_at_bound(0)
    assert fit.exponent_at_bound(1) and (fit.alpha[1] < 1e-3 or fit.alpha[1] > 3.0 - 1e-3)
    assert laws.exponent_at_bound(3.0) and laws.exponent_at_bound(0.0) and not laws.exponent_at_bound(0.4)
