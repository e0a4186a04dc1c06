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
