"""Figures and the fits table of a sweep, through the ``embscale plots`` entry point."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from embscale.analysis.report import plot_sweep
from embscale.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "results"
EXPECTED = ("fig2_loss_vs_ratio_w1024_d10", "fig3_collisions", "fig4_ngram_nk", "fig5_norms",
            "fig6_width_loss_reduction", "fig7_depth_loss_reduction", "fig9_per_layer", "pareto_train",
            "pareto_val_code", "param_law", "loss_curves")


@pytest.fixture
def results(tmp_path: Path) -> Path:
    shutil.copytree(FIXTURE, tmp_path / "results")
    return tmp_path / "results"


def test_plots_write_png_and_pdf_for_the_fixture(results: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plots", "--results", str(results), "--bootstrap", "50", "--bootstrap-param", "4"]) == 0
    out = capsys.readouterr().out
    figures = results / "synthetic" / "figures"
    for name in EXPECTED:
        png, pdf = figures / f"{name}.png", figures / f"{name}.pdf"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert pdf.read_bytes()[:5] == b"%PDF-", name
    assert not list(figures.glob(".*"))  # no temporary files left behind
    summary = pd.read_csv(results / "synthetic" / "summary.csv")
    assert {"ratio: L = a + b ln(ratio)", "crossover with MoE"} <= set(summary["law"])
    assert summary["law"].str.startswith("param").any()
    assert "crossover with MoE" in out and "excluded from fits" in out


def test_plots_skip_figures_without_data(results: Path) -> None:
    sweep = results / "synthetic"
    for run_dir in sweep.iterdir():
        if run_dir.is_dir() and "-moe-" not in run_dir.name:
            shutil.rmtree(run_dir)
    (sweep / "collisions.parquet").unlink()
    lines: list[str] = []
    result = plot_sweep(sweep, n_boot=20, n_boot_param=2, log=lines.append)
    names = {p.stem for p in result.figures}
    assert "pareto_train" in names and "loss_curves" in names
    assert not any(n.startswith(("fig2", "fig3", "fig4", "fig6", "fig7", "fig9")) for n in names)
    skipped = "\n".join(result.skipped)
    for figure in ("fig2 skipped", "fig3 skipped", "fig4 skipped", "fig6 skipped", "fig7 skipped", "fig9 skipped"):
        assert figure in skipped
    assert all(p.exists() for p in result.figures)
