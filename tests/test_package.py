"""The installed package: one import namespace, ``embscale.*``, and nothing at the top level that a researcher's own
``models.py`` or ``analysis/`` would collide with, both from the built wheel (installed into a fresh virtual
environment) and from the editable install the Makefile makes. Every module of the wheel imports, and the
package data (model configs, sweep files) ships with it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BARE = ("models", "kernels", "sweeps", "analysis", "training", "inference", "base", "bench", "commands")


def run(python: Path | str, code: str, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    return subprocess.run([str(python), "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, **kwargs)


def decoy_folder(path: Path) -> Path:
    """A researcher's working folder with a ``models.py`` and an ``analysis/`` package of their own."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "models.py").write_text("WHOSE = 'mine'\n")
    (path / "analysis").mkdir(exist_ok=True)
    (path / "analysis" / "__init__.py").write_text("WHOSE = 'mine'\n")
    return path


CHECK = """
import importlib, importlib.util, json, pkgutil, sys
import embscale
import models, analysis
from embscale.models.config import CONFIG_DIR, ModelConfig
from embscale.sweeps.sweepfile import SWEEP_DIR
from embscale.bench.reproduce import DEFAULT_MANIFEST, load_manifest
root = embscale.__path__[0]
found = []
def walk(package):
    for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        if info.ispkg:
            walk(module)
        else:
            found.append(info.name)
walk(embscale)
print(json.dumps({"embscale": embscale.__file__, "models": models.WHOSE, "analysis": analysis.WHOSE,
                  "ours": importlib.import_module("embscale.models").__file__, "modules": found,
                  "configs": sorted(p.name for p in CONFIG_DIR.glob("*.yaml")),
                  "sweeps": sorted(p.name for p in SWEEP_DIR.glob("*.yaml")),
                  "reproduction": sorted(p.name for p in (SWEEP_DIR / "reproduction").iterdir()),
                  "manifest_sweeps": len(load_manifest(DEFAULT_MANIFEST).sweeps),
                  "next_sweeps": len(load_manifest(DEFAULT_MANIFEST.parent / "next" / "manifest.yaml").sweeps),
                  "bench_config": ModelConfig.from_yaml(CONFIG_DIR / "bench_moe_100m.yaml").d_model}))
"""
BARE_CHECK = "import importlib.util, json; print(json.dumps([n for n in {names} if importlib.util.find_spec(n)]))"


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    """A fresh venv with the built wheel installed (no dependencies: those are reused from this environment
    through a path entry, which does not carry this environment's editable install along)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a copy: building writes build/ and *.egg-info/ beside the sources
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "results", "build", "*.egg-info",
                                                                "__pycache__", ".*_cache", "notebooks", "tests"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp / "dist"), str(source)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    wheels = list((tmp / "dist").glob("embscale-*.whl"))
    assert len(wheels) == 1, wheels
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(run(python, "import sysconfig; print(sysconfig.get_paths()['purelib'])", tmp).stdout.strip())
    # every site folder of this environment (its own, and the ones its .pth files add, such as a CUDA image's
    # packages), as plain paths: their .pth files, this checkout's editable hook among them, are not run
    sites = [p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages"))]
    (site / "deps.pth").write_text("\n".join(dict.fromkeys([sysconfig.get_paths()["purelib"], *sites])) + "\n")
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                                "-q", str(wheels[0])], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return python


def test_wheel_has_one_namespace_beside_a_researchers_own_modules(wheel_venv, tmp_path):
    folder = decoy_folder(tmp_path / "work")
    result = run(wheel_venv, CHECK, folder)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    site = str(wheel_venv.parent.parent)
    assert seen["embscale"].startswith(site) and seen["ours"].startswith(site)  # the wheel's, not the checkout's
    assert seen["models"] == "mine" and seen["analysis"] == "mine"  # the researcher's own are untouched
    source = set()  # every module of the checkout, by the name it is installed under
    for folder in (*BARE[:-1], "embscale"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name not in ("__init__.py", "__main__.py"):
                parts = path.relative_to(ROOT).with_suffix("").parts
                source.add(".".join(parts if folder == "embscale" else ("embscale", *parts)))
    assert set(seen["modules"]) == source  # all shipped, all import
    assert "longcat_flash_lite.yaml" in seen["configs"] and "demo.yaml" in seen["sweeps"]
    assert seen["bench_config"] == 1024  # read from the wheel's package data
    assert {"manifest.yaml", "README.md", "base.yaml", "fig2_ladder.yaml"} <= set(seen["reproduction"])
    assert seen["manifest_sweeps"] == 6  # the runbook finds its shipped manifest and sweeps in the wheel
    assert seen["next_sweeps"] == 6  # and the next-scale ones that REPRODUCTION.md points to
    bare = run(wheel_venv, BARE_CHECK.format(names=list(BARE)), tmp_path)
    assert bare.returncode == 0 and json.loads(bare.stdout) == [], bare.stdout + bare.stderr
    missing = run(wheel_venv, "import models", tmp_path)
    assert missing.returncode != 0 and "No module named 'models'" in missing.stderr
    cli = subprocess.run([str(wheel_venv.parent / "embscale"), "params", "--json",
                          str(ROOT / "models" / "configs" / "tiny_moe.yaml")], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert cli.returncode == 0 and json.loads(cli.stdout)["total"] > 0, cli.stderr


def test_editable_install_has_one_namespace_too(tmp_path):
    folder = decoy_folder(tmp_path / "work")
    result = run(sys.executable, CHECK, folder)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["models"] == "mine" and seen["analysis"] == "mine"
    assert seen["ours"] == str(ROOT / "models" / "__init__.py")
    bare = run(sys.executable, BARE_CHECK.format(names=list(BARE)), tmp_path)
    assert bare.returncode == 0 and json.loads(bare.stdout) == [], bare.stdout + bare.stderr
