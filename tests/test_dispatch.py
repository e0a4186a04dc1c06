"""Dispatch through the local and debug executors: a real tiny sweep trained for real, a driver killed midway,
status against the truth, --retry-failed, cancel, and the local queue's limits and GPU pinning."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
import tiny_sweep as T

from embscale.base import rundir
from embscale.base.errors import ConfigError
from embscale.sweeps import sections
from embscale.sweeps.executors import jobmap as J
from embscale.sweeps.executors.base import Job, drive
from embscale.sweeps.executors.local import LocalExecutor, SlotPool, available_gpus
from embscale.sweeps.plan import load_plan

EMBSCALE = [sys.executable, "-m", "embscale"]


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A corpus, a warm tokenizer cache and the environment for drivers and jobs."""
    with T.prepared_workspace(tmp_path_factory.mktemp("dispatch")) as workspace:
        yield workspace


def embscale(args: list[str], env: dict[str, str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(EMBSCALE + args, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=Path(__file__).resolve().parents[1], **kwargs)


def status_json(sweep: Path, env: dict[str, str]) -> dict:
    out = embscale(["status", str(sweep), "--json"], env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


wait_until = T.wait_until


def run_states(results: Path, name: str) -> dict[str, str]:
    out = {}
    for run_dir in (results / name).iterdir():
        status = rundir.read_status(run_dir)
        if status is not None:
            out[run_dir.name] = status.get("state")
    return out


max_overlap = T.max_overlap


# ------------------------------------------------------------------------------------------------- the sweep
def test_local_sweep_survives_a_killed_driver(workspace):
    """12 runs on 2 (fake) GPUs: kill the driver with SIGKILL midway, check status, submit again: every run
    is trained exactly once, never more than 2 at a time, each job pinned to its own GPU."""
    sweep = T.write_sweep(workspace["root"] / "tiny_local.yaml",
                          T.sweep_mapping("tiny_local", workspace["data"], steps=4))
    env = dict(workspace["env"], EMBSCALE_FAKE_GPUS="2")
    results = workspace["results"]
    log = open(workspace["root"] / "driver1.log", "w")  # noqa: SIM115
    driver = subprocess.Popen(EMBSCALE + ["submit", str(sweep), "--executor", "local", "--gpus-per-run", "1"],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              cwd=Path(__file__).resolve().parents[1])
    try:
        def midway():
            states = run_states(results, "tiny_local") if (results / "tiny_local").exists() else {}
            done = sum(s == "completed" for s in states.values())
            return done >= 2 and any(s == "running" for s in states.values())

        wait_until(midway, 180, "two completed runs and one running")
    finally:
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        log.close()

    # The truth right after the kill: completed runs, jobs still running, the rest not started. Jobs go on
    # while we look, so what the status files said just before `status` bounds what it may say.
    job_map = J.JobMap.load(results / "tiny_local" / "jobs.json")
    before = {run_id: (rundir.read_status(results / "tiny_local" / run_id) or {}).get("state")
              for run_id in job_map.runs}
    summary = status_json(sweep, env)
    by_id = {row["run_id"]: row for row in summary["runs"]}
    assert summary["total"] == 12
    for run_id, row in by_id.items():
        latest = job_map.latest(run_id)
        if before.get(run_id) == "completed":
            assert row["state"] == "completed"
        elif latest and latest.get("job_id"):  # started by the killed driver: its job goes on alone
            assert row["state"] in ("running", "queued", "completed"), row
        else:
            assert row["state"] == "pending" and row["detail"] == "not started: its driver exited", row
    assert "lost" not in summary["counts"] and "failed" not in summary["counts"], summary["counts"]
    completed_before = {r for r, row in by_id.items() if row["state"] == "completed"}
    assert len(completed_before) >= 2

    second = embscale(["submit", str(sweep), "--executor", "local", "--gpus-per-run", "1"], env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "to run" in second.stderr

    summary = status_json(sweep, env)
    assert summary["counts"] == {"completed": 12}, summary["counts"]
    assert summary["eta_s"] == 0.0

    job_map = J.JobMap.load(results / "tiny_local" / "jobs.json")
    intervals, gpu_sets = [], []
    for run_id in by_id:
        jobs = [j for j in job_map.history(run_id) if j.get("job_id")]
        assert len(jobs) == 1, f"{run_id} was started {len(jobs)} times: {jobs}"
        job = jobs[0]
        intervals.append((job["started_at"], job["ended_at"]))
        gpu_sets.append((job["started_at"], job["ended_at"], tuple(job["gpus"])))
        # Each step trained once: no duplicate metrics rows, no restart from scratch.
        import pandas as pd

        steps = pd.read_parquet(results / "tiny_local" / run_id / "metrics.parquet")["step"].tolist()
        assert steps == [1, 2, 3, 4]
        # The job saw its own pinning and imported the code snapshot.
        stdout = Path(job["folder"], f"{job['job_id']}_0_log.out").read_text()
        match = re.search(r"code from (\S+); CUDA_VISIBLE_DEVICES=([\d,]*);", stdout)
        assert match, stdout
        assert match.group(2) == ",".join(job["gpus"])
        assert Path(match.group(1)).parent == results / "tiny_local" / "code"
    assert max_overlap(intervals) <= 2
    for i, (s1, e1, g1) in enumerate(gpu_sets):
        assert len(g1) == 1 and g1[0] in ("0", "1")
        for s2, e2, g2 in gpu_sets[i + 1:]:
            if s1 < e2 and s2 < e1:
                assert set(g1).isdisjoint(g2), "two jobs ran on one GPU at once"
    run_json = json.loads((results / "tiny_local" / next(iter(by_id)) / "run.json").read_text())
    assert {"family", "point", "accounting", "corpus", "identity"} <= set(run_json)

    third = embscale(["submit", str(sweep), "--executor", "local"], env)
    assert third.returncode == 0
    assert "0 to run, 12 completed" in third.stderr
    assert J.JobMap.load(results / "tiny_local" / "jobs.json").runs == job_map.runs


def test_retry_failed(workspace, capsys):
    """Failed runs stay failed until --retry-failed (debug executor, in-process)."""
    from embscale.cli import main

    missing = workspace["root"] / "later" / "train.jsonl"
    data = dict(workspace["data"], corpus=str(missing))
    sweep = T.write_sweep(workspace["root"] / "tiny_retry.yaml",
                          T.sweep_mapping("tiny_retry", data, steps=2, seeds=1))
    assert main(["submit", str(sweep), "--executor", "debug"]) == 1
    capsys.readouterr()
    assert main(["status", str(sweep), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["counts"] == {"failed": 2}
    assert all(str(missing) in row["error"] and "\n" not in row["error"] for row in summary["runs"])
    assert main(["status", str(sweep)]) == 0
    assert "failed" in capsys.readouterr().out

    missing.parent.mkdir()
    missing.write_text(Path(workspace["data"]["corpus"]).read_text())
    assert main(["submit", str(sweep), "--executor", "debug"]) == 0
    assert "0 to run, 2 failed (use --retry-failed" in capsys.readouterr().err
    assert main(["submit", str(sweep), "--executor", "debug", "--retry-failed"]) == 0
    capsys.readouterr()
    assert main(["status", str(sweep), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"] == {"completed": 2}


def test_a_run_completed_by_another_sweep_is_copied_not_trained(workspace, capsys):
    """Two sweeps of one results root share their runs (the same run ids): the second copies the first's
    completed runs (metrics, the trainer's run.json with its own sweep's planned keys, status with copied_from)
    and trains none; --no-reuse trains them; collect reads the copies."""
    from embscale.cli import main

    first = T.write_sweep(workspace["root"] / "shared_a.yaml",
                          T.sweep_mapping("shared_a", workspace["data"], steps=2, seeds=1))
    second = T.write_sweep(workspace["root"] / "shared_b.yaml",
                           T.sweep_mapping("shared_b", workspace["data"], steps=2, seeds=1))
    assert main(["submit", str(first), "--executor", "debug"]) == 0
    capsys.readouterr()
    assert main(["submit", str(second), "--executor", "debug"]) == 0
    assert "2 runs completed in another sweep (shared_a): copied, not trained again" in capsys.readouterr().err
    source, copied = workspace["results"] / "shared_a", workspace["results"] / "shared_b"
    run_ids = sorted(p.name for p in source.iterdir() if rundir.is_run_dir(p))
    assert len(run_ids) == 2 and run_ids == sorted(p.name for p in copied.iterdir() if rundir.is_run_dir(p))
    for run_id in run_ids:
        record, status = rundir.read_run_record(copied / run_id), rundir.read_status(copied / run_id)
        assert record["sweep"] == "shared_b" and record["copied_from"] == str(source / run_id)
        assert rundir.written_by_trainer(record) and status["state"] == "completed"
        assert status["copied_from"] == str(source / run_id)
        assert (copied / run_id / "metrics.parquet").read_bytes() == (source / run_id / "metrics.parquet").read_bytes()
        assert not (copied / run_id / "checkpoints").exists()
        assert not list(copied.glob(f".{run_id}.*"))  # no staging left behind
    assert main(["collect", str(copied)]) == 0
    capsys.readouterr()
    import pandas as pd

    runs = pd.read_parquet(copied / "runs.parquet")
    assert sorted(runs["run_id"]) == run_ids and set(runs["state"]) == {"completed"}
    assert main(["status", str(second), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"] == {"completed": 2}

    third = T.write_sweep(workspace["root"] / "shared_c.yaml",
                          T.sweep_mapping("shared_c", workspace["data"], steps=2, seeds=1))
    assert main(["submit", str(third), "--executor", "debug", "--no-reuse"]) == 0
    assert "copied, not trained again" not in capsys.readouterr().err
    for run_id in run_ids:
        assert "copied_from" not in rundir.read_status(workspace["results"] / "shared_c" / run_id)


def test_cancel_local_sweep(workspace):
    """cancel stops the driver and every running job (by process group) and marks the runs cancelled."""
    sweep = T.write_sweep(workspace["root"] / "tiny_cancel.yaml",
                          T.sweep_mapping("tiny_cancel", workspace["data"], steps=2000, seeds=2, widths=(16,)))
    env = workspace["env"]
    results = workspace["results"]
    driver = subprocess.Popen(EMBSCALE + ["submit", str(sweep), "--executor", "local", "--cpu-jobs", "1"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True, cwd=Path(__file__).resolve().parents[1])
    try:
        wait_until(lambda: "running" in run_states(results, "tiny_cancel").values()
                   if (results / "tiny_cancel").exists() else False, 120, "a running run")
        job_map = J.JobMap.load(results / "tiny_cancel" / "jobs.json")
        pids = [h[-1]["pid"] for h in job_map.runs.values() if h and h[-1].get("pid")]
        assert len(pids) == 1  # --cpu-jobs 1: one at a time
        out = embscale(["cancel", str(sweep)], env)
        assert out.returncode == 0, out.stderr
        assert driver.wait(timeout=30) is not None
    finally:
        if driver.poll() is None:
            os.kill(driver.pid, signal.SIGKILL)
            driver.wait()
    assert not J.process_alive(pids[0])
    summary = status_json(sweep, env)
    assert summary["counts"] == {"cancelled": 2}, summary["counts"]
    # The running one had checkpointed on SIGTERM before it was marked cancelled.
    started = [r for r in summary["runs"] if (r["step"] or 0) > 0]
    assert len(started) == 1


# ------------------------------------------------------------------------------------------------- status
def test_status_reconciles_with_the_scheduler(workspace, capsys):
    """Runs whose jobs vanished are lost / failed-to-start; a live one gets an ETA; errors show one line."""
    import pandas as pd

    from embscale.cli import main

    sweep = T.write_sweep(workspace["root"] / "tiny_status.yaml",
                          T.sweep_mapping("tiny_status", workspace["data"], steps=100, seeds=2))
    plan = load_plan(sweep, workspace["results"])
    runs = plan.runs
    assert len(runs) == 4
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    me = os.getpid()
    with J.JobMap.locked(plan.job_map_path) as job_map:
        job_map.record(runs[0].run_id, {"job_id": str(dead.pid), "executor": "local", "pid": dead.pid,
                                        "host": J.hostname()})
        job_map.record(runs[1].run_id, {"job_id": str(dead.pid), "executor": "local", "pid": dead.pid,
                                        "host": J.hostname()})
        job_map.record(runs[2].run_id, {"job_id": str(me), "executor": "local", "pid": me,
                                        "proc_start": J.proc_start_time(me), "host": J.hostname(),
                                        "started_at": time.time() - 10})
    rundir.write_status(plan.run_dir(runs[0]), "running", step=10, total_steps=100)
    rundir.write_status(plan.run_dir(runs[1]), "queued", job_id=str(dead.pid))
    rundir.write_status(plan.run_dir(runs[2]), "running", step=50, total_steps=100)
    pd.DataFrame({"step": [49, 50], "tokens": [49 * 64, 50 * 64], "tokens_per_s": [640.0, 640.0]}).to_parquet(
        plan.run_dir(runs[2]) / "metrics.parquet")
    rundir.write_status(plan.run_dir(runs[3]), "failed", error="RuntimeError: boom\nTraceback line two")

    assert main(["status", str(sweep), "--results", str(workspace["results"]), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    states = {row["run_id"]: row for row in summary["runs"]}
    assert states[runs[0].run_id]["state"] == "lost"
    assert states[runs[1].run_id]["state"] == "failed-to-start"
    assert states[runs[2].run_id]["state"] == "running"
    assert states[runs[2].run_id]["eta_s"] == pytest.approx(5.0, rel=1e-6)  # 50 steps at 10 steps/s
    assert states[runs[3].run_id]["state"] == "failed"
    assert states[runs[3].run_id]["error"] == "RuntimeError: boom"
    # Work left: half of run 2, all of runs 0 and 1 (run 0 had done 10%); throughput: run 2's FLOP/s.
    flops_rate = 640.0 * runs[2].flops / runs[2].tokens
    left = 0.9 * runs[0].flops + runs[1].flops + 0.5 * runs[2].flops
    assert summary["eta_s"] == pytest.approx(left / flops_rate)
    assert main(["status", str(sweep), "--results", str(workspace["results"])]) == 0
    text = capsys.readouterr().out
    assert "lost" in text and "failed-to-start" in text and "RuntimeError: boom" in text
    assert "Traceback line two" not in text and "ETA:" in text


# ------------------------------------------------------------------------------------------------- the queue
def _recorder(path: Path, sleep_s: float) -> submitit.helpers.CommandFunction:
    code = ("import json, os, sys, time; start = time.time(); time.sleep(float(sys.argv[2])); "
            "print(json.dumps([start, time.time(), os.environ['CUDA_VISIBLE_DEVICES'], "
            "os.environ['SUBMITIT_LOCAL_JOB_ID'], os.environ['SUBMITIT_LOCAL_GLOBALID'], "
            "os.environ.get('OMP_NUM_THREADS')]), "
            "file=open(sys.argv[1], 'a'))")
    return submitit.helpers.CommandFunction([sys.executable, "-c", code, str(path), str(sleep_s)])


@pytest.mark.parametrize("gpus,cpu_jobs", [(["0", "1"], 1), ([], 2)])
def test_local_queue_limits_and_pinning(tmp_path, monkeypatch, gpus, cpu_jobs):
    """Never more jobs than GPUs (or CPU slots); GPU jobs pinned to disjoint devices; a 2-GPU job gets both,
    as two tasks (one per GPU, the DDP ranks); CPU jobs share the cores (OMP_NUM_THREADS) instead of each
    starting a thread per core."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    log = tmp_path / "times.txt"
    items = [Job(key=f"job{i}", fn=_recorder(log, 0.6), gpus=1 if gpus else 0) for i in range(5)]
    if gpus:
        items.insert(2, Job(key="wide", fn=_recorder(log, 0.6), gpus=2))
    keys = {item.key for item in items}
    started, ended = {}, {}
    executor = LocalExecutor(tmp_path / "submitit", SlotPool(gpus, cpu_jobs), log=lambda m: None)
    assert drive(executor, items, poll_s=0.05, on_start=lambda job, rec: started.__setitem__(job.key, rec),
                 on_end=lambda key, rec: ended.__setitem__(key, rec)) == []
    assert set(started) == set(ended) == keys
    assert all(rec["exit_code"] == 0 for rec in ended.values())
    tasks = [json.loads(line) for line in log.read_text().splitlines()]
    jobs: dict[str, list] = {}
    for start, end, devices, job_id, rank, threads in tasks:
        jobs.setdefault(job_id, []).append((start, end, devices, rank))
        assert threads == (None if gpus else str(max(1, len(os.sched_getaffinity(0)) // cpu_jobs)))
    assert len(jobs) == len(items)
    spans = [(min(t[0] for t in ts), max(t[1] for t in ts), ts[0][2]) for ts in jobs.values()]
    assert max_overlap([(a, b) for a, b, _ in spans]) <= (len(gpus) or cpu_jobs)
    if gpus:
        wide = jobs[started["wide"]["job_id"]]
        assert sorted(t[3] for t in wide) == ["0", "1"] and {t[2] for t in wide} == {"0,1"}
        assert started["wide"]["gpus"] == ["0", "1"]
        assert sorted(c for *_, c in spans).count("0,1") == 1
        assert {c for *_, c in spans} == {"0", "1", "0,1"}
        for i, (a1, b1, c1) in enumerate(spans):
            for a2, b2, c2 in spans[i + 1:]:
                if a1 < b2 and a2 < b1:
                    assert set(c1.split(",")).isdisjoint(c2.split(",")), "two jobs on one GPU at once"
    else:
        assert {c for *_, c in spans} == {""}


def test_slot_pool_and_fake_gpus(monkeypatch):
    pool = SlotPool(["0", "1", "2"], cpu_jobs=4)
    assert pool.acquire(2) == ["0", "1"]
    assert pool.acquire(2) is None
    assert pool.acquire(1) == ["2"]
    pool.release(["1", "0"])
    assert pool.free_gpus == ["0", "1"]
    assert not pool.fits_ever(4)
    cpu = SlotPool([], cpu_jobs=2)
    assert cpu.acquire(0) == [] and cpu.acquire(0) == [] and cpu.acquire(0) is None
    with pytest.raises(ValueError, match="this machine has none"):
        cpu.acquire(1)
    monkeypatch.setenv("EMBSCALE_FAKE_GPUS", "2")
    assert available_gpus() == ["0", "1"]
    monkeypatch.setenv("EMBSCALE_FAKE_GPUS", "two")
    with pytest.raises(ValueError, match="EMBSCALE_FAKE_GPUS"):
        available_gpus()


# ------------------------------------------------------------------------------------------------- options
def test_slurm_options():
    assert sections.slurm_minutes(90) == 90
    assert sections.slurm_minutes("2:00:00") == 120
    assert sections.slurm_minutes("1-00:00:00") == 1440
    assert sections.slurm_minutes("1-2") == 1440 + 120
    assert sections.slurm_minutes("30") == 30
    params = sections.slurm_parameters(
        {"partition": "gpu", "time": "1:00:00", "gpus_per_node": 4, "tasks_per_node": 4, "mem_gb": 64,
         "sbatch": {"mail-type": "END"}, "array_parallelism": 8},
        {"qos": "high", "sbatch": {"requeue": True}})
    assert params == {"partition": "gpu", "time": 60, "gpus_per_node": 4, "ntasks_per_node": 4, "mem": "64GB",
                      "additional_parameters": {"mail-type": "END", "requeue": True}, "array_parallelism": 8,
                      "qos": "high"}
    with pytest.raises(ConfigError, match="slurm.partitoin"):
        sections.slurm_parameters({"partitoin": "gpu"})
    with pytest.raises(ConfigError, match="slurm.time"):
        sections.slurm_parameters({"time": "soon"})
    with pytest.raises(ConfigError, match="slurm.nodes"):
        sections.slurm_parameters({"nodes": 0})
    with pytest.raises(ConfigError, match="executor.cpu_job"):
        sections.executor_options({"cpu_job": 2})


def test_bad_input_exits_2_and_writes_nothing(workspace, capsys):
    from embscale.cli import main

    sweep = T.write_sweep(workspace["root"] / "tiny_bad.yaml",
                          T.sweep_mapping("tiny_bad", workspace["data"], extra={"slurm": {"partitoin": "x"}}))
    assert main(["submit", str(sweep), "--executor", "slurm"]) == 2
    assert "slurm.partitoin" in capsys.readouterr().err
    assert main(["submit", str(workspace["root"] / "nope.yaml")]) == 2
    assert "no such sweep file" in capsys.readouterr().err
    assert not (workspace["results"] / "tiny_bad").exists()
