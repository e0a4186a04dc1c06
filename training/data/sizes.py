"""How many tokens each split of a corpus holds, for epoch accounting before a run starts.

Pre-tokenised corpora (``.bin``, ``.npy``, Arrow, Parquet token ids) know their sizes exactly from their files
(:meth:`~embscale.training.data.interface.Corpus.known_tokens`). For text corpora:

a split's size is **exact** once a run has built (or found) its shards: :func:`remember_split_tokens` stores the
shards' token counts under ``<cache>/sizes/``, keyed by the data config and checked against a cheap signature of
the corpus files (their count, bytes and newest modification time), so a changed corpus is never reported
with stale counts. Before that it is **estimated** from the bytes of the corpus files at
:data:`BYTES_PER_TOKEN` (a byte-level BPE of 2k-32k entries gives about 3-4.5 bytes per token on code and
English prose; Parquet is compressed, so its estimate errs toward fewer tokens, that is, toward warning about
repeated data). Reading sizes opens no corpus and tokenises nothing: planning a sweep stays fast.
"""

from __future__ import annotations

import json
import os
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from embscale.base.files import atomic_write_json
from embscale.base.rundir import HELD_OUT_SPLIT
from embscale.training.data.corpus import (
    SITE_VAL_FRACTION,
    SYSTEM_SUFFIXES,
    SYSTEM_VAL_FRACTION,
    USER_VAL_FRACTION,
    corpus_format,
    digest,
    open_corpus,
    site_package_folders,
    system_roots,
    val_split_names,
)
from embscale.training.data.tokenizer import cache_root
from embscale.training.data.tokens import TOKEN_FORMATS

BYTES_PER_TOKEN = 3.5
NAMED = ("builtin", "site", "system")  # corpora that need no path
SIZES_VERSION = 1
_SKIPPED_FOLDERS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class SplitTokens:
    """A split's token count: ``exact`` (from built shards) or estimated from bytes."""

    split: str
    tokens: int
    exact: bool

    def describe(self) -> str:
        """``10.4M tokens`` or ``~8.9M tokens (estimated)``."""
        return f"{_short(self.tokens)} tokens" if self.exact else f"~{_short(self.tokens)} tokens (estimated)"


def _short(count: float) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.3g}{suffix}"
    return f"{count:.0f}"


def _walk(path: Path, suffix: str | tuple[str, ...] | None = None, skipped: frozenset[str] = frozenset(_SKIPPED_FOLDERS)
          ) -> tuple[int, int, int]:
    """(files, bytes, newest mtime in ns) of a file or of the visible files under a folder."""
    if path.is_file():
        stat = path.stat()
        return 1, stat.st_size, stat.st_mtime_ns
    files = size = newest = 0
    for folder, subfolders, names in os.walk(path):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d not in skipped]
        for name in names:
            if name.startswith(".") or (suffix and not name.endswith(suffix)):
                continue
            try:
                stat = os.stat(os.path.join(folder, name))
            except OSError:
                continue
            files += 1
            size += stat.st_size
            newest = max(newest, stat.st_mtime_ns)
    return files, size, newest


def _split_paths(data_cfg: Any) -> dict[str, tuple[Path, str | tuple[str, ...] | None]]:
    """The path each split's files live under (``train`` also for a held-out split), with name suffixes."""
    if data_cfg.corpus == "builtin":
        return {"train": (Path(sysconfig.get_paths()["stdlib"]), ".py")}
    if data_cfg.corpus == "site":
        return {f"train{i}" if i else "train": (Path(folder), ".py")
                for i, folder in enumerate(site_package_folders())}
    if data_cfg.corpus == "system":
        return {f"train{i}" if i else "train": (folder, SYSTEM_SUFFIXES)
                for i, (_, folder) in enumerate(system_roots())}
    paths = {"train": (Path(data_cfg.corpus).expanduser(), None)}
    for name, path in (data_cfg.val_paths or {}).items():
        paths[name] = (Path(path).expanduser(), None)
    return paths


def _signature(data_cfg: Any) -> tuple[dict[str, Any], dict[str, int]]:
    """A cheap signature of the corpus files and the bytes of each of their paths."""
    signature: dict[str, Any] = {}
    path_bytes: dict[str, int] = {}
    for split, (path, suffix) in _split_paths(data_cfg).items():
        if not path.exists():
            signature[split] = None
            path_bytes[split] = 0
            continue
        files, size, newest = _walk(path, suffix, frozenset({"__pycache__"}) if data_cfg.corpus == "site"
                                    else frozenset(_SKIPPED_FOLDERS))
        signature[split] = [str(path.resolve()), files, size, newest]
        path_bytes[split] = size
    return signature, path_bytes


def _key(data_cfg: Any) -> str:
    return digest({"data": asdict(data_cfg), "version": SIZES_VERSION})[:16]


def _estimate(data_cfg: Any, path_bytes: dict[str, int]) -> dict[str, SplitTokens]:
    splits = val_split_names(data_cfg)
    if data_cfg.corpus == "builtin":
        # shares of the standard library's source bytes (CPython 3.11): held-out code 2.5%, held-out prose 0.28%
        total = float(path_bytes["train"])
        split_bytes = {"train": total * 0.97, "code": total * 0.025, "prose": total * 0.0028}
    elif data_cfg.corpus == "site":
        total = float(sum(path_bytes.values()))
        split_bytes = {"train": total * (1 - SITE_VAL_FRACTION), "code": total * SITE_VAL_FRACTION,
                       "prose": total * SITE_VAL_FRACTION / 50}  # docstrings are about 1/50 of the sources
    elif data_cfg.corpus == "system":
        total = float(sum(path_bytes.values()))
        held_out = total * SYSTEM_VAL_FRACTION  # prose (doc files, docstrings) is about a tenth of the text
        split_bytes = {"train": total - held_out, "code": held_out * 0.9, "prose": held_out * 0.1}
    elif data_cfg.val_paths:
        split_bytes = {split: float(path_bytes[split]) for split in ("train", *splits)}
    else:
        split_bytes = {"train": path_bytes["train"] * (1 - USER_VAL_FRACTION),
                       HELD_OUT_SPLIT: path_bytes["train"] * USER_VAL_FRACTION}
    return {split: SplitTokens(split, int(split_bytes.get(split, 0.0) / BYTES_PER_TOKEN), exact=False)
            for split in ("train", *splits)}


def split_tokens(data_cfg: Any, cache: Path | None = None) -> dict[str, SplitTokens]:
    """Token counts of every split (``train`` first) of the corpus a
    :class:`~embscale.training.config.DataConfig` names: exact when a run has built its shards (or the corpus is
    token ids), else estimated; empty when the corpus's files are not on this machine."""
    signature, path_bytes = _signature(data_cfg)
    if data_cfg.corpus not in NAMED and not any(ch in data_cfg.corpus for ch in "*?[") and (
            None in signature.values()):
        return {}  # the corpus is not on this machine (planned here, trained elsewhere): sizes unknown
    record_path = (cache or cache_root()) / "sizes" / f"{_key(data_cfg)}.json"
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        record = None
    complete = all(value is not None for value in signature.values())  # a glob of token files has no one path
    if complete and isinstance(record, dict) and record.get("signature") == json.loads(json.dumps(signature)):
        counts = record.get("tokens") or {}
        if all(isinstance(counts.get(s), int) for s in ("train", *val_split_names(data_cfg))):
            return {split: SplitTokens(split, counts[split], exact=True)
                    for split in ("train", *val_split_names(data_cfg))}
    if data_cfg.corpus not in NAMED and corpus_format(data_cfg) in TOKEN_FORMATS:
        corpus = open_corpus(data_cfg, cache)  # headers and file sizes (.bin, .npy) or the rows' lengths
        return {split: SplitTokens(split, int(corpus.known_tokens(split)), exact=True) for split in corpus.splits}
    return _estimate(data_cfg, path_bytes)


def remember_split_tokens(data_cfg: Any, counts: dict[str, int], cache: Path | None = None) -> None:
    """Store the exact token counts of a corpus's splits (called once its shards exist; an unchanged record is
    left as it is)."""
    signature, _ = _signature(data_cfg)
    record_path = (cache or cache_root()) / "sizes" / f"{_key(data_cfg)}.json"
    record = json.loads(json.dumps({"signature": signature, "tokens": {k: int(v) for k, v in counts.items()}}))
    try:
        if json.loads(record_path.read_text()) == record:
            return
    except (OSError, ValueError):
        pass
    atomic_write_json(record_path, record)


def epochs(tokens: float, train_tokens: float) -> float:
    """How many passes over a training split of ``train_tokens`` tokens a run of ``tokens`` tokens makes."""
    return float(tokens) / train_tokens if train_tokens > 0 else float("inf")


__all__ = ["BYTES_PER_TOKEN", "SplitTokens", "epochs", "remember_split_tokens", "split_tokens"]
