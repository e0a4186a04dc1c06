"""Warm workers (``executor.warm_workers``, ``submit --warm-workers``): one process per local slot trains its runs
one after another. Real tiny sweeps on CPU: the same numbers as a fresh process per run, bit for bit; start-up of a
worker's later runs without imports; a run that raises fails alone; a worker killed mid-run loses only its run,
which resumes when submitted again; cancel and a killed driver behave as with a process per run; what a run
changes in the process is put back."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import tiny_sweep as T

from embscale.base import rundir
from embscale.base.errors import ConfigError
from embscale.sweeps import sections
from embscale.sweeps.executors import jobmap as J
from embscale.sweeps.executors.base import Job, drive
from embscale.sweeps.executors.local import LocalExecutor, SlotPool
from embscale.sweeps.executors.warm import ProcessState
from embscale.sweeps.plan import load_plan, planned_record, run_config_dict
from embscale.sweeps.runjob import RunJob
from embscale.sweeps.submit import SubmitOptions, finish_state, make_executor

ROOT = Path(__file__).resolve().parents[1]
EMBSCALE = [sys.executable, "-m", "embscale"]
TIMING_COLUMNS = ("tokens_per_s", "mfu")  # wall-clock measurements: the only columns allowed to differ


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A corpus, a warm tokenizer cache and the environment for drivers and jobs."""
    with T.prepared_workspace(tmp_path_factory.mktemp("warm"), extra_env=("OMP_NUM_THREADS",)) as workspace:
        yield workspace


def embscale(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(EMBSCALE + args, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def wait_until(condition, timeout: float, what: str, interval: float = 0.05):
    return T.wait_until(condition, timeout, what, interval)


def run_states(results: Path, name: str) -> dict[str, str]:
    folder = results / name
    if not folder.exists():
        return {}
    return {d.name: (rundir.read_status(d) or {}).get("state") for d in folder.iterdir() if rundir.is_run_dir(d)}


def curve(run_dir: Path) -> pd.DataFrame:
    frame = pd.read_parquet(run_dir / "metrics.parquet")
    return frame[[c for c in frame.columns if c not in TIMING_COLUMNS]]


def run_job(plan, run, **training) -> Job:
    """The job of ``run`` of ``plan`` with ``training`` keys changed."""
    config = run_config_dict(run, plan)
    config["training"] = {**config["training"], **training}
    return Job(key=str(run.run_id), fn=RunJob(str(run.run_id), str(plan.run_dir(run)), config, executor="local",
                                              planned=planned_record(run, plan.name)))


# ------------------------------------------------------------------------------------------------- the same numbers
def test_warm_sweep_equals_fresh_processes(workspace):
    """Four runs through two warm workers (two runs each) and through a fresh process per run: the same metrics,
    bit for bit (all but the wall-clock columns); one job per run in the job map, ``<worker pid>.<n>``; the
    workers' later runs start without imports; every worker has exited when the driver returns."""
    data, env, results = workspace["data"], workspace["env"], workspace["results"]
    warm = T.write_sweep(workspace["root"] / "warm.yaml", T.sweep_mapping("warm", data, steps=4, seeds=2))
    fresh = T.write_sweep(workspace["root"] / "fresh.yaml", T.sweep_mapping("fresh", data, steps=4, seeds=2))
    out = embscale(["submit", str(warm), "--executor", "local", "--cpu-jobs", "2", "--warm-workers"], env)
    assert out.returncode == 0, out.stderr
    assert "warm workers (one process per slot" in out.stderr
    out = embscale(["submit", str(fresh), "--executor", "local", "--cpu-jobs", "2", "--no-reuse"], env)
    assert out.returncode == 0, out.stderr
    assert run_states(results, "warm") == run_states(results, "fresh") == {r: "completed"
                                                                          for r in run_states(results, "warm")}
    run_ids = sorted(run_states(results, "warm"))
    assert len(run_ids) == 4
    for run_id in run_ids:
        pd.testing.assert_frame_equal(curve(results / "warm" / run_id), curve(results / "fresh" / run_id),
                                      check_exact=True)

    job_map = J.JobMap.load(results / "warm" / "jobs.json")
    jobs = {run_id: job_map.history(run_id) for run_id in run_ids}
    assert all(len(history) == 1 for history in jobs.values()), jobs
    jobs = {run_id: history[0] for run_id, history in jobs.items()}
    workers: dict[int, list[int]] = {}
    for run_id, job in jobs.items():
        assert job["job_id"] == f"{job['pid']}.{job['worker_run']}" and job["pgid"] == job["pid"]
        assert job["ended_at"] >= job["started_at"] and job["exit_code"] == 0
        workers.setdefault(job["pid"], []).append(job["worker_run"])
        log = Path(job["folder"], f"{job['job_id']}_0_log.out").read_text()
        assert f"embscale: run {run_id} in " in log and f"run {job['worker_run']} of this process" in log
        assert "start-up" in Path(job["folder"], f"{job['job_id']}_0_log.err").read_text()
        startup = rundir.read_run_record(results / "warm" / run_id)["startup"]
        if job["worker_run"] == 1:  # from the worker's start: the imports of torch and the trainer
            assert startup["since"] == "process start" and startup["imports_s"] > 0.2, startup
        else:  # from when the worker took the run: nothing left to import
            assert startup["since"] == "warm worker task" and startup["imports_s"] < 0.1, startup
    # two slots, two workers; whichever is free takes the next run, numbered in turn
    assert len(workers) == 2 and all(sorted(runs) == list(range(1, len(runs) + 1)) for runs in workers.values())
    assert max(len(runs) for runs in workers.values()) >= 2
    assert not any(J.process_alive(pid) for pid in workers)  # the driver closed them
    worker_log = (results / "warm" / "submitit" / "warm_workers.log").read_text()
    assert "more open file descriptors" not in worker_log, worker_log  # no run left files open
    fresh_startups = [rundir.read_run_record(results / "fresh" / r)["startup"] for r in run_ids]
    assert all(s["since"] == "process start" and s["imports_s"] > 0.2 for s in fresh_startups)


# ------------------------------------------------------------------------------------------------- failures
def test_failures_stay_with_their_run(workspace):
    """One warm worker (one CPU slot) takes four runs in turn: the first completes; the second raises (a bad
    config) and is failed by its RunJob while the worker goes on; the third is killed with its worker (SIGKILL)
    mid-run and is failed by the driver; the fourth completes in a fresh worker. Submitted again, the killed run
    resumes from its checkpoint."""
    data, results = workspace["data"], workspace["results"]
    short = load_plan(T.write_sweep(workspace["root"] / "iso.yaml",
                                    T.sweep_mapping("iso", data, steps=4, seeds=3, widths=(16,))), results)
    long_mapping = T.sweep_mapping("iso_long", data, steps=200, seeds=1, widths=(16,))
    long_mapping["training"]["checkpoint_every"] = 20
    long = load_plan(T.write_sweep(workspace["root"] / "iso_long.yaml", long_mapping), results)
    first, bad, last = short.runs
    victim = long.runs[0]
    jobs = [run_job(short, first), run_job(short, bad, lr=-1.0), run_job(long, victim),
            run_job(short, last)]
    executor = LocalExecutor(results / "iso" / "submitit", SlotPool([], cpu_jobs=1), log=lambda m: None)
    executor.warm_workers = True
    started, ended = {}, {}
    killed = []
    victim_dir = long.run_dir(victim)

    def kill_midway(waiting):
        status = rundir.read_status(victim_dir) or {}
        if not killed and status.get("state") == "running" and (status.get("step") or 0) >= 30:
            record = started[str(victim.run_id)]
            os.kill(record["pid"], signal.SIGKILL)
            killed.append(status["step"])

    def on_end(key, record):
        ended[key] = record
        run_dir = long.run_dir(victim) if key == str(victim.run_id) else short.run_dir(
            next(r for r in short.runs if str(r.run_id) == key))
        record["state"] = finish_state(run_dir, record)

    assert drive(executor, jobs, poll_s=0.02, on_start=lambda job, rec: started.__setitem__(job.key, rec),
                 on_end=on_end, on_tick=kill_midway) == []
    executor.close()
    assert killed, "the long run finished before it could be killed"
    states = {key: record["state"] for key, record in ended.items()}
    assert states == {str(first.run_id): "completed", str(bad.run_id): "failed",
                      str(victim.run_id): "failed", str(last.run_id): "completed"}
    assert "lr" in rundir.read_status(short.run_dir(bad))["error"]
    assert ended[str(bad.run_id)]["exit_code"] == 1
    assert ended[str(victim.run_id)]["exit_code"] == -signal.SIGKILL
    assert "exited with code -9 before finishing" in rundir.read_status(victim_dir)["error"]
    # the raising run did not end its worker; the killed one did, and the next run got a fresh worker
    pids = [started[str(r.run_id)]["pid"] for r in (first, bad, victim, last)]
    assert pids[0] == pids[1] == pids[2] != pids[3]
    assert [started[str(r.run_id)]["worker_run"] for r in (first, bad, victim, last)] == [1, 2, 3, 1]

    again = LocalExecutor(results / "iso" / "submitit", SlotPool([], cpu_jobs=1), log=lambda m: None)
    again.warm_workers = True
    ended.clear()
    assert drive(again, [run_job(long, victim)], poll_s=0.02, on_end=on_end) == []
    again.close()
    assert ended[str(victim.run_id)]["state"] == "completed"
    steps = pd.read_parquet(victim_dir / "metrics.parquet")["step"].tolist()
    assert steps == list(range(1, 201))
    log = Path(ended[str(victim.run_id)]["folder"], f"{ended[str(victim.run_id)]['job_id']}_0_log.err").read_text()
    assert f"resuming run {victim.run_id} from step " in log


def test_a_warm_run_restarts_itself_at_its_time_limit(workspace):
    """Near the local time limit the worker signals its run (as submitit's controller does): the run checkpoints,
    asks for a restart, and resumes in the same worker, until it completes, every step once."""
    data, results = workspace["data"], workspace["results"]
    first = load_plan(T.write_sweep(workspace["root"] / "warm_first.yaml",
                                    T.sweep_mapping("warm_first", data, steps=4, seeds=1, widths=(16,))), results)
    mapping = T.sweep_mapping("warm_limit", data, steps=200, seeds=1, widths=(16,))
    mapping["training"]["checkpoint_every"] = 20
    plan = load_plan(T.write_sweep(workspace["root"] / "warm_limit.yaml", mapping), results)
    jobs = [run_job(first, first.runs[0]), run_job(plan, plan.runs[0])]
    for job in jobs:
        job.fn.signal_delay_s = 0.0  # timed out once a second has passed (a limit of 31 s, signalled 30 s early)
    executor = LocalExecutor(results / "warm_limit" / "submitit", SlotPool([], cpu_jobs=1), log=lambda m: None,
                             timeout_min=31 / 60)
    executor.warm_workers = True
    executor.max_requeues = 100  # however slow this machine is today
    ended = {}
    assert drive(executor, jobs, poll_s=0.05, on_end=ended.__setitem__) == []
    executor.close()
    # the first run's start-up (its imports) outlasts a second: the signal came before it trained, and waited
    assert rundir.read_status(first.run_dir(first.runs[0]))["state"] == "completed"
    second = ended[jobs[1].key]
    assert second["worker_run"] == 2 and second["exit_code"] == 0
    out = Path(second["folder"], f"{second['job_id']}_0_log.out").read_text()
    assert "restarts (time limit)" in out
    assert rundir.read_status(plan.run_dir(plan.runs[0]))["state"] == "completed"
    assert pd.read_parquet(plan.run_dir(plan.runs[0]) / "metrics.parquet")["step"].tolist() == list(range(1, 201))


# ------------------------------------------------------------------------------------------------- as before
def start_warm_driver(sweep: Path, env: dict[str, str]) -> subprocess.Popen:
    """``embscale submit --warm-workers`` of ``sweep`` on one CPU job, in a session of its own (to be killed)."""
    return subprocess.Popen(EMBSCALE + ["submit", str(sweep), "--executor", "local", "--cpu-jobs", "1",
                                        "--warm-workers"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            cwd=ROOT)


def test_cancel_stops_warm_workers(workspace):
    """cancel stops the driver and the worker (its process group): the running run checkpoints, both runs are
    cancelled, and the worker takes no further run."""
    sweep = T.write_sweep(workspace["root"] / "warm_cancel.yaml",
                          T.sweep_mapping("warm_cancel", workspace["data"], steps=2000, seeds=2, widths=(16,)))
    env, results = workspace["env"], workspace["results"]
    driver = start_warm_driver(sweep, env)
    try:
        wait_until(lambda: "running" in run_states(results, "warm_cancel").values(), 120, "a running run")
        job_map = J.JobMap.load(results / "warm_cancel" / "jobs.json")
        records = [h[-1] for h in job_map.runs.values() if h and h[-1].get("pid")]
        assert len(records) == 1 and records[0]["worker_run"] == 1
        out = embscale(["cancel", str(sweep)], env)
        assert out.returncode == 0, out.stderr
        assert driver.wait(timeout=30) is not None
    finally:
        if driver.poll() is None:
            os.kill(driver.pid, signal.SIGKILL)
            driver.wait()
    assert not J.process_alive(records[0]["pid"])
    out = embscale(["status", str(sweep), "--json"], env)
    summary = json.loads(out.stdout)
    assert summary["counts"] == {"cancelled": 2}, summary["counts"]
    assert len([r for r in summary["runs"] if (r["step"] or 0) > 0]) == 1  # it checkpointed on SIGTERM


def test_killed_driver_leaves_warm_workers_to_finish_their_run(workspace):
    """The driver killed with SIGKILL: each worker finishes the run it has and exits (its stdin ended); the next
    driver waits for those runs and trains the rest; every run is trained once."""
    sweep = T.write_sweep(workspace["root"] / "warm_kill.yaml",
                          T.sweep_mapping("warm_kill", workspace["data"], steps=60, seeds=3, widths=(16,)))
    env, results = workspace["env"], workspace["results"]
    driver = start_warm_driver(sweep, env)
    try:
        def midway():
            states = run_states(results, "warm_kill").values()
            return "completed" in states and "running" in states
        wait_until(midway, 120, "a completed run and a running one")
    finally:
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
    job_map = J.JobMap.load(results / "warm_kill" / "jobs.json")
    pids = {h[-1]["pid"] for h in job_map.runs.values() if h and h[-1].get("pid")}
    assert len(pids) == 1  # one slot, one worker
    wait_until(lambda: not J.process_alive(next(iter(pids))), 60, "the orphaned worker to exit", interval=0.2)
    out = embscale(["submit", str(sweep), "--executor", "local", "--cpu-jobs", "1", "--warm-workers"], env)
    assert out.returncode == 0, out.stderr
    assert set(run_states(results, "warm_kill").values()) == {"completed"}
    job_map = J.JobMap.load(results / "warm_kill" / "jobs.json")
    for run_id, history in job_map.runs.items():
        assert len([j for j in history if j.get("job_id")]) == 1, (run_id, history)
        steps = pd.read_parquet(results / "warm_kill" / run_id / "metrics.parquet")["step"].tolist()
        assert steps == list(range(1, 61))


# ------------------------------------------------------------------------------------------------- the switch
def test_warm_workers_switch(workspace, monkeypatch):
    with pytest.raises(ConfigError, match="executor.warm_workers"):
        sections.executor_options({"warm_workers": "yes"})
    assert sections.executor_options({"warm_workers": True})["warm_workers"] is True
    sweep = T.write_sweep(workspace["root"] / "switch.yaml",
                          T.sweep_mapping("switch", workspace["data"], extra={"executor": {"warm_workers": True}}))
    plan = load_plan(sweep, workspace["results"])
    monkeypatch.setenv("EMBSCALE_FAKE_GPUS", "0")
    messages: list[str] = []
    assert make_executor(plan, SubmitOptions(), None, messages.append, "x")[0].warm_workers is True
    assert make_executor(plan, SubmitOptions(warm_workers=False), None, messages.append, "x")[0].warm_workers is False
    # runs of several processes keep a process group each
    executor, _ = make_executor(plan, SubmitOptions(processes=2), None, messages.append, "x")
    assert executor.warm_workers is False
    assert messages == ["warm workers set aside: runs of 2 processes each keep a process group per run"]


def test_packed_benchmark_variants():
    """``--k`` of the packed-runs benchmark: ``w`` asks for warm workers, ``--warm`` adds a warm twin of each K."""
    from embscale.base.errors import UserError
    from embscale.bench.packed import parse_variants, variant_name

    assert parse_variants("9,3w, 1", 9, warm=False) == [(9, False), (3, True), (1, False)]
    assert parse_variants(None, 4, warm=True) == [(4, False), (4, True), (1, False), (1, True)]
    assert variant_name(3, True) == "3 (warm workers)" and variant_name(3, False) == "3"
    for bad in ("0", "x", "2ww"):
        with pytest.raises(UserError, match="--k"):
            parse_variants(bad, 4, warm=False)


def test_worker_protocol_and_leaked_files(tmp_path):
    """The worker alone, fed task lines on stdin: a result file per task (``success`` with the value, ``error``
    with the traceback for a call that raises or cannot be loaded, the worker going on), and a run that leaves a
    file open is reported in its log."""
    import functools

    import submitit

    from embscale.sweeps.executors.warm import job_paths, result_exit_code, run_ended

    target = tmp_path / "data.txt"
    target.write_text("x")
    calls = {"1.1": functools.partial(os.open, str(target), os.O_RDONLY),  # leaves a descriptor open
             "1.2": functools.partial(int, "not a number"),  # raises ValueError
             "1.3": functools.partial(os.open, str(target), os.O_RDONLY)}
    lines = []
    for job_id, call in calls.items():
        pickle = job_paths(tmp_path, job_id).submitted_pickle
        submitit.core.utils.cloudpickle_dump(call, pickle)
        lines.append(json.dumps({"job_id": job_id, "pickle": str(pickle)}))
    lines.insert(1, json.dumps({"job_id": "1.9", "pickle": str(tmp_path / "missing.pkl")}))  # cannot be loaded
    done = subprocess.run([sys.executable, "-m", "embscale.sweeps.executors.warm", str(tmp_path)],
                          input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert all(run_ended(tmp_path, job_id) for job_id in calls)
    assert [result_exit_code(tmp_path, job_id) for job_id in calls] == [0, 1, 0]
    assert result_exit_code(tmp_path, "1.9") == 1  # failed alone: the worker went on
    outcome, value = submitit.core.utils.pickle_load(job_paths(tmp_path, "1.2").result_pickle)
    assert outcome == "error" and "ValueError" in value
    assert "ValueError" in job_paths(tmp_path, "1.2").stderr.read_text()
    assert "run 4 of this process (job 1.3)" in job_paths(tmp_path, "1.3").stdout.read_text()
    assert "1 more open file descriptors after run 4 than after its first run" in done.stderr
    assert "after run 2" not in done.stderr and "after run 3" not in done.stderr  # they opened nothing


def test_process_state_is_put_back(tmp_path):
    """What a run may change in its process is put back between runs."""
    import torch

    state = ProcessState.take()
    before_threads, before_handler, before_cwd = torch.get_num_threads(), signal.getsignal(signal.SIGTERM), os.getcwd()
    handler = logging.StreamHandler()
    try:
        os.environ["EMBSCALE_WARM_TEST"] = "1"
        os.chdir(tmp_path)
        torch.set_num_threads(before_threads + 1)
        torch.set_default_dtype(torch.float64)
        signal.signal(signal.SIGTERM, lambda *a: None)
        logging.getLogger().addHandler(handler)
    finally:
        state.restore()
    assert "EMBSCALE_WARM_TEST" not in os.environ and os.getcwd() == before_cwd
    assert torch.get_num_threads() == before_threads and torch.get_default_dtype() == torch.float32
    assert signal.getsignal(signal.SIGTERM) == before_handler
    assert handler not in logging.getLogger().handlers


def test_a_warm_task_is_timed_from_its_clock_not_from_its_imports():
    """The worker arms the time-limit signal, then the run imports its modules and starts its own timer: the
    signal it gets must count as the time limit however long those imports took (else the run stopped as
    'interrupted' instead of restarting, whenever the imports were quick)."""
    import time

    from embscale.sweeps.runjob import RunJob

    job = RunJob("r", "/nonexistent", {}, executor="local", timeout_min=31 / 60, signal_delay_s=0.0)
    started = time.time()  # the run's own start, after its imports
    assert not job._timed_out(started)
    job.clock_started = started - 1.5  # the worker armed the 1 s signal 1.5 s ago
    assert job._timed_out(started)
