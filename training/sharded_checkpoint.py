"""Sharded checkpoints of a sharded run (``training.parallel`` ``fsdp`` / ``hsdp`` on several ranks), written and
read with ``torch.distributed.checkpoint`` (DCP): every rank writes its own shards, no rank gathers a whole
tensor, a checkpoint saved at one number of ranks resumes at another (DCP reshards), and nothing is unpickled.

A checkpoint is the folder ``checkpoints/step_<8 digits>/`` of the run (its commit, checksums, listing, fallback
and pruning are :mod:`embscale.base.rundir`'s)::

    __<r>_0.distcp      rank r's shards of the model, AdamW and table optimizer states (DCP's data files, written by its
                        ``FileSystemWriter``: each tensor item ``torch.save``-d one after another, read back one
                        item at a time with ``torch.load(weights_only=True)``)
    dcp_metadata.json   DCP's ``Metadata`` as JSON, in place of DCP's pickled ``.metadata``: every tensor's global
                        size, dtype and chunks (offsets, sizes), and where each chunk lies (file, offset, length)
    trainer.json        rank 0: step, run id, data position, loss EMA, wall time, the ranks that wrote it, and the
                        ``skeleton`` of the model and optimizer state dicts: every non-tensor value (AdamW's
                        ``param_groups``: learning rate, betas, ...; the parameters by name), each tensor a
                        ``{"__tensor__": key}`` marker naming its DCP item
    rng_rank<r>.pt      rank r's RNG states (python, numpy, torch, CUDA); ``weights_only`` loadable
    manifest.json       written last by rank 0: ``format``, ``step``, ``world_size`` and every other file's bytes
                        and sha256 (each rank digests the files it wrote)

Only tensors go through DCP: the model and AdamW state dicts come from
``torch.distributed.checkpoint.state_dict.get_model_state_dict`` / ``get_optimizer_state_dict`` (FSDP2's DTensors,
the optimizer state keyed by parameter name) and the table optimizer's ``state_dict()`` (keyed by parameter
number), their tensors flattened into one dict keyed ``model/<name>``, ``optimizer/state/<name>/<key>`` and
``table_optimizer/state/<number>/<key>``. N-gram tables sharded by rows (``training.table_sharding: rows``) and
their per-row optimizer states go in as DTensors of the whole table, rows sharded over the mesh's shard dimension
(:func:`embscale.training.table_shard.as_row_dtensor`): each row range is written once, by its owner, and loads
into whatever rows each rank owns at resume. Tables replicated on every rank are written once (DCP keeps one copy
of a replicated tensor). So DCP never writes a pickled object (its ``BYTE_IO`` items), and
:class:`JsonMetadataReader` refuses any. Loading builds the same dicts from the model being resumed (its own
sharding), lets DCP fill them in place, puts the skeleton's non-tensor values back, and hands them to
``set_model_state_dict`` / ``set_optimizer_state_dict``. A resumed rank takes its own RNG file, or rank 0's when the
checkpoint was written by fewer ranks.

:func:`restore_latest` resumes a run from its newest intact checkpoint of either format (the single file of one
process or DDP, :mod:`embscale.training.checkpoint`, or this folder); the ranks each check a share of the folder's
checksums and agree, and one that any rank finds corrupt is set aside for the one before. A rank that dies during
a save leaves only the hidden folder (no manifest: never loaded, removed on resume); the surviving ranks fail at
their next collective (or at the process group's timeout), and rank 0 marks the run ``failed``.

:func:`read_sharded_checkpoint` reads such a checkpoint in one process into the single-file layout of
:mod:`embscale.training.checkpoint` (full tensors; optimizer state keyed by parameter number), for inspection or to
compare runs. DCP itself still exchanges its load and save plans between the ranks with ``torch.distributed``'s
object collectives (pickled in memory, between the ranks of one job); those plans are built from the JSON above,
never read from a file.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, WriteItemType

from embscale.base import rundir
from embscale.base.files import fsync_path
from embscale.training.checkpoint import capture_rng, restore_payload, restore_rng

if TYPE_CHECKING:
    from embscale.training.distributed import Distributed

METADATA_FILE = "dcp_metadata.json"
TRAINER_FILE = "trainer.json"
TENSOR = "__tensor__"  # a skeleton's marker of a tensor stored by DCP under the key it names
TUPLE = "__tuple__"  # a skeleton's tuple (JSON has only lists)


def rng_file(rank: int) -> str:
    return f"rng_rank{rank:05d}.pt"


# ------------------------------------------------------------------------------------------- DCP metadata as JSON
def _torch_attr(name: str, kind: type) -> Any:
    """``torch.<name>``, which must be a ``kind`` (a dtype, layout or memory format): no other name is accepted."""
    value = getattr(torch, str(name), None)
    if not isinstance(value, kind):
        raise ValueError(f"{name!r} is not a torch {kind.__name__}")
    return value


def _torch_name(value: Any) -> str:
    return str(value).removeprefix("torch.")


def metadata_to_json(metadata: Metadata) -> dict[str, Any]:
    """DCP's ``Metadata`` as plain JSON types (only tensor items; a bytes item is refused)."""
    tensors = {}
    for fqn, item in metadata.state_dict_metadata.items():
        if not isinstance(item, TensorStorageMetadata):
            raise TypeError(f"checkpoint item {fqn!r} is not a tensor; only tensors are written through DCP")
        props = item.properties
        tensors[fqn] = {"size": list(item.size), "dtype": _torch_name(props.dtype), "layout": _torch_name(props.layout),
                        "requires_grad": bool(props.requires_grad),
                        "memory_format": _torch_name(props.memory_format), "pin_memory": bool(props.pin_memory),
                        "chunks": [{"offsets": list(c.offsets), "sizes": list(c.sizes)} for c in item.chunks]}
    storage = []
    for index, info in (metadata.storage_data or {}).items():
        storage.append({"fqn": index.fqn, "offset": None if index.offset is None else list(index.offset),
                        "index": index.index, "file": info.relative_path, "file_offset": int(info.offset),
                        "length": int(info.length),
                        "transforms": None if info.transform_descriptors is None else list(info.transform_descriptors)})
    planner = metadata.planner_data
    meta = metadata.storage_meta
    return {"version": metadata.version, "tensors": tensors, "storage": storage,
            "planner_data": ({k: list(v) for k, v in planner.items()} if isinstance(planner, dict) else None),
            "save_id": meta.save_id if meta else None, "modules": list(meta.modules) if meta else []}


def metadata_from_json(data: dict[str, Any]) -> Metadata:
    """The ``Metadata`` that :func:`metadata_to_json` wrote (ValueError / KeyError / TypeError on malformed)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    tensors = {}
    for fqn, item in data["tensors"].items():
        props = TensorProperties(dtype=_torch_attr(item["dtype"], torch.dtype),
                                 layout=_torch_attr(item["layout"], torch.layout),
                                 requires_grad=bool(item["requires_grad"]),
                                 memory_format=_torch_attr(item["memory_format"], torch.memory_format),
                                 pin_memory=bool(item["pin_memory"]))
        chunks = [ChunkStorageMetadata(offsets=torch.Size(c["offsets"]), sizes=torch.Size(c["sizes"]))
                  for c in item["chunks"]]
        tensors[str(fqn)] = TensorStorageMetadata(properties=props, size=torch.Size(item["size"]), chunks=chunks)
    storage = {}
    for entry in data["storage"]:
        index = MetadataIndex(str(entry["fqn"]), entry["offset"], entry["index"])
        transforms = entry["transforms"]
        storage[index] = _StorageInfo(str(entry["file"]), int(entry["file_offset"]), int(entry["length"]),
                                      transform_descriptors=None if transforms is None else list(transforms))
    planner = data.get("planner_data")
    return Metadata(state_dict_metadata=tensors, storage_data=storage,
                    planner_data={k: tuple(v) for k, v in planner.items()} if isinstance(planner, dict) else None,
                    storage_meta=StorageMeta(save_id=data.get("save_id"), modules=list(data.get("modules") or [])),
                    version=data.get("version"))


class JsonMetadataWriter(FileSystemWriter):
    """DCP's file-system writer (one data file per rank, flushed to disk) that writes the checkpoint's metadata as
    JSON (``dcp_metadata.json``) instead of pickling it, and refuses a non-tensor item (DCP would pickle it)."""

    def prepare_local_plan(self, plan: Any) -> Any:
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                raise TypeError(f"checkpoint item {item.index.fqn!r} is not a tensor; only tensors are written "
                                "through DCP (it would be pickled)")
        return super().prepare_local_plan(plan)

    def finish(self, metadata: Metadata, results: list[list[Any]]) -> None:
        from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION

        metadata.version = CURRENT_DCP_VERSION
        metadata.storage_data = {result.index: result.storage_data for batch in results for result in batch}
        metadata.storage_meta = self.storage_meta()
        path = Path(self.path) / METADATA_FILE
        path.write_text(json.dumps(metadata_to_json(metadata), indent=1) + "\n")
        fsync_path(path)


class JsonMetadataReader(FileSystemReader):
    """DCP's file-system reader of a :class:`JsonMetadataWriter` checkpoint: the metadata is parsed from JSON, the
    tensors are read by DCP with ``torch.load(weights_only=True)``, and a bytes (pickled object) item is refused."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = metadata_from_json(json.loads((Path(self.path) / METADATA_FILE).read_text()))
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: Any, planner: Any) -> Any:
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                raise ValueError(f"checkpoint {self.path} holds a non-tensor item {item.dest_index.fqn!r}; "
                                 "it would have to be unpickled, which is refused")
        return super().read_data(plan, planner)


# ------------------------------------------------------------------------------------------- tensors and skeleton
def split_tensors(value: Any, path: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """``(tensors, skeleton)`` of a nested state (dicts with string keys, lists, tuples, numbers, strings, None,
    tensors): ``tensors`` maps a ``/``-joined path to each tensor; ``skeleton`` is ``value`` as JSON with each
    tensor replaced by ``{"__tensor__": path}`` and each tuple by ``{"__tuple__": [...]}``."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(item: Any, key: str) -> Any:
        if isinstance(item, torch.Tensor):
            tensors[key] = item
            return {TENSOR: key}
        if isinstance(item, dict):
            out = {}
            for name, sub in item.items():
                if not isinstance(name, str):
                    raise TypeError(f"state key {name!r} under {key or 'the root'} is not a string")
                out[name] = walk(sub, f"{key}/{name}" if key else name)
            return out
        if isinstance(item, list | tuple):
            items = [walk(sub, f"{key}/{i}") for i, sub in enumerate(item)]
            return {TUPLE: items} if isinstance(item, tuple) else items
        if item is None or isinstance(item, bool | int | float | str):
            return item
        raise TypeError(f"state value at {key} is a {type(item).__name__}; only tensors and plain values are saved")

    return tensors, walk(value, path)


def fill_skeleton(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The nested state of :func:`split_tensors`' ``skeleton``, each tensor marker replaced from ``tensors``."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {TENSOR}:
            return tensors[skeleton[TENSOR]]
        if set(skeleton) == {TUPLE}:
            return tuple(fill_skeleton(v, tensors) for v in skeleton[TUPLE])
        return {k: fill_skeleton(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [fill_skeleton(v, tensors) for v in skeleton]
    return skeleton


def _tensor_keys(skeleton: Any) -> set[str]:
    if isinstance(skeleton, dict):
        if set(skeleton) == {TENSOR}:
            return {skeleton[TENSOR]}
        return set().union(*(_tensor_keys(v) for v in skeleton.values()))
    if isinstance(skeleton, list):
        return set().union(*(_tensor_keys(v) for v in skeleton))
    return set()


def _model_and_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``{"model": ..., "optimizer": ...}``: DCP's state dicts of the (sharded) model and AdamW (sharded tensors
    as DTensors, optimizer state keyed by parameter name; row-sharded N-gram tables as row DTensors). On a fresh
    optimizer DCP first creates its state (a step with zero gradients and learning rate 0, which changes no
    parameter), so there are tensors to load into."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    from embscale.training.table_shard import as_row_dtensor, row_sharded_tables

    model_state = get_model_state_dict(model)
    for name, table in row_sharded_tables(model).items():
        key = f"{name}.weight"
        if key in model_state:
            model_state[key] = as_row_dtensor(model_state[key], table)
    return {"model": model_state, "optimizer": get_optimizer_state_dict(model, optimizer)}


def _table_optimizer_state(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, Any]:
    """The table optimizer's ``state_dict()`` with string keys (its parameter numbers), the per-row states of
    row-sharded tables as row DTensors (:func:`embscale.training.table_shard.as_row_dtensor`)."""
    from embscale.training.table_shard import ROW_STATE_KEYS, as_row_dtensor, tables_by_optimizer_index

    state = optimizer.state_dict()
    tables = tables_by_optimizer_index(optimizer, model)
    entries = {}
    for index, entry in state["state"].items():
        table = tables.get(index)
        entries[str(index)] = {key: as_row_dtensor(value, table) if table is not None and key in ROW_STATE_KEYS
                               else value for key, value in entry.items()}
    return {"state": entries, "param_groups": state["param_groups"]}


def _table_optimizer_targets(skeleton: dict[str, Any], metadata: dict[str, Any], optimizer: torch.optim.Optimizer,
                             model: torch.nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
    """Tensors to load the saved table optimizer state into, keyed as :func:`split_tensors` keys them under
    ``table_optimizer``: this rank's rows (a row DTensor) of a row-sharded table's per-row state, the whole
    tensor otherwise (sizes and dtypes from the checkpoint's metadata)."""
    from embscale.training.table_shard import ROW_STATE_KEYS, local_rows, tables_by_optimizer_index

    tables = tables_by_optimizer_index(optimizer, model)
    targets: dict[str, torch.Tensor] = {}
    for key in _tensor_keys(skeleton):
        item = metadata["tensors"].get(key)
        if item is None:
            continue  # reported as missing by the caller
        _, _, index, name = key.split("/", 3)
        size, dtype = item["size"], _torch_attr(item["dtype"], torch.dtype)
        table = tables.get(int(index))
        if table is not None and name in ROW_STATE_KEYS:
            targets[key] = local_rows(table, size, dtype, device)
        else:
            targets[key] = torch.empty(size, dtype=dtype, device=device)
    return targets


def _load_table_optimizer(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Put a loaded ``table_optimizer`` state (string keys, row DTensors) into the table optimizer."""
    from torch.distributed.tensor import DTensor

    entries = {int(index): {key: value.to_local() if isinstance(value, DTensor) else value
                            for key, value in entry.items()} for index, entry in state["state"].items()}
    optimizer.load_state_dict({"state": entries, "param_groups": state["param_groups"]})


def _write_torch(path: Path, value: Any) -> None:
    """``torch.save`` of tensors and plain values (``weights_only`` loadable), flushed to disk."""
    torch.save(value, path)
    fsync_path(path)


# ------------------------------------------------------------------------------------------- save and load
@contextlib.contextmanager
def _one_process_is_fine() -> Iterator[None]:
    """Silence DCP's warning that it loads in a single process (no process group): that is meant here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        yield


def save_sharded_checkpoint(run_dir: Path, step: int, model: torch.nn.Module,
                            optimizers: list[torch.optim.Optimizer], trainer_state: dict[str, Any],
                            device: torch.device, dist: Distributed, keep: int = 2) -> Path | None:
    """Write the sharded checkpoint of ``step``; every rank calls it (collectives). ``trainer_state``: rank 0's
    plain-JSON values (run id, data position, loss EMA, wall time). ``dist``:
    :class:`~embscale.training.distributed.Distributed`. Returns the committed folder on rank 0, None elsewhere.

    Every rank writes into the hidden folder that rank 0 made, digests the files it wrote and leaves their
    digests there; once all have (a barrier), rank 0 writes the manifest and renames the folder into place. A
    rank that dies midway leaves only the hidden folder, which never loads and is removed on resume."""
    rank = dist.rank
    tmp = rundir.sharded_checkpoint_tmp(run_dir, step)
    if dist.is_main:
        rundir.begin_sharded_checkpoint(run_dir, step)
    dist.barrier()
    mine = [rng_file(rank)]
    _write_torch(tmp / rng_file(rank), capture_rng(device))
    state = _model_and_optimizer_state(model, optimizers[0])
    if len(optimizers) > 1:
        state["table_optimizer"] = _table_optimizer_state(optimizers[1], model)
    tensors, skeleton = split_tensors(state)
    if dist.is_main:
        record = {**trainer_state, "step": step, "world_size": dist.world_size, "skeleton": skeleton}
        (tmp / TRAINER_FILE).write_text(json.dumps(record, indent=1) + "\n")
        fsync_path(tmp / TRAINER_FILE)
        mine.append(TRAINER_FILE)
    dcp.save(tensors, storage_writer=JsonMetadataWriter(tmp, sync_files=True))
    # DCP's data files are named by the rank's place in the plan (its rank); rank 0 also wrote the metadata
    mine += [p.name for p in tmp.glob(f"__{rank}_*")]
    if dist.is_main:
        mine.append(METADATA_FILE)
    digests = {name: rundir.file_digest(tmp / name) for name in mine}
    (tmp / f".digests_rank{rank:05d}.json").write_text(json.dumps(digests))
    dist.barrier()
    if not dist.is_main:
        return None
    parts = sorted(tmp.glob(".digests_rank*.json"))
    if len(parts) != dist.world_size:
        raise RuntimeError(f"sharded checkpoint {tmp}: {len(parts)} of {dist.world_size} ranks digested their files")
    files: dict[str, dict[str, Any]] = {}
    for part in parts:
        files.update(json.loads(part.read_text()))
        part.unlink()
    return rundir.commit_sharded_checkpoint(run_dir, step, tmp, files, {"world_size": dist.world_size},
                                            keep=keep)


def load_sharded_checkpoint(path: Path, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer],
                            device: torch.device, rank: int) -> dict[str, Any]:
    """Put the sharded checkpoint in folder ``path`` back into ``model`` (sharded or not, on any number of ranks)
    and its optimizers, and this rank's RNG states; returns rank 0's ``trainer.json`` record (step, data position,
    loss EMA, wall time). Every rank calls it (DCP's load is collective). Nothing is unpickled."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    record = json.loads((path / TRAINER_FILE).read_text())
    skeleton = record["skeleton"]
    metadata = json.loads((path / METADATA_FILE).read_text())
    saved_keys = set(metadata["tensors"])
    if ("table_optimizer" in skeleton) != (len(optimizers) > 1):
        raise RuntimeError(f"checkpoint {path} does not fit this run: it was "
                           f"{'' if 'table_optimizer' in skeleton else 'not '}saved with a table optimizer")
    current = _model_and_optimizer_state(model, optimizers[0])
    # AdamW keeps state only for parameters that had a gradient: drop what the fresh state has beyond the saved
    saved_optimizer_state = skeleton["optimizer"].get("state", {})
    current["optimizer"]["state"] = {name: value for name, value in current["optimizer"]["state"].items()
                                     if name in saved_optimizer_state}
    targets, _ = split_tensors(current)
    if len(optimizers) > 1:
        targets.update(_table_optimizer_targets(skeleton["table_optimizer"], metadata, optimizers[1], model, device))
    wanted = _tensor_keys(skeleton)
    if wanted != set(targets) or not wanted <= saved_keys:
        missing = sorted((wanted ^ set(targets)) | (wanted - saved_keys))
        raise RuntimeError(f"checkpoint {path} does not fit this model: {len(missing)} tensors differ, e.g. "
                           f"{missing[:5]}")
    with _one_process_is_fine():
        dcp.load(targets, storage_reader=JsonMetadataReader(path))
    state = fill_skeleton(skeleton, targets)
    from torch.distributed.tensor import DTensor

    from embscale.training.table_shard import row_sharded_tables

    for name in row_sharded_tables(model):  # plain parameters holding this rank's rows (filled in place)
        key = f"{name}.weight"
        if isinstance(state["model"].get(key), DTensor):
            state["model"][key] = state["model"][key].to_local()
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizers[0], state["optimizer"])
    if len(optimizers) > 1:
        _load_table_optimizer(optimizers[1], state["table_optimizer"])
    own = path / rng_file(rank)
    restore_rng(torch.load(own if own.is_file() else path / rng_file(0), weights_only=True), device)
    return record


def restore_latest(run_dir: Path, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer],
                   device: torch.device, dist: Distributed, sharded: bool = False) -> tuple[int, dict[str, Any]] | None:
    """Resume from the newest intact checkpoint of the run (either format): ``(step, state)`` with ``state``'s
    ``data``, ``loss_ema`` and ``wall_s``, or None when there is none. Every rank calls it (``dist``:
    :class:`~embscale.training.distributed.Distributed`), after rank 0 removed partial writes.

    Newest first, each rank checks its share of a checkpoint (a single file: all of it; a sharded one: every
    ``world_size``-th file's sha256, and every file's size), then the ranks agree; one that any rank finds
    unusable is set aside by rank 0 (``*.corrupt``) and the one before is tried."""
    dist.barrier()  # rank 0's clean-up of partial writes is done: every rank lists the same checkpoints
    for step, path in reversed(rundir.list_checkpoints(run_dir)):
        payload = None
        if path.is_dir():
            problem = rundir.verify_sharded_checkpoint(path, dist.rank, dist.world_size)
        else:
            payload, problem = rundir.read_checkpoint_file(path, map_location=device)
        unusable = torch.tensor([float(bool(problem))], device=device)
        if dist.sum_(unusable).item() > 0:
            if dist.is_main:
                rundir.set_aside_corrupt(path, problem or "another rank found it corrupt")
            dist.barrier()
            continue
        if payload is None:
            return step, load_sharded_checkpoint(path, model, optimizers, device, dist.rank)
        restore_payload(payload, model, optimizers, device, sharded=sharded)
        return step, payload
    return None


def read_sharded_checkpoint(path: Path) -> dict[str, Any]:
    """The sharded checkpoint in folder ``path`` read in one process (no process group) into the single-file
    layout of :func:`embscale.training.checkpoint.checkpoint_payload`: ``step``, ``run_id``, ``model`` (full
    tensors), ``optimizer`` (state keyed by parameter number, ``param_groups`` with numbers, as
    ``optimizer.state_dict()``), ``table_optimizer`` where there is one, ``data``, ``rng`` (rank 0's),
    ``loss_ema``, ``wall_s``. Nothing is unpickled."""
    path = Path(path)
    record = json.loads((path / TRAINER_FILE).read_text())
    metadata = metadata_from_json(json.loads((path / METADATA_FILE).read_text()))
    tensors = {key: torch.empty(item.size, dtype=item.properties.dtype)
               for key, item in metadata.state_dict_metadata.items()}
    with _one_process_is_fine():
        dcp.load(tensors, storage_reader=JsonMetadataReader(path), no_dist=True)
    state = fill_skeleton(record["skeleton"], tensors)
    optimizer = state["optimizer"]
    number = {name: i for i, name in enumerate(n for group in optimizer["param_groups"] for n in group["params"])}
    payload = {
        "step": record["step"], "run_id": record.get("run_id"), "model": state["model"],
        "optimizer": {"state": {number[name]: value for name, value in optimizer["state"].items()},
                      "param_groups": [{**group, "params": [number[n] for n in group["params"]]}
                                       for group in optimizer["param_groups"]]},
        "data": record.get("data"), "rng": torch.load(path / rng_file(0), weights_only=True),
        "loss_ema": record.get("loss_ema"), "wall_s": record.get("wall_s"),
    }
    if "table_optimizer" in state:
        table = state["table_optimizer"]
        payload["table_optimizer"] = {"state": {int(i): entry for i, entry in table["state"].items()},
                                      "param_groups": table["param_groups"]}
    return payload


__all__ = ["JsonMetadataReader", "JsonMetadataWriter", "fill_skeleton", "load_sharded_checkpoint",
           "metadata_from_json", "metadata_to_json", "read_sharded_checkpoint",
           "restore_latest", "rng_file", "save_sharded_checkpoint", "split_tensors"]
