"""``embscale decode-bench``: runs on the CPU for a small model, prints rows that make sense, rejects bad input."""

from __future__ import annotations

import json

import pytest
import yaml

from embscale.cli import main

MODEL = dict(vocab_size=97, d_model=24, n_layers=2, n_heads=2, layer_type="shortcut", dense_hidden=24,
             n_experts=6, top_k=2, expert_hidden=8, eos_token_id=3,
             ngram=dict(n=3, k=2, ratio=2.0),
             per_layer=dict(kind="plne", targets="first", ngram=dict(n=2, k=2, ratio=1.5)))


@pytest.fixture()
def config_file(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(MODEL))
    return path


def test_decode_bench_json_rows(config_file, capsys, monkeypatch):
    monkeypatch.setenv("EMBSCALE_PROGRESS", "off")
    code = main(["decode-bench", str(config_file), "--batch-sizes", "1,3", "--prompt-len", "5", "--copy-mib", "4",
                 "--new-tokens", "6", "--k", "2", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    (model,) = report["models"]
    rows = model["rows"]
    assert [(r["mode"], r["batch"]) for r in rows] == [("decode", 1), ("decode", 3), ("speculative", 1),
                                                       ("speculative", 3)]
    # 2 layers x 2 attentions x (k + v) x 2 heads x 12 x 4 bytes
    assert model["kv_cache_bytes_per_token"] == 2 * 2 * 2 * 2 * 12 * 4
    for row in rows:
        assert row["tokens_per_s"] > 0 and row["ms_per_step"] > 0
        assert 0 < row["ngram_share"]  # NE and PLNE lookups take some of every step
        tokens = row["tokens_per_step"]
        assert tokens == (row["batch"] if row["mode"] == "decode" else row["batch"] * 3)
        # no zero experts: each token touches exactly top_k = 2 distinct real experts, at most 6 in all
        assert 2 <= row["experts_per_step"] <= min(6, 2 * tokens)
    assert rows[0]["experts_per_step"] == 2.0  # one token, top-2
    assert all(0 <= r["acceptance_rate"] <= 1 for r in rows[2:])


def test_decode_bench_table_with_a_draft_model(config_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EMBSCALE_PROGRESS", "off")
    draft = tmp_path / "draft.yaml"
    draft.write_text(yaml.safe_dump(dict(vocab_size=97, d_model=16, n_layers=1, n_heads=2, dense_hidden=16)))
    assert main(["decode-bench", str(config_file), "--draft", str(draft), "--batch-sizes", "2", "--copy-mib", "4",
                 "--prompt-len", "3", "--new-tokens", "4", "--k", "1"]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "speculative" in out and "decode" in out


def test_decode_bench_bad_input_exits_2(config_file, tmp_path, capsys):
    assert main(["decode-bench", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**MODEL, "vocab_size": 101}))
    assert main(["decode-bench", str(config_file), "--draft", str(other)]) == 2
    assert "vocab_size" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["decode-bench", str(config_file), "--batch-sizes", "4,0"])
    assert exit_info.value.code == 2


def test_decode_bench_profile_batch_reports_where_the_step_goes(config_file, capsys, monkeypatch):
    monkeypatch.setenv("EMBSCALE_PROGRESS", "off")
    assert main(["decode-bench", str(config_file), "--batch-sizes", "2", "--prompt-len", "5", "--new-tokens", "4",
                 "--k", "0", "--copy-mib", "4", "--profile-batch", "3", "--json"]) == 0
    profile = json.loads(capsys.readouterr().out)["models"][0]["profile"]
    assert profile["batch"] == 3 and profile["steps"] == 20 and profile["time"] == "cpu"
    assert profile["us_per_step"] > 0 and profile["launches_per_step"] > 10
    top = profile["top"]
    assert top and all(entry["name"].startswith("aten::") for entry in top)
    assert [entry["us_per_step"] for entry in top] == sorted((entry["us_per_step"] for entry in top), reverse=True)
    assert 0 < sum(entry["share"] for entry in top) <= 1 + 1e-9
    assert any(entry["name"] == "aten::mm" and entry["per_step"] >= 2 for entry in top)  # the projections
    with pytest.raises(SystemExit):
        main(["decode-bench", str(config_file), "--profile-batch", "0"])
