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


def test_figures_a_reader_can_read():
    """Neighbouring count ticks never read alike on a narrow axis; series that share a label are listed once in a
    legend; a long title shrinks to fit the figure."""
    import matplotlib.pyplot as plt

    from embscale.analysis.style import count_axis, legend, set_title

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([1.306e6, 1.312e6, 1.327e6], [1, 2, 3], label="NE")
    ax.plot([1.308e6], [2], label="NE")
    ax.plot([1.31e6], [1], label="MoE")
    count_axis(ax)
    legend(ax)
    wide = plt.figure(figsize=(6.8, 3.4))  # the demo's loss-curve figure, whose title was cut at both ends
    set_title(wide, "Loss curves, one size and seed per series (validation loss (code)); dashed: L(D) fit, 95% band")
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert len(labels) >= 2 and len(set(labels)) == len(labels), labels
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["NE", "MoE"]
    wide.canvas.draw()
    extent = wide._suptitle.get_window_extent()
    assert 0 <= extent.x0 and extent.x1 <= wide.bbox.width and wide._suptitle.get_fontsize() < 10.5
    fig2, ax2 = plt.subplots()
    ax2.plot([2e8, 3e9], [1, 2])
    count_axis(ax2)
    fig2.canvas.draw()
    assert {"200M", "500M", "1B", "2B"} <= {t.get_text() for t in ax2.get_xticklabels()}  # 1, 2, 5 a decade
    plt.close("all")


def _without_creation_date(pdf: bytes) -> bytes:
    import re

    return re.sub(rb"/CreationDate \(D:\d+Z?\)", b"", pdf)


def test_two_processes_draw_the_same_files_as_one(tmp_path: Path) -> None:
    """`embscale plots` on a large sweep shares the fits and figures with a helper process: the summary, the
    skip notes and every figure file (PDF but for its creation date) are those of one process."""
    outputs = {}
    for jobs in (1, 2):
        root = tmp_path / f"jobs{jobs}"
        shutil.copytree(FIXTURE, root)
        for run_dir in (root / "synthetic").iterdir():  # one backbone size: fewer figures, a faster test
            if run_dir.is_dir() and not run_dir.name.endswith(("w1024-d10-s0", "w1024-d10-n3k3-s0")):
                shutil.rmtree(run_dir)
        lines: list[str] = []
        result = plot_sweep(root / "synthetic", n_boot=30, n_boot_param=4, log=lines.append, jobs=jobs)
        files = {p.name: p.read_bytes() for p in (root / "synthetic" / "figures").iterdir()}
        outputs[jobs] = (result.summary, result.skipped, [p.name for p in result.figures], files, lines)
    (summary1, skipped1, names1, files1, lines1), (summary2, skipped2, names2, files2, lines2) = outputs[1], outputs[2]
    pd.testing.assert_frame_equal(summary1, summary2)
    assert skipped1 == skipped2 and names1 == names2 and lines1 == lines2
    assert sorted(files1) == sorted(files2) and len(files1) >= 12
    for name, data in files1.items():
        if name.endswith(".pdf"):
            assert _without_creation_date(data) == _without_creation_date(files2[name]), name
        else:
            assert data == files2[name], name


def test_a_helper_process_only_for_large_sweeps_with_cpus_to_spare() -> None:
    import os

    from embscale.analysis.report import PARALLEL_MIN_RUNS, CpuMeter, default_jobs

    spare = CpuMeter().spare(min_seconds=0.05)
    assert 0.0 <= spare <= (os.cpu_count() or 1) + 0.5
    two = 2 if (os.cpu_count() or 1) >= 2 else 1
    assert default_jobs(PARALLEL_MIN_RUNS, 2.0) == two and default_jobs(5000, 1.5) == two
    assert default_jobs(PARALLEL_MIN_RUNS - 1, 2.0) == 1  # the helper's start-up would cost more than it saves
    assert default_jobs(5000, 1.2) == 1  # others keep a CPU busy: a helper would share this one's


def test_titles_left_in_place_are_not_placed_again_for_the_pdf(tmp_path: Path) -> None:
    """After the PNG, the axes titles matplotlib did not move are kept where they are for the PDF's drawing
    (placing them measures every tick label again): the files are those of a figure whose titles are placed at
    every drawing. A title that matplotlib moved (over the y axis's offset text) keeps being placed."""
    import matplotlib
    import matplotlib.pyplot as plt

    from embscale.analysis import style

    def draw() -> tuple[plt.Figure, list[plt.Axes]]:
        fig, axes = style.subplots(1, 2)
        plain, offset = axes[0]
        plain.plot([1.0, 2.0, 3.0], [3.2, 3.1, 3.05])
        plain.set_title("plain")
        offset.plot([1.0, 2.0, 3.0], [1e-7, 3e-7, 2e-7])  # a "1e-7" offset text above the y axis
        offset.set_title("over the offset text", loc="left")
        style.set_title(fig, "two panels")
        return fig, [plain, offset]

    saved = {}
    with matplotlib.rc_context(style.STYLE):
        for name, keep in (("kept", style._keep_unmoved_titles), ("placed", lambda fig: None)):
            original = style._keep_unmoved_titles
            style._keep_unmoved_titles = keep
            try:
                fig, (plain, offset) = draw()
                paths = style.save_figure(fig, tmp_path, name)
            finally:
                style._keep_unmoved_titles = original
            saved[name] = [path.read_bytes() for path in paths]
            if name == "kept":
                assert plain._autotitlepos is False  # placed once, kept for the PDF
                assert offset._autotitlepos is True and offset._left_title.get_position()[1] > 1.0
    (png_kept, pdf_kept), (png_placed, pdf_placed) = saved["kept"], saved["placed"]
    assert png_kept == png_placed
    assert _without_creation_date(pdf_kept) == _without_creation_date(pdf_placed)
    plt.close("all")


def test_count_axis_labels_never_overlap():
    """A log axis of counts thins its 1-2-5 ticks (to 1-3, then decades) until the labels have room: on a panel
    of 3.2 inches over 60M-30B tokens (the loss-curve figure of a large sweep) no two labels touch."""
    import matplotlib.pyplot as plt

    from embscale.analysis.style import count_axis, subplots

    for span in ((6e7, 3e10), (1e3, 1e12), (2e8, 9e8)):
        fig, axes = subplots(1, 1)
        ax = axes[0, 0]
        ax.plot(span, (1, 2))
        count_axis(ax, "x", kind="tokens")
        fig.canvas.draw()
        boxes = sorted((label.get_window_extent() for label in ax.get_xticklabels() if label.get_text()),
                       key=lambda box: box.x0)
        assert len(boxes) >= 2, span
        labels = [label.get_text() for label in ax.get_xticklabels()]
        assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:], strict=False)), (span, labels)
        plt.close(fig)


def test_norm_figure_shows_recorded_norms_not_config_fields_of_the_same_prefix():
    from embscale.analysis.figures import norm_components

    # a real runs table: the recorded norms beside the model config's norm_eps (flattened from run.json)
    columns = ["run_id", "norm_eps", "norm_layer1.moe", "norm_embedding", "norm_layer0.attn1", "norm_layer0.attn0"]
    assert norm_components(columns) == ["norm_embedding", "norm_layer0.attn0", "norm_layer0.attn1",
                                        "norm_layer1.moe"]


def test_ple_is_drawn_beside_the_ne_of_its_total():
    from embscale.analysis.figures import _ratio_for_grouping

    # PLE has no ratio knob (its table is fixed by the model): it is planned without a target ratio
    runs = pd.DataFrame({
        "family": ["ne", "ne", "ple", "plne", "ple"],
        "width": [240, 240, 240, 240, 120],
        "depth": [2, 2, 2, 2, 2],
        "target_ratio": [4.0, 5.0, float("nan"), 5.0, float("nan")],
        "total": [22.8e6, 28.4e6, 22.9e6, 28.4e6, 9.0e6],
        "ratio": [4.0, 4.96, 4.30, 4.47, 3.14159],
    })
    grouped = _ratio_for_grouping(runs, runs[runs["family"] == "ne"])
    assert grouped.tolist() == [4.0, 5.0, 4.0, 5.0, 3.14]  # the lone PLE (no NE of its width) keeps its own ratio


def test_a_legend_beside_the_panels_gets_the_room_it_needs() -> None:
    """A long legend label beside the panel widens the figure on the right; the panel keeps its inches."""
    import matplotlib.pyplot as plt

    from embscale.analysis.style import make_room_right, subplots

    fig, axes = subplots(1, 1, panel=(3.0, 2.0), right=0.5)
    ax = axes[0, 0]
    ax.plot([1, 2], [1, 2], label="a label far too long for half an inch of margin: " + "x" * 30)
    legend = ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0))
    before = ax.get_position().width * fig.get_figwidth()
    make_room_right(fig, legend)
    renderer = fig.canvas.get_renderer()
    assert legend.get_window_extent(renderer).x1 <= fig.bbox.x1
    assert ax.get_position().width * fig.get_figwidth() == pytest.approx(before)
    width = fig.get_figwidth()
    make_room_right(fig, legend)  # fits now: nothing moves
    assert fig.get_figwidth() == width
    plt.close(fig)
