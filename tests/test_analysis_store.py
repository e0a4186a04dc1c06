"""Results store: collect, load, exclusions, tolerance to partial runs, and clear errors on bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from embscale.analysis import laws
from embscale.analysis.store import (
    ResultsError,
    collect,
    describe,
    discover_sweeps,
    is_stale,
    load,
    loss_column,
    resolve_sweep_dir,
    splits,
)
from embscale.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "results"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """A private copy of the committed results fixture (collect writes next to the runs)."""
    shutil.copytree(FIXTURE, tmp_path / "results")
    return tmp_path / "results"


def test_collect_fixture_writes_both_tables_and_flags_unfinished_runs(results: Path) -> None:
    sweep = results / "synthetic"
    runs, curves = collect(sweep)
    assert len(runs) == 54 and runs["run_id"].is_unique
    by_state = runs.set_index("run_id")["state"]
    assert sorted(by_state[by_state != "completed"].tolist()) == ["diverged", "failed", "pending", "running"]
    flagged = runs[runs["state"] != "completed"]
    assert not flagged["fit_ok"].any()
    reasons = dict(zip(flagged["state"], flagged["excluded_reason"], strict=True))
    assert reasons["failed"].startswith("failed: RuntimeError")
    assert reasons["diverged"].startswith("diverged")
    assert reasons["running"].startswith("still running (step")
    assert runs.loc[runs["state"] == "completed", "fit_ok"].all()
    assert (runs.loc[runs["fit_ok"], "excluded_reason"] == "").all()

    # readable with pyarrow alone, and the same table
    for name in ("runs.parquet", "curves.parquet"):
        assert pq.read_table(sweep / name).num_rows > 0
    on_disk = pd.read_parquet(sweep / "runs.parquet")
    assert list(on_disk.columns) == list(runs.columns)
    assert not [p for p in os.listdir(sweep) if p.endswith(".tmp")]

    # canonical columns from point, config and accounting
    for column in ("family", "target_ratio", "base_ratio", "width", "depth", "n_experts", "top_k", "ngram_n",
                   "ngram_k", "table_ratio", "sizing", "amplification", "seed", "lr", "total", "activated",
                   "ratio", "ne_share", "tokens", "flops", "wall_time_s", "corpus_fingerprint"):
        assert column in runs.columns, column
    assert splits(runs) == ["train", "val_code", "val_prose"]
    ne12 = runs[(runs["family"] == "ne") & (runs["base_ratio"] == 12) & runs["fit_ok"]]
    assert ne12["ngram_n"].notna().all() and (ne12["ne_share"] > 0).all()

    # final loss = mean of the last 3 evaluations, spread = their standard deviation
    row = runs[runs["fit_ok"]].iloc[0]
    metrics = pd.read_parquet(sweep / row["run_id"] / "metrics.parquet")
    evals = metrics["val_code_loss"].dropna().to_numpy()
    assert row[loss_column("val_code")] == pytest.approx(evals[-3:].mean())
    assert row["final_val_code_loss_spread"] == pytest.approx(evals[-3:].std(ddof=1))
    # one curve row per evaluation; train loss smoothed over the window since the previous evaluation
    curve = curves[curves["run_id"] == row["run_id"]]
    assert len(curve) == len(evals) == row["n_evals"]
    last_step = int(curve["step"].iloc[-1])
    window = metrics[(metrics["step"] > last_step - 20) & (metrics["step"] <= last_step)]["train_loss"]
    assert curve["train_loss"].iloc[-1] == pytest.approx(window.mean())
    assert {"val_code_loss", "val_prose_loss", "tokens"} <= set(curves.columns)


def test_unfinished_runs_stay_out_of_the_fits(results: Path) -> None:
    runs, _ = collect(results / "synthetic")
    fits = laws.fit_ratio_laws(runs, split_names=["train"], n_boot=0)
    table = fits.table.set_index(["family", "base_ratio", "width", "depth"], drop=False)
    moe = fits.table[(fits.table["family"] == "moe") & (fits.table["width"] == 1024) & (fits.table["depth"] == 10)]
    # the failed MoE run at ratio 64 and the pending one at 96 would extend the series past 48
    assert len(moe) == 1 and moe["ratio_max"].iloc[0] < 50 and moe["n_runs"].iloc[0] == 8
    ne4 = fits.table[(fits.table["family"] == "ne") & (fits.table["base_ratio"] == 4)]
    assert ne4["ratio_max"].iloc[0] < 40  # the running run at 48 is left out
    assert len(table) > 3


def test_collect_tolerates_partial_and_odd_runs(results: Path) -> None:
    sweep = results / "synthetic"
    victim = sorted(p for p in sweep.iterdir() if p.name.startswith("0000-"))[0]
    truncated = sorted(p for p in sweep.iterdir() if p.name.startswith("0001-"))[0]
    odd = sorted(p for p in sweep.iterdir() if p.name.startswith("0002-"))[0]
    # a half-written metrics file, a run.json cut short, an unknown extra column, a status-only run folder
    data = (victim / "metrics.parquet").read_bytes()
    (victim / "metrics.parquet").write_bytes(data[: len(data) // 2])
    (truncated / "run.json").write_text((truncated / "run.json").read_text()[:100])
    frame = pd.read_parquet(odd / "metrics.parquet")
    frame["some_new_metric"] = 1.0
    frame.to_parquet(odd / "metrics.parquet")
    (sweep / "zz-queued").mkdir()
    (sweep / "zz-queued" / "status.json").write_text(json.dumps({"state": "queued", "step": 0}))
    (sweep / "notes").mkdir()  # not a run folder: ignored

    runs, _ = collect(sweep)
    assert len(runs) == 55
    reason = runs.set_index("run_id")["excluded_reason"]
    assert reason[victim.name].startswith("unreadable metrics.parquet")
    assert reason[truncated.name].startswith("unreadable run.json")
    assert reason["zz-queued"] == "state queued"
    assert runs.set_index("run_id").loc[odd.name, "fit_ok"]


def test_trainer_style_run_json_is_understood(results: Path) -> None:
    """The trainer adds the resolved ``model`` and ``corpus: {id, fingerprint}`` instead of a fingerprint."""
    sweep = results / "synthetic"
    run_dir = sorted(p for p in sweep.iterdir() if p.name.startswith("0003-"))[0]
    run = json.loads((run_dir / "run.json").read_text())
    del run["corpus_fingerprint"]
    run["corpus"] = {"id": "c0ffee", "fingerprint": {"files": ["a.txt"], "sha256": "0" * 64}}
    run["model"] = {**run["config"]["model"], "n_experts": 999}
    run["pair"] = {"run_id": "abc", "total": 1.0}
    (run_dir / "run.json").write_text(json.dumps(run))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        runs, _ = collect(sweep)
    row = runs.set_index("run_id").loc[run_dir.name]
    assert row["corpus_fingerprint"] == "c0ffee" and row["n_experts"] == 999 and row["pair_run_id"] == "abc"


def test_mixed_corpora_warn_and_are_fitted_apart(results: Path) -> None:
    sweep = results / "synthetic"
    for run_dir in sorted(sweep.iterdir())[:4]:
        run = json.loads((run_dir / "run.json").read_text())
        run["corpus_fingerprint"] = "another-corpus"
        (run_dir / "run.json").write_text(json.dumps(run))
    with pytest.warns(UserWarning, match="2 different corpora"):
        runs, _ = collect(sweep)
    assert set(runs["corpus_fingerprint"]) == {"another-corpus", "synthetic-corpus-0001"}
    fits = laws.fit_ratio_laws(runs, split_names=["train"], n_boot=0)
    assert "corpus_fingerprint" in fits.keys
    assert set(fits.table["corpus_fingerprint"]) == {"another-corpus", "synthetic-corpus-0001"}


def test_runs_not_started_yet_add_no_corpus_to_the_summary(results: Path) -> None:
    """A sweep half way through has runs with no corpus yet: one corpus, not two, and no warning."""
    runs, _ = collect(results / "synthetic")
    runs.loc[runs.index[:3], "corpus_fingerprint"] = None
    assert "corpus fingerprints" not in describe(runs)
    runs.loc[runs.index[3], "corpus_fingerprint"] = "another-corpus"
    assert "WARNING: 2 corpus fingerprints" in describe(runs)


def test_load_several_sweeps_and_refresh_when_stale(results: Path) -> None:
    shutil.copytree(results / "synthetic", results / "second")
    collect(results / "synthetic")
    assert not is_stale(results / "synthetic")
    runs, curves = load("synthetic", "second", results=results)
    assert sorted(runs["sweep"].unique()) == ["second", "synthetic"]
    assert len(runs) == 108 and {"sweep", "run_id"} <= set(curves.columns)
    assert (results / "second" / "runs.parquet").exists()  # collected on first load

    status = results / "second" / sorted(os.listdir(results / "second"))[0] / "status.json"
    later = (results / "second" / "runs.parquet").stat().st_mtime + 10
    os.utime(status, (later, later))
    assert is_stale(results / "second")
    assert discover_sweeps(results) == [results / "second", results / "synthetic"]


def test_bad_input_names_the_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ResultsError, match="nope"):
        collect(missing)
    with pytest.raises(ResultsError, match=str(tmp_path / "results")):
        resolve_sweep_dir("sweepname", tmp_path / "results")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ResultsError, match=f"no sweeps under {empty}"):
        discover_sweeps(empty)
    (empty / "sweep").mkdir()
    with pytest.raises(ResultsError, match=f"{empty / 'sweep'}: no run folders"):
        collect(empty / "sweep")
    assert not os.listdir(empty / "sweep")  # nothing written

    code = main(["collect", str(missing), "--results", str(tmp_path), "--last-k", "3"])
    assert code == 2 and str(missing) in capsys.readouterr().err
    code = main(["plots", "--results", str(empty), "--bootstrap", "10", "--bootstrap-param", "2", "--quiet"])
    assert code == 2 and f"no sweeps under {empty}" in capsys.readouterr().err


def test_cli_collect_prints_a_summary(results: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["collect", "synthetic", "--results", str(results), "--last-k", "3"])
    out = capsys.readouterr().out
    assert code == 0 and "54 runs, 50 usable by fits" in out and "still running" in out


def test_analysis_imports_neither_torch_nor_sweeps_nor_models() -> None:
    code = ("import sys, embscale.analysis.store, embscale.analysis.curves, embscale.analysis.laws, "
            "embscale.analysis.frontier, embscale.analysis.report, embscale.commands.collect, "
            "embscale.commands.plots, embscale.analysis.synthetic\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m.split('.')[:2] in "
            "(['embscale', 'sweeps'], ['embscale', 'models'], ['embscale', 'training']))\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_synthetic_generator_cli(tmp_path: Path) -> None:
    from embscale.analysis import synthetic

    assert synthetic.main([str(tmp_path), "--runs", "60", "--evals", "5", "--sweep", "s", "--no-collisions"]) == 0
    dirs = [p for p in (tmp_path / "s").iterdir() if p.is_dir()]
    assert len(dirs) == 60 and not (tmp_path / "s" / "collisions.parquet").exists()
    runs, _ = collect(tmp_path / "s")
    assert set(runs["seed"]) == {0, 1}  # the design repeats with a new seed past its length
    assert np.isfinite(runs.loc[runs["fit_ok"], loss_column("train")]).all()


def test_metrics_are_read_as_read_table_reads_them(results: Path) -> None:
    """`collect` reads each run's whole metrics file through ``ParquetFile`` (a tenth of ``read_table``'s time):
    the same table, its schema's metadata included; a file it cannot read gets ``read_table``'s own reason, and a
    column asked for that is not there still gives no table."""
    from embscale.base import rundir

    runs = sorted(p for p in (results / "synthetic").iterdir() if (p / "metrics.parquet").is_file())
    for run_dir in runs[:5]:
        table, why = rundir.read_metrics_checked(run_dir)
        expected = pq.read_table(run_dir / "metrics.parquet", use_threads=False)
        assert why == "" and table.schema.equals(expected.schema, check_metadata=True)
        pd.testing.assert_frame_equal(table.to_pandas(), expected.to_pandas())  # NaN as NaN (Arrow: unequal)
    broken = runs[0] / "metrics.parquet"
    broken.write_bytes(broken.read_bytes()[:200])
    with pytest.raises(Exception) as raised:  # noqa: PT011 - whatever pyarrow raises: its message is the reason
        pq.read_table(broken, use_threads=False)
    assert rundir.read_metrics_checked(runs[0]) == (None, f"unreadable metrics.parquet: {raised.value}")
    assert rundir.read_metrics(runs[1], columns=["step", "no_such_metric"]) is None
    assert rundir.read_metrics(runs[1], columns=["step"]).column_names == ["step"]
