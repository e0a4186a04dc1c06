"""A corpus's content fingerprint without reading every file on every run.

Hashing a corpus's files (:func:`embscale.training.data.corpus._hash_files`) reads all of them: the standard
library's 31 MB each time a run starts, hundreds of MB for a corpus of 100M tokens, and a sweep starts many runs at
once. :func:`cached_file_hash` keeps each computed fingerprint under ``<cache>/fingerprints/``, keyed by a hash of
every file's name, size, modification time, status-change time, inode and device (the quick check of make, rsync
and git). A file written since, even to the same size and with its modification time set back, has a new
status-change time (no tool can set it), and a file replaced by another has a new inode: either misses the cache
and the files are hashed again, so a changed file still changes the corpus id. A fingerprint is not kept when a
file changed in the two seconds before hashing began (it might change again within the same timestamp).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from embscale.base.files import atomic_write_json, read_json
from embscale.training.data.tokenizer import cache_root

CACHE_VERSION = 1
RECENT_CHANGE_S = 2.0


def stat_listing(files: list[tuple[str, str | Path]], statuses: list[os.stat_result] | None = None
                 ) -> tuple[str, float]:
    """A hash of every file's name and status (size, times in ns, inode, device), and the newest change time.
    ``statuses``: the files' ``os.stat`` results when the caller already took them (one per file, in order)."""
    listing = hashlib.sha256(f"v{CACHE_VERSION}\n".encode())
    newest = 0.0
    for i, (name, path) in enumerate(files):
        st = statuses[i] if statuses is not None else os.stat(path)
        listing.update(f"{name}\t{st.st_size}\t{st.st_mtime_ns}\t{st.st_ctime_ns}\t{st.st_ino}\t{st.st_dev}\n"
                       .encode())
        newest = max(newest, st.st_mtime, st.st_ctime)
    return listing.hexdigest(), newest


def cached_file_hash(files: list[tuple[str, str | Path]],
                     compute: Callable[[list[tuple[str, str | Path]]], dict[str, Any]],
                     cache: Path | None = None, statuses: list[os.stat_result] | None = None) -> dict[str, Any]:
    """``compute(files)``, from the cache when no file's status changed since it was stored (``statuses``: the
    files' status when the caller already has it; a fingerprint computed now is checked against a fresh one)."""
    key, newest = stat_listing(files, statuses)
    entry = (cache or cache_root()) / "fingerprints" / f"{key[:32]}.json"
    stored = read_json(entry)
    if isinstance(stored, dict) and stored.get("stat_listing") == key and isinstance(stored.get("fingerprint"), dict):
        return stored["fingerprint"]
    started = time.time()
    fingerprint = compute(files)
    if newest < started - RECENT_CHANGE_S and stat_listing(files)[0] == key:
        with contextlib.suppress(OSError):  # a read-only cache only costs the hashing
            atomic_write_json(entry, {"stat_listing": key, "fingerprint": fingerprint})
    return fingerprint


__all__ = ["cached_file_hash", "stat_listing"]
