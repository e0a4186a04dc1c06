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
                                                 "fig9_per_layer.yaml", "fig67_width_depth.yaml",
                                                 "control_moe_sqrt_d.yaml"]
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
                      "repro_fig9_per_layer": 8, "repro_fig67_width_depth": 24, "repro_control_moe_sqrt_d": 10}


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


@pytest.mark.slow  # three calls of the runbook, each starting tune / submit / collect processes (about 40 s)
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
    assert sorted(p.name for p in out.iterdir()) == ["REPRODUCTION.md", "progress.json", "reproduce.log",
                                                     "results.tar.gz"]
    # the tiny manifest's sweeps are no figure's: every finding is reported as not measured, none made up
    assert "0 agree, 0 disagree, 0 inconclusive, 12 not measured" in (out / "REPRODUCTION.md").read_text()
    progress = json.loads((out / "progress.json").read_text())
    rate = progress["learning_rates"]["16x1"]
    assert 1.0e-3 <= rate <= 1.0e-2
    assert progress["sweeps"]["tiny_one"] == {"planned": 2, "completed": 2, "failed": 0, "diverged": 0, "to_go": 0}
    assert progress["done"] and progress["failed_runs"] == 0 and len(progress["calls"]) == 1
    resolved = load_sweep_mapping(tmp_path / "r1" / "reproduction" / "one.yaml")
    assert resolved["training"]["lr"] == rate  # the tuned rate, not the sweep file's 3e-3
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
    assert "tiny_one/runs.parquet" in names and "tiny_one/curves.parquet" in names
    assert "tiny_tune/tuned.yaml" in names and "tiny_tune/tune/optuna.journal" in names
    assert not [n for n in names if "/checkpoints/" in n or n.endswith("jobs.json")]
    assert any(n.startswith("_cache/tokenizers/") and n.endswith("/tokenizer.json") for n in names)

    # A fresh machine: restored from the archive, nothing runs again and the calls add up.
    second = _call(tmp_path, manifest, tmp_path / "r2", tmp_path / "o2", "--restore", str(out / "results.tar.gz"))
    assert second.returncode == 0, second.stdout + second.stderr
    again = json.loads((tmp_path / "o2" / "progress.json").read_text())
    assert again["learning_rates"]["16x1"] == rate
    assert again["sweeps"]["tiny_one"]["completed"] == 2 and len(again["calls"]) == 2
    assert "started" not in (tmp_path / "o2" / "reproduce.log").read_text()
    # the fresh machine tokenised with the first call's BPE, restored from the archive, not a new one
    assert again["corpora"][0]["tokenizer_sha256"] == progress["corpora"][0]["tokenizer_sha256"]


def test_a_sweep_that_would_repeat_its_data_is_refused_before_anything_runs():
    from embscale.bench.reproduce import _check_under_one_epoch

    corpora = [{"train_tokens": 20_000_000}]
    _check_under_one_epoch([{"name": "fits", "training": {"tokens": 16_384_000}}], corpora)
    with pytest.raises(UserError, match=r"too_long: 19,660,800 training tokens per run is 0.98 epochs"):
        _check_under_one_epoch([{"name": "too_long", "training": {"tokens": 19_660_800}}], corpora)


DRIVER = ("import signal, sys, time, pathlib\n"
          "def stop(*_):\n"
          "    with open(sys.argv[1], 'a') as f: f.write('stopped\\n')\n"
          "    sys.exit(0)\n"
          "signal.signal(signal.SIGTERM, stop)\n"
          "time.sleep(float(sys.argv[2]))\n")


def _work(tmp_path, name, to_go, sleep_s=60.0, **kwargs):
    from embscale.bench.reproduce import Work

    cancel = f"import pathlib; pathlib.Path({str(tmp_path / (name + '.cancelled'))!r}).write_text('yes')"
    return Work(name=name, kind="submit", ready=lambda: True, to_go=to_go, cancel=[sys.executable, "-c", cancel],
                command=lambda slots: [sys.executable, "-c", DRIVER, str(tmp_path / f"{name}.stop"), str(sleep_s),
                                       str(slots)], **kwargs)


def test_slots_are_shared_in_proportion_to_the_runs_to_go():
    from embscale.bench.reproduce import share

    shares = share(9, {"fig2": 18, "fig4": 14, "fig5": 6, "fig9": 8, "fig67": 24})
    assert sum(shares.values()) == 9 and min(shares.values()) >= 1 and shares["fig67"] >= shares["fig2"] >= 2
    assert share(4, {"a": 1, "b": 10}) == {"b": 3, "a": 1}  # never more than a sweep has
    assert sum(share(2, {"a": 5, "b": 5, "c": 5}).values()) == 2  # more sweeps than slots: some wait


def test_drivers_stop_launching_then_runs_still_in_flight_are_cancelled(tmp_path):
    """Near the end of the budget every driver gets SIGTERM (it starts nothing more); its runs in flight are
    waited for, and those still running at the cancel time are cancelled with the sweep's cancel command."""
    from embscale.base import rundir
    from embscale.bench.reproduce import Call, Scheduler

    results = tmp_path / "results"
    run_dir = results / "busy" / "run1"
    run_dir.mkdir(parents=True)
    rundir.write_status(run_dir, "running")  # a job of the driver that outlives it
    (results / "idle").mkdir()
    call = Call(out=tmp_path / "out", results=results, budget_s=4.0, reserve_s=1.0, run_wall_s=1.0)
    scheduler = Scheduler(call, dict(os.environ), total_slots=3)
    scheduler.LAST_LAUNCH_S = 0.0
    works = [_work(tmp_path, "busy", lambda: 2), _work(tmp_path, "idle", lambda: 2)]
    scheduler.run(works)
    assert [w.record[0]["slots"] for w in works] == [2, 1]  # 3 slots, 2 runs to go each
    assert all(w.record[0]["exit"] == 0 for w in works)
    assert (tmp_path / "busy.stop").read_text() == "stopped\n" == (tmp_path / "idle.stop").read_text()
    assert (tmp_path / "busy.cancelled").read_text() == "yes"  # busy still ran at the cancel time
    assert not (tmp_path / "idle.cancelled").exists()
    assert 3.0 <= call.elapsed() < 30


def test_a_finished_sweep_gives_its_slots_to_a_running_one(tmp_path):
    from embscale.bench.reproduce import Call, Scheduler

    call = Call(out=tmp_path / "out", results=tmp_path / "results", budget_s=9.0, reserve_s=1.0, run_wall_s=1.0)
    (tmp_path / "results").mkdir()
    scheduler = Scheduler(call, dict(os.environ), total_slots=4)
    scheduler.LAST_LAUNCH_S = scheduler.MIN_AGE_S = 0.0
    quick_done = []
    quick = _work(tmp_path, "quick", lambda: 0 if quick_done else 2, sleep_s=1.0)
    long = _work(tmp_path, "long", lambda: 6)
    original = quick.command
    quick.command = lambda slots: quick_done.append(1) or original(slots)
    scheduler.run([quick, long])
    assert quick.record[0]["slots"] == 1 and len(quick.record) == 1
    assert [r["slots"] for r in long.record] == [3, 4]  # restarted with the freed slot
    assert long.record[0]["exit"] == 0 and (tmp_path / "long.stop").read_text() == "stopped\nstopped\n"
