"""Pre-tokenised corpora: the token ids researchers already have, read as they are, with no tokenizer.

Formats (``data.format``; ``auto`` recognises each from its file names, see :func:`detect_token_format`):

``npy``
    numpy ``.npy`` files, each a 1-D array of integer token ids: one file, or every ``.npy`` file of a folder
    (or of a glob such as ``data/train_*.npy``) concatenated in sorted path order.
``bin``
    token shards in the llm.c / nanoGPT layout (the FineWeb ``fineweb_train_000001.bin`` files): a header of 256
    little-endian int32 (``[0]`` the magic 20240520, ``[1]`` the version 1, ``[2]`` the number of tokens), then
    the tokens as uint16; llm.c's LLaMA-3 layout (magic 20240801, version 7, uint32 tokens) is read too. One
    file, a folder or a glob, in sorted path order.
``arrow``
    a Hugging Face ``datasets`` folder written by ``save_to_disk`` (``state.json``, ``dataset_info.json`` and
    ``data-*.arrow`` Arrow IPC stream files, in ``state.json``'s order), or ``.arrow`` files; read with pyarrow
    alone (the ``datasets`` library is not needed).
``parquet_tokens``
    Parquet files. For ``arrow`` and ``parquet_tokens`` each row is one document, its token ids a list of
    integers in ``data.token_column`` (default ``input_ids``).

End of document: ``data.eos_token_id`` is required. It is the model's end-of-sequence id (the N-gram look-back
stops at it), and the rows of ``arrow`` / ``parquet_tokens`` are each followed by it unless they already end with
it. ``npy`` and ``bin`` streams are used exactly as they are (such streams carry their own separators: llm.c puts
the GPT-2 id 50256 before every document).

Vocabulary: the model's vocabulary is ``data.vocab_size``; every token id must lie in ``[0, vocab_size)``, which
is checked when a file is first read (an out-of-range id is a ``ConfigError`` on ``data.vocab_size`` naming the
file and the id).

Validation: ``data.val_paths`` in the same format. Without them, ``npy`` / ``bin`` hold out the last 1% of the
token stream, cut just after an end-of-document id so no document straddles the cut (searching back at most
another 1% for one; a stream without any is cut at the 1% mark), and ``arrow`` / ``parquet_tokens`` hold out
2% of the rows (documents) by a hash of file name and row, like text corpora. Training windows are taken
from the training part only, so no validation token is ever trained on.

Copies: ``npy`` and ``bin`` are memory-mapped where they lie; nothing is copied into the cache. ``arrow`` and
``parquet_tokens`` are flattened once into the shard cache (:mod:`embscale.training.data.shards`) with their
end-of-document ids: reading, not tokenising.

Each file's statistics (token count, smallest and largest id, count of end-of-document ids, sha256 of the
bytes) are computed once, on first use, and cached under ``<cache>/tokens/`` keyed by the file's path, size and
modification time; the sha256s make the corpus fingerprint.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from embscale.base.errors import ConfigError, UserError
from embscale.base.files import atomic_write_json
from embscale.base.progress import Progress
from embscale.base.rundir import HELD_OUT_SPLIT
from embscale.training.data.interface import Corpus, digest
from embscale.training.data.tokenizer import cache_root, file_lock, hash_fraction

FLAT_FORMATS = ("npy", "bin")
DOCUMENT_FORMATS = ("arrow", "parquet_tokens")
TOKEN_FORMATS = FLAT_FORMATS + DOCUMENT_FORMATS
FORMAT_SUFFIX = {"npy": ".npy", "bin": ".bin", "arrow": ".arrow", "parquet_tokens": ".parquet"}
# llm.c's .bin layouts: (magic, version) -> token dtype. 256 int32 of header, then the tokens.
BIN_LAYOUTS = {(20240520, 1): np.dtype("<u2"), (20240801, 7): np.dtype("<u4")}
BIN_HEADER_INTS = 256
BIN_HEADER_BYTES = BIN_HEADER_INTS * 4
FLAT_VAL_FRACTION = 0.01
DOCUMENT_VAL_FRACTION = 0.02
STATS_VERSION = 1
SCAN_BLOCK = 1 << 24  # tokens per block when scanning a file


# ----------------------------------------------------------------------------------------------------------
# Token arrays: files memory-mapped in place, several read as one
# ----------------------------------------------------------------------------------------------------------
class TokenPiece(NamedTuple):
    """A run of ``length`` tokens of ``dtype`` starting ``offset`` bytes into the file at ``path``."""

    path: str
    offset: int
    dtype: str
    length: int

    def array(self) -> np.ndarray:
        """The tokens, memory-mapped read-only."""
        return np.memmap(self.path, dtype=np.dtype(self.dtype), mode="r", offset=self.offset,
                         shape=(self.length,))

    def part(self, start: int, stop: int) -> TokenPiece:
        """Tokens ``[start, stop)`` of this piece."""
        return self._replace(offset=self.offset + start * np.dtype(self.dtype).itemsize, length=stop - start)


class TokenArray:
    """Read-only concatenation of token pieces, indexed like one 1-D array without copying the files.

    ``len``, integer and slice indexing, and integer-array (fancy) indexing of any shape, which is how the
    batches gather their windows; ``np.asarray`` materialises the whole array.
    """

    def __init__(self, pieces: Sequence[TokenPiece]):
        self.pieces = tuple(p for p in pieces if p.length > 0)
        self._arrays = [p.array() for p in self.pieces]
        self._ends = np.cumsum([p.length for p in self.pieces], dtype=np.int64)
        self._starts = self._ends - np.asarray([p.length for p in self.pieces], dtype=np.int64)
        dtypes = [np.dtype(p.dtype) for p in self.pieces]
        self.dtype = np.result_type(*dtypes) if dtypes else np.dtype(np.uint16)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, (int, np.integer)):
            position = int(index) + (len(self) if index < 0 else 0)
            if not 0 <= position < len(self):
                raise IndexError(f"index {index} is out of bounds for {len(self)} tokens")
            piece = int(np.searchsorted(self._ends, position, side="right"))
            return self._arrays[piece][position - self._starts[piece]]
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return np.asarray(self[start:stop])[::step]
            return self._range(start, stop)
        return self._gather(np.asarray(index))

    def _range(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.empty(0, dtype=self.dtype)
        first = int(np.searchsorted(self._ends, start, side="right"))
        last = int(np.searchsorted(self._ends, stop - 1, side="right"))
        if first == last:
            base = int(self._starts[first])
            return self._arrays[first][start - base:stop - base]
        parts = []
        for piece in range(first, last + 1):
            base = int(self._starts[piece])
            parts.append(self._arrays[piece][max(start, base) - base:min(stop, int(self._ends[piece])) - base])
        return np.concatenate(parts).astype(self.dtype, copy=False)

    def _gather(self, index: np.ndarray) -> np.ndarray:
        if index.dtype.kind not in "iu":
            raise IndexError("token arrays are indexed by integers")
        flat = index.reshape(-1).astype(np.int64, copy=False)
        if len(flat) and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"an index is out of bounds for {len(self)} tokens")
        out = np.empty(flat.shape, dtype=self.dtype)
        piece_of = np.searchsorted(self._ends, flat, side="right")
        for piece in np.unique(piece_of):
            mask = piece_of == piece
            out[mask] = self._arrays[piece][flat[mask] - self._starts[piece]]
        return out.reshape(index.shape)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self._range(0, len(self))
        return whole.astype(dtype) if dtype is not None else np.array(whole)

    def view(self, start: int, stop: int) -> TokenArray:
        """Tokens ``[start, stop)`` as another TokenArray (no copy)."""
        pieces = []
        for piece, begin, end in zip(self.pieces, self._starts.tolist(), self._ends.tolist(), strict=True):
            lo, hi = max(start, begin), min(stop, end)
            if lo < hi:
                pieces.append(piece.part(lo - begin, hi - begin))
        return TokenArray(pieces)


def token_array(pieces: Sequence[TokenPiece]) -> np.ndarray | TokenArray:
    """One piece as a plain memory map, several as a :class:`TokenArray`."""
    pieces = [p for p in pieces if p.length > 0]
    return pieces[0].array() if len(pieces) == 1 else TokenArray(pieces)


# ----------------------------------------------------------------------------------------------------------
# Flat token files: .npy and llm.c .bin
# ----------------------------------------------------------------------------------------------------------
def bin_piece(path: Path) -> TokenPiece:
    """The tokens of an llm.c / nanoGPT ``.bin`` shard, its header checked (magic, version, size)."""
    size = path.stat().st_size
    layouts = ", ".join(f"magic {m} version {v} ({d.name})" for (m, v), d in BIN_LAYOUTS.items())
    if size < BIN_HEADER_BYTES:
        raise UserError(f"{path}: not a .bin token shard: {size} bytes, shorter than its 1024-byte header "
                        f"(256 int32: {layouts})")
    header = np.fromfile(path, dtype="<i4", count=BIN_HEADER_INTS)
    magic, version, n_tokens = int(header[0]), int(header[1]), int(header[2])
    dtype = BIN_LAYOUTS.get((magic, version))
    if dtype is None:
        known_magic = {m for m, _ in BIN_LAYOUTS}
        what = (f"version {version} is not a known version for magic {magic}" if magic in known_magic
                else f"its magic number is {magic}")
        raise UserError(f"{path}: not a .bin token shard this reader knows: {what}; known layouts are {layouts}"
                        " (the llm.c / nanoGPT FineWeb shards). A raw uint16 array without a header (nanoGPT's "
                        "prepare.py train.bin) reads as .npy once saved as one: np.save('train.npy', "
                        "np.memmap('train.bin', dtype=np.uint16, mode='r'))")
    expected = BIN_HEADER_BYTES + n_tokens * dtype.itemsize
    if n_tokens < 0 or size != expected:
        raise UserError(f"{path}: the header says {n_tokens} tokens ({expected} bytes with the header), the file "
                        f"has {size} bytes; the shard is truncated or not a token shard")
    return TokenPiece(str(path.absolute()), BIN_HEADER_BYTES, dtype.str, n_tokens)


def npy_piece(path: Path) -> TokenPiece:
    """The tokens of a ``.npy`` file: a 1-D array of integers, memory-mapped in place."""
    with open(path, "rb") as handle:
        if handle.read(6) != b"\x93NUMPY":
            raise UserError(f"{path}: not a .npy file (it does not start with numpy's header)")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        if "cannot mmap an empty file" in str(exc) or "mmap length is greater" in str(exc):
            raise UserError(f"{path}: an empty or truncated .npy file ({exc})") from None
        raise UserError(f"{path}: not a .npy file numpy can read without pickle ({exc})") from None
    except OSError as exc:
        raise UserError(f"{path}: not a .npy file numpy can read ({exc})") from None
    if array.ndim != 1:
        raise UserError(f"{path}: a 1-D array of token ids was expected, got shape {array.shape}")
    if array.dtype.kind not in "iu":
        raise UserError(f"{path}: token ids must be integers, got dtype {array.dtype}")
    if len(array) == 0:
        return TokenPiece(str(path.absolute()), 0, array.dtype.str, 0)
    if not isinstance(array, np.memmap):  # numpy gives a plain array for some layouts; never copy silently
        raise UserError(f"{path}: cannot be memory-mapped (dtype {array.dtype}); save it as a plain 1-D array")
    return TokenPiece(str(path.absolute()), int(array.offset), array.dtype.str, len(array))


def flat_piece(path: Path, fmt: str) -> TokenPiece:
    return bin_piece(path) if fmt == "bin" else npy_piece(path)


def _stats_path(path: Path, cache: Path) -> Path:
    status = path.stat()
    key = digest({"path": str(path.resolve()), "size": status.st_size, "mtime_ns": status.st_mtime_ns,
                  "inode": status.st_ino, "version": STATS_VERSION})[:24]
    return cache / "tokens" / "stats" / f"{key}.json"


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            sha.update(block)
    return sha.hexdigest()


def _complete(stats: dict[str, Any], piece: TokenPiece | None, eos_token_id: int | None) -> bool:
    return "sha256" in stats and (piece is None or str(eos_token_id) in stats.get("eos_counts", {}))


def cached_file_stats(path: Path, piece: TokenPiece | None, eos_token_id: int | None,
                      cache: Path) -> dict[str, Any] | None:
    """:func:`file_stats` from the cache, or None when they are not there yet."""
    try:
        stats = json.loads(_stats_path(path, cache).read_text())
    except (OSError, ValueError):
        return None
    return stats if _complete(stats, piece, eos_token_id) else None


def file_stats(path: Path, piece: TokenPiece | None, eos_token_id: int | None, cache: Path,
               progress: Progress | None = None) -> dict[str, Any]:
    """``sha256`` of a file and, for a flat token file (``piece``), its token count, smallest and largest id and
    the count of ``eos_token_id``: computed once and cached by path, size and modification time."""
    stats_path = _stats_path(path, cache)
    with file_lock(stats_path.with_suffix(".lock")):
        try:
            stats = json.loads(stats_path.read_text())
        except (OSError, ValueError):
            stats = {}
        if _complete(stats, piece, eos_token_id):
            if progress is not None:
                progress.update(path.stat().st_size)
            return stats
        if "sha256" not in stats:
            stats = {"path": str(path), "sha256": _sha256(path)}
        if piece is not None:
            low, high, eos_count = None, None, 0
            tokens = piece.array() if piece.length else np.empty(0, dtype=np.int64)
            for start in range(0, piece.length, SCAN_BLOCK):
                block = np.asarray(tokens[start:start + SCAN_BLOCK])
                low = int(block.min()) if low is None else min(low, int(block.min()))
                high = int(block.max()) if high is None else max(high, int(block.max()))
                if eos_token_id is not None:
                    eos_count += int(np.count_nonzero(block == eos_token_id))
            counts = {**stats.get("eos_counts", {}), str(eos_token_id): eos_count}
            stats.update(n_tokens=piece.length, min_id=low, max_id=high, eos_counts=counts)
        atomic_write_json(stats_path, stats)
        if progress is not None:
            progress.update(path.stat().st_size)
        return stats


# ----------------------------------------------------------------------------------------------------------
# Document token files: Arrow (datasets' save_to_disk) and Parquet, a list of ids per row
# ----------------------------------------------------------------------------------------------------------
def arrow_data_files(folder: Path, field: str) -> list[Path]:
    """The data files of a ``save_to_disk`` folder, in ``state.json``'s order (else every ``.arrow`` file)."""
    if (folder / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in folder.iterdir() if p.is_dir())
        raise ConfigError(field, f"{folder} is a DatasetDict (dataset_dict.json, splits {', '.join(splits)}); "
                                 f"point data.corpus at one split's folder (e.g. {folder / 'train'}) and "
                                 "data.val_paths at another")
    state = folder / "state.json"
    if state.is_file():
        try:
            names = [entry["filename"] for entry in json.loads(state.read_text())["_data_files"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{state}: not a datasets state.json with _data_files ({exc!r})") from None
        files = [folder / name for name in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{state} lists {missing[0]}, which does not exist")
        return files
    return sorted(p for p in folder.rglob("*.arrow") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _arrow_batches(path: Path) -> tuple[Any, Iterator[Any]]:
    """The schema and record batches of an Arrow IPC stream (datasets' files) or IPC file, memory-mapped."""
    import pyarrow as pa

    source = pa.memory_map(str(path), "r")
    try:
        reader = pa.ipc.open_stream(source)
        return reader.schema, iter(reader)
    except pa.ArrowInvalid:
        source.seek(0)
    try:
        file_reader = pa.ipc.open_file(source)
    except pa.ArrowInvalid as exc:
        raise UserError(f"{path}: not an Arrow IPC stream or file ({exc})") from None
    return file_reader.schema, (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))


def _column_schema(path: Path, fmt: str) -> Any:
    if fmt == "arrow":
        return _arrow_batches(path)[0]
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).schema_arrow
    except Exception as exc:  # pyarrow raises several kinds for a file that is not Parquet
        raise UserError(f"{path}: not a readable Parquet file ({exc})") from None


def check_token_column(path: Path, fmt: str, column: str) -> None:
    """``column`` exists in ``path`` and holds lists of integers."""
    import pyarrow as pa

    schema = _column_schema(path, fmt)
    if column not in schema.names:
        raise ConfigError("data.token_column", f"column {column!r} not found in {path}; columns are "
                                               f"{schema.names}")
    kind = schema.field(column).type
    is_list = pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    if not (is_list and pa.types.is_integer(kind.value_type)):
        raise UserError(f"{path}: column {column!r} is {kind}, not a list of integer token ids per row")


def document_batches(path: Path, fmt: str, column: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(lengths, ids)`` per record batch of a document token file: each row's token count (a null row
    counts as empty) and the rows' ids concatenated."""
    import pyarrow.compute as pc

    if fmt == "arrow":
        schema, batches = _arrow_batches(path)
        index = schema.get_field_index(column)
        arrays = (batch.column(index) for batch in batches)
    else:
        import pyarrow.parquet as pq

        arrays = (batch.column(0) for batch in pq.ParquetFile(path).iter_batches(columns=[column],
                                                                                   batch_size=8192))
    for array in arrays:
        lengths = pc.fill_null(pc.list_value_length(array), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        values = pc.list_flatten(array)
        if values.null_count:
            raise UserError(f"{path}: column {column!r} has missing (null) token ids inside a row")
        yield lengths, values.to_numpy(zero_copy_only=False)


def with_end_of_document(lengths: np.ndarray, ids: np.ndarray, keep: np.ndarray,
                         eos_token_id: int) -> tuple[np.ndarray, int]:
    """The ids of the rows where ``keep`` is set and which are not empty, each followed by ``eos_token_id``
    unless it already ends with it; and the number of those rows (documents)."""
    keep = keep & (lengths > 0)
    if not keep.all():
        ids = ids[np.repeat(keep, lengths)]
        lengths = lengths[keep]
    if len(lengths) == 0:
        return ids[:0], 0
    ends = np.cumsum(lengths)
    missing = ids[ends - 1] != eos_token_id
    return np.insert(ids, ends[missing], eos_token_id), len(lengths)


# ----------------------------------------------------------------------------------------------------------
# Finding the files and the format
# ----------------------------------------------------------------------------------------------------------
def _has_glob(text: str) -> bool:
    return any(char in text for char in "*?[")


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def expand_path(text: str, field: str) -> tuple[Path, list[Path] | None]:
    """``text`` as a path, or a glob's matches (sorted) when it is a glob that names no existing path."""
    path = Path(text).expanduser()
    if path.exists() or not _has_glob(text):
        if not path.exists():
            raise ConfigError(field, f"{path} does not exist")
        return path, None
    matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True) if Path(p).is_file())
    if not matches:
        raise ConfigError(field, f"no files match {text}")
    return path, matches


def detect_token_format(path: Path, matches: list[Path] | None, field: str) -> str | None:
    """The token format of a path (``npy``, ``bin``, ``arrow``) when its names make it unambiguous, None when it
    holds no token files (a text corpus, or Parquet: :func:`parquet_kind` decides those). A folder that mixes
    token files with other files is refused: the format must be named."""
    by_suffix = {".npy": "npy", ".bin": "bin", ".arrow": "arrow"}
    if matches is None and path.is_dir() and ((path / "state.json").is_file()
                                              or (path / "dataset_dict.json").is_file()):
        return "arrow"
    files = matches if matches is not None else ([path] if path.is_file() else _visible(path))
    suffixes = {p.suffix.lower() for p in files}
    token_suffixes = suffixes & set(by_suffix)
    if not token_suffixes:
        return None
    if len(suffixes) > 1:
        listed = ", ".join(sorted(s or "(none)" for s in suffixes))
        raise ConfigError("data.format", f"cannot tell the format of {path}: it holds files ending in {listed}; "
                                         f"set data.format (one of {', '.join(TOKEN_FORMATS)}) to read only "
                                         "that kind, or dir to read every file as text")
    return by_suffix[next(iter(token_suffixes))]


def parquet_kind(files: list[Path], text_column: str, token_column: str) -> str:
    """``parquet`` (text to tokenise) or ``parquet_tokens`` (token ids), from the first file's columns."""
    names = _column_schema(files[0], "parquet_tokens").names
    has_text, has_tokens = text_column in names, token_column in names
    if has_text and has_tokens:
        raise ConfigError("data.format", f"{files[0]} has both a text column {text_column!r} and a token column "
                                         f"{token_column!r}; set data.format to parquet (tokenise the text) or "
                                         "parquet_tokens (train on the token ids)")
    return "parquet_tokens" if has_tokens else "parquet"


def source_files(text: str, fmt: str, field: str) -> list[tuple[str, Path]]:
    """The files of one token source (the corpus or a validation path) as ``(name, path)``, in order."""
    path, matches = expand_path(text, field)
    suffix = FORMAT_SUFFIX[fmt]
    if matches is not None:
        files = [p for p in matches if p.suffix.lower() == suffix]
        base = Path(os.path.expanduser(text))
        while _has_glob(str(base)) and base != base.parent:  # the folder above the glob's first wildcard
            base = base.parent
        names = [p.relative_to(base).as_posix() if p.is_relative_to(base) else str(p) for p in files]
    elif path.is_file():
        files, names = [path], [path.name]
    else:
        files = (arrow_data_files(path, field) if fmt == "arrow"
                 else [p for p in _visible(path) if p.suffix.lower() == suffix])
        names = [p.relative_to(path).as_posix() for p in files]
    if not files:
        raise ConfigError(field, f"no {suffix} files in {text} (data.format {fmt})")
    return list(zip(names, files, strict=True))


# ----------------------------------------------------------------------------------------------------------
# The corpus
# ----------------------------------------------------------------------------------------------------------
class TokenCorpus(Corpus):
    """A pre-tokenised corpus (see the module docstring): token ids by split, no text and no tokenizer."""

    kind = "tokens"
    pretokenized = True

    def __init__(self, corpus: str, fmt: str, eos_token_id: int, vocab_size: int,
                 token_column: str = "input_ids", val_paths: dict[str, str] | None = None,
                 cache: Path | None = None):
        if fmt not in TOKEN_FORMATS:
            raise ConfigError("data.format", f"{fmt!r} is not a token format ({', '.join(TOKEN_FORMATS)})")
        self.format, self.eos_token_id, self.vocab_size = fmt, eos_token_id, vocab_size
        self.token_column = token_column
        self.cache = cache or cache_root()
        self.location = str(Path(corpus).expanduser())
        self.train_files = source_files(corpus, fmt, "data.corpus")
        self.val_files: dict[str, list[tuple[str, Path]]] = {}
        train_paths = {p.resolve() for _, p in self.train_files}
        for name, val_path in (val_paths or {}).items():
            field = f"data.val_paths.{name}"
            files = source_files(val_path, fmt, field)
            overlap = [str(p) for _, p in files if p.resolve() in train_paths]
            if overlap:
                raise ConfigError(field, f"{overlap[0]} is also part of the training corpus {self.location}")
            self.val_files[name] = files
        self.val_sources = {name: str(Path(p).expanduser()) for name, p in (val_paths or {}).items()}
        self.val_splits = tuple(self.val_files) if self.val_files else (HELD_OUT_SPLIT,)
        self.flat = fmt in FLAT_FORMATS
        if self.flat:  # headers and shapes are read now (cheap); a bad file fails before anything is written
            self.pieces = {path: flat_piece(path, fmt) for files in (self.train_files, *self.val_files.values())
                           for _, path in files}
        else:
            for files in (self.train_files, *self.val_files.values()):
                for _, path in files:
                    check_token_column(path, fmt, token_column)
        self._fingerprint: dict[str, Any] | None = None
        self._stats: dict[Path, dict[str, Any]] | None = None
        self._known: dict[str, int] = {}
        self._cut: int | None = None

    # ----- what the files hold
    def _all_files(self) -> list[tuple[str, Path]]:
        return [*self.train_files, *(f for files in self.val_files.values() for f in files)]

    def file_stats(self) -> dict[Path, dict[str, Any]]:
        """Every file's statistics: from the cache, or computed now (once per file, with progress)."""
        if self._stats is None:
            files = [path for _, path in self._all_files()]
            piece = (lambda path: self.pieces[path]) if self.flat else (lambda path: None)
            stats = {path: cached_file_stats(path, piece(path), self.eos_token_id, self.cache) for path in files}
            missing = [path for path, found in stats.items() if found is None]
            if missing:
                total = sum(p.stat().st_size for p in missing)
                with Progress(total, "read token files", unit="B", unit_scale=True,
                              min_interval_s=10.0) as progress:
                    for path in missing:
                        stats[path] = file_stats(path, piece(path), self.eos_token_id, self.cache, progress)
            self._stats = stats
        return self._stats

    @property
    def fingerprint(self) -> dict[str, Any]:  # type: ignore[override]
        """Format, end-of-document id, hold-out rule and every file's name, size and sha256."""
        if self._fingerprint is None:
            stats = self.file_stats()

            def listing(files: list[tuple[str, Path]]) -> dict[str, Any]:
                entries = [(name, path.stat().st_size, stats[path]["sha256"]) for name, path in files]
                return {"n_files": len(entries), "total_bytes": sum(size for _, size, _ in entries),
                        "files_sha256": digest(entries)}

            self._fingerprint = {
                "kind": self.kind, "location": self.location, "format": self.format,
                "token_column": None if self.flat else self.token_column, "eos_token_id": self.eos_token_id,
                "val_fraction": None if self.val_files else (FLAT_VAL_FRACTION if self.flat
                                                             else DOCUMENT_VAL_FRACTION),
                "version": STATS_VERSION, **listing(self.train_files),
                "val": {name: listing(files) for name, files in self.val_files.items()}}
        return self._fingerprint

    def check_vocabulary(self) -> None:
        """Every id of a flat token file lies in ``[0, data.vocab_size)`` (from the cached statistics)."""
        if not self.flat:
            return  # document files are checked as they are flattened into the shard cache
        for path, stats in self.file_stats().items():
            check_id_range(path, stats["min_id"], stats["max_id"], self.vocab_size)

    # ----- splits
    def _split_files(self, split: str) -> list[tuple[str, Path]]:
        if split == "train":
            return self.train_files
        if self.val_files:
            return self.val_files[split]
        if split != HELD_OUT_SPLIT:
            raise KeyError(split)
        return self.train_files

    def _stream(self, files: list[tuple[str, Path]]) -> TokenArray:
        return TokenArray([self.pieces[path] for _, path in files])

    def _tail_cut(self) -> int:
        """Where the held-out tail of the training stream starts (no ``val_paths``, flat formats)."""
        if self._cut is None:
            stream = self._stream(self.train_files)
            n = len(stream)
            tail = max(1, math.ceil(n * FLAT_VAL_FRACTION))
            target = self._cut = max(0, n - tail)
            low, position = max(0, target - tail), target
            while position > low:
                start = max(low, position - (1 << 16))
                hits = np.flatnonzero(np.asarray(stream[start:position]) == self.eos_token_id)
                if len(hits):
                    self._cut = start + int(hits[-1]) + 1
                    break
                position = start
        return self._cut

    def split_pieces(self, split: str) -> tuple[TokenPiece, ...]:
        """Where a flat split's tokens lie in the files (the held-out tail cut off the training stream)."""
        stream = self._stream(self._split_files(split))
        if not self.val_files:
            cut = self._tail_cut()
            stream = stream.view(0, cut) if split == "train" else stream.view(cut, len(stream))
        return stream.pieces

    def split_tokens(self, split: str) -> np.ndarray | TokenArray:
        """A flat split's tokens, memory-mapped in place."""
        return token_array(self.split_pieces(split))

    def _held_out(self, name: str, first_row: int, count: int) -> np.ndarray:
        return np.fromiter((hash_fraction(f"split:{name}:{row}") < DOCUMENT_VAL_FRACTION
                            for row in range(first_row + 1, first_row + count + 1)), dtype=bool, count=count)

    def document_tokens(self, split: str) -> Iterator[tuple[Path, np.ndarray, int]]:
        """``(file, ids, documents)`` batches of a document split, end-of-document ids added; the held-out
        split (no ``val_paths``) takes 2% of the rows by a hash of file name and row."""
        for name, path in self._split_files(split):
            row = 0
            for lengths, ids in document_batches(path, self.format, self.token_column):
                if self.val_files:
                    keep = np.ones(len(lengths), dtype=bool)
                else:
                    held = self._held_out(name, row, len(lengths))
                    keep = held if split == HELD_OUT_SPLIT else ~held
                row += len(lengths)
                tokens, documents = with_end_of_document(lengths, ids, keep, self.eos_token_id)
                yield path, tokens, documents

    def known_tokens(self, split: str) -> int | None:
        """Exact: flat formats from headers and file sizes (and the held-out cut), document formats from the
        rows' lengths and last ids (read once, no tokenising)."""
        if split not in self.splits:
            raise KeyError(split)
        if split not in self._known:
            if self.flat:
                self._known[split] = sum(piece.length for piece in self.split_pieces(split))
            else:
                self._known[split] = sum(len(tokens) for _, tokens, _ in self.document_tokens(split))
        return self._known[split]

    def split_documents(self, split: str) -> int:
        """The number of end-of-document ids in a flat split (from the cached statistics and the held-out
        tail)."""
        stats = self.file_stats()
        key = str(self.eos_token_id)
        total = sum(stats[path]["eos_counts"][key] for _, path in self._split_files(split))
        if self.val_files:
            return total
        tail = self.split_tokens(HELD_OUT_SPLIT)
        held = sum(int(np.count_nonzero(np.asarray(tail[i:i + SCAN_BLOCK]) == self.eos_token_id))
                   for i in range(0, len(tail), SCAN_BLOCK))
        return held if split == HELD_OUT_SPLIT else total - held

    def split_bytes(self, split: str) -> int:
        return sum(p.stat().st_size for _, p in self._split_files(split))

    def documents(self, split: str) -> Iterator[tuple[str, str]]:
        raise UserError(f"{self.location} holds token ids (data.format {self.format}), not text")

    def describe(self, split: str) -> str:
        if split == "train":
            return f"token corpus {self.location} ({self.format})"
        if self.val_files:
            return f"validation split {split} ({self.val_sources[split]})"
        share = FLAT_VAL_FRACTION if self.flat else DOCUMENT_VAL_FRACTION
        how = "the last tokens" if self.flat else "the documents by hash"
        return (f"held-out validation split ({share:.0%} of {how}) of {self.location} "
                "(give your own with data.val_paths)")


def check_id_range(path: Path | str, low: int | None, high: int | None, vocab_size: int) -> None:
    """Token ids ``low..high`` of ``path`` fit a vocabulary of ``vocab_size``; errors name the file."""
    if low is not None and low < 0:
        raise UserError(f"{path}: holds the negative token id {low}")
    if high is not None and high >= vocab_size:
        raise ConfigError("data.vocab_size", f"{path} holds token id {high}, not below data.vocab_size = "
                                             f"{vocab_size}; set data.vocab_size above your tokenizer's largest "
                                             "id (GPT-2: 50257, or 50304 padded to a multiple of 64)")


__all__ = [
    "BIN_LAYOUTS",
    "DOCUMENT_FORMATS",
    "FLAT_FORMATS",
    "TOKEN_FORMATS",
    "TokenArray",
    "TokenCorpus",
    "TokenPiece",
    "bin_piece",
    "check_id_range",
    "detect_token_format",
    "npy_piece",
    "parquet_kind",
    "token_array",
]
