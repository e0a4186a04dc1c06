"""Tokenizers: a byte-level BPE trained on the training split, or any ``tokenizer.json`` given by path.

A trained tokenizer is cached under ``<cache>/tokenizers/<corpus id>-v<vocab>-s<sample>/`` (cache root
``$EMBSCALE_CACHE``, default ``~/.cache/embscale``), keyed by the corpus fingerprint, the requested vocabulary
size and the training sample size, so every run on the same corpus shares one.

The BPE is trained on a deterministic sample of the training split (``sample_bytes`` of text, 8 MB by
default): a document is taken when the hash of its key falls below the sampling rate, in corpus order, until
the budget is spent. On two CPU cores training on the sample takes a couple of seconds.

``vocab_size`` counts the 256 byte tokens, the merges and the end-of-sequence token ``<|endoftext|>``
(id 0); it must be at least 256. With 256 the tokenizer has no merges and 257 entries (bytes + EOS). The
model's vocabulary is the tokenizer's actual size (:attr:`TokenizerInfo.vocab_size`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from embscale.base.errors import ConfigError, UserError
from embscale.base.files import atomic_write_bytes, atomic_write_json

EOS_TOKEN = "<|endoftext|>"
MIN_VOCAB_SIZE = 256
DEFAULT_SAMPLE_BYTES = 8_000_000
# End-of-sequence spellings recognised in a tokenizer.json given by path, in order of preference.
KNOWN_EOS_TOKENS = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>", "[SEP]", "<EOS>")


def cache_root() -> Path:
    """``$EMBSCALE_CACHE``, or ``~/.cache/embscale``."""
    env = os.environ.get("EMBSCALE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "embscale"


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so concurrent runs (or DDP ranks) build a cache entry once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_fraction(key: str) -> float:
    """A stable number in [0, 1) from a document key (sha1), for splits and samples."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


@dataclass(frozen=True)
class TokenizerInfo:
    """A tokenizer on disk and what the trainer needs from it; for pre-tokenised data, only the vocabulary."""

    path: str | None  # None for pre-tokenised data
    vocab_size: int
    eos_token: str | None
    eos_token_id: int
    fingerprint: str  # sha256 of tokenizer.json (pre-tokenised: of the vocabulary size and EOS id)
    source: str  # "trained", "file" or "pretokenized"
    cache_hit: bool = False

    def load(self) -> Any:
        if self.path is None:
            raise UserError("the data is pre-tokenised: there is no tokenizer to load")
        from tokenizers import Tokenizer

        return Tokenizer.from_file(self.path)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_bpe(texts: Iterable[str], vocab_size: int, show_progress: bool = False) -> Any:
    """A byte-level BPE tokenizer with ``<|endoftext|>`` as id 0, trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=show_progress)
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def sample_documents(documents: Iterable[tuple[str, str]], total_bytes: int,
                     sample_bytes: int) -> Iterator[str]:
    """Texts of a deterministic sample of about ``sample_bytes`` from ``(key, text)`` pairs.

    ``total_bytes`` (an estimate of the split's size) sets the sampling rate, so the sample spreads over the
    whole split rather than its first files.
    """
    rate = 1.0 if total_bytes <= sample_bytes else sample_bytes / total_bytes
    taken = 0
    for key, text in documents:
        if taken >= sample_bytes:
            return
        if hash_fraction("bpe-sample:" + key) < rate:
            taken += len(text.encode("utf-8"))
            yield text


def check_vocab_size(vocab_size: int, field: str = "data.vocab_size") -> None:
    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(field, f"must be at least {MIN_VOCAB_SIZE} (the byte alphabet), got {vocab_size}")


def build_tokenizer(documents: Callable[[], Iterable[tuple[str, str]]], corpus_id: str, total_bytes: int,
                    vocab_size: int, sample_bytes: int = DEFAULT_SAMPLE_BYTES,
                    cache: Path | None = None, log: Callable[[str], None] | None = None) -> TokenizerInfo:
    """The cached BPE for this corpus and vocabulary size, trained on a miss.

    ``documents()`` yields ``(key, text)`` of the training split; it is called only on a cache miss.
    """
    check_vocab_size(vocab_size)
    cache = cache or cache_root()
    entry = cache / "tokenizers" / f"{corpus_id}-v{vocab_size}-s{sample_bytes}"
    path = entry / "tokenizer.json"
    with file_lock(cache / "tokenizers" / f".{entry.name}.lock"):
        info_path = entry / "info.json"
        if info_path.is_file() and path.is_file():
            info = json.loads(info_path.read_text())
            if info.get("fingerprint") == sha256_file(path):
                return TokenizerInfo(**{**info, "path": str(path), "cache_hit": True})
        if log:
            log(f"training a byte-level BPE tokenizer (vocab {vocab_size}) on up to {sample_bytes:,} bytes")
        tokenizer = train_bpe(sample_documents(documents(), total_bytes, sample_bytes), vocab_size)
        atomic_write_bytes(path, tokenizer.to_str().encode("utf-8"), fsync=True)
        info = TokenizerInfo(path=str(path), vocab_size=tokenizer.get_vocab_size(), eos_token=EOS_TOKEN,
                             eos_token_id=tokenizer.token_to_id(EOS_TOKEN), fingerprint=sha256_file(path),
                             source="trained")
        stored = {k: v for k, v in info.to_dict().items() if k not in ("path", "cache_hit")}
        atomic_write_json(info_path, stored)
        return info


def pretokenized_vocabulary(vocab_size: int, eos_token_id: int) -> TokenizerInfo:
    """What the trainer needs of a tokenizer when the data is token ids already: ``data.vocab_size`` and
    ``data.eos_token_id``. Nothing is loaded or trained."""
    fingerprint = hashlib.sha256(json.dumps({"pretokenized": True, "vocab_size": vocab_size,
                                             "eos_token_id": eos_token_id}, sort_keys=True).encode()).hexdigest()
    return TokenizerInfo(path=None, vocab_size=vocab_size, eos_token=None, eos_token_id=eos_token_id,
                         fingerprint=fingerprint, source="pretokenized")


def load_tokenizer_file(path: str | Path, eos_token: str | None = None,
                        field: str = "data.tokenizer_path") -> TokenizerInfo:
    """A ``tokenizer.json`` given by path; its EOS token is ``eos_token`` or the first known one found."""
    from tokenizers import Tokenizer

    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(field, f"tokenizer file {path} does not exist")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises plain Exceptions
        raise ConfigError(field, f"{path} is not a tokenizer.json the tokenizers library can read: {exc}"
                          ) from None
    candidates = (eos_token,) if eos_token else KNOWN_EOS_TOKENS
    for token in candidates:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return TokenizerInfo(path=str(path.resolve()), vocab_size=tokenizer.get_vocab_size(),
                                 eos_token=token, eos_token_id=token_id, fingerprint=sha256_file(path),
                                 source="file")
    if eos_token:
        raise ConfigError("data.eos_token", f"token {eos_token!r} is not in the vocabulary of {path}")
    raise ConfigError(field, f"{path} has none of the end-of-sequence tokens {', '.join(KNOWN_EOS_TOKENS)}; "
                             "name yours with data.eos_token")


__all__ = [
    "DEFAULT_SAMPLE_BYTES",
    "EOS_TOKEN",
    "MIN_VOCAB_SIZE",
    "TokenizerInfo",
    "build_tokenizer",
    "cache_root",
    "check_vocab_size",
    "file_lock",
    "hash_fraction",
    "load_tokenizer_file",
    "pretokenized_vocabulary",
    "sample_documents",
    "sha256_file",
    "train_bpe",
]
