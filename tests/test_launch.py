"""Runs of several ranks through the local queue, and the GPUs per run in the plan.

A local run of ``processes: 2`` on a CPU machine is one job of two processes (gloo ranks meeting on a free port)
that holds two CPU slots, restarts both when stopped near its time limit, and trains the same curve as two torchrun
processes; runs on GPUs have one process per GPU
(tests/test_dispatch.py pins a two-GPU job's two tasks to fake GPUs). The Slurm side (tasks, nodes, requeue) is in
tests/test_slurm.py.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import tiny_sweep as T
import yaml

from embscale.base import rundir
from embscale.base.errors import ConfigError, UserError
from embscale.cli import main
from embscale.sweeps import sections
from embscale.sweeps.executors import jobmap as J
from embscale.sweeps.executors.local import SlotPool
from embscale.sweeps.plan import load_plan
from embscale.sweeps.submit import SubmitOptions, make_executor

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A corpus with its tokenizer and shards built, and the environment of the drivers and jobs."""
    data = T.write_corpus(tmp_path / "corpus")
    env = T.job_environment(tmp_path / "cache", tmp_path / "results")
    for key in ("EMBSCALE_CACHE", "EMBSCALE_RESULTS", "EMBSCALE_PROGRESS", "OMP_NUM_THREADS"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.delenv("EMBSCALE_FAKE_GPUS", raising=False)
    from embscale.training.config import DataConfig
    from embscale.training.data.shards import prepare_data

    prepare_data(DataConfig(**data))
    return {"root": tmp_path, "data": data}


def test_local_run_of_two_cpu_processes_restarts_and_matches_torchrun(workspace, capsys):
    """``executor.processes: 2`` without GPUs: one local job of two processes (ranks 0 and 1 of 2) holding two CPU
    slots; rank 0 alone writes. Stopped near its time limit (every local job is, with ``--timeout-min 1``), every
    rank checkpoints, the job restarts both processes and the run resumes; the curve is two torchrun processes'."""
    mapping = T.sweep_mapping("two_processes", workspace["data"], steps=40, seeds=1, widths=(16,),
                              extra={"executor": {"processes": 2, "cpu_jobs": 2}})
    mapping["training"].update(batch_tokens=128, checkpoint_every=5, eval_every=10)  # 4 x 16 tokens per rank
    sweep = T.write_sweep(workspace["root"] / "two_processes.yaml", mapping)
    plan = load_plan(sweep)
    run = plan.runs[0]
    run_dir = plan.run_dir(run)
    stopped: dict[str, int] = {}

    def stop_the_job_once_past_a_checkpoint() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status = rundir.read_status(run_dir) or {}
            if status.get("state") == "running" and (status.get("step") or 0) >= 7:
                controller = J.JobMap.load(plan.job_map_path).latest(run.run_id)["pid"]
                os.kill(int(controller), signal.SIGTERM)  # submitit's controller hands it to both processes
                stopped["at"] = status["step"]
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=stop_the_job_once_past_a_checkpoint, daemon=True)
    watcher.start()
    assert main(["submit", str(sweep), "--executor", "local", "--poll-s", "0.2", "--timeout-min", "1"]) == 0
    watcher.join(timeout=1)
    err = capsys.readouterr().err
    assert "2 processes (gloo ranks) per run" in err and "(pid " in err and ", 2 processes)" in err
    assert 7 <= stopped["at"] < 40
    assert rundir.run_state(run_dir) == "completed"
    assert rundir.read_run_record(run_dir)["world_size"] == 2
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "metrics.parquet", "run.json",
                                                          "status.json"]  # rank 0 alone writes
    record = J.JobMap.load(plan.job_map_path).latest(run.run_id)
    assert record["ranks"] == 2 and record["cpu_slots"] == 2 and record["gpus"] == []
    folder = Path(record["folder"])
    logs = [(folder / f"{record['job_id']}_{task}_log.out").read_text()
            + (folder / f"{record['job_id']}_{task}_log.err").read_text() for task in (0, 1)]
    for task, log in enumerate(logs):  # one job, two processes of it, each started again after the stop
        assert log.count(f"global_rank={task}(2)") >= 2 and f"; rank {task}\n" in log
    assert "timed out; restarting" in logs[0] and "resuming run" in logs[0]
    T.assert_same_curve(pd.read_parquet(run_dir / "metrics.parquet"),
                        T.torchrun_curve(plan, workspace["root"] / "torchrun"), steps=40)


def test_cpu_slots_count_processes():
    pool = SlotPool([], cpu_jobs=3)
    assert pool.acquire(0, processes=2) == [] and pool.busy_cpu == 2
    assert pool.can_acquire(0) and not pool.can_acquire(0, processes=2)
    assert pool.acquire(0, processes=2) is None and pool.acquire(0) == []
    pool.release([], 2)
    pool.release([], 1)
    assert pool.busy_cpu == 0
    # more processes than slots: the run takes every slot and runs alone
    assert pool.cpu_slots(5) == 3 and pool.acquire(0, processes=5) == [] and not pool.can_acquire(0)
    pool.take([], 3)  # an adopted job holds the slots its record names
    assert pool.busy_cpu == 6


def test_processes_option(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="executor.processes"):
        sections.executor_options({"processes": 0})
    with pytest.raises(ConfigError, match="executor.processes"):
        sections.executor_options({"processes": "two"})
    sweep = yaml.safe_load((SWEEPS / "tiny.yaml").read_text())
    sweep["executor"] = {"processes": 2}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    plan = load_plan(path, tmp_path / "results")
    messages: list[str] = []
    monkeypatch.setenv("EMBSCALE_FAKE_GPUS", "0")
    executor, gpus = make_executor(plan, SubmitOptions(), None, messages.append, "x")
    assert gpus == 0 and executor.processes == 2
    executor, _ = make_executor(plan, SubmitOptions(processes=3), None, messages.append, "x")
    assert executor.processes == 3  # the command line over the sweep
    # on GPUs a run has one process per GPU: the sweep's value is set aside, a contrary flag is an error
    monkeypatch.setenv("EMBSCALE_FAKE_GPUS", "2")
    executor, gpus = make_executor(plan, SubmitOptions(), None, messages.append, "x")
    assert gpus == 1 and executor.processes == 1
    assert messages == ["executor.processes 2 set aside: runs on GPUs have one process per GPU (1)"]
    with pytest.raises(UserError, match="--processes 2: runs on GPUs have one process per GPU"):
        make_executor(plan, SubmitOptions(processes=2), None, messages.append, "x")
    executor, gpus = make_executor(plan, SubmitOptions(processes=2, gpus_per_run=2), None, messages.append, "x")
    assert gpus == 2 and executor.processes == 1


@pytest.mark.parametrize("extra,flags,gpus", [
    ({}, [], 1),
    ({"executor": {"type": "local", "gpus_per_run": 2}}, [], 2),
    ({"executor": {"type": "slurm"}, "slurm": {"nodes": 2, "gpus_per_node": 4}}, [], 8),
    ({"executor": {"type": "local"}, "slurm": {"nodes": 2, "gpus_per_node": 4}}, [], 1),
    ({"executor": {"type": "local"}, "slurm": {"nodes": 2, "gpus_per_node": 4}}, ["--executor", "slurm"], 8),
])
def test_plan_shows_gpus_per_run_and_hours(tmp_path, capsys, extra, flags, gpus):
    """The plan's GPUs per run are those the run is launched with by the executor it goes to (the local queue:
    one, or gpus_per_run; Slurm: nodes x gpus_per_node); GPU-hours stay the FLOPs at the MFU, hours are GPU-hours
    / GPUs."""
    sweep = {**yaml.safe_load((SWEEPS / "tiny.yaml").read_text()), **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    assert main(["plan", str(path), "--json", *flags]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["gpus_per_run"] == gpus
    assert document["wall_hours"] == pytest.approx(document["gpu_hours"] / gpus)
    for entry in document["runs"]:
        assert entry["gpus"] == gpus == entry["memory"]["gpus"]
        assert entry["wall_hours"] == pytest.approx(entry["gpu_hours"] / gpus)
    assert main(["plan", str(path), *flags]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("id ")).split()
    assert header[header.index("GPU-h"):] == ["GPU-h", "hours", "GPUs", "shard", "mem/GPU"]
    row = next(line for line in out.splitlines() if line.startswith(document["runs"][0]["run_id"])).split()
    assert row[-4] == str(gpus)  # the last cell, mem/GPU, is two words ("0.2 GiB")
    assert float(row[-5]) == pytest.approx(document["runs"][0]["wall_hours"], rel=5e-3)
    assert f"each run on {gpus} GPU(s)" in out
