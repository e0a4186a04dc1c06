"""Dispatch a sweep's runs through submitit: a local GPU/CPU queue, Slurm job arrays, or in-process (debug).

The run's ``status.json`` is the truth: completed runs are never submitted again, failed and diverged ones only
with ``retry_failed``, and a run whose recorded job still runs (local pid, Slurm job id) is left alone. Before a
job starts its run folder has ``run.json`` (the planned run) and status ``queued``; the job map
``results/<sweep>/jobs.json`` keeps every job id a run ever had.

Jobs run :class:`RunJob`, a ``submitit.helpers.Checkpointable``: on preemption or time-out the trainer saves a
checkpoint and stops (state ``interrupted``); Slurm (``scontrol requeue``, preemption) or the job itself (near
its time limit) requeues it, and the requeued job resumes from the checkpoint. Jobs import the code from a
snapshot of the packages copied into ``results/<sweep>/code/<hash>/`` at submission, so editing the repository
afterwards does not change running or requeued jobs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from models.config import ConfigError
from sweeps import jobs as J
from sweeps.cli import UserError

EXECUTORS = ("local", "slurm", "debug")
PACKAGES = ("models", "kernels", "sweeps", "analysis")
SNAPSHOT_SUFFIXES = (".py", ".yaml", ".yml", ".json", ".txt", ".md")
LOCAL_REQUEUE_EXIT_CODE = 144  # submitit's local controller restarts a task that exits with it
TRAINER_ENV = "EMBSCALE_TRAINER"

# The ``executor:`` section of a sweep file and what each key means.
EXECUTOR_KEYS = {
    "type": "default executor when --executor is not given (local, slurm, debug)",
    "cpu_jobs": "local: concurrent CPU jobs on a machine without GPU",
    "gpus_per_run": "local: GPUs each run gets (default 1 on a GPU machine)",
    "timeout_min": "local: time limit of one job in minutes",
    "poll_s": "seconds between looks at the jobs",
    "log_interval_s": "seconds between progress lines",
}
# The ``slurm:`` section: our name -> submitit SlurmExecutor parameter.
SLURM_KEYS = {
    "partition": "partition",
    "account": "account",
    "qos": "qos",
    "time": "time",
    "nodes": "nodes",
    "gpus_per_node": "gpus_per_node",
    "tasks_per_node": "ntasks_per_node",
    "cpus_per_task": "cpus_per_task",
    "mem_gb": "mem",
    "constraint": "constraint",
    "exclude": "exclude",
    "nodelist": "nodelist",
    "array_parallelism": "array_parallelism",
    "signal_delay_s": "signal_delay_s",
    "job_name": "job_name",
    "setup": "setup",
    "sbatch": "additional_parameters",
    "srun_args": "srun_args",
    "max_requeues": None,  # how often a job near its time limit requeues itself (default 3)
}


# ============================================================================================== the job
class RunJob(submitit.helpers.Checkpointable):
    """Train one planned run; what every executor runs. Picklable (plain data only).

    Multi-task jobs (several GPUs, or nodes) get the ``torch.distributed`` environment from submitit
    (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``);
    ``CUDA_VISIBLE_DEVICES`` keeps all of the job's GPUs and rank ``r`` uses ``cuda:LOCAL_RANK``.
    """

    def __init__(self, run_id: str, run_dir: str, config: dict[str, Any], executor: str = "local",
                 timeout_min: float | None = None, signal_delay_s: float = 90.0,
                 planned: dict[str, Any] | None = None, max_requeues: int = 3):
        self.run_id = run_id
        self.run_dir = str(run_dir)
        self.config = config
        self.executor = executor
        self.timeout_min = timeout_min
        self.signal_delay_s = signal_delay_s
        self.planned = planned or {}
        self.max_requeues = max_requeues

    def __call__(self) -> dict[str, Any]:
        started = time.time()
        rank = self._setup_distributed()
        run_dir = Path(self.run_dir)
        import sweeps

        print(f"embscale: run {self.run_id} in {run_dir}; code from {Path(sweeps.__file__).parent.parent}; "
              f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')}; rank {rank}", flush=True)
        from sweeps.run_config import RunConfig

        train_run = trainer()
        run_config = RunConfig.from_dict(self.config)
        merger = PlannedMerger(run_dir, self.planned) if rank == 0 else None
        if merger is not None:
            merger.start()
        else:  # other ranks start once rank 0 has cleared dispatch's files from the run folder
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and _dispatch_files_only(run_dir):
                time.sleep(0.1)
        try:
            result = train_run(run_config, run_dir, resume=True)
        except SystemExit as exc:  # a trainer that exits on a signal after checkpointing
            self._after_interruption(rank, started)
            raise SystemExit(exc.code) from None
        except BaseException as exc:
            if rank == 0:
                _mark_failed(run_dir, exc)
            raise
        finally:
            if merger is not None:
                merger.stop()
        state = (result or {}).get("state") if isinstance(result, dict) else None
        if state is None:
            state = J.run_state(run_dir)
        if state == "interrupted":
            self._after_interruption(rank, started)
        return result if isinstance(result, dict) else {"state": state}

    def _setup_distributed(self) -> int:
        try:
            env = submitit.JobEnvironment()
        except RuntimeError:  # not inside a submitit job (called directly)
            return 0
        if env.num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        return env.global_rank

    def _timed_out(self, started: float) -> bool:
        if not self.timeout_min:
            return False
        limit = 60.0 * float(self.timeout_min)
        return time.time() - started >= limit - self.signal_delay_s - 30.0

    def _after_interruption(self, rank: int, started: float) -> None:
        """Near its time limit, a job requeues itself; a preempted or requeued job is requeued by Slurm, and
        a cancelled one must not come back, so nothing is done then."""
        if rank != 0 or not self._timed_out(started):
            return
        if self.executor == "slurm":
            job_id = submitit.JobEnvironment().job_id
            shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True,
                                   check=False, timeout=60).stdout
            restarts = re.search(r"Restarts=(\d+)", shown)
            if restarts and int(restarts.group(1)) >= self.max_requeues:
                print(f"embscale: run {self.run_id} timed out again after {restarts.group(1)} requeues; "
                      "not requeued (raise slurm.max_requeues or slurm.time)", flush=True)
                return
            subprocess.run(["scontrol", "requeue", job_id], check=False, timeout=60)
            print(f"embscale: run {self.run_id} timed out; requeued job {job_id}", flush=True)
        elif self.executor == "local":
            print(f"embscale: run {self.run_id} timed out; restarting", flush=True)
            raise SystemExit(LOCAL_REQUEUE_EXIT_CODE)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        # The trainer keeps its own checkpoints in the run folder; resubmitting the same call resumes from them.
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


TRAINER_KEY = "corpus"  # a run.json with it was written by the trainer (it has started the run)
PLANNED_MARK = "planned_by"


def is_trainer_run_file(record: Any) -> bool:
    return isinstance(record, dict) and TRAINER_KEY in record


class PlannedMerger:
    """The handshake between dispatch's run.json and the trainer's.

    Dispatch writes ``run.json`` (the planned run: family, point, accounting, tokens, FLOPs) and ``status.json``
    (``queued``) before a job starts. The trainer starts only in an empty folder or on its own run.json (it
    checks corpus and tokenizer against it), and writes its run.json once, when the run starts. So before the
    trainer runs, a run folder holding only dispatch's files is emptied, and once the trainer's run.json
    exists the planned keys it lacks are merged into it (a thread watches for it; :meth:`stop` merges a last
    time, or puts the planned run.json back when the trainer never wrote one).
    """

    def __init__(self, run_dir: Path, planned: dict[str, Any], interval_s: float = 0.5):
        self.run_dir = Path(run_dir)
        self.planned = dict(planned)
        self.interval_s = interval_s
        self._done = False
        self._stop = None
        self._thread = None

    def start(self) -> None:
        import threading

        path = self.run_dir / J.RUN_FILE
        existing = J.read_json(path)
        if isinstance(existing, dict) and not is_trainer_run_file(existing):
            self.planned = {**existing, **self.planned} if self.planned else existing
        if not is_trainer_run_file(existing) and self.run_dir.is_dir():
            leftovers = {p.name for p in self.run_dir.iterdir()}
            if leftovers <= {J.RUN_FILE, J.STATUS_FILE}:  # only dispatch's files: give the trainer a clean folder
                for name in leftovers:
                    with contextlib.suppress(FileNotFoundError):
                        (self.run_dir / name).unlink()
        if not self.planned:
            self._done = True
            return
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="embscale-run-json", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self.merge():
                return

    def merge(self) -> bool:
        """Add the planned keys to the trainer's run.json; True once done (or nothing to do)."""
        if self._done:
            return True
        record = J.read_json(self.run_dir / J.RUN_FILE)
        if not is_trainer_run_file(record):
            return False
        missing = {k: v for k, v in self.planned.items() if k not in record and k != PLANNED_MARK}
        if missing:
            J.write_json_atomic(self.run_dir / J.RUN_FILE, {**record, **missing})
        self._done = True
        return True

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._thread.join(timeout=10)
        if not self.merge() and self.planned and not (self.run_dir / J.RUN_FILE).exists():
            J.write_json_atomic(self.run_dir / J.RUN_FILE, self.planned)


def _dispatch_files_only(run_dir: Path) -> bool:
    record = J.read_json(run_dir / J.RUN_FILE)
    return isinstance(record, dict) and not is_trainer_run_file(record)


def trainer() -> Callable[..., Any]:
    """``sweeps.train.train_run``, or the ``module:function`` named by ``EMBSCALE_TRAINER`` (tests, debugging)."""
    import importlib

    spec = os.environ.get(TRAINER_ENV, "").strip()
    if not spec:
        from sweeps.train import train_run

        return train_run
    module_name, _, function = spec.partition(":")
    return getattr(importlib.import_module(module_name), function or "train_run")


def _mark_failed(run_dir: Path, exc: BaseException) -> None:
    status = J.read_status(run_dir) or {}
    if status.get("state") in J.TERMINAL_STATES:
        return
    message = f"{type(exc).__name__}: {exc}".strip()
    with contextlib.suppress(OSError):
        J.write_status(run_dir, "failed", error=message)


# ============================================================================================== the plan
@dataclass
class SweepPlan:
    """A loaded sweep, its expansion, and where its results live."""

    sweep: Any
    plan: Any
    results_root: Path
    sweep_path: Path | None = None
    extras: dict[str, Any] = field(default_factory=dict)  # sections dispatch reads itself (tune)

    @property
    def name(self) -> str:
        return str(self.sweep.name)

    @property
    def sweep_dir(self) -> Path:
        return self.results_root / self.name

    @property
    def job_map_path(self) -> Path:
        return self.sweep_dir / J.JOBS_FILE

    @property
    def runs(self) -> list[Any]:
        return list(self.plan.runs)

    def run_dir(self, run: Any) -> Path:
        return self.sweep_dir / str(run.run_id)


OWN_SECTIONS = ("tune",)  # top-level sections read here, not by sweeps.sweepfile


def resolved_mapping(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A sweep file's mapping with its ``extends`` chain merged in (``name``/``description`` not inherited),
    the way :func:`sweeps.sweepfile.load_sweep` reads it."""
    import yaml

    from sweeps.sweepfile import deep_merge

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read sweep file: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), f"not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), "a sweep file must be a mapping at the top level")
    parent_ref = data.pop("extends", None)
    if not isinstance(parent_ref, str):
        return data
    parent = (Path(path).parent / parent_ref).resolve()
    if parent in chain or parent == Path(path).resolve():
        raise ConfigError(f"{path}: extends", "cycle")
    parent_data = resolved_mapping(parent, (*chain, Path(path).resolve()))
    parent_data.pop("name", None)
    parent_data.pop("description", None)
    return deep_merge(parent_data, data)


def load_sweep_file(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """The validated sweep and the sections dispatch reads itself (``tune``), from a sweep file.

    :func:`sweeps.sweepfile.load_sweep` validates everything else; a ``tune`` section is taken out first
    when the sweep-file parser does not know it.
    """
    from sweeps.sweepfile import load_sweep, parse_sweep

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such sweep file")
    try:
        sweep = load_sweep(path)
        extras = {key: getattr(sweep, key) for key in OWN_SECTIONS if getattr(sweep, key, None) is not None}
        if not extras:
            raw = resolved_mapping(path)
            extras = {key: raw[key] for key in OWN_SECTIONS if raw.get(key) is not None}
        return sweep, extras
    except ConfigError as exc:
        if not any(exc.field == key or exc.field.endswith(f": {key}") for key in OWN_SECTIONS):
            raise
    data = resolved_mapping(path)
    extras = {key: data.pop(key) for key in OWN_SECTIONS if key in data}
    data.setdefault("name", path.stem)
    try:
        return parse_sweep(data, path=str(path)), extras
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.field}" if exc.field else str(path), exc.message) from None


def load_plan(sweep_path: str | Path, results_root: str | Path | None = None) -> SweepPlan:
    """Load and expand a sweep file (ConfigError naming the file and field when it is bad)."""
    from sweeps.expand import expand

    path = Path(sweep_path)
    sweep, extras = load_sweep_file(path)
    try:
        plan = expand(sweep)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.field}" if exc.field else str(path), exc.message) from None
    root = Path(results_root) if results_root else Path(os.environ.get("EMBSCALE_RESULTS", "results"))
    return SweepPlan(sweep=sweep, plan=plan, results_root=root.resolve(), sweep_path=path, extras=extras)


def planned_record(run: Any, sweep_name: str) -> dict[str, Any]:
    """What run.json holds for a planned run (its dict form plus the sweep name)."""
    if hasattr(run, "to_dict"):
        record = dict(run.to_dict())
    elif dataclasses.is_dataclass(run):
        record = dataclasses.asdict(run)
    else:
        record = dict(vars(run))
    record.setdefault("run_id", str(run.run_id))
    record["sweep"] = sweep_name
    record[PLANNED_MARK] = "embscale submit"
    return record


def run_config_dict(run: Any, plan: SweepPlan) -> dict[str, Any]:
    """The RunConfig mapping a job trains: the planned sections plus where results go."""
    config = {key: value for key, value in dict(run.config).items() if key != "output"}
    output = dict(dict(run.config).get("output") or {})
    output.update(root=str(plan.results_root), sweep=plan.name)
    config["output"] = output
    return config


def write_run_file(run_dir: Path, record: dict[str, Any]) -> None:
    """Write the planned run.json; a trainer's run.json (the run has started) only gains missing keys."""
    existing = J.read_json(run_dir / J.RUN_FILE)
    if is_trainer_run_file(existing):
        missing = {k: v for k, v in record.items() if k not in existing and k != PLANNED_MARK}
        if missing:
            J.write_json_atomic(run_dir / J.RUN_FILE, {**existing, **missing})
        return
    if existing != record:
        J.write_json_atomic(run_dir / J.RUN_FILE, record)


# ============================================================================================== run views
@dataclass
class RunView:
    """One run as the dispatcher sees it: planned run, status file, latest job and whether that job lives."""

    run: Any
    run_dir: Path
    status: dict[str, Any] | None
    job: dict[str, Any] | None
    alive: bool | None  # True/False, None when it cannot be told (another host, no squeue)
    state: str = "pending"  # the state shown: status state, or lost / failed-to-start / pending
    detail: str = ""

    @property
    def run_id(self) -> str:
        return str(self.run.run_id)

    @property
    def raw_state(self) -> str:
        return str((self.status or {}).get("state", "pending"))

    @property
    def in_flight(self) -> bool:
        return self.state in J.IN_FLIGHT_STATES


def driver_alive(job_map: J.JobMap) -> bool:
    driver = job_map.data.get("driver") or {}
    if driver.get("host") not in (None, J.hostname()):
        return True  # another machine's driver: assume it runs
    return J.process_alive(driver.get("pid"), driver.get("proc_start")) and not driver.get("ended_at")


def view_runs(plan: SweepPlan, job_map: J.JobMap | None = None, query_slurm: bool = True) -> list[RunView]:
    """Every planned run with its state reconciled against the scheduler."""
    job_map = job_map or J.JobMap.load(plan.job_map_path)
    latest = {str(run.run_id): job_map.latest(str(run.run_id)) for run in plan.runs}
    slurm_ids = [str(j["job_id"]) for j in latest.values()
                 if j and j.get("executor") == "slurm" and not j.get("ended_at")]
    squeue = J.squeue_states(slurm_ids) if (slurm_ids and query_slurm) else ({} if not slurm_ids else None)
    driver_lives = driver_alive(job_map)
    views = []
    for run in plan.runs:
        run_dir = plan.run_dir(run)
        status = J.read_status(run_dir)
        job = latest[str(run.run_id)]
        if job is None:
            alive: bool | None = False
        elif job.get("executor") == "slurm":
            alive = J.slurm_job_alive(job, squeue)
        elif job.get("executor") == "local":
            alive = J.local_job_alive(job)
        else:
            alive = False
        view = RunView(run=run, run_dir=run_dir, status=status, job=job, alive=alive)
        _reconcile(view, driver_lives, squeue)
        views.append(view)
    return views


def _reconcile(view: RunView, driver_lives: bool, squeue: dict[str, str] | None) -> None:
    state = view.raw_state
    status = view.status or {}
    job = view.job or {}
    view.state = state
    if state in ("failed", "diverged"):
        view.detail = J.first_line(status.get("error"))
    if state == "running":
        if view.alive is False:
            view.state = J.LOST
            view.detail = f"job {job.get('job_id', '?')} is gone"
        elif view.alive is None and job.get("host") not in (None, J.hostname()):
            view.detail = f"on {job.get('host')}"
    elif state == "pending" and view.alive:
        view.state = "queued"
        view.detail = "starting"
    elif state == "queued":
        if not status.get("job_id"):  # waiting in a driver's queue, no job yet
            if not driver_lives:
                view.state = "pending"
                view.detail = "not started: its driver exited"
        elif view.alive is False:
            view.state = J.FAILED_TO_START
            view.detail = f"job {job.get('job_id', '?')} is gone"
    if job.get("executor") == "slurm" and squeue and str(job.get("job_id")) in squeue:
        slurm_state = squeue[str(job["job_id"])]
        # Requeued (scontrol requeue, preemption, time-out): the status file still tells the last attempt.
        normal = view.raw_state == "queued" or (view.raw_state == "running" and slurm_state == "RUNNING")
        if view.raw_state not in J.TERMINAL_STATES and not normal:
            view.state = "running" if slurm_state == "RUNNING" else "queued"
            view.detail = f"requeued after {view.raw_state} ({slurm_state.lower()} in Slurm)"


# ============================================================================================== selection
def select_runs(views: list[RunView], retry_failed: bool) -> tuple[list[RunView], dict[str, list[str]]]:
    """The runs to submit, and the others grouped by why they are left alone."""
    chosen: list[RunView] = []
    skipped: dict[str, list[str]] = {"completed": [], "failed": [], "in flight": []}
    for view in views:
        if view.state == "completed":
            skipped["completed"].append(view.run_id)
        elif view.state in J.FAILED_STATES and not retry_failed:
            skipped["failed"].append(view.run_id)
        elif view.state in J.IN_FLIGHT_STATES and view.alive is not False:
            skipped["in flight"].append(view.run_id)
        else:
            chosen.append(view)
    return chosen, skipped


# ============================================================================================== snapshot
def code_snapshot(dest_root: Path, packages: tuple[str, ...] = PACKAGES) -> Path:
    """Copy the packages' source into ``dest_root/<hash>/`` (once per content) and return that folder.

    Jobs put it first on ``PYTHONPATH``, so what they import is what existed at submission.
    """
    import importlib

    sources: list[tuple[str, Path]] = []
    for name in packages:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        package_dir = Path(module.__file__).parent
        for path in sorted(package_dir.rglob("*")):
            if path.is_file() and path.suffix in SNAPSHOT_SUFFIXES and "__pycache__" not in path.parts:
                sources.append((f"{name}/{path.relative_to(package_dir).as_posix()}", path))
    digest = hashlib.sha256()
    for relative, path in sources:
        digest.update(relative.encode() + b"\0" + path.read_bytes() + b"\0")
    target = Path(dest_root) / digest.hexdigest()[:12]
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".snapshot-", dir=target.parent))
    try:
        for relative, path in sources:
            out = staging / relative
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, out)
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not target.exists():
            raise
    return target


def job_environment(snapshot: Path | None) -> dict[str, str]:
    """Environment variables that make a job import the snapshot instead of the working tree."""
    if snapshot is None:
        return {}
    old = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": str(snapshot) + (os.pathsep + old if old else ""), "PYTHONSAFEPATH": "1"}


# ============================================================================================== options
@dataclass
class SubmitOptions:
    executor: str = "local"
    retry_failed: bool = False
    cpu_jobs: int | None = None
    gpus_per_run: int | None = None
    timeout_min: float | None = None
    slurm: dict[str, Any] = field(default_factory=dict)
    wait: bool = True
    poll_s: float = 1.0
    log_interval_s: float = 30.0
    snapshot: bool = True
    dry_run: bool = False


def executor_options(section: dict[str, Any]) -> dict[str, Any]:
    """Validate a sweep file's ``executor:`` section."""
    unknown = [key for key in section if key not in EXECUTOR_KEYS]
    if unknown:
        raise ConfigError(f"executor.{unknown[0]}", f"unknown key; known keys are {', '.join(EXECUTOR_KEYS)}")
    out = dict(section)
    if "type" in out and out["type"] not in EXECUTORS:
        raise ConfigError("executor.type", f"unknown value {out['type']!r}; expected one of {', '.join(EXECUTORS)}")
    for key in ("cpu_jobs", "gpus_per_run"):
        if key in out and (not isinstance(out[key], int) or isinstance(out[key], bool) or out[key] < 0):
            raise ConfigError(f"executor.{key}", f"must be a non-negative integer, got {out[key]!r}")
    if out.get("cpu_jobs") == 0:
        raise ConfigError("executor.cpu_jobs", "must be at least 1")
    for key in ("timeout_min", "poll_s", "log_interval_s"):
        if key in out and (not isinstance(out[key], (int, float)) or isinstance(out[key], bool) or out[key] <= 0):
            raise ConfigError(f"executor.{key}", f"must be a positive number, got {out[key]!r}")
    return out


_TIME = re.compile(r"^(?:(?P<d>\d+)-)?(?:(?P<h>\d+):)?(?P<m>\d+)(?::(?P<s>\d+))?$")


def slurm_minutes(value: Any, where: str = "slurm.time") -> int:
    """Minutes from an int or a Slurm time string (``MM``, ``HH:MM:SS``, ``D-HH:MM:SS``, ``D-HH``)."""
    if isinstance(value, bool):
        raise ConfigError(where, f"must be minutes or a time like 2:00:00, got {value!r}")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise ConfigError(where, f"must be positive, got {value!r}")
        return int(-(-value // 1))
    text = str(value).strip()
    parts = re.match(r"^(\d+)-(\d+)$", text)
    if parts:  # D-HH
        return int(parts.group(1)) * 1440 + int(parts.group(2)) * 60
    pieces = text.split("-")
    days = 0
    if len(pieces) == 2 and pieces[0].isdigit():
        days, text = int(pieces[0]), pieces[1]
    fields = text.split(":")
    if not all(f.isdigit() for f in fields) or not 1 <= len(fields) <= 3:
        raise ConfigError(where, f"must be minutes or a time like 2:00:00 or 1-00:00:00, got {value!r}")
    numbers = [int(f) for f in fields]
    if len(fields) == 1:
        hours, minutes, seconds = 0, numbers[0], 0
    elif len(fields) == 2:
        hours, minutes, seconds = (0, numbers[0], numbers[1]) if not days else (numbers[0], numbers[1], 0)
    else:
        hours, minutes, seconds = numbers
    total = days * 1440 + hours * 60 + minutes + (1 if seconds else 0)
    if total <= 0:
        raise ConfigError(where, f"must be positive, got {value!r}")
    return total


def slurm_parameters(section: dict[str, Any], overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """submitit SlurmExecutor parameters from a ``slurm:`` section with command-line ``overrides`` on top.

    Returns the parameters plus ``_max_requeues`` (popped by the caller). Unknown keys are errors.
    """
    merged = {**section, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    if "sbatch" in section and "sbatch" in (overrides or {}) and overrides["sbatch"]:
        merged["sbatch"] = {**section["sbatch"], **overrides["sbatch"]}
    unknown = [key for key in merged if key not in SLURM_KEYS]
    if unknown:
        raise ConfigError(f"slurm.{unknown[0]}", f"unknown key; known keys are {', '.join(SLURM_KEYS)}")
    params: dict[str, Any] = {}
    for key, value in merged.items():
        if value is None:
            continue
        target = SLURM_KEYS[key]
        if key == "time":
            value = slurm_minutes(value)
        elif key in ("nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "array_parallelism",
                     "signal_delay_s", "max_requeues"):
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "gpus_per_node" else 1):
                raise ConfigError(f"slurm.{key}", f"must be a positive integer, got {value!r}")
        elif key == "mem_gb":
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ConfigError("slurm.mem_gb", f"must be a positive number of GB, got {value!r}")
            value = f"{int(value)}GB" if value == int(value) else f"{int(value * 1024)}MB"
        elif key == "sbatch":
            if not isinstance(value, dict):
                raise ConfigError("slurm.sbatch", "must be a mapping of sbatch option to value, e.g. {mail-type: END}")
            value = {str(k): v for k, v in value.items()}
        elif key in ("setup", "srun_args"):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"slurm.{key}", "must be a list of strings")
        elif not isinstance(value, str):
            value = str(value)
        if target is None:
            params["_max_requeues"] = value
        else:
            params[target] = value
    return params


# ============================================================================================== submission
@dataclass
class SubmitReport:
    submitted: list[str] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)
    adopted: list[str] = field(default_factory=list)
    job_ids: dict[str, str] = field(default_factory=dict)
    final: dict[str, str] = field(default_factory=dict)  # run id -> state when the driver returned
    interrupted: bool = False


def submit(plan: SweepPlan, options: SubmitOptions, log: Callable[[str], None] | None = None) -> SubmitReport:
    """Submit the runs of ``plan`` that need it; see the module docstring for the rules."""
    log = _safe_log(log)
    if options.executor not in EXECUTORS:
        raise UserError(f"unknown executor {options.executor!r}; expected one of {', '.join(EXECUTORS)}")
    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    with _driver_lock(plan, options.executor):
        views = view_runs(plan, query_slurm=options.executor == "slurm" or _has_slurm_jobs(plan))
        chosen, skipped = select_runs(views, options.retry_failed)
        report = SubmitReport(skipped=skipped)
        parts = [f"{len(chosen)} to run"] + [f"{len(v)} {k}" for k, v in skipped.items() if v]
        log(f"sweep {plan.name}: {len(views)} runs; " + ", ".join(parts)
            + ("" if options.retry_failed or not skipped["failed"] else " (use --retry-failed to rerun failed)"))
        if options.dry_run:
            report.submitted = [v.run_id for v in chosen]
            return report
        snapshot = code_snapshot(plan.sweep_dir / "code") if options.snapshot else None
        if options.executor == "debug":
            _submit_debug(plan, chosen, options, report, log)
        elif options.executor == "local":
            _submit_local(plan, views, chosen, options, report, log, snapshot)
        else:
            _submit_slurm(plan, chosen, options, report, log, snapshot)
        return report


def _safe_log(log: Callable[[str], None] | None) -> Callable[[str], None]:
    """A logger that outlives its terminal: a closed stdout/stderr must not kill a driver mid-sweep."""
    from sweeps.progress import log as progress_log

    target = log or progress_log

    def write(message: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            target(message)

    return write


def _has_slurm_jobs(plan: SweepPlan) -> bool:
    job_map = J.JobMap.load(plan.job_map_path)
    return any(h and h[-1].get("executor") == "slurm" for h in job_map.runs.values())


@contextlib.contextmanager
def _driver_lock(plan: SweepPlan, executor: str) -> Iterator[None]:
    """One driver per sweep at a time; recorded in the job map so ``cancel`` can stop it."""
    lock_path = plan.sweep_dir / "driver.lock"
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            driver = J.JobMap.load(plan.job_map_path).data.get("driver") or {}
            message = (f"another embscale driver (pid {driver.get('pid', '?')}) is submitting sweep {plan.name};"
                       " watch it with `embscale status` or stop it with `embscale cancel`")
            raise UserError(message) from None
        pid = os.getpid()
        with J.JobMap.locked(plan.job_map_path) as job_map:
            job_map.data["sweep"] = plan.name
            job_map.data["driver"] = {"pid": pid, "proc_start": J.proc_start_time(pid), "host": J.hostname(),
                                      "executor": executor, "started_at": time.time()}
        try:
            yield
        finally:
            with J.JobMap.locked(plan.job_map_path) as job_map:
                driver = job_map.data.get("driver") or {}
                if driver.get("pid") == pid:
                    driver["ended_at"] = time.time()
            fcntl.flock(lock, fcntl.LOCK_UN)


def _prepare(plan: SweepPlan, view: RunView) -> None:
    """run.json, then status ``queued`` (keeping step/total of an interrupted run)."""
    write_run_file(view.run_dir, planned_record(view.run, plan.name))
    J.write_status(view.run_dir, "queued", job_id=None)


def _restore_status(view: RunView) -> None:
    if view.status is None:
        with contextlib.suppress(FileNotFoundError):
            (view.run_dir / J.STATUS_FILE).unlink()
    else:
        J.write_json_atomic(view.run_dir / J.STATUS_FILE, view.status)


def _make_job(plan: SweepPlan, view: RunView, executor: str, timeout_min: float | None = None,
              signal_delay_s: float = 90.0) -> RunJob:
    return RunJob(view.run_id, str(view.run_dir), run_config_dict(view.run, plan), executor=executor,
                  timeout_min=timeout_min, signal_delay_s=signal_delay_s,
                  planned=planned_record(view.run, plan.name))


def _result_error(record: dict[str, Any]) -> str | None:
    """The exception a submitit job ended with, from its result pickle (first and last lines)."""
    folder, job_id = record.get("folder"), record.get("job_id")
    if not folder or not job_id:
        return None
    paths = submitit.core.utils.JobPaths(folder, job_id=str(job_id), task_id=0)
    try:
        outcome, value = submitit.core.utils.pickle_load(paths.result_pickle)
    except Exception:  # noqa: BLE001 - absent or unreadable: the caller says so
        return None
    if outcome != "error":
        return None
    lines = [line for line in str(value).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else None


def _finish_state(view: RunView, record: dict[str, Any]) -> str:
    """After a job ended: the run's state, writing ``failed`` when the job died without saying why."""
    state = J.run_state(view.run_dir)
    if state in ("queued", "running", "pending"):
        reason = _result_error(record)
        code = record.get("exit_code")
        where = ""
        logs = _job_logs(record)
        if logs:
            where = f" (log: {logs})"
        if reason is None:
            reason = f"job {record.get('job_id')} exited with code {code} before finishing"
        prefix = "failed to start: " if state != "running" else ""
        J.write_status(view.run_dir, "failed", error=f"{prefix}{reason}{where}")
        state = "failed"
    return state


def _job_logs(record: dict[str, Any]) -> str | None:
    folder, job_id = record.get("folder"), record.get("job_id")
    if not folder or not job_id:
        return None
    return str(submitit.core.utils.JobPaths(folder, job_id=str(job_id), task_id=0).stderr)


# ---------------------------------------------------------------------------------------------- debug
def _submit_debug(plan: SweepPlan, chosen: list[RunView], options: SubmitOptions, report: SubmitReport,
                  log: Callable[[str], None]) -> None:
    folder = plan.sweep_dir / "submitit"
    executor = submitit.DebugExecutor(folder)
    for index, view in enumerate(chosen, 1):
        _prepare(plan, view)
        job = executor.submit(_make_job(plan, view, "debug"))
        record = {"job_id": job.job_id, "executor": "debug", "host": J.hostname(), "pid": os.getpid(),
                  "started_at": time.time(), "folder": str(folder)}
        with J.JobMap.locked(plan.job_map_path) as job_map:
            job_map.record(view.run_id, record)
        report.submitted.append(view.run_id)
        report.job_ids[view.run_id] = job.job_id
        log(f"[{index}/{len(chosen)}] {view.run_id}: training in-process (debug)")
        saved = dict(os.environ)
        os.environ["SUBMITIT_DEBUG_JOB_ID"] = job.job_id
        try:
            job.submission().result()
        except KeyboardInterrupt:
            report.interrupted = True
            raise
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - the run's status says what happened
            log(f"{view.run_id}: {type(exc).__name__}: {J.first_line(exc)}")
        finally:
            os.environ.clear()
            os.environ.update(saved)
        state = J.run_state(view.run_dir)
        if state in ("queued", "running"):
            J.write_status(view.run_dir, "failed", error="the trainer returned without finishing the run")
            state = "failed"
        with J.JobMap.locked(plan.job_map_path) as job_map:
            job_map.update_latest(view.run_id, ended_at=time.time(), final_state=state)
        report.final[view.run_id] = state
        log(f"[{index}/{len(chosen)}] {view.run_id}: {state}")


# ---------------------------------------------------------------------------------------------- local
def _local_pool(plan: SweepPlan, options: SubmitOptions):
    from sweeps.local_queue import SlotPool, available_gpus, default_cpu_jobs

    section = executor_options(dict(getattr(plan.sweep, "executor", {}) or {}))
    try:
        gpus = available_gpus()
    except ValueError as exc:
        raise UserError(str(exc)) from None
    cpu_jobs = options.cpu_jobs or section.get("cpu_jobs") or default_cpu_jobs()
    gpus_per_run = options.gpus_per_run if options.gpus_per_run is not None else section.get("gpus_per_run")
    if gpus_per_run is None:
        gpus_per_run = 1 if gpus else 0
    if gpus and gpus_per_run == 0:
        gpus = []  # asked for CPU runs on a GPU machine
    if not gpus and gpus_per_run > 0:
        raise UserError(f"runs need {gpus_per_run} GPUs each but no GPU is visible (CUDA_VISIBLE_DEVICES, "
                        "EMBSCALE_FAKE_GPUS); use --gpus-per-run 0 for CPU runs")
    if gpus and gpus_per_run > len(gpus):
        raise UserError(f"runs need {gpus_per_run} GPUs each but only {len(gpus)} are visible")
    timeout = options.timeout_min or section.get("timeout_min")
    return SlotPool(gpus, cpu_jobs), gpus_per_run, timeout, section


def _submit_local(plan: SweepPlan, views: list[RunView], chosen: list[RunView], options: SubmitOptions,
                  report: SubmitReport, log: Callable[[str], None], snapshot: Path | None) -> None:
    from sweeps.local_queue import DEFAULT_LOCAL_TIMEOUT_MIN, LocalQueue, QueueItem

    pool, gpus_per_run, timeout_min, section = _local_pool(plan, options)
    folder = plan.sweep_dir / "submitit"
    by_id = {view.run_id: view for view in views}
    started_here: dict[str, float] = {}
    final: dict[str, str] = {}
    bar_updates: list[Any] = []

    def record_job(key: str, record: dict[str, Any]) -> None:
        with J.JobMap.locked(plan.job_map_path) as job_map:
            job_map.record(key, record)
        J.write_status(by_id[key].run_dir, "queued", job_id=record["job_id"])
        started_here[key] = time.time()
        where = f"GPU {','.join(record['gpus'])}" if record["gpus"] else "CPU"
        log(f"started {key} on {where} (pid {record['pid']})")

    def finish_job(key: str, record: dict[str, Any]) -> None:
        with J.JobMap.locked(plan.job_map_path) as job_map:
            for entry in reversed(job_map.history(key)):
                if str(entry.get("job_id")) == str(record.get("job_id")):
                    entry.update(ended_at=record.get("ended_at"), exit_code=record.get("exit_code"))
                    break
        state = _finish_state(by_id[key], record)
        final[key] = state
        took = time.time() - started_here.get(key, record.get("started_at") or time.time())
        detail = J.first_line((J.read_status(by_id[key].run_dir) or {}).get("error")) if state != "completed" else ""
        log(f"{key}: {state} after {took:.0f}s" + (f": {detail}" if detail else ""))
        for progress in bar_updates:
            progress.update(1)

    queue = LocalQueue(folder, pool, extra_env=job_environment(snapshot),
                       cwd=snapshot if sys.version_info < (3, 11) else None,
                       timeout_min=timeout_min or DEFAULT_LOCAL_TIMEOUT_MIN, record_job=record_job,
                       finish_job=finish_job, poll_s=min(options.poll_s, 1.0), log=log)
    _close_dead_local_jobs(plan)
    # Jobs a killed driver left running keep their slots; this driver waits for them too (even a job whose
    # run has just completed holds its slot until its process exits).
    for view in views:
        if view.job and view.job.get("executor") == "local" and view.alive:
            if queue.adopt(view.run_id, view.job):
                report.adopted.append(view.run_id)
    if report.adopted:
        log(f"{len(report.adopted)} jobs still running from an earlier driver: {', '.join(report.adopted)}")

    items = []
    for view in chosen:
        _prepare(plan, view)
        items.append(QueueItem(key=view.run_id, fn=_make_job(plan, view, "local", timeout_min), gpus=gpus_per_run))
        report.submitted.append(view.run_id)
    where = f"{len(pool.gpus)} GPUs" if pool.has_gpus else f"{pool.cpu_jobs} CPU jobs at a time"
    log(f"local queue: {len(items)} runs, {where}")

    total = len(items) + len(report.adopted)
    last_line = [time.monotonic()]
    interval = options.log_interval_s or section.get("log_interval_s", 30.0)
    bar = _progress_bar(total, plan.name)
    if bar is not None:
        bar_updates.append(bar)

    def on_tick(q: LocalQueue, waiting: list[QueueItem]) -> None:
        if bar is None and time.monotonic() - last_line[0] >= interval:
            last_line[0] = time.monotonic()
            done = len(final)
            log(f"[{plan.name}] {done}/{total} done, {len(q.running)} running, {len(waiting)} waiting")

    def stop(signum: int, frame: Any) -> None:
        queue.stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        not_started = queue.run(items, on_tick=on_tick)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if bar is not None:
            bar.close()
    if queue.stopping:
        report.interrupted = True
        for item in not_started:  # back to pending so status does not call them queued
            J.write_status(by_id[item.key].run_dir, "pending", job_id=None)
        running = [entry.key for entry in queue.running]
        log(f"driver stopped: {len(running)} jobs keep running ({', '.join(running) or 'none'}), "
            f"{len(not_started)} not started; `embscale submit` again resumes, `embscale cancel` stops them")
    report.final = final
    report.job_ids = {key: str(h[-1].get("job_id")) for key, h in J.JobMap.load(plan.job_map_path).runs.items()
                      if h and key in report.submitted}


def _progress_bar(total: int, name: str) -> Any:
    """A tqdm bar of finished runs on a terminal (None elsewhere: plain log lines instead)."""
    from sweeps.progress import Progress, progress_mode

    if progress_mode() != "bar" or total == 0:
        return None
    return Progress(total, desc=f"sweep {name}", unit="run", mode="bar")


def _close_dead_local_jobs(plan: SweepPlan) -> None:
    """Give local jobs that ended while no driver watched (a killed driver's) their end time: when submitit
    wrote their result, else now."""
    with J.JobMap.locked(plan.job_map_path) as job_map:
        for history in job_map.runs.values():
            for entry in history:
                if entry.get("executor") != "local" or entry.get("ended_at") or not entry.get("pid"):
                    continue
                if J.local_job_alive(entry) is not False:
                    continue
                ended = time.time()
                paths = submitit.core.utils.JobPaths(entry.get("folder") or ".", job_id=str(entry["job_id"]),
                                                     task_id=0)
                with contextlib.suppress(OSError):
                    ended = paths.result_pickle.stat().st_mtime
                entry["ended_at"] = ended


# ---------------------------------------------------------------------------------------------- slurm
def _submit_slurm(plan: SweepPlan, chosen: list[RunView], options: SubmitOptions, report: SubmitReport,
                  log: Callable[[str], None], snapshot: Path | None) -> None:
    section = dict(getattr(plan.sweep, "slurm", {}) or {})
    params = slurm_parameters(section, options.slurm)
    max_requeues = int(params.pop("_max_requeues", 3))
    params.setdefault("job_name", f"embscale-{plan.name}")
    params.setdefault("time", 60 * 24)
    if "ntasks_per_node" not in params and params.get("gpus_per_node"):
        params["ntasks_per_node"] = params["gpus_per_node"]  # one task (DDP rank) per GPU
    setup = list(params.get("setup") or [])
    for key, value in job_environment(snapshot).items():
        setup.append(f"export {key}={_shell_quote(value)}")
    if setup:
        params["setup"] = setup
    if not chosen:
        return
    folder = plan.sweep_dir / "submitit"
    try:
        executor = submitit.SlurmExecutor(folder, max_num_timeout=max_requeues)
    except RuntimeError as exc:
        raise UserError(f"cannot submit to Slurm: {exc}") from None
    try:
        executor.update_parameters(**params)
    except ValueError as exc:
        raise UserError(f"bad Slurm parameters: {J.first_line(exc)}") from None
    signal_delay = float(params.get("signal_delay_s", 90))
    for view in chosen:
        _prepare(plan, view)
    fns = [_make_job(plan, view, "slurm", params["time"], signal_delay) for view in chosen]
    for fn in fns:
        fn.max_requeues = max_requeues
    try:
        with executor.batch():
            jobs = [executor.submit(fn) for fn in fns]
    except Exception as exc:
        for view in chosen:
            _restore_status(view)
        raise UserError(f"sbatch failed: {J.first_line(exc)}") from None
    with J.JobMap.locked(plan.job_map_path) as job_map:
        for view, job in zip(chosen, jobs, strict=True):
            job_map.record(view.run_id, {"job_id": str(job.job_id), "executor": "slurm", "host": J.hostname(),
                                         "folder": str(folder), "array_job_id": str(job.job_id).split("_")[0]})
    for view, job in zip(chosen, jobs, strict=True):
        J.write_status(view.run_dir, "queued", job_id=str(job.job_id))
        report.submitted.append(view.run_id)
        report.job_ids[view.run_id] = str(job.job_id)
    arrays = sorted({str(job.job_id).split("_")[0] for job in jobs})
    log(f"submitted {len(jobs)} runs as Slurm job array {', '.join(arrays)} "
        f"(at most {params.get('array_parallelism', 256)} at once)")
    if options.wait:
        report.final = wait_for_runs(plan, [v.run_id for v in chosen], options, log)


def _shell_quote(value: str) -> str:
    import shlex

    return shlex.quote(value)


def wait_for_runs(plan: SweepPlan, run_ids: list[str], options: SubmitOptions,
                  log: Callable[[str], None]) -> dict[str, str]:
    """Poll status files and the scheduler until none of ``run_ids`` is queued or running."""
    wanted = set(run_ids)
    last_line = 0.0
    final: dict[str, str] = {}
    bar = _progress_bar(len(wanted), plan.name)
    while True:
        views = [v for v in view_runs(plan) if v.run_id in wanted]
        pending = [v for v in views if v.in_flight and v.alive is not False]
        for view in views:
            if view.run_id not in final and not (view.in_flight and view.alive is not False):
                final[view.run_id] = view.state
                log(f"{view.run_id}: {view.state}" + (f": {view.detail}" if view.detail else ""))
                if bar is not None:
                    bar.update(1)
        if not pending:
            if bar is not None:
                bar.close()
            return final
        if bar is None and time.monotonic() - last_line >= options.log_interval_s:
            last_line = time.monotonic()
            running = sum(v.state == "running" for v in pending)
            log(f"[{plan.name}] {len(final)}/{len(wanted)} done, {running} running, "
                f"{len(pending) - running} queued")
        time.sleep(options.poll_s)


# ============================================================================================== cancel
@dataclass
class CancelReport:
    cancelled: list[str] = field(default_factory=list)
    driver_stopped: bool = False
    still_running: list[str] = field(default_factory=list)


def cancel(plan: SweepPlan, log: Callable[[str], None] | None = None, wait_s: float = 60.0) -> CancelReport:
    """Stop the sweep's driver (``submit`` or ``tune``), cancel every queued or running job of its runs and
    tune trials, and mark those runs ``cancelled``."""
    from sweeps.local_queue import kill_process_groups

    log = _safe_log(log)
    report = CancelReport()
    job_map = J.JobMap.load(plan.job_map_path)
    # Runs waiting in a driver's queue: the driver puts them back to pending when it stops; they are cancelled.
    waiting = {v.run_id: v.run_dir for v in view_runs(plan, job_map, query_slurm=False)
               if v.raw_state == "queued" and not (v.status or {}).get("job_id")}
    driver = job_map.data.get("driver") or {}
    if driver_alive(job_map) and driver.get("host") in (None, J.hostname()) and driver.get("pid") != os.getpid():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(driver["pid"]), signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and J.process_alive(driver.get("pid"), driver.get("proc_start")):
            time.sleep(0.1)
        report.driver_stopped = True
        log(f"stopped the driver (pid {driver['pid']})")
    views = view_runs(plan, J.JobMap.load(plan.job_map_path))
    targets = {v.run_id: (v.run_dir, v.job, v.alive) for v in views
               if v.raw_state in J.IN_FLIGHT_STATES or (v.alive and v.job) or v.run_id in waiting}
    # Jobs of the job map that are not planned runs: tune trials.
    planned = {v.run_id for v in views}
    others = {key: history[-1] for key, history in J.JobMap.load(plan.job_map_path).runs.items()
              if key not in planned and history and not history[-1].get("ended_at")}
    other_slurm = [str(j["job_id"]) for j in others.values() if j.get("executor") == "slurm"]
    squeue = J.squeue_states(other_slurm) if other_slurm else {}
    for key, job in others.items():
        if job.get("executor") == "local":
            alive: bool | None = J.local_job_alive(job)
        elif job.get("executor") == "slurm":
            alive = J.slurm_job_alive(job, squeue)
        else:
            alive = False
        if alive is not False and job.get("run_dir"):
            targets[key] = (Path(job["run_dir"]), job, alive)
    local = [(int(job.get("pgid") or job["pid"]), job.get("proc_start")) for _, job, alive in targets.values()
             if job and job.get("executor") == "local" and alive and job.get("pid")]
    kill_process_groups(local, grace_s=min(wait_s, 15.0))
    slurm_ids = [str(job["job_id"]) for _, job, alive in targets.values()
                 if job and job.get("executor") == "slurm" and alive is not False]
    if slurm_ids:
        out = subprocess.run(["scancel", *slurm_ids], capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            log(f"scancel: {J.first_line(out.stderr)}")
        deadline = time.monotonic() + wait_s
        remaining = set(slurm_ids)
        while remaining and time.monotonic() < deadline:
            states = J.squeue_states(sorted(remaining))
            remaining = set() if states is None else {j for j in remaining if j in states}
            if remaining:
                time.sleep(0.5)
        report.still_running = sorted(remaining)
    now = time.time()
    with J.JobMap.locked(plan.job_map_path) as job_map:
        for key in targets:
            latest = job_map.latest(key)
            if latest is not None and latest.get("job_id") and not latest.get("ended_at"):
                latest.update(ended_at=now, cancelled_at=now)
    for key, (run_dir, _, _) in targets.items():
        state = J.run_state(run_dir)
        if state in ("completed", "failed", "diverged"):
            continue
        J.write_status(run_dir, "cancelled")
        report.cancelled.append(key)
    log(f"cancelled {len(report.cancelled)} runs of sweep {plan.name}")
    return report


__all__ = [
    "EXECUTORS",
    "RunJob",
    "RunView",
    "SubmitOptions",
    "SubmitReport",
    "SweepPlan",
    "cancel",
    "code_snapshot",
    "load_plan",
    "select_runs",
    "slurm_parameters",
    "submit",
    "view_runs",
    "wait_for_runs",
]
