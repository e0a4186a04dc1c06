"""Multi-GPU runbook (issue 19): DDP, FSDP, a resharded DCP resume and the local queue on one host of G GPUs.

::

    python -m embscale.bench.multigpu --out DIR                # every part on this machine's G GPUs (2, 4 or 8)
    python -m embscale.bench.multigpu --part 2 --out DIR --budget-s 500
    python -m embscale.bench.multigpu --cpu-smoke --out DIR    # a minute or two on a CPU: gloo, tiny models, G = 2

Everything runs through the harness's own code paths: each run is ``embscale train``'s ``train_run`` on ranks
started by ``torchrun`` (one process per GPU, ``CUDA_VISIBLE_DEVICES`` holding the GPUs it may use; a one-rank
run is one plain process), the FSDP model is chosen by ``embscale plan``, and the queue measurement is
``embscale submit --executor local``. The rank entry point (``python -m embscale.bench.multigpu train-rank
RUN.yaml``) is ``embscale train`` plus one thing the trainer's metrics lack: it writes each rank's
``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` (the whole process: model build, steps and the final
evaluation) after the run. The FSDP throughput runs train with ``training.keep_checkpoints: 0`` (no checkpoint):
the final checkpoint of a 13B-parameter run is about 160 GB of disk (more than a 2-GPU machine has) and minutes
of writing.

The measurements, in three parts (``--part 1``, ``2``, ``3``, a comma list, or ``all``), in this order:

1. **DDP** of ``sweeps/runs/bench_moe_gpu.yaml`` (the benchmark MoE, 40 steps of 64k tokens, seed 0) on 1 GPU
   twice and on 2 GPUs (same global batch and seed): the 2-GPU loss curve against the first 1-GPU curve (max
   absolute and relative difference over the steps) within a bf16-noise bound: per step the larger of twice the
   largest difference between the two 1-GPU runs (the GPU's own nondeterminism) and bf16's machine epsilon
   (2^-7) times the loss; tokens/s (median over the steps after the first 5) of 2 GPUs over 1 (goal >= 1.8x).
2. **FSDP** of the largest ``sweeps/paper_280m.yaml`` MoE point that fits the smallest world size measured, by
   ``embscale plan --gpu-memory 141GiB --gpus-per-node W --json`` (ratio 45, 13.25B parameters, where it fits),
   and of its matched NE model (base ratio 12 where it fits, else the largest base that does) with the N-gram
   tables row-sharded (the sweep's ``parallel: fsdp``, ``table_optimizer: dense``, ``table_sharding: rows``), at
   W = 8, 4, 2 (those up to G): a short run (``--fsdp-steps``, default 8; a global batch of one micro-batch of
   4 x 4096 per GPU of the largest W, so the same batch at every W; the built-in corpus), each rank's peak memory
   against the plan's estimate for that run at that W, tokens/s, tokens/s per GPU and the trainer's MFU column
   (per GPU), and the scaling efficiency per doubling of W (tokens/s ratio over GPU ratio; goal >= 90%).
3. **A sharded checkpoint resharded**: the benchmark NE model (``bench_ne_gpu.yaml``) under ``fsdp`` with
   row-sharded tables trained on G GPUs for ``--dcp-steps`` (default 20) with a DCP checkpoint half way; a copy
   of the run folder (hard links) with only that checkpoint, marked interrupted, resumed on G/2 GPUs to the end;
   its steps after the checkpoint against the uninterrupted run's, within the noise bound of part 1 (bf16's
   epsilon times the loss where part 1 has not run). Then **the local queue**: ``embscale submit --executor
   local`` of a 4-run sweep (the benchmark MoE, 20 steps, seeds 0-3) with 2 GPUs visible, so at most one job per
   GPU runs at a time, and of a 2-run sweep with ``gpus_per_run: 2`` with 3 GPUs visible (2 where G is 2), so the
   second run waits for two free GPUs; from the job map, each job's GPUs (its ``CUDA_VISIBLE_DEVICES``), start
   and end, the most jobs running at once, the seconds two or more ran together, and whether two running jobs
   ever held the same GPU.

Each part is a list of units (one or a few runs each). ``--out`` holds what comes back, three files:
``multigpu.json`` (every unit's state, numbers, loss curves and per-rank peaks; the comparisons; each call),
``multigpu.md`` (the tables, a fragment for BENCHMARKS.md) and ``multigpu.log``. A call skips the units that
``--out`` (or ``--restore FILE``, an earlier call's ``multigpu.json``, with its ``multigpu.log`` beside it)
records as done, so work that ran out of ``--budget-s`` (default 500 s: no unit starts that is not expected to end
inside it, and a unit still running at the budget's end is stopped and left for the next call) continues where it
stopped; failed units are tried again only with ``--retry-failed``. Run folders, checkpoints and logs go to
``--work`` (default ``/tmp/embscale-multigpu``). Exit codes: 0 every unit of the chosen parts done, 1 a unit
failed, 2 bad input (nothing written), 3 units left for another call. NCCL and multicast settings
(``NCCL_NVLS_ENABLE=0`` and the others) reach the ranks as the machine sets them; nothing here changes them.

On a device machine (the ``run`` tool, kind ``nvidia-h200-x8``, ``-x4`` or ``-x2``; the wheels the image lacks
fetched once, here, by ``../shared/tools/device-wheels.sh`` into the ignored ``.whl/``), with
``carry: [".whl", ".multigpu"]`` and ``timeout_s: 600``, the same command each call until it exits 0 or 1::

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \\
    && export PYTHONPATH=/tmp/site:$PYTHONPATH PIP_NO_INDEX=1 PIP_FIND_LINKS=$PWD/.whl \\
    && python3 -m pip install -q --no-deps --no-build-isolation -e . \\
    && PYTHONUNBUFFERED=1 python3 -m embscale.bench.multigpu --out $OUT --budget-s 500 \\
       $( [ -f .multigpu/multigpu.json ] && echo --restore .multigpu/multigpu.json )

and after each call, here: copy the returned ``multigpu.json`` and ``multigpu.log`` into ``.multigpu/`` (once:
``mkdir .multigpu && echo /.multigpu/ >> .git/info/exclude``). ``--cpu-smoke`` runs every part on the CPU with
gloo ranks, tiny models and a corpus of a few standard-library modules, world sizes 2 and 1 (G = 2), with fake
GPU ids for the queue (``EMBSCALE_FAKE_GPUS``): the control flow, the files and the resumption, not the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from embscale.base.errors import ConfigError, UserError, exit_with
from embscale.base.files import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("1", "2", "3")
GPU_COUNTS = (2, 4, 8)
BF16_EPS = 2.0 ** -7  # bf16 machine epsilon: 7 stored mantissa bits
DDP_GOAL = 1.8
SCALING_GOAL = 0.9
FSDP_GPU_MEMORY = "141GiB"
DEFAULT_WORK = "/tmp/embscale-multigpu"
SUMMARY, TABLES, LOG = "multigpu.json", "multigpu.md", "multigpu.log"
WARMUP_STEPS = 5  # steps left out of a tokens/s median (compilation, caches), fewer for short runs
LOG_TAIL = 4000

# The benchmark MoE (bench_moe_gpu.yaml's model) in sweep-file terms, for the queue's sweeps.
BENCH_MOE_SWEEP_MODEL: dict[str, Any] = {
    "vocab_size": 32768, "width": 1024, "depth": 3, "heads": 8, "layer_type": "shortcut", "attention": "mha",
    "dense_hidden": 1536, "experts": 64, "zero_expert_ratio": 0.5, "expert_size": 512, "top_k": 8,
    "routed_scaling_factor": 1.0, "max_seq_len": 1024}
BENCH_QUEUE_TRAINING: dict[str, Any] = {
    "steps": 20, "batch_tokens": 65536, "micro_batch_size": 16, "seq_len": 1024, "lr": 1.0e-3,
    "schedule": "cosine", "warmup_fraction": 0.1, "eval_every": 0, "eval_tokens": 65536, "checkpoint_every": 0}
BUILTIN_DATA: dict[str, Any] = {"corpus": "builtin", "vocab_size": 32768}

# --cpu-smoke: tiny models on a corpus of a few standard-library modules (bench.packed's), gloo ranks.
SMOKE_MOE = {"d_model": 32, "n_layers": 2, "n_heads": 2, "n_experts": 4, "top_k": 2, "expert_hidden": 32,
             "n_shared_experts": 1, "max_seq_len": 64}
SMOKE_NE = {"d_model": 32, "n_layers": 2, "n_heads": 2, "dense_hidden": 64, "max_seq_len": 64,
            "ngram": {"n": 3, "k": 2, "ratio": 1.0}}
SMOKE_TRAINING = {"steps": 6, "batch_tokens": 512, "micro_batch_size": 4, "seq_len": 32, "lr": 1e-2,
                  "eval_every": 0, "eval_tokens": 512, "checkpoint_every": 0, "device": "cpu", "seed": 0,
                  "warmup_fraction": 0.0}
SMOKE_SWEEP_MODEL = {"vocab_size": 264, "width": 16, "depth": 1, "head_dim": 8, "dense_mult": 2.0,
                     "expert_mult": 1.0, "experts": 4, "top_k": 1, "max_seq_len": 32}
SMOKE_SWEEP_TRAINING = {"steps": 3, "batch_tokens": 64, "micro_batch_size": 2, "seq_len": 16, "lr": 3.0e-3,
                        "eval_every": 0, "eval_tokens": 64, "checkpoint_every": 0, "warmup_fraction": 0.0}
SMOKE_FSDP_SWEEP: dict[str, Any] = {
    "name": "multigpu_fsdp",
    "model": {**SMOKE_SWEEP_MODEL, "experts": 4, "top_k": 2, "zero_expert_ratio": 0.5},
    "ngram": {"n": 3, "k": 2, "sizing": "paper"},
    "training": {"steps": 4, "batch_tokens": 64, "micro_batch_size": 2, "seq_len": 16, "lr": 3.0e-3,
                 "eval_every": 0, "eval_tokens": 64, "checkpoint_every": 0, "warmup_fraction": 0.0,
                 "parallel": "fsdp", "table_optimizer": "dense", "table_sharding": "rows"},
    "grid": {"family": ["moe", "ne"], "ratio": [2, 3], "base_ratio": [2]},
}


# ----------------------------------------------------------------------------------------------------- helpers
class Journal:
    """The runbook's log: lines on stderr, kept for ``multigpu.log`` (earlier calls' lines first)."""

    def __init__(self, earlier: str = ""):
        self.lines = earlier.splitlines()

    def __call__(self, message: str) -> None:
        line = f"[multigpu {time.strftime('%Y-%m-%d %H:%M:%S')}] {message}"
        print(line, file=sys.stderr, flush=True)
        self.lines.append(line)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def finite(value: Any) -> Any:
    """``value`` with NaN and infinities (and numpy scalars) turned into JSON-friendly values."""
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        with contextlib.suppress(Exception):
            value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def median_after_warmup(values: list[float | None]) -> float | None:
    """The median of ``values`` after the first :data:`WARMUP_STEPS` (fewer in short runs), NaN/None left out."""
    skip = min(WARMUP_STEPS, len(values) // 2)
    kept = [v for v in values[skip:] if v is not None and math.isfinite(v)]
    return statistics.median(kept) if kept else None


def curve_difference(curve: list[float | None], reference: list[float | None], spread: float | None = None,
                     first_step: int = 1) -> dict[str, Any]:
    """Largest absolute and relative loss difference of ``curve`` against ``reference`` (from ``first_step``, one
    based), and whether every step lies within the bf16-noise bound: the larger of twice ``spread`` (the largest
    difference between two runs that should be equal, None where unknown) and :data:`BF16_EPS` times the loss."""
    pairs = [(a, b) for a, b in zip(curve[first_step - 1:], reference[first_step - 1:], strict=False)
             if a is not None and b is not None]
    if not pairs or len(curve) != len(reference):
        return {"steps": len(pairs), "comparable": False,
                "why": f"curves of {len(curve)} and {len(reference)} steps"}
    abs_diff = [abs(a - b) for a, b in pairs]
    rel_diff = [abs(a - b) / max(abs(b), 1e-12) for a, b in pairs]
    bounds = [max(2.0 * (spread or 0.0), BF16_EPS * abs(b)) for _, b in pairs]
    worst = max(range(len(pairs)), key=lambda i: abs_diff[i] / bounds[i] if bounds[i] else math.inf)
    return {"steps": len(pairs), "comparable": True, "first_step": first_step,
            "max_abs_diff": max(abs_diff), "max_rel_diff": max(rel_diff),
            "bound_at_worst_step": bounds[worst], "worst_step": first_step + worst,
            "spread_used": spread, "within_bound": all(d <= b for d, b in zip(abs_diff, bounds, strict=True))}


def machine_info() -> dict[str, Any]:
    """Host, Python, torch, the GPUs (from ``nvidia-smi``: this process creates no CUDA context, which would take
    memory on GPU 0 from the ranks) and the NCCL multicast settings the ranks inherit."""
    info: dict[str, Any] = {"host": platform.node(), "python": platform.python_version(),
                            "cpus": len(os.sched_getaffinity(0))}
    with contextlib.suppress(Exception):
        import torch

        info["torch"] = torch.__version__
        info["gpus"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with contextlib.suppress(Exception):
        found = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30, check=False)
        if found.returncode == 0 and found.stdout.strip():
            info["nvidia_smi"] = found.stdout.strip().splitlines()
            info["gpu"] = info["nvidia_smi"][0].split(",")[0].strip()
    info["env"] = {k: os.environ[k] for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                              "NVSHMEM_DISABLE_NVLS", "CUDA_VISIBLE_DEVICES") if k in os.environ}
    return info


def detect_gpus() -> int:
    """GPUs this process sees (torch's count, which creates no CUDA context; 0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def tail(path: Path, size: int = LOG_TAIL) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-size:]
    return ""


# ----------------------------------------------------------------------------------------------------- rank entry
def train_rank(argv: list[str]) -> int:
    """``embscale train RUN.yaml --results DIR`` on this rank, then its peak CUDA memory to ``--peak-dir``."""
    parser = argparse.ArgumentParser(prog="python -m embscale.bench.multigpu train-rank")
    parser.add_argument("run_file")
    parser.add_argument("--results", required=True)
    parser.add_argument("--peak-dir", required=True)
    args = parser.parse_args(argv)
    import torch

    from embscale.training import trainer
    from embscale.training.config import RunConfig

    run_cfg = RunConfig.from_yaml(args.run_file).replace(output={"root": args.results})
    summary = trainer.train_run(run_cfg, resume=True, started_at=trainer.process_started_at())
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    peak: dict[str, Any] = {"rank": rank, "local_rank": local_rank, "state": summary["state"],
                            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        peak.update(device=torch.cuda.get_device_name(device),
                    max_allocated=torch.cuda.max_memory_allocated(device),
                    max_reserved=torch.cuda.max_memory_reserved(device))
    else:
        peak.update(device="cpu", max_allocated=None, max_reserved=None)
    folder = Path(args.peak_dir)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / f"rank{rank}.json", finite(peak))
    if rank == 0:
        atomic_write_json(folder / "summary.json", finite(summary))
    return trainer.EXIT_CODES.get(summary["state"], 1)


# ----------------------------------------------------------------------------------------------------- the runbook
class Runbook:
    """The units of the chosen parts, run in order within the budget; the state in ``--out``."""

    def __init__(self, args: argparse.Namespace, gpus: int, out: Path, work: Path, state: dict[str, Any],
                 journal: Journal):
        self.args, self.gpus, self.out, self.work, self.state, self.log = args, gpus, out, work, state, journal
        self.smoke = bool(args.cpu_smoke)
        self.started = time.monotonic()
        self.call: dict[str, Any] = {"started_at": time.strftime("%Y-%m-%d %H:%M:%S"), "parts": args.part,
                                     "budget_s": args.budget_s, "units_run": [], "units_left": []}
        self.state.setdefault("calls", []).append(self.call)
        self.data: dict[str, Any] | None = None
        self.plans: dict[int, dict[str, Any]] = {}  # embscale plan --json of the chosen FSDP point, by world size
        self.env = {**os.environ, "EMBSCALE_PROGRESS": "plain", "PYTHONUNBUFFERED": "1"}
        if self.smoke:
            self.env["OMP_NUM_THREADS"] = "1"
            self.env.pop("CUDA_VISIBLE_DEVICES", None)

    # ------------------------------------------------------------------------------------------- bookkeeping
    @property
    def units(self) -> dict[str, Any]:
        return self.state.setdefault("units", {})

    def left_s(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.started)

    def save(self) -> None:
        self.state["results"] = compare(self.state)
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out / SUMMARY, finite(self.state))
        atomic_write_text(self.out / TABLES, markdown(self.state))
        atomic_write_text(self.out / LOG, self.log.text())

    def plan(self) -> list[tuple[str, str, float, Callable[[], dict[str, Any]]]]:
        """(part, unit name, expected seconds, function) of every unit, in order."""
        g = self.gpus
        scale = 0.1 if self.smoke else 1.0
        units: list[tuple[str, str, float, Callable[[], dict[str, Any]]]] = [
            ("1", "ddp_w1_a", 60 * scale, lambda: self.launch("ddp_w1_a", self.ddp_config(), 1)),
            ("1", "ddp_w1_b", 60 * scale, lambda: self.launch("ddp_w1_b", self.ddp_config(), 1)),
            ("1", "ddp_w2", 60 * scale, lambda: self.launch("ddp_w2", self.ddp_config(), 2)),
        ]
        for world in reversed(self.fsdp_world_sizes()):  # the whole machine first
            for family in ("moe", "ne"):
                units.append(("2", f"fsdp_{family}_w{world}", 120 * scale,
                              lambda family=family, world=world: self.fsdp_unit(family, world)))
        units += [("3", f"dcp_w{g}_to_w{g // 2}", 150 * scale, self.dcp_unit),
                  ("3", "queue_1gpu", 120 * scale, lambda: self.queue_unit(1)),
                  ("3", "queue_2gpu", 120 * scale, lambda: self.queue_unit(2))]
        return units

    def fsdp_world_sizes(self) -> list[int]:
        if self.smoke:
            return [1, 2]
        return [w for w in GPU_COUNTS if w <= self.gpus]

    def run(self) -> int:
        parts = self.args.parts
        pending = []
        for part, name, expected_s, function in self.plan():
            if part not in parts:
                continue
            known = self.units.get(name, {})
            if known.get("state") == "done":
                self.log(f"{name}: done in an earlier call, skipped")
                continue
            if known.get("state") == "failed" and not self.args.retry_failed:
                self.log(f"{name}: failed in an earlier call, skipped (--retry-failed runs it again)")
                continue
            pending.append((part, name, expected_s, function))
        if pending and self.data is None:
            self.data = self.prepare_data()
        for index, (part, name, expected_s, function) in enumerate(pending):
            left = self.left_s()
            if left < expected_s:
                self.log(f"{name}: not started, {left:.0f}s of the budget left and it takes about {expected_s:.0f}s")
                self.call["units_left"] += [n for _, n, _, _ in pending[index:]]
                break
            self.log(f"{name}: starting ({left:.0f}s of the budget left)")
            started = time.monotonic()
            try:
                result = function()
            except (ConfigError, UserError) as exc:
                result = {"state": "failed", "error": str(exc)}
            result = {"part": part, "wall_s": round(time.monotonic() - started, 1), **result}
            self.units[name] = result
            self.call["units_run"].append(name)
            if result["state"] == "left":
                self.call["units_left"].append(name)
            self.log(f"{name}: {result['state']} in {result['wall_s']:.0f}s"
                     + (f" ({result['error']})" if result.get("error") else ""))
            self.save()
        self.call["ended_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        self.save()
        chosen = [name for part, name, _, _ in self.plan() if part in parts]
        states = [self.units.get(name, {}).get("state") for name in chosen]
        if any(s == "failed" for s in states):
            return 1
        return 0 if all(s == "done" for s in states) else 3

    # ------------------------------------------------------------------------------------------- runs
    def prepare_data(self) -> dict[str, Any]:
        """The corpus section every run uses, its tokenizer and shards built once (cached) before any run."""
        from embscale.bench.packed import prepare_corpus, write_tiny_corpus

        data = write_tiny_corpus(self.work / "corpus") if self.smoke else dict(BUILTIN_DATA)
        corpus = prepare_corpus(data)
        self.state["corpus"] = corpus
        self.log(f"corpus {data['corpus']}: {corpus['train_tokens']:,} training tokens, vocabulary "
                 f"{corpus['vocab_size']} (ready in {corpus['prepare_s']}s)")
        return data

    def visible(self, count: int) -> str:
        return ",".join(str(i) for i in range(count))

    def launch(self, name: str, run_cfg: dict[str, Any], world: int,
               results: Path | None = None, keep_results: bool = False) -> dict[str, Any]:
        """Train ``run_cfg`` on ``world`` ranks (torchrun; one plain process for one rank) into
        ``<work>/<name>/results``; the unit's record: state, curve, tokens/s, MFU, per-rank peaks. The run folder
        is removed once read (its checkpoints would fill the disk over the units) unless ``keep_results``."""
        folder = self.work / name
        if results is None:
            shutil.rmtree(folder, ignore_errors=True)
            results = folder / "results"
        folder.mkdir(parents=True, exist_ok=True)
        run_file = folder / "run.yaml"
        atomic_write_text(run_file, yaml.safe_dump(run_cfg, sort_keys=False))
        peaks = folder / "peak"
        shutil.rmtree(peaks, ignore_errors=True)
        rank_args = ["-m", "embscale.bench.multigpu", "train-rank", str(run_file), "--results", str(results),
                     "--peak-dir", str(peaks)]
        if world == 1:
            command = [sys.executable, *rank_args]
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                       *rank_args]
        env = dict(self.env)
        if not self.smoke:
            env["CUDA_VISIBLE_DEVICES"] = self.visible(world)
        code, timed_out = self.execute(command, env, folder / "log")
        record: dict[str, Any] = {"world_size": world, "cuda_visible_devices": env.get("CUDA_VISIBLE_DEVICES"),
                                  "exit_code": code, "command": " ".join(command[1:])}
        record.update(read_run(results, peaks))
        if not keep_results:
            shutil.rmtree(results, ignore_errors=True)
        if timed_out:
            record.update(state="left", error="stopped at the end of the budget")
        elif code != 0 or not record.get("loss"):
            record.update(state="failed", error=f"exit code {code}", log_tail=tail(folder / "log"))
        else:
            record["state"] = "done"
        return record

    def execute(self, command: list[str], env: dict[str, str], log_path: Path) -> tuple[int | None, bool]:
        """Run ``command`` (a process group of its own) until it ends or the budget does; (exit code, timed out)."""
        with open(log_path, "w") as log_file:
            process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            try:
                return process.wait(timeout=max(1.0, self.left_s())), False
            except subprocess.TimeoutExpired:
                for sig, grace in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, sig)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        process.wait(timeout=grace)
                        break
                return process.poll(), True

    # part 1 ------------------------------------------------------------------------------------------------
    def ddp_config(self) -> dict[str, Any]:
        if self.smoke:
            return {"model": dict(SMOKE_MOE), "training": dict(SMOKE_TRAINING), "data": self.data,
                    "output": {"sweep": "multigpu_ddp"}}
        from embscale.base.datafile import read_yaml

        run = read_yaml(ROOT / "sweeps" / "runs" / "bench_moe_gpu.yaml", "run file")
        run["output"] = {"sweep": "multigpu_ddp", "log_interval_s": 5}
        return run

    def queue_unit(self, gpus_per_run: int) -> dict[str, Any]:
        """``embscale submit --executor local`` of a sweep of 4 one-GPU runs on 2 visible GPUs, or of 2 two-GPU
        runs on 3 visible GPUs (2 where the machine has 2)."""
        name = f"queue_{gpus_per_run}gpu"
        folder = self.work / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        seeds = [0, 1, 2, 3] if gpus_per_run == 1 else [0, 1]
        visible = 2 if gpus_per_run == 1 else 3 if self.smoke else min(3, self.gpus)
        sweep: dict[str, Any] = {
            "name": name,
            "model": dict(SMOKE_SWEEP_MODEL if self.smoke else BENCH_MOE_SWEEP_MODEL),
            "training": dict(SMOKE_SWEEP_TRAINING if self.smoke else BENCH_QUEUE_TRAINING),
            "data": self.data, "grid": {"seed": seeds},
            "executor": {"type": "local", "gpus_per_run": gpus_per_run}}
        sweep_file = folder / "sweep.yaml"
        atomic_write_text(sweep_file, yaml.safe_dump(sweep, sort_keys=False))
        env = dict(self.env)
        if self.smoke:
            env["EMBSCALE_FAKE_GPUS"] = str(visible)  # the pinning path on a CPU machine; the runs train on CPU
        else:
            env["CUDA_VISIBLE_DEVICES"] = self.visible(visible)
        command = [sys.executable, "-m", "embscale", "submit", str(sweep_file), "--executor", "local", "--results",
                   str(folder / "results"), "--poll-s", "0.5" if self.smoke else "2"]
        code, timed_out = self.execute(command, env, folder / "log")
        if timed_out:
            with contextlib.suppress(Exception):
                subprocess.run([sys.executable, "-m", "embscale", "cancel", str(sweep_file), "--results",
                                str(folder / "results")], env=env, cwd=ROOT, capture_output=True, timeout=60,
                               check=False)
        from embscale.bench.packed import gather_runs

        jobs = [{"run_id": r["run_id"], "state": r["state"], "gpus": r["gpus"].split(",") if r["gpus"] else [],
                 "started_at": r["started_at"], "ended_at": r["ended_at"], "train_s": r["train_s"]}
                for r in gather_runs(folder / "results" / name)]
        jobs.sort(key=lambda j: (math.inf if j["started_at"] is None else j["started_at"], j["run_id"]))
        shutil.rmtree(folder / "results", ignore_errors=True)  # read: its checkpoints would only fill the disk
        record = {"gpus_per_run": gpus_per_run, "visible_gpus": visible, "runs": len(seeds), "exit_code": code,
                  "jobs": jobs, **queue_overlap(jobs)}
        if timed_out:
            record.update(state="left", error="stopped at the end of the budget")
        elif code != 0 or record["completed"] != len(seeds):
            record.update(state="failed", error=f"exit code {code}, {record['completed']}/{len(seeds)} completed",
                          log_tail=tail(folder / "log"))
        else:
            record["state"] = "done"
        return record

    # part 2 ------------------------------------------------------------------------------------------------
    def fsdp_sweep(self, grid: dict[str, Any]) -> dict[str, Any]:
        """The FSDP sweep: ``--sweep`` (default paper_280m) with a short run on the runbook's corpus."""
        if self.smoke:
            sweep = json.loads(json.dumps(SMOKE_FSDP_SWEEP))
        else:
            from embscale.base.datafile import read_yaml

            sweep = read_yaml(self.args.sweep, "sweep file")
            sweep.pop("extends", None)
            micro = int((sweep.get("training") or {}).get("micro_batch_size", 4))
            seq = int(self.args.fsdp_seq_len or (sweep.get("training") or {}).get("seq_len", 4096))
            biggest = max(self.fsdp_world_sizes())
            training = {k: v for k, v in (sweep.get("training") or {}).items() if k != "tokens"}
            training.update(steps=self.args.fsdp_steps, seq_len=seq, batch_tokens=micro * seq * biggest,
                            eval_every=0, eval_tokens=micro * seq * biggest, checkpoint_every=0,
                            warmup_fraction=0.0, compile=bool(self.args.fsdp_compile))
            training.setdefault("parallel", "fsdp")
            sweep["training"] = training
            sweep["model"] = {**(sweep.get("model") or {}), "max_seq_len": max(seq, int(
                (sweep.get("model") or {}).get("max_seq_len", seq)))}
        sweep["name"] = "multigpu_fsdp"
        sweep["data"] = self.data
        sweep.pop("slurm", None)
        sweep["executor"] = {"type": "local"}
        sweep["grid"] = grid
        return sweep

    def plan_json(self, sweep: dict[str, Any], world: int, tag: str) -> dict[str, Any]:
        """``embscale plan SWEEP --gpu-memory 141GiB --gpus-per-node WORLD --json`` of ``sweep``."""
        folder = self.work / "plans"
        folder.mkdir(parents=True, exist_ok=True)
        sweep_file = folder / f"{tag}.yaml"
        atomic_write_text(sweep_file, yaml.safe_dump(sweep, sort_keys=False))
        command = [sys.executable, "-m", "embscale", "plan", str(sweep_file), "--gpu-memory", FSDP_GPU_MEMORY,
                   "--gpus-per-node", str(world), "--json"]
        found = subprocess.run(command, env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=300,
                               check=False)
        if found.returncode != 0:
            raise UserError(f"embscale plan {sweep_file} failed (exit {found.returncode}): {found.stderr[-2000:]}")
        return json.loads(found.stdout)

    def fsdp_choice(self) -> dict[str, Any]:
        """The largest MoE point of the sweep's grid that fits the smallest world size measured, and its matched
        NE point (base ratio ``--ne-base-ratio`` where it fits, else the largest base that does)."""
        if "fsdp_choice" in self.state:
            return self.state["fsdp_choice"]
        from embscale.base.datafile import read_yaml

        if self.smoke:
            grid = dict(SMOKE_FSDP_SWEEP["grid"])
        else:
            grid = dict(read_yaml(self.args.sweep, "sweep file").get("grid") or {})
        smallest = min(self.fsdp_world_sizes())
        plan = self.plan_json(self.fsdp_sweep(grid), smallest, "choose")
        fits = [r for r in plan["runs"] if (r.get("memory") or {}).get("fits", True)]
        moe = [r for r in fits if r["point"].get("family") == "moe"]
        if not moe:
            raise UserError(f"no MoE point of {self.args.sweep} fits {smallest} GPUs of {FSDP_GPU_MEMORY}")
        best = max(moe, key=lambda r: r["accounting"]["total"])
        ratio = best["point"]["ratio"]
        ne = [r for r in fits if r["point"].get("family") == "ne" and r["point"].get("ratio") == ratio]
        wanted = [r for r in ne if r["point"].get("base_ratio") == self.args.ne_base_ratio]
        matched = (wanted or sorted(ne, key=lambda r: r["point"].get("base_ratio") or 0))[-1:] if ne else []
        choice = {"ratio": ratio, "moe_total": best["accounting"]["total"], "smallest_world": smallest,
                  "grid": {"family": ["moe", "ne"] if matched else ["moe"], "ratio": [ratio]}}
        if matched:
            choice["grid"]["base_ratio"] = [matched[0]["point"]["base_ratio"]]
            choice["ne_base_ratio"] = matched[0]["point"]["base_ratio"]
            choice["ne_total"] = matched[0]["accounting"]["total"]
        self.state["fsdp_choice"] = choice
        self.log(f"FSDP: MoE at ratio {ratio} ({best['accounting']['total'] / 1e9:.2f}B parameters), NE "
                 + (f"at base ratio {choice['ne_base_ratio']}" if matched else "none that fits")
                 + f"; the largest that fit {smallest} GPUs of {FSDP_GPU_MEMORY} by the plan")
        return choice

    def fsdp_unit(self, family: str, world: int) -> dict[str, Any]:
        choice = self.fsdp_choice()
        if family not in choice["grid"]["family"]:
            return {"state": "failed", "error": "no matched NE point fits"}
        if world not in self.plans:  # one plan per world size serves both families
            self.plans[world] = self.plan_json(self.fsdp_sweep(choice["grid"]), world, f"w{world}")
        runs = [r for r in self.plans[world]["runs"] if r["point"].get("family") == family]
        if not runs:
            return {"state": "failed", "error": f"the plan has no {family} run"}
        planned = runs[0]
        run_cfg = {**planned["config"], "output": {"sweep": "multigpu_fsdp", "log_interval_s": 5}}
        # a throughput run: no checkpoint (a 13B model's is about 160 GB, more than a 2-GPU machine's disk)
        run_cfg["training"] = {**run_cfg["training"], "keep_checkpoints": 0}
        if self.smoke:
            run_cfg["training"] = {**run_cfg["training"], "device": "cpu"}
        record = self.launch(f"fsdp_{family}_w{world}", run_cfg, world)
        record.update(point=planned["point"], plan_run_id=planned["run_id"], total=planned["accounting"]["total"],
                      activated=planned["accounting"]["activated"], plan_memory=planned.get("memory"))
        return record

    # part 3 ------------------------------------------------------------------------------------------------
    def dcp_config(self) -> dict[str, Any]:
        steps = self.args.dcp_steps
        if self.smoke:
            training = {**SMOKE_TRAINING, "steps": steps, "checkpoint_every": steps // 2, "keep_checkpoints": 3,
                        "parallel": "fsdp", "table_optimizer": "dense", "table_sharding": "rows"}
            return {"model": dict(SMOKE_NE), "training": training, "data": self.data,
                    "output": {"sweep": "multigpu_dcp"}}
        from embscale.base.datafile import read_yaml

        run = read_yaml(ROOT / "sweeps" / "runs" / "bench_ne_gpu.yaml", "run file")
        micro = min(16, int(run["training"]["batch_tokens"]) // (int(run["training"]["seq_len"]) * self.gpus))
        run["training"].update(steps=steps, checkpoint_every=steps // 2, keep_checkpoints=3, micro_batch_size=micro,
                               parallel="fsdp", table_optimizer="dense", table_sharding="rows", compile=False)
        run["output"] = {"sweep": "multigpu_dcp", "log_interval_s": 5}
        return run

    def dcp_unit(self) -> dict[str, Any]:
        """The run on G ranks with a checkpoint half way, then a copy holding only that checkpoint resumed on G/2."""
        from embscale.base import rundir

        g, steps = self.gpus, self.args.dcp_steps
        half = steps // 2
        run_cfg = self.dcp_config()
        full = self.launch("dcp_full", run_cfg, g, keep_results=True)
        if full["state"] != "done":
            return {**full, "phase": "uninterrupted run"}
        source = Path(full["run_dir"])
        checkpoints = rundir.list_checkpoints(source)
        kept = [path for step, path in checkpoints if step == half]
        if not kept:
            return {"state": "failed", "error": f"no checkpoint at step {half}: {[s for s, _ in checkpoints]}",
                    "full": full}
        results = self.work / "dcp_resume" / "results"
        shutil.rmtree(results.parent, ignore_errors=True)
        copy = results / source.parent.name / source.name
        later = {path.name for step, path in checkpoints if step != half}
        shutil.copytree(source, copy, copy_function=os.link,
                        ignore=lambda folder, names: [n for n in names if n in later])
        rundir.write_status(copy, "interrupted", step=half, total_steps=steps)
        sharded = kept[0].is_dir()  # DCP: a folder of every rank's shards and a manifest; one process: a file
        resumed = self.launch("dcp_resume", run_cfg, g // 2, results=results)
        shutil.rmtree(self.work / "dcp_full" / "results", ignore_errors=True)
        log_text = tail(self.work / "dcp_resume" / "log", 200_000)
        resumed["resumed_from_step"] = half if f"from step {half}" in log_text else None
        record = {"state": resumed["state"], "written_on": g, "resumed_on": g // 2, "checkpoint_step": half,
                  "checkpoint_sharded": sharded, "full": full, "resumed": resumed}
        if resumed["state"] == "done" and resumed["resumed_from_step"] is None:
            record.update(state="failed", error=f"the resumed run did not say it resumed from step {half}")
        elif resumed.get("error"):
            record["error"] = resumed["error"]
        return record


# ----------------------------------------------------------------------------------------------------- results
def read_run(results: Path, peaks: Path) -> dict[str, Any]:
    """The one run folder under ``results``: its curve, tokens/s and MFU columns, status; the ranks' peaks."""
    import pandas as pd

    from embscale.base import rundir

    record: dict[str, Any] = {}
    run_dirs = [p for p in results.glob("*/*") if rundir.is_run_dir(p)] if results.is_dir() else []
    if run_dirs:
        run_dir = run_dirs[0]
        record["run_dir"] = str(run_dir)
        record["run_id"] = run_dir.name
        status = rundir.read_status(run_dir) or {}
        record["run_state"] = status.get("state")
        frame = rundir.read_metrics(run_dir)
        if frame is not None and not isinstance(frame, pd.DataFrame):
            frame = frame.to_pandas()
        if frame is not None and len(frame):
            frame = frame.sort_values("step")
            record["steps"] = [int(s) for s in frame["step"]]
            record["loss"] = [float(v) for v in frame["train_loss"]]
            record["tokens_per_s"] = [float(v) for v in frame["tokens_per_s"]]
            record["mfu"] = [float(v) for v in frame["mfu"]]
            record["tokens_per_s_median"] = median_after_warmup(record["tokens_per_s"])
            record["mfu_median"] = median_after_warmup(record["mfu"])
    ranks = []
    for path in sorted(peaks.glob("rank*.json")) if peaks.is_dir() else []:
        with contextlib.suppress(OSError, ValueError):
            ranks.append(json.loads(path.read_text()))
    record["ranks"] = sorted(ranks, key=lambda r: r["rank"])
    allocated = [r["max_allocated"] for r in ranks if r.get("max_allocated") is not None]
    record["peak_allocated_max"] = max(allocated) if allocated else None
    return record


def queue_overlap(jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """From the jobs' GPUs and times: completed count, most jobs at once, the seconds when two or more ran, the
    pairs that overlapped, and whether two jobs ever shared a GPU while both ran."""
    timed = [j for j in jobs if j.get("started_at") is not None and j.get("ended_at") is not None]
    events = sorted([(j["started_at"], 1) for j in timed] + [(j["ended_at"], -1) for j in timed],
                    key=lambda e: (e[0], e[1]))
    running = most = 0
    overlap_s, last = 0.0, None
    for moment, change in events:
        if last is not None and running >= 2:
            overlap_s += moment - last
        running += change
        most = max(most, running)
        last = moment
    pairs, shared = [], False
    for i, a in enumerate(timed):
        for b in timed[i + 1:]:
            both = min(a["ended_at"], b["ended_at"]) - max(a["started_at"], b["started_at"])
            if both > 0:
                pairs.append({"runs": [a["run_id"], b["run_id"]], "overlap_s": round(both, 2)})
                shared = shared or bool(set(a["gpus"]) & set(b["gpus"]))
    origin = min((j["started_at"] for j in timed), default=None)
    return {"completed": sum(j["state"] == "completed" for j in jobs), "most_at_once": most,
            "overlap_s": round(overlap_s, 2), "overlapping_pairs": pairs, "shared_a_gpu_while_running": shared,
            "origin": origin}


def compare(state: dict[str, Any]) -> dict[str, Any]:
    """The comparisons issue 19 asks for, from the units done so far."""
    units = state.get("units", {})

    def done(name: str) -> dict[str, Any] | None:
        unit = units.get(name)
        return unit if unit and unit.get("state") == "done" else None

    results: dict[str, Any] = {}
    a, b, two = done("ddp_w1_a"), done("ddp_w1_b"), done("ddp_w2")
    spread = None
    if a and b and len(a["loss"]) == len(b["loss"]):
        spread = max(abs(x - y) for x, y in zip(a["loss"], b["loss"], strict=True))
        results["one_gpu_spread"] = {"max_abs_diff": spread, "steps": len(a["loss"])}
    if a and two:
        ddp = {"vs_one_gpu": curve_difference(two["loss"], a["loss"], spread)}
        if a.get("tokens_per_s_median") and two.get("tokens_per_s_median"):
            ratio = two["tokens_per_s_median"] / a["tokens_per_s_median"]
            ddp.update(tokens_per_s_1=a["tokens_per_s_median"], tokens_per_s_2=two["tokens_per_s_median"],
                       speedup=ratio, speedup_goal=DDP_GOAL, speedup_met=ratio >= DDP_GOAL)
        results["ddp"] = ddp
    fsdp: dict[str, Any] = {}
    for family in ("moe", "ne"):
        rows = sorted((u for name, u in units.items() if name.startswith(f"fsdp_{family}_w") and
                       u.get("state") == "done"), key=lambda u: u["world_size"])
        entries = []
        for index, unit in enumerate(rows):
            memory = unit.get("plan_memory") or {}
            measured = unit.get("peak_allocated_max")
            tps = unit.get("tokens_per_s_median")
            entry = {"world_size": unit["world_size"], "tokens_per_s": tps,
                     "tokens_per_s_per_gpu": tps / unit["world_size"] if tps else None,
                     "mfu_per_gpu": unit.get("mfu_median"), "peak_allocated_max": measured,
                     "plan_peak": memory.get("peak"), "plan_first_step_peak": memory.get("first_step_peak"),
                     "measured_over_plan": measured / memory["peak"] if measured and memory.get("peak") else None}
            if index:
                before = rows[index - 1]
                if tps and before.get("tokens_per_s_median"):
                    entry["scaling_efficiency"] = ((tps / before["tokens_per_s_median"])
                                                   / (unit["world_size"] / before["world_size"]))
                    entry["scaling_from"] = before["world_size"]
            entries.append(entry)
        if entries:
            fsdp[family] = entries
    if fsdp:
        results["fsdp"] = fsdp
    dcp = done(next((n for n in units if n.startswith("dcp_")), ""))
    if dcp:
        half = dcp["checkpoint_step"]
        results["dcp"] = {"written_on": dcp["written_on"], "resumed_on": dcp["resumed_on"], "checkpoint_step": half,
                          "after_resume": curve_difference(dcp["resumed"]["loss"], dcp["full"]["loss"], spread,
                                                           first_step=half + 1),
                          "kept_steps_equal": dcp["resumed"]["loss"][:half] == dcp["full"]["loss"][:half]}
    queue = {}
    for name in ("queue_1gpu", "queue_2gpu"):
        unit = done(name)
        if unit:
            one_each = all(len(j["gpus"]) == unit["gpus_per_run"] and len(set(j["gpus"])) == unit["gpus_per_run"]
                           for j in unit["jobs"])
            queue[name] = {"all_completed": unit["completed"] == unit["runs"], "gpus_as_asked": one_each,
                           "most_at_once": unit["most_at_once"],
                           "at_most_one_job_per_gpu": not unit["shared_a_gpu_while_running"],
                           "overlap_s": unit["overlap_s"]}
    if queue:
        results["queue"] = queue
    return results


def _gib(value: Any) -> str:
    return f"{value / 2 ** 30:.1f}" if isinstance(value, (int, float)) else "-"


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def markdown(state: dict[str, Any]) -> str:
    """The tables for BENCHMARKS.md, from ``state`` (units not done are listed as such)."""
    units, results = state.get("units", {}), state.get("results", {})
    info = state.get("machine", {})
    smoke = state.get("mode") == "cpu-smoke"
    where = "CPU smoke test (gloo, tiny models): the numbers mean nothing" if smoke else (
        f"{state.get('gpus')} x {info.get('gpu', '?')}, torch {info.get('torch', '?')}")
    lines = [f"## Multi-GPU runs (`python -m embscale.bench.multigpu`, {where})", ""]
    calls = state.get("calls", [])
    if calls:
        lines += [f"Calls: {len(calls)}, the first at {calls[0]['started_at']} UTC. Units not done: "
                  + (", ".join(f"{n} ({u.get('state')})" for n, u in units.items() if u.get("state") != "done")
                     or "none") + ".", ""]
    lines += ["### 1. DDP of the benchmark MoE: 2 GPUs against 1 (same global batch and seed)", "",
              "| run | GPUs | tokens/s (median after step 5) | MFU | peak GiB/GPU (max over ranks) "
              "| loss first -> last |",
              "|---|---|---|---|---|---|"]
    for name in ("ddp_w1_a", "ddp_w1_b", "ddp_w2"):
        unit = units.get(name) or {}
        loss = unit.get("loss") or []
        lines.append(f"| {name} | {unit.get('world_size', '-')} | {_num(unit.get('tokens_per_s_median'), 4)} | "
                     f"{_num(unit.get('mfu_median'))} | {_gib(unit.get('peak_allocated_max'))} | "
                     + (f"{loss[0]:.4f} -> {loss[-1]:.4f}" if loss else unit.get("state", "not run")) + " |")
    ddp = results.get("ddp") or {}
    versus = ddp.get("vs_one_gpu") or {}
    if versus.get("comparable"):
        lines += ["", f"2 GPUs against 1: max |loss difference| {versus['max_abs_diff']:.3g} (relative "
                      f"{versus['max_rel_diff']:.3g}) over {versus['steps']} steps; bound per step max(2 x the two "
                      f"1-GPU runs' largest difference = {_num(versus['spread_used'])}, 2^-7 x loss), "
                      f"{versus['bound_at_worst_step']:.3g} at the closest step ({versus['worst_step']}): "
                      + ("within bf16 noise." if versus["within_bound"] else "**outside the bound**.")]
    if "speedup" in ddp:
        lines += [f"tokens/s 2 GPUs over 1: {ddp['speedup']:.2f}x (goal {DDP_GOAL}x: "
                  + ("met" if ddp["speedup_met"] else "**not met**") + ")."]
    choice = state.get("fsdp_choice") or {}
    lines += ["", "### 2. FSDP of the largest paper_280m point that fits, and its matched NE (row-sharded tables)", ""]
    if choice:
        lines += [f"MoE ratio {choice['ratio']} ({choice['moe_total'] / 1e9:.2f}B parameters)"
                  + (f", NE at base ratio {choice['ne_base_ratio']} ({choice['ne_total'] / 1e9:.2f}B)"
                     if "ne_base_ratio" in choice else "") + f"; chosen by the plan for {choice['smallest_world']}"
                  f" GPUs of {FSDP_GPU_MEMORY}.", ""]
    lines += ["| model | GPUs | peak GiB/GPU (max over ranks) | plan peak GiB (first step) | measured / plan "
              "| tokens/s | tokens/s/GPU | MFU/GPU | scaling efficiency |", "|---|---|---|---|---|---|---|---|---|"]
    for family, entries in (results.get("fsdp") or {}).items():
        for entry in entries:
            efficiency = (f"{entry['scaling_efficiency']:.1%} ({entry['scaling_from']} -> {entry['world_size']})"
                          if "scaling_efficiency" in entry else "-")
            lines.append(f"| {family} | {entry['world_size']} | {_gib(entry['peak_allocated_max'])} | "
                         f"{_gib(entry['plan_peak'])} ({_gib(entry['plan_first_step_peak'])}) | "
                         f"{_num(entry['measured_over_plan'])} | "
                         f"{_num(entry['tokens_per_s'], 4)} | {_num(entry['tokens_per_s_per_gpu'], 4)} | "
                         f"{_num(entry['mfu_per_gpu'])} | {efficiency} |")
    dcp = results.get("dcp")
    lines += ["", "### 3. A sharded (DCP) checkpoint written on n GPUs, resumed on n/2", ""]
    if dcp:
        after = dcp["after_resume"]
        lines += [f"Written on {dcp['written_on']} at step {dcp['checkpoint_step']}, resumed on {dcp['resumed_on']}"
                  f"; steps before it kept as written: {_num(dcp['kept_steps_equal'])}."
                  + (f" Steps {after['first_step']}-{after['first_step'] + after['steps'] - 1} against the "
                     f"uninterrupted run: max |loss difference| {after['max_abs_diff']:.3g} (relative "
                     f"{after['max_rel_diff']:.3g}), bound {after['bound_at_worst_step']:.3g} at the closest step: "
                     + ("within it." if after["within_bound"] else "**outside it**.")
                     if after.get("comparable") else f" Not comparable: {after.get('why')}.")]
    else:
        lines += ["Not run yet."]
    lines += ["", "### 4. `embscale submit --executor local`: one job per GPU, two-GPU runs wait for two", ""]
    for name in ("queue_1gpu", "queue_2gpu"):
        unit = units.get(name)
        if not unit or "jobs" not in unit:
            lines += [f"{name}: not run yet.", ""]
            continue
        origin = unit.get("origin") or 0.0
        lines += [f"{name}: {unit['runs']} runs of {unit['gpus_per_run']} GPU(s) on {unit['visible_gpus']} visible; "
                  f"{unit['completed']} completed, at most {unit['most_at_once']} at once, {unit['overlap_s']:.1f} s "
                  "with two or more running, "
                  + ("two jobs shared a GPU while running." if unit["shared_a_gpu_while_running"]
                     else "no GPU held by two running jobs."), "",
                  "| run | CUDA_VISIBLE_DEVICES | start s | end s | state |", "|---|---|---|---|---|"]
        for job in unit["jobs"]:
            start = job["started_at"] - origin if job.get("started_at") is not None else None
            end = job["ended_at"] - origin if job.get("ended_at") is not None else None
            lines.append(f"| {job['run_id']} | {','.join(job['gpus']) or '-'} | {_num(start, 3)} | {_num(end, 3)} | "
                         f"{job['state']} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m embscale.bench.multigpu", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help=f"folder for {SUMMARY}, {TABLES} and {LOG} (the state)")
    parser.add_argument("--work", default=DEFAULT_WORK, help=f"run folders and logs (default {DEFAULT_WORK})")
    parser.add_argument("--part", default="all",
                        help="parts to run: 1, 2, 3, a comma list of them, or all (the default), in that order")
    parser.add_argument("--budget-s", type=float, default=500.0,
                        help="seconds this call may take; no unit starts that would not end inside it")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs to use, 2, 4 or 8 (default: all, detected)")
    parser.add_argument("--cpu-smoke", action="store_true", help="CPU, gloo, tiny models, world sizes 2 and 1")
    parser.add_argument("--restore", default=None, help=f"an earlier call's {SUMMARY}: its done units are kept")
    parser.add_argument("--retry-failed", action="store_true", help="run units that failed in an earlier call")
    parser.add_argument("--sweep", default=str(ROOT / "sweeps" / "paper_280m.yaml"),
                        help="the sweep whose largest fitting point part 2 trains (default paper_280m)")
    parser.add_argument("--ne-base-ratio", type=int, default=12, help="base ratio of the matched NE (default 12)")
    parser.add_argument("--fsdp-steps", type=int, default=8, help="steps of each FSDP run (default 8)")
    parser.add_argument("--fsdp-seq-len", type=int, default=0, help="sequence length of the FSDP runs "
                                                                   "(default: the sweep's)")
    parser.add_argument("--fsdp-compile", action="store_true", help="torch.compile each block of the FSDP runs")
    parser.add_argument("--dcp-steps", type=int, default=20, help="steps of the checkpoint run (default 20; "
                                                                 "6 with --cpu-smoke)")
    args = parser.parse_args(argv)
    if args.cpu_smoke and "--dcp-steps" not in (argv or sys.argv):
        args.dcp_steps = 6
    return args


def check_args(args: argparse.Namespace) -> int:
    """Bad input raises :class:`UserError` before anything is written; returns G."""
    parts = PARTS if args.part == "all" else tuple(p.strip() for p in args.part.split(","))
    if not parts or any(p not in PARTS for p in parts):
        raise UserError(f"--part must be 1, 2, 3, a comma list of them or all, got {args.part!r}")
    args.parts = tuple(p for p in PARTS if p in parts)
    if not args.budget_s > 0:
        raise UserError(f"--budget-s must be positive, got {args.budget_s}")
    for flag, value, least in (("--fsdp-steps", args.fsdp_steps, 2), ("--dcp-steps", args.dcp_steps, 4),
                               ("--fsdp-seq-len", args.fsdp_seq_len, 0)):
        if value < least:
            raise UserError(f"{flag} must be at least {least}, got {value}")
    if args.dcp_steps % 2:
        raise UserError(f"--dcp-steps must be even (the checkpoint is half way), got {args.dcp_steps}")
    if args.restore and not Path(args.restore).is_file():
        raise UserError(f"--restore: {args.restore} is not a file")
    if not args.cpu_smoke and not Path(args.sweep).is_file():
        raise UserError(f"--sweep: {args.sweep} is not a file")
    if args.cpu_smoke:
        if args.gpus not in (None, 2):
            raise UserError(f"--gpus {args.gpus}: --cpu-smoke runs world sizes 2 and 1 (G = 2)")
        return 2
    found = detect_gpus()
    gpus = args.gpus if args.gpus is not None else found
    if gpus not in GPU_COUNTS:
        raise UserError(f"--gpus must be one of {', '.join(map(str, GPU_COUNTS))} (found {found} GPUs); "
                        "without GPUs use --cpu-smoke")
    if gpus > found:
        raise UserError(f"--gpus {gpus}: this machine has {found} GPUs")
    return gpus


def load_state(args: argparse.Namespace, out: Path, gpus: int) -> tuple[dict[str, Any], str]:
    """The state of earlier calls (``--out``'s, else ``--restore``'s) and their log; a new one if none."""
    mode = "cpu-smoke" if args.cpu_smoke else "gpu"
    for source in (out / SUMMARY, Path(args.restore) if args.restore else None):
        if source is None or not source.is_file():
            continue
        try:
            state = json.loads(source.read_text())
        except ValueError as exc:
            raise UserError(f"{source}: not a readable {SUMMARY} ({exc})") from None
        if state.get("mode") != mode or state.get("gpus") != gpus:
            raise UserError(f"{source}: written by a {state.get('mode')} call on {state.get('gpus')} GPUs, this one "
                            f"is {mode} on {gpus}; give another --out")
        earlier = tail(source.parent / LOG, 10 ** 7)
        return state, earlier
    return {"mode": mode, "gpus": gpus, "machine": machine_info(), "units": {}}, ""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train-rank"]:
        return train_rank(argv[1:])
    args = parse_args(argv)
    gpus = check_args(args)
    out, work = Path(args.out), Path(args.work)
    state, earlier = load_state(args, out, gpus)
    work.mkdir(parents=True, exist_ok=True)
    journal = Journal(earlier)
    journal(f"call: part {args.part}, {gpus} {'CPU ranks (smoke)' if args.cpu_smoke else 'GPUs'}, budget "
            f"{args.budget_s:.0f}s, out {out}, work {work}")
    runbook = Runbook(args, gpus, out, work, state, journal)
    code = runbook.run()
    journal(f"exit {code}: " + {0: "every unit of the chosen parts is done", 1: "a unit failed",
                                3: "units are left: call again with the same --out (or --restore)"}[code])
    runbook.save()
    print(markdown(state), flush=True)
    return code


if __name__ == "__main__":
    exit_with(main, "embscale.bench.multigpu")
