"""Token shards: one flat token array per split, built once per (corpus, tokenizer) and memory-mapped by runs.

Documents are each followed by the EOS token and stored as ``uint16`` when the vocabulary has at most 65535
entries and ``uint32`` otherwise, under ``<cache>/shards/<key>/``. A shard is built once (with a progress display)
behind a file lock, written to a temporary file and renamed, so a half-built shard is never seen.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from embscale.base.errors import UserError
from embscale.base.files import atomic_file, atomic_write_json
from embscale.base.progress import Progress, log
from embscale.training.data.corpus import Corpus, digest, open_corpus
from embscale.training.data.sizes import remember_split_tokens
from embscale.training.data.tokenizer import (
    TokenizerInfo,
    build_tokenizer,
    cache_root,
    file_lock,
    load_tokenizer_file,
)

SHARD_VERSION = 1
ENCODE_BATCH_BYTES = 4 << 20


@dataclass(frozen=True)
class Shard:
    """One split's tokens on disk."""

    split: str
    path: str
    n_tokens: int
    n_documents: int
    dtype: str
    eos_token_id: int
    cache_hit: bool = False

    def tokens(self) -> np.ndarray:
        """The tokens, memory-mapped read-only."""
        return np.memmap(self.path, dtype=np.dtype(self.dtype), mode="r", shape=(self.n_tokens,))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class CorpusShards(NamedTuple):
    train: Shard
    val: dict[str, Shard]
    corpus_fingerprint: dict[str, Any]
    corpus_id: str


class PreparedData(NamedTuple):
    """What :func:`prepare_data` returns: ``tokenizer, shards = prepare_data(cfg)``."""

    tokenizer: TokenizerInfo
    shards: CorpusShards


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def _encode_split(corpus: Corpus, split: str, tokenizer: Any, eos_id: int, dtype: np.dtype,
                  out_path: Path) -> tuple[int, int]:
    """Tokenise one split into ``out_path`` (raw array); returns (tokens, documents)."""
    n_tokens = n_docs = 0
    with open(out_path, "wb") as handle, Progress(corpus.split_bytes(split), f"tokenize {split}", unit="B",
                                                  unit_scale=True, min_interval_s=10.0) as progress:
        def flush(texts: list[str]) -> None:
            nonlocal n_tokens, n_docs
            encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
            pieces = []
            for encoding in encodings:
                pieces.append(np.asarray(encoding.ids, dtype=dtype))
                pieces.append(np.asarray([eos_id], dtype=dtype))
            array = np.concatenate(pieces)
            array.tofile(handle)
            n_tokens += len(array)
            n_docs += len(texts)
            progress.update(sum(len(t.encode("utf-8")) for t in texts))

        batch: list[str] = []
        batch_bytes = 0
        for _key, text in corpus.documents(split):
            batch.append(text)
            batch_bytes += len(text)
            if batch_bytes >= ENCODE_BATCH_BYTES:
                flush(batch)
                batch, batch_bytes = [], 0
        if batch:
            flush(batch)
    return n_tokens, n_docs


def build_shards(corpus: Corpus, tokenizer: TokenizerInfo, cache: Path | None = None) -> CorpusShards:
    """Every split of ``corpus`` tokenised with ``tokenizer``, from the cache or built now."""
    cache = cache or cache_root()
    key = digest({"corpus": corpus.id, "tokenizer": tokenizer.fingerprint, "version": SHARD_VERSION})[:16]
    folder = cache / "shards" / key
    dtype = token_dtype(tokenizer.vocab_size)
    shards: dict[str, Shard] = {}
    loaded = None
    with file_lock(cache / "shards" / f".{key}.lock"):
        for split in corpus.splits:
            meta_path = folder / f"{split}.json"
            bin_path = folder / f"{split}.bin"
            if meta_path.is_file() and bin_path.is_file():
                meta = json.loads(meta_path.read_text())
                if bin_path.stat().st_size == meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize:
                    shards[split] = Shard(**{**meta, "path": str(bin_path), "cache_hit": True})
                    continue
            if loaded is None:
                loaded = tokenizer.load()
            with atomic_file(bin_path, fsync=True) as tmp:
                n_tokens, n_docs = _encode_split(corpus, split, loaded, tokenizer.eos_token_id, dtype, tmp)
                if n_docs == 0:
                    raise UserError(f"{corpus.describe(split)} has no text: no non-empty documents")
            shard = Shard(split=split, path=str(bin_path), n_tokens=n_tokens, n_documents=n_docs,
                          dtype=dtype.name, eos_token_id=tokenizer.eos_token_id)
            atomic_write_json(meta_path, {k: v for k, v in shard.to_dict().items()
                                          if k not in ("path", "cache_hit")})
            shards[split] = shard
    return CorpusShards(train=shards["train"], val={s: shards[s] for s in corpus.val_splits},
                        corpus_fingerprint=corpus.fingerprint, corpus_id=corpus.id)


def prepare_data(data_cfg: Any, cache: Path | None = None,
                 report: Callable[[str], None] | None = log) -> PreparedData:
    """Open and check the corpus, get the tokenizer (cached or trained), get the shards (cached or built).

    ``data_cfg`` is a :class:`~embscale.training.config.DataConfig`. Everything is validated before anything is
    written, and cache entries are written atomically, so a bad corpus leaves nothing behind.
    """
    corpus = open_corpus(data_cfg)
    if data_cfg.tokenizer_path:
        tokenizer = load_tokenizer_file(data_cfg.tokenizer_path, data_cfg.eos_token)
    else:
        _require_documents(corpus)
        tokenizer = build_tokenizer(lambda: corpus.documents("train"), corpus.id, corpus.split_bytes("train"),
                                    data_cfg.vocab_size, data_cfg.tokenizer_sample_bytes, cache=cache,
                                    log=report)
    shards = build_shards(corpus, tokenizer, cache)
    remember_split_tokens(data_cfg, {s.split: s.n_tokens for s in (shards.train, *shards.val.values())}, cache)
    return PreparedData(tokenizer, shards)


def _require_documents(corpus: Corpus) -> None:
    """Fail early (before training a tokenizer) on an empty split."""
    for split in corpus.splits:
        if next(corpus.documents(split), None) is None:
            raise UserError(f"{corpus.describe(split)} has no text: no non-empty documents")


__all__ = ["CorpusShards", "PreparedData", "Shard", "build_shards", "prepare_data", "token_dtype"]
