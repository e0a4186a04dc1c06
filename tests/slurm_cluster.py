"""A one-node Slurm cluster on localhost for the tests: install, start, wait, stop.

Debian's ``slurmctld``, ``slurmd`` and ``munge`` packages are installed with apt when missing (root only). The
cluster lives in a private folder: its own munge key and socket, its own ``slurm.conf`` (reached through the
``SLURM_CONF`` environment variable), its own ports, state and logs, so nothing of a system Slurm or munge is read
or changed. The daemons run in the foreground as child processes of the test and are stopped by process id. With
``nodes`` above 1 the machine is split into that many Slurm nodes (the first named as the host, the others
``<host>2``, ``<host>3``, ... at 127.0.0.1, each with its share of the cores and its own slurmd on its own port), so
multi-node jobs run on one machine. There is no accounting daemon
(``AccountingStorageType=accounting_storage/none``): the harness reads job states from ``squeue`` and the runs'
status files, never from ``sacct``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")


class ClusterUnavailable(RuntimeError):
    """Slurm cannot be installed or started here (the reason says why); the tests skip with it."""


def missing_binaries() -> list[str]:
    return [name for name in BINARIES if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]


def _which(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def ensure_installed(log=print) -> float:
    """Install Slurm and munge with apt if any binary is missing; returns the seconds spent installing.

    Raises :class:`ClusterUnavailable` when they are missing and cannot be installed (not root, no apt-get).
    """
    if not missing_binaries():
        return 0.0
    if os.geteuid() != 0:
        missing = ", ".join(missing_binaries())
        raise ClusterUnavailable(f"slurm is not installed ({missing}) and we are not root to apt-get it")
    if shutil.which("apt-get") is None:
        raise ClusterUnavailable("slurm is not installed and there is no apt-get to install it")
    start = time.monotonic()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log(f"installing {' '.join(PACKAGES)} with apt-get")
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "env": env, "timeout": 600}
    update = subprocess.run(["apt-get", "update", "-q"], **quiet)
    install = subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES], **quiet
    )
    if install.returncode != 0:
        detail = (install.stderr or update.stderr or b"").decode(errors="replace").strip().splitlines()[-3:]
        raise ClusterUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: {' | '.join(detail)}")
    if missing_binaries():
        raise ClusterUnavailable(f"still missing after apt-get install: {', '.join(missing_binaries())}")
    return time.monotonic() - start


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def node_resources() -> dict[str, str]:
    """This machine as ``slurmd -C`` reports it (CPUs, Boards, SocketsPerBoard, ..., RealMemory)."""
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, timeout=60, check=True)
    line = out.stdout.splitlines()[0]
    fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
    fields.pop("NodeName", None)
    return fields


@dataclass
class SlurmCluster:
    """A cluster of ``nodes`` nodes on this machine (one by default) whose files all live under ``root``. Use
    :meth:`start` then :meth:`stop`."""

    root: Path
    partition: str = "debug"
    nodename: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    nodes: int = 1

    @property
    def node_names(self) -> list[str]:
        """The first node is named as this host (its name resolves: a job's ``MASTER_ADDR``), the others
        ``<host>2``, ``<host>3``, ..."""
        return [self.nodename] + [f"{self.nodename}{i}" for i in range(2, self.nodes + 1)]

    def _node_lines(self, resources: dict[str, str]) -> list[str]:
        if self.nodes == 1:
            node = " ".join(f"{k}={v}" for k, v in resources.items() if k != "UpTime")
            return [f"NodeName={self.nodename} NodeAddr=127.0.0.1 {node} State=UNKNOWN"]
        cpus = max(1, int(resources.get("CPUs", "1")) // self.nodes)
        memory = max(1, int(resources.get("RealMemory", "1024")) // self.nodes)
        return [f"NodeName={name} NodeAddr=127.0.0.1 Port={_free_port()} CPUs={cpus} Boards=1 SocketsPerBoard=1 "
                f"CoresPerSocket={cpus} ThreadsPerCore=1 RealMemory={memory} State=UNKNOWN"
                for name in self.node_names]

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """Environment variables the client commands (sbatch, squeue, ...) need to reach this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def _write_files(self) -> None:
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        self.root.chmod(0o755)
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            key.chmod(0o600)
        resources = node_resources()
        per_node = "" if self.nodes == 1 else ".%n"  # one spool folder, pid file and log per slurmd
        lines = [
            "ClusterName=embscale-test",
            f"SlurmctldHost={self.nodename}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",  # the nodes of a cluster of several have ports of their own
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.root / 'munge' / 'munge.socket'}",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}{per_node}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.pid'}{per_node}",
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log' / 'slurmd.log'}{per_node}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # No cgroups in a container: track processes by their parent ids and bind nothing.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            # No slurmdbd: sacct does not work here; the harness uses squeue and the status files.
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2,bf_interval=2",
            "ReturnToService=2",
            "JobRequeue=1",
            "KillWait=10",
            "MinJobAge=600",
            "InactiveLimit=0",
            "SlurmdTimeout=60",
            *self._node_lines(resources),
            f"PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        self.conf.chmod(0o644)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")  # noqa: SIM115 - lives as long as the daemon
        env = dict(os.environ, **self.env)
        self.processes[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=self.root
        )
        log.close()

    def start(self, timeout_s: float = 60.0) -> None:
        """Write the configuration, start munged, slurmctld and slurmd, wait until the node is idle."""
        self._write_files()
        munge = self.root / "munge"
        self._spawn(
            "munged",
            [
                _which("munged"), "--foreground", "--force",
                f"--socket={munge / 'munge.socket'}", f"--key-file={munge / 'munge.key'}",
                f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}",
                f"--seed-file={munge / 'munged.seed'}",
            ],
        )  # fmt: skip
        self._wait_for(lambda: (munge / "munge.socket").exists(), timeout_s, "munged's socket")
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait_for(self._controller_answers, timeout_s, "slurmctld to answer")
        for index, name in enumerate(self.node_names):
            self._spawn("slurmd" if index == 0 else f"slurmd-{name}",
                        [_which("slurmd"), "-D", "-f", str(self.conf), "-N", name])
        self._wait_for(self.node_idle, timeout_s, "the node to be idle in sinfo")

    def _check_alive(self) -> None:
        for name, proc in self.processes.items():
            if proc.poll() is not None:
                raise ClusterUnavailable(f"{name} exited with code {proc.returncode}:\n{self.logs()}")

    def _wait_for(self, condition, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            if condition():
                return
            time.sleep(0.2)
        raise ClusterUnavailable(f"timed out after {timeout_s:.0f}s waiting for {what}:\n{self.logs()}")

    def run(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster."""
        return subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=check,
            env=dict(os.environ, **self.env),
        )  # fmt: skip

    def _controller_answers(self) -> bool:
        return self.run("scontrol", "ping", check=False).stdout.count("UP") > 0

    def node_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
        return bool(out) and all(state.rstrip("*") == "idle" for state in out)

    def logs(self, tail: int = 30) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()[-tail:]
                parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def stop(self, timeout_s: float = 15.0) -> None:
        """Cancel every job, stop the daemons by process id (slurmd first), then kill what the jobs left.

        Job steps (``slurmstepd`` and the job's processes) are not children of slurmd; they are found by their
        working folder, this cluster's root, where slurmd started them.
        """
        controller = self.processes.get("slurmctld")
        if controller is not None and controller.poll() is None:
            jobs = sorted(set(self.run("squeue", "-h", "-o", "%A", check=False).stdout.split()))
            if jobs:
                self.run("scancel", *jobs, check=False)
                deadline = time.monotonic() + timeout_s
                while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                    time.sleep(0.2)
        daemons = [name for name in self.processes if name.startswith("slurmd")] + ["slurmctld", "munged"]
        for name in daemons:
            proc = self.processes.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout_s)
        self.processes.clear()
        for pid in self._stray_processes():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def _stray_processes(self) -> list[int]:
        """Live processes working in this cluster's folder (job steps) and everything they started."""
        root = str(self.root.resolve())
        children: dict[int, list[int]] = {}
        starts = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cwd = os.readlink(entry / "cwd").removesuffix(" (deleted)")
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2:].split()
            if fields[0] in ("Z", "X"):
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
            if (cwd == root or cwd.startswith(root + os.sep)) and int(entry.name) != os.getpid():
                starts.append(int(entry.name))
        tree, todo = [], list(starts)
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo.extend(children.get(pid, []))
        return tree
