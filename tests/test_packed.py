"""Packed runs: ``runs_per_gpu`` in the local queue (several runs on one GPU, checked with a fake GPU on a CPU
machine) and its validation, the start-up phases each run records, the corpus fingerprint kept across runs, and
the packed-runs benchmark in its CPU mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
import tiny_sweep as T
import yaml

from embscale.base import rundir
from embscale.base.errors import ConfigError, UserError
from embscale.cli import main
from embscale.sweeps import sections
from embscale.sweeps.executors.base import Job, drive
from embscale.sweeps.executors.local import LocalExecutor, SlotPool, available_gpus
from embscale.sweeps.plan import load_plan
from embscale.sweeps.submit import SubmitOptions, make_executor
from embscale.training.data import corpus as C
from embscale.training.data import fingerprint_cache

ROOT = Path(__file__).resolve().parents[1]


max_overlap = T.max_overlap


# ------------------------------------------------------------------------------------------------- the pool
def test_slot_pool_packs_runs_per_gpu():
    pool = SlotPool(["0", "1"], cpu_jobs=1, runs_per_gpu=2)
    assert pool.capacity() == 4
    # least-loaded GPU first: the runs spread over the GPUs before any GPU gets a second one
    assert [pool.acquire(1) for _ in range(4)] == [["0"], ["1"], ["0"], ["1"]]
    assert pool.acquire(1) is None and not pool.can_acquire(1)
    pool.release(["1"])
    assert pool.free_gpus == [] and pool.acquire(1) == ["1"]
    assert pool.acquire(2) is None  # a two-GPU job needs two idle GPUs
    for gpu in ("0", "0", "1", "1"):
        pool.release([gpu])
    assert pool.free_gpus == ["0", "1"]
    assert pool.acquire(2) == ["0", "1"]
    assert pool.acquire(1) is None  # a job of several GPUs holds them alone
    pool.release(["0", "1"])
    assert pool.acquire(1) == ["0"]
    pool.take(["1"])  # an adopted job counts against its GPU
    assert pool.acquire(1) == ["0"] and pool.acquire(1) == ["1"] and pool.acquire(1) is None
    with pytest.raises(ValueError, match="runs_per_gpu"):
        SlotPool(["0"], cpu_jobs=1, runs_per_gpu=0)
    assert SlotPool([], cpu_jobs=2, runs_per_gpu=3).capacity() == 2  # CPU jobs: cpu_jobs decides


def _barrier_job(path: Path, parties: int) -> submitit.helpers.CommandFunction:
    """A job that records its start, waits until ``parties`` jobs have started (30 s at most), and records its
    end, its CUDA_VISIBLE_DEVICES and OMP_NUM_THREADS."""
    code = ("import json, os, sys, time; path, parties = sys.argv[1], int(sys.argv[2]); start = time.time(); "
            "open(path + '.starts', 'a').write('x\\n'); deadline = start + 30; "
            "[time.sleep(0.05) for _ in iter(lambda: len(open(path + '.starts').read().split()) < parties "
            "and time.time() < deadline, False)]; "
            "print(json.dumps([start, time.time(), os.environ['CUDA_VISIBLE_DEVICES'], "
            "os.environ.get('OMP_NUM_THREADS')]), file=open(path, 'a'))")
    return submitit.helpers.CommandFunction([sys.executable, "-c", code, str(path), str(parties)])


def test_three_runs_share_one_fake_gpu_and_a_fourth_waits(tmp_path, monkeypatch):
    """One (fake) GPU, runs_per_gpu 3: three jobs run on GPU 0 at once (each waits for the other two to have
    started), the fourth starts only when one of them has ended, and each gets a third of the cores."""
    monkeypatch.setenv("EMBSCALE_FAKE_GPUS", "1")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    log = tmp_path / "spans.txt"
    jobs = [Job(key=f"run{i}", fn=_barrier_job(log, 3), gpus=1) for i in range(4)]
    executor = LocalExecutor(tmp_path / "submitit", SlotPool(available_gpus(), 1, runs_per_gpu=3),
                             log=lambda message: None)
    assert executor.slots() == 3
    started, ended = {}, {}
    assert drive(executor, jobs, poll_s=0.05, on_start=lambda job, rec: started.__setitem__(job.key, rec),
                 on_end=lambda key, rec: ended.__setitem__(key, rec)) == []
    assert all(rec["exit_code"] == 0 for rec in ended.values()) and len(ended) == 4
    assert all(rec["gpus"] == ["0"] for rec in started.values())
    # the driver's view: the first three started together, the fourth after one of them ended
    first = [started[f"run{i}"]["started_at"] for i in range(3)]
    assert started["run3"]["started_at"] >= min(ended[f"run{i}"]["ended_at"] for i in range(3))
    assert max(first) < min(ended[f"run{i}"]["ended_at"] for i in range(3))
    # the jobs' own view: pinned to GPU 0, three at once at most and at least (the barrier let them go)
    spans = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(spans) == 4 and {devices for *_, devices, _ in spans} == {"0"}
    by_start = sorted(spans)
    assert all(end - start < 25 for start, end, *_ in by_start[:3]), "the three packed jobs never ran together"
    assert max_overlap([(start, end) for start, end, *_ in spans]) == 3
    assert by_start[3][0] >= min(end for _, end, *_ in by_start[:3])
    assert {threads for *_, threads in spans} == {str(max(1, len(os.sched_getaffinity(0)) // 3))}


# ------------------------------------------------------------------------------------------------- validation
def test_runs_per_gpu_is_validated(tmp_path, monkeypatch, capsys):
    for bad in (0, -1, "2", True, 1.5):
        with pytest.raises(ConfigError, match="executor.runs_per_gpu"):
            sections.executor_options({"runs_per_gpu": bad})
    with pytest.raises(ConfigError, match="executor.runs_per_gpu.*gpus_per_run 2"):
        sections.executor_options({"runs_per_gpu": 2, "gpus_per_run": 2})
    assert sections.executor_options({"runs_per_gpu": 4})["runs_per_gpu"] == 4

    data = T.write_corpus(tmp_path / "corpus")
    bad = T.write_sweep(tmp_path / "bad.yaml", T.sweep_mapping("bad", data, extra={"executor": {"runs_per_gpu": 0}}))
    assert main(["plan", str(bad)]) == 2
    assert "executor.runs_per_gpu" in capsys.readouterr().err

    sweep = T.write_sweep(tmp_path / "packed.yaml",
                          T.sweep_mapping("packed", data, extra={"executor": {"runs_per_gpu": 3}}))
    plan = load_plan(sweep, tmp_path / "results")
    messages: list[str] = []
    monkeypatch.setenv("EMBSCALE_FAKE_GPUS", "2")
    executor, gpus = make_executor(plan, SubmitOptions(), None, messages.append, "x")
    assert gpus == 1 and executor.pool.runs_per_gpu == 3 and executor.slots() == 6
    executor, _ = make_executor(plan, SubmitOptions(runs_per_gpu=1), None, messages.append, "x")
    assert executor.pool.runs_per_gpu == 1  # the command line wins
    with pytest.raises(UserError, match="--runs-per-gpu.*gpus_per_run 2"):
        make_executor(plan, SubmitOptions(runs_per_gpu=2, gpus_per_run=2), None, messages.append, "x")
    # without GPUs the sweep's value is set aside (the same file serves a CPU machine); a flag is an error
    monkeypatch.setenv("EMBSCALE_FAKE_GPUS", "0")
    executor, gpus = make_executor(plan, SubmitOptions(cpu_jobs=2), None, messages.append, "x")
    assert gpus == 0 and executor.pool.runs_per_gpu == 1 and executor.slots() == 2
    assert messages == ["executor.runs_per_gpu 3 set aside: the runs get no GPU"]
    with pytest.raises(UserError, match="--runs-per-gpu 2: packing needs runs of one GPU each"):
        make_executor(plan, SubmitOptions(runs_per_gpu=2), None, messages.append, "x")
    assert main(["submit", str(sweep), "--runs-per-gpu", "0", "--results", str(tmp_path / "results")]) == 2
    assert "--runs-per-gpu must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "results" / "packed").exists()


# ------------------------------------------------------------------------------------------------- start-up
def test_process_started_at_reads_this_process_start():
    before = time.time()
    code = ("import time; from embscale.training.trainer import process_started_at; "
            "print(process_started_at(), time.time())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    started, now = float(out[0]), float(out[1])
    # 10 ms ticks; the child started after `before` and before it imported torch and printed
    assert before - 0.05 <= started <= now
    assert now - started > 0.1  # importing the trainer (torch) takes time, and it counts


def test_a_run_records_its_startup_phases(tmp_path, monkeypatch, capsys):
    from embscale.training.config import RunConfig
    from embscale.training.trainer import train_run

    monkeypatch.setenv("EMBSCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EMBSCALE_PROGRESS", "plain")
    data = T.write_corpus(tmp_path / "corpus")
    sweep = T.sweep_mapping("startup", data, steps=2)
    config = {"model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "dense_hidden": 32,
                        "max_seq_len": 32},
              "training": {**sweep["training"], "device": "cpu"}, "data": data,
              "output": {"root": str(tmp_path / "results"), "sweep": "startup"}}
    run_cfg = RunConfig.from_dict(config)
    summary = train_run(run_cfg)
    startup = rundir.read_run_record(Path(summary["run_dir"]))["startup"]
    assert startup["since"] == "train_run call" and startup["imports_s"] == 0
    phases = [startup[f"{p}_s"] for p in ("imports", "data", "model", "first_step")]
    assert all(p >= 0 for p in phases) and startup["first_step_s"] > 0
    assert startup["total_s"] == pytest.approx(sum(phases), abs=0.01)
    assert f"[{run_cfg.run_id}] start-up {startup['total_s']:.2f}s since train_run call" in capsys.readouterr().err

    # from the process's start: the imports count, and the run's other keys stay
    other = RunConfig.from_dict({**config, "output": {**config["output"], "sweep": "startup2"}})
    began = time.time() - 5.0
    summary = train_run(other, started_at=began)
    record = rundir.read_run_record(Path(summary["run_dir"]))
    assert record["startup"]["since"] == "process start" and record["startup"]["imports_s"] >= 5.0
    assert record["startup"]["origin"] == pytest.approx(began, abs=0.01)
    assert {"identity", "corpus", "accounting"} <= set(record)


# ------------------------------------------------------------------------------------------------- fingerprints
def test_corpus_fingerprint_is_kept_until_a_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBSCALE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(5):
        (folder / f"doc{i}.txt").write_text(f"document {i} " * 50)
    # just written: within the window where a file could change again unseen, nothing is kept
    first = C.UserCorpus(str(folder))
    assert not (tmp_path / "cache" / "fingerprints").exists()
    monkeypatch.setattr(fingerprint_cache, "RECENT_CHANGE_S", 0.0)
    assert C.UserCorpus(str(folder)).id == first.id
    entries = list((tmp_path / "cache" / "fingerprints").iterdir())
    assert len(entries) == 1
    # the next open reads the kept fingerprint (marked here), not the files
    stored = json.loads(entries[0].read_text())
    stored["fingerprint"]["content_sha256"] = "kept"
    entries[0].write_text(json.dumps(stored))
    assert C.UserCorpus(str(folder)).fingerprint["content_sha256"] == "kept"
    # a file rewritten to the same size with its modification time put back is still seen: new corpus id
    target = folder / "doc3.txt"
    before = target.stat()
    target.write_text(target.read_text().replace("document", "DOCUMENT"))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert target.stat().st_size == before.st_size and target.stat().st_mtime_ns == before.st_mtime_ns
    changed = C.UserCorpus(str(folder))
    assert changed.fingerprint["content_sha256"] not in ("kept", first.fingerprint["content_sha256"])
    assert changed.fingerprint == {**first.fingerprint, "content_sha256": changed.fingerprint["content_sha256"]}
    assert changed.id != first.id


def test_builtin_corpus_lists_the_same_sources_without_walking_site_packages(tmp_path):
    for relative in ("a.py", "pkg/b.py", "pkg/sub/c.py", "pkg/notes.txt", "site-packages/x/d.py",
                     "dist-packages/e.py", "pkg/__pycache__/b.cpython-311.py", "deep/site-packages/f.py",
                     ".hidden/g.py"):
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x = 1\n")
    (tmp_path / "folder.py").mkdir()
    excluded = {"site-packages", "dist-packages", "__pycache__"}
    expected = sorted((p.relative_to(tmp_path).as_posix(), p) for p in tmp_path.rglob("*.py")
                      if p.is_file() and not excluded.intersection(p.relative_to(tmp_path).parts))
    assert C._python_sources(tmp_path) == expected
    assert [rel for rel, _ in expected] == [".hidden/g.py", "a.py", "pkg/b.py", "pkg/sub/c.py"]


# ------------------------------------------------------------------------------------------------- the benchmark
@pytest.mark.slow
def test_packed_benchmark_tiny(tmp_path):
    """The benchmark's CPU mode: a two-run sweep with both runs on one (fake) GPU, then one at a time; a report
    with each run's start-up phases and the end-to-end times."""
    env = T.job_environment(tmp_path / "cache", tmp_path / "results")
    env.pop("EMBSCALE_FAKE_GPUS", None)
    out = subprocess.run([sys.executable, "-m", "embscale.bench.packed", "--tiny", "--work", str(tmp_path / "work"),
                          "--out", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((tmp_path / "out" / "packed.json").read_text())
    assert report["runs"] == 2 and [v["runs_per_gpu"] for v in report["variants"]] == [2, 1]
    for variant in report["variants"]:
        runs = variant["runs"]
        assert variant["completed"] == 2 and not variant["timed_out"] and variant["wall_s"] > 0
        assert all(r["state"] == "completed" and r["gpus"] == "0" for r in runs)
        for run in runs:
            startup = run["startup"]
            assert startup["since"] == "process start" and startup["imports_s"] > 0
            assert 0 <= run["launch_s"] < 30 and startup["total_s"] < run["job_s"]
        spans = [(r["started_at"], r["ended_at"]) for r in runs]
        assert max_overlap(spans) == variant["runs_per_gpu"]
        folder = tmp_path / "work" / f"k{variant['runs_per_gpu']}"
        assert yaml.safe_load((folder / "sweep.yaml").read_text())["executor"] == {
            "type": "local", "runs_per_gpu": variant["runs_per_gpu"]}
        # the runs' checkpoints go once the runs are read (they would fill the device's disk over the variants)
        run_dirs = [p for p in (folder / "results" / "packed_tiny").iterdir() if (p / "run.json").is_file()]
        assert len(run_dirs) == 2 and not list(folder.glob("results/packed_tiny/*/checkpoints"))
    logs = list((tmp_path / "work" / "k2" / "results" / "packed_tiny" / "submitit").glob("*_0_log.err"))
    assert len(logs) == 2 and all("start-up" in path.read_text() for path in logs)
    text = (tmp_path / "out" / "packed.md").read_text()
    assert text.strip() in out.stdout
    assert "| runs_per_gpu | end to end s |" in text and "imports s" in text and "| median |" in text
    assert "speed-up vs K=1" in text and "1.00x" in text


def test_packed_benchmark_takes_the_named_corpora(tmp_path):
    from embscale.bench.packed import corpus_section

    for name in ("site", "system"):
        assert corpus_section(name, tmp_path, 8192, 1) == {"corpus": name, "vocab_size": 8192}
    with pytest.raises(UserError, match="'site', 'system' or 'installed'"):
        corpus_section(str(tmp_path / "missing"), tmp_path, 8192, 1)


def test_packed_benchmark_bad_input_exits_2_and_makes_nothing(tmp_path):
    for flags, named in ((["--corpus", str(tmp_path / "missing")], "--corpus"),
                         (["--sweep", str(tmp_path / "missing.yaml")], "--sweep")):
        work = tmp_path / "work"
        result = subprocess.run([sys.executable, "-m", "embscale.bench.packed", *flags, "--work", str(work)],
                                capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 2 and f"embscale.bench.packed: error: {named}" in result.stderr
        assert not work.exists()
