"""Data: the built-in corpus and its splits, user corpora (folder, JSONL, Parquet), the tokenizer and shard
caches, and the seeded, resumable, rank-sharded batches."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

import embscale.training.data.tokenizer as tokenizer_module
from embscale.base.errors import ConfigError
from embscale.training.config import DataConfig
from embscale.training.data.batches import TrainBatches, eval_starts
from embscale.training.data.corpus import BuiltinCorpus, UserCorpus
from embscale.training.data.shards import prepare_data, token_dtype
from embscale.training.data.tokenizer import EOS_TOKEN, build_tokenizer

WORDS = ("the cat dog sat ran on a mat log red blue big small quick slow fox jumps over lazy and then "
         "it was very happy sad today night day sun moon tree house car road river").split()


def synthetic_text(rng: random.Random, sentences: int) -> str:
    return " ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))).capitalize() + "."
                    for _ in range(sentences))


def write_text_corpus(folder, n_docs: int, seed: int, sentences: int = 30):
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    texts = []
    for i in range(n_docs):
        text = synthetic_text(rng, sentences)
        (folder / f"doc_{i:03d}.txt").write_text(text)
        texts.append(text)
    return texts


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBSCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EMBSCALE_PROGRESS", "off")


# ----------------------------------------------------------------------------------------------------------
# The built-in corpus
# ----------------------------------------------------------------------------------------------------------
def test_builtin_splits_are_disjoint_and_domain_separated():
    corpus = BuiltinCorpus()
    docs = {split: dict(corpus.documents(split)) for split in corpus.splits}
    assert set(docs) == {"train", "code", "prose"}
    assert len(docs["code"]) >= 10 and len(docs["prose"]) >= 5
    assert sum(len(t) for t in docs["prose"].values()) > 30_000
    train_keys, train_texts = set(docs["train"]), set(docs["train"].values())
    for split in ("code", "prose"):
        assert not set(docs[split]) & train_keys, split
        assert not set(docs[split].values()) & train_texts, split
    # A held-out file stays out of training entirely: neither its source nor its docstring is trained on.
    held_out_files = set(docs["code"])
    for key in docs["train"]:
        assert key.removeprefix("doc:") not in held_out_files
    for key in docs["prose"]:
        assert key.startswith("topic:") or key.removeprefix("doc:") in held_out_files
    assert all(not k.startswith(("doc:", "topic:")) for k in docs["code"])
    # Deterministic order and fingerprint.
    again = BuiltinCorpus()
    assert again.fingerprint == corpus.fingerprint and again.id == corpus.id
    assert list(dict(again.documents("code"))) == list(docs["code"])
    assert "site-packages" not in " ".join(docs["train"])


def test_builtin_tokenizer_is_built_once(tmp_path, monkeypatch):
    corpus = BuiltinCorpus()

    def build():
        return build_tokenizer(lambda: corpus.documents("train"), corpus.id, corpus.split_bytes("train"),
                               vocab_size=300, sample_bytes=300_000)

    first = build()
    assert not first.cache_hit and first.vocab_size == 300
    assert first.load().id_to_token(first.eos_token_id) == EOS_TOKEN
    text = "def f(x):\n    return x + 1\n"
    assert first.load().decode(first.load().encode(text).ids) == text
    monkeypatch.setattr(tokenizer_module, "train_bpe", lambda *a, **k: pytest.fail("retrained a cached BPE"))
    second = build()
    assert second.cache_hit and second.fingerprint == first.fingerprint


# ----------------------------------------------------------------------------------------------------------
# User corpora and caches
# ----------------------------------------------------------------------------------------------------------
def test_folder_corpus_caches_tokenizer_and_shards(tmp_path, monkeypatch):
    texts = write_text_corpus(tmp_path / "corpus", 40, seed=1)
    val = write_text_corpus(tmp_path / "val", 3, seed=2)
    cfg = DataConfig(corpus=str(tmp_path / "corpus"), val_paths={"held": str(tmp_path / "val")}, vocab_size=300)
    tokenizer, shards = prepare_data(cfg)
    assert not tokenizer.cache_hit and not shards.train.cache_hit
    assert tokenizer.vocab_size == 300 and tokenizer.eos_token_id == 0
    assert set(shards.val) == {"held"}
    train = np.asarray(shards.train.tokens())
    assert train.dtype == np.uint16
    assert shards.train.n_documents == len(texts) and int((train == 0).sum()) == len(texts)
    assert train[-1] == 0  # every document ends with EOS
    first_doc = train[: int(np.argmax(train == 0))]
    assert tokenizer.load().decode(first_doc.tolist()) == texts[0]
    assert shards.val["held"].n_documents == len(val)
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*") if p.is_file()}

    monkeypatch.setattr(tokenizer_module, "train_bpe", lambda *a, **k: pytest.fail("retrained a cached BPE"))
    tokenizer2, shards2 = prepare_data(cfg)
    assert tokenizer2.cache_hit and shards2.train.cache_hit and shards2.val["held"].cache_hit
    assert shards2.train.path == shards.train.path
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes  # nothing rewritten

    # Editing the corpus changes its fingerprint, so a new tokenizer and new shards are built.
    (tmp_path / "corpus" / "doc_000.txt").write_text("A different first document.")
    monkeypatch.undo()
    monkeypatch.setenv("EMBSCALE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EMBSCALE_PROGRESS", "off")
    tokenizer3, shards3 = prepare_data(cfg)
    assert not tokenizer3.cache_hit and shards3.corpus_id != shards.corpus_id


def test_hash_held_out_split_of_a_user_corpus(tmp_path):
    write_text_corpus(tmp_path / "corpus", 300, seed=3, sentences=2)
    corpus = UserCorpus(str(tmp_path / "corpus"))
    assert corpus.val_splits == ("val",)
    train, val = dict(corpus.documents("train")), dict(corpus.documents("val"))
    assert val and not set(val) & set(train) and len(train) + len(val) == 300


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_jsonl_and_parquet_corpora(tmp_path, fmt):
    rng = random.Random(4)
    records = [{"id": i, "content": synthetic_text(rng, 20)} for i in range(30)]
    val_records = [{"id": i, "content": synthetic_text(rng, 20)} for i in range(4)]
    records.insert(5, {"id": 99, "content": None})  # a missing text is skipped

    def write(path, rows):
        if fmt == "jsonl":
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:
            import pandas as pd

            pd.DataFrame(rows).to_parquet(path)

    write(tmp_path / f"train.{fmt}", records)
    write(tmp_path / f"val.{fmt}", val_records)
    cfg = DataConfig(corpus=str(tmp_path / f"train.{fmt}"), text_column="content",
                     val_paths={"mine": str(tmp_path / f"val.{fmt}")}, vocab_size=280)
    tokenizer, shards = prepare_data(cfg)
    assert shards.corpus_fingerprint["format"] == fmt
    assert shards.train.n_documents == 30 and shards.val["mine"].n_documents == 4
    tokens = np.asarray(shards.val["mine"].tokens())
    first = tokens[: int(np.argmax(tokens == tokenizer.eos_token_id))]
    assert tokenizer.load().decode(first.tolist()) == val_records[0]["content"]

    with pytest.raises(ConfigError) as err:
        prepare_data(DataConfig(corpus=str(tmp_path / f"train.{fmt}"), text_column="body", vocab_size=280))
    assert err.value.field == "data.text_column" and "body" in str(err.value)


def test_validation_files_inside_the_corpus_are_refused(tmp_path):
    write_text_corpus(tmp_path / "corpus", 5, seed=5)
    with pytest.raises(ConfigError) as err:
        UserCorpus(str(tmp_path / "corpus"), val_paths={"v": str(tmp_path / "corpus" / "doc_001.txt")})
    assert err.value.field == "data.val_paths.v"


def test_token_dtype():
    assert token_dtype(8192) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32


# ----------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------
def _take(batches: TrainBatches, steps: int) -> list[np.ndarray]:
    return [np.concatenate([x.numpy() for x, _ in batches.next_step()]) for _ in range(steps)]


def test_batches_are_seeded_resumable_and_sharded():
    tokens = np.arange(10_001, dtype=np.uint16)
    make = lambda seed=0, rank=0, world=1: TrainBatches(tokens, 16, 8, 2, seed, rank, world)  # noqa: E731
    a, b = make(), make()
    steps_a = _take(a, 200)  # 625 windows, 8 per step: several epochs
    assert all(np.array_equal(x, y) for x, y in zip(steps_a, _take(b, 200), strict=True))
    assert not np.array_equal(steps_a[0], _take(make(seed=1), 1)[0])
    # Inputs and targets are the same window shifted by one.
    x, y = make().next_step()[0]
    assert x.shape == (2, 16) and np.array_equal(x[:, 1:].numpy(), y[:, :-1].numpy())
    # One epoch visits every window once.
    one_epoch = np.concatenate(steps_a[:78])[:, 0] // 16
    assert len(set(one_epoch.tolist())) == len(one_epoch)
    # Resume: a fresh sampler at a saved position continues identically.
    c = make()
    _take(c, 77)
    state = c.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    assert all(np.array_equal(x, y) for x, y in zip(_take(c, 10), _take(resumed, 10), strict=True))
    # Two ranks split the same global batch between them.
    ranks = [make(rank=r, world=2) for r in range(2)]
    single = _take(make(), 5)
    for step in range(5):
        parts = [np.concatenate([x.numpy() for x, _ in r.next_step()]) for r in ranks]
        assert np.array_equal(np.concatenate(parts), single[step])


def test_eval_windows_are_fixed_and_bounded():
    starts = eval_starts(10_001, 100, 1000)
    assert len(starts) == 10 and starts[0] == 0 and starts[-1] == 99
    assert len(eval_starts(10_001, 100, 10**9)) == 100
    assert len(eval_starts(50, 100, 1000)) == 0
