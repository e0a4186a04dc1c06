"""Warm workers: one long-lived process per local slot that trains one-process runs one after another.

A fresh process per run pays, for every run, the imports (torch, Triton), the CUDA context and the kernel builds
of its first steps: on an H200 14-21 s of start-up for runs of about 15 s of training (BENCHMARKS.md, "Packed
runs"). With ``executor.warm_workers`` (``embscale submit --warm-workers``) the local executor instead starts one
worker per slot (a GPU slot of ``runs_per_gpu``, or a CPU job slot), pinned for its life to the slot's GPU
(``CUDA_VISIBLE_DEVICES`` cannot change inside a process), and hands it the slot's runs one at a time: imports
once, CUDA context once, Triton kernels loaded once.

The driver and a worker talk through files and one pipe:

- the driver writes each job's callable (a :class:`~embscale.sweeps.runjob.RunJob`) to
  ``<folder>/<job_id>_submitted.pkl`` and one JSON line on the worker's stdin naming it. A run's job id is the
  worker's pid and the run's number in that worker, ``<pid>.<n>``;
- the worker sends the run's output to ``<job_id>_0_log.out`` / ``_log.err`` and, when the call returns or raises,
  writes ``<job_id>_0_result.pkl`` atomically (submitit's ``("success", value)`` / ``("error", traceback)``): the
  file that says the run ended (:func:`run_ended`), read by the same code as a submitit job's;
- a worker exits at the end of its stdin (its driver closed it, or died: a killed driver's workers finish the run
  they have and exit, as a fresh job would), after a run that a signal interrupted (``embscale cancel`` signals
  the worker's process group: the run checkpoints, and the worker takes no further run), and after a run that
  raised ``SystemExit`` or ``KeyboardInterrupt``. A run that raises an exception is failed by its RunJob, as in a
  fresh process, and the worker goes on, unless the worker has a CUDA context (some CUDA errors leave it unusable
  for the process's life): then a fresh worker takes the slot's next run. A run that kills the process (a
  segfault, the OOM killer) leaves no result file; the driver marks that run failed and starts a fresh worker for
  the slot's next run.

Between runs the worker puts back what a run may change in the process (:class:`ProcessState`): environment,
working folder, signal handlers, logging handlers, warning filters, torch's thread count, default dtype and
backend flags; it resets TorchDynamo (compiled graphs are guarded on the previous run's modules, and a fresh
process would compile the next run from scratch: the same graphs, so the same numbers), collects garbage and
empties the CUDA caching allocator. Every RNG is seeded by the trainer (``training.seed``) before it builds the
model, so a run's numbers do not depend on the runs before it (tests/test_warm.py checks bit for bit on CPU).

Multi-process runs (``executor.processes`` above 1, ``gpus_per_run`` above 1) keep a process group per run.
"""

from __future__ import annotations

import contextlib
import faulthandler
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import submitit
from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE  # a task asking to be restarted (near its time limit)

STOP_SUFFIX = "_0_worker_stops"  # beside a run's result: its worker takes no further run
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "SIGUSR2")
TIMEOUT_SIGNAL = signal.SIGUSR2  # what submitit's local controller sends near a job's time limit
MAX_REQUEUES = 6  # submitit's local controller restarts a task at most this often (a task's default)


def job_paths(folder: Path | str, job_id: str) -> submitit.core.utils.JobPaths:
    """submitit's file names for job ``job_id`` (task 0): the same logs and result file as a submitit job."""
    return submitit.core.utils.JobPaths(folder, job_id=str(job_id), task_id=0)


def run_ended(folder: Path | str, job_id: str) -> bool:
    """Whether the run ``job_id`` of a warm worker has its result file (it ended, whatever the worker does)."""
    return job_paths(folder, job_id).result_pickle.exists()


def worker_stops(folder: Path | str, job_id: str) -> bool:
    """Whether the worker that trained ``job_id`` exits after it (it said so before writing the result)."""
    return job_paths(folder, job_id).folder.joinpath(f"{job_id}{STOP_SUFFIX}").exists()


def result_exit_code(folder: Path | str, job_id: str) -> int | None:
    """0 for a run whose call returned, 1 for one that raised; None when there is no readable result."""
    try:
        outcome, _ = submitit.core.utils.pickle_load(job_paths(folder, job_id).result_pickle)
    except Exception:  # noqa: BLE001 - absent or unreadable
        return None
    return 0 if outcome == "success" else 1


# ----------------------------------------------------------------------------------------------------- process state
class ProcessState:
    """What a run may change in its process, taken once (:meth:`take`) and put back after every run
    (:meth:`restore`), so the next run starts from the state a fresh worker had."""

    def __init__(self) -> None:
        self.environ: dict[str, str] = {}
        self.cwd = ""
        self.handlers: dict[int, Any] = {}
        self.log_handlers: list[logging.Handler] = []
        self.log_level = logging.WARNING
        self.warning_filters: list[Any] = []
        self.torch: dict[str, Any] = {}

    @classmethod
    def take(cls) -> ProcessState:
        import torch

        self = cls()
        self.environ = dict(os.environ)
        self.cwd = os.getcwd()
        for name in STOP_SIGNALS:
            signum = getattr(signal, name, None)
            if signum is not None:
                self.handlers[signum] = signal.getsignal(signum)
        root = logging.getLogger()
        self.log_handlers, self.log_level = list(root.handlers), root.level
        self.warning_filters = list(warnings.filters)
        self.torch = {
            "threads": torch.get_num_threads(),
            "dtype": torch.get_default_dtype(),
            "deterministic": torch.are_deterministic_algorithms_enabled(),
            "matmul_precision": torch.get_float32_matmul_precision(),
            "cuda_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_tf32": torch.backends.cudnn.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
        }
        return self

    def restore(self) -> None:
        import torch

        os.environ.clear()
        os.environ.update(self.environ)
        with contextlib.suppress(OSError):
            os.chdir(self.cwd)
        for signum, handler in self.handlers.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, handler)
        root = logging.getLogger()
        for handler in list(root.handlers):
            if handler not in self.log_handlers:
                root.removeHandler(handler)
                with contextlib.suppress(Exception):
                    handler.close()
        root.setLevel(self.log_level)
        warnings.filters[:] = self.warning_filters
        mutated = getattr(warnings, "_filters_mutated", None)  # drop the cached "once" decisions
        if mutated is not None:
            mutated()
        state = self.torch
        torch.set_num_threads(state["threads"])
        torch.set_default_dtype(state["dtype"])
        torch.use_deterministic_algorithms(state["deterministic"])
        torch.set_float32_matmul_precision(state["matmul_precision"])
        torch.backends.cuda.matmul.allow_tf32 = state["cuda_tf32"]
        torch.backends.cudnn.allow_tf32 = state["cudnn_tf32"]
        torch.backends.cudnn.benchmark = state["cudnn_benchmark"]
        torch.backends.cudnn.deterministic = state["cudnn_deterministic"]
        if "torch._dynamo" in sys.modules:
            torch._dynamo.reset()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        gc.collect()
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


# ----------------------------------------------------------------------------------------------------- the worker
def _timeout_outside_training(signum: int, frame: Any) -> None:
    print("embscale: time-limit signal before the run trains: ignored", file=sys.stderr, flush=True)


def open_descriptors() -> int | None:
    """How many file descriptors this process holds (None without /proc)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def cuda_in_use() -> bool:
    """Whether this process has created a CUDA context (torch imported and CUDA initialised)."""
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


@contextlib.contextmanager
def output_to(stdout: Path, stderr: Path):
    """File descriptors 1 and 2 (and so ``print``, logging and C code's output) into the run's log files."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(stdout, "ab", buffering=0) as out, open(stderr, "ab", buffering=0) as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


class Worker:
    """The worker's loop: read a task line, train the run, write its result, put the process back, repeat."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.runs = 0

    def serve(self, tasks: Any) -> int:
        faulthandler.enable()  # a segfault leaves a traceback in the run's error log
        # the time-limit signal outside the trainer's loop (during a run's start-up) must not kill the worker, as
        # submitit's own handler spares a fresh job; the trainer's handler takes it while it trains
        signal.signal(TIMEOUT_SIGNAL, _timeout_outside_training)
        state = ProcessState.take()
        baseline_fds = None
        for line in tasks:
            if not line.strip():
                continue
            task = json.loads(line)
            received = time.time()
            self.runs += 1
            stop = self.run_task(task, received)
            state.restore()
            # files a run left open are not closed behind its back (a library may own them), but said: the count
            # after the first run (imports open some for the process's life) is the baseline
            fds = open_descriptors()
            if baseline_fds is None or fds is None:
                baseline_fds = fds
            elif fds > baseline_fds:
                print(f"embscale: warm worker {os.getpid()}: {fds - baseline_fds} more open file descriptors after "
                      f"run {self.runs} than after its first run", file=sys.stderr, flush=True)
            if stop:
                return 0
        return 0

    def run_task(self, task: dict[str, Any], received: float) -> bool:
        """Train one task's run into its log files; whether the worker must stop after it."""
        job_id = str(task["job_id"])
        paths = job_paths(self.folder, job_id)
        with output_to(paths.stdout, paths.stderr):
            print(f"embscale: warm worker {os.getpid()}, run {self.runs} of this process (job {job_id})",
                  flush=True)
            try:
                fn = submitit.core.utils.pickle_load(task["pickle"])
            except Exception:  # noqa: BLE001 - a task that cannot be loaded fails alone
                outcome, stop = ("error", traceback.format_exc()), False
                print(outcome[1], file=sys.stderr, flush=True)
            else:
                if hasattr(fn, "startup_since"):  # a RunJob: the first run counts its start-up from the worker's
                    # start (its imports), later ones from when the worker took them
                    fn.started_at = None if self.runs == 1 else received
                    fn.startup_since = None if self.runs == 1 else "warm worker task"
                outcome, stop = self._call(fn, task, job_id)
        if stop:  # said before the result, so a driver that sees the result knows it
            paths.folder.joinpath(f"{job_id}{STOP_SUFFIX}").touch()
        self._write_result(paths.result_pickle, outcome)
        return stop

    def _call(self, fn: Any, task: dict[str, Any], job_id: str) -> tuple[tuple[str, Any], bool]:
        """Call ``fn`` (again after each restart it asks for at its time limit): its submitit-style outcome, and
        whether the worker must stop after it."""
        max_requeues = int(task.get("max_requeues", MAX_REQUEUES))
        for attempt in range(max_requeues + 1):
            # the job's clock starts with its timer (just before it): the run judges "timed out" from here, as a
            # fresh job's controller times it from the job's start (not from when the run has imported its modules)
            fn.clock_started = time.time()
            timer = self._arm_timer(task)
            try:
                value = fn()
            except SystemExit as exc:
                if exc.code == LOCAL_REQUEUE_RETURN_CODE and attempt < max_requeues:
                    print(f"embscale: job {job_id} restarts (time limit)", flush=True)
                    if hasattr(fn, "startup_since"):
                        fn.started_at, fn.startup_since = time.time(), "warm worker task"
                    continue
                return ("error", f"SystemExit({exc.code!r})"), True
            except BaseException as exc:  # noqa: BLE001 - the run's failure is its own; the worker goes on
                print(traceback.format_exc(), file=sys.stderr, flush=True)
                # KeyboardInterrupt and the like end the worker; so does any error once CUDA is in use, since
                # some CUDA errors leave the process's context unusable: a fresh worker takes the next run
                return ("error", traceback.format_exc()), not isinstance(exc, Exception) or cuda_in_use()
            finally:
                if timer is not None:
                    timer.cancel()
            # a signal interrupted the run (cancel, a stopping driver): take no further run
            return ("success", value), isinstance(value, dict) and value.get("state") == "interrupted"
        raise AssertionError("unreachable: the last attempt returns")

    @staticmethod
    def _arm_timer(task: dict[str, Any]) -> threading.Timer | None:
        """SIGUSR2 to this process ``signal_delay_s`` before the job's time limit, as submitit's local controller
        sends it: the trainer checkpoints, and the RunJob asks for a restart (exit code 144)."""
        timeout_s = task.get("timeout_s")
        if not timeout_s:
            return None
        delay = max(1.0, float(timeout_s) - float(task.get("signal_delay_s") or 30))
        timer = threading.Timer(delay, os.kill, (os.getpid(), TIMEOUT_SIGNAL))
        timer.daemon = True
        timer.start()
        return timer

    @staticmethod
    def _write_result(path: Path, outcome: tuple[str, Any]) -> None:
        temporary = path.with_name(path.name + ".tmp")
        try:
            submitit.core.utils.cloudpickle_dump(outcome, temporary)
        except Exception:  # noqa: BLE001 - an unpicklable return value: the run still ended
            submitit.core.utils.cloudpickle_dump((outcome[0], repr(outcome[1])), temporary)
        os.replace(temporary, path)


def main(argv: list[str] | None = None) -> int:
    """``python -m embscale.sweeps.executors.warm FOLDER``: serve the task lines of stdin."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m embscale.sweeps.executors.warm FOLDER", file=sys.stderr)
        return 2
    return Worker(Path(args[0])).serve(sys.stdin)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["ProcessState", "Worker", "job_paths", "result_exit_code", "run_ended", "worker_stops"]
