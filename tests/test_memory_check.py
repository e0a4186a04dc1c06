"""``python -m embscale.bench.memory_check`` (issue 15's memory table): on the CPU its smoke mode plans a point,
trains it in a fresh process through the runbook's rank entry and records it; a second call skips what is recorded;
bad points exit 2 with nothing written. The shipped sweep's default points plan with their estimates."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from embscale.bench import memory_check

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "embscale.bench.memory_check", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300, check=False)


def test_smoke_point_trains_records_and_resumes(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    first = run("--cpu-smoke", "--out", str(out), "--work", str(work), "--points", "ne:3:2")
    assert first.returncode == 0, first.stdout + first.stderr
    state = json.loads((out / "memory_check.json").read_text())
    point = state["points"]["ne_r3_b2"]
    assert point["state"] == "done" and point["exit_code"] == 0 and point["total"] > 0
    assert point["estimate"]["peak"] > point["estimate"]["first_step_peak"] > 0
    assert "| ne_r3_b2 |" in (out / "memory_check.md").read_text()
    again = run("--cpu-smoke", "--out", str(out), "--work", str(work), "--points", "ne:3:2")
    assert again.returncode == 0 and "done in an earlier call" in again.stdout
    log = work / "ne_r3_b2" / "log"
    assert "completed at step 3/3" in log.read_text()
    # a new --out with the same work folder: the point trains again, not finding the old run finished
    fresh = run("--cpu-smoke", "--out", str(tmp_path / "out2"), "--work", str(work), "--points", "ne:3:2")
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert "completed at step 3/3" in log.read_text() and "nothing to do" not in log.read_text()
    (out / "memory_check.json").write_text("{not json")
    broken = run("--cpu-smoke", "--out", str(out), "--work", str(work), "--points", "ne:3:2")
    assert broken.returncode == 2 and "memory_check.json: not a readable" in broken.stderr
    assert (out / "memory_check.json").read_text() == "{not json"  # left as it was


def test_bad_points_exit_2_and_write_nothing(tmp_path):
    result = run("--cpu-smoke", "--out", str(tmp_path / "out"), "--points", "moe:8,dense:3")
    assert result.returncode == 2
    assert "--points: 'dense:3' is not moe:RATIO or ne:RATIO:BASE_RATIO" in result.stderr
    assert not (tmp_path / "out").exists()


def test_the_default_points_of_paper_280m_plan(tmp_path):
    args = argparse.Namespace(cpu_smoke=False, sweep=str(ROOT / "sweeps" / "paper_280m.yaml"), steps=3)
    totals = []
    for family, ratio, base in memory_check.parse_points(memory_check.DEFAULT_POINTS):
        name = memory_check.point_name(family, ratio, base)
        config, estimate, total, _ = memory_check.planned(
            memory_check.point_sweep(args, family, ratio, base, memory_check.BUILTIN_DATA), tmp_path / name,
            tmp_path / "results")
        training = config["training"]
        assert training["parallel"] == "ddp" and training["steps"] == 3 and training["batch_tokens"] == 4 * 4096
        assert estimate["peak"] > estimate["first_step_peak"]
        totals.append(total)
    assert len(totals) == 6 and totals[:4] == sorted(totals[:4])  # the MoE ladder grows with its ratio
