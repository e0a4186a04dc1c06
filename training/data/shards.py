"""Token shards: one flat token array per split, built once per (corpus, tokenizer) and memory-mapped by runs.

Text corpora: documents are each followed by the EOS token and stored as ``uint16`` when the vocabulary has at
most 65535 entries and ``uint32`` otherwise, under ``<cache>/shards/<key>/<split>.bin`` with ``<split>.json``
beside it. A shard is built once behind a file lock, tokenised on every core with progress and resumably
(:mod:`embscale.training.data.encode`: parts under ``<split>.parts/``, concatenated into ``<split>.bin`` when all
are done, then removed), and written to a temporary file and renamed, so a half-built shard is never seen.

Pre-tokenised corpora (:mod:`embscale.training.data.tokens`) need no tokenizer: ``npy`` and ``bin`` shards are
the user's files themselves, memory-mapped in place (a :class:`Shard` with ``pieces``); ``arrow`` and
``parquet_tokens`` are flattened once into the cache as above, their token ids checked against
``data.vocab_size`` on the way.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from embscale.base.errors import UserError
from embscale.base.files import atomic_file, atomic_write_json
from embscale.base.progress import Progress, log
from embscale.training.data.corpus import Corpus, TokenCorpus, digest, open_corpus
from embscale.training.data.encode import encode_split
from embscale.training.data.sizes import remember_split_tokens
from embscale.training.data.tokenizer import (
    TokenizerInfo,
    build_tokenizer,
    cache_root,
    file_lock,
    load_tokenizer_file,
    pretokenized_vocabulary,
)
from embscale.training.data.tokens import TokenPiece, check_id_range, token_array

# The layout of a cached shard (<split>.bin + <split>.json). Unchanged by the parallel, resumable build: its
# parts are a transient of the build, and the finished shard is the same bytes as before.
SHARD_VERSION = 1


@dataclass(frozen=True)
class Shard:
    """One split's tokens on disk: the cached file at ``path``, or (pre-tokenised ``npy`` / ``bin``) the
    ``pieces`` of the user's files, with ``path`` naming where they came from.

    ``cache_hit``: nothing was tokenised or flattened this time."""

    split: str
    path: str
    n_tokens: int
    n_documents: int
    dtype: str
    eos_token_id: int
    cache_hit: bool = False
    pieces: tuple[TokenPiece, ...] = ()

    def tokens(self) -> Any:
        """The tokens, memory-mapped read-only: a numpy memmap, or a :class:`~.tokens.TokenArray` over
        several files (indexed the same way)."""
        if self.pieces:
            return token_array(self.pieces)
        return np.memmap(self.path, dtype=np.dtype(self.dtype), mode="r", shape=(self.n_tokens,))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def record(self) -> dict[str, Any]:
        """What ``<split>.json`` stores."""
        return {k: v for k, v in self.to_dict().items() if k not in ("path", "cache_hit", "pieces")}


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


def _remove_leftovers(folder: Path) -> None:
    """Temporary files a killed build left in a shard folder (the caller holds its lock: no build is running)."""
    if folder.is_dir():
        for stale in folder.glob(".*.tmp"):
            stale.unlink(missing_ok=True)


def _cached_shard(folder: Path, split: str) -> Shard | None:
    meta_path, bin_path = folder / f"{split}.json", folder / f"{split}.bin"
    if meta_path.is_file() and bin_path.is_file():
        meta = json.loads(meta_path.read_text())
        if bin_path.stat().st_size == meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize:
            return Shard(**{**meta, "path": str(bin_path), "cache_hit": True})
    return None


def build_shards(corpus: Corpus, tokenizer: TokenizerInfo, cache: Path | None = None, workers: int | None = None,
                 chunk_bytes: int | None = None) -> CorpusShards:
    """Every split of a text ``corpus`` tokenised with ``tokenizer``, from the cache or built now (resuming an
    interrupted build). ``workers`` and ``chunk_bytes``: see :func:`~.encode.encode_split`."""
    cache = cache or cache_root()
    key = digest({"corpus": corpus.id, "tokenizer": tokenizer.fingerprint, "version": SHARD_VERSION})[:16]
    folder = cache / "shards" / key
    dtype = token_dtype(tokenizer.vocab_size)
    shards: dict[str, Shard] = {}
    with file_lock(cache / "shards" / f".{key}.lock"):
        _remove_leftovers(folder)
        for split in corpus.splits:
            parts = folder / f"{split}.parts"
            shard = _cached_shard(folder, split)
            if shard is None:
                bin_path = folder / f"{split}.bin"
                with atomic_file(bin_path, fsync=True) as tmp:
                    n_tokens, n_docs = encode_split(corpus.documents(split), corpus.split_bytes(split),
                                                    str(tokenizer.path), tokenizer.eos_token_id, dtype, parts, tmp,
                                                    f"tokenize {split}", workers, chunk_bytes)
                    if n_docs == 0:
                        raise UserError(f"{corpus.describe(split)} has no text: no non-empty documents")
                shard = Shard(split=split, path=str(bin_path), n_tokens=n_tokens, n_documents=n_docs,
                              dtype=dtype.name, eos_token_id=tokenizer.eos_token_id)
                atomic_write_json(folder / f"{split}.json", shard.record())
            if parts.exists():  # the shard is in place: its parts (this build's, or a killed one's) are not needed
                shutil.rmtree(parts, ignore_errors=True)
            shards[split] = shard
    return CorpusShards(train=shards["train"], val={s: shards[s] for s in corpus.val_splits},
                        corpus_fingerprint=corpus.fingerprint, corpus_id=corpus.id)


def token_shards(corpus: TokenCorpus, cache: Path | None = None) -> CorpusShards:
    """The shards of a pre-tokenised corpus: ``npy`` / ``bin`` files in place, ``arrow`` / ``parquet_tokens``
    flattened once into the cache."""
    shards: dict[str, Shard] = {}
    if corpus.flat:
        corpus.check_vocabulary()
        for split in corpus.splits:
            pieces = corpus.split_pieces(split)
            n_tokens = sum(p.length for p in pieces)
            if n_tokens == 0:
                raise UserError(f"{corpus.describe(split)} has no tokens")
            where = corpus.val_sources.get(split, corpus.location) if split != "train" else corpus.location
            shards[split] = Shard(split=split, path=where, n_tokens=n_tokens,
                                  n_documents=corpus.split_documents(split),
                                  dtype=np.result_type(*[np.dtype(p.dtype) for p in pieces]).name,
                                  eos_token_id=corpus.eos_token_id, cache_hit=True, pieces=pieces)
    else:
        cache = cache or cache_root()
        dtype = token_dtype(corpus.vocab_size)
        key = digest({"corpus": corpus.id, "dtype": dtype.name, "version": SHARD_VERSION})[:16]
        folder = cache / "shards" / key
        with file_lock(cache / "shards" / f".{key}.lock"):
            _remove_leftovers(folder)
            for split in corpus.splits:
                shard = _cached_shard(folder, split)
                if shard is None:
                    shard = _flatten_split(corpus, split, folder, dtype)
                shards[split] = shard
    return CorpusShards(train=shards["train"], val={s: shards[s] for s in corpus.val_splits},
                        corpus_fingerprint=corpus.fingerprint, corpus_id=corpus.id)


def _flatten_split(corpus: TokenCorpus, split: str, folder: Path, dtype: np.dtype) -> Shard:
    """A document split's token ids (end-of-document ids added) written once as ``<split>.bin``."""
    bin_path = folder / f"{split}.bin"
    n_tokens = n_docs = 0
    with atomic_file(bin_path, fsync=True) as tmp, open(tmp, "wb") as out, \
            Progress(corpus.split_bytes(split), f"flatten {split}", unit="B", unit_scale=True,
                     min_interval_s=10.0) as progress:
        current = None
        for path, tokens, documents in corpus.document_tokens(split):
            if path != current:
                if current is not None:
                    progress.update(current.stat().st_size)
                current = path
            if len(tokens):
                check_id_range(path, int(tokens.min()), int(tokens.max()), corpus.vocab_size)
            tokens.astype(dtype, copy=False).tofile(out)
            n_tokens += len(tokens)
            n_docs += documents
        if current is not None:
            progress.update(current.stat().st_size)
        out.flush()
        if n_docs == 0:
            raise UserError(f"{corpus.describe(split)} has no tokens: no non-empty rows")
    shard = Shard(split=split, path=str(bin_path), n_tokens=n_tokens, n_documents=n_docs, dtype=dtype.name,
                  eos_token_id=corpus.eos_token_id)
    atomic_write_json(folder / f"{split}.json", shard.record())
    return shard


def prepare_data(data_cfg: Any, cache: Path | None = None, report: Callable[[str], None] | None = log,
                 workers: int | None = None) -> PreparedData:
    """Open and check the corpus, get the tokenizer (cached or trained), get the shards (cached or built).

    A pre-tokenised corpus has no tokenizer: the returned :class:`TokenizerInfo` states ``data.vocab_size`` and
    ``data.eos_token_id`` (``source`` ``pretokenized``). ``workers``: processes that tokenise a text corpus
    (default ``EMBSCALE_TOKENIZE_WORKERS`` or every core).

    ``data_cfg`` is a :class:`~embscale.training.config.DataConfig`. Everything is validated before anything is
    written, and cache entries are written atomically, so a bad corpus leaves nothing behind.
    """
    corpus = open_corpus(data_cfg, cache)
    if isinstance(corpus, TokenCorpus):
        if report:
            report(f"pre-tokenised corpus {corpus.location} (format {corpus.format}): no tokenizer, "
                   f"vocabulary data.vocab_size = {data_cfg.vocab_size}, end of document {corpus.eos_token_id}")
        vocabulary = pretokenized_vocabulary(data_cfg.vocab_size, data_cfg.eos_token_id)
        shards = token_shards(corpus, cache)
    else:
        tokenizer = _tokenizer(corpus, data_cfg, cache, report)
        shards = build_shards(corpus, tokenizer, cache, workers=workers)
    remember_split_tokens(data_cfg, {s.split: s.n_tokens for s in (shards.train, *shards.val.values())}, cache)
    return PreparedData(vocabulary if isinstance(corpus, TokenCorpus) else tokenizer, shards)


def _tokenizer(corpus: Corpus, data_cfg: Any, cache: Path | None, report: Callable[[str], None] | None
               ) -> TokenizerInfo:
    """The tokenizer of a text corpus: the given ``tokenizer.json``, or the BPE trained on it (cached)."""
    if data_cfg.tokenizer_path:
        return load_tokenizer_file(data_cfg.tokenizer_path, data_cfg.eos_token)
    _require_documents(corpus)
    return build_tokenizer(lambda: corpus.documents("train"), corpus.id, corpus.split_bytes("train"),
                           data_cfg.vocab_size, data_cfg.tokenizer_sample_bytes, cache=cache, log=report)


def _require_documents(corpus: Corpus) -> None:
    """Fail early (before training a tokenizer) on an empty split."""
    for split in corpus.splits:
        if next(corpus.documents(split), None) is None:
            raise UserError(f"{corpus.describe(split)} has no text: no non-empty documents")


__all__ = ["CorpusShards", "PreparedData", "Shard", "build_shards", "prepare_data", "token_dtype", "token_shards"]
