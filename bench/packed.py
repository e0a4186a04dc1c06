"""Packed runs: a small sweep end to end on one GPU with ``runs_per_gpu`` 1 and K, and every run's start-up.

::

    python -m embscale.bench.packed                      # fig2_small on one GPU, K = all its runs, then K = 1
    python -m embscale.bench.packed --k 9,3,1 --corpus /data/text.jsonl --out report/
    python -m embscale.bench.packed --tiny               # seconds on a CPU: a tiny sweep on a tiny corpus
    python -m embscale.bench.packed --k 9,9w,1,1w        # "w": the same K with warm workers (one process per slot)
    python -m embscale.bench.packed --prepare-only --work /tmp/packed   # the corpus alone, in a call of its own

What it does, in one call (``--deadline-s``, default 560 s, bounds the whole; a sweep still running then is
cancelled and reported as such):

1. the corpus: ``--corpus PATH`` (a folder of text files, JSONL or Parquet), ``site`` where the data layer has that
   corpus, ``system`` (the data layer's largest corpus needing no download: 217.6M training tokens on the H200
   image), or by default (``auto``) ``site`` if it exists and otherwise ``installed``: the source files of the
   standard library and the installed packages (Python, C/C++/CUDA, docs) written once as one JSONL file. Its
   tokenizer and shards are built before anything is timed, and its training tokens are reported (the fig2_small
   sweep wants 100M or more so that no run repeats its data);
2. one process imports torch and touches the GPU, so every variant starts with the same warm page cache (not with
   ``--tiny``);
3. for each K of ``--k`` (default: all the sweep's runs at once, then 1): ``embscale submit`` of the sweep with
   ``executor: {type: local, runs_per_gpu: K}`` into a results folder of its own and with compile caches of its
   own (each variant compiles from cold unless ``--shared-compile-cache``), timed from launch to exit, with
   ``nvidia-smi`` sampled for GPU utilisation and memory. A K written ``Kw`` (or every K, with ``--warm``, as a
   second variant) adds ``warm_workers: true``: each of the K slots per GPU is one process that trains its runs
   one after another, so a worker's later runs skip imports, CUDA context creation and kernel builds;
4. a markdown table per variant (each run's launch latency, start-up phases from its run.json ``startup``, training
   and job time) and a summary (end to end, speed-up over K=1), printed as each variant ends and written with the
   raw numbers to ``--out`` (``packed.md``, ``packed.json``).

``--tiny`` runs a two-run sweep (``--tiny-runs`` N: N runs) of tiny models on a small corpus, with one fake GPU
(``EMBSCALE_FAKE_GPUS``) where there is none, so the whole path is exercised on a CPU in seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import site
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from embscale.base.errors import ConfigError, UserError, exit_with
from embscale.base.files import atomic_file, atomic_write_json, atomic_write_text

# The fig2_small probe: 6.3M-activated LongCat-Flash shortcut models, an MoE ladder at ratios 2-16 and N-gram
# Embedding anchored at ratios 2 and 4, 400 steps of 65,536 tokens (26M tokens) each: 9 runs.
FIG2_SMALL: dict[str, Any] = {
    "name": "fig2_small",
    "description": "small Fig. 2 on one GPU (MoE ladder vs NE at base ratios 2 and 4)",
    "model": {"vocab_size": 8192, "width": 256, "depth": 2, "layer_type": "shortcut", "attention": "mha",
              "head_dim": 64, "dense_hidden": 768, "expert_size": 256, "experts": 8, "top_k": 2,
              "max_seq_len": 512},
    "ngram": {"n": 3, "k": 2, "sizing": "paper", "amplification": "sqrt_d"},
    "training": {"tokens": 26214400, "batch_tokens": 65536, "seq_len": 512, "micro_batch_size": 128,
                 "lr": 3.0e-3, "schedule": "cosine", "warmup_fraction": 0.05, "eval_every": 50,
                 "eval_tokens": 262144, "checkpoint_every": 0},
    "data": {"corpus": "builtin", "vocab_size": 8192},
    "grid": {"family": ["moe", "ne"], "ratio": [2, 4, 8, 16], "base_ratio": [2, 4]},
}
# --tiny: two one-layer MoE runs of a few steps on a corpus of a few standard-library modules.
TINY: dict[str, Any] = {
    "name": "packed_tiny",
    "model": {"vocab_size": 264, "width": 16, "depth": 1, "head_dim": 8, "dense_mult": 2.0, "expert_mult": 1.0,
              "experts": 4, "top_k": 1, "max_seq_len": 32},
    "training": {"steps": 3, "batch_tokens": 64, "micro_batch_size": 4, "seq_len": 16, "lr": 3.0e-3,
                 "eval_every": 3, "eval_tokens": 64, "checkpoint_every": 0, "warmup_fraction": 0.0},
    "grid": {"seed": [0, 1]},
}
TINY_MODULES = ("json", "textwrap", "string", "csv", "shlex", "fnmatch", "glob", "bisect", "heapq", "difflib")
SOURCE_SUFFIXES = (".py", ".pyi", ".pyx", ".pxd", ".c", ".h", ".cc", ".cpp", ".hpp", ".cu", ".cuh", ".md", ".rst",
                   ".txt")
MAX_SOURCE_FILE_BYTES = 4 << 20  # larger files are generated tables, not text
REFERENCE_WALL_S = 340.0  # fig2_small, one run per GPU at a time, on one H200, before packing and start-up cuts
WANTED_TOKENS = 100_000_000


def log(message: str) -> None:
    print(f"[packed {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------- corpus
def write_tiny_corpus(folder: Path) -> dict[str, Any]:
    """A few standard-library modules as JSONL, with a validation file; the ``data`` section of a sweep."""
    import importlib

    documents = []
    for name in TINY_MODULES:
        path = Path(importlib.import_module(name).__file__)
        files = [path] if path.name != "__init__.py" else sorted(path.parent.glob("*.py"))
        documents += [f.read_text(errors="replace") for f in files]
    for file_name, docs in (("train.jsonl", documents[:-1]), ("val.jsonl", documents[-1:])):
        target = folder / file_name
        if not target.is_file():
            with atomic_file(target) as tmp, open(tmp, "w") as handle:
                for doc in docs:
                    handle.write(json.dumps({"text": doc}) + "\n")
    return {"corpus": str(folder / "train.jsonl"), "val_paths": {"code": str(folder / "val.jsonl")},
            "vocab_size": 256}


def source_roots() -> list[Path]:
    """The standard library and every installed-packages folder, each once."""
    paths = [sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
             *site.getsitepackages()]
    roots: list[Path] = []
    for path in paths:
        real = Path(path).resolve()
        if real.is_dir() and real not in roots:
            roots.append(real)
    return roots


def write_installed_sources(target: Path, max_bytes: int) -> dict[str, int]:
    """The text source files (:data:`SOURCE_SUFFIXES`) of :func:`source_roots`, in sorted order and each file
    once, as JSONL records ``{"text", "path"}`` in ``target``, up to ``max_bytes``; returns files and bytes."""
    seen: set[Path] = set()
    files = written = 0
    with atomic_file(target) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for root in source_roots():
            for folder, subfolders, names in os.walk(root):
                subfolders[:] = sorted(name for name in subfolders if name != "__pycache__")
                for name in sorted(names):
                    path = Path(folder, name)
                    if not name.endswith(SOURCE_SUFFIXES) or written >= max_bytes:
                        continue
                    real = path.resolve()
                    try:
                        size = real.stat().st_size
                        if real in seen or not 0 < size <= MAX_SOURCE_FILE_BYTES:
                            continue
                        raw = real.read_bytes()
                    except OSError:
                        continue
                    seen.add(real)
                    if b"\0" in raw[:8192]:
                        continue
                    handle.write(json.dumps({"text": raw.decode("utf-8", errors="replace"), "path": str(real)})
                                 + "\n")
                    files += 1
                    written += size
    return {"files": files, "bytes": written}


def site_corpus_available() -> bool:
    """Whether the data layer knows ``corpus: site`` (the installed packages' sources)."""
    from embscale.training.config import DataConfig
    from embscale.training.data.corpus import open_corpus

    if Path("site").exists():
        return False  # a folder of that name would be taken for a path
    try:
        open_corpus(DataConfig(corpus="site"))
    except (ConfigError, UserError):
        return False
    return True


def corpus_section(choice: str, work: Path, vocab_size: int, max_bytes: int) -> dict[str, Any]:
    """The sweep's ``data`` section for ``--corpus``."""
    if choice == "auto":
        choice = "site" if site_corpus_available() else "installed"
    if choice in ("site", "system"):  # the data layer's named corpora (system: the largest, no download)
        return {"corpus": choice, "vocab_size": vocab_size}
    if choice == "installed":
        target = work / "corpus" / "installed_sources.jsonl"
        if not target.is_file():
            started = time.monotonic()
            found = write_installed_sources(target, max_bytes)
            log(f"wrote {found['files']:,} source files ({found['bytes'] / 1e6:.0f} MB) of {len(source_roots())} "
                f"folders to {target} in {time.monotonic() - started:.0f}s")
        return {"corpus": str(target), "format": "jsonl", "vocab_size": vocab_size}
    path = Path(choice).expanduser()
    if not path.exists():
        raise UserError(f"--corpus: {path} does not exist (give a folder of text files, JSONL or Parquet, "
                        "'site', 'system' or 'installed')")
    return {"corpus": str(path.resolve()), "vocab_size": vocab_size}


def prepare_corpus(data: dict[str, Any]) -> dict[str, Any]:
    """Build (or find cached) the tokenizer and shards once, before anything is timed; their sizes."""
    from embscale.training.config import DataConfig
    from embscale.training.data.shards import prepare_data

    started = time.monotonic()
    tokenizer, shards = prepare_data(DataConfig(**data))
    return {"train_tokens": shards.train.n_tokens, "train_documents": shards.train.n_documents,
            "val_tokens": {name: shard.n_tokens for name, shard in shards.val.items()},
            "vocab_size": tokenizer.vocab_size, "corpus_id": shards.corpus_id,
            "prepare_s": round(time.monotonic() - started, 1)}


# ----------------------------------------------------------------------------------------------------- a variant
class GpuSampler:
    """``nvidia-smi`` sampled every second while a variant runs: mean utilisation and peak memory of GPU 0."""

    def __init__(self, path: Path):
        self.path = path
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            with open(self.path, "w") as out:
                self.process = subprocess.Popen(
                    ["nvidia-smi", "--id=0", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                     "-lms", "1000"], stdout=out, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.process is not None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=5)

    def summary(self) -> dict[str, float | None]:
        samples = []
        with contextlib.suppress(OSError):
            for line in self.path.read_text().splitlines():
                parts = [p.strip() for p in line.split(",")]
                with contextlib.suppress(ValueError, IndexError):
                    samples.append((float(parts[0]), float(parts[1])))
        if not samples:
            return {"gpu_util_mean": None, "gpu_mem_peak_gib": None}
        return {"gpu_util_mean": round(statistics.fmean(s[0] for s in samples), 1),
                "gpu_mem_peak_gib": round(max(s[1] for s in samples) / 1024, 1)}


def parse_variants(text: str | None, n_runs: int, warm: bool) -> list[tuple[int, bool]]:
    """``--k`` (``9,3w,1``: K, and ``w`` for warm workers) as (K, warm) pairs; ``--warm`` adds a warm twin of
    each plain K."""
    variants: list[tuple[int, bool]] = []
    for item in (text.split(",") if text else [str(n_runs), "1"]):
        item = item.strip().lower()
        is_warm = item.endswith("w")
        try:
            k = int(item[:-1] if is_warm else item)
        except ValueError:
            raise UserError(f"--k: {item!r} is not a number of runs per GPU (e.g. 9 or 9w)") from None
        if k < 1:
            raise UserError(f"--k: every value must be at least 1, got {text}")
        variants.append((k, is_warm))
        if warm and not is_warm:
            variants.append((k, True))
    return variants


def variant_name(k: int, warm: bool) -> str:
    return f"{k} (warm workers)" if warm else str(k)


def run_variant(sweep: dict[str, Any], k: int, work: Path, env: dict[str, str], timeout_s: float,
                shared_compile_cache: bool, warm: bool = False) -> dict[str, Any]:
    """``embscale submit`` of ``sweep`` with ``runs_per_gpu`` ``k`` (and warm workers when ``warm``) into a results
    folder of its own, timed; the runs' checkpoints are removed once the runs are read."""
    folder = work / (f"k{k}w" if warm else f"k{k}")
    folder.mkdir(parents=True, exist_ok=True)
    sweep_file = folder / "sweep.yaml"
    executor = {"type": "local", "runs_per_gpu": k, **({"warm_workers": True} if warm else {})}
    atomic_write_text(sweep_file, yaml.safe_dump({**sweep, "executor": executor}, sort_keys=False))
    results = folder / "results"
    env = dict(env)
    if not shared_compile_cache:
        env["TRITON_CACHE_DIR"] = str(folder / "compile" / "triton")
        env["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "compile" / "inductor")
    command = [sys.executable, "-m", "embscale", "submit", str(sweep_file), "--executor", "local",
               "--results", str(results)]
    log(f"runs_per_gpu {variant_name(k, warm)}: {' '.join(command[1:])}")
    timed_out = False
    with open(folder / "driver.log", "w") as driver_log, GpuSampler(folder / "gpu.csv") as sampler:
        started = time.monotonic()
        driver = subprocess.Popen(command, env=env, stdout=driver_log, stderr=subprocess.STDOUT)
        try:
            exit_code = driver.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            timed_out = True
            driver.terminate()
            exit_code = driver.wait()
            subprocess.run([sys.executable, "-m", "embscale", "cancel", str(sweep_file), "--results", str(results)],
                           env=env, capture_output=True, timeout=120, check=False)
        wall = time.monotonic() - started
    runs = gather_runs(results / str(sweep["name"]))
    # each run's final checkpoint was written inside the timed runs; kept, the variants' checkpoints (about a GB
    # per large run) would pile up on the device's 64 GiB disk
    for checkpoints in (results / str(sweep["name"])).glob("*/checkpoints"):
        shutil.rmtree(checkpoints, ignore_errors=True)
    variant = {"runs_per_gpu": k, "warm_workers": warm, "wall_s": round(wall, 1), "exit_code": exit_code,
               "timed_out": timed_out, "runs": runs, "completed": sum(r["state"] == "completed" for r in runs),
               **sampler.summary()}
    if exit_code != 0 and not timed_out:
        variant["driver_log_tail"] = (folder / "driver.log").read_text()[-3000:]
    return variant


def gather_runs(sweep_dir: Path) -> list[dict[str, Any]]:
    """Each run's place, state, start-up phases (run.json ``startup``), training time and job times."""
    from embscale.base import rundir
    from embscale.sweeps.executors.jobmap import JOBS_FILE, JobMap

    job_map = JobMap.load(sweep_dir / JOBS_FILE) if (sweep_dir / JOBS_FILE).is_file() else None
    rows = []
    for run_dir in sorted(p for p in sweep_dir.iterdir() if rundir.is_run_dir(p)) if sweep_dir.is_dir() else []:
        record = rundir.read_run_record(run_dir) or {}
        status = rundir.read_status(run_dir) or {}
        job = (job_map.latest(run_dir.name) if job_map else None) or {}
        startup = record.get("startup") or {}
        point = record.get("point") or {}
        row = {"run_id": run_dir.name, "family": record.get("family"),
               "point": ",".join(f"{k}={v}" for k, v in point.items() if k != "family"),
               "state": status.get("state", "pending"), "gpus": ",".join(job.get("gpus") or []),
               "train_s": (status.get("summary") or {}).get("wall_s"),
               "job_s": (job["ended_at"] - job["started_at"]) if job.get("ended_at") and job.get("started_at")
               else None,
               # a warm worker's first run: its process starts just after the driver's mark, and the start time has
               # 10 ms ticks, so a few milliseconds below 0 are rounding
               "launch_s": max(0.0, startup["origin"] - job["started_at"])
               if startup.get("since") in ("process start", "warm worker task") and job.get("started_at") else None,
               "started_at": job.get("started_at"), "ended_at": job.get("ended_at"), "startup": startup,
               "worker_run": job.get("worker_run")}
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------- report
PHASES = ("imports", "data", "model", "first_step")


def _cell(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def variant_table(variant: dict[str, Any], sweep_name: str) -> str:
    """A variant's runs as a markdown table, with the median of each timing."""
    runs = variant["runs"]
    state = "timed out (cancelled)" if variant["timed_out"] else f"exit code {variant['exit_code']}"
    name = variant_name(variant["runs_per_gpu"], bool(variant.get("warm_workers")))
    lines = [f"### {sweep_name}, runs_per_gpu {name}: {variant['wall_s']:.1f} s end to end "
             f"({variant['completed']}/{len(runs)} runs completed, {state})", ""]
    header = ["run", "family", "point", "GPU", "worker run", "launch s",
              *[f"{p.replace('_', ' ')} s" for p in PHASES], "start-up s", "train s", "job s", "state"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    columns: dict[str, list[float]] = {}
    for run in runs:
        startup = run["startup"]
        values = {"launch s": run["launch_s"], **{f"{p.replace('_', ' ')} s": startup.get(f"{p}_s") for p in PHASES},
                  "start-up s": startup.get("total_s"), "train s": run["train_s"], "job s": run["job_s"]}
        for key, value in values.items():
            if isinstance(value, (int, float)):
                columns.setdefault(key, []).append(float(value))
        lines.append("| " + " | ".join([run["run_id"], _cell(run["family"]), run["point"] or "-", run["gpus"] or "-",
                                        _cell(run.get("worker_run")),
                                        *[_cell(None if v is None else float(v), 2) for v in values.values()],
                                        run["state"]]) + " |")
    medians = [_cell(statistics.median(columns[key]), 2) if columns.get(key) else "-"
               for key in header[5:-1]]
    lines.append("| median | | | | | " + " | ".join(medians) + " | |")
    extra = []
    if variant.get("gpu_util_mean") is not None:
        extra.append(f"GPU 0 utilisation {variant['gpu_util_mean']:.0f}% on average (nvidia-smi, 1 s samples), "
                     f"memory peak {variant['gpu_mem_peak_gib']:.1f} GiB")
    if variant.get("driver_log_tail"):
        extra.append("driver log (tail):\n\n```\n" + variant["driver_log_tail"] + "\n```")
    return "\n".join(lines + [""] + extra) + "\n"


def summary_table(variants: list[dict[str, Any]], reference_s: float | None) -> str:
    """End to end per K, the speed-up over K=1 (when measured) and over the reference wall time."""
    base = next((v["wall_s"] for v in variants if v["runs_per_gpu"] == 1 and not v.get("warm_workers")
                 and not v["timed_out"]), None)
    header = ["runs_per_gpu", "end to end s", "runs completed", "speed-up vs K=1",
              f"speed-up vs {reference_s:.0f} s" if reference_s else "reference", "median start-up s",
              "median job s", "GPU util %", "GPU mem peak GiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for v in variants:
        startups = [r["startup"]["total_s"] for r in v["runs"] if r["startup"].get("total_s") is not None]
        jobs = [r["job_s"] for r in v["runs"] if r["job_s"] is not None]
        wall = f"{v['wall_s']:.1f}" + (" (timed out)" if v["timed_out"] else "")
        lines.append("| " + " | ".join([
            variant_name(v["runs_per_gpu"], bool(v.get("warm_workers"))), wall, f"{v['completed']}/{len(v['runs'])}",
            f"{base / v['wall_s']:.2f}x" if base and not v["timed_out"] else "-",
            f"{reference_s / v['wall_s']:.2f}x" if reference_s and not v["timed_out"] else "-",
            _cell(statistics.median(startups), 2) if startups else "-",
            _cell(statistics.median(jobs), 1) if jobs else "-",
            _cell(v.get("gpu_util_mean"), 0), _cell(v.get("gpu_mem_peak_gib"), 1)]) + " |")
    return "\n".join(lines) + "\n"


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "cpus": len(os.sched_getaffinity(0)),
                            "host": platform.node()}
    with contextlib.suppress(Exception):
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info


# ----------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m embscale.bench.packed", description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny sweep on a tiny corpus (CPU, seconds)")
    parser.add_argument("--corpus", default=None,
                        help="auto (default), site, system, installed, or a path (folder of text files, JSONL, "
                             "Parquet)")
    parser.add_argument("--corpus-mb", type=float, default=500.0,
                        help="most text taken for --corpus installed, in MB (default 500)")
    parser.add_argument("--sweep", default=None,
                        help="a sweep file instead of fig2_small (its data is replaced; extends is not followed)")
    parser.add_argument("--prepare-only", action="store_true",
                        help="build the corpus, tokenizer and shards (in --work and the cache) and stop")
    parser.add_argument("--k", default=None,
                        help="comma list of runs_per_gpu values, run in this order (default: all runs, then 1); "
                             "a value ending in w (9w) runs with warm workers")
    parser.add_argument("--warm", action="store_true", help="after each plain K of --k, the same K with warm workers")
    parser.add_argument("--tiny-runs", type=int, default=2, help="--tiny: runs of the tiny sweep (default 2)")
    parser.add_argument("--out", default=None, help="folder for packed.md and packed.json")
    parser.add_argument("--work", default=None, help="folder for the corpus, sweeps and results (default: temp)")
    parser.add_argument("--deadline-s", type=float, default=560.0,
                        help="the whole call's time budget; a sweep still running then is cancelled")
    parser.add_argument("--reference-s", type=float, default=REFERENCE_WALL_S,
                        help=f"an earlier end-to-end time to compare with (default {REFERENCE_WALL_S:.0f}; 0: none)")
    parser.add_argument("--shared-compile-cache", action="store_true",
                        help="let every variant use the same kernel caches (default: each compiles from cold)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    # bad input is refused before anything is made
    if args.sweep and not args.tiny and not Path(args.sweep).is_file():
        raise UserError(f"--sweep: {args.sweep} is not a file")
    if args.corpus not in (None, "auto", "site", "system", "installed") and not Path(args.corpus).expanduser().exists():
        corpus_section(args.corpus, Path(), 0, 0)  # raises, naming --corpus
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="embscale-packed-"))
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out) if args.out else None
    env = {**os.environ, "EMBSCALE_PROGRESS": "plain"}
    if args.tiny:
        sweep = json.loads(json.dumps(TINY))
        sweep["grid"]["seed"] = list(range(max(1, args.tiny_runs)))
        data = write_tiny_corpus(work / "corpus")
        if not shutil.which("nvidia-smi"):
            env["EMBSCALE_FAKE_GPUS"] = "1"  # the packing path on a CPU machine: every run on "GPU 0"
    else:
        if args.sweep:
            from embscale.base.datafile import read_yaml

            sweep = read_yaml(args.sweep, "sweep file")
        else:
            sweep = json.loads(json.dumps(FIG2_SMALL))
        sweep.pop("executor", None)
        vocab = int((sweep.get("data") or {}).get("vocab_size", 8192))
        data = corpus_section(args.corpus or "auto", work, vocab, int(args.corpus_mb * 1e6))
    sweep["data"] = data
    corpus = prepare_corpus(data)
    log(f"corpus {data['corpus']}: {corpus['train_tokens']:,} training tokens, vocabulary {corpus['vocab_size']} "
        f"(prepared in {corpus['prepare_s']}s)")
    if not args.tiny and corpus["train_tokens"] < WANTED_TOKENS:
        log(f"note: fewer than {WANTED_TOKENS:,} training tokens; runs of the sweep repeat data")
    if args.prepare_only:
        return 0

    from embscale.sweeps.plan import load_plan

    sweep_file = work / "plan.yaml"
    atomic_write_text(sweep_file, yaml.safe_dump(sweep, sort_keys=False))
    n_runs = len(load_plan(sweep_file, work / "plan-results").runs)
    ks = parse_variants(args.k, n_runs, args.warm)
    if not args.tiny:
        warm = ("import torch, embscale.training.trainer; "
                "torch.zeros(1, device='cuda') if torch.cuda.is_available() else None")
        subprocess.run([sys.executable, "-c", warm], env=env, check=True, timeout=300)

    reference_s = None if args.tiny else (args.reference_s or None)
    report: dict[str, Any] = {"machine": machine(), "sweep": sweep["name"], "runs": n_runs, "corpus": corpus,
                              "data": data, "variants": []}
    sections: list[str] = []

    def write_report() -> str:
        text = (f"## Packed runs: {sweep['name']} ({n_runs} runs) on {report['machine'].get('gpu') or 'CPU'}\n\n"
                f"Corpus {data['corpus']}: {corpus['train_tokens']:,} training tokens. Machine: "
                f"{json.dumps(report['machine'])}.\n\n" + summary_table(report["variants"], reference_s)
                + "\n" + "\n".join(sections))
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "packed.md", text)
            atomic_write_json(out / "packed.json", report)
        return text

    for k, warm in ks:
        left = args.deadline_s - (time.monotonic() - started)
        if left < 20:
            log(f"runs_per_gpu {variant_name(k, warm)}: skipped, {left:.0f}s left of --deadline-s "
                f"{args.deadline_s:.0f}")
            continue
        variant = run_variant(sweep, k, work, env, left - 10, args.shared_compile_cache, warm)
        report["variants"].append(variant)
        sections.append(variant_table(variant, str(sweep["name"])))
        print(sections[-1], file=sys.stderr, flush=True)  # as it ends; the whole report goes to stdout last
        write_report()
    print(write_report(), flush=True)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    done = [v for v in report["variants"] if not v["timed_out"] and v["completed"] == len(v["runs"])]
    return 0 if len(done) == len(ks) else 1


if __name__ == "__main__":
    exit_with(main, "embscale.bench.packed")
