"""The multi-GPU runbook (``python -m embscale.bench.multigpu``, issue 19) run for real on the CPU: ``--cpu-smoke``
trains every unit with gloo ranks (world sizes 2 and 1) and tiny models through the harness's own paths
(torchrun + ``train_run``, ``embscale plan``, ``embscale submit --executor local`` with fake GPU ids), writes its
three files, and a second call (in place, or on a fresh ``--out`` restored from the first call's summary) runs
nothing again. On the CPU the speeds mean nothing, but the curves do: gloo ranks train the same curve as one
process to float tolerance, so the runbook's own comparisons must say so. Bad input exits 2 and writes nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from embscale.base.errors import UserError
from embscale.bench import multigpu

ROOT = Path(__file__).resolve().parents[1]
FILES = {multigpu.SUMMARY, multigpu.TABLES, multigpu.LOG}
UNITS = {"ddp_w1_a", "ddp_w1_b", "ddp_w2", "fsdp_moe_w2", "fsdp_ne_w2", "fsdp_moe_w1", "fsdp_ne_w1", "dcp_w2_to_w1",
         "queue_1gpu", "queue_2gpu"}
FLOAT_RTOL = 1e-4  # gloo ranks against one process: the same sums in another order (test_fsdp: 1e-5)


def smoke(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "EMBSCALE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    env.pop("EMBSCALE_FAKE_GPUS", None)
    return subprocess.run([sys.executable, "-m", "embscale.bench.multigpu", "--cpu-smoke", "--work",
                           str(tmp_path / "work"), *extra], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.parametrize("args, message", [
    (["--cpu-smoke", "--gpus", "4"], "world sizes 2 and 1"),
    (["--gpus", "3"], "must be one of 2, 4, 8"),
    (["--cpu-smoke", "--part", "1,5"], "--part must be 1, 2, 3"),
    (["--cpu-smoke", "--budget-s", "0"], "--budget-s must be positive"),
    (["--cpu-smoke", "--dcp-steps", "7"], "--dcp-steps must be even"),
    (["--cpu-smoke", "--restore", "missing.json"], "--restore: missing.json is not a file"),
    (["--sweep", "no_such_sweep.yaml", "--gpus", "2"], "--sweep: no_such_sweep.yaml is not a file"),
])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, args, message):
    out = tmp_path / "out"
    with pytest.raises(UserError, match=message):
        multigpu.main(["--out", str(out), "--work", str(tmp_path / "work"), *args])
    assert not out.exists() and not (tmp_path / "work").exists()


def test_bad_input_exits_2(tmp_path):
    found = smoke(tmp_path, "--out", str(tmp_path / "out"), "--part", "4")
    assert found.returncode == 2
    assert "--part must be 1, 2, 3" in found.stderr
    assert not (tmp_path / "out").exists()


def test_a_summary_of_another_machine_is_not_continued(tmp_path):
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"mode": "gpu", "gpus": 8, "units": {}}))
    with pytest.raises(UserError, match="written by a gpu call on 8 GPUs"):
        multigpu.main(["--cpu-smoke", "--out", str(tmp_path / "out"), "--restore", str(earlier)])
    assert not (tmp_path / "out").exists()


def test_curve_difference_against_the_bf16_bound():
    reference = [10.0, 8.0, 6.0]
    close = multigpu.curve_difference([10.01, 8.0, 6.0], reference, spread=0.0)
    assert close["within_bound"] and close["max_abs_diff"] == pytest.approx(0.01)
    assert close["bound_at_worst_step"] == pytest.approx(10.0 * 2 ** -7)
    far = multigpu.curve_difference([10.0, 8.5, 6.0], reference, spread=0.1)  # bound max(0.2, 8 x 2^-7)
    assert not far["within_bound"] and far["worst_step"] == 2
    assert multigpu.curve_difference([1.0], reference)["comparable"] is False


def test_queue_overlap_from_job_times():
    jobs = [{"run_id": "a", "state": "completed", "gpus": ["0"], "started_at": 0.0, "ended_at": 10.0},
            {"run_id": "b", "state": "completed", "gpus": ["1"], "started_at": 2.0, "ended_at": 6.0},
            {"run_id": "c", "state": "completed", "gpus": ["1"], "started_at": 6.0, "ended_at": 12.0}]
    found = multigpu.queue_overlap(jobs)
    assert found["most_at_once"] == 2 and found["completed"] == 3
    assert found["overlap_s"] == pytest.approx(8.0) and not found["shared_a_gpu_while_running"]
    jobs[2]["gpus"] = ["0"]
    assert multigpu.queue_overlap(jobs)["shared_a_gpu_while_running"]


def test_a_run_still_going_at_the_end_of_the_budget_is_stopped(tmp_path):
    """The runbook's process runner stops a whole process group (a command and what it started) once the
    call's budget is spent, and says so."""
    args = multigpu.parse_args(["--cpu-smoke", "--out", str(tmp_path / "out"), "--budget-s", "1"])
    multigpu.check_args(args)
    runbook = multigpu.Runbook(args, 2, tmp_path / "out", tmp_path, {"units": {}}, multigpu.Journal())
    child = tmp_path / "child.pid"
    script = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
              f"time.sleep(60)']); open({str(child)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    started = time.monotonic()
    code, timed_out = runbook.execute([sys.executable, "-c", script], dict(os.environ), tmp_path / "log")
    assert timed_out and code is not None and code != 0
    assert time.monotonic() - started < 30
    pid = int(child.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists() and \
            Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


@pytest.mark.slow  # about 25 training processes on gloo, a submit driver and its jobs (1-2 minutes on 2 cores)
def test_cpu_smoke_runs_every_part_and_a_second_call_runs_nothing(tmp_path):
    out = tmp_path / "out"
    # a budget too short for any unit: nothing starts, the call says what is left and exits 3
    short = smoke(tmp_path, "--out", str(out), "--part", "1", "--budget-s", "0.5")
    assert short.returncode == 3, short.stderr[-4000:]
    state = json.loads((out / multigpu.SUMMARY).read_text())
    assert state["units"] == {} and state["calls"][0]["units_left"] == ["ddp_w1_a", "ddp_w1_b", "ddp_w2"]
    assert {p.name for p in out.iterdir()} == FILES

    first = smoke(tmp_path, "--out", str(out))
    assert first.returncode == 0, first.stderr[-4000:]
    assert {p.name for p in out.iterdir()} == FILES
    state = json.loads((out / multigpu.SUMMARY).read_text())
    assert state["mode"] == "cpu-smoke" and state["gpus"] == 2
    assert {name for name, unit in state["units"].items() if unit["state"] == "done"} == UNITS
    results = state["results"]

    # 1. DDP: two gloo ranks train the one-process curve; one process twice is bitwise the same on the CPU
    assert results["one_gpu_spread"]["max_abs_diff"] == 0.0
    ddp = results["ddp"]["vs_one_gpu"]
    assert ddp["comparable"] and ddp["steps"] == 6 and ddp["max_rel_diff"] < FLOAT_RTOL and ddp["within_bound"]
    assert results["ddp"]["speedup"] > 0

    # 2. FSDP: both families at world sizes 1 and 2, against the plan; the ranks' peaks (none on the CPU)
    units = state["units"]
    for family in ("moe", "ne"):
        assert [e["world_size"] for e in results["fsdp"][family]] == [1, 2]
        assert results["fsdp"][family][1]["scaling_from"] == 1
        one, two = units[f"fsdp_{family}_w1"], units[f"fsdp_{family}_w2"]
        assert one["plan_memory"]["peak"] > 0 and two["plan_memory"]["shard"] == 2
        assert [r["rank"] for r in two["ranks"]] == [0, 1] and two["ranks"][0]["max_allocated"] is None
        assert one["loss"] == pytest.approx(two["loss"], rel=FLOAT_RTOL)  # fsdp on 2 ranks = one process
    ne_run = (tmp_path / "work" / "fsdp_ne_w2" / "run.yaml").read_text()
    assert "table_sharding: rows" in ne_run and "parallel: fsdp" in ne_run
    moe_run = (tmp_path / "work" / "fsdp_moe_w2" / "run.yaml").read_text()
    assert "table_optimizer" not in moe_run  # the sweep's table settings reach only models with N-gram tables

    # 3. DCP: written on 2 ranks (sharded), resumed on 1 from the middle, the same curve on
    dcp_unit = units["dcp_w2_to_w1"]
    assert dcp_unit["checkpoint_sharded"] and dcp_unit["resumed"]["resumed_from_step"] == 3
    dcp = results["dcp"]
    assert (dcp["written_on"], dcp["resumed_on"], dcp["checkpoint_step"]) == (2, 1, 3)
    assert dcp["kept_steps_equal"] and dcp["after_resume"]["steps"] == 3
    assert dcp["after_resume"]["max_rel_diff"] < FLOAT_RTOL and dcp["after_resume"]["within_bound"]

    # 4. the local queue: 4 one-GPU runs on 2 GPUs, two at a time on different GPUs; two-GPU runs one at a time
    queue = units["queue_1gpu"]
    assert queue["completed"] == 4 and queue["most_at_once"] == 2 and queue["overlap_s"] > 0
    assert all(len(job["gpus"]) == 1 for job in queue["jobs"]) and not queue["shared_a_gpu_while_running"]
    pairs = units["queue_2gpu"]
    assert pairs["completed"] == 2 and pairs["visible_gpus"] == 3 and pairs["most_at_once"] == 1
    assert all(len(set(job["gpus"])) == 2 for job in pairs["jobs"])
    assert results["queue"]["queue_2gpu"]["gpus_as_asked"]

    tables = (out / multigpu.TABLES).read_text()
    assert "### 1. DDP" in tables and "### 3. A sharded (DCP)" in tables and "| ne | 2 |" in tables

    # a second call finds every unit done and runs none; so does a fresh --out restored from the first summary
    walls = {name: unit["wall_s"] for name, unit in state["units"].items()}
    second = smoke(tmp_path, "--out", str(out))
    assert second.returncode == 0, second.stderr[-4000:]
    again = json.loads((out / multigpu.SUMMARY).read_text())
    assert len(again["calls"]) == 3 and again["calls"][2]["units_run"] == []
    assert {name: unit["wall_s"] for name, unit in again["units"].items()} == walls
    assert "queue_2gpu: done in an earlier call, skipped" in second.stderr
    restored = smoke(tmp_path, "--out", str(tmp_path / "fresh"), "--restore", str(out / multigpu.SUMMARY))
    assert restored.returncode == 0, restored.stderr[-4000:]
    assert {p.name for p in (tmp_path / "fresh").iterdir()} == FILES
    fresh = json.loads((tmp_path / "fresh" / multigpu.SUMMARY).read_text())
    assert len(fresh["calls"]) == 4 and fresh["calls"][3]["units_run"] == []
    assert (tmp_path / "fresh" / multigpu.LOG).read_text().startswith((out / multigpu.LOG).read_text())
