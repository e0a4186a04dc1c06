"""Sharded checkpoints (torch.distributed.checkpoint) of sharded runs, on CPU with gloo ranks started by
``torch.multiprocessing``: DCP's metadata round-trips through JSON exactly; a checkpoint counts only with its
manifest and checksums; a sharded run's checkpoint resumes in one process with every way of unpickling patched to
fail (falling back past a corrupt newest checkpoint) and ends where one process does; killing one rank of a
two-rank run fails the run within the process group's timeout, and running it again resumes from the last
complete checkpoint and ends where one process does; a one-process run's single-file checkpoint resumes on two
sharded ranks. Tolerances as in test_fsdp: losses rtol 1e-5, gradient
norms rtol 1e-4, parameters rtol 1e-4 / atol 1e-5, optimizer moments rtol 1e-4 / atol 1e-6."""

from __future__ import annotations

import datetime
import json
import os
import pickle
import shutil
import sys
import time

import pytest
import torch
import torch.distributed.checkpoint as dcp
from test_fsdp import (  # noqa: F401 - environment: test_fsdp's autouse fixture (corpus, cache, one thread)
    MOE,
    NGRAM,
    assert_same_run,
    environment,
    run_data,
    train_here,
    train_on_ranks,
)
from torch.distributed.checkpoint.api import CheckpointException

from embscale.base import rundir
from embscale.training.config import RunConfig
from embscale.training.sharded_checkpoint import (
    JsonMetadataWriter,
    fill_skeleton,
    metadata_from_json,
    metadata_to_json,
    split_tensors,
)
from embscale.training.trainer import Trainer, train_run

KILL_TIMEOUT_S = 20  # the process-group timeout of the killed run: a rank waiting on a dead one fails by then


# ----------------------------------------------------------------------------------------------------- the format
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_metadata_round_trips_through_json(tmp_path):
    """The JSON codec rebuilds exactly the Metadata that DCP's own writer pickles (read back here with pickle,
    the test's own file), for several dtypes and shapes; the JSON writer refuses a non-tensor item."""
    state = {"a": torch.randn(3, 5), "b": torch.arange(7), "c": torch.randn(2, 2).to(torch.bfloat16),
             "d": torch.tensor(4.0)}
    stock = tmp_path / "stock"
    dcp.save(state, storage_writer=dcp.FileSystemWriter(stock), no_dist=True)
    with open(stock / ".metadata", "rb") as handle:
        want = pickle.load(handle)
    have = metadata_from_json(metadata_to_json(want))
    assert have.state_dict_metadata == want.state_dict_metadata
    assert have.storage_data == want.storage_data
    assert have.planner_data == want.planner_data and have.version == want.version

    with pytest.raises(CheckpointException, match="not a tensor"):
        dcp.save({"x": torch.ones(2), "extra": {"step": 3}}, storage_writer=JsonMetadataWriter(tmp_path / "bad"),
                 no_dist=True)


def test_state_splits_into_tensors_and_a_json_skeleton():
    state = {"model": {"w": torch.ones(2)}, "optimizer": {"state": {"w": {"step": torch.tensor(3.0)}},
                                                          "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95),
                                                                            "foreach": None, "params": ["w"]}]}}
    tensors, skeleton = split_tensors(state)
    assert set(tensors) == {"model/w", "optimizer/state/w/step"}
    rebuilt = fill_skeleton(json.loads(json.dumps(skeleton)), tensors)
    assert rebuilt["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]  # the tuple stays a tuple
    assert rebuilt["model"]["w"] is tensors["model/w"]
    with pytest.raises(TypeError, match="only tensors and plain values"):
        split_tensors({"x": object()})


def test_a_sharded_checkpoint_counts_only_with_its_manifest_and_checksums(tmp_path):
    """rundir's part: commit writes the manifest last and renames the folder into place; a folder without a
    manifest, or a hidden one of a killed save, is never listed (and the latter is removed); a flipped byte or a
    truncated file is found (by whichever rank checks that file); pruning spans both formats."""
    rundir.save_checkpoint(tmp_path, 1, {"w": torch.ones(1)})
    for step in (2, 3):
        tmp = rundir.begin_sharded_checkpoint(tmp_path, step)
        for name in ("__0_0.distcp", "__1_0.distcp"):
            (tmp / name).write_bytes(bytes(range(256)) * step)
        files = {p.name: rundir.file_digest(p) for p in tmp.iterdir()}
        rundir.commit_sharded_checkpoint(tmp_path, step, tmp, files, {"world_size": 2}, keep=2)
    folder = rundir.checkpoint_dir(tmp_path)
    assert [(s, p.name) for s, p in rundir.list_checkpoints(tmp_path)] == [(2, "step_00000002"),
                                                                           (3, "step_00000003")]
    assert not (folder / "step_00000001.pt").exists()  # pruned across formats
    (folder / "step_00000004").mkdir()  # no manifest: not a checkpoint
    partial = rundir.begin_sharded_checkpoint(tmp_path, 5)
    (partial / "__0_0.distcp").write_bytes(b"half")
    assert [s for s, _ in rundir.list_checkpoints(tmp_path)] == [2, 3]
    rundir.remove_partial_writes(tmp_path)
    assert not partial.exists()

    newest = rundir.sharded_checkpoint_path(tmp_path, 3)
    assert rundir.verify_sharded_checkpoint(newest) == ""
    with pytest.raises(RuntimeError, match="differ"):  # a file nobody digested: no manifest is written
        tmp = rundir.begin_sharded_checkpoint(tmp_path, 6)
        (tmp / "stray").write_bytes(b"x")
        rundir.commit_sharded_checkpoint(tmp_path, 6, tmp, {}, {})
    data = bytearray((newest / "__1_0.distcp").read_bytes())
    data[10] ^= 0xFF
    (newest / "__1_0.distcp").write_bytes(bytes(data))
    assert rundir.verify_sharded_checkpoint(newest, part=0, parts=2) == ""  # rank 0 checks __0_0 only
    assert "checksum mismatch of __1_0.distcp" in rundir.verify_sharded_checkpoint(newest, part=1, parts=2)
    (newest / "__0_0.distcp").write_bytes(b"short")
    assert "truncated" in rundir.verify_sharded_checkpoint(newest, part=1, parts=2)  # sizes: every rank


# ----------------------------------------------------------------------------------------------------- resuming
def refuse(*_: object, **__: object) -> None:
    raise AssertionError("something was unpickled while resuming")


def guard_restore(patch: pytest.MonkeyPatch) -> dict[str, int]:
    """Make ``Trainer.restore`` run with ``pickle.load`` / ``loads`` / ``Unpickler`` and ``torch.load(weights_only=
    False)`` raising; returns the count of ``weights_only`` loads it made (filled as it runs). The loading itself is
    real: only the ways of unpickling are patched. (The process group's own object collectives, which DCP uses to
    exchange its plans between ranks in memory, bind pickle's unpickler at import and are not affected.)"""
    loads = {"weights_only": 0}
    original_restore, original_load = Trainer.restore, torch.load

    def guarded_load(*args: object, **kwargs: object) -> object:
        if kwargs.get("weights_only") is False:
            refuse()
        loads["weights_only"] += 1
        return original_load(*args, **kwargs)

    def guarded_restore(self: Trainer) -> None:
        with pytest.MonkeyPatch.context() as during:
            during.setattr(pickle, "load", refuse)
            during.setattr(pickle, "loads", refuse)
            during.setattr(pickle, "Unpickler", refuse)
            during.setattr(torch, "load", guarded_load)
            original_restore(self)

    patch.setattr(Trainer, "restore", guarded_restore)
    return loads


def test_sharded_checkpoint_resumes_in_one_process_without_unpickling(tmp_path, monkeypatch, capfd):
    """NE with the sparse table optimizer (its replicated state stored once) trained on two fsdp ranks. Its final
    checkpoint dropped and the one before (step 6) corrupted in rank 1's shard, the run resumes in one process
    from step 3 while pickle's loaders and ``torch.load(weights_only=False)`` raise, and ends where one process
    does."""
    data = run_data(tmp_path, NGRAM, parallel="fsdp", table_optimizer="sparse", steps=8, checkpoint_every=3,
                    eval_every=4, keep_checkpoints=3)
    reference = train_here(tmp_path, data)
    run_dir = train_on_ranks(tmp_path, data, "fsdp")
    checkpoints = rundir.list_checkpoints(run_dir)
    assert [s for s, _ in checkpoints] == [3, 6, 8] and all(p.is_dir() for _, p in checkpoints)
    saved = json.loads((checkpoints[-1][1] / "dcp_metadata.json").read_text())["tensors"]
    assert any(key.startswith("table_optimizer/state/") for key in saved)  # through DCP, stored once
    assert_same_run(run_dir, reference, steps=8)

    shutil.rmtree(checkpoints[-1][1])
    shard = checkpoints[1][1] / "__1_0.distcp"
    corrupt = bytearray(shard.read_bytes())
    corrupt[len(corrupt) // 2] ^= 0xFF
    shard.write_bytes(bytes(corrupt))
    rundir.write_status(run_dir, "interrupted", step=6, total_steps=8)
    loads = guard_restore(monkeypatch)
    monkeypatch.setenv("EMBSCALE_PROGRESS", "plain")
    capfd.readouterr()
    summary = train_run(RunConfig.from_dict({**data, "output": {"sweep": "f", "root": str(tmp_path / "fsdp")}}))
    err = capfd.readouterr().err
    assert summary["state"] == "completed"
    assert "checksum mismatch of __1_0.distcp" in err and "falling back to the previous one" in err
    assert f"resuming run {run_dir.name} from step 3" in err
    assert loads["weights_only"] >= 3  # the shards (DCP reads each item), the table optimizer, the RNG states
    assert (checkpoints[1][1].parent / "step_00000006.corrupt").is_dir()
    assert rundir.list_checkpoints(run_dir)[-1][1].name == "step_00000008.pt"  # one process: one file
    assert_same_run(run_dir, reference, steps=8)


def rank_with_timeout(rank: int, world_size: int, init_file: str, data: dict, timeout_s: float,
                      guarded: bool = False) -> None:
    """One rank of a run whose collectives time out after ``timeout_s``; exits 0 when the run completed, 1 when
    it raised (the error on stderr). ``guarded``: its restore runs with unpickling patched to fail."""
    if guarded:
        guard_restore(pytest.MonkeyPatch())
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size)})
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
    code = 1
    try:
        code = 0 if train_run(RunConfig.from_dict(data))["state"] == "completed" else 1
    except Exception as exc:  # noqa: BLE001 - the run failed: what the test looks for
        print(f"rank {rank} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # without the interpreter's shutdown (see test_fsdp.rank_main), and without waiting on a peer


def test_killing_one_rank_fails_the_run_and_a_resubmit_resumes_it(tmp_path, capfd, monkeypatch):
    """Two fsdp ranks; once the run has written its first checkpoint (step 4), rank 1 is killed (SIGKILL). Rank 0
    fails within the process group's timeout and marks the run failed; only complete checkpoints are listed (a
    hidden half-written folder and a folder without a manifest, put there as a save killed midway would leave
    them, are not). Training again on two ranks resumes from the last complete checkpoint (with unpickling patched
    to fail in both), removes the partial writes, and ends where one process does."""
    data = run_data(tmp_path, MOE, parallel="fsdp", steps=16, checkpoint_every=4, eval_every=8)
    reference = train_here(tmp_path, data)
    run_data_here = {**data, "output": {"sweep": "f", "root": str(tmp_path / "killed")}}
    run_dir = tmp_path / "killed" / "f" / RunConfig.from_dict(run_data_here).run_id
    context = torch.multiprocessing.spawn(rank_with_timeout, nprocs=2, join=False,
                                          args=(2, str(tmp_path / "init_killed"), run_data_here, KILL_TIMEOUT_S))
    rank0, rank1 = context.processes
    deadline = time.monotonic() + 120
    while not (rundir.list_checkpoints(run_dir) and (rundir.read_status(run_dir) or {}).get("step", 0) >= 4):
        assert rank0.is_alive() and rank1.is_alive(), "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.01)
    rank1.kill()
    killed_at = time.monotonic()
    rank0.join(timeout=KILL_TIMEOUT_S + 30)
    waited = time.monotonic() - killed_at
    if rank0.is_alive():
        rank0.kill()
        pytest.fail(f"rank 0 still runs {waited:.0f} s after rank 1 was killed")
    rank1.join(timeout=10)
    assert rank0.exitcode == 1, "rank 0 should fail once its peer is gone"
    assert "rank 0 failed" in capfd.readouterr().err
    status = rundir.read_status(run_dir)
    assert status["state"] == "failed" and status["error"], status
    assert 4 <= status["step"] < 16, status
    listed = rundir.list_checkpoints(run_dir)
    assert listed and all((path / rundir.MANIFEST_FILE).is_file() for _, path in listed)
    last_complete = listed[-1][0]

    folder = rundir.checkpoint_dir(run_dir)
    half = rundir.begin_sharded_checkpoint(run_dir, last_complete + 1)  # a save killed midway ...
    (half / "__0_0.distcp").write_bytes(b"half a shard")
    (folder / f"step_{last_complete + 2:08d}").mkdir()  # ... and a folder without its manifest
    assert [s for s, _ in rundir.list_checkpoints(run_dir)] == [s for s, _ in listed]

    capfd.readouterr()
    monkeypatch.setenv("EMBSCALE_PROGRESS", "plain")  # the ranks log the step they resume from
    again = torch.multiprocessing.spawn(rank_with_timeout, nprocs=2, join=False,
                                        args=(2, str(tmp_path / "init_again"), run_data_here, 120, True))
    for process in again.processes:
        process.join(timeout=180)
        if process.is_alive():
            process.kill()
    assert [process.exitcode for process in again.processes] == [0, 0], capfd.readouterr().err[-3000:]
    assert f"resuming run {run_dir.name} from step {last_complete}" in capfd.readouterr().err
    assert not half.exists()
    assert rundir.read_status(run_dir)["state"] == "completed"
    assert_same_run(run_dir, reference, steps=16)
    print(f"rank 0 failed {waited:.1f} s after rank 1 was killed at step {status['step']}")


def test_a_single_file_checkpoint_resumes_on_two_sharded_ranks(tmp_path, monkeypatch, capfd):
    """A run started in one process (``parallel: fsdp`` on one rank trains unsharded and writes single files)
    resumes on two sharded ranks from its step-3 file, each rank keeping its shard, and from then on writes sharded
    checkpoints; it ends where the uninterrupted one-process run did."""
    data = run_data(tmp_path, MOE, parallel="fsdp")
    run_dir = train_here(tmp_path, data)
    reference = tmp_path / "reference"
    shutil.copytree(run_dir, reference)
    assert [p.name for _, p in rundir.list_checkpoints(run_dir)] == ["step_00000003.pt", "step_00000006.pt"]
    final = rundir.list_checkpoints(run_dir)[-1][1]
    for path in final.parent.glob(final.name + "*"):
        path.unlink()
    rundir.write_status(run_dir, "interrupted", step=3, total_steps=6)
    monkeypatch.setenv("EMBSCALE_PROGRESS", "plain")
    capfd.readouterr()
    assert train_on_ranks(tmp_path, data, "single") == run_dir
    assert f"resuming run {run_dir.name} from step 3" in capfd.readouterr().err
    assert [p.name for _, p in rundir.list_checkpoints(run_dir)] == ["step_00000003.pt", "step_00000006"]
    assert_same_run(run_dir, reference, steps=6)
