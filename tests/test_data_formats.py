"""Data formats: pre-tokenised corpora (llm.c .bin shards, .npy arrays, Hugging Face save_to_disk folders, Parquet
token columns) read without a tokenizer, their validation splits, vocabulary checks and exact token counts; a
text corpus with a given tokenizer.json; the site-packages corpus."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_data import synthetic_text, write_text_corpus

import embscale.training.data.tokenizer as tokenizer_module
from embscale.base.errors import ConfigError, UserError
from embscale.training.config import TOKEN_FORMATS, DataConfig, RunConfig
from embscale.training.data.corpus import SiteCorpus, UserCorpus, open_corpus, site_package_folders
from embscale.training.data.shards import prepare_data
from embscale.training.data.tokens import TOKEN_FORMATS as READER_FORMATS
from embscale.training.data.tokens import TokenArray, TokenPiece, npy_piece
from embscale.training.trainer import train_run

EOS = 0
VOCAB = 64
MODEL = {"d_model": 32, "n_layers": 2, "n_heads": 2, "dense_hidden": 64, "max_seq_len": 64}
TRAINING = {"steps": 6, "batch_tokens": 256, "micro_batch_size": 4, "seq_len": 32, "lr": 1e-2, "eval_every": 0,
            "eval_tokens": 256, "checkpoint_every": 0, "device": "cpu"}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBSCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EMBSCALE_PROGRESS", "off")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors on a busy 2-core machine
    yield
    torch.set_num_threads(threads)


def documents(n_docs: int, seed: int) -> list[list[int]]:
    """Learnable documents: runs of a step through ids 1..VOCAB-1."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        start, step, length = rng.randrange(1, VOCAB), rng.choice((1, 2, 3)), rng.randint(20, 60)
        docs.append([1 + (start + step * i) % (VOCAB - 1) for i in range(length)])
    return docs


def llmc_stream(docs: list[list[int]]) -> np.ndarray:
    """llm.c's FineWeb convention: the end-of-text id before every document."""
    return np.asarray([t for doc in docs for t in [EOS, *doc]], dtype=np.uint16)


def write_bin(path: Path, tokens: np.ndarray, magic: int = 20240520, version: int = 1,
              count: int | None = None) -> Path:
    header = np.zeros(256, dtype=np.int32)
    header[:3] = magic, version, len(tokens) if count is None else count
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(header.tobytes())
        handle.write(np.asarray(tokens, dtype=np.uint16 if version == 1 else np.uint32).tobytes())
    return path


def write_save_to_disk(folder: Path, rows: list[list[int] | None], files: int = 2) -> Path:
    """A folder laid out as datasets' ``save_to_disk`` writes it: Arrow IPC stream files and state.json."""
    folder.mkdir(parents=True)
    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("attention_mask", pa.list_(pa.int8()))])
    names = []
    per_file = -(-len(rows) // files)
    for index in range(files):
        name = f"data-{index:05d}-of-{files:05d}.arrow"
        names.append({"filename": name})
        part = rows[index * per_file:(index + 1) * per_file]
        masks = [None if r is None else [1] * len(r) for r in part]
        batch = pa.record_batch([pa.array(part, type=pa.list_(pa.int32())), pa.array(masks, pa.list_(pa.int8()))],
                                schema=schema)
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            writer.write_batch(batch.slice(0, len(part) // 2))  # two record batches per file
            writer.write_batch(batch.slice(len(part) // 2))
    (folder / "state.json").write_text(json.dumps({"_data_files": names, "_split": "train"}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {"input_ids": {"_type": "Sequence"}}}))
    return folder


def expected_flat(rows: list[list[int] | None]) -> list[int]:
    """Each non-empty row followed by EOS unless it already ends with it."""
    out: list[int] = []
    for row in rows:
        if row:
            out += row if row[-1] == EOS else [*row, EOS]
    return out


def run_config(data: dict, results: Path, **training) -> RunConfig:
    return RunConfig.from_dict({"model": MODEL, "training": {**TRAINING, **training}, "data": data,
                                "output": {"root": str(results), "sweep": "t"}})


# ----------------------------------------------------------------------------------------------------------
# llm.c .bin shards, end to end
# ----------------------------------------------------------------------------------------------------------
def test_training_from_bin_shards_uses_no_tokenizer(tmp_path, monkeypatch):
    shards = [llmc_stream(documents(60, seed)) for seed in (1, 2)]
    for i, tokens in enumerate(shards, 1):
        write_bin(tmp_path / "fineweb10B" / f"fineweb_train_{i:06d}.bin", tokens)
    val = llmc_stream(documents(15, 3))
    write_bin(tmp_path / "fineweb10B" / "fineweb_val_000000.bin", val)
    monkeypatch.setattr(tokenizer_module, "train_bpe", lambda *a, **k: pytest.fail("trained a tokenizer"))
    monkeypatch.setattr(tokenizer_module.TokenizerInfo, "load", lambda self: pytest.fail("loaded a tokenizer"))
    data = {"corpus": str(tmp_path / "fineweb10B" / "fineweb_train_*.bin"),
            "val_paths": {"fineweb": str(tmp_path / "fineweb10B" / "fineweb_val_*.bin")},
            "vocab_size": VOCAB, "eos_token_id": EOS}

    corpus = open_corpus(DataConfig(**data))
    assert corpus.known_tokens("train") == sum(len(s) for s in shards)  # from the headers alone
    assert corpus.known_tokens("fineweb") == len(val)
    summary = train_run(run_config(data, tmp_path / "results"))

    assert summary["state"] == "completed" and summary["step"] == 6
    assert np.isfinite(summary["val_fineweb_loss"])
    run = json.loads((Path(summary["run_dir"]) / "run.json").read_text())
    assert run["tokenizer"]["source"] == "pretokenized" and run["tokenizer"]["path"] is None
    assert run["model"]["vocab_size"] == VOCAB and run["model"]["eos_token_id"] == EOS
    fingerprint = run["corpus"]["fingerprint"]
    assert fingerprint["kind"] == "tokens" and fingerprint["format"] == "bin" and fingerprint["n_files"] == 2
    assert run["shards"]["train"]["n_tokens"] == sum(len(s) for s in shards)
    assert run["shards"]["train"]["n_documents"] == 120 and run["shards"]["fineweb"]["n_documents"] == 15
    cache = tmp_path / "cache"
    assert not (cache / "tokenizers").exists() and not (cache / "shards").exists()  # nothing built or copied

    # The shards are the files themselves, read in sorted name order.
    _, prepared = prepare_data(DataConfig(**data))
    assert np.array_equal(np.asarray(prepared.train.tokens()), np.concatenate(shards))
    assert prepared.train.pieces[0].path.endswith("fineweb_train_000001.bin")


def test_bad_bin_files_are_named(tmp_path):
    tokens = llmc_stream(documents(5, 1))
    cases = {
        "magic": write_bin(tmp_path / "magic" / "a.bin", tokens, magic=12345),
        "version": write_bin(tmp_path / "version" / "a.bin", tokens, version=3),
        "size": write_bin(tmp_path / "size" / "a.bin", tokens, count=len(tokens) + 10),
    }
    (tmp_path / "short").mkdir()
    cases["short"] = tmp_path / "short" / "a.bin"
    cases["short"].write_bytes(b"\0" * 100)
    messages = {}
    for what, path in cases.items():
        with pytest.raises(UserError) as err:
            open_corpus(DataConfig(corpus=str(path.parent), vocab_size=VOCAB, eos_token_id=EOS))
        messages[what] = str(err.value)
        assert str(path) in messages[what], what
    assert "12345" in messages["magic"] and "version 3" in messages["version"]
    assert "truncated" in messages["size"] and "header" in messages["short"]
    # llm.c's LLaMA-3 layout (uint32 tokens) is read as well.
    big = write_bin(tmp_path / "llama" / "a.bin", np.asarray([70000, 1, 2, 70000, 3]), magic=20240801, version=7)
    corpus = open_corpus(DataConfig(corpus=str(big), format="bin", vocab_size=128256, eos_token_id=70000))
    assert corpus.known_tokens("train") + corpus.known_tokens("val") == 5
    assert np.asarray(corpus.split_tokens("train")).tolist() + np.asarray(corpus.split_tokens("val")).tolist() == [
        70000, 1, 2, 70000, 3]


def test_token_ids_must_fit_the_vocabulary(tmp_path):
    path = write_bin(tmp_path / "a.bin", np.asarray([0, 5, 50256, 7], dtype=np.uint16))
    with pytest.raises(ConfigError) as err:
        prepare_data(DataConfig(corpus=str(path), vocab_size=8192, eos_token_id=0))
    assert err.value.field == "data.vocab_size" and str(path) in str(err.value) and "50256" in str(err.value)
    # A larger vocabulary takes them; the first check's statistics are cached by the file's size and time.
    corpus = open_corpus(DataConfig(corpus=str(path), vocab_size=50304, eos_token_id=0))
    corpus.check_vocabulary()
    assert len(list((tmp_path / "cache" / "tokens" / "stats").glob("*.json"))) == 1


# ----------------------------------------------------------------------------------------------------------
# .npy arrays and the held-out tail
# ----------------------------------------------------------------------------------------------------------
def test_npy_folder_is_concatenated_and_its_tail_held_out(tmp_path):
    docs = documents(400, 4)
    stream = np.asarray([t for doc in docs for t in [*doc, EOS]], dtype=np.int64)
    pieces = np.array_split(stream, [3000, 9000])
    folder = tmp_path / "tokens"
    folder.mkdir()
    for name, piece, dtype in (("b.npy", pieces[1], np.uint16), ("c.npy", pieces[2], np.int64),
                               ("a.npy", pieces[0], np.int32)):  # written out of order, read in name order
        np.save(folder / name, piece.astype(dtype))
    np.save(tmp_path / "matrix.npy", np.zeros((4, 4), dtype=np.int32))
    (folder / ".hidden.npy").write_bytes(b"not read")

    cfg = DataConfig(corpus=str(folder), vocab_size=VOCAB, eos_token_id=EOS)
    corpus = open_corpus(cfg)
    assert corpus.format == "npy" and corpus.val_splits == ("val",)
    expected = stream
    _, shards = prepare_data(cfg)
    train, val = np.asarray(shards.train.tokens()), np.asarray(shards.val["val"].tokens())
    assert np.array_equal(np.concatenate([train, val]), expected)  # disjoint, nothing lost
    assert 0.009 * len(expected) <= len(val) <= 0.021 * len(expected)
    assert train[-1] == EOS  # the cut falls just after an end of document: no document is split
    assert corpus.known_tokens("train") == len(train) and corpus.known_tokens("val") == len(val)
    assert shards.train.n_documents + shards.val["val"].n_documents == len(docs)
    assert shards.train.n_documents == int((train == EOS).sum())
    assert not (tmp_path / "cache" / "shards").exists()

    with pytest.raises(UserError) as err:
        open_corpus(DataConfig(corpus=str(tmp_path / "matrix.npy"), vocab_size=VOCAB, eos_token_id=EOS))
    assert "matrix.npy" in str(err.value) and "1-D" in str(err.value)


def test_token_array_reads_several_files_as_one(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 60000, size=n).astype(np.uint16) for n in (7, 1, 30, 12)]
    pieces = []
    for i, part in enumerate(parts):
        np.save(tmp_path / f"{i}.npy", part)
        pieces.append(npy_piece(tmp_path / f"{i}.npy"))
    whole = np.concatenate(parts)
    array = TokenArray(pieces)
    assert len(array) == len(whole) and np.array_equal(np.asarray(array), whole)
    index = rng.integers(0, len(whole), size=(5, 9))
    assert np.array_equal(array[index], whole[index])
    assert np.array_equal(array[3:40], whole[3:40]) and array[8] == whole[8] and array[-1] == whole[-1]
    assert np.array_equal(np.asarray(array.view(5, 45)), whole[5:45])
    piece = TokenPiece(pieces[2].path, pieces[2].offset, pieces[2].dtype, pieces[2].length).part(4, 10)
    assert np.array_equal(piece.array(), parts[2][4:10])


# ----------------------------------------------------------------------------------------------------------
# Hugging Face save_to_disk folders and Parquet token columns
# ----------------------------------------------------------------------------------------------------------
def test_save_to_disk_folder_is_flattened_once(tmp_path, monkeypatch):
    rows = [doc + [EOS] if i % 3 == 0 else doc for i, doc in enumerate(documents(40, 5))]
    rows[4], rows[7] = [], None  # an empty and a missing row are no documents
    val_rows = documents(6, 6)
    write_save_to_disk(tmp_path / "ds_train", rows)
    write_save_to_disk(tmp_path / "ds_val", val_rows, files=1)
    cfg = DataConfig(corpus=str(tmp_path / "ds_train"), val_paths={"held": str(tmp_path / "ds_val")},
                     vocab_size=VOCAB, eos_token_id=EOS)
    corpus = open_corpus(cfg)
    assert corpus.format == "arrow"
    vocabulary, shards = prepare_data(cfg)
    assert vocabulary.source == "pretokenized" and vocabulary.vocab_size == VOCAB
    assert np.asarray(shards.train.tokens()).tolist() == expected_flat(rows)
    assert shards.train.n_documents == 38 and shards.val["held"].n_documents == 6
    assert np.asarray(shards.val["held"].tokens()).tolist() == expected_flat(val_rows)
    assert corpus.known_tokens("train") == shards.train.n_tokens
    assert corpus.known_tokens("held") == shards.val["held"].n_tokens
    assert not shards.train.cache_hit and (tmp_path / "cache" / "shards").is_dir()
    assert not (tmp_path / "cache" / "tokenizers").exists()
    _, again = prepare_data(cfg)
    assert again.train.cache_hit and again.train.path == shards.train.path

    # Ids beyond the vocabulary are named with the file.
    with pytest.raises(ConfigError) as err:
        prepare_data(DataConfig(corpus=str(tmp_path / "ds_train"), vocab_size=40, eos_token_id=EOS))
    assert err.value.field == "data.vocab_size" and "data-0000" in str(err.value)
    # A DatasetDict folder points at its splits.
    (tmp_path / "dict").mkdir()
    (tmp_path / "dict" / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    (tmp_path / "dict" / "train").mkdir()
    with pytest.raises(ConfigError) as err:
        open_corpus(DataConfig(corpus=str(tmp_path / "dict"), vocab_size=VOCAB, eos_token_id=EOS))
    assert err.value.field == "data.corpus" and "dict/train" in str(err.value)


def test_parquet_token_column_and_held_out_documents(tmp_path):
    rows = documents(300, 7)
    pq.write_table(pa.table({"input_ids": rows, "id": list(range(300))}), tmp_path / "tokens.parquet",
                   row_group_size=64)
    cfg = DataConfig(corpus=str(tmp_path / "tokens.parquet"), vocab_size=VOCAB, eos_token_id=EOS)
    corpus = open_corpus(cfg)
    assert corpus.format == "parquet_tokens" and corpus.val_splits == ("val",)
    _, shards = prepare_data(cfg)
    train = np.asarray(shards.train.tokens()).tolist()
    val = np.asarray(shards.val["val"].tokens()).tolist()

    def split_docs(tokens: list[int]) -> list[tuple[int, ...]]:
        out, current = [], []
        for t in tokens:
            if t == EOS:
                out.append(tuple(current))
                current = []
            else:
                current.append(t)
        return out

    train_docs, val_docs = split_docs(train), split_docs(val)
    assert 1 <= len(val_docs) <= 20 and len(train_docs) + len(val_docs) == 300
    assert sorted(train_docs + val_docs) == sorted(tuple(r) for r in rows)  # whole documents, none lost or shared
    assert corpus.known_tokens("val") == len(val) and corpus.known_tokens("train") == len(train)

    # Text and token columns together: the format must be named.
    pq.write_table(pa.table({"input_ids": rows[:3], "text": ["a", "b", "c"]}), tmp_path / "both.parquet")
    with pytest.raises(ConfigError) as err:
        open_corpus(DataConfig(corpus=str(tmp_path / "both.parquet"), vocab_size=VOCAB, eos_token_id=EOS))
    assert err.value.field == "data.format"
    assert open_corpus(DataConfig(corpus=str(tmp_path / "both.parquet"), format="parquet_tokens",
                                  vocab_size=VOCAB, eos_token_id=EOS)).pretokenized
    with pytest.raises(ConfigError) as err:
        open_corpus(DataConfig(corpus=str(tmp_path / "tokens.parquet"), format="parquet_tokens",
                               token_column="ids", vocab_size=VOCAB, eos_token_id=EOS))
    assert err.value.field == "data.token_column" and "tokens.parquet" in str(err.value)


# ----------------------------------------------------------------------------------------------------------
# Config fields and run ids
# ----------------------------------------------------------------------------------------------------------
def test_token_fields_are_checked_and_old_run_ids_kept(tmp_path):
    assert TOKEN_FORMATS == READER_FORMATS
    for fields, field in [({"format": "bin"}, "eos_token_id"),
                          ({"format": "npy", "eos_token_id": 0, "tokenizer_path": "t.json"}, "tokenizer_path"),
                          ({"format": "jsonl", "eos_token_id": 0}, "eos_token_id"),
                          ({"format": "bin", "eos_token_id": 70, "vocab_size": 64}, "eos_token_id")]:
        with pytest.raises(ConfigError) as err:
            DataConfig(corpus="x", **fields)
        assert err.value.field == field, fields
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict({"model": MODEL, "training": TRAINING, "data": {"corpus": "x", "format": "arrow"}})
    assert err.value.field == "data.eos_token_id"
    # auto-detected token files need the id too
    write_bin(tmp_path / "a.bin", np.arange(10))
    with pytest.raises(ConfigError) as err:
        prepare_data(DataConfig(corpus=str(tmp_path / "a.bin")))
    assert err.value.field == "data.eos_token_id"
    # The new fields at their defaults leave run ids as they were (this id was computed before they existed).
    old = run_config({"corpus": "x/y", "vocab_size": 300}, tmp_path, steps=4, lr=3e-3, eval_tokens=65536,
                     checkpoint_every=100, device="auto", micro_batch_size=4)
    assert "eos_token_id" not in old.identity()["data"] and "token_column" not in old.identity()["data"]
    assert old.run_id == "c5e955bcef"
    assert run_config({"corpus": "x/y", "format": "bin", "eos_token_id": 0}, tmp_path).run_id != old.run_id


def test_text_corpora_do_not_know_their_token_count(tmp_path):
    write_text_corpus(tmp_path / "corpus", 5, seed=1)
    corpus = UserCorpus(str(tmp_path / "corpus"))
    assert corpus.known_tokens("train") is None and corpus.known_tokens("val") is None


# ----------------------------------------------------------------------------------------------------------
# A text corpus with the user's tokenizer.json
# ----------------------------------------------------------------------------------------------------------
def test_training_from_text_with_a_given_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    texts = write_text_corpus(tmp_path / "corpus", 30, seed=8, sentences=40)
    write_text_corpus(tmp_path / "val", 3, seed=9, sentences=40)
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[UNK]", "</s>"]))
    tokenizer.save(str(tmp_path / "tokenizer.json"))

    data = {"corpus": str(tmp_path / "corpus"), "val_paths": {"held": str(tmp_path / "val")},
            "tokenizer_path": str(tmp_path / "tokenizer.json")}
    summary = train_run(run_config(data, tmp_path / "results"))
    assert summary["state"] == "completed" and np.isfinite(summary["val_held_loss"])
    run = json.loads((Path(summary["run_dir"]) / "run.json").read_text())
    assert run["tokenizer"]["source"] == "file" and run["tokenizer"]["eos_token"] == "</s>"
    assert run["model"]["vocab_size"] == tokenizer.get_vocab_size()
    assert run["model"]["eos_token_id"] == tokenizer.token_to_id("</s>")
    assert not (tmp_path / "cache" / "tokenizers").exists()  # nothing trained
    _, shards = prepare_data(DataConfig(**data))
    first = np.asarray(shards.train.tokens())
    first = first[: int(np.argmax(first == tokenizer.token_to_id("</s>")))]
    assert tokenizer.decode(first.tolist()) == " ".join(tokenizer.encode(texts[0]).tokens)


# ----------------------------------------------------------------------------------------------------------
# The site-packages corpus
# ----------------------------------------------------------------------------------------------------------
def test_site_corpus_splits_by_path_and_prefers_the_first_folder(tmp_path):
    rng = random.Random(10)
    first, second = tmp_path / "site1" / "site-packages", tmp_path / "site2" / "site-packages"
    docstring = '"""' + synthetic_text(rng, 8) + '"""\n'
    for i in range(150):
        body = docstring + f"def f{i}(x):\n    return x + {i}\n"
        (first / f"pkg{i % 7}").mkdir(parents=True, exist_ok=True)
        (first / f"pkg{i % 7}" / f"mod{i}.py").write_text(body)
    (second / "pkg0").mkdir(parents=True)
    (second / "pkg0" / "mod0.py").write_text("shadowed = True\n")  # pkg0/mod0.py is imported from the first
    (second / "other").mkdir()
    (second / "other" / "only_here.py").write_text(docstring + "x = 1\n")
    (second / "other" / "copy.py").write_text(docstring + "def f1(x):\n    return x + 1\n")  # a duplicate
    (second / "other" / "huge.py").write_text("TABLE = " + repr(list(range(200_000))) + "\n")  # over 1 MB
    (second / "other" / "__pycache__").mkdir()
    (second / "other" / "__pycache__" / "cached.py").write_text("x = 2\n")

    corpus = SiteCorpus([first, second])
    docs = {split: dict(corpus.documents(split)) for split in corpus.splits}
    code_keys = set(docs["train"]) | set(docs["code"])
    assert "other/only_here.py" in code_keys and "other/huge.py" not in code_keys
    assert ("other/copy.py" in code_keys) != ("pkg1/mod1.py" in code_keys)  # one of two identical files
    assert not any("__pycache__" in k for k in code_keys)
    assert "shadowed" not in (docs["train"].get("pkg0/mod0.py", "") + docs["code"].get("pkg0/mod0.py", ""))
    assert docs["code"] and docs["prose"] and not set(docs["code"]) & set(docs["train"])
    assert {k.removeprefix("doc:") for k in docs["prose"]} <= set(docs["code"])
    assert corpus.known_tokens("train") is None and corpus.fingerprint["n_files"] == 153  # 150 + 3 more
    assert SiteCorpus([first, second]).id == corpus.id
    # The running interpreter's own folders are found (numpy is installed in one of them).
    assert any((folder / "numpy").is_dir() for folder in site_package_folders())
    with pytest.raises(ConfigError) as err:
        DataConfig(corpus="site", val_paths={"v": "x"})
    assert err.value.field == "val_paths"


def test_a_sweep_trains_from_bin_shards_with_no_tokenizer_work(tmp_path, monkeypatch, capsys):
    import yaml

    from embscale.cli import main

    train = llmc_stream(documents(80, 1))
    write_bin(tmp_path / "shards" / "fineweb_train_000001.bin", train)
    write_bin(tmp_path / "shards" / "fineweb_val_000000.bin", llmc_stream(documents(15, 3)))
    monkeypatch.setattr(tokenizer_module, "train_bpe", lambda *a, **k: pytest.fail("trained a tokenizer"))
    monkeypatch.setattr(tokenizer_module.TokenizerInfo, "load", lambda self: pytest.fail("loaded a tokenizer"))
    monkeypatch.setenv("EMBSCALE_RESULTS", str(tmp_path / "results"))
    sweep = {
        "name": "bin_sweep",
        "model": {"vocab_size": VOCAB, "width": 32, "depth": 1, "layer_type": "shortcut", "attention": "mha",
                  "head_dim": 16, "dense_hidden": 64, "expert_size": 32, "experts": 4, "top_k": 2,
                  "max_seq_len": 32},
        "ngram": {"n": 2, "k": 2, "sizing": "paper"},
        "training": {"tokens": 4 * 256, "batch_tokens": 256, "seq_len": 32, "micro_batch_size": 8, "lr": 3e-3,
                     "eval_every": 2, "eval_tokens": 256, "checkpoint_every": 0, "device": "cpu"},
        "data": {"corpus": str(tmp_path / "shards" / "fineweb_train_*.bin"),
                 "val_paths": {"fineweb": str(tmp_path / "shards" / "fineweb_val_*.bin")},
                 "vocab_size": VOCAB, "eos_token_id": EOS},
        "grid": {"family": ["moe", "ne"], "ratio": [3], "base_ratio": [2]},
        "executor": {"type": "local"},
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{4 * 256 / len(train):.2f}" in out  # exact epochs from the .bin header, before anything ran
    assert main(["submit", str(path), "--executor", "debug"]) == 0
    runs = sorted((tmp_path / "results" / "bin_sweep").glob("*/run.json"))
    assert len(runs) == 2
    for run_json in runs:
        run = json.loads(run_json.read_text())
        assert run["tokenizer"]["source"] == "pretokenized" and run["shards"]["train"]["n_tokens"] == len(train)
    status = [json.loads((p.parent / "status.json").read_text())["state"] for p in runs]
    assert status == ["completed", "completed"]
    assert not (tmp_path / "cache" / "tokenizers").exists()


# ----------------------------------------------------------------------------------------------------------
# The system corpus: every text source under the interpreter's prefixes
# ----------------------------------------------------------------------------------------------------------
def _system_tree(root: Path) -> list[tuple[str, Path]]:
    """A standard library, a package folder and an include folder, with what the corpus must leave out."""
    stdlib, site_dir, include = root / "lib", root / "site-packages", root / "include"
    for i in range(150):  # enough files that some fall in the held-out 2%
        _write(stdlib / f"mod{i}.py", f'"""Module {i}: {"documentation " * 12}"""\nvalue = {i}\n')
    _write(stdlib / "zz_copy_of_mod0.py", (stdlib / "mod0.py").read_text())  # a later duplicate: dropped
    _write(stdlib / "empty.py", "  \n")  # empty: dropped
    _write(stdlib / "site-packages" / "inner.py", "x = 1\n")  # a package folder inside the stdlib: not entered
    _write(stdlib / "__pycache__" / "cached.py", "x = 2\n")
    _write(site_dir / "pkg" / "core.py", "def f():\n    return 3\n")
    _write(site_dir / "pkg" / "core.pyi", "def f() -> int: ...\n")
    _write(site_dir / "pkg" / "kernel.cu", "__global__ void k() {}\n")
    _write(site_dir / "pkg" / "table.c", "int t[] = {" + "1," * 600_000 + "};\n")  # over 1 MB: dropped
    _write(site_dir / "pkg" / "data.bin", "not text by its name")
    (site_dir / "pkg" / "blob.txt").write_bytes(b"binary\0data")  # a NUL byte: dropped
    for i in range(60):
        _write(site_dir / "pkg" / "docs" / f"page{i}.md", f"# Page {i}\n\nProse about page {i}.\n")
    _write(include / "api.h", "int api(void);\n")
    return [("stdlib", stdlib), ("site", site_dir), ("base-include", include)]


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_system_corpus_reads_code_and_prose_and_leaves_out_what_it_must(tmp_path, monkeypatch):
    from embscale.training.data.corpus import SystemCorpus

    monkeypatch.setenv("EMBSCALE_CACHE", str(tmp_path / "cache"))
    corpus = SystemCorpus(_system_tree(tmp_path))
    keys = {key for key, _ in corpus.files}
    assert "site/pkg/core.pyi" in keys and "site/pkg/kernel.cu" in keys and "base-include/api.h" in keys
    assert "stdlib/mod0.py" in keys
    for left_out in ("stdlib/zz_copy_of_mod0.py", "stdlib/empty.py", "site/pkg/table.c", "site/pkg/blob.txt",
                     "site/pkg/data.bin"):
        assert left_out not in keys, left_out
    assert not any("inner.py" in key or "cached.py" in key for key in keys)
    assert corpus.fingerprint["n_kept"] == len(keys)

    train = dict(corpus.documents("train"))
    code = dict(corpus.documents("code"))
    prose = dict(corpus.documents("prose"))
    assert code and prose, "150 sources and 60 pages hold some out at 2% and 10%"
    assert not set(train) & set(code) and not set(train) & set(prose)
    code_keys = {k for k in keys if not k.endswith(".md")}
    assert set(code) | {k for k in train if k in code_keys} == code_keys
    assert all(k.endswith(".md") or k.startswith("doc:") for k in prose)
    # a held-out source's docstring is prose, never training text
    for key in code:
        if key.endswith(".py"):
            assert f"doc:{key}" not in train and f"doc:{key}" in prose
    assert train["site/pkg/kernel.cu"] == "__global__ void k() {}\n"
    assert corpus.split_bytes("train") > corpus.split_bytes("code") > 0


def test_system_corpus_id_is_stable_and_follows_the_files(tmp_path, monkeypatch):
    from embscale.training.data.corpus import SystemCorpus

    monkeypatch.setenv("EMBSCALE_CACHE", str(tmp_path / "cache"))
    roots = _system_tree(tmp_path)
    first = SystemCorpus(roots)
    assert SystemCorpus(roots).id == first.id
    _write(tmp_path / "include" / "api.h", "int api(int);\n")
    assert SystemCorpus(roots).id != first.id
    with pytest.raises(UserError, match="no text sources"):
        SystemCorpus([("x", tmp_path / "cache" / "nothing")])


def test_system_corpus_is_a_named_corpus():
    from embscale.training.data.corpus import val_split_names

    data = DataConfig(corpus="system")
    assert val_split_names(data) == ("code", "prose")
    with pytest.raises(ConfigError, match="val_paths"):
        DataConfig(corpus="system", val_paths={"v": "x"})


def test_system_listing_matches_a_walk_of_the_same_tree_links_included(tmp_path):
    """The scandir listing of the system corpus picks what ``os.walk`` (not following linked folders) and
    ``Path.is_file`` pick: links to files count, linked, hidden, ``__pycache__`` and package folders are not
    entered, broken links are no files; each status is the file's own (``os.stat``, following a link)."""
    import os

    from embscale.training.data.corpus import _SYSTEM_SKIPPED, SYSTEM_SUFFIXES, _system_files

    roots = _system_tree(tmp_path)
    lib = roots[0][1]
    (lib / "linked_dir").symlink_to(roots[1][1] / "pkg", target_is_directory=True)  # not entered
    (lib / "linked.py").symlink_to(lib / "mod1.py")  # a link to a file: the file
    (lib / "broken.py").symlink_to(lib / "nowhere.py")  # no file
    _write(lib / ".hidden" / "h.py", "x = 3\n")
    _write(lib / "deep" / "er" / "d.py", "x = 4\n")

    def walked(label, root):
        for folder, subfolders, names in os.walk(root):
            subfolders[:] = sorted(n for n in subfolders if not n.startswith(".") and n not in _SYSTEM_SKIPPED)
            relative = os.path.relpath(folder, root)
            prefix = f"{label}/" if relative == "." else f"{label}/{relative.replace(os.sep, '/')}/"
            for name in sorted(names):
                if name.endswith(SYSTEM_SUFFIXES) and not name.startswith(".") and Path(folder, name).is_file():
                    yield prefix + name, str(Path(folder, name))

    for label, root in roots:
        listed = {key: (path, status) for key, path, status in _system_files(label, root)}
        assert sorted((key, path) for key, (path, _) in listed.items()) == sorted(walked(label, root))
        for path, status in listed.values():
            assert (status.st_size, status.st_ino, status.st_mtime_ns) == (
                os.stat(path).st_size, os.stat(path).st_ino, os.stat(path).st_mtime_ns)
    keys = {key for key, _, _ in _system_files("stdlib", lib)}
    assert {"stdlib/linked.py", "stdlib/deep/er/d.py"} <= keys
    assert not {"stdlib/broken.py", "stdlib/.hidden/h.py"} & keys and not any("linked_dir" in k for k in keys)
