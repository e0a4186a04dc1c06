"""The reproduction runbook (``python -m embscale.bench.reproduce``) and the shipped reproduction sweeps.

The runbook's control flow runs for real on a tiny manifest (tiny models, a tiny corpus, the debug executor):
tuning, the tuned rate written into each sweep, submission, collection, packing, and a second call on a fresh
results folder restored from the first call's archive.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import tiny_sweep as T

from embscale.base.errors import ConfigError, UserError
from embscale.bench.reproduce import (
    DEFAULT_MANIFEST,
    load_manifest,
    model_size,
    sweep_sizes,
    with_learning_rates,
)
from embscale.sweeps.plan import load_plan
from embscale.sweeps.sweepfile import load_sweep_mapping


def _mapping(**extra):
    return {"name": "s", "model": {"width": 240, "depth": 2}, "training": {"lr": 1.0}, **extra}


def test_one_size_gets_training_lr():
    out = with_learning_rates(_mapping(grid={"seed": [0, 1]}), {(240, 2): 0.004})
    assert out["training"]["lr"] == 0.004
    assert "zip" not in out


def test_zipped_sizes_get_an_lr_axis_in_their_zip_group():
    mapping = _mapping(zip={"width": [120, 240, 240], "depth": [2, 2, 4]}, grid={"ratio": [8, 16]})
    assert sweep_sizes(mapping) == [(120, 2), (240, 2), (240, 4)]
    out = with_learning_rates(mapping, {(120, 2): 0.01, (240, 2): 0.005, (240, 4): 0.003})
    assert out["zip"]["lr"] == [0.01, 0.005, 0.003]
    assert out["training"]["lr"] == 1.0  # the placeholder stays, overridden per point by the axis
    only_width = with_learning_rates(_mapping(zip=[{"width": [120, 240]}]), {(120, 2): 0.01, (240, 2): 0.005})
    assert only_width["zip"][0]["lr"] == [0.01, 0.005]


def test_missing_or_crossed_sizes_are_refused():
    with pytest.raises(UserError, match="240x4"):
        with_learning_rates(_mapping(zip={"depth": [2, 4]}), {(240, 2): 0.005})
    with pytest.raises(UserError, match="zip width and depth"):
        with_learning_rates(_mapping(grid={"width": [120, 240]}), {(120, 2): 0.01, (240, 2): 0.005})


def test_manifest_errors_name_the_file(tmp_path):
    bad = tmp_path / "manifest.yaml"
    bad.write_text("sweeps: [nowhere.yaml]\n")
    with pytest.raises(ConfigError, match="manifest.yaml: sweeps: nowhere.yaml"):
        load_manifest(bad)
    bad.write_text("sweep: [x.yaml]\n")
    with pytest.raises(ConfigError, match="manifest.yaml"):
        load_manifest(bad)


def test_shipped_reproduction_sweeps_plan_and_every_size_is_tuned():
    manifest = load_manifest(DEFAULT_MANIFEST)
    assert [p.name for p in manifest.sweeps] == ["fig2_ladder.yaml", "fig4_nk.yaml", "fig5_amplification.yaml",
                                                 "fig9_per_layer.yaml", "fig67_width_depth.yaml"]
    tuned = {model_size(load_sweep_mapping(path)): 0.001 * (i + 1) for i, path in enumerate(manifest.tune)}
    counts = {}
    for path in manifest.sweeps:
        mapping = with_learning_rates(load_sweep_mapping(path), tuned)
        plan = load_plan(path)
        counts[plan.name] = len(plan.runs)
        seeds = {run.point.get("seed") for run in plan.runs}
        assert seeds == {0, 1}, plan.name  # two seeds per point
        assert mapping["data"]["corpus"] == "system"
        for run in plan.runs:
            assert run.config["data"]["corpus"] == "system"
    assert counts == {"repro_fig2_ladder": 18, "repro_fig4_nk": 14, "repro_fig5_amplification": 6,
                      "repro_fig9_per_layer": 8, "repro_fig67_width_depth": 24}


def _tiny_manifest(tmp_path: Path) -> Path:
    data = T.write_corpus(tmp_path / "corpus")
    folder = tmp_path / "sweeps"
    base = T.sweep_mapping("tiny_base", data, steps=4, seeds=1, widths=(16,))
    base["grid"] = {"seed": [0]}
    tune = {**base, "name": "tiny_tune",
            "tune": {"param": "lr", "low": 1.0e-3, "high": 1.0e-2, "log": True, "trials": 2, "parallel": 1,
                     "pruner": "none", "metric": "val_code_loss"}}
    one = {**base, "name": "tiny_one", "grid": {"seed": [0, 1]}}
    T.write_sweep(folder / "tune.yaml", tune)
    T.write_sweep(folder / "one.yaml", one)
    manifest = folder / "manifest.yaml"
    manifest.write_text("tune: [tune.yaml]\nsweeps: [one.yaml]\n")
    return manifest


def _call(tmp_path: Path, manifest: Path, results: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "EMBSCALE_CACHE": str(tmp_path / "cache"), "EMBSCALE_PROGRESS": "plain"}
    return subprocess.run([sys.executable, "-m", "embscale.bench.reproduce", "--manifest", str(manifest),
                           "--results", str(results), "--out", str(out), "--executor", "debug", *extra],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)


def test_runbook_tunes_runs_collects_packs_and_resumes_from_its_archive(tmp_path):
    manifest = _tiny_manifest(tmp_path)
    # No time for anything: nothing starts, the call still reports and packs, and says it is not done (exit 3).
    early = _call(tmp_path, manifest, tmp_path / "r0", tmp_path / "o0", "--budget-s", "1", "--reserve-s", "0",
                  "--run-wall-s", "1")
    assert early.returncode == 3, early.stdout + early.stderr
    progress = json.loads((tmp_path / "o0" / "progress.json").read_text())
    assert progress["learning_rates"] == {"16x1": None} and progress["sweeps"] == {} and not progress["done"]

    first = _call(tmp_path, manifest, tmp_path / "r1", tmp_path / "o1", "--budget-s", "500")
    assert first.returncode == 0, first.stdout + first.stderr
    out = tmp_path / "o1"
    assert sorted(p.name for p in out.iterdir()) == ["progress.json", "reproduce.log", "results.tar.gz"]
    progress = json.loads((out / "progress.json").read_text())
    rate = progress["learning_rates"]["16x1"]
    assert 1.0e-3 <= rate <= 1.0e-2
    assert progress["sweeps"]["tiny_one"] == {"planned": 2, "completed": 2, "failed": 0, "diverged": 0, "to_go": 0}
    assert progress["done"] and len(progress["calls"]) == 1
    resolved = load_sweep_mapping(tmp_path / "r1" / "reproduction" / "one.yaml")
    assert resolved["training"]["lr"] == rate  # the tuned rate, not the sweep file's 3e-3
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
    assert "tiny_one/runs.parquet" in names and "tiny_one/curves.parquet" in names
    assert "tiny_tune/tuned.yaml" in names and "tiny_tune/tune/optuna.journal" in names
    assert not [n for n in names if "/checkpoints/" in n or n.endswith("jobs.json")]

    # A fresh machine: restored from the archive, nothing runs again and the calls add up.
    second = _call(tmp_path, manifest, tmp_path / "r2", tmp_path / "o2", "--restore", str(out / "results.tar.gz"))
    assert second.returncode == 0, second.stdout + second.stderr
    again = json.loads((tmp_path / "o2" / "progress.json").read_text())
    assert again["learning_rates"]["16x1"] == rate
    assert again["sweeps"]["tiny_one"]["completed"] == 2 and len(again["calls"]) == 2
    assert "started" not in (tmp_path / "o2" / "reproduce.log").read_text()


def test_a_sweep_that_would_repeat_its_data_is_refused_before_anything_runs():
    from embscale.bench.reproduce import _check_under_one_epoch

    corpora = [{"train_tokens": 20_000_000}]
    _check_under_one_epoch([{"name": "fits", "training": {"tokens": 16_384_000}}], corpora)
    with pytest.raises(UserError, match=r"too_long: 19,660,800 training tokens per run is 0.98 epochs"):
        _check_under_one_epoch([{"name": "too_long", "training": {"tokens": 19_660_800}}], corpora)
