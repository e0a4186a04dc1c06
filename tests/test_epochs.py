"""Epoch accounting: split sizes (estimated, then exact), the plan's epochs and warnings, the trainer's record,
the collected marks, and what fits and figures do with runs that repeated their data."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml
from test_data import write_text_corpus

from embscale.analysis.fits import analyse, summary_table
from embscale.analysis.report import plot_results
from embscale.analysis.store import collect
from embscale.cli import main
from embscale.sweeps.plan import data_checks, load_plan
from embscale.training.config import DataConfig
from embscale.training.data.shards import prepare_data
from embscale.training.data.sizes import BYTES_PER_TOKEN, split_tokens

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBSCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EMBSCALE_PROGRESS", "off")


def corpus(tmp_path, documents: int = 30):
    """A text corpus of about 590 tokens a document at a 300-entry vocabulary, and a validation split."""
    write_text_corpus(tmp_path / "train", documents, seed=1, sentences=30)
    write_text_corpus(tmp_path / "val", 3, seed=2, sentences=10)
    return DataConfig(corpus=str(tmp_path / "train"), val_paths={"held": str(tmp_path / "val")}, vocab_size=300)


def test_sizes_are_estimated_then_exact_and_never_stale(tmp_path):
    data = corpus(tmp_path)
    train_bytes = sum(p.stat().st_size for p in (tmp_path / "train").iterdir())
    before = split_tokens(data)
    assert not before["train"].exact and before["train"].tokens == int(train_bytes / BYTES_PER_TOKEN)
    assert before["train"].describe().startswith("~")

    _, shards = prepare_data(data, report=None)
    after = split_tokens(data)
    assert after["train"].exact and after["train"].tokens == shards.train.n_tokens
    assert after["held"].exact and after["held"].tokens == shards.val["held"].n_tokens

    # a corpus file that changes makes the stored counts stale: back to an estimate until shards are rebuilt
    extra = tmp_path / "train" / "doc_new.txt"
    extra.write_text("more text " * 500)
    changed = split_tokens(data)
    assert not changed["train"].exact
    assert changed["train"].tokens == int((train_bytes + extra.stat().st_size) / BYTES_PER_TOKEN)


def write_sweep(tmp_path, tokens: int, eval_tokens: int = 512) -> str:
    sweep = {
        "name": "epochs",
        "model": {"vocab_size": 300, "width": 32, "depth": 1, "layer_type": "shortcut", "attention": "mha",
                  "head_dim": 16, "dense_hidden": 64, "expert_size": 32, "experts": 4, "top_k": 2,
                  "max_seq_len": 32},
        "ngram": {"n": 2, "k": 2, "sizing": "paper"},
        "training": {"tokens": tokens, "batch_tokens": 256, "seq_len": 32, "micro_batch_size": 8, "lr": 3e-3,
                     "eval_every": 4, "eval_tokens": eval_tokens, "checkpoint_every": 0, "device": "cpu"},
        "data": {"corpus": str(tmp_path / "train"), "val_paths": {"held": str(tmp_path / "val")},
                 "vocab_size": 300},
        "grid": {"family": ["moe"], "ratio": [2, 3, 4]},
        "executor": {"type": "local"},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return str(path)


def test_plan_shows_epochs_and_warns(tmp_path, capsys):
    data = corpus(tmp_path, documents=8)
    sweep = write_sweep(tmp_path, tokens=40 * 256, eval_tokens=1 << 20)
    assert main(["plan", sweep]) == 0
    out = capsys.readouterr().out
    assert "epochs" in out.splitlines()[2]
    assert "3 of 3 runs repeat their training data" in out
    assert "validation split held is smaller than training.eval_tokens for 3 run(s)" in out
    assert "~" in out  # estimated: nothing built yet

    prepare_data(data, report=None)
    exact = split_tokens(data)["train"].tokens
    assert main(["plan", sweep, "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    run = document["runs"][0]
    assert run["epochs_exact"] and run["epochs"] == pytest.approx(40 * 256 / exact)
    assert run["small_val_splits"] == ["held"] and len(document["warnings"]) == 2

    few = load_plan(write_sweep(tmp_path, tokens=8 * 256)).plan
    assert not any(check.repeats_data for check in data_checks(few).values())


def test_repeated_runs_are_recorded_marked_and_left_out_of_fits(tmp_path, monkeypatch):
    corpus(tmp_path, documents=8)
    monkeypatch.setenv("EMBSCALE_RESULTS", str(tmp_path / "results"))
    sweep = write_sweep(tmp_path, tokens=24 * 256)
    plan = load_plan(sweep)
    assert main(["submit", sweep, "--executor", "debug"]) == 0
    sizes = split_tokens(DataConfig(**plan.runs[0].config["data"]))  # exact now: the runs built the shards
    train_tokens = sizes["train"].tokens
    assert sizes["train"].exact

    run_dir = plan.run_dir(plan.runs[0])
    record = json.loads((run_dir / "run.json").read_text())
    windows = (record["shards"]["train"]["n_tokens"] - 1) // 32
    assert record["epochs"] == pytest.approx(24 * 8 / windows, rel=1e-5)
    assert record["shards"]["train"]["n_tokens"] == train_tokens
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    assert metrics["epoch"].iloc[-1] == pytest.approx(record["epochs"], rel=1e-6)
    assert record["epochs"] > 1

    runs, curves = collect(plan.sweep_dir)
    assert runs["repeated_data"].all() and runs["fit_ok"].all()
    assert (runs["epochs_seen"] > 1).all() and (runs["train_split_tokens"] == train_tokens).all()
    assert (runs["val_held_split_tokens"] > 0).all() and (runs["small_val_splits"] == "").all()

    excluded = analyse(runs, n_boot=10, n_boot_param=5)
    assert not excluded.runs["fit_ok"].any()
    assert excluded.runs["excluded_reason"].str.startswith("repeated its training data").all()
    assert excluded.ratio_laws.table.empty
    assert excluded.caveats and "3 of 3 runs repeated their training data" in excluded.caveats[0].text
    assert excluded.caveats[0].runs == 3
    summary = summary_table(excluded)
    assert (summary["law"] == "data").sum() == 1 and summary.loc[summary["law"] == "data", "estimate"].iloc[0] == 3

    included = analyse(runs, n_boot=10, n_boot_param=5, repeated_data="include")
    assert included.runs["fit_ok"].all() and not included.ratio_laws.table.empty
    assert "included in fits" in included.caveats[0].text

    paths, _, _ = plot_results(runs, curves, tmp_path / "figures", n_boot=10, n_boot_param=5,
                               repeated_data="include")
    assert any(p.suffix == ".png" for p in paths)


def test_every_saved_figure_carries_the_caveats(tmp_path):
    import matplotlib.pyplot as plt

    from embscale.analysis.style import figure_caveats, save_figure

    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    with figure_caveats(["3 of 9 runs repeated their training data (up to 2.50 epochs): excluded"]):
        paths = save_figure(fig, tmp_path, "noted")
    assert [t.get_text() for t in fig.texts] == [
        "Note: 3 of 9 runs repeated their training data (up to 2.50 epochs): excluded"]
    assert sorted(p.suffix for p in paths) == [".pdf", ".png"]
    plain, ax = plt.subplots()
    save_figure(plain, tmp_path, "plain")
    assert plain.texts == []


def test_token_files_know_their_sizes_and_a_missing_corpus_is_unknown(tmp_path, capsys):
    from test_data_formats import documents, llmc_stream, write_bin

    train = llmc_stream(documents(40, seed=1))
    val = llmc_stream(documents(4, seed=2))
    write_bin(tmp_path / "tokens" / "train_000.bin", train)
    write_bin(tmp_path / "val" / "val_000.bin", val)
    data = DataConfig(corpus=str(tmp_path / "tokens"), val_paths={"held": str(tmp_path / "val")},
                      vocab_size=512, eos_token_id=int(train[0]))
    sizes = split_tokens(data)
    assert sizes["train"].exact and sizes["train"].tokens == len(train)
    assert sizes["held"].exact and sizes["held"].tokens == len(val)

    gone = DataConfig(corpus=str(tmp_path / "elsewhere"), vocab_size=300)
    assert split_tokens(gone) == {}
    sweep = yaml.safe_load(open(write_sweep(tmp_path, tokens=8 * 256)))
    sweep["data"] = {"corpus": str(tmp_path / "elsewhere"), "vocab_size": 300}
    (tmp_path / "gone.yaml").write_text(yaml.safe_dump(sweep))
    assert main(["plan", str(tmp_path / "gone.yaml")]) == 0
    out = capsys.readouterr().out
    assert "epochs unknown for 3 run(s)" in out and "repeat their training data" not in out
