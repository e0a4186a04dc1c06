"""What every corpus is: the :class:`Corpus` interface and the fingerprint helpers its implementations share.

A corpus has a training split and one or more validation splits. Text corpora
(:mod:`embscale.training.data.corpus`) give each split's documents as ``(key, text)`` pairs for a tokenizer; a
pre-tokenised corpus (:mod:`embscale.training.data.tokens`) gives token ids and no text. Every corpus has a
fingerprint whose hash, the corpus id, keys the tokenizer and shard caches and is stored with every run, and
every corpus answers :meth:`Corpus.known_tokens`: a split's exact token count when it is known without
tokenising anything.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def digest(data: Any) -> str:
    """sha256 of ``data`` as canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def hash_files(files: list[tuple[str, Path]]) -> dict[str, Any]:
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
    """Documents by split (``train`` and the validation splits), as ``(key, text)`` pairs, or tokens.

    ``pretokenized`` corpora hold token ids rather than text: they have no :meth:`documents`, and the shard
    builder reads their tokens instead (:mod:`embscale.training.data.tokens`).
    """

    kind: str
    location: str
    fingerprint: dict[str, Any]
    val_splits: tuple[str, ...]
    pretokenized: bool = False

    @property
    def id(self) -> str:
        """Short hash of the fingerprint; keys the caches."""
        return digest({k: v for k, v in self.fingerprint.items() if k != "location"})[:16]

    @property
    def splits(self) -> tuple[str, ...]:
        return ("train", *self.val_splits)

    def documents(self, split: str) -> Iterator[tuple[str, str]]:
        raise NotImplementedError

    def split_bytes(self, split: str) -> int:
        """An estimate of a split's size in bytes (the tokenizer's sampling rate and the progress total)."""
        raise NotImplementedError

    def known_tokens(self, split: str) -> int | None:
        """The exact number of tokens of ``split`` (as its shard will hold them, end-of-document ids included)
        when that is known without tokenising: pre-tokenised corpora know it from file headers, file sizes or
        Arrow/Parquet metadata. Text corpora return None (their count depends on a tokenizer)."""
        return None

    def describe(self, split: str) -> str:
        """Where a split's documents come from, for error messages."""
        return f"split {split} of {self.location}"


__all__ = ["Corpus", "digest", "hash_files"]
