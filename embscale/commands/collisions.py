"""``embscale collisions``: n-gram hash hit and collision rates against table size (the paper's Figure 3).

Takes a deterministic sample of training sequences (default: 100 sequences of 1024 tokens of the built-in
corpus), sweeps nominal table sizes (default 30x to 33x V0, dense near the integer multiples) under each sizing
policy, and writes ``collisions.parquet`` and the figure (PNG and PDF) into the output folder.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from embscale.analysis.collisions import POLICIES, collision_table, default_table_sizes, spike_summary
from embscale.base.errors import ConfigError
from embscale.base.files import atomic_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", default="builtin", help="'builtin' or a path (dir, JSONL or Parquet)")
    parser.add_argument("--text-column", default="text", help="text column of a JSONL/Parquet corpus")
    parser.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size V0 (default 8192)")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer.json to use instead of training a BPE")
    parser.add_argument("--sequences", type=int, default=100, help="sequences in the sample (default 100)")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default 1024)")
    parser.add_argument("--sizes", default="30:33",
                        help="'LOW:HIGH' in units of V0 (coarse grid, dense near integer multiples), or a comma "
                             "list of sizes: integers are rows, numbers ending in x are multiples of V0")
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma list of paper, prime, exact")
    parser.add_argument("--max-order", type=int, default=4, help="highest n-gram order (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sequence sample")
    parser.add_argument("--out", default="results/collisions",
                        help="output folder; give a sweep's folder (results/<sweep>) to have `embscale plots` "
                             "draw Figure 3 with that sweep")


def parse_sizes(text: str, vocab_size: int) -> list[int]:
    """``LOW:HIGH`` (multiples of V0) or a comma list of row counts / ``NNx`` multiples."""
    text = text.strip()
    try:
        if ":" in text:
            low, high = (float(part) for part in text.split(":"))
            if not 0 < low < high:
                raise ValueError
            return default_table_sizes(vocab_size, low, high)
        sizes = []
        for item in text.split(","):
            item = item.strip()
            sizes.append(int(round(float(item[:-1]) * vocab_size)) if item.endswith("x") else int(item))
    except ValueError:
        raise ConfigError("--sizes", f"cannot read {text!r}; use LOW:HIGH (multiples of V0, LOW < HIGH) "
                                     "or a comma list like 245760,31.5x") from None
    if not sizes or min(sizes) < 2:
        raise ConfigError("--sizes", "every table size must be at least 2 rows")
    return sorted(set(sizes))


def sample_sequences(tokens: np.ndarray, sequences: int, seq_len: int, seed: int) -> np.ndarray:
    """``sequences`` non-overlapping windows of ``seq_len`` tokens at seeded random positions."""
    windows = len(tokens) // seq_len
    if windows < 1:
        raise ConfigError("--seq-len", f"the training split has {len(tokens)} tokens, fewer than one sequence")
    chosen = np.sort(np.random.default_rng(seed).permutation(windows)[:min(sequences, windows)])
    return np.stack([np.asarray(tokens[i * seq_len:(i + 1) * seq_len], dtype=np.int64) for i in chosen])


def run(args: argparse.Namespace) -> int:
    from embscale.training.config import DataConfig  # the corpus and tokenizer come from the training side
    from embscale.training.data.shards import prepare_data

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for policy in policies:
        if policy not in POLICIES:
            raise ConfigError("--policies", f"unknown policy {policy!r}; expected {', '.join(POLICIES)}")
    if not 2 <= args.max_order <= 8:
        raise ConfigError("--max-order", f"must be between 2 and 8, got {args.max_order}")
    if args.sequences < 1:
        raise ConfigError("--sequences", f"must be positive, got {args.sequences}")
    if args.seq_len < args.max_order:
        raise ConfigError("--seq-len", f"must be at least --max-order {args.max_order}")
    data_cfg = DataConfig(corpus=args.corpus, text_column=args.text_column, vocab_size=args.vocab_size,
                          tokenizer_path=args.tokenizer)
    tokenizer, shards = prepare_data(data_cfg)
    vocab_size = tokenizer.vocab_size
    sizes = parse_sizes(args.sizes, vocab_size)
    ids = sample_sequences(shards.train.tokens(), args.sequences, args.seq_len, args.seed)

    started = time.perf_counter()
    print(f"collisions: {ids.shape[0]} sequences x {ids.shape[1]} tokens, V0 = {vocab_size}, "
          f"{len(sizes)} table sizes x {len(policies)} policies, orders 2..{args.max_order}", flush=True)
    table = collision_table(ids, vocab_size, shards.train.eos_token_id, sizes, policies, args.max_order)
    table.insert(0, "corpus_id", shards.corpus_id)
    table.insert(1, "vocab_size", vocab_size)
    elapsed = time.perf_counter() - started

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "collisions.parquet") as tmp:
        table.to_parquet(tmp, index=False)

    import matplotlib.pyplot as plt
    import pandas as pd

    from embscale.analysis.figures import fig_collisions
    from embscale.analysis.style import STYLE

    (out / "figures").mkdir(exist_ok=True)
    with plt.rc_context(STYLE):
        figures = fig_collisions(out, pd.DataFrame(), out / "figures", lambda line: print(line, flush=True))
    summary = spike_summary(table, vocab_size, order=2)
    print(f"computed in {elapsed:.1f}s")
    print("2-gram collision rate near integer multiples of V0 (modulus within 0.002 V0) vs elsewhere:")
    for row in summary.itertuples():
        print(f"  {row.policy:6s} near {row.collision_near_multiple:.3f} ({row.points_near} sizes)   "
              f"elsewhere {row.collision_elsewhere:.3f} ({row.points_elsewhere} sizes)")
    print(f"table: {out / 'collisions.parquet'}")
    for path in figures:
        print(f"figure: {path}")
    return 0
