"""``embscale tune SWEEP.yaml``: tune a training hyperparameter with Optuna, e.g. the learning rate per width.

The search is described by the sweep file's ``tune:`` section (command-line flags override it)::

    tune:
      param: lr              # a training field (training.<param>)
      low: 1.0e-4
      high: 1.0e-2
      log: true              # sample on a log scale
      trials: 8              # trials per study
      per: width             # optional: one study per value of this sweep axis
      metric: val_code_loss  # a metrics.parquet column; its last value is the trial's result
      direction: minimize    # or maximize
      where: {family: moe}   # optional: which run of each group is tuned (default: the first)
      pruner: median         # median (prune on intermediate validation losses) or none
      startup_trials: 2      # trials completed before pruning starts
      parallel: 2            # most trials running at once (default: what the executor allows)
      seed: 0                # sampler seed

Every trial trains the group's run with ``training.<param>`` set to the sampled value, through the same
executors as ``submit`` (local queue, Slurm jobs, or in-process). While trials run their ``metrics.parquet`` is
read and each new validation loss reported to Optuna; a trial the pruner stops is cancelled (it checkpoints and
exits). Studies live in a journal file, ``results/<sweep>/tune/optuna.journal``
(``optuna.storages.JournalStorage``, safe on shared file systems), so running ``tune`` again continues them,
adopting trials whose jobs still run. The best values are written as a resolved sweep file,
``results/<sweep>/tuned.yaml`` (named ``<sweep>_tuned``; with ``per`` the tuned parameter becomes an axis zipped
with ``per``), ready for ``embscale submit``.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.config import ConfigError
from sweeps import dispatch
from sweeps import jobs as J
from sweeps.cli import UserError

TUNE_KEYS = ("param", "low", "high", "log", "trials", "per", "metric", "direction", "where", "pruner",
             "startup_trials", "parallel", "seed")
AXIS_PARAMS = ("lr", "seed")  # training fields that are also sweep axes (a per-axis value is expressible)


@dataclass
class TuneSpec:
    param: str
    low: float
    high: float
    log: bool = False
    trials: int = 8
    per: str | None = None
    metric: str = "val_loss"
    direction: str = "minimize"
    where: dict[str, Any] = field(default_factory=dict)
    pruner: str = "median"
    startup_trials: int = 2
    parallel: int | None = None
    seed: int = 0


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(where, f"must be a finite number, got {value!r}")
    return float(value)


def _count(value: Any, where: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(where, f"must be an integer of at least {low}, got {value!r}")
    return value


def parse_tune(section: Any, axes: tuple[str, ...]) -> TuneSpec:
    """Validate a ``tune:`` mapping; errors name ``tune.<key>``."""
    from sweeps.run_config import TrainingConfig

    if not isinstance(section, dict) or not section:
        raise ConfigError("tune", "must be a mapping with at least param, low and high "
                                  "(e.g. {param: lr, low: 1.0e-4, high: 1.0e-2, log: true})")
    unknown = [key for key in section if key not in TUNE_KEYS]
    if unknown:
        raise ConfigError(f"tune.{unknown[0]}", f"unknown key; known keys are {', '.join(TUNE_KEYS)}")
    for key in ("param", "low", "high"):
        if section.get(key) is None:
            raise ConfigError(f"tune.{key}", "is required")
    param = str(section["param"]).removeprefix("training.")
    fields = TrainingConfig.__dataclass_fields__
    if param not in fields:
        raise ConfigError("tune.param", f"{param!r} is not a training field; one of {', '.join(sorted(fields))}")
    low, high = _number(section["low"], "tune.low"), _number(section["high"], "tune.high")
    if not low < high:
        raise ConfigError("tune.high", f"must be above tune.low ({low:g}), got {high:g}")
    log = section.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError("tune.log", f"must be true or false, got {log!r}")
    if log and low <= 0:
        raise ConfigError("tune.low", f"must be positive on a log scale, got {low:g}")
    per = section.get("per")
    if per is not None:
        if per not in axes:
            raise ConfigError("tune.per", f"{per!r} is not an axis of this sweep; its axes are "
                                          f"{', '.join(axes) or 'none'}")
        if param not in AXIS_PARAMS:
            raise ConfigError("tune.per", f"a value of training.{param} per {per} cannot be written to a sweep "
                                          f"file (only {', '.join(AXIS_PARAMS)} are axes); tune it without per")
    direction = section.get("direction", "minimize")
    if direction not in ("minimize", "maximize"):
        raise ConfigError("tune.direction", f"unknown value {direction!r}; expected minimize or maximize")
    pruner = section.get("pruner", "median")
    if pruner not in ("median", "none"):
        raise ConfigError("tune.pruner", f"unknown value {pruner!r}; expected median or none")
    where = section.get("where") or {}
    if not isinstance(where, dict):
        raise ConfigError("tune.where", f"must be a mapping of point values, e.g. {{family: moe}}, got {where!r}")
    metric = section.get("metric", "val_loss")
    if not isinstance(metric, str) or not metric:
        raise ConfigError("tune.metric", f"must be a metrics column name such as val_code_loss, got {metric!r}")
    parallel = section.get("parallel")
    return TuneSpec(
        param=param, low=low, high=high, log=log,
        trials=_count(section.get("trials", 8), "tune.trials", 1), per=per, metric=metric,
        direction=direction, where=dict(where), pruner=pruner,
        startup_trials=_count(section.get("startup_trials", 2), "tune.startup_trials", 0),
        parallel=None if parallel is None else _count(parallel, "tune.parallel", 1),
        seed=_count(section.get("seed", 0), "tune.seed", 0),
    )  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", help="sweep file (YAML) with a tune: section")
    parser.add_argument("--executor", choices=dispatch.EXECUTORS, default=None,
                        help="where trials train (default: the sweep's executor.type, else local)")
    parser.add_argument("--results", default=None, help="results root (default: $EMBSCALE_RESULTS or ./results)")
    for key, kind in (("param", str), ("low", float), ("high", float), ("trials", int), ("per", str),
                      ("metric", str), ("direction", str), ("pruner", str), ("parallel", int), ("seed", int),
                      ("startup_trials", int)):
        parser.add_argument(f"--{key.replace('_', '-')}", dest=f"tune_{key}", type=kind, default=None,
                            metavar=key.upper(), help=f"overrides tune.{key}")
    parser.add_argument("--log-scale", dest="tune_log", action="store_const", const=True, default=None,
                        help="overrides tune.log")
    parser.add_argument("--cpu-jobs", type=int, default=None, help="local: concurrent CPU jobs")
    parser.add_argument("--gpus-per-run", type=int, default=None, help="local: GPUs per trial")
    parser.add_argument("--poll-s", type=float, default=None, help="seconds between looks at the trials")
    parser.add_argument("--no-snapshot", action="store_true", help="trials import the working tree")


# ============================================================================================== runners
@dataclass
class _Flight:
    group: str
    trial: Any
    run_dir: Path
    key: str
    reported: set[int] = field(default_factory=set)
    pruned: bool = False


class _Runner:
    """Starts trial jobs and tells which have ended; one subclass per executor."""

    capacity: int = 1

    def has_slot(self) -> bool:
        return True

    def start(self, key: str, job: dispatch.RunJob) -> dict[str, Any] | None:
        raise NotImplementedError

    def finished(self) -> list[str]:
        raise NotImplementedError

    def kill(self, key: str) -> None:
        raise NotImplementedError

    def adopt(self, key: str, record: dict[str, Any]) -> bool:
        return False


class _DebugRunner(_Runner):
    def __init__(self, folder: Path, log: Callable[[str], None]):
        import submitit

        self.executor = submitit.DebugExecutor(folder)
        self.done: list[str] = []
        self.log = log

    def start(self, key: str, job: dispatch.RunJob) -> dict[str, Any]:
        submitted = self.executor.submit(job)
        saved = dict(os.environ)
        os.environ["SUBMITIT_DEBUG_JOB_ID"] = submitted.job_id
        try:
            submitted.submission().result()
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - the run's status tells the outcome
            self.log(f"{key}: {type(exc).__name__}: {J.first_line(exc)}")
        finally:
            os.environ.clear()
            os.environ.update(saved)
        self.done.append(key)
        return {"job_id": submitted.job_id, "executor": "debug", "ended_at": time.time()}

    def finished(self) -> list[str]:
        done, self.done = self.done, []
        return done

    def kill(self, key: str) -> None:
        pass


class _LocalRunner(_Runner):
    def __init__(self, plan: dispatch.SweepPlan, options: dispatch.SubmitOptions, snapshot: Path | None,
                 log: Callable[[str], None]):
        import sys

        from sweeps.local_queue import DEFAULT_LOCAL_TIMEOUT_MIN, LocalQueue

        pool, self.gpus_per_run, timeout, _ = dispatch._local_pool(plan, options)
        self.capacity = pool.capacity() if not pool.has_gpus else len(pool.gpus) // max(1, self.gpus_per_run)
        self.ended: list[str] = []
        self.queue = LocalQueue(plan.sweep_dir / "submitit", pool, extra_env=dispatch.job_environment(snapshot),
                                cwd=snapshot if sys.version_info < (3, 11) else None,
                                timeout_min=timeout or DEFAULT_LOCAL_TIMEOUT_MIN,
                                finish_job=lambda key, record: self.ended.append(key), log=log)

    def has_slot(self) -> bool:
        pool = self.queue.pool
        if pool.has_gpus:
            return len(pool.free_gpus) >= max(1, self.gpus_per_run)
        return pool.busy_cpu < pool.cpu_jobs

    def start(self, key: str, job: dispatch.RunJob) -> dict[str, Any] | None:
        from sweeps.local_queue import QueueItem

        item = QueueItem(key=key, fn=job, gpus=self.gpus_per_run)
        if not self.queue.try_start(item):
            return None
        return dict(self.queue.running[-1].record)

    def finished(self) -> list[str]:
        self.queue.poll()
        ended, self.ended = self.ended, []
        return ended

    def kill(self, key: str) -> None:
        self.queue.kill(key)

    def adopt(self, key: str, record: dict[str, Any]) -> bool:
        return self.queue.adopt(key, record)


class _SlurmRunner(_Runner):
    def __init__(self, plan: dispatch.SweepPlan, options: dispatch.SubmitOptions, snapshot: Path | None,
                 parallel: int | None):
        import submitit

        params = dispatch.slurm_parameters(dict(getattr(plan.sweep, "slurm", {}) or {}), options.slurm)
        params.pop("_max_requeues", None)
        params.setdefault("job_name", f"embscale-{plan.name}-tune")
        params.setdefault("time", 60 * 24)
        if "ntasks_per_node" not in params and params.get("gpus_per_node"):
            params["ntasks_per_node"] = params["gpus_per_node"]
        setup = list(params.get("setup") or [])
        setup += [f"export {k}={dispatch._shell_quote(v)}" for k, v in dispatch.job_environment(snapshot).items()]
        if setup:
            params["setup"] = setup
        self.capacity = parallel or int(params.pop("array_parallelism", 4) or 4)
        params.pop("array_parallelism", None)
        self.folder = plan.sweep_dir / "submitit"
        try:
            self.executor = submitit.SlurmExecutor(self.folder)
        except RuntimeError as exc:
            raise UserError(f"cannot submit to Slurm: {exc}") from None
        self.executor.update_parameters(**params)
        self.time = params["time"]
        self.jobs: dict[str, str] = {}

    def has_slot(self) -> bool:
        return len(self.jobs) < self.capacity

    def start(self, key: str, job: dispatch.RunJob) -> dict[str, Any] | None:
        job.timeout_min = self.time
        submitted = self.executor.submit(job)
        self.jobs[key] = str(submitted.job_id)
        return {"job_id": str(submitted.job_id), "executor": "slurm", "folder": str(self.folder),
                "host": J.hostname()}

    def finished(self) -> list[str]:
        if not self.jobs:
            return []
        states = J.squeue_states(list(self.jobs.values()))
        if states is None:
            return []
        ended = [key for key, job_id in self.jobs.items() if job_id not in states]
        for key in ended:
            del self.jobs[key]
        return ended

    def kill(self, key: str) -> None:
        if key in self.jobs:
            import subprocess

            subprocess.run(["scancel", self.jobs[key]], capture_output=True, timeout=60, check=False)

    def adopt(self, key: str, record: dict[str, Any]) -> bool:
        if record.get("executor") != "slurm":
            return False
        states = J.squeue_states([str(record["job_id"])])
        if not states or str(record["job_id"]) not in states:
            return False
        self.jobs[key] = str(record["job_id"])
        return True


# ============================================================================================== the tuner
def metric_values(run_dir: Path, metric: str) -> list[tuple[int, float]]:
    """(step, value) of every logged value of ``metric`` in the run's metrics.parquet."""
    path = run_dir / "metrics.parquet"
    if not path.exists():
        return []
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=["step", metric])
    except Exception:  # noqa: BLE001 - being replaced, or the column does not exist (yet)
        return []
    steps = table.column("step").to_pylist()
    values = table.column(metric).to_pylist()
    return [(int(s), float(v)) for s, v in zip(steps, values, strict=True)
            if v is not None and math.isfinite(v)]


def final_value(run_dir: Path, metric: str) -> float | None:
    status = J.read_status(run_dir) or {}
    summary = status.get("summary") if isinstance(status.get("summary"), dict) else {}
    value = summary.get(metric)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    values = metric_values(run_dir, metric)
    return values[-1][1] if values else None


@dataclass
class Group:
    label: str
    value: Any
    run: Any
    study: Any = None


def _groups(plan: dispatch.SweepPlan, spec: TuneSpec) -> list[Group]:
    groups: dict[Any, Group] = {}
    for run in plan.runs:
        point = dict(run.point)
        point.setdefault("family", run.family)
        if any(point.get(k) != v for k, v in spec.where.items()):
            continue
        value = point.get(spec.per) if spec.per else None
        if spec.per and value is None:
            continue
        if value not in groups:
            label = f"{spec.per}-{value}" if spec.per else "all"
            groups[value] = Group(label=label, value=value, run=run)
    if not groups:
        raise UserError(f"no run of sweep {plan.name} matches tune.where {spec.where}")
    return list(groups.values())


def _trial_job(plan: dispatch.SweepPlan, group: Group, spec: TuneSpec, value: float,
               executor: str) -> tuple[dispatch.RunJob, Path]:
    from sweeps.run_config import RunConfig

    config = copy.deepcopy(dispatch.run_config_dict(group.run, plan))
    config["training"][spec.param] = value
    config["output"]["root"] = str(plan.sweep_dir / "tune")
    config["output"]["sweep"] = group.label
    run_id = RunConfig.from_dict(config).run_id
    run_dir = plan.sweep_dir / "tune" / group.label / run_id
    planned = {"run_id": run_id, "family": group.run.family, "point": {**group.run.point, spec.param: value},
               "sweep": plan.name, "tune": {"group": group.label, "param": spec.param, "value": value},
               dispatch.PLANNED_MARK: "embscale tune"}
    job = dispatch.RunJob(run_id, str(run_dir), config, executor=executor, planned=planned)
    return job, run_dir


def tune(plan: dispatch.SweepPlan, spec: TuneSpec, options: dispatch.SubmitOptions,
         log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the studies; returns ``{group label: {"value": best param, "metric": best metric, ...}}``.

    One driver per sweep: ``submit`` and ``tune`` of the same sweep do not run at once; ``embscale cancel``
    stops the tuner and its trials."""
    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    with dispatch._driver_lock(plan, f"tune-{options.executor}"):
        return _tune(plan, spec, options, log)


def _tune(plan: dispatch.SweepPlan, spec: TuneSpec, options: dispatch.SubmitOptions,
          log: Callable[[str], None] | None = None) -> dict[str, Any]:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    log = dispatch._safe_log(log)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tune_dir = plan.sweep_dir / "tune"
    tune_dir.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(tune_dir / "optuna.journal")))
    groups = _groups(plan, spec)
    for index, group in enumerate(groups):
        pruner = (optuna.pruners.MedianPruner(n_startup_trials=spec.startup_trials) if spec.pruner == "median"
                  else optuna.pruners.NopPruner())
        group.study = optuna.create_study(
            study_name=f"{plan.name}:{spec.param}:{group.label}", storage=storage, direction=spec.direction,
            sampler=optuna.samplers.TPESampler(seed=spec.seed + index), pruner=pruner, load_if_exists=True)
    distribution = optuna.distributions.FloatDistribution(spec.low, spec.high, log=spec.log)
    snapshot = dispatch.code_snapshot(plan.sweep_dir / "code") if options.snapshot else None
    if options.executor == "debug":
        runner: _Runner = _DebugRunner(plan.sweep_dir / "submitit", log)
    elif options.executor == "local":
        runner = _LocalRunner(plan, options, snapshot, log)
    else:
        runner = _SlurmRunner(plan, options, snapshot, spec.parallel)
    capacity = min(runner.capacity, spec.parallel or runner.capacity)
    flights: dict[str, _Flight] = {}

    def record_job(key: str, record: dict[str, Any]) -> None:
        with J.JobMap.locked(plan.job_map_path) as job_map:
            job_map.record(key, record)

    # Trials a killed tuner left running: adopt those whose job lives, redo the others.
    for group in groups:
        for frozen in group.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            attrs = frozen.user_attrs
            key, run_dir, job = attrs.get("key"), attrs.get("run_dir"), attrs.get("job")
            trial = optuna.trial.Trial(group.study, frozen._trial_id)
            if key and run_dir and job and runner.adopt(key, job):
                flights[key] = _Flight(group.label, trial, Path(run_dir), key)
                log(f"{group.label}: trial {frozen.number} still running ({spec.param}={frozen.params})")
            elif run_dir and J.run_state(Path(run_dir)) == "completed":
                _conclude(group.study, _Flight(group.label, trial, Path(run_dir), key or ""), spec, log)
            else:
                trial.set_user_attr("abandoned", True)
                group.study.tell(trial, state=TrialState.FAIL)
                group.study.enqueue_trial(frozen.params, skip_if_exists=False)
                log(f"{group.label}: trial {frozen.number} was left unfinished; it will be run again")

    def remaining(group: Group) -> int:
        done = [t for t in group.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                                         TrialState.FAIL))
                if not t.user_attrs.get("abandoned")]
        running = sum(1 for f in flights.values() if f.group == group.label)
        return spec.trials - len(done) - running

    stopping = {"now": False}

    def stop(signum: int, frame: Any) -> None:
        stopping["now"] = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    by_label = {g.label: g for g in groups}
    poll_s = options.poll_s
    try:
        while not stopping["now"]:
            for key in runner.finished():
                flight = flights.pop(key, None)
                if flight is not None and not flight.pruned:
                    _report(flight, spec)
                    _conclude(by_label[flight.group].study, flight, spec, log)
            for flight in list(flights.values()):
                if flight.pruned:
                    continue
                _report(flight, spec)
                if flight.trial.should_prune():
                    flight.pruned = True
                    runner.kill(flight.key)
                    by_label[flight.group].study.tell(flight.trial, state=TrialState.PRUNED)
                    log(f"{flight.group}: trial {flight.trial.number} pruned at step {max(flight.reported)} "
                        f"({spec.param}={flight.trial.params[spec.param]:.4g})")
                    flights.pop(flight.key)
            open_groups = [g for g in groups if remaining(g) > 0]
            started_any = False
            while open_groups and len(flights) < capacity and runner.has_slot():
                group = max(open_groups, key=remaining)
                trial = group.study.ask({spec.param: distribution})
                value = trial.params[spec.param]
                job, run_dir = _trial_job(plan, group, spec, value, options.executor)
                key = f"tune:{group.label}:{trial.number}"
                record = runner.start(key, job)
                if record is None:
                    raise RuntimeError(f"the {options.executor} runner refused trial {key} with a free slot")
                trial.set_user_attr("key", key)
                trial.set_user_attr("run_dir", str(run_dir))
                trial.set_user_attr("job", record)
                record_job(key, {**record, "run_dir": str(run_dir)})
                flights[key] = _Flight(group.label, trial, run_dir, key)
                started_any = True
                log(f"{group.label}: trial {trial.number} {spec.param}={value:.4g} (job {record.get('job_id')})")
                open_groups = [g for g in groups if remaining(g) > 0]
            if not flights and not any(remaining(g) > 0 for g in groups):
                break
            if not started_any:
                time.sleep(poll_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopping["now"]:
        log(f"tuner stopped; {len(flights)} trials keep running; `embscale tune` again continues the studies")
    return {group.label: _best(group, spec) for group in groups}


def _report(flight: _Flight, spec: TuneSpec) -> None:
    for step, value in metric_values(flight.run_dir, spec.metric):
        if step not in flight.reported:
            flight.reported.add(step)
            flight.trial.report(value, step)


def _conclude(study: Any, flight: _Flight, spec: TuneSpec, log: Callable[[str], None]) -> None:
    from optuna.trial import TrialState

    state = J.run_state(flight.run_dir)
    value = final_value(flight.run_dir, spec.metric) if state == "completed" else None
    flight.trial.set_user_attr("run_state", state)
    param = flight.trial.params.get(spec.param)
    if value is None:
        study.tell(flight.trial, state=TrialState.FAIL)
        why = state if state != "completed" else f"no {spec.metric} in its metrics"
        log(f"{flight.group}: trial {flight.trial.number} failed ({why}; {spec.param}={param:.4g})")
    else:
        study.tell(flight.trial, value)
        log(f"{flight.group}: trial {flight.trial.number} {spec.metric}={value:.4f} ({spec.param}={param:.4g})")


def _best(group: Group, spec: TuneSpec) -> dict[str, Any]:
    from optuna.trial import TrialState

    trials = group.study.get_trials(deepcopy=False)
    counts = {state.name.lower(): sum(t.state == state for t in trials)
              for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        return {"value": None, "metric": None, "trials": counts, "per": group.value}
    best = group.study.best_trial
    return {"value": best.params[spec.param], "metric": best.value, "trial": best.number, "trials": counts,
            "per": group.value, "run_dir": best.user_attrs.get("run_dir")}


# ============================================================================================== tuned.yaml
def tuned_mapping(plan: dispatch.SweepPlan, spec: TuneSpec, best: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The sweep file's mapping (extends resolved) with the tuned values in place of the searched ones."""
    data = dispatch.resolved_mapping(plan.sweep_path) if plan.sweep_path else {}
    data.pop("tune", None)
    data["name"] = f"{plan.name}_tuned"
    grid = dict(data.get("grid") or {})
    zips = data.get("zip") or []
    zips = [dict(zips)] if isinstance(zips, dict) else [dict(g) for g in zips]
    # The tuned parameter no longer varies on its own.
    grid.pop(spec.param, None)
    for group in zips:
        group.pop(spec.param, None)
    zips = [g for g in zips if g]
    if spec.per is None:
        value = next(iter(best.values()))["value"]
        data.setdefault("training", {})
        data["training"] = {**data["training"], spec.param: value}
    else:
        values = [entry["per"] for entry in best.values()]
        tuned = []
        for entry in best.values():
            tuned.append(entry["value"] if entry["value"] is not None else None)
        host = next((g for g in zips if spec.per in g), None)
        if host is not None:
            order = list(host[spec.per]) if isinstance(host[spec.per], list) else [host[spec.per]]
            lookup = dict(zip(values, tuned, strict=True))
            host[spec.param] = [lookup.get(v) for v in order]
        else:
            grid.pop(spec.per, None)
            zips.append({spec.per: values, spec.param: tuned})
    if grid:
        data["grid"] = grid
    else:
        data.pop("grid", None)
    if zips:
        data["zip"] = zips if len(zips) > 1 else zips[0]
    else:
        data.pop("zip", None)
    return data


def write_tuned(plan: dispatch.SweepPlan, spec: TuneSpec, best: dict[str, dict[str, Any]]) -> Path:
    import yaml

    from sweeps.status import atomic_write_text

    data = tuned_mapping(plan, spec, best)
    lines = [f"# {plan.name} with training.{spec.param} tuned by `embscale tune` ({spec.metric}, "
             f"{spec.direction}){' per ' + spec.per if spec.per else ''}:"]
    for label, entry in best.items():
        value = "untuned (no trial completed)" if entry["value"] is None else f"{entry['value']:.6g}"
        metric = "" if entry["metric"] is None else f" -> {spec.metric} {entry['metric']:.4f}"
        counts = ", ".join(f"{n} {state}" for state, n in entry["trials"].items() if n)
        lines.append(f"#   {label}: {spec.param} {value}{metric}  (trials: {counts or 'none'})")
    text = "\n".join(lines) + "\n" + yaml.safe_dump(data, sort_keys=False)
    path = plan.sweep_dir / "tuned.yaml"
    atomic_write_text(path, text)
    return path


# ============================================================================================== command
def spec_from_args(plan: dispatch.SweepPlan, args: argparse.Namespace) -> TuneSpec:
    section = dict(plan.extras.get("tune") or {})
    for key in TUNE_KEYS:
        value = getattr(args, f"tune_{key}", None)
        if value is not None:
            section[key] = value
    axes = tuple(getattr(plan.sweep, "axes", ()))
    try:
        return parse_tune(section, axes)
    except ConfigError as exc:
        where = str(plan.sweep_path) if plan.sweep_path else "tune"
        raise ConfigError(f"{where}: {exc.field}", exc.message) from None


def run(args: argparse.Namespace) -> int:
    plan = dispatch.load_plan(args.sweep, args.results)
    spec = spec_from_args(plan, args)
    section = dispatch.executor_options(dict(getattr(plan.sweep, "executor", {}) or {}))
    executor = args.executor or section.get("type") or "local"
    options = dispatch.SubmitOptions(executor=executor, cpu_jobs=args.cpu_jobs, gpus_per_run=args.gpus_per_run,
                                     poll_s=args.poll_s or (5.0 if executor == "slurm" else 0.5),
                                     snapshot=not args.no_snapshot)
    best = tune(plan, spec, options)
    path = write_tuned(plan, spec, best)
    for label, entry in best.items():
        value = "-" if entry["value"] is None else f"{entry['value']:.6g}"
        metric = "-" if entry["metric"] is None else f"{entry['metric']:.4f}"
        counts = ", ".join(f"{n} {state}" for state, n in entry["trials"].items() if n)
        print(f"{label}: {spec.param}={value} {spec.metric}={metric} ({counts or 'no trials'})")
    print(f"wrote {path}")
    if any(entry["value"] is None for entry in best.values()):
        return 1
    return 0


__all__ = ["TuneSpec", "parse_tune", "tune", "tuned_mapping", "write_tuned", "metric_values", "final_value"]
