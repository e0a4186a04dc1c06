"""``embscale tune``: Optuna studies over a real tiny sweep, per width, with pruning, a journal that survives the
tuner, and a resolved ``tuned.yaml``."""

from __future__ import annotations

import dataclasses
import os

import optuna
import pytest
import tiny_sweep as T
import yaml
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from embscale.base import rundir
from embscale.base.errors import ConfigError
from embscale.cli import main
from embscale.sweeps.executors.jobmap import process_alive
from embscale.sweeps.plan import load_plan
from embscale.sweeps.sections import parse_tune
from embscale.sweeps.tune import resolve_metric


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    data = T.write_corpus(root / "corpus")
    env = T.job_environment(root / "cache", root / "results")
    saved = dict(os.environ)
    os.environ.update({k: env[k] for k in ("EMBSCALE_CACHE", "EMBSCALE_RESULTS", "EMBSCALE_PROGRESS",
                                           "OMP_NUM_THREADS")})
    os.environ.pop("EMBSCALE_FAKE_GPUS", None)
    try:
        from embscale.training.config import DataConfig
        from embscale.training.data.shards import prepare_data

        prepare_data(DataConfig(**data))
        yield {"root": root, "data": data, "results": root / "results"}
    finally:
        os.environ.clear()
        os.environ.update(saved)


def studies(results, name):
    storage = JournalStorage(JournalFileBackend(str(results / name / "tune" / "optuna.journal")))
    return {s.study_name: optuna.load_study(study_name=s.study_name, storage=storage)
            for s in optuna.get_all_study_summaries(storage)}


def test_tune_prunes_resumes_and_writes_tuned_sweep(workspace, capsys):
    """Local executor, one trial at a time: a good lr completes, a hopeless one is pruned on its first
    validation losses; a second ``tune`` continues the same study; tuned.yaml carries the best lr."""
    tune = {"param": "lr", "low": 1.0e-6, "high": 3.0e-2, "log": True, "trials": 2, "per": "width",
            "metric": "val_code_loss", "startup_trials": 1, "parallel": 1}
    # steps: long enough that the tuner, polling every 0.1 s, sees the hopeless trial's first validation losses
    # while it still trains (at 30 steps, on a loaded 2-core machine, it once finished between two looks)
    mapping = T.sweep_mapping("tiny_tune", workspace["data"], steps=150, seeds=1, widths=(16,),
                              extra={"tune": tune})
    mapping["training"]["checkpoint_every"] = 0
    sweep = T.write_sweep(workspace["root"] / "tiny_tune.yaml", mapping)
    plan = load_plan(sweep)
    assert plan.sweep.tune["param"] == "lr"  # the sweep file with a tune: section still loads
    journal = workspace["results"] / "tiny_tune" / "tune" / "optuna.journal"
    journal.parent.mkdir(parents=True)
    study = optuna.create_study(study_name="tiny_tune:lr:width-16", direction="minimize",
                                storage=JournalStorage(JournalFileBackend(str(journal))))
    study.enqueue_trial({"lr": 1.0e-2})
    study.enqueue_trial({"lr": 1.0e-6})

    assert main(["tune", str(sweep), "--executor", "local", "--cpu-jobs", "1", "--poll-s", "0.1"]) == 0
    out = capsys.readouterr()
    trials = studies(workspace["results"], "tiny_tune")["tiny_tune:lr:width-16"].get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.PRUNED], out.err
    good, hopeless = trials
    assert good.params["lr"] == 1.0e-2 and hopeless.params["lr"] == 1.0e-6
    assert good.intermediate_values and max(good.intermediate_values) == 150
    assert max(hopeless.intermediate_values) < 150  # stopped early ...
    assert min(hopeless.intermediate_values.values()) > good.intermediate_values[
        max(hopeless.intermediate_values)]  # ... because it was worse than the completed trial
    pruned_dir = hopeless.user_attrs["run_dir"]
    assert rundir.run_state(pruned_dir) in ("interrupted", "running")  # its job got SIGTERM and checkpointed
    assert not process_alive(hopeless.user_attrs["job"]["pid"], hopeless.user_attrs["job"]["proc_start"])

    tuned = workspace["results"] / "tiny_tune" / "tuned.yaml"
    text = tuned.read_text()
    assert text.startswith("# tiny_tune with training.lr tuned")
    tuned_plan = load_plan(tuned)
    assert tuned_plan.name == "tiny_tune_tuned" and tuned_plan.sweep.tune is None
    assert [r.config["training"]["lr"] for r in tuned_plan.runs] == [1.0e-2]

    # Running tune again with more trials continues the same study from its journal.
    assert main(["tune", str(sweep), "--executor", "local", "--trials", "3", "--cpu-jobs", "1"]) == 0
    trials = studies(workspace["results"], "tiny_tune")["tiny_tune:lr:width-16"].get_trials()
    assert len(trials) == 3 and trials[2].state in (TrialState.COMPLETE, TrialState.PRUNED)


def test_tune_per_width_in_process(workspace, capsys):
    """One study per width (debug executor): tuned.yaml zips the best lr with the widths."""
    tune = {"param": "lr", "low": 1.0e-3, "high": 2.0e-2, "log": True, "trials": 2, "per": "width",
            "metric": "val_code_loss", "pruner": "none"}
    sweep = T.write_sweep(workspace["root"] / "tiny_widths.yaml",
                          T.sweep_mapping("tiny_widths", workspace["data"], steps=2, seeds=2, widths=(16, 24),
                                          extra={"tune": tune}))
    assert main(["tune", str(sweep), "--executor", "debug"]) == 0
    found = studies(workspace["results"], "tiny_widths")
    assert sorted(found) == ["tiny_widths:lr:width-16", "tiny_widths:lr:width-24"]
    best = {int(name.rsplit("-", 1)[1]): s.best_trial.params["lr"] for name, s in found.items()}
    assert all(len(s.get_trials(states=(TrialState.COMPLETE,))) == 2 for s in found.values())
    data = yaml.safe_load((workspace["results"] / "tiny_widths" / "tuned.yaml").read_text())
    assert data["zip"] == {"width": [16, 24], "lr": [best[16], best[24]]}
    assert data["grid"] == {"seed": [0, 1]}
    tuned_plan = load_plan(workspace["results"] / "tiny_widths" / "tuned.yaml")
    assert len(tuned_plan.runs) == 4
    for run in tuned_plan.runs:
        assert run.config["training"]["lr"] == best[run.point["width"]]


def test_tune_metric_is_checked_before_any_trial(workspace, capsys):
    """A metric the runs will not write (a typo of val_code_loss) fails at once, listing the valid names, with
    nothing trained or written; without a metric, the first validation loss is tuned."""
    tune = {"param": "lr", "low": 1.0e-3, "high": 2.0e-2, "trials": 1, "metric": "val_code"}
    sweep = T.write_sweep(workspace["root"] / "tiny_typo.yaml",
                          T.sweep_mapping("tiny_typo", workspace["data"], steps=2, seeds=1, widths=(16,),
                                          extra={"tune": tune}))
    assert main(["tune", str(sweep), "--executor", "debug"]) == 2
    err = capsys.readouterr().err
    assert "tiny_typo.yaml: tune.metric: 'val_code' is not a column" in err and "val_code_loss" in err
    assert not (workspace["results"] / "tiny_typo").exists()
    plan = load_plan(sweep)
    spec = parse_tune({"param": "lr", "low": 1e-3, "high": 2e-2}, plan.sweep.axes)
    assert spec.metric is None and resolve_metric(plan, spec).metric == "val_code_loss"
    assert resolve_metric(plan, dataclasses.replace(spec, metric="train_loss")).metric == "train_loss"


def test_no_tuned_sweep_without_a_completed_trial(workspace, capsys):
    """Every trial fails (its corpus is gone): exit 1, and no tuned.yaml with null values."""
    data = T.write_corpus(workspace["root"] / "doomed")
    tune = {"param": "lr", "low": 1.0e-3, "high": 2.0e-2, "trials": 1, "pruner": "none"}
    sweep = T.write_sweep(workspace["root"] / "tiny_doomed.yaml",
                          T.sweep_mapping("tiny_doomed", data, steps=2, seeds=1, widths=(16,),
                                          extra={"tune": tune}))
    (workspace["root"] / "doomed" / "train.jsonl").unlink()
    assert main(["tune", str(sweep), "--executor", "debug"]) == 1
    assert "no tuned sweep written" in capsys.readouterr().err
    assert not (workspace["results"] / "tiny_doomed" / "tuned.yaml").exists()


def test_tune_section_errors():
    axes = ("seed", "width")
    spec = parse_tune({"param": "training.lr", "low": 1e-4, "high": 1e-2, "log": True, "per": "width"}, axes)
    assert spec.param == "lr" and spec.per == "width" and spec.trials == 8
    bad = [
        ({"param": "lr", "low": 1e-2, "high": 1e-4}, "tune.high"),
        ({"param": "lr", "low": 0.0, "high": 1e-2, "log": True}, "tune.low"),
        ({"param": "learning_rate", "low": 1e-4, "high": 1e-2}, "tune.param"),
        ({"param": "lr", "low": 1e-4, "high": 1e-2, "per": "depth"}, "tune.per"),
        ({"param": "weight_decay", "low": 0.0, "high": 0.2, "per": "width"}, "tune.per"),
        ({"param": "lr", "low": 1e-4, "high": 1e-2, "trials": 0}, "tune.trials"),
        ({"param": "lr", "low": 1e-4, "high": 1e-2, "sampler": "tpe"}, "tune.sampler"),
        ({"param": "lr", "high": 1e-2}, "tune.low"),
    ]
    for section, field in bad:
        with pytest.raises(ConfigError) as info:
            parse_tune(section, axes)
        assert info.value.field == field, section


def test_a_best_value_at_the_edge_of_the_trials_is_flagged():
    """Best at the lowest or highest of three or more tried values: the optimum was not bracketed (the reproduction's
    tunes ended so: best 3.56e-3, the lowest of six trials in [1e-3, 2e-2])."""
    from embscale.sweeps.tune import edge_of_trials, edge_warning

    tried = [3.56e-3, 5.12e-3, 5.18e-3, 6.08e-3, 6.92e-3, 8.52e-3]
    assert edge_of_trials(3.56e-3, tried) == "lowest"
    assert edge_of_trials(8.52e-3, tried) == "highest"
    assert edge_of_trials(5.18e-3, tried) is None
    assert edge_of_trials(1.0e-3, [1.0e-3, 2.0e-3]) is None  # two values bracket nothing either way: not flagged
    spec = parse_tune({"param": "lr", "low": 1.0e-3, "high": 2.0e-2, "log": True, "trials": 6}, ("family",))
    entry = {"value": 3.56e-3, "edge": "lowest", "trials": {"complete": 6}}
    warning = edge_warning("all", entry, spec)
    assert "lowest of the 6 completed trials" in warning and "[0.001, 0.02]" in warning and "below" in warning
    assert edge_warning("all", {**entry, "edge": None}, spec) is None
