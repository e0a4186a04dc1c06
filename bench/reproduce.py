"""The reproduction runbook: the paper's findings at small scale on one GPU, in device calls of bounded length.

::

    python -m embscale.bench.reproduce --out $OUT                          # one call: as far as --budget-s allows
    python -m embscale.bench.reproduce --out $OUT --restore prev/results.tar.gz   # on a fresh machine: continue

Each call works through the manifest (default ``sweeps/reproduction/manifest.yaml``; README.md beside it says what
each sweep tests and what it costs) as far as its time allows, and can be called again until everything is done:

1. ``--restore`` a ``results.tar.gz`` of an earlier call (a fresh machine has none of the earlier run folders,
   nor the trained tokenizer, which the archive carries so that every call tokenises alike); files already here
   win;
2. the corpus of the sweeps: its tokenizer and shards are built once (cached under ``EMBSCALE_CACHE``); a
   sweep whose runs would train on more than 95% of its training split stops the call here (exit 2), before any
   run starts;
3. the learning rate of each model size: ``embscale tune`` of every ``tune:`` sweep of the manifest (the MoE
   baseline of that size), each with its ``tune.parallel`` trials at once; a study that has written its
   ``tuned.yaml`` is done; a re-call continues the studies (their Optuna journal is in the results);
4. each reproduction sweep as soon as every size it trains has its learning rate: written out resolved
   (``results/reproduction/<sweep file>``, ``extends`` merged, the tuned rate of each size in place of the
   placeholder: ``training.lr`` for one size, an ``lr`` axis zipped with ``width``/``depth`` for several) and
   submitted with ``embscale submit``. The ``--runs-per-gpu`` slots are shared by all drivers (:class:`Scheduler`):
   tunes first, sweeps in proportion to their runs to go, and the slots of a driver that finished go to a running
   sweep (its driver is restarted with more; its jobs are adopted). Completed runs are skipped, so a re-call
   continues;
5. near the end of the budget, no run is started any more (the drivers get SIGTERM, their running jobs go on),
   the runs in flight are waited for, and those still running at ``--budget-s`` minus the packing reserve are
   cancelled (they run again in the next call);
6. every sweep with runs is collected (``embscale collect``: ``runs.parquet``, ``curves.parquet``,
   ``summary.csv``) and ``--out`` receives three files: ``results.tar.gz`` (the run folders without checkpoints
   or code snapshots, tune journals and tuned files, resolved sweeps, collected tables: what the next call's
   ``--restore`` and the repository need), ``progress.json`` (per sweep: runs planned, completed, failed, to
   go; the tuned rates; the corpus's token counts and tokenizer hash; each driver's slots and seconds; this call's
   phases and the seconds of every call so far) and ``reproduce.log`` (the drivers' own logs are in the archive,
   ``reproduction/logs/``).

Nothing is retried by hand: a failed run stays failed (``embscale submit --retry-failed`` reruns it) and is
reported in ``progress.json``. ``--executor debug`` / ``--cpu-jobs`` run the same control flow on a CPU (the test).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from embscale.base.datafile import read_yaml
from embscale.base.errors import ConfigError, UserError
from embscale.base.files import atomic_file, atomic_write_json, atomic_write_text
from embscale.sweeps.sweepfile import SWEEP_DIR, load_sweep_mapping

DEFAULT_MANIFEST = SWEEP_DIR / "reproduction" / "manifest.yaml"
RESOLVED_DIR = "reproduction"  # under the results root: the sweep files as submitted
SKIPPED_PARTS = {"checkpoints", "code", "submitit", "tensorboard", "wandb", "__pycache__"}
SKIPPED_NAMES = {"jobs.json"}  # job records: their processes do not outlive the machine
MAX_PACKED_FILE_BYTES = 4 << 20  # larger files (logs gone wild) stay behind
PROGRESS_FILE = "progress.json"
REPORT_FILE = "REPRODUCTION.md"
CACHE_PREFIX = "_cache"  # archive members restored into the embscale cache (the trained tokenizer)
MAX_EPOCHS = 0.95  # a run may see at most this share of its training split: no repeated data, with a margin


# ------------------------------------------------------------------------------------------------- the manifest
@dataclass(frozen=True)
class Manifest:
    """What the runbook runs: the ``tune`` sweeps (one per model size) and the reproduction ``sweeps``."""

    path: Path
    tune: tuple[Path, ...]
    sweeps: tuple[Path, ...]


def load_manifest(path: str | Path) -> Manifest:
    """``tune:`` and ``sweeps:`` lists of sweep files (paths relative to the manifest); errors name the file."""
    path = Path(path)
    data = read_yaml(path, "reproduction manifest")
    if not isinstance(data, dict) or set(data) - {"tune", "sweeps"} or not data.get("sweeps"):
        raise ConfigError("sweeps", "a manifest has a list 'sweeps' and optionally a list 'tune', nothing else"
                          ).in_file(str(path))
    lists = {}
    for key in ("tune", "sweeps"):
        items = data.get(key) or []
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise ConfigError(key, "must be a list of sweep file names").in_file(str(path))
        files = tuple((path.parent / item).resolve() for item in items)
        for item, file in zip(items, files, strict=True):
            if not file.is_file():
                raise ConfigError(key, f"{item}: no such sweep file beside {path}").in_file(str(path))
        lists[key] = files
    return Manifest(path, lists["tune"], lists["sweeps"])


# ---------------------------------------------------------------------------------------- learning rate by size
def model_size(mapping: dict[str, Any]) -> tuple[int, int]:
    """(width, depth) of a sweep mapping's base model (``width``/``d_model``, ``depth``/``n_layers``)."""
    model = mapping.get("model") or {}
    width = model.get("width", model.get("d_model"))
    depth = model.get("depth", model.get("n_layers"))
    if not isinstance(width, int) or not isinstance(depth, int):
        raise UserError(f"sweep {mapping.get('name')}: its model section states no width and depth")
    return width, depth


def sweep_sizes(mapping: dict[str, Any]) -> list[tuple[int, int]]:
    """Every (width, depth) a sweep mapping trains: its base model's, or those of a ``width``/``depth`` axis."""
    base_width, base_depth = model_size(mapping)
    grid = mapping.get("grid") or {}
    zips = mapping.get("zip") or []
    zips = [zips] if isinstance(zips, dict) else list(zips)

    def values(axis: str, base: int) -> tuple[list[int], str]:
        for group in zips:
            if axis in group:
                return _as_list(group[axis]), f"zip{zips.index(group)}"
        if axis in grid:
            return _as_list(grid[axis]), "grid"
        return [base], "base"

    widths, width_at = values("width", base_width)
    depths, depth_at = values("depth", base_depth)
    if width_at.startswith("zip") and width_at == depth_at:
        return list(dict.fromkeys(zip(widths, depths, strict=True)))
    return list(dict.fromkeys((w, d) for w in widths for d in depths))


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, list) else [value]


def with_learning_rates(mapping: dict[str, Any], rates: dict[tuple[int, int], float]) -> dict[str, Any]:
    """``mapping`` with the learning rate of each of its sizes: ``training.lr`` when it trains one size, else an
    ``lr`` list in the one zip group that holds ``width`` and/or ``depth``. Sizes on crossed (grid) axes are
    refused (a rate per size needs them zipped), and so is a size without a rate, naming it."""
    sizes = sweep_sizes(mapping)
    missing = [size for size in sizes if size not in rates]
    if missing:
        raise UserError(f"sweep {mapping.get('name')}: no tuned learning rate for width x depth "
                        f"{', '.join(f'{w}x{d}' for w, d in missing)} (add a tune sweep of that size)")
    out = json.loads(json.dumps(mapping))
    if len(sizes) == 1:
        out.setdefault("training", {})["lr"] = rates[sizes[0]]
        return out
    grid = out.get("grid") or {}
    zips = out.get("zip") or []
    groups = [zips] if isinstance(zips, dict) else zips
    hosts = [g for g in groups if "width" in g or "depth" in g]
    if "width" in grid or "depth" in grid or len(hosts) != 1:
        raise UserError(f"sweep {mapping.get('name')}: several sizes, not in one zip group; zip width and depth so "
                        "each size gets its own learning rate")
    host = hosts[0]
    base_width, base_depth = model_size(mapping)
    count = len(_as_list(host.get("width", host.get("depth"))))
    widths = _as_list(host.get("width", [base_width] * count))
    depths = _as_list(host.get("depth", [base_depth] * count))
    host["lr"] = [rates[(w, d)] for w, d in zip(widths, depths, strict=True)]
    return out


def tuned_rate(results: Path, tune_mapping: dict[str, Any]) -> float | None:
    """The learning rate ``embscale tune`` wrote for a tune sweep (``<results>/<name>/tuned.yaml``), if any."""
    tuned = results / str(tune_mapping["name"]) / "tuned.yaml"
    if not tuned.is_file():
        return None
    value = (read_yaml(tuned, "tuned sweep file").get("training") or {}).get("lr")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


# ------------------------------------------------------------------------------------------------ the runbook
@dataclass
class Call:
    """One call of the runbook: its clock, its log and what it records."""

    out: Path
    results: Path
    budget_s: float
    reserve_s: float
    run_wall_s: float
    started: float = field(default_factory=time.monotonic)
    lines: list[str] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def log(self, message: str) -> None:
        line = f"[{self.elapsed():6.1f}s] {message}"
        self.lines.append(line)
        print(line, flush=True)

    def stop_launching_at(self) -> float:
        """Seconds into the call after which no run starts: room left for one run and the packing."""
        return self.budget_s - self.reserve_s - self.run_wall_s

    def cancel_at(self) -> float:
        return self.budget_s - self.reserve_s


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "embscale", *args]


@dataclass
class Work:
    """One driver the runbook may start: a tune study (``tune``) or a sweep's submission (``submit``).

    ``command(slots)`` is its argv for that many runs at once; ``ready()`` says whether it may start (a sweep:
    every size it trains has its learning rate); ``to_go()`` how many runs it still has to train."""

    name: str
    kind: str
    command: Callable[[int], list[str]]
    cancel: list[str]
    ready: Callable[[], bool]
    to_go: Callable[[], int]
    fixed_slots: int | None = None  # a tune runs its `parallel` trials at once; a sweep takes a share
    slots: int = 0
    proc: subprocess.Popen | None = None
    handle: Any = None
    started_s: float = 0.0
    grow_to: int | None = None  # relaunch with this many slots once the stopped driver has exited
    finished: bool = False  # exited in this call: not started again
    record: list[dict[str, Any]] = field(default_factory=list)


class Scheduler:
    """Runs the drivers of :class:`Work` items on ``total_slots`` runs at once, work-conserving: tunes first,
    each sweep as soon as its sizes are tuned, with a share of the free slots in proportion to its runs to go; a
    driver whose sweep finished gives its slots to the others (a running driver grows by being stopped and
    started again with more: its running jobs are adopted, nothing is lost). At :meth:`Call.stop_launching_at`
    every driver gets SIGTERM (it starts nothing more; its jobs run on); the runs in flight are waited for, and
    those still running at :meth:`Call.cancel_at` are cancelled."""

    MIN_AGE_S = 15.0  # a driver is not stopped to grow before it has started its jobs
    LAST_LAUNCH_S = 10.0  # no driver starts this close to the stop time

    def __init__(self, call: Call, env: dict[str, str], total_slots: int):
        self.call, self.env, self.total = call, env, max(1, total_slots)
        self.logs = call.results / RESOLVED_DIR / "logs"
        self.stopped = False

    def run(self, works: list[Work]) -> None:
        from embscale.base import rundir

        self.logs.mkdir(parents=True, exist_ok=True)
        call = self.call
        free = self.total
        next_look = 0.0
        while True:
            running = [w for w in works if w.proc is not None]
            for work in running:
                if work.proc.poll() is None:
                    continue
                code = work.proc.returncode
                work.handle.close()
                work.record[-1].update(ended_s=round(call.elapsed(), 1), exit=code)
                work.proc = None
                if work.grow_to is not None and not self.stopped:  # its slots and the reserved extra
                    self._start(work, work.grow_to)
                    work.grow_to = None
                    continue
                free += work.slots + (work.grow_to - work.slots if work.grow_to else 0)
                work.grow_to, work.slots, work.finished = None, 0, True
                call.log(f"{work.name}: driver exited with code {code}")
            if not self.stopped and call.elapsed() >= call.stop_launching_at():
                self.stopped = True
                for work in works:
                    if work.proc is not None:
                        work.proc.send_signal(signal.SIGTERM)
                        work.record[-1]["stopped"] = True
                        call.log(f"{work.name}: no more runs start in this call (SIGTERM to its driver)")
            if not self.stopped and call.elapsed() >= next_look:
                next_look = call.elapsed() + 2.0
                free = self._launch(works, free)
            alive = [w for w in works if w.proc is not None]
            waiting = [w for w in works if not w.finished and w.proc is None and w.to_go() > 0
                       and (w.ready() or any(t.kind == "tune" and t.proc is not None for t in works))]
            if not alive and (self.stopped or not waiting):
                break
            time.sleep(0.5)
        # The stopped drivers' jobs run on: wait for them, cancel what is still running at the cancel time.
        busy = {w.name: w for w in works if w.record}
        while True:
            busy = {name: w for name, w in busy.items() if _in_flight(call.results / name, rundir)}
            if not busy or call.elapsed() >= call.cancel_at():
                break
            time.sleep(1.0)
        for name, work in sorted(busy.items()):
            call.log(f"{name}: runs still in flight at {call.elapsed():.0f}s: cancelling them (they rerun next call)")
            subprocess.run(work.cancel, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                           check=False, timeout=max(30.0, call.budget_s - call.elapsed()))

    def _launch(self, works: list[Work], free: int) -> int:
        """Start what may start with the free slots, else grow a running sweep; returns the slots left free."""
        if self.call.elapsed() >= self.call.stop_launching_at() - self.LAST_LAUNCH_S:
            return free
        idle = [w for w in works if w.proc is None and not w.finished and w.ready() and w.to_go() > 0]
        for work in [w for w in idle if w.fixed_slots]:  # tunes: their trials at once
            if free >= 1:
                slots = min(work.fixed_slots, free)
                self._start(work, slots)
                free -= slots
        sweeps = {w.name: w.to_go() for w in idle if not w.fixed_slots}
        if sweeps and free >= 1:
            for name, slots in share(free, sweeps).items():
                work = next(w for w in idle if w.name == name)
                if free >= slots >= 1:
                    self._start(work, slots)
                    free -= slots
        elif free >= 1:  # nothing left to start: give the free slots to the sweep with the most runs per slot
            candidates = [w for w in works if w.proc is not None and not w.fixed_slots and w.grow_to is None
                          and self.call.elapsed() - w.started_s >= self.MIN_AGE_S and w.to_go() > w.slots]
            if candidates:
                work = max(candidates, key=lambda w: w.to_go() / w.slots)
                extra = min(free, work.to_go() - work.slots)
                work.grow_to = work.slots + extra
                free -= extra
                work.proc.send_signal(signal.SIGTERM)
                self.call.log(f"{work.name}: {extra} more slots free; restarting its driver with {work.grow_to}")
        return free

    def _start(self, work: Work, slots: int) -> None:
        argv = work.command(slots)
        work.handle = open(self.logs / f"{work.name}.log", "a")  # noqa: SIM115 (closed when it exits)
        work.proc = subprocess.Popen(argv, stdout=work.handle, stderr=subprocess.STDOUT, env=self.env)
        work.slots, work.started_s = slots, self.call.elapsed()
        work.record.append({"slots": slots, "started_s": round(work.started_s, 1)})
        self.call.log(f"started {' '.join(argv[3:])} ({slots} at once, {work.to_go()} to go)")


def _in_flight(sweep_dir: Path, rundir: Any) -> bool:
    """Whether any run folder under ``sweep_dir`` (trial folders included) is queued or running."""
    for status in sweep_dir.rglob(rundir.STATUS_FILE):
        if rundir.run_state(status.parent) in rundir.IN_FLIGHT_STATES:
            return True
    return False


def sweep_counts(results: Path, plan: Any) -> dict[str, int]:
    """Runs of a plan by state (completed, failed, diverged, to_go)."""
    from embscale.base import rundir

    counts = {"planned": len(plan.runs), "completed": 0, "failed": 0, "diverged": 0, "to_go": 0}
    for run in plan.runs:
        state = rundir.run_state(plan.sweep_dir / run.run_id)
        key = state if state in ("completed", "failed", "diverged") else "to_go"
        counts[key] += 1
    return counts


def restore(call: Call, archive: Path) -> None:
    """Unpack an earlier call's ``results.tar.gz`` into the results root, keeping files already here."""
    if not archive.is_file():
        raise UserError(f"--restore: {archive} is not a file")
    from embscale.training.data.tokenizer import cache_root

    kept = added = 0
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            if not member.isfile() or member.name.startswith("/") or ".." in Path(member.name).parts:
                continue
            cached = member.name.startswith(CACHE_PREFIX + "/")
            target = (cache_root() / member.name[len(CACHE_PREFIX) + 1:]) if cached else call.results / member.name
            if target.exists():
                kept += 1
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(target) as tmp:
                Path(tmp).write_bytes(tar.extractfile(member).read())
            added += 1
    call.log(f"restored {added} files from {archive} ({kept} already here)")


def pack(call: Call, names: list[str], tokenizers: list[Path] = ()) -> Path:
    """``results.tar.gz`` of the named sweep folders (and the resolved sweeps), without checkpoints, code
    snapshots, job logs or files over 4 MB; with the ``tokenizers`` folders of the cache under ``_cache/``, so
    that a fresh machine tokenises with the very same BPE."""
    from embscale.training.data.tokenizer import cache_root

    target = call.out / "results.tar.gz"
    buffer = io.BytesIO()
    files = 0
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for folder in tokenizers:
            for path in sorted(Path(folder).glob("*.json")):
                tar.add(path, arcname=f"{CACHE_PREFIX}/{path.relative_to(cache_root()).as_posix()}")
                files += 1
        for name in sorted(set(names)) + [RESOLVED_DIR]:
            folder = call.results / name
            if not folder.is_dir():
                continue
            for path in sorted(folder.rglob("*")):
                parts = set(path.relative_to(call.results).parts)
                if (not path.is_file() or parts & SKIPPED_PARTS or path.name.endswith(".lock")
                        or path.name in SKIPPED_NAMES
                        or path.stat().st_size > MAX_PACKED_FILE_BYTES):
                    continue
                tar.add(path, arcname=path.relative_to(call.results).as_posix())
                files += 1
    with atomic_file(target) as tmp:
        Path(tmp).write_bytes(buffer.getvalue())
    call.log(f"packed {files} files of {len(set(names))} sweeps into {target} ({target.stat().st_size / 1e6:.1f} MB)")
    return target


def reproduce(args: argparse.Namespace) -> dict[str, Any]:
    """The runbook's one call (module docstring); returns what ``progress.json`` holds."""
    from embscale.sweeps.plan import load_plan

    call = Call(out=Path(args.out), results=Path(args.results).resolve(), budget_s=args.budget_s,
                reserve_s=args.reserve_s, run_wall_s=args.run_wall_s)
    call.out.mkdir(parents=True, exist_ok=True)
    call.results.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(args.manifest)
    if args.restore:
        restore(call, Path(args.restore))
    previous = _previous_progress(call.results)
    env = {**os.environ, "EMBSCALE_RESULTS": str(call.results), "PYTHONUNBUFFERED": "1"}
    executor = ["--executor", args.executor]
    if args.cpu_jobs:
        executor += ["--cpu-jobs", str(args.cpu_jobs)]
    tune_maps = {path: load_sweep_mapping(path) for path in manifest.tune}
    sweep_maps = {path: load_sweep_mapping(path) for path in manifest.sweeps}
    progress: dict[str, Any] = {"manifest": str(manifest.path), "budget_s": args.budget_s, "sweeps": {},
                                "learning_rates": {}, "calls": previous.get("calls", [])}

    # 2. the corpus, once for every distinct data section
    started = time.monotonic()
    corpora = {}
    for mapping in [*tune_maps.values(), *sweep_maps.values()]:
        corpora[json.dumps(mapping.get("data") or {}, sort_keys=True)] = mapping.get("data") or {}
    tokenizers = []
    earlier = {c.get("corpus_id"): c.get("tokenizer_sha256") for c in previous.get("corpora", [])}
    for data in corpora.values():
        corpora_info = _prepare(data)
        tokenizer_dir = corpora_info.pop("tokenizer_dir")
        call.log(f"corpus {data.get('corpus')}: {corpora_info}")
        if earlier.get(corpora_info["corpus_id"]) not in (None, corpora_info["tokenizer_sha256"]):
            raise UserError(f"corpus {corpora_info['corpus_id']}: the tokenizer differs from the one of the earlier "
                            "calls; restore their results.tar.gz (--restore), which carries it")
        progress.setdefault("corpora", []).append(corpora_info)
        if tokenizer_dir:
            tokenizers.append(Path(tokenizer_dir))
    call.phases["corpus"] = round(time.monotonic() - started, 1)
    _check_under_one_epoch([*tune_maps.values(), *sweep_maps.values()], progress.get("corpora", []))

    # 3-5. the learning rate of each size, then the reproduction sweeps, on the shared slots
    started = time.monotonic()
    rates: dict[tuple[int, int], float] = {}

    def refresh_rates() -> dict[tuple[int, int], float]:
        for mapping in tune_maps.values():
            rate = tuned_rate(call.results, mapping)
            if rate is not None:
                rates[model_size(mapping)] = rate
        return rates

    works: list[Work] = []
    for path, mapping in tune_maps.items():
        parallel = int((mapping.get("tune") or {}).get("parallel") or 1)
        works.append(Work(
            name=str(mapping["name"]), kind="tune", fixed_slots=parallel,
            command=lambda slots, path=path: _command("tune", str(path), *executor, "--parallel", str(slots)),
            cancel=_command("cancel", str(path)), ready=lambda: True,
            to_go=lambda mapping=mapping: int(tuned_rate(call.results, mapping) is None)))
    plans: dict[str, Any] = {}
    resolved: dict[str, Path] = {}

    def resolve(path: Path, mapping: dict[str, Any]) -> bool:
        """Write the sweep with its tuned rates once every size has one; whether it is resolved."""
        name = str(mapping["name"])
        if name in resolved:
            return True
        if manifest.tune and not all(size in refresh_rates() for size in sweep_sizes(mapping)):
            return False
        sized = with_learning_rates(mapping, rates) if manifest.tune else mapping
        target = call.results / RESOLVED_DIR / path.name
        header = f"# {path.name} as the runbook submitted it: extends merged, each size's tuned learning rate in\n"
        atomic_write_text(target, header + yaml.safe_dump(sized, sort_keys=False))
        plans[name] = load_plan(target, call.results)
        resolved[name] = target
        used = sorted({rate for size, rate in rates.items() if size in sweep_sizes(mapping)})
        call.log(f"{name}: resolved with learning rates {used}")
        return True

    for path, mapping in sweep_maps.items():
        name = str(mapping["name"])
        works.append(Work(
            name=name, kind="submit",
            command=lambda slots, name=name: _command("submit", str(resolved[name]), *executor, "--runs-per-gpu",
                                                      str(slots)),
            cancel=_command("cancel", str(call.results / RESOLVED_DIR / path.name)),
            ready=lambda path=path, mapping=mapping: resolve(path, mapping),
            to_go=lambda name=name: sweep_counts(call.results, plans[name])["to_go"] if name in plans else 1))
    if call.elapsed() < call.stop_launching_at():
        Scheduler(call, env, args.runs_per_gpu).run(works)
    for work in works:
        if work.kind == "tune" and work.record and not work.record[-1].get("stopped") and work.to_go():
            call.log(f"{work.name}: the tuner ended (exit {work.record[-1]['exit']}) without a learning rate; see "
                     f"{call.results / work.name / 'tune'} and {self_log(call, work.name)}")
    for mapping in tune_maps.values():
        size = model_size(mapping)
        progress["learning_rates"][f"{size[0]}x{size[1]}"] = tuned_rate(call.results, mapping)
    for path, mapping in sweep_maps.items():
        if resolve(path, mapping):
            progress["sweeps"][str(mapping["name"])] = sweep_counts(call.results, plans[str(mapping["name"])])
    progress["drivers"] = {work.name: work.record for work in works if work.record}
    call.phases["runs"] = round(time.monotonic() - started, 1)
    call.log(f"learning rates (width x depth): {progress['learning_rates']}")

    # 6. collect and pack
    started = time.monotonic()
    for name in resolved:
        if any((call.results / name).glob("*/" + "status.json")):
            result = subprocess.run(_command("collect", name, "--results", str(call.results)), env=env,
                                    capture_output=True, text=True, check=False)
            call.log(f"collect {name}: exit {result.returncode} {result.stdout.strip().splitlines()[-1:] or ''}")
    names = [str(m["name"]) for m in [*tune_maps.values(), *sweep_maps.values()]]
    call.phases["collect"] = round(time.monotonic() - started, 1)
    progress["calls"].append({"wall_s": round(call.elapsed(), 1), "phases": call.phases})
    progress["device_s_so_far"] = round(sum(c["wall_s"] for c in progress["calls"]), 1)
    progress["failed_runs"] = sum(c["failed"] + c["diverged"] for c in progress["sweeps"].values())
    progress["done"] = (len(progress["sweeps"]) == len(sweep_maps)
                        and all(c["to_go"] == 0 for c in progress["sweeps"].values()))
    atomic_write_json(call.results / RESOLVED_DIR / PROGRESS_FILE, progress)
    pack(call, names, tokenizers)
    atomic_write_json(call.out / PROGRESS_FILE, progress)
    if progress["done"]:
        result = subprocess.run(_command("findings", "--results", str(call.results), "--manifest",
                                         str(manifest.path), "--out", str(call.out / REPORT_FILE)),
                                env=env, capture_output=True, text=True, check=False)
        call.log(f"findings: exit {result.returncode} {(result.stdout + result.stderr).strip().splitlines()[:1]}")
    call.log(f"done: {progress['done']}; this call {call.elapsed():.0f}s, all calls {progress['device_s_so_far']}s")
    atomic_write_text(call.out / "reproduce.log", "\n".join(call.lines) + "\n")
    return progress


def _check_under_one_epoch(mappings: list[dict[str, Any]], corpora: list[dict[str, Any]]) -> None:
    """Refuse, before any run starts, a sweep whose runs would see their training split more than
    :data:`MAX_EPOCHS` times (the corpus on this machine is smaller than the plan assumed)."""
    smallest = min((c["train_tokens"] for c in corpora), default=None)
    for mapping in mappings:
        tokens = (mapping.get("training") or {}).get("tokens")
        if smallest and isinstance(tokens, (int, float)) and tokens > MAX_EPOCHS * smallest:
            raise UserError(f"sweep {mapping.get('name')}: {tokens:,.0f} training tokens per run is "
                            f"{tokens / smallest:.2f} epochs of this machine's training split ({smallest:,} "
                            f"tokens); lower training.tokens in its sweep files (sweeps/reproduction/base.yaml) "
                            "so that no run repeats its data")


def share(slots: int, todo: dict[str, int]) -> dict[str, int]:
    """``slots`` shared between sweeps in proportion to their runs to go: at least one each while slots last
    (the sweeps with most to go first), never more than a sweep has, never more than ``slots`` in all."""
    order = sorted(todo, key=lambda name: -todo[name])
    total = sum(todo.values())
    out, left = {}, slots
    for name in order:
        if left < 1:
            break
        want = max(1, min(todo[name], math.floor(slots * todo[name] / total)))
        out[name] = min(want, left)
        left -= out[name]
    for name in order:  # what rounding down left over, to those with runs beyond their share
        extra = min(left, todo[name] - out.get(name, 0)) if name in out else 0
        out[name] = out.get(name, 0) + extra if name in out else out.get(name, 0)
        left -= extra
    return {name: count for name, count in out.items() if count}


def _prepare(data: dict[str, Any]) -> dict[str, Any]:
    from embscale.training.config import DataConfig
    from embscale.training.data.shards import prepare_data

    started = time.monotonic()
    tokenizer, shards = prepare_data(DataConfig(**data), report=None)
    trained = tokenizer.source == "trained"
    return {"corpus": data.get("corpus"), "corpus_id": shards.corpus_id, "train_tokens": shards.train.n_tokens,
            "val_tokens": {name: shard.n_tokens for name, shard in shards.val.items()},
            "vocab_size": tokenizer.vocab_size, "tokenizer_sha256": tokenizer.fingerprint,
            "tokenizer_dir": str(Path(tokenizer.path).parent) if trained else None,
            "seconds": round(time.monotonic() - started, 1)}


def self_log(call: Call, name: str) -> Path:
    """The log file of a driver."""
    return call.results / RESOLVED_DIR / "logs" / f"{name}.log"


def _previous_progress(results: Path) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((results / RESOLVED_DIR / PROGRESS_FILE).read_text())
    return {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embscale.bench.reproduce", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for results.tar.gz, progress.json, reproduce.log "
                        "(and REPRODUCTION.md, embscale findings, once everything is done)")
    parser.add_argument("--manifest", default=str(DEFAULT_MANIFEST), help="tune and reproduction sweep files")
    parser.add_argument("--results", default="results", help="results root (default ./results)")
    parser.add_argument("--restore", default=None, help="results.tar.gz of an earlier call, on a fresh machine")
    parser.add_argument("--budget-s", type=float, default=540.0, help="wall seconds of this call (default 540)")
    parser.add_argument("--reserve-s", type=float, default=45.0,
                        help="seconds kept at the end for cancelling, collecting and packing (default 45)")
    parser.add_argument("--run-wall-s", type=float, default=150.0,
                        help="wall seconds one packed run takes, start-up included: no run starts later than "
                             "budget - reserve - this (default 150)")
    parser.add_argument("--runs-per-gpu", type=int, default=9, help="runs sharing the GPU, all sweeps together")
    parser.add_argument("--executor", default="local", choices=("local", "debug"), help="default local")
    parser.add_argument("--cpu-jobs", type=int, default=None, help="local executor without a GPU: jobs at once")
    args = parser.parse_args(argv)
    try:
        progress = reproduce(args)
    except (ConfigError, UserError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if progress["done"] else 3


if __name__ == "__main__":
    sys.exit(main())
