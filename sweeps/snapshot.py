"""Code snapshots: jobs import the code as it was when their sweep was submitted.

``embscale submit`` copies the package's source into ``results/<sweep>/code/<hash>/embscale/`` (once per content)
and puts that folder first on the jobs' ``PYTHONPATH``, so editing the repository afterwards changes neither
running nor requeued jobs. The copy comes compiled to bytecode, so jobs do not each compile it.
"""

from __future__ import annotations

import compileall
import hashlib
import importlib
import os
import shutil
import tempfile
from pathlib import Path

# Every subpackage whose folder is not inside its parent's (see pyproject's package-dir), so each is copied.
PACKAGES = ("embscale", "embscale.base", "embscale.kernels", "embscale.models", "embscale.inference",
            "embscale.training", "embscale.sweeps", "embscale.analysis", "embscale.bench")
SNAPSHOT_SUFFIXES = (".py", ".yaml", ".yml", ".json", ".txt", ".md")


def code_snapshot(dest_root: Path, packages: tuple[str, ...] = PACKAGES) -> Path:
    """Copy the packages' source into ``dest_root/<hash>/`` (once per content) and return that folder."""
    sources: list[tuple[str, Path]] = []
    for name in packages:
        package_dir = Path(importlib.import_module(name).__file__).parent
        prefix = name.replace(".", "/")
        for path in sorted(package_dir.rglob("*")):
            if path.is_file() and path.suffix in SNAPSHOT_SUFFIXES and "__pycache__" not in path.parts:
                sources.append((f"{prefix}/{path.relative_to(package_dir).as_posix()}", path))
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
        # Bytecode now, once, rather than in every job (all of a packed sweep's first jobs at once, or each job
        # where PYTHONDONTWRITEBYTECODE is set); tracebacks name the snapshot's final path.
        compileall.compile_dir(staging, ddir=str(target), quiet=2)
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


__all__ = ["PACKAGES", "code_snapshot", "job_environment"]
