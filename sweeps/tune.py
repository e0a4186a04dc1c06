"""``embscale tune SWEEP.yaml``: tune a training hyperparameter with Optuna, e.g. the learning rate per width.

The search is described by the sweep file's ``tune:`` section (command-line flags override it)::

    tune:
      param: lr              # a training field (training.<param>)
      low: 1.0e-4
      high: 1.0e-2
      log: true              # sample on a log scale
      trials: 8              # trials per study
      per: width             # optional: one study per value of this sweep axis
      metric: val_code_loss  # a metrics column (default: the first validation loss); its last value is the result
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

import copy
import dataclasses
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embscale.base import rundir
from embscale.base.errors import ConfigError, UserError
from embscale.base.files import atomic_write_text
from embscale.sweeps.executors.base import Job
from embscale.sweeps.executors.jobmap import JobMap
from embscale.sweeps.plan import SweepPlan, run_config_dict
from embscale.sweeps.runjob import RunJob
from embscale.sweeps.sections import TuneSpec
from embscale.sweeps.snapshot import code_snapshot
from embscale.sweeps.submit import SubmitOptions, driver_lock, make_executor, safe_log
from embscale.sweeps.sweepfile import load_sweep_mapping


@dataclass
class _Flight:
    """A trial whose job runs."""

    group: str
    trial: Any
    run_dir: Path
    key: str
    reported: set[int] = field(default_factory=set)
    pruned: bool = False


def metric_values(run_dir: Path, metric: str) -> list[tuple[int, float]]:
    """(step, value) of every logged value of ``metric`` in the run's metrics (none while there are none, the
    file is being replaced, or the column is not there yet)."""
    table = rundir.read_metrics(run_dir, columns=["step", metric])
    if table is None:
        return []
    steps = table.column("step").to_pylist()
    values = table.column(metric).to_pylist()
    return [(int(s), float(v)) for s, v in zip(steps, values, strict=True)
            if v is not None and math.isfinite(v)]


def final_value(run_dir: Path, metric: str) -> float | None:
    status = rundir.read_status(run_dir) or {}
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


def _groups(plan: SweepPlan, spec: TuneSpec) -> list[Group]:
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


def _trial_job(plan: SweepPlan, group: Group, spec: TuneSpec, value: float,
               executor: str, gpus: int, processes: int = 1) -> tuple[Job, Path]:
    from embscale.training.config import RunConfig

    config = copy.deepcopy(run_config_dict(group.run, plan))
    config["training"][spec.param] = value
    config["output"]["root"] = str(plan.sweep_dir / "tune")
    config["output"]["sweep"] = group.label
    run_id = RunConfig.from_dict(config).run_id
    run_dir = plan.sweep_dir / "tune" / group.label / run_id
    planned = {"run_id": run_id, "family": group.run.family, "point": {**group.run.point, spec.param: value},
               "sweep": plan.name, "tune": {"group": group.label, "param": spec.param, "value": value},
               rundir.PLANNED_BY: "embscale tune"}
    job = RunJob(run_id, str(run_dir), config, executor=executor, planned=planned)
    return Job(key="", fn=job, gpus=gpus, processes=processes), run_dir


def metric_columns(plan: SweepPlan, spec: TuneSpec) -> list[str]:
    """The metrics columns the tuned runs will write, validation losses first (what ``tune.metric`` may name)."""
    from embscale.training.config import DataConfig
    from embscale.training.data.corpus import val_split_names
    from embscale.training.metrics import BASE_COLUMNS

    columns: list[str] = []
    for group in _groups(plan, spec):
        data = DataConfig(**dict(group.run.config).get("data", {}))
        columns += [rundir.val_loss_column(split) for split in val_split_names(data)]
    others = [c for c in BASE_COLUMNS if c not in ("step", "tokens", "lr")] + ["aux_loss"]
    return list(dict.fromkeys(columns + others))


def resolve_metric(plan: SweepPlan, spec: TuneSpec) -> TuneSpec:
    """``spec`` with its metric checked against the columns the runs will write (a ConfigError naming
    ``tune.metric`` and the valid names otherwise), or, when none was given, the first validation loss."""
    columns = metric_columns(plan, spec)
    if spec.metric is None:
        return dataclasses.replace(spec, metric=columns[0])
    if spec.metric not in columns:
        raise ConfigError("tune.metric", f"{spec.metric!r} is not a column the tuned runs write; one of "
                                         f"{', '.join(columns)}")
    return spec


def tune(plan: SweepPlan, spec: TuneSpec, options: SubmitOptions,
         log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the studies; returns ``{group label: {"value": best param, "metric": best metric, ...}}``.

    The metric is checked before anything is written (:func:`resolve_metric`). One driver per sweep: ``submit``
    and ``tune`` of the same sweep do not run at once; ``embscale cancel`` stops the tuner and its trials."""
    spec = resolve_metric(plan, spec)
    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    with driver_lock(plan, f"tune-{options.executor}"):
        return _tune(plan, spec, options, log)


def _tune(plan: SweepPlan, spec: TuneSpec, options: SubmitOptions,
          log: Callable[[str], None] | None = None) -> dict[str, Any]:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    log = safe_log(log)
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
    snapshot = code_snapshot(plan.sweep_dir / "code") if options.snapshot else None
    executor, gpus_per_run = make_executor(plan, options, snapshot, log, f"embscale-{plan.name}-tune")
    processes = getattr(executor, "processes", 1)  # the local queue's CPU ranks per run
    capacity = spec.parallel or executor.slots()
    flights: dict[str, _Flight] = {}

    def record_job(key: str, record: dict[str, Any]) -> None:
        with JobMap.locked(plan.job_map_path) as job_map:
            job_map.record(key, record)

    # Trials a killed tuner left running: adopt those whose job lives, redo the others.
    for group in groups:
        for frozen in group.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            attrs = frozen.user_attrs
            key, run_dir, job = attrs.get("key"), attrs.get("run_dir"), attrs.get("job")
            trial = optuna.trial.Trial(group.study, frozen._trial_id)
            if key and run_dir and job and executor.adopt(key, job):
                flights[key] = _Flight(group.label, trial, Path(run_dir), key)
                log(f"{group.label}: trial {frozen.number} still running ({spec.param}={frozen.params})")
            elif run_dir and rundir.run_state(Path(run_dir)) == "completed":
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
            for key, _ in executor.poll():
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
                    executor.cancel([flight.key])
                    by_label[flight.group].study.tell(flight.trial, state=TrialState.PRUNED)
                    log(f"{flight.group}: trial {flight.trial.number} pruned at step {max(flight.reported)} "
                        f"({spec.param}={flight.trial.params[spec.param]:.4g})")
                    flights.pop(flight.key)
            open_groups = [g for g in groups if remaining(g) > 0]
            started_any = False
            while open_groups and len(flights) < capacity and executor.has_slot(gpus_per_run, processes):
                group = max(open_groups, key=remaining)
                trial = group.study.ask({spec.param: distribution})
                value = trial.params[spec.param]
                job, run_dir = _trial_job(plan, group, spec, value, options.executor, gpus_per_run, processes)
                key = job.key = f"tune:{group.label}:{trial.number}"
                started = executor.start([job])
                if not started:
                    raise RuntimeError(f"the {options.executor} executor refused trial {key} with a free slot")
                record = started[0][1]
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
        executor.close()  # idle warm workers exit; busy ones after their trial
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

    state = rundir.run_state(flight.run_dir)
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
            "per": group.value, "run_dir": best.user_attrs.get("run_dir"),
            "edge": edge_of_trials(best.params[spec.param], [t.params[spec.param] for t in complete])}


def edge_of_trials(best: float, tried: list[float]) -> str | None:
    """``"lowest"`` or ``"highest"`` when the best value is the lowest or highest of three or more completed
    trials' values: the optimum was not bracketed and may lie beyond what was tried; else None."""
    if len(set(tried)) < 3:
        return None
    return "lowest" if best <= min(tried) else "highest" if best >= max(tried) else None


def edge_warning(label: str, entry: dict[str, Any], spec: TuneSpec) -> str | None:
    """The warning for a best value at the edge of the trials (see :func:`edge_of_trials`), naming the range."""
    if not entry.get("edge"):
        return None
    beyond = "below" if entry["edge"] == "lowest" else "above"
    return (f"{label}: the best {spec.param} ({entry['value']:.4g}) is the {entry['edge']} of the "
            f"{entry['trials'].get('complete', 0)} completed trials (searched in [{spec.low:g}, {spec.high:g}]); "
            f"the optimum may lie {beyond} it: run more trials or move the range")


def tuned_mapping(plan: SweepPlan, spec: TuneSpec, best: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The sweep file's mapping (extends resolved) with the tuned values in place of the searched ones."""
    data = load_sweep_mapping(plan.sweep_path) if plan.sweep_path else {}
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


def write_tuned(plan: SweepPlan, spec: TuneSpec, best: dict[str, dict[str, Any]]) -> Path:
    import yaml

    data = tuned_mapping(plan, spec, best)
    lines = [f"# {plan.name} with training.{spec.param} tuned by `embscale tune` ({spec.metric}, "
             f"{spec.direction}){' per ' + spec.per if spec.per else ''}:"]
    for label, entry in best.items():
        value = "untuned (no trial completed)" if entry["value"] is None else f"{entry['value']:.6g}"
        metric = "" if entry["metric"] is None else f" -> {spec.metric} {entry['metric']:.4f}"
        counts = ", ".join(f"{n} {state}" for state, n in entry["trials"].items() if n)
        lines.append(f"#   {label}: {spec.param} {value}{metric}  (trials: {counts or 'none'})")
        warning = edge_warning(label, entry, spec)
        if warning:
            lines.append(f"#   WARNING: {warning}")
    text = "\n".join(lines) + "\n" + yaml.safe_dump(data, sort_keys=False)
    path = plan.sweep_dir / "tuned.yaml"
    atomic_write_text(path, text)
    return path


__all__ = ["edge_of_trials", "edge_warning", "final_value", "metric_columns", "metric_values", "resolve_metric",
           "tune", "tuned_mapping", "write_tuned"]
