"""Progress display: log lines with and without a bar, and tqdm imported only where a bar is made."""

from __future__ import annotations

import subprocess
import sys

import pytest

from embscale.base import progress


def test_log_lines_print_without_tqdm_and_the_run_folder_module_does_not_import_it() -> None:
    """`embscale plan` and `collect` import the run-folder module, which logs: tqdm (a tenth of plan's imports) comes
    in only with a bar; a log line without one is printed as tqdm would write it."""
    code = ("import sys; import embscale.base.rundir; from embscale.base.progress import log; "
            "log('hello'); print('tqdm' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={"EMBSCALE_PROGRESS": "plain", "PATH": ""})
    assert done.stdout == "False\n" and done.stderr == "hello\n"


def test_log_goes_through_tqdm_beside_a_bar(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("EMBSCALE_PROGRESS", "bar")
    with progress.Progress(total=3, desc="work") as bar:
        assert type(bar.bar).__module__.startswith("tqdm")
        progress.log("a line beside the bar")
        bar.update(3)
    assert "a line beside the bar\n" in capsys.readouterr().err
    monkeypatch.setenv("EMBSCALE_PROGRESS", "off")
    progress.log("silent")
    assert "silent" not in capsys.readouterr().err
