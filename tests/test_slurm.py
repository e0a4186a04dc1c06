"""Dispatch through a real one-node Slurm cluster (installed with apt and started by the fixture): a sweep as a
job array, a running job requeued with ``scontrol requeue`` that resumes from its checkpoint and ends on the
uninterrupted loss curve (one task, and two tasks: the gloo ranks of one run), a run of two tasks on one node and
one of two nodes (a second cluster of two Slurm nodes on this machine) equal to the same run under torchrun, and a
cancelled sweep."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pandas as pd
import pytest
import tiny_sweep as T
import yaml
from slurm_cluster import ClusterUnavailable, SlurmCluster, ensure_installed

from embscale.base import rundir
from embscale.cli import main
from embscale.sweeps.executors import jobmap as J
from embscale.sweeps.executors.slurm import squeue_states
from embscale.sweeps.plan import SweepPlan, load_plan

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Install (if needed) and start a one-node cluster; stop it by process id afterwards."""
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root (to install slurm and munge with apt and run slurmd)")
    try:
        spent = ensure_installed()
    except ClusterUnavailable as exc:
        pytest.skip(f"no local Slurm: {exc}")
    if spent:
        print(f"installed slurm and munge in {spent:.1f}s")
    root = tmp_path_factory.mktemp("slurm")
    data = T.write_corpus(root / "corpus")
    env = T.job_environment(root / "cache", root / "results")
    cluster = SlurmCluster(root / "cluster")
    saved = dict(os.environ)
    os.environ.update({k: env[k] for k in ("EMBSCALE_CACHE", "EMBSCALE_RESULTS", "EMBSCALE_PROGRESS",
                                           "OMP_NUM_THREADS")})
    os.environ.pop("EMBSCALE_FAKE_GPUS", None)
    try:
        cluster.start()
        os.environ.update(cluster.env)
        from embscale.training.config import DataConfig
        from embscale.training.data.shards import prepare_data

        prepare_data(DataConfig(**data))
        yield {"cluster": cluster, "root": root, "data": data, "results": root / "results"}
    finally:
        cluster.stop()
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
def torchrun_reference(cluster):
    """The curve of a sweep's one run under torchrun with two processes, trained once per run id (the two-task and
    the two-node sweeps differ only in their slurm sections: one run)."""
    curves: dict[str, pd.DataFrame] = {}

    def curve(plan: SweepPlan) -> pd.DataFrame:
        run_id = str(plan.runs[0].run_id)
        if run_id not in curves:
            curves[run_id] = T.torchrun_curve(plan, cluster["root"] / "torchrun")
        return curves[run_id]

    return curve


def wait_until(condition, timeout: float, what: str, cluster: SlurmCluster, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    queue = cluster.run("squeue", "-h", "-r", "-o", "%i %T %r", check=False).stdout
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; squeue:\n{queue}\n{cluster.logs(10)}")


def two_rank_sweep(cluster: dict, name: str, slurm: dict, steps: int) -> Path:
    """One run of ``steps`` steps whose 128-token batch is one micro-batch of 4 x 16 tokens on each of 2 ranks.
    Such sweeps share their run ids, so they are submitted with ``--no-reuse``: each trains on Slurm itself."""
    mapping = T.sweep_mapping(name, cluster["data"], steps=steps, seeds=1, widths=(16,),
                              extra={"slurm": {"time": 10, **slurm}})
    mapping["training"]["batch_tokens"] = 128
    return T.write_sweep(cluster["root"] / f"{name}.yaml", mapping)


def task_logs(plan: SweepPlan, tasks: int) -> tuple[str, list[str]]:
    """The Slurm job id of the plan's one run and each task's log."""
    record = J.JobMap.load(plan.job_map_path).latest(plan.runs[0].run_id)
    folder, job_id = Path(record["folder"]), str(record["job_id"])
    return job_id, [(folder / f"{job_id}_{task}_log.out").read_text() + (folder / f"{job_id}_{task}_log.err")
                    .read_text() for task in range(tasks)]


def status_of(sweep: Path, capsys) -> dict:
    capsys.readouterr()
    assert main(["status", str(sweep), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_sweep_as_job_array(cluster, capsys):
    sweep = T.write_sweep(cluster["root"] / "slurm_array.yaml",
                          T.sweep_mapping("slurm_array", cluster["data"], steps=4, seeds=2,
                                          extra={"slurm": {"array_parallelism": 2, "time": 10}}))
    code = main(["submit", str(sweep), "--executor", "slurm", "--no-reuse", "--wait", "--poll-s", "0.5",
                 "--sbatch", "comment=embscale-test"])
    assert code == 0, capsys.readouterr().err
    assert status_of(sweep, capsys)["counts"] == {"completed": 4}
    job_map = J.JobMap.load(cluster["results"] / "slurm_array" / "jobs.json")
    job_ids = sorted(h[-1]["job_id"] for h in job_map.runs.values())
    arrays = {j.split("_")[0] for j in job_ids}
    assert len(arrays) == 1 and sorted(j.split("_")[1] for j in job_ids) == ["0", "1", "2", "3"]
    array_id = next(iter(arrays))
    script = (cluster["results"] / "slurm_array" / "submitit" / f"{array_id}_submission.sh").read_text()
    assert "#SBATCH --array=0-3%2" in script and "#SBATCH --comment=embscale-test" in script
    assert "export PYTHONPATH=" in script and str(cluster["results"] / "slurm_array" / "code") in script
    # Submitting again submits nothing: the status files say every run is done.
    capsys.readouterr()
    assert main(["submit", str(sweep), "--executor", "slurm", "--no-reuse"]) == 0
    assert "0 to run, 4 completed" in capsys.readouterr().err


def test_two_tasks_on_one_node_match_torchrun(cluster, capsys, torchrun_reference):
    """``slurm.tasks_per_node: 2`` without GPUs: one job of two tasks, each a gloo rank set up from submitit's
    TorchDistributedEnvironment; rank 0 alone writes; the curve is torchrun's with two processes."""
    sweep = two_rank_sweep(cluster, "slurm_tasks", {"tasks_per_node": 2}, steps=6)
    assert main(["submit", str(sweep), "--executor", "slurm", "--no-reuse", "--wait", "--poll-s", "0.5"]) == 0
    plan = load_plan(sweep)
    run_dir = plan.run_dir(plan.runs[0])
    assert rundir.run_state(run_dir) == "completed"
    assert rundir.read_run_record(run_dir)["world_size"] == 2
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "metrics.parquet", "run.json",
                                                          "status.json"]
    job_id, logs = task_logs(plan, 2)
    script = (plan.sweep_dir / "submitit" / f"{job_id}_submission.sh").read_text()
    assert "#SBATCH --nodes=1" in script and "#SBATCH --ntasks-per-node=2" in script
    for task, log in enumerate(logs):
        assert f"global_rank={task}(2)" in log and f"; rank {task}\n" in log
    T.assert_same_curve(pd.read_parquet(run_dir / "metrics.parquet"), torchrun_reference(plan), steps=6)


def test_two_nodes_one_task_each_match_torchrun(cluster, capsys, monkeypatch, torchrun_reference):
    """``slurm: {nodes: 2, tasks_per_node: 1}`` on a second cluster that splits this machine into two Slurm nodes:
    one task on each node, the same curve as torchrun's two processes."""
    two = SlurmCluster(cluster["root"] / "two_nodes", nodes=2)
    try:
        try:
            two.start()
        except ClusterUnavailable as exc:
            pytest.skip(f"two slurmd on one machine: {exc}")
        monkeypatch.setenv("SLURM_CONF", two.env["SLURM_CONF"])
        sweep = two_rank_sweep(cluster, "slurm_nodes", {"nodes": 2, "tasks_per_node": 1}, steps=6)
        assert main(["submit", str(sweep), "--executor", "slurm", "--no-reuse", "--wait", "--poll-s", "0.5"]) == 0
        plan = load_plan(sweep)
        job_id, logs = task_logs(plan, 2)
        assert f"NodeList={two.nodename},{two.nodename}2" in two.run("scontrol", "show", "job", job_id).stdout
    finally:
        two.stop()
    run_dir = plan.run_dir(plan.runs[0])
    assert rundir.run_state(run_dir) == "completed"
    assert rundir.read_run_record(run_dir)["world_size"] == 2
    for task, log in enumerate(logs):  # node i of 2, rank i of 2, one task per node
        assert f"local_rank=0(1), node={task}(2), global_rank={task}(2)" in log
    T.assert_same_curve(pd.read_parquet(run_dir / "metrics.parquet"), torchrun_reference(plan), steps=6)


@pytest.mark.parametrize("tasks", [1, 2])
def test_requeued_job_resumes_on_the_same_curve(cluster, capsys, tmp_path, tasks):
    """``scontrol requeue`` of a running job: every task checkpoints and stops, Slurm starts every task again, the
    run resumes from the checkpoint and ends on the uninterrupted curve (one task: this process's; two tasks:
    torchrun's two processes)."""
    name = f"slurm_requeue_{tasks}"
    if tasks == 1:
        mapping = T.sweep_mapping(name, cluster["data"], steps=40, seeds=1, widths=(16,),
                                  extra={"slurm": {"time": 10}})
        sweep = T.write_sweep(cluster["root"] / f"{name}.yaml", mapping)
    else:
        sweep = two_rank_sweep(cluster, name, {"tasks_per_node": tasks}, steps=40)
    mapping = yaml.safe_load(sweep.read_text())
    mapping["training"]["checkpoint_every"] = 5
    mapping["training"]["eval_every"] = 10
    sweep = T.write_sweep(sweep, mapping)
    assert main(["submit", str(sweep), "--executor", "slurm", "--no-reuse"]) == 0
    plan = load_plan(sweep)
    run_dir = plan.run_dir(plan.runs[0])
    job_id = J.JobMap.load(plan.job_map_path).latest(plan.runs[0].run_id)["job_id"]
    slurm = cluster["cluster"]

    def training_past_a_checkpoint():
        status = rundir.read_status(run_dir) or {}
        return status.get("state") == "running" and (status.get("step") or 0) >= 7

    wait_until(training_past_a_checkpoint, 120, "the run to pass step 7", slurm, interval=0.1)
    slurm.run("scontrol", "requeue", job_id)
    wait_until(lambda: (rundir.read_status(run_dir) or {}).get("state") == "interrupted", 60,
               "the trainer to checkpoint and stop", slurm)
    interrupted_at = rundir.read_status(run_dir)["step"]
    assert 7 <= interrupted_at < 40
    assert status_of(sweep, capsys)["runs"][0]["state"] == "queued"  # interrupted, but requeued in Slurm
    # A requeued job waits ~2 minutes (its BeginTime) before it may start again: let it start now.
    wait_until(lambda: "PENDING BeginTime" in slurm.run("squeue", "-h", "-r", "-o", "%T %r", "-j",
                                                         job_id.split("_")[0]).stdout,
               60, "the job to be pending again", slurm)
    slurm.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    wait_until(lambda: (rundir.read_status(run_dir) or {}).get("state") == "completed", 180,
               "the requeued run to complete", slurm)
    restarts = slurm.run("scontrol", "show", "job", job_id).stdout
    assert "Restarts=1" in restarts
    assert rundir.read_run_record(run_dir)["world_size"] == tasks

    resumed = pd.read_parquet(run_dir / "metrics.parquet")
    assert resumed["step"].tolist() == list(range(1, 41))
    _, logs = task_logs(plan, tasks)
    assert "resuming run" in logs[0] and "from step" in logs[0]
    for task, log in enumerate(logs):  # every task started twice: before and after the requeue
        assert log.count(f"global_rank={task}({tasks})") == 2

    if tasks == 1:  # the same run uninterrupted, in this process (debug executor), elsewhere
        capsys.readouterr()
        assert main(["submit", str(sweep), "--executor", "debug", "--results", str(tmp_path)]) == 0
        straight = pd.read_parquet(tmp_path / name / plan.runs[0].run_id / "metrics.parquet")
    else:
        straight = T.torchrun_curve(plan, tmp_path, processes=tasks)
    T.assert_same_curve(resumed, straight, steps=40)


def test_cancel_slurm_sweep(cluster, capsys):
    sweep = T.write_sweep(cluster["root"] / "slurm_cancel.yaml",
                          T.sweep_mapping("slurm_cancel", cluster["data"], steps=5000, seeds=2, widths=(16,),
                                          extra={"slurm": {"time": 10}}))
    assert main(["submit", str(sweep), "--executor", "slurm", "--no-reuse"]) == 0
    plan = load_plan(sweep)
    slurm = cluster["cluster"]
    wait_until(lambda: any((rundir.read_status(plan.run_dir(r)) or {}).get("state") == "running" for r in plan.runs),
               120, "a running run", slurm)
    capsys.readouterr()
    assert main(["cancel", str(sweep)]) == 0
    assert sorted(capsys.readouterr().out.split()) == sorted(r.run_id for r in plan.runs)
    job_ids = [J.JobMap.load(plan.job_map_path).latest(r.run_id)["job_id"] for r in plan.runs]
    assert squeue_states(job_ids) == {}
    assert status_of(sweep, capsys)["counts"] == {"cancelled": 2}
