"""Corpora, tokenised shards and batches.

Corpora
    ``builtin``: the running Python's standard library, no download. Code documents are its ``*.py`` source
    files (``site-packages`` excluded, test suites kept; empty files and exact duplicates dropped). Prose
    documents are the ``pydoc_data.topics`` entries and the module docstrings (``ast.get_docstring``, at least
    100 characters; modules are parsed, never imported) of the same files. A source file is held out when the
    hash of its path (relative to the stdlib folder) falls in the lowest 2%: its code goes to validation split
    ``code`` and its docstring to ``prose``, so no held-out text reaches training inside a file.
    ``pydoc_data/topics.py`` itself is not a code document (it *is* the prose); 15% of its topics (by a hash
    of the topic name) are held out as ``prose``. About 31 MB of code and 0.8 MB of prose with CPython 3.11.

    User corpora: a folder of text files (each file one document), or JSONL / Parquet files with the text in a
    configurable column, with the user's validation files (``data.val_paths``) or 2% held out by hash.

Every corpus has a fingerprint (file list, sizes and a sha256 of the contents) whose hash, the corpus id,
keys the tokenizer and shard caches and is stored with every run.

Shards
    One flat token array per split, documents each followed by the EOS token, stored as ``uint16`` when the
    vocabulary has at most 65535 entries and ``uint32`` otherwise, under ``<cache>/shards/<key>/`` and
    memory-mapped by every run. Built once (with a progress display) behind a file lock, written to a
    temporary file and renamed, so a half-built shard is never seen.

Batches
    Training sequences are windows of ``seq_len + 1`` tokens starting at multiples of ``seq_len`` (inputs are
    the first ``seq_len`` tokens, targets the last). Each epoch visits every window once in an order drawn
    from ``(seed, epoch)``; an optimizer step takes the next ``batch_tokens / seq_len`` windows of that order
    (whatever the world size) and rank ``r`` of ``W`` takes the ``r``-th contiguous ``1/W`` of them. The
    position (epoch, cursor) is the whole state, so resuming and changing the number of ranks keep the data.
    Evaluation takes ``eval_tokens / seq_len`` windows evenly spaced over the validation split, in order.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import math
import os
import sys
import sysconfig
import tempfile
import tokenize
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from models.config import ConfigError
from sweeps.progress import Progress, log
from sweeps.status import atomic_write_json
from sweeps.tokenizer import (
    TokenizerInfo,
    build_tokenizer,
    cache_root,
    file_lock,
    hash_fraction,
    load_tokenizer_file,
)

BUILTIN_VAL_FRACTION = 0.02
BUILTIN_TOPIC_VAL_FRACTION = 0.15
USER_VAL_FRACTION = 0.02
MIN_DOCSTRING_CHARS = 100
EXTRACTION_VERSION = 3  # bump when the way documents are cut from files changes
SHARD_VERSION = 1
TOPICS_FILE = "pydoc_data/topics.py"
ENCODE_BATCH_BYTES = 4 << 20


def _user_error(message: str) -> Exception:
    from sweeps.cli import UserError

    return UserError(message)


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def _hash_files(files: list[tuple[str, Path]]) -> dict[str, Any]:
    """Fingerprint of ``(name, path)`` pairs: count, bytes, a hash of names and sizes, a hash of contents."""
    listing = hashlib.sha256()
    contents = hashlib.sha256()
    total = 0
    for name, path in files:
        size = path.stat().st_size
        total += size
        listing.update(f"{name}\t{size}\n".encode())
        with open(path, "rb") as handle:
            for block in iter(lambda h=handle: h.read(1 << 20), b""):
                contents.update(block)
    return {"n_files": len(files), "total_bytes": total, "list_sha256": listing.hexdigest(),
            "content_sha256": contents.hexdigest()}


class Corpus:
    """Documents by split (``train`` and the validation splits), as ``(key, text)`` pairs."""

    kind: str
    location: str
    fingerprint: dict[str, Any]
    val_splits: tuple[str, ...]

    @property
    def id(self) -> str:
        """Short hash of the fingerprint; keys the caches."""
        return _digest({k: v for k, v in self.fingerprint.items() if k != "location"})[:16]

    @property
    def splits(self) -> tuple[str, ...]:
        return ("train", *self.val_splits)

    def documents(self, split: str) -> Iterator[tuple[str, str]]:
        raise NotImplementedError

    def split_bytes(self, split: str) -> int:
        """An estimate of a split's size in bytes (the tokenizer's sampling rate and the progress total)."""
        raise NotImplementedError

    def describe(self, split: str) -> str:
        """Where a split's documents come from, for error messages."""
        return f"split {split} of {self.location}"


# ----------------------------------------------------------------------------------------------------------
# The built-in corpus: the standard library
# ----------------------------------------------------------------------------------------------------------
def _is_builtin_val(relpath: str) -> bool:
    return hash_fraction("split:" + relpath) < BUILTIN_VAL_FRACTION


def _is_topic_val(name: str) -> bool:
    return hash_fraction("split:topic:" + name) < BUILTIN_TOPIC_VAL_FRACTION


def _read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def _module_docstring(path: Path) -> str | None:
    """The module docstring (``ast.get_docstring``), parsing only the file's first statement for speed."""
    raw = path.read_bytes()
    end = 0
    try:
        for token in tokenize.tokenize(io.BytesIO(raw).readline):
            if token.type in (tokenize.NEWLINE, tokenize.ENDMARKER):
                end = token.end[0]
                break
    except (tokenize.TokenError, SyntaxError, UnicodeDecodeError):
        return None  # test data with deliberately bad syntax or encodings
    head = b"".join(raw.splitlines(keepends=True)[:end])
    try:
        tree = ast.parse(head)
    except (SyntaxError, ValueError, UnicodeDecodeError, MemoryError, RecursionError):
        return None
    doc = ast.get_docstring(tree)
    return doc if doc and len(doc) >= MIN_DOCSTRING_CHARS else None


class BuiltinCorpus(Corpus):
    """The running Python's standard library: code (``*.py``) and prose (pydoc topics, module docstrings)."""

    kind = "builtin"
    val_splits = ("code", "prose")

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root or sysconfig.get_paths()["stdlib"])
        self.location = str(self.root)
        excluded = {"site-packages", "dist-packages", "__pycache__"}
        self.files = sorted(
            (p.relative_to(self.root).as_posix(), p) for p in self.root.rglob("*.py")
            if p.is_file() and not excluded.intersection(p.relative_to(self.root).parts))
        if not self.files:
            raise _user_error(f"no Python sources found under the standard library folder {self.root}")
        self.fingerprint = {
            "kind": self.kind, "location": self.location, "python": sys.version.split()[0],
            "extraction_version": EXTRACTION_VERSION, "val_fraction": BUILTIN_VAL_FRACTION,
            "topic_val_fraction": BUILTIN_TOPIC_VAL_FRACTION, **_hash_files(self.files)}
        # Code documents: non-empty files, exact duplicates dropped (the first path in sorted order is kept),
        # so a held-out file cannot reappear in training under another name.
        seen: set[str] = set()
        self.code_files = []
        for rel, path in self.files:
            raw = path.read_bytes()
            digest = hashlib.sha1(raw).hexdigest()
            if rel != TOPICS_FILE and raw.strip() and digest not in seen:
                seen.add(digest)
                self.code_files.append((rel, path))

    def _code_files(self, held_out: bool) -> Iterator[tuple[str, Path]]:
        for rel, path in self.code_files:
            if _is_builtin_val(rel) == held_out:
                yield rel, path

    def _topics(self) -> dict[str, str]:
        """pydoc's topics, each distinct text once (under its first name: "else" and "if" share one)."""
        from pydoc_data.topics import topics

        unique: dict[str, str] = {}
        for name, text in sorted(topics.items()):
            if text.strip() and text not in unique.values():
                unique[name] = text
        return unique

    def documents(self, split: str) -> Iterator[tuple[str, str]]:
        if split == "train":
            for rel, path in self._code_files(held_out=False):
                yield rel, _read_text(path)
            yield from self._prose(held_out=False)
        elif split == "code":
            for rel, path in self._code_files(held_out=True):
                yield rel, _read_text(path)
        elif split == "prose":
            yield from self._prose(held_out=True)
        else:
            raise KeyError(split)

    def _prose(self, held_out: bool) -> Iterator[tuple[str, str]]:
        for name, text in self._topics().items():
            if _is_topic_val(name) == held_out:
                yield f"topic:{name}", text
        for rel, path in self._code_files(held_out=held_out):
            doc = _module_docstring(path)
            if doc:
                yield f"doc:{rel}", doc

    def split_bytes(self, split: str) -> int:
        code = sum(path.stat().st_size for _, path in self._code_files(held_out=split != "train"))
        topics = sum(len(text.encode("utf-8")) for name, text in self._topics().items()
                     if _is_topic_val(name) == (split != "train"))
        docstrings = code // 50  # docstrings are about 1/50 of the source, by size
        return {"train": code + topics + docstrings, "code": code, "prose": topics + docstrings}[split]

    def describe(self, split: str) -> str:
        return f"builtin corpus split {split} ({self.root})"


# ----------------------------------------------------------------------------------------------------------
# User corpora: a folder of text files, JSONL or Parquet
# ----------------------------------------------------------------------------------------------------------
def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _infer_format(path: Path, field: str) -> str:
    suffix_format = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
    if path.is_file():
        return suffix_format.get(path.suffix.lower(), "dir")
    suffixes = {p.suffix.lower() for p in _visible_files(path)}
    if len(suffixes) == 1 and next(iter(suffixes)) in suffix_format:
        return suffix_format[next(iter(suffixes))]
    return "dir"


class _Source:
    """One user-given path (training corpus or a validation split) in one format."""

    def __init__(self, path: Path, fmt: str, text_column: str, field: str):
        self.path, self.format, self.text_column, self.field = path, fmt, text_column, field
        if path.is_file():
            self.files = [(path.name, path)]
        else:
            wanted = {"jsonl": (".jsonl", ".ndjson"), "parquet": (".parquet",)}.get(fmt)
            self.files = [(p.relative_to(path).as_posix(), p) for p in _visible_files(path)
                          if wanted is None or p.suffix.lower() in wanted]
        if not self.files:
            kind = {"jsonl": "JSONL files", "parquet": "Parquet files"}.get(fmt, "files")
            raise ConfigError(field, f"no {kind} found in {path}")

    def check_columns(self) -> None:
        """The text column exists in every file (first record of JSONL, schema of Parquet)."""
        for _, file in self.files:
            if self.format == "parquet":
                import pyarrow.parquet as pq

                try:
                    names = pq.ParquetFile(file).schema_arrow.names
                except Exception as exc:
                    raise _user_error(f"{file}: not a readable Parquet file ({exc})") from None
                if self.text_column not in names:
                    raise ConfigError("data.text_column",
                                      f"column {self.text_column!r} not found in {file}; columns are {names}")
            elif self.format == "jsonl":
                for _lineno, record in self._jsonl_records(file, limit=1):
                    if self.text_column not in record:
                        raise ConfigError("data.text_column",
                                          f"key {self.text_column!r} not found in {file} (first record); "
                                          f"keys are {sorted(record)}")

    def _jsonl_records(self, file: Path, limit: int | None = None) -> Iterator[tuple[int, dict]]:
        seen = 0
        with open(file, encoding="utf-8", errors="replace") as handle:
            for lineno, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    raise _user_error(f"{file}:{lineno}: not a JSON line ({exc})") from None
                if not isinstance(record, dict):
                    got = type(record).__name__
                    raise _user_error(f"{file}:{lineno}: a JSON object was expected, got {got}")
                yield lineno, record
                seen += 1
                if limit is not None and seen >= limit:
                    return

    def documents(self) -> Iterator[tuple[str, str]]:
        for name, file in self.files:
            if self.format == "dir":
                text = _read_text(file)
                if text:
                    yield name, text
            elif self.format == "jsonl":
                for lineno, record in self._jsonl_records(file):
                    if self.text_column not in record:
                        raise ConfigError("data.text_column",
                                          f"key {self.text_column!r} missing in {file} line {lineno}")
                    text = record[self.text_column]
                    if text is None:
                        continue
                    if not isinstance(text, str):
                        raise _user_error(f"{file}:{lineno}: {self.text_column!r} is not a string")
                    if text:
                        yield f"{name}:{lineno}", text
            else:
                import pyarrow.parquet as pq

                parquet = pq.ParquetFile(file)
                row = 0
                for batch in parquet.iter_batches(columns=[self.text_column], batch_size=4096):
                    for text in batch.column(0).to_pylist():
                        row += 1
                        if isinstance(text, str) and text:
                            yield f"{name}:{row}", text
                        elif text is not None and not isinstance(text, str):
                            raise _user_error(f"{file} row {row}: {self.text_column!r} is not text")

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for _, p in self.files)


class UserCorpus(Corpus):
    """A corpus from the user's files; validation from ``val_paths`` or 2% held out by hash."""

    kind = "user"

    def __init__(self, corpus: str, fmt: str = "auto", text_column: str = "text",
                 val_paths: dict[str, str] | None = None):
        path = Path(corpus).expanduser()
        if not path.exists():
            raise ConfigError("data.corpus", f"corpus path {path} does not exist")
        fmt = _infer_format(path, "data.corpus") if fmt == "auto" else fmt
        self.location = str(path)
        self.train_source = _Source(path, fmt, text_column, "data.corpus")
        self.val_sources: dict[str, _Source] = {}
        train_files = {p.resolve() for _, p in self.train_source.files}
        for name, val_path in (val_paths or {}).items():
            field = f"data.val_paths.{name}"
            vpath = Path(val_path).expanduser()
            if not vpath.exists():
                raise ConfigError(field, f"validation path {vpath} does not exist")
            source = _Source(vpath, fmt, text_column, field)
            overlap = sorted(str(p) for _, p in source.files if p.resolve() in train_files)
            if overlap:
                raise ConfigError(field, f"{overlap[0]} is also part of the training corpus {path}")
            self.val_sources[name] = source
        self.val_splits = tuple(self.val_sources) if self.val_sources else ("val",)
        for source in (self.train_source, *self.val_sources.values()):
            source.check_columns()
        self.fingerprint = {
            "kind": self.kind, "location": self.location, "format": fmt,
            "extraction_version": EXTRACTION_VERSION,
            "text_column": text_column if fmt in ("jsonl", "parquet") else None,
            "val_fraction": None if self.val_sources else USER_VAL_FRACTION,
            **_hash_files(self.train_source.files),
            "val": {name: _hash_files(s.files) for name, s in self.val_sources.items()}}

    def documents(self, split: str) -> Iterator[tuple[str, str]]:
        if self.val_sources:
            source = self.train_source if split == "train" else self.val_sources[split]
            yield from source.documents()
            return
        if split not in ("train", "val"):
            raise KeyError(split)
        for key, text in self.train_source.documents():
            if (hash_fraction("split:" + key) < USER_VAL_FRACTION) == (split == "val"):
                yield key, text

    def split_bytes(self, split: str) -> int:
        if split == "train":
            return self.train_source.total_bytes()
        if self.val_sources:
            return self.val_sources[split].total_bytes()
        return max(1, int(self.train_source.total_bytes() * USER_VAL_FRACTION))

    def describe(self, split: str) -> str:
        if split == "train":
            return f"corpus {self.location}"
        if self.val_sources:
            return f"validation split {split} ({self.val_sources[split].path})"
        return (f"held-out validation split ({USER_VAL_FRACTION:.0%} of the documents by hash) of "
                f"{self.location} (give your own with data.val_paths)")


def open_corpus(data_cfg: Any) -> Corpus:
    """The corpus a :class:`~sweeps.run_config.DataConfig` names; errors name the field or file."""
    if data_cfg.corpus == "builtin":
        return BuiltinCorpus()
    return UserCorpus(data_cfg.corpus, data_cfg.format, data_cfg.text_column, data_cfg.val_paths)


# ----------------------------------------------------------------------------------------------------------
# Shards
# ----------------------------------------------------------------------------------------------------------
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
        handle.flush()
        os.fsync(handle.fileno())
    return n_tokens, n_docs


def build_shards(corpus: Corpus, tokenizer: TokenizerInfo, cache: Path | None = None) -> CorpusShards:
    """Every split of ``corpus`` tokenised with ``tokenizer``, from the cache or built now."""
    cache = cache or cache_root()
    key = _digest({"corpus": corpus.id, "tokenizer": tokenizer.fingerprint, "version": SHARD_VERSION})[:16]
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
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{split}.", suffix=".tmp", dir=folder)
            os.close(fd)
            try:
                n_tokens, n_docs = _encode_split(corpus, split, loaded, tokenizer.eos_token_id, dtype,
                                                 Path(tmp))
                if n_docs == 0:
                    raise _user_error(f"{corpus.describe(split)} has no text: no non-empty documents")
                os.replace(tmp, bin_path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
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

    ``data_cfg`` is a :class:`~sweeps.run_config.DataConfig`. Everything is validated before anything is
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
    return PreparedData(tokenizer, build_shards(corpus, tokenizer, cache))


def _require_documents(corpus: Corpus) -> None:
    """Fail early (before training a tokenizer) on an empty split."""
    for split in corpus.splits:
        if next(corpus.documents(split), None) is None:
            raise _user_error(f"{corpus.describe(split)} has no text: no non-empty documents")


# ----------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------
def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    index = starts[:, None] * seq_len + np.arange(seq_len + 1)[None, :]  # (n, seq_len + 1)
    block = torch.from_numpy(np.asarray(tokens[index], dtype=np.int64))
    return block[:, :-1], block[:, 1:]


class TrainBatches:
    """Training batches of one rank: an optimizer step's micro-batches at a time, in a seeded order.

    ``state_dict()`` is the position (plain ints); ``load_state_dict`` restores it.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, sequences_per_step: int, micro_batch_size: int,
                 seed: int, rank: int = 0, world_size: int = 1):
        self.tokens = tokens
        self.seq_len = seq_len
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise _user_error(f"the training split has {len(tokens)} tokens, fewer than seq_len + 1 = "
                              f"{seq_len + 1}")
        if sequences_per_step % (micro_batch_size * world_size):
            raise ConfigError("training.batch_tokens", "does not divide into micro-batches on every rank")
        self.sequences_per_step = sequences_per_step
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.cursor = 0
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._order_epoch = epoch
        return self._order

    def _take(self, count: int) -> np.ndarray:
        taken = []
        while count > 0:
            order = self._epoch_order(self.epoch)
            chunk = order[self.cursor:self.cursor + count]
            taken.append(chunk)
            count -= len(chunk)
            self.cursor += len(chunk)
            if self.cursor >= self.n_windows:
                self.epoch += 1
                self.cursor = 0
        return np.concatenate(taken)

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches ``(inputs, targets)``, each ``(micro_batch_size, seq_len)``."""
        starts = self._take(self.sequences_per_step)
        per_rank = self.sequences_per_step // self.world_size
        mine = starts[self.rank * per_rank:(self.rank + 1) * per_rank]
        return [_windows(self.tokens, mine[i:i + self.micro_batch_size], self.seq_len)
                for i in range(0, per_rank, self.micro_batch_size)]

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.cursor / self.n_windows

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "n_windows": self.n_windows,
                "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "n_windows", "seq_len"):
            if int(state[key]) != getattr(self, key):
                raise _user_error(f"cannot resume: the checkpoint's data position has {key} = {state[key]}, "
                                  f"this run has {getattr(self, key)} (the data or config changed)")
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])


def eval_starts(n_tokens: int, seq_len: int, eval_tokens: int) -> np.ndarray:
    """Window indices for evaluation: ``ceil(eval_tokens / seq_len)`` windows evenly spaced (or all)."""
    available = (n_tokens - 1) // seq_len
    wanted = min(available, math.ceil(eval_tokens / seq_len))
    if wanted <= 0:
        return np.empty(0, dtype=np.int64)
    return np.unique(np.linspace(0, available - 1, wanted).round().astype(np.int64))


def eval_batches(tokens: np.ndarray, seq_len: int, eval_tokens: int, batch_size: int, rank: int = 0,
                 world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of a validation split's fixed evaluation windows, ``batch_size`` at a time."""
    starts = eval_starts(len(tokens), seq_len, eval_tokens)[rank::world_size]
    for i in range(0, len(starts), batch_size):
        yield _windows(tokens, starts[i:i + batch_size], seq_len)


__all__ = [
    "BuiltinCorpus",
    "Corpus",
    "CorpusShards",
    "PreparedData",
    "Shard",
    "TrainBatches",
    "UserCorpus",
    "build_shards",
    "eval_batches",
    "eval_starts",
    "open_corpus",
    "prepare_data",
    "token_dtype",
]
