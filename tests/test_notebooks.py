"""Both notebooks run top to bottom against committed results, so they never rot: the synthetic fixture, and the
reproduction's GPU results under results/ (five sweeps of real runs at once; REPRODUCTION.md)."""

import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from test_findings import copy_committed_results

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = {"synthetic": (ROOT / "tests" / "fixtures" / "results", 1), "reproduction": (None, 5)}


@pytest.mark.parametrize("fixture", sorted(FIXTURES))
@pytest.mark.parametrize("name", ["explore.ipynb", "frontiers.ipynb"])
def test_notebook_runs(name, fixture, tmp_path, monkeypatch):
    source, sweeps = FIXTURES[fixture]
    results = tmp_path / "results"
    if source is None:
        copy_committed_results(results)
    else:
        shutil.copytree(source, results)  # the notebooks collect into the folder; keep the fixture untouched
    monkeypatch.setenv("EMBSCALE_RESULTS", str(results))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert f"runs from {sweeps} sweep(s)" in text
