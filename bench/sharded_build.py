"""Host memory of building a sharded run's model, per rank, on CPU (gloo ranks started here):

    python -m embscale.bench.sharded_build                      # NE, ~400 MB, fsdp on 2 ranks, tables by rows
    python -m embscale.bench.sharded_build --ranks 4 --ratio 10 --table-sharding replicate

Two ways, each in fresh processes: ``whole``, every rank builds the whole initialised model and shards it (what a
sharded run did before :func:`embscale.training.parallelize.build_sharded_model`), and ``meta``, that function
(rank 0 builds one whole copy, every rank shards a ``meta`` model and receives its shards). For each rank it
prints the resident memory before the build (after imports and the process group), the peak during it (the
process's high-water mark, ``ru_maxrss``) and the resident memory after it, in MiB, and the bytes of the model's
tensors the rank holds afterwards. The model is an N-gram Embedding model with a large table (``--ratio`` sizes
it), the tables in the dense table optimizer's layout (``table_sharding`` rows or replicate).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

MIB = 2**20


def resident_bytes() -> int:
    """This process's resident set now (``/proc/self/statm``)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_bytes() -> int:
    """This process's resident high-water mark (``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def model_section(args: argparse.Namespace) -> dict:
    return {"vocab_size": args.vocab, "eos_token_id": 0, "d_model": args.d_model, "n_layers": args.layers,
            "n_heads": 8, "dense_hidden": 2 * args.d_model, "max_seq_len": 128,
            "ngram": {"n": 3, "k": 2, "ratio": args.ratio}}


def rank_main(rank: int, world_size: int, way: str, args: argparse.Namespace, folder: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size), "OMP_NUM_THREADS": "1"})
    import torch

    from embscale.models.config import ModelConfig
    from embscale.models.model import build_model
    from embscale.training.config import TrainingConfig
    from embscale.training.parallelize import build_mesh, build_sharded_model, materialised_bytes, parallelize

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/init_{way}", rank=rank,
                                         world_size=world_size)
    model_cfg = ModelConfig.from_dict(model_section(args))
    cfg = TrainingConfig(steps=1, seq_len=128, parallel="fsdp", table_optimizer="dense",
                         table_sharding=args.table_sharding, device="cpu")
    device = torch.device("cpu")
    mesh = build_mesh(cfg, world_size, world_size, device)
    torch.distributed.barrier()
    before, started = resident_bytes(), time.monotonic()
    torch.manual_seed(cfg.seed)
    if way == "whole":
        model = build_model(model_cfg, device=device)
        tables = model.ngram_tables()
        parallelize(model, mesh, cfg, ignored=tables)
    else:
        model, _ = build_sharded_model(model_cfg, mesh, cfg, device)
    seconds = time.monotonic() - started
    torch.distributed.barrier()
    row = {"way": way, "rank": rank, "before": before, "peak": peak_bytes(), "after": resident_bytes(),
           "model_bytes": materialised_bytes(model), "seconds": seconds}
    Path(folder, f"{way}_{rank}.json").write_text(json.dumps(row))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    os._exit(0)  # gloo objects freed at interpreter shutdown can abort the process


def main(argv: list[str] | None = None) -> None:
    import torch

    from embscale.models.accounting import count_parameters
    from embscale.models.config import ModelConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--ratio", type=float, default=5.0, help="N-gram table rows per vocabulary entry")
    parser.add_argument("--table-sharding", choices=("rows", "replicate"), default="rows")
    args = parser.parse_args(argv)
    total = count_parameters(ModelConfig.from_dict(model_section(args))).total
    print(f"NE model: {total:,} parameters ({total * 4 / MIB:,.0f} MiB fp32), fsdp on {args.ranks} gloo ranks, "
          f"tables: {args.table_sharding}")
    print(f"{'way':6} {'rank':>4} {'before MiB':>11} {'peak MiB':>9} {'peak-before':>12} {'after MiB':>10} "
          f"{'model MiB':>10} {'build s':>8}")
    with tempfile.TemporaryDirectory() as folder:
        for way in ("whole", "meta"):
            torch.multiprocessing.spawn(rank_main, args=(args.ranks, way, args, folder), nprocs=args.ranks)
            for rank in range(args.ranks):
                row = json.loads(Path(folder, f"{way}_{rank}.json").read_text())
                print(f"{way:6} {rank:>4} {row['before'] / MIB:>11.0f} {row['peak'] / MIB:>9.0f} "
                      f"{(row['peak'] - row['before']) / MIB:>12.0f} {row['after'] / MIB:>10.0f} "
                      f"{row['model_bytes'] / MIB:>10.0f} {row['seconds']:>8.2f}")


if __name__ == "__main__":
    main()
