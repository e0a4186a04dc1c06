"""Sweep files: loading, extends, axes, and rejection of malformed files (tests/fixtures/bad_sweeps/)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from embscale.base.datafile import DataLoader
from embscale.base.errors import ConfigError
from embscale.cli import main
from embscale.sweeps.sweepfile import deep_merge, load_sweep, parse_sweep

ROOT = Path(__file__).resolve().parent.parent
BAD = ROOT / "tests" / "fixtures" / "bad_sweeps"
SHIPPED = ["tiny", "demo", "paper_280m"]

BASE = {
    "name": "base",
    "model": {"vocab_size": 512, "width": 64, "depth": 1, "heads": 2, "dense_hidden": 128, "expert_size": 32,
              "experts": 4, "top_k": 2},
    "training": {"tokens": 65536, "batch_tokens": 4096, "seq_len": 64, "micro_batch_size": 4},
    "data": {"corpus": "builtin", "vocab_size": 512},
}


def _write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _expected_field(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} must start with '# expect: <field path>'"
    return first[len("# expect: "):].strip()


def _tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


# ----- the shipped sweep files -----
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_sweeps_load(name):
    sweep = load_sweep(ROOT / "sweeps" / f"{name}.yaml")
    assert sweep.name == name
    assert sweep.num_points == len(sweep.points()) >= 1


# ----- malformed files -----
BAD_FILES = sorted(BAD.glob("*.yaml"))


def test_enough_bad_fixtures():
    assert len(BAD_FILES) >= 20


@pytest.mark.parametrize("path", BAD_FILES, ids=[p.stem for p in BAD_FILES])
def test_bad_sweep_rejected_naming_the_field(path, capsys, tmp_path, monkeypatch):
    expected = _expected_field(path)
    watched = [tmp_path, ROOT / "results", BAD]
    before = [_tree(p) if p.exists() else set() for p in watched]
    monkeypatch.chdir(tmp_path)  # anything written relative to the working directory would land here

    code = main(["plan", str(path)])
    err = capsys.readouterr().err

    assert code == 2, err
    assert expected in err, f"expected {expected!r} in: {err}"
    assert path.name in err or "extends_cycle" in err, err  # the file is named
    assert [_tree(p) if p.exists() else set() for p in watched] == before, "plan wrote something"


def test_missing_file_is_exit_2(capsys, tmp_path):
    code = main(["plan", str(tmp_path / "nope.yaml")])
    err = capsys.readouterr().err
    assert code == 2 and "nope.yaml" in err and "cannot read" in err


UNREADABLE = {  # file bytes -> what the error says
    "binary": (b"\x00\x01\x02 not text", "binary file"),
    "latin1": ("name: café\n".encode("latin-1"), "not UTF-8"),
    "empty": (b"", "is empty"),
    "comments": (b"# nothing but a comment\n", "is empty"),
    "folder": (None, "is a folder"),
}


@pytest.mark.parametrize("command", ["plan", "submit", "status", "tune", "train", "params"])
@pytest.mark.parametrize("kind", sorted(UNREADABLE))
def test_unreadable_file_is_exit_2_naming_it(command, kind, capsys, tmp_path, monkeypatch):
    """Sweep files (plan, submit, status, tune), run files (train) and model configs (params) that are binary,
    not UTF-8, empty or a folder: exit 2, the file named, nothing written."""
    data, says = UNREADABLE[kind]
    path = tmp_path / f"{kind}.yaml"
    if data is None:
        path.mkdir()
    else:
        path.write_bytes(data)
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    code = main([command, str(path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert path.name in err and says in err, err
    assert _tree(tmp_path) == before


# ----- validation, through parse_sweep -----
def _parse(**changes) -> ConfigError:
    data = deep_merge(BASE, changes)
    with pytest.raises(ConfigError) as info:
        parse_sweep(data)
    return info.value


@pytest.mark.parametrize("changes, field", [
    ({"grid": {"ratio": [2, 4, 1]}}, "grid.ratio[2]"),
    ({"grid": {"base_ratio": [0.5]}}, "grid.base_ratio[0]"),
    ({"grid": {"k": [2, 9]}}, "grid.k[1]"),
    ({"grid": {"sizing": ["prime", "odd"]}}, "grid.sizing[1]"),
    ({"grid": {"lr": [-1.0]}}, "grid.lr[0]"),
    ({"grid": {"width": [64, True]}}, "grid.width[1]"),
    ({"zip": [{"ratio": [2, 4]}, {"seed": [0, 1], "depth": [1]}]}, "zip[1].depth"),
    ({"zip": [{"ratio": [2, 4]}, {"ratio": [3, 5]}]}, "zip[1].ratio"),
    ({"limits": {"ratio_tolerance": 0}}, "limits.ratio_tolerance"),
    ({"limits": {"max_points": 2}, "grid": {"seed": [0, 1, 2]}}, "grid"),
    ({"training": {"lr": {"rule": "inverse_width", "base": 1e-3}}}, "training.lr.base_width"),
    ({"training": {"tokens": 1.5}}, "training.tokens"),
    ({"per_layer": {"targets": "third"}}, "per_layer.targets"),
    ({"model": {"width": 63}}, "model.heads"),  # 63 / 2 heads: the error names the shorthand the file used
    ({"model": {"dense_mult": -1.0}}, "model.dense_mult"),
    ({"model": {"zero_expert_ratio": "half"}}, "model.zero_expert_ratio"),
    ({"description": 5}, "description"),
])
def test_field_paths(changes, field):
    assert _parse(**changes).field == field


def test_dispatch_sections_pass_through():
    sweep = parse_sweep(deep_merge(BASE, {"executor": {"type": "local", "cpu_jobs": 2},
                                          "slurm": {"partition": "gpu"}, "tune": {"trials": 8}}))
    assert sweep.executor == {"type": "local", "cpu_jobs": 2} and sweep.slurm == {"partition": "gpu"}
    assert sweep.tune == {"trials": 8} and parse_sweep(BASE).tune is None


def test_no_extends_without_a_file():
    assert _parse(extends="x.yaml").field == "extends"


def test_vocab_size_needed_with_a_tokenizer_file():
    data = deep_merge(BASE, {"data": {"corpus": "some/dir", "tokenizer_path": "tok.json"}})
    del data["model"]["vocab_size"]
    with pytest.raises(ConfigError) as info:
        parse_sweep(data)
    assert info.value.field == "model.vocab_size"


# ----- aliases, rules, numbers -----
def test_aliases_and_width_rules():
    sweep = parse_sweep(deep_merge(BASE, {"model": {"heads": None, "head_dim": 16, "dense_hidden": None,
                                                    "dense_mult": 2.0, "zero_expert_ratio": 0.5}}))
    assert sweep.model["d_model"] == 64 and sweep.model["n_layers"] == 1 and sweep.model["n_experts"] == 4
    assert "width" not in sweep.model and sweep.model_aliases["d_model"] == "width"
    assert sweep.model_rules == {"head_dim": 16, "dense_mult": 2.0, "zero_expert_ratio": 0.5}


def test_width_from_an_axis_only():
    data = deep_merge(BASE, {"grid": {"width": [64, 128]}})
    del data["model"]["width"]
    sweep = parse_sweep(data)
    assert "d_model" not in sweep.model and sweep.grid["width"] == [64, 128]
    del data["grid"]
    with pytest.raises(ConfigError) as info:
        parse_sweep(data)
    assert info.value.field == "model.width"


def test_exponent_numbers_are_numbers():
    data = yaml.load("lr: 3e-3\ntokens: 2e9\nname: 1e5x\nplain: 12", Loader=DataLoader)
    assert data == {"lr": 0.003, "tokens": 2e9, "name": "1e5x", "plain": 12}
    assert yaml.safe_load("lr: 3e-3") == {"lr": "3e-3"}  # the plain SafeLoader is untouched


# ----- axes -----
def test_grid_is_crossed_zip_is_zipped():
    sweep = parse_sweep(deep_merge(BASE, {"grid": {"family": ["moe", "ne"], "ratio": [2, 4, 8]},
                                          "zip": {"width": [64, 128], "depth": [1, 2]}}))
    points = sweep.points()
    assert sweep.num_points == len(points) == 2 * 3 * 2
    assert {(p["width"], p["depth"]) for p in points} == {(64, 1), (128, 2)}  # zipped, never crossed
    assert {(p["family"], p["ratio"]) for p in points} == {(f, r) for f in ("moe", "ne") for r in (2, 4, 8)}
    assert points[0] == {"family": "moe", "ratio": 2, "width": 64, "depth": 1}


def test_several_zip_groups_and_scalar_axes():
    zips = [{"ratio": [4, 8]}, {"seed": [0, 1, 2], "lr": [1e-3, None, 3e-3]}]
    sweep = parse_sweep(deep_merge(BASE, {"grid": {"family": "ne"}, "zip": zips}))
    assert sweep.grid["family"] == ["ne"]
    assert sweep.num_points == 2 * 3
    assert {(p["seed"], p["lr"]) for p in sweep.points()} == {(0, 1e-3), (1, None), (2, 3e-3)}


def test_no_axes_is_one_point():
    sweep = parse_sweep(BASE)
    assert sweep.points() == [{}]


# ----- extends -----
def test_extends_deep_merges_with_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parent = deep_merge(BASE, {"name": "parent", "description": "the parent",
                               "grid": {"family": ["moe", "ne"], "ratio": [2, 4], "seed": [0, 1]},
                               "limits": {"max_ne_share": 0.6}})
    _write(tmp_path / "parents" / "parent.yaml", parent)
    _write(tmp_path / "child" / "child.yaml", {
        "extends": "../parents/parent.yaml",
        "model": {"depth": 2},                       # merged into the parent's model
        "grid": {"ratio": [3, 6, 9], "seed": None},  # a list replaces; null deletes the parent's axis
    })
    sweep = load_sweep(tmp_path / "child" / "child.yaml")
    assert sweep.name == "child" and sweep.description == ""  # never inherited
    assert sweep.model["n_layers"] == 2 and sweep.model["d_model"] == 64 and sweep.model["n_experts"] == 4
    assert sweep.grid == {"family": ["moe", "ne"], "ratio": [3, 6, 9]}
    assert sweep.limits.max_ne_share == 0.6
    assert sweep.path == os.path.join("child", "child.yaml")


def test_extends_chain_of_three(tmp_path):
    _write(tmp_path / "a.yaml", deep_merge(BASE, {"name": "a", "training": {"seq_len": 32}}))
    _write(tmp_path / "b.yaml", {"extends": "a.yaml", "training": {"micro_batch_size": 8}})
    _write(tmp_path / "c.yaml", {"extends": "b.yaml", "name": "c", "grid": {"seed": [5]}})
    sweep = load_sweep(tmp_path / "c.yaml")
    assert (sweep.name, sweep.training["seq_len"], sweep.training["micro_batch_size"]) == ("c", 32, 8)


def test_extends_cycle_names_the_files(tmp_path):
    _write(tmp_path / "a.yaml", {"extends": "b.yaml", "name": "a"})
    _write(tmp_path / "b.yaml", {"extends": "c.yaml"})
    _write(tmp_path / "c.yaml", {"extends": "a.yaml"})
    with pytest.raises(ConfigError) as info:
        load_sweep(tmp_path / "a.yaml")
    message = str(info.value)
    assert "extends" in message and "cycle" in message
    assert all(f"{n}.yaml" in message for n in "abc")


def test_error_in_a_parent_names_the_parent(tmp_path):
    (tmp_path / "parent.yaml").write_text("name: p\nmodel: {width: [\n")
    _write(tmp_path / "child.yaml", {"extends": "parent.yaml"})
    with pytest.raises(ConfigError) as info:
        load_sweep(tmp_path / "child.yaml")
    assert "parent.yaml" in info.value.field and "not valid YAML" in info.value.message


def test_deep_merge_leaves_inputs_alone():
    parent = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    child = {"a": {"c": [3]}, "d": None}
    assert deep_merge(parent, child) == {"a": {"b": 1, "c": [3]}}
    assert parent == {"a": {"b": 1, "c": [1, 2]}, "d": 1} and child == {"a": {"c": [3]}, "d": None}
