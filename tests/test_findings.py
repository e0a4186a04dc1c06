"""The findings table of REPRODUCTION.md (``embscale.analysis.findings``) on results whose answers are known: runs
tables made here with chosen losses, read back through the store as committed results are (collected tables only),
and ``embscale findings`` that writes the file, its next-scale column planned from the shipped sweeps."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from embscale.analysis import findings as F
from embscale.analysis.figures import _ratio_for_grouping, norm_components
from embscale.analysis.store import atomic_write_parquet
from embscale.bench.reproduce import DEFAULT_MANIFEST, load_manifest
from embscale.commands.findings import KEPT_MARKER, next_scale

SPLITS = ("train", "val_code", "val_prose")


def _run(run_id: str, family: str, seed: int, loss: float, **fields) -> dict:
    row = {"run_id": run_id, "family": family, "seed": seed, "state": "completed", "fit_ok": True,
           "excluded_reason": "", "activated": 5.7e6, "tokens": 16.4e6, "wall_time_s": 60.0, "device": "cuda",
           "pair_run_id": None}
    row.update(fields)
    for split in SPLITS:  # every split moves with the loss, so one number sets all three contrasts
        row[f"final_{split}_loss"] = loss + {"train": 0.0, "val_code": 0.3, "val_prose": 0.6}[split]
    return row


def _write(results: Path, sweep: str, rows: list[dict]) -> None:
    frame = pd.DataFrame(rows)
    frame["sweep"] = sweep
    (results / sweep).mkdir(parents=True, exist_ok=True)
    atomic_write_parquet(frame, results / sweep / "runs.parquet")


def _fig5(amplified_minus_none: dict[int, float], norm_ratio: float = 10.0) -> list[dict]:
    rows = []
    for seed, delta in amplified_minus_none.items():
        base = 4.0 + 0.01 * seed
        rows.append(_run(f"none{seed}", "ne", seed, base, amplification="none", target_ratio=8.0,
                         norm_embedding=0.1, **{"norm_layer0.attn0": 0.1 * norm_ratio}))
        for name in ("sqrt_d", "layernorm"):
            rows.append(_run(f"{name}{seed}", "ne", seed, base + delta, amplification=name, target_ratio=8.0,
                             norm_embedding=1.0, **{"norm_layer0.attn0": 1.0}))
    return rows


def _by_key(found: list[F.Finding]) -> dict[str, F.Finding]:
    return {f.key: f for f in found}


def test_intervals_are_the_seed_range_for_two_seeds_and_a_t_interval_for_more():
    two = F.Interval((-0.03, -0.01))
    assert two.bounds == (-0.03, -0.01) and two.sign == -1 and two.kind == "range"
    straddles = F.Interval((-0.03, 0.01))
    assert straddles.sign == 0
    three = F.Interval((1.0, 2.0, 3.0))
    low, high = three.bounds  # mean 2, sd 1, t(0.975, 2) = 4.303
    assert math.isclose(high - 2.0, 4.302652729 / math.sqrt(3), rel_tol=1e-6) and math.isclose(low + high, 4.0)
    assert F.Interval(()).sign == 0 and F.Interval(()).text() == "-"
    lone = F.Interval((-0.5,))  # a seed lost to a failed run: no interval, so it settles nothing
    assert lone.sign == 0 and lone.text() == "-0.500 (one seed)"


@pytest.mark.parametrize(("deltas", "verdict"), [
    ({0: -0.02, 1: -0.015}, F.AGREE),  # both seeds lower: the paper's direction
    ({0: +0.02, 1: +0.01}, F.DISAGREE),  # both higher
    ({0: -0.02, 1: +0.01}, F.INCONCLUSIVE),  # the seeds disagree: within seed noise
])
def test_amplification_verdict_follows_the_seed_by_seed_differences(deltas, verdict):
    runs = pd.DataFrame(_fig5(deltas))
    found = _by_key(F.fig5_findings(runs, list(SPLITS)))
    amplification = found["fig5_amplification"]
    assert amplification.verdict == verdict
    assert [c.label for c in amplification.contrasts] == ["sqrt_d - none", "layernorm - none"]
    interval = amplification.contrasts[0].by_metric["val_code"]
    assert interval.values == pytest.approx(tuple(deltas.values()))


def test_the_norm_ratio_is_judged_against_ten_within_half_a_decade():
    assert _by_key(F.fig5_findings(pd.DataFrame(_fig5({0: -0.02, 1: -0.02}, 9.0)), ["train"]))[
        "fig5_norms"].verdict == F.AGREE
    far = _by_key(F.fig5_findings(pd.DataFrame(_fig5({0: -0.02, 1: -0.02}, 1.5)), ["train"]))["fig5_norms"]
    assert far.verdict == F.DISAGREE and "none 1.50" in far.measured()


def test_a_metric_that_disagrees_with_the_others_makes_the_row_inconclusive():
    rows = _fig5({0: -0.02, 1: -0.02})
    for row in rows:
        if row["amplification"] == "sqrt_d":
            row["final_val_prose_loss"] += 0.05  # sqrt_d worse on prose only
    amplification = _by_key(F.fig5_findings(pd.DataFrame(rows), list(SPLITS)))["fig5_amplification"]
    assert amplification.per_metric() == {"train": F.AGREE, "val_code": F.AGREE, "val_prose": F.INCONCLUSIVE}
    assert amplification.verdict == F.INCONCLUSIVE
    assert "val_prose" not in F.render_markdown([amplification])  # split names read as the paper's: code, prose
    assert "(train: agree, code: agree, prose: inconclusive)" in F.render_markdown([amplification])


def _fig2(ne_minus_moe: dict[tuple[float, float], float]) -> list[dict]:
    """An MoE ladder with loss 5 - 0.2 ln(ratio) and NE runs ``ne_minus_moe[(base, ratio)]`` above their pair."""
    rows = []
    for seed in (0, 1):
        for ratio in (2, 4, 8, 12, 16):
            rows.append(_run(f"moe{ratio}s{seed}", "moe", seed, 5 - 0.2 * math.log(ratio) + 0.003 * seed,
                             target_ratio=float(ratio), ratio=float(ratio), base_ratio=math.nan))
        for (base, ratio), delta in ne_minus_moe.items():
            pair = rows[[r["run_id"] for r in rows].index(f"moe{int(ratio)}s{seed}")]
            rows.append(_run(f"ne{base}-{ratio}s{seed}", "ne", seed, pair["final_train_loss"] + delta,
                             target_ratio=ratio, ratio=ratio, base_ratio=base, pair_run_id=pair["run_id"]))
    return rows


def test_fig2_findings_pair_each_ne_run_with_its_parameter_equivalent_moe():
    runs = pd.DataFrame(_fig2({(2.0, 4.0): 0.03, (2.0, 8.0): 0.05, (8.0, 12.0): 0.0, (8.0, 16.0): -0.02}))
    found = _by_key(F.fig2_findings(runs, list(SPLITS)))
    assert found["fig2_log_linear"].verdict == F.AGREE
    assert "-0.200 [-0.200, -0.200]" in found["fig2_log_linear"].measured()
    low = found["fig2_low_base"]
    assert low.verdict == F.AGREE and [c.label for c in low.contrasts] == ["NE - MoE at ratio 4", "NE - MoE at ratio 8"]
    assert low.contrasts[1].by_metric["train"].mean == pytest.approx(0.05)
    high = found["fig2_high_base"]
    assert high.verdict == F.AGREE and high.contrasts[0].label == "NE - MoE at ratio 16"
    assert "ratio 12 (base 8), not judged" in high.notes[0]
    sweet = found["fig2_sweet_spot"]  # (-0.02) - (+0.03)
    assert sweet.verdict == F.AGREE and sweet.contrasts[0].by_metric["train"].mean == pytest.approx(-0.05)

    reversed_runs = pd.DataFrame(_fig2({(2.0, 4.0): -0.03, (2.0, 8.0): -0.05, (8.0, 16.0): 0.02}))
    found = _by_key(F.fig2_findings(reversed_runs, ["train"]))
    assert found["fig2_low_base"].verdict == F.DISAGREE and found["fig2_high_base"].verdict == F.DISAGREE
    assert found["fig2_sweet_spot"].verdict == F.DISAGREE


def test_fig4_n2k1_and_the_spread_of_the_others():
    rows = []
    losses = {(2, 1): 4.10, (2, 4): 4.03, (3, 3): 4.00, (5, 3): 4.005, (7, 2): 4.01, (7, 4): 4.012}
    for seed in (0, 1):
        for (n, k), loss in losses.items():
            rows.append(_run(f"n{n}k{k}s{seed}", "ne", seed, loss + 0.002 * seed, ngram_n=float(n), ngram_k=float(k),
                             target_ratio=8.0))
    found = _by_key(F.fig4_findings(pd.DataFrame(rows), ["train"]))
    assert found["fig4_n2k1"].verdict == F.AGREE and len(found["fig4_n2k1"].contrasts) == 5
    small = found["fig4_small_differences"]
    assert small.verdict == F.AGREE  # spread 0.012 against a gap of about 0.093
    assert "N3-K3 4.001 < N5-K3 4.006" in small.notes[0]


def test_report_from_committed_tables_names_the_next_scale_sweep(tmp_path):
    results = tmp_path / "results"
    manifest = load_manifest(DEFAULT_MANIFEST)
    _write(results, "repro_fig5_amplification", _fig5({0: -0.02, 1: +0.01}))
    figures = results / "repro_fig5_amplification" / "figures"
    figures.mkdir()
    (figures / "fig5_norms.png").write_bytes(b"\x89PNG")  # as embscale plots leaves it; linked, not read
    out = tmp_path / "REPRODUCTION.md"
    done = subprocess.run([sys.executable, "-m", "embscale", "findings", "--out", str(out), "--results",
                           str(results), "--manifest", str(manifest.path)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "1 agree, 0 disagree, 1 inconclusive, 10 not measured" in done.stdout  # norms agree
    text = out.read_text()
    row = next(line for line in text.splitlines() if "sqrt(D)" in line)
    assert "**inconclusive**" in row
    assert "[fig5_norms](results/repro_fig5_amplification/figures/fig5_norms.png)" in row  # relative to the file
    assert "sqrt_d - none: train -0.005 [-0.020, +0.010]" in row
    assert "`sweeps/reproduction/next/fig5_amplification.yaml`: 6 runs" in row and "GPU-h" in row
    assert "| `repro_fig5_amplification` | 6 | 0 | 0 | 360 | - | cuda |" in text  # no timestamps in the table
    assert "| `repro_fig2_ladder` | - |" in text  # not run: no numbers made up

    reading = f"{KEPT_MARKER}\n\n## Reading\n\nWritten by hand.\n"
    out.write_text(text + "\n" + reading)
    done = subprocess.run([sys.executable, "-m", "embscale", "findings", "--out", str(out), "--results",
                           str(results), "--manifest", str(manifest.path)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert out.read_text() == text + "\n" + reading  # the table rewritten, the reading kept once


def test_every_next_scale_sweep_plans_and_is_named_for_a_figure():
    settle = next_scale(DEFAULT_MANIFEST.parent)
    assert sorted(settle) == ["fig2", "fig4", "fig5", "fig67", "fig9"]
    for text in settle.values():
        assert "GPU-h" in text and "to tune" in text


def test_a_flat_ladder_is_inconclusive_not_a_disagreement():
    rows = [_run(f"moe{r}s{s}", "moe", s, 5.0 + 0.01 * ((r + s) % 3 - 1), target_ratio=float(r), ratio=float(r))
            for s in (0, 1) for r in (2, 4, 8, 12, 16)]
    log_linear = _by_key(F.fig2_findings(pd.DataFrame(rows), ["train"]))["fig2_log_linear"]
    assert log_linear.verdict == F.INCONCLUSIVE  # noise around a flat line says nothing either way


def test_bad_input_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "REPRODUCTION.md"
    for args in (["--results", str(tmp_path / "nowhere")], ["--manifest", str(tmp_path / "nowhere.yaml")]):
        done = subprocess.run([sys.executable, "-m", "embscale", "findings", "--out", str(out), *args],
                              capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert done.returncode == 2 and "nowhere" in done.stderr, done.stderr
        assert not out.exists()


ROOT = Path(__file__).resolve().parent.parent
#: what the reproduction committed: each sweep's tables under results/, the runbook's record, REPRODUCTION.md
COMMITTED = ("repro_fig2_ladder", "repro_fig4_nk", "repro_fig5_amplification", "repro_fig67_width_depth",
             "repro_fig9_per_layer", "reproduction")


def copy_committed_results(results: Path) -> None:
    """The committed reproduction results (tables, figures, progress) into ``results``, run folders aside."""
    for name in COMMITTED:
        shutil.copytree(ROOT / "results" / name, results / name,
                        ignore=shutil.ignore_patterns("[0-9a-f]" * 10, "logs", "*.pdf"))


def _table_and_sources(text: str) -> list[str]:
    """REPRODUCTION.md without its date line and its hand-written reading: what the results alone decide."""
    text = text.split(KEPT_MARKER)[0].rstrip("\n")
    return [line for line in text.splitlines() if not line.startswith("Written by `embscale findings` on")]


@pytest.mark.slow  # five sweeps fitted and drawn (about 20 s)
def test_the_committed_results_load_fit_plot_and_give_the_committed_reproduction(tmp_path):
    """The GPU results committed under results/ (REPRODUCTION.md) through `embscale findings --plots` on this
    machine: every sweep loads from its tables, fits and draws, and the table comes out as committed."""
    results = tmp_path / "results"
    copy_committed_results(results)
    for figures in results.glob("*/figures"):
        shutil.rmtree(figures)  # drawn again below
    out = tmp_path / "REPRODUCTION.md"
    done = subprocess.run([sys.executable, "-m", "embscale", "findings", "--plots", "--results", str(results),
                           "--out", str(out)], capture_output=True, text=True, cwd=tmp_path, timeout=900,
                          env={**os.environ, "MPLBACKEND": "Agg"})
    assert done.returncode == 0, done.stderr
    assert "0 not measured" in done.stdout  # every claim measured from the real tables
    figures = {p.relative_to(results).as_posix() for p in results.glob("*/figures/*.png")}
    for expected in ("repro_fig2_ladder/figures/fig2_loss_vs_ratio_w240_d2.png",
                     "repro_fig4_nk/figures/fig4_ngram_nk.png", "repro_fig5_amplification/figures/fig5_norms.png",
                     "repro_fig67_width_depth/figures/fig6_width_loss_reduction.png",
                     "repro_fig67_width_depth/figures/fig7_depth_loss_reduction.png",
                     "repro_fig9_per_layer/figures/fig9_per_layer.png"):
        assert expected in figures, sorted(figures)
    committed_figures = {p.relative_to(ROOT / "results").as_posix() for p in (ROOT / "results").glob(
        "repro_fig*/figures/*.png")}
    assert committed_figures == figures  # every figure drawn is committed, and no stale one is
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| Fig.")]
    assert len(rows) == 12 and all("](results/repro_" in row for row in rows)  # each row links its figure
    assert "| `repro_fig2_ladder` | 18 | 0 | 0 |" in text and "| `repro_fig67_width_depth` | 24 | 0 | 0 |" in text
    assert _table_and_sources(text) == _table_and_sources((ROOT / "REPRODUCTION.md").read_text())

    runs = pd.read_parquet(results / "repro_fig9_per_layer" / "runs.parquet")
    assert "norm_eps" in runs.columns and "norm_eps" not in norm_components(list(runs.columns))
    grouped = _ratio_for_grouping(runs, runs[runs["family"] == "ne"])
    assert set(grouped[runs["family"] == "ple"]) == {4.0}  # PLE (22.9M) beside NE at ratio 4 (22.8M)


def test_the_control_compares_ne_and_the_plain_moe_with_the_amplified_moe_seed_by_seed(tmp_path):
    results = tmp_path / "results"
    assert F.control_contrasts(results) == []  # nothing run: no rows
    fig2 = []
    for seed in (0, 1):
        fig2.append(_run(f"moe{seed}", "moe", seed, 4.0 + 0.1 * seed, target_ratio=4.0, ratio=4.0))
        fig2.append(_run(f"ne{seed}", "ne", seed, 3.5 + 0.1 * seed, target_ratio=4.0, ratio=4.0, base_ratio=2.0,
                         pair_run_id=f"moe{seed}"))
    _write(results, "repro_fig2_ladder", fig2)
    assert F.control_contrasts(results) == []  # the control not run yet
    _write(results, F.CONTROL_SWEEP, [_run(f"amp{seed}", "moe", seed, 3.7 + 0.2 * seed, target_ratio=4.0,
                                           ratio=4.0) for seed in (0, 1)])
    rows = {c.label: c for c in F.control_contrasts(results)}
    ne = rows["NE (base 2) - MoE with sqrt(D) embedding at ratio 4"].by_metric
    assert ne["train"].values == pytest.approx((-0.2, -0.3)) and ne["val_prose"].values == pytest.approx((-0.2, -0.3))
    amplified = rows["MoE with sqrt(D) embedding - MoE at ratio 4"].by_metric["val_code"]
    assert amplified.values == pytest.approx((-0.3, -0.2))
    table = F.render_contrasts(list(rows.values()))
    assert "| NE (base 2) - MoE with sqrt(D) embedding at ratio 4 | -0.250 [-0.300, -0.200] |" in table


def test_runs_trained_by_two_sweeps_give_the_run_to_run_spread_and_copies_do_not_count(tmp_path):
    results = tmp_path / "results"
    _write(results, "repro_fig2_ladder", [_run("same", "moe", 0, 3.6), _run("copied", "moe", 1, 3.9),
                                          _run("alone", "moe", 0, 3.5)])
    _write(results, "repro_fig4_nk", [_run("same", "moe", 0, 3.85),
                                      _run("copied", "moe", 1, 3.9, copied_from="results/repro_fig2_ladder/copied")])
    repeats = F.repeated_runs(results)
    assert list(repeats["run_id"]) == ["same"]  # the copy is the same training, the lone run has no twin
    assert repeats.loc[0, "trainings"] == 2 and repeats.loc[0, "spread"] == pytest.approx(0.25)
    assert F.repeated_runs(tmp_path / "nowhere").empty
