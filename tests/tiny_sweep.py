"""A tiny corpus and tiny sweep files for the dispatch, Slurm and tune tests (real training, seconds per run), and
the reference curve of a run trained by several gloo processes under torchrun.

The corpus is text from a few modules of Python's standard library, written as JSON lines, with a separate
validation file (split ``code``, so runs log ``val_code_loss``). Sweep files get absolute paths, so jobs find
the corpus whatever their working folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]

MODULES = ("json", "textwrap", "string", "csv", "shlex", "fnmatch", "glob", "bisect", "heapq", "difflib")


def write_corpus(folder: Path) -> dict[str, str]:
    """Write ``train.jsonl`` and ``val.jsonl`` under ``folder``; returns the sweep's ``data`` section."""
    import importlib

    folder.mkdir(parents=True, exist_ok=True)
    documents = []
    for name in MODULES:
        path = Path(importlib.import_module(name).__file__)
        files = [path] if path.name != "__init__.py" else sorted(path.parent.glob("*.py"))
        documents += [f.read_text(errors="replace") for f in files]
    val = documents[-1:]
    train = documents[:-1]
    for file_name, docs in (("train.jsonl", train), ("val.jsonl", val)):
        with open(folder / file_name, "w") as handle:
            for doc in docs:
                handle.write(json.dumps({"text": doc}) + "\n")
    return {"corpus": str(folder / "train.jsonl"), "val_paths": {"code": str(folder / "val.jsonl")},
            "vocab_size": 256}


def sweep_mapping(name: str, data: dict[str, Any], *, steps: int = 8, seeds: int = 6,
                  widths: tuple[int, ...] = (16, 24), extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """``len(seeds) x len(widths)`` one-layer MoE runs of ``steps`` steps (64 tokens each)."""
    sweep = {
        "name": name,
        "model": {"vocab_size": 264, "width": widths[0], "depth": 1, "head_dim": 8, "dense_mult": 2.0,
                  "expert_mult": 1.0, "experts": 4, "top_k": 1, "max_seq_len": 32},
        "training": {"steps": steps, "batch_tokens": 64, "micro_batch_size": 4, "seq_len": 16, "lr": 3.0e-3,
                     "eval_every": 2, "eval_tokens": 64, "checkpoint_every": 2, "warmup_fraction": 0.0},
        "data": data,
        "grid": {"seed": list(range(seeds)), "width": list(widths)},
    }
    for key, value in (extra or {}).items():
        sweep[key] = value
    return sweep


def write_sweep(path: Path, mapping: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(mapping, sort_keys=False))
    return path


def job_environment(cache: Path, results: Path) -> dict[str, str]:
    """What the test's subprocesses (drivers and their jobs) need: a shared cache, quiet progress, CPU torch."""
    return {
        **os.environ,
        "EMBSCALE_CACHE": str(cache),
        "EMBSCALE_RESULTS": str(results),
        "EMBSCALE_PROGRESS": "plain",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def torchrun_curve(plan: Any, results: Path, processes: int = 2) -> pd.DataFrame:
    """The metrics of the one run of ``plan`` (a SweepPlan) trained by ``processes`` gloo processes under torchrun,
    outside any executor, with its results under ``results``."""
    from embscale.sweeps.plan import run_config_dict

    run = plan.runs[0]
    config = run_config_dict(run, plan)
    config["output"]["root"] = str(results)
    run_file = results / f"{run.run_id}.yaml"
    run_file.parent.mkdir(parents=True, exist_ok=True)
    run_file.write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={processes}", "-m", "embscale", "train", str(run_file)],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return pd.read_parquet(results / plan.name / run.run_id / "metrics.parquet")


def assert_same_curve(got: pd.DataFrame, expected: pd.DataFrame, steps: int) -> None:
    """The same steps and, to float rounding (rtol 1e-6: the same ranks reduce in the same order), the same
    training loss, gradient norm and validation loss."""
    assert got["step"].tolist() == list(range(1, steps + 1))
    for column in ("train_loss", "grad_norm", "val_code_loss"):
        np.testing.assert_allclose(got[column], expected[column], rtol=1e-6, err_msg=column)


def wait_until(condition, timeout: float, what: str, interval: float = 0.2):
    """``condition()``'s first truthy value, polled every ``interval`` seconds; AssertionError after
    ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@contextlib.contextmanager
def prepared_workspace(root: Path, extra_env: tuple[str, ...] = ()) -> Iterator[dict[str, Any]]:
    """A corpus under ``root`` with its tokenizer and shards already built (the jobs then all find them cached),
    and the environment for drivers and jobs, also set in this process (with the ``extra_env`` keys) until the
    block ends: ``{"root", "data", "env", "results"}``."""
    data = write_corpus(root / "corpus")
    env = job_environment(root / "cache", root / "results")
    env.pop("EMBSCALE_FAKE_GPUS", None)
    saved = dict(os.environ)
    os.environ.update({k: env[k] for k in ("EMBSCALE_CACHE", "EMBSCALE_RESULTS", "EMBSCALE_PROGRESS", *extra_env)})
    try:
        from embscale.training.config import DataConfig
        from embscale.training.data.shards import prepare_data

        prepare_data(DataConfig(**data))
        yield {"root": root, "data": data, "env": env, "results": root / "results"}
    finally:
        os.environ.clear()
        os.environ.update(saved)


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals ``(start, end)`` that overlap at one time."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    best = current = 0
    for _, delta in events:
        current += delta
        best = max(best, current)
    return best
