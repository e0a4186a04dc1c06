"""Tokenising one split of a text corpus: on every core, with progress, resumable after an interruption.

The split's documents are cut, in corpus order, into chunks of about ``chunk_bytes`` of text (the cut depends
only on the documents and the chunk size, so a build that starts again cuts the same chunks). Each chunk is
encoded into a part file ``part-000042.bin`` with its record ``part-000042.json`` (its token and document counts,
its bytes of text and a hash of its documents' keys), both written atomically, the record last. A build that
finds a part whose record matches its chunk reuses it; when every part is there, the parts are concatenated in
order into the split's shard. Every document is followed by the EOS id, and the tokens are the same whatever the
number of workers or interruptions.

Every core: with more than one chunk, a pool of worker threads encodes one chunk each at a time. The Rust
encoder releases the GIL, so the threads run on separate cores (no processes: nothing to pickle, and a user's
script without a ``__main__`` guard cannot be re-run by a spawned child); each encodes its chunk on one thread
(``TOKENIZERS_PARALLELISM`` is off while the pool runs), so the pool is the only parallelism. Workers:
``EMBSCALE_TOKENIZE_WORKERS``, default every core this process may run on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from embscale.base.errors import ConfigError
from embscale.base.files import atomic_file, atomic_write_json
from embscale.base.progress import Progress

MIN_CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 64 << 20
COPY_BLOCK_BYTES = 16 << 20
# Called in the building process after each part is done, with the part's file and whether it was reused from
# an interrupted build: a place for tests and observers to look (and for a test to interrupt a build).
on_part_done: Callable[[Path, bool], None] | None = None


def default_chunk_bytes(total_bytes: int) -> int:
    """About 1/256 of the split, between 1 MiB and 64 MiB: enough chunks to keep every core busy and to lose
    little to an interruption, few enough files for a large corpus. It depends on the split alone, never on the
    number of workers, so a build resumed on another machine cuts the same chunks."""
    return int(min(MAX_CHUNK_BYTES, max(MIN_CHUNK_BYTES, total_bytes // 256)))


def default_workers() -> int:
    """``EMBSCALE_TOKENIZE_WORKERS``, else the number of cores this process may run on."""
    text = os.environ.get("EMBSCALE_TOKENIZE_WORKERS", "").strip()
    if text:
        if not text.isdigit() or int(text) < 1:
            raise ConfigError("EMBSCALE_TOKENIZE_WORKERS", f"must be a positive whole number, got {text!r}")
        return int(text)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Chunk(NamedTuple):
    index: int
    texts: list[str]
    n_bytes: int
    keys_sha1: str


def chunks(documents: Iterable[tuple[str, str]], chunk_bytes: int) -> Iterator[Chunk]:
    """The documents in chunks of at least ``chunk_bytes`` of UTF-8 text (the last one smaller)."""
    texts: list[str] = []
    keys = hashlib.sha1()
    size = index = 0
    for key, text in documents:
        texts.append(text)
        keys.update(key.encode("utf-8") + b"\0")
        size += len(text.encode("utf-8"))
        if size >= chunk_bytes:
            yield Chunk(index, texts, size, keys.hexdigest())
            texts, keys, size, index = [], hashlib.sha1(), 0, index + 1
    if texts:
        yield Chunk(index, texts, size, keys.hexdigest())


def encode_texts(tokenizer: Any, texts: list[str], eos_token_id: int, dtype: np.dtype) -> np.ndarray:
    """The texts' token ids, each text followed by ``eos_token_id``, as one array of ``dtype``."""
    eos = np.asarray([eos_token_id], dtype=dtype)
    pieces = []
    for encoding in tokenizer.encode_batch_fast(texts, add_special_tokens=False):
        pieces.append(np.asarray(encoding.ids, dtype=dtype))
        pieces.append(eos)
    return np.concatenate(pieces) if pieces else np.empty(0, dtype=dtype)


def _part_name(index: int) -> str:
    return f"part-{index:06d}"


def write_part(folder: Path, chunk: Chunk, tokens: np.ndarray) -> dict[str, Any]:
    """A chunk's tokens and then its record, each atomically: a part without its record is not finished."""
    with atomic_file(folder / f"{_part_name(chunk.index)}.bin") as tmp:
        tokens.tofile(tmp)
    record = {"n_tokens": len(tokens), "n_documents": len(chunk.texts), "n_bytes": chunk.n_bytes,
              "keys_sha1": chunk.keys_sha1, "dtype": tokens.dtype.name}
    atomic_write_json(folder / f"{_part_name(chunk.index)}.json", record)
    return record


def finished_part(folder: Path, chunk: Chunk, dtype: np.dtype) -> dict[str, Any] | None:
    """The record of a part an earlier build finished for this very chunk, or None."""
    name = _part_name(chunk.index)
    try:
        record = json.loads((folder / f"{name}.json").read_text())
        size = (folder / f"{name}.bin").stat().st_size
    except (OSError, ValueError):
        return None
    same = (record.get("n_documents") == len(chunk.texts) and record.get("n_bytes") == chunk.n_bytes
            and record.get("keys_sha1") == chunk.keys_sha1 and record.get("dtype") == dtype.name)
    return record if same and size == record["n_tokens"] * dtype.itemsize else None


def prepare_parts_folder(folder: Path, layout: dict[str, Any]) -> None:
    """``folder`` ready for parts of this ``layout`` (chunk size, dtype, EOS id): parts of another layout are
    removed, and so are temporary files a killed build left (the caller holds the shard lock)."""
    manifest = folder / "manifest.json"
    try:
        found = json.loads(manifest.read_text())
    except (OSError, ValueError):
        found = None
    if found != layout and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    if found != layout:
        atomic_write_json(manifest, layout)


@contextlib.contextmanager
def serial_tokenizers() -> Iterator[None]:
    """``TOKENIZERS_PARALLELISM=false`` for the duration (the tokenizers library reads it at each call), then
    as it was."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def encode_split(documents: Iterable[tuple[str, str]], total_bytes: int, tokenizer_path: str, eos_token_id: int,
                 dtype: np.dtype, parts_folder: Path, out_path: Path, desc: str, workers: int | None = None,
                 chunk_bytes: int | None = None) -> tuple[int, int]:
    """Tokenise ``documents`` (``(key, text)``) into ``out_path``; returns (tokens, documents).

    Parts go to ``parts_folder`` and are reused from an interrupted build; the caller removes the folder once
    the split's shard is in place. ``total_bytes`` (an estimate of the split's text) sizes the chunks and the
    progress display."""
    workers = workers or default_workers()
    chunk_bytes = chunk_bytes or default_chunk_bytes(total_bytes)
    dtype = np.dtype(dtype)
    prepare_parts_folder(parts_folder, {"chunk_bytes": chunk_bytes, "dtype": dtype.name,
                                        "eos_token_id": eos_token_id})
    records: dict[int, dict[str, Any]] = {}
    reused = 0
    local = threading.local()  # a tokenizer per thread: no shared encoder cache to contend for

    def encode(chunk: Chunk) -> dict[str, Any]:
        if not hasattr(local, "tokenizer"):
            from tokenizers import Tokenizer

            local.tokenizer = Tokenizer.from_file(tokenizer_path)
        return write_part(parts_folder, chunk, encode_texts(local.tokenizer, chunk.texts, eos_token_id, dtype))

    use_pool = workers > 1 and total_bytes > chunk_bytes
    with Progress(total_bytes, desc, unit="B", unit_scale=True, min_interval_s=10.0) as progress, \
            (serial_tokenizers() if use_pool else contextlib.nullcontext()):
        pool = ThreadPoolExecutor(workers, thread_name_prefix="tokenize") if use_pool else None
        pending: dict[Future, Chunk] = {}

        def done(chunk: Chunk, record: dict[str, Any], was_reused: bool) -> None:
            records[chunk.index] = record
            progress.update(chunk.n_bytes)
            if on_part_done is not None:
                on_part_done(parts_folder / f"{_part_name(chunk.index)}.bin", was_reused)

        def collect(finished: Iterable[Future]) -> None:
            for future in finished:
                done(pending.pop(future), future.result(), False)

        try:
            for chunk in chunks(documents, chunk_bytes):
                record = finished_part(parts_folder, chunk, dtype)
                if record is not None:
                    reused += 1
                    done(chunk, record, True)
                elif pool is None:
                    done(chunk, encode(chunk), False)
                else:
                    while len(pending) >= 2 * workers:  # bounded: at most two chunks of text per worker in memory
                        collect(wait(pending, return_when=FIRST_COMPLETED).done)
                    pending[pool.submit(encode, chunk)] = chunk
            while pending:
                collect(wait(pending, return_when=FIRST_COMPLETED).done)
        finally:
            if pool is not None:  # parts in flight finish (kept for the next build); queued ones never start
                pool.shutdown(wait=True, cancel_futures=True)
        if reused:
            progress.write(f"{desc}: reused {reused} of {len(records)} parts of an interrupted build")
    n_tokens = n_documents = 0
    with open(out_path, "wb") as out:
        for index in range(len(records)):
            with open(parts_folder / f"{_part_name(index)}.bin", "rb") as part:
                shutil.copyfileobj(part, out, COPY_BLOCK_BYTES)
            n_tokens += records[index]["n_tokens"]
            n_documents += records[index]["n_documents"]
    return n_tokens, n_documents


__all__ = ["chunks", "default_chunk_bytes", "default_workers", "encode_split", "encode_texts", "on_part_done",
           "serial_tokenizers"]
