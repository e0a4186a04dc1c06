"""Tokenising a text corpus in parts on every core: the same tokens as one serial pass, and an interrupted build
resumes from its finished parts without encoding them again."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from test_data import write_text_corpus

import embscale.training.data.encode as encode_module
from embscale.base.errors import ConfigError
from embscale.training.data.corpus import UserCorpus
from embscale.training.data.shards import build_shards
from embscale.training.data.tokenizer import build_tokenizer

CHUNK = 6_000  # bytes of text per part: about a dozen parts from this corpus


def part_index(part: Path) -> int:
    return int(part.stem.split("-")[1])


class Interrupted(Exception):
    """Stands for a killed build."""


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("EMBSCALE_PROGRESS", "off")


@pytest.fixture
def corpus_and_tokenizer(tmp_path):
    write_text_corpus(tmp_path / "corpus", 80, seed=11, sentences=25)
    write_text_corpus(tmp_path / "val", 3, seed=12, sentences=25)
    corpus = UserCorpus(str(tmp_path / "corpus"), val_paths={"held": str(tmp_path / "val")})
    tokenizer = build_tokenizer(lambda: corpus.documents("train"), corpus.id, corpus.split_bytes("train"),
                                vocab_size=300, cache=tmp_path / "tokenizer-cache")
    return corpus, tokenizer


def test_interrupted_build_resumes_from_its_finished_parts(tmp_path, monkeypatch, corpus_and_tokenizer):
    corpus, tokenizer = corpus_and_tokenizer
    serial = build_shards(corpus, tokenizer, cache=tmp_path / "serial", workers=1, chunk_bytes=CHUNK)
    reference = np.asarray(serial.train.tokens())
    n_parts = sum(1 for _ in encode_module.chunks(corpus.documents("train"), CHUNK))
    assert n_parts > 8

    # Interrupt a parallel build after three parts.
    seen: list[tuple[int, bool]] = []

    def interrupt_after_three(part: Path, reused: bool) -> None:
        seen.append((part_index(part), reused))
        if len(seen) == 3:
            raise Interrupted

    monkeypatch.setattr(encode_module, "on_part_done", interrupt_after_three)
    cache = tmp_path / "parallel"
    with pytest.raises(Interrupted):
        build_shards(corpus, tokenizer, cache=cache, workers=2, chunk_bytes=CHUNK)
    (parts,) = cache.glob("shards/*/train.parts")
    assert not (parts.parent / "train.bin").exists()  # no shard from a build that did not finish
    finished = {part_index(p): p.with_suffix(".bin").stat().st_mtime_ns for p in parts.glob("part-*.json")}
    assert 3 <= len(finished) < n_parts  # the parts in flight when it stopped finished too
    leftovers = [parts / ".part-000001.bin.abc.tmp", parts.parent / ".train.bin.abc.tmp"]
    for leftover in leftovers:
        leftover.write_bytes(b"left by a killed build")
    damaged = max(finished)
    (parts / f"part-{damaged:06d}.bin").write_bytes(b"\0\0")  # a part whose size does not match its record
    del finished[damaged]

    # Build again: the finished parts are reused, the others encoded, and the result is the serial one.
    resumed: list[tuple[int, bool]] = []

    def record_train_parts(part: Path, reused: bool) -> None:
        if part.parent.name == "train.parts":
            resumed.append((part_index(part), reused))
            if reused:  # untouched since the interrupted build wrote it
                assert part.stat().st_mtime_ns == finished[part_index(part)]

    monkeypatch.setattr(encode_module, "on_part_done", record_train_parts)
    shards = build_shards(corpus, tokenizer, cache=cache, workers=2, chunk_bytes=CHUNK)
    assert {index for index, reused in resumed if reused} == set(finished)
    encoded = sorted(index for index, reused in resumed if not reused)
    assert damaged in encoded and not set(encoded) & set(finished)
    assert sorted(i for i, _ in resumed) == list(range(n_parts))
    assert np.array_equal(np.asarray(shards.train.tokens()), reference)
    assert shards.train.n_documents == serial.train.n_documents == 80
    assert np.array_equal(np.asarray(shards.val["held"].tokens()), np.asarray(serial.val["held"].tokens()))
    assert not parts.exists() and not any(p.exists() for p in leftovers)  # gone once the shard is in place


def test_parts_of_another_layout_are_not_reused(tmp_path, monkeypatch, corpus_and_tokenizer):
    corpus, tokenizer = corpus_and_tokenizer
    calls: list[tuple[int, bool]] = []

    def stop_after_two(part: Path, reused: bool) -> None:
        calls.append((part_index(part), reused))
        if len(calls) == 2:
            raise Interrupted

    monkeypatch.setattr(encode_module, "on_part_done", stop_after_two)
    with pytest.raises(Interrupted):
        build_shards(corpus, tokenizer, cache=tmp_path, workers=1, chunk_bytes=CHUNK)
    calls.clear()
    monkeypatch.setattr(encode_module, "on_part_done", lambda part, reused: calls.append((part_index(part), reused)))
    build_shards(corpus, tokenizer, cache=tmp_path, workers=1, chunk_bytes=2 * CHUNK)  # other chunks
    assert calls and not any(reused for _, reused in calls)


def test_worker_count_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("EMBSCALE_TOKENIZE_WORKERS", "3")
    assert encode_module.default_workers() == 3
    monkeypatch.setenv("EMBSCALE_TOKENIZE_WORKERS", "many")
    with pytest.raises(ConfigError) as err:
        encode_module.default_workers()
    assert err.value.field == "EMBSCALE_TOKENIZE_WORKERS"
    monkeypatch.delenv("EMBSCALE_TOKENIZE_WORKERS")
    assert encode_module.default_workers() == len(os.sched_getaffinity(0))
    assert encode_module.default_chunk_bytes(10) == encode_module.MIN_CHUNK_BYTES
    assert encode_module.default_chunk_bytes(10**12) == encode_module.MAX_CHUNK_BYTES
