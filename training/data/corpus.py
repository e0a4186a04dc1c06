"""Corpora: the documents of a training split and its validation splits, and the corpus fingerprint.

``builtin``: the running Python's standard library, no download. Code documents are its ``*.py`` source files
(``site-packages`` excluded, test suites kept; empty files and exact duplicates dropped). Prose documents are the
``pydoc_data.topics`` entries and the module docstrings (``ast.get_docstring``, at least 100 characters; modules
are parsed, never imported) of the same files. A source file is held out when the hash of its path (relative to
the stdlib folder) falls in the lowest 2%: its code goes to validation split ``code`` and its docstring to
``prose``, so no held-out text reaches training inside a file. ``pydoc_data/topics.py`` itself is not a code
document (it *is* the prose); 15% of its topics (by a hash of the topic name) are held out as ``prose``. About
31 MB of code and 0.8 MB of prose with CPython 3.11.

``site``: the installed packages' sources, no download either: every ``*.py`` under the running interpreter's
site-packages folders (files over 1 MB left out) as code and their module docstrings as prose, held out by path
hash like ``builtin`` (splits ``code`` and ``prose``). 215 MB of sources and 64M tokens with the default 8192
BPE in a venv holding torch, pandas and scipy; about 100 MB on a bare CUDA image with torch.

``system``: the largest corpus that needs no download: every text source under the running interpreter's
prefixes (the standard library, the package folders, the prefixes' ``include`` and ``share`` folders, and the
CUDA toolkit's headers where one is installed): Python
sources and stubs, C, C++ and CUDA sources and headers as code; Markdown, reStructuredText and plain text files and
the module docstrings as prose (:class:`SystemCorpus`). Split ``code`` and ``prose`` by path hash as above.

User corpora: a folder of text files (each file one document), or JSONL / Parquet files with the text in a
configurable column, with the user's validation files (``data.val_paths``) or 2% held out by hash. Paths of
pre-tokenised data (``.npy``, llm.c ``.bin``, ``save_to_disk`` folders, Parquet with a token column) open as a
:class:`~embscale.training.data.tokens.TokenCorpus`; :func:`corpus_format` tells the formats apart.

Every corpus has a fingerprint (file list, sizes and a sha256 of the contents) whose hash, the corpus id, keys
the tokenizer and shard caches (:mod:`embscale.training.data.shards`) and is stored with every run. The contents
are hashed once per state of the files (:mod:`embscale.training.data.fingerprint_cache`), not on every run.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import site
import sys
import sysconfig
import tokenize
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from embscale.base.errors import ConfigError, UserError
from embscale.base.rundir import HELD_OUT_SPLIT
from embscale.training.data.fingerprint_cache import cached_file_hash
from embscale.training.data.interface import Corpus, digest, hash_files
from embscale.training.data.tokenizer import hash_fraction
from embscale.training.data.tokens import (
    TOKEN_FORMATS,
    TokenCorpus,
    detect_token_format,
    expand_path,
    parquet_kind,
)

BUILTIN_VAL_FRACTION = 0.02
SITE_VAL_FRACTION = 0.02
SITE_MAX_FILE_BYTES = 1_000_000
BUILTIN_TOPIC_VAL_FRACTION = 0.15
USER_VAL_FRACTION = 0.02
MIN_DOCSTRING_CHARS = 100
EXTRACTION_VERSION = 3  # bump when the way documents are cut from files changes
TOPICS_FILE = "pydoc_data/topics.py"


# ----------------------------------------------------------------------------------------------------------
# The built-in corpus: the standard library
# ----------------------------------------------------------------------------------------------------------
def _is_builtin_val(relpath: str) -> bool:
    return hash_fraction("split:" + relpath) < BUILTIN_VAL_FRACTION


def _is_topic_val(name: str) -> bool:
    return hash_fraction("split:topic:" + name) < BUILTIN_TOPIC_VAL_FRACTION


def _read_text(path: str | Path) -> str:
    return Path(path).read_bytes().decode("utf-8", errors="replace")


def _module_docstring(path: str | Path) -> str | None:
    """The module docstring (``ast.get_docstring``), parsing only the file's first statement for speed."""
    raw = Path(path).read_bytes()
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


def _python_sources(root: Path) -> list[tuple[str, Path]]:
    """``(relative path, path)`` of the ``*.py`` files under ``root``, sorted, without descending into
    ``site-packages``, ``dist-packages`` or ``__pycache__`` (nor into linked folders)."""
    excluded = {"site-packages", "dist-packages", "__pycache__"}
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [name for name in subfolders if name not in excluded]
        relative = os.path.relpath(folder, root)
        prefix = "" if relative == "." else relative.replace(os.sep, "/") + "/"
        for name in names:
            path = os.path.join(folder, name)
            if name.endswith(".py") and os.path.isfile(path):
                found.append((prefix + name, Path(path)))
    return sorted(found)


class BuiltinCorpus(Corpus):
    """The running Python's standard library: code (``*.py``) and prose (pydoc topics, module docstrings)."""

    kind = "builtin"
    val_splits = ("code", "prose")

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root or sysconfig.get_paths()["stdlib"])
        self.location = str(self.root)
        self.files = _python_sources(self.root)
        if not self.files:
            raise UserError(f"no Python sources found under the standard library folder {self.root}")
        self.fingerprint = {
            "kind": self.kind, "location": self.location, "python": sys.version.split()[0],
            "extraction_version": EXTRACTION_VERSION, "val_fraction": BUILTIN_VAL_FRACTION,
            "topic_val_fraction": BUILTIN_TOPIC_VAL_FRACTION, **cached_file_hash(self.files, hash_files)}
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
# The site corpus: the installed packages' sources
# ----------------------------------------------------------------------------------------------------------
def site_package_folders() -> list[Path]:
    """The running interpreter's package folders: the ``site-packages`` / ``dist-packages`` folders on
    ``sys.path`` in import order, then ``site``'s and ``sysconfig``'s own; existing ones, each once."""
    candidates = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    candidates += [*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    seen: set[Path] = set()
    roots = []
    for candidate in candidates:
        path = Path(candidate)
        if path.is_dir() and path.resolve() not in seen:
            seen.add(path.resolve())
            roots.append(path)
    return roots


class SiteCorpus(Corpus):
    """The installed packages' sources (every ``*.py`` under the interpreter's site-packages folders) as code,
    and their module docstrings as prose: a larger corpus than ``builtin`` that needs no download.

    A file is keyed by its path inside its site-packages folder; where two folders hold the same path, the one
    earlier on ``sys.path`` (the one Python imports) is taken. Files over 1 MB (generated tables), empty files
    and exact duplicates are dropped. A file is held out when the hash of its key falls in the lowest 2%: its code
    goes to validation split ``code`` and its docstring to ``prose``, as in the builtin corpus. The corpus id
    changes whenever a package is installed, upgraded or removed.
    """

    kind = "site"
    val_splits = ("code", "prose")

    def __init__(self, roots: list[str | Path] | None = None):
        self.roots = [Path(r) for r in roots] if roots is not None else site_package_folders()
        if not self.roots:
            raise UserError(f"no site-packages folder found for this Python ({sys.executable})")
        self.location = ":".join(str(r) for r in self.roots)
        chosen: dict[str, Path] = {}
        for root in self.roots:
            for path in root.rglob("*.py"):
                parts = path.relative_to(root).parts
                if "__pycache__" in parts or any(part.startswith(".") for part in parts) or not path.is_file():
                    continue
                chosen.setdefault(path.relative_to(root).as_posix(), path)
        if not chosen:
            raise UserError(f"no Python sources found under {self.location}")
        listing, contents, total = hashlib.sha256(), hashlib.sha256(), 0
        seen: set[str] = set()
        self.code_files: list[tuple[str, Path]] = []
        self.code_bytes: dict[str, int] = {}
        for rel, path in sorted(chosen.items()):
            raw = path.read_bytes()
            total += len(raw)
            listing.update(f"{rel}\t{len(raw)}\n".encode())
            contents.update(raw)
            content_hash = hashlib.sha1(raw).hexdigest()
            if len(raw) <= SITE_MAX_FILE_BYTES and raw.strip() and content_hash not in seen:
                seen.add(content_hash)
                self.code_files.append((rel, path))
                self.code_bytes[rel] = len(raw)
        self.fingerprint = {
            "kind": self.kind, "location": self.location, "python": sys.version.split()[0],
            "extraction_version": EXTRACTION_VERSION, "val_fraction": SITE_VAL_FRACTION,
            "max_file_bytes": SITE_MAX_FILE_BYTES, "n_files": len(chosen), "total_bytes": total,
            "list_sha256": listing.hexdigest(), "content_sha256": contents.hexdigest()}

    def _code_files(self, held_out: bool) -> Iterator[tuple[str, Path]]:
        for rel, path in self.code_files:
            if (hash_fraction("split:site:" + rel) < SITE_VAL_FRACTION) == held_out:
                yield rel, path

    def _docstrings(self, held_out: bool) -> Iterator[tuple[str, str]]:
        for rel, path in self._code_files(held_out):
            doc = _module_docstring(path)
            if doc:
                yield f"doc:{rel}", doc

    def documents(self, split: str) -> Iterator[tuple[str, str]]:
        if split not in self.splits:
            raise KeyError(split)
        if split in ("train", "code"):
            for rel, path in self._code_files(held_out=split == "code"):
                yield rel, _read_text(path)
        if split in ("train", "prose"):
            yield from self._docstrings(held_out=split == "prose")

    def split_bytes(self, split: str) -> int:
        code = sum(self.code_bytes[rel] for rel, _ in self._code_files(held_out=split != "train"))
        docstrings = code // 50  # docstrings are about 1/50 of the source, by size
        return {"train": code + docstrings, "code": code, "prose": docstrings}[split]

    def describe(self, split: str) -> str:
        return f"site corpus split {split} ({self.location})"


# ----------------------------------------------------------------------------------------------------------
# The system corpus: every text source under the interpreter's prefixes
# ----------------------------------------------------------------------------------------------------------
SYSTEM_CODE_SUFFIXES = (".py", ".pyi", ".h", ".hh", ".hpp", ".cuh", ".c", ".cc", ".cpp", ".cu")
SYSTEM_PROSE_SUFFIXES = (".md", ".rst", ".txt")
SYSTEM_SUFFIXES = SYSTEM_CODE_SUFFIXES + SYSTEM_PROSE_SUFFIXES
SYSTEM_VAL_FRACTION = 0.02
SYSTEM_PROSE_VAL_FRACTION = 0.10  # prose files are few: a larger share keeps the prose split useful
SYSTEM_MAX_FILE_BYTES = 1_000_000
SYSTEM_VERSION = 1  # bump when the files chosen or the documents cut from them change
_SYSTEM_SKIPPED = frozenset({"__pycache__", "site-packages", "dist-packages"})


def system_roots() -> list[tuple[str, Path]]:
    """``(label, folder)`` of what :class:`SystemCorpus` reads on this interpreter: the standard library
    (``stdlib``), the package folders of :func:`site_package_folders` (``site``: one key space, the folder
    earlier on ``sys.path`` wins), the ``include`` and ``share`` folders of ``sys.prefix`` and
    ``sys.base_prefix`` (``prefix-include``, ``prefix-share``, ``base-include``, ``base-share``), and the CUDA
    toolkit's headers where a toolkit is installed (``cuda-include``: ``$CUDA_HOME``, ``$CUDA_PATH`` or
    ``/usr/local/cuda``). Existing folders only; a folder reached under two labels is read under the first."""
    candidates: list[tuple[str, Path]] = [("stdlib", Path(sysconfig.get_paths()["stdlib"]))]
    candidates += [("site", folder) for folder in site_package_folders()]
    for label, prefix in (("prefix", sys.prefix), ("base", sys.base_prefix)):
        candidates += [(f"{label}-{name}", Path(prefix) / name) for name in ("include", "share")]
    cuda = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidates.append(("cuda-include", Path(cuda) / "include"))
    roots, seen = [], set()
    for label, folder in candidates:
        if folder.is_dir() and folder.resolve() not in seen:
            seen.add(folder.resolve())
            roots.append((label, folder))
    return roots


def _system_files(label: str, root: Path) -> Iterator[tuple[str, str, os.stat_result]]:
    """``(key, path, status)`` of the text-like files under ``root`` (:data:`SYSTEM_SUFFIXES`), keyed
    ``label/relpath`` (``site`` keys without the folder, so one package installed twice is one key). Hidden and
    ``__pycache__`` folders are not entered, nor package folders inside the standard library, nor linked folders
    (as ``os.walk`` does not follow them); a link to a file counts as the file. Paths are plain strings and each
    file is looked at once (``os.scandir``'s entry type, then one ``stat`` whose result the fingerprint cache's
    listing reuses): a ``system`` corpus holds tens of thousands of files, and every run opens it."""
    stack = [(os.fspath(root), f"{label}/")]
    while stack:
        folder, prefix = stack.pop()
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError:  # a folder that cannot be listed is skipped, as os.walk skips it
            continue
        for entry in entries:
            name = entry.name
            try:
                if entry.is_dir():
                    if not entry.is_symlink() and not name.startswith(".") and name not in _SYSTEM_SKIPPED:
                        stack.append((entry.path, f"{prefix}{name}/"))
                elif name.endswith(SYSTEM_SUFFIXES) and not name.startswith(".") and entry.is_file():
                    yield prefix + name, entry.path, entry.stat()
            except OSError:  # gone since the listing, or a broken link: not a file
                continue


def _is_system_val(key: str) -> bool:
    fraction = SYSTEM_PROSE_VAL_FRACTION if key.endswith(SYSTEM_PROSE_SUFFIXES) else SYSTEM_VAL_FRACTION
    return hash_fraction("split:system:" + key) < fraction


class SystemCorpus(Corpus):
    """Every text source under the running interpreter's prefixes, with no download: a larger corpus than
    ``site`` for GPU-sized runs on machines without network.

    Files (:func:`system_roots`): the standard library's ``*.py``; in the package folders, the prefixes'
    ``include`` and ``share`` folders and the CUDA toolkit's ``include``, Python sources and stubs, C, C++ and
    CUDA sources and headers (:data:`SYSTEM_CODE_SUFFIXES`) as code, and Markdown, reStructuredText and plain
    text (:data:`SYSTEM_PROSE_SUFFIXES`) as prose, with the module docstrings of the Python sources (as
    ``builtin``). Left out: files over 1 MB (generated tables), empty files, files with a NUL byte (binary), and
    exact duplicates (the first key in sorted order is kept, so a held-out file cannot reappear in training
    under another name). A file is held out when the hash of its key (``label/relative path``, the same on
    every machine with the same packages) falls in the lowest 2% (10% for prose files, which are few):
    held-out code goes to validation split ``code``, held-out prose files and the docstrings of held-out
    sources to ``prose``. Which files were kept is worked out once per state of the files (the fingerprint
    cache), so opening the corpus reads only their status. The corpus id changes when anything under those
    folders is installed, upgraded or removed.
    """

    kind = "system"
    val_splits = ("code", "prose")

    def __init__(self, roots: list[tuple[str, str | Path]] | None = None):
        self.roots = [(label, Path(folder)) for label, folder in roots] if roots is not None else system_roots()
        if not self.roots:
            raise UserError(f"no standard library or package folder found for this Python ({sys.executable})")
        self.location = ":".join(str(folder) for _, folder in self.roots)
        chosen: dict[str, tuple[str, os.stat_result]] = {}
        for label, root in self.roots:
            for key, path, status in _system_files(label, root):
                chosen.setdefault(key, (path, status))
        if not chosen:
            raise UserError(f"no text sources ({', '.join(SYSTEM_SUFFIXES)}) found under {self.location}")
        keys = sorted(chosen)
        files = [(key, chosen[key][0]) for key in keys]
        record = dict(cached_file_hash(files, _system_fingerprint, statuses=[chosen[key][1] for key in keys]))
        dropped = set(record.pop("dropped"))
        self.files = [(key, path) for key, path in files if key not in dropped]
        self.file_bytes = {key: int(size) for key, size in zip(
            (key for key, _ in files), record.pop("sizes"), strict=True) if key not in dropped}
        self.fingerprint = {"kind": self.kind, "location": self.location, "python": sys.version.split()[0],
                            "system_version": SYSTEM_VERSION, "val_fraction": SYSTEM_VAL_FRACTION,
                            "prose_val_fraction": SYSTEM_PROSE_VAL_FRACTION,
                            "max_file_bytes": SYSTEM_MAX_FILE_BYTES, **record}

    def _files(self, held_out: bool, prose: bool) -> Iterator[tuple[str, Path]]:
        for key, path in self.files:
            if _is_system_val(key) == held_out and key.endswith(SYSTEM_PROSE_SUFFIXES) == prose:
                yield key, path

    def _prose(self, held_out: bool) -> Iterator[tuple[str, str]]:
        for key, path in self._files(held_out, prose=True):
            yield key, _read_text(path)
        for key, path in self._files(held_out, prose=False):
            if key.endswith(".py"):
                doc = _module_docstring(path)
                if doc:
                    yield f"doc:{key}", doc

    def documents(self, split: str) -> Iterator[tuple[str, str]]:
        if split not in self.splits:
            raise KeyError(split)
        if split in ("train", "code"):
            for key, path in self._files(held_out=split == "code", prose=False):
                yield key, _read_text(path)
        if split in ("train", "prose"):
            yield from self._prose(held_out=split == "prose")

    def split_bytes(self, split: str) -> int:
        held_out = split != "train"
        code = sum(self.file_bytes[key] for key, _ in self._files(held_out, prose=False))
        prose = sum(self.file_bytes[key] for key, _ in self._files(held_out, prose=True))
        docstrings = sum(self.file_bytes[key] for key, _ in self._files(held_out, prose=False)
                         if key.endswith(".py")) // 50  # docstrings are about 1/50 of the source, by size
        return {"train": code + prose + docstrings, "code": code, "prose": prose + docstrings}[split]

    def describe(self, split: str) -> str:
        return f"system corpus split {split} ({self.location})"


def _system_fingerprint(files: list[tuple[str, str | Path]]) -> dict[str, Any]:
    """The content fingerprint of :class:`SystemCorpus`'s candidate files, with each file's size and the keys
    left out (over the size limit, empty or unreadable, binary, or a duplicate of an earlier key)."""
    listing, contents, total = hashlib.sha256(), hashlib.sha256(), 0
    seen: set[str] = set()
    dropped, sizes = [], []
    for key, path in files:
        try:
            raw = Path(path).read_bytes()
        except OSError:  # unreadable (permissions, a file that went away): left out
            raw = b""
        total += len(raw)
        sizes.append(len(raw))
        listing.update(f"{key}\t{len(raw)}\n".encode())
        contents.update(raw)
        content_hash = hashlib.sha1(raw).hexdigest()
        if len(raw) > SYSTEM_MAX_FILE_BYTES or not raw.strip() or b"\0" in raw or content_hash in seen:
            dropped.append(key)
        else:
            seen.add(content_hash)
    return {"n_files": len(files), "n_kept": len(files) - len(dropped), "total_bytes": total,
            "list_sha256": listing.hexdigest(), "content_sha256": contents.hexdigest(), "dropped": dropped,
            "sizes": sizes}


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
                    raise UserError(f"{file}: not a readable Parquet file ({exc})") from None
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
                    raise UserError(f"{file}:{lineno}: not a JSON line ({exc})") from None
                if not isinstance(record, dict):
                    got = type(record).__name__
                    raise UserError(f"{file}:{lineno}: a JSON object was expected, got {got}")
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
                        raise UserError(f"{file}:{lineno}: {self.text_column!r} is not a string")
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
                            raise UserError(f"{file} row {row}: {self.text_column!r} is not text")

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
        self.val_splits = tuple(self.val_sources) if self.val_sources else (HELD_OUT_SPLIT,)
        for source in (self.train_source, *self.val_sources.values()):
            source.check_columns()
        self.fingerprint = {
            "kind": self.kind, "location": self.location, "format": fmt,
            "extraction_version": EXTRACTION_VERSION,
            "text_column": text_column if fmt in ("jsonl", "parquet") else None,
            "val_fraction": None if self.val_sources else USER_VAL_FRACTION,
            **cached_file_hash(self.train_source.files, hash_files),
            "val": {name: cached_file_hash(s.files, hash_files) for name, s in self.val_sources.items()}}

    def documents(self, split: str) -> Iterator[tuple[str, str]]:
        if self.val_sources:
            source = self.train_source if split == "train" else self.val_sources[split]
            yield from source.documents()
            return
        if split not in ("train", HELD_OUT_SPLIT):
            raise KeyError(split)
        for key, text in self.train_source.documents():
            if (hash_fraction("split:" + key) < USER_VAL_FRACTION) == (split == HELD_OUT_SPLIT):
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


def val_split_names(data_cfg: Any) -> tuple[str, ...]:
    """The validation splits a :class:`~embscale.training.config.DataConfig` gives its runs, without opening the
    corpus: the built-in, site or system corpus's, the names of ``val_paths``, or the one held-out split."""
    if data_cfg.corpus == "builtin":
        return BuiltinCorpus.val_splits
    if data_cfg.corpus == "site":
        return SiteCorpus.val_splits
    if data_cfg.corpus == "system":
        return SystemCorpus.val_splits
    return tuple(data_cfg.val_paths) if data_cfg.val_paths else (HELD_OUT_SPLIT,)


def corpus_format(data_cfg: Any) -> str:
    """``data.format``, or for ``auto`` what the corpus path holds: token files (``.npy``, ``.bin``, a
    ``save_to_disk`` folder or ``.arrow`` files), Parquet with a token or a text column, JSONL, or text files."""
    if data_cfg.format != "auto":
        return data_cfg.format
    path, matches = expand_path(data_cfg.corpus, "data.corpus")
    token_format = detect_token_format(path, matches, "data.format")
    if token_format:
        return token_format
    if matches is not None:
        parquet = [p for p in matches if p.suffix.lower() == ".parquet"]
        if parquet and len(parquet) == len(matches):
            return parquet_kind(parquet, data_cfg.text_column, data_cfg.token_column)
        raise ConfigError("data.corpus", f"{data_cfg.corpus}: glob patterns name token files (.npy, .bin, .arrow, "
                                         ".parquet); give a text corpus as a folder or a file")
    fmt = _infer_format(path, "data.corpus")
    if fmt == "parquet":
        files = [path] if path.is_file() else [p for p in _visible_files(path) if p.suffix.lower() == ".parquet"]
        return parquet_kind(files, data_cfg.text_column, data_cfg.token_column)
    return fmt


def open_corpus(data_cfg: Any, cache: Path | None = None) -> Corpus:
    """The corpus a :class:`~embscale.training.config.DataConfig` names; errors name the field or file.

    ``cache`` is where a pre-tokenised corpus keeps its files' statistics (default: the cache root)."""
    if data_cfg.corpus == "builtin":
        return BuiltinCorpus()
    if data_cfg.corpus == "site":
        return SiteCorpus()
    if data_cfg.corpus == "system":
        return SystemCorpus()
    fmt = corpus_format(data_cfg)
    if fmt in TOKEN_FORMATS:
        check_token_fields(data_cfg, fmt)
        return TokenCorpus(data_cfg.corpus, fmt, data_cfg.eos_token_id, data_cfg.vocab_size,
                           data_cfg.token_column, data_cfg.val_paths, cache)
    if data_cfg.eos_token_id is not None:
        raise ConfigError("data.eos_token_id", f"is for pre-tokenised data, and {data_cfg.corpus} is text (format "
                                               f"{fmt}); a given tokenizer's end-of-sequence token is named by "
                                               "data.eos_token")
    return UserCorpus(data_cfg.corpus, fmt, data_cfg.text_column, data_cfg.val_paths)


def check_token_fields(data_cfg: Any, fmt: str) -> None:
    """The fields of a pre-tokenised corpus: no tokenizer, an end-of-document id."""
    what = f"pre-tokenised data (format {fmt})"
    if data_cfg.tokenizer_path is not None:
        raise ConfigError("data.tokenizer_path", f"{what} is read as token ids and no tokenizer is used; leave "
                                                 "data.tokenizer_path out")
    if data_cfg.eos_token is not None:
        raise ConfigError("data.eos_token", f"{what} has no tokenizer; name the end-of-document id with "
                                            "data.eos_token_id instead")
    if data_cfg.eos_token_id is None:
        raise ConfigError("data.eos_token_id", f"is required for {what}: the id that ends (or, as in llm.c's "
                                               "FineWeb shards, starts) each document, e.g. 50256 for GPT-2 tokens")


__all__ = ["BuiltinCorpus", "Corpus", "SiteCorpus", "SystemCorpus", "TokenCorpus", "UserCorpus", "corpus_format",
           "digest", "open_corpus", "site_package_folders", "system_roots", "val_split_names"]
