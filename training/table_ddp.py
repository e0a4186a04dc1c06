"""N-gram tables with row-sparse gradients under DDP (``training.table_optimizer`` ``dense`` / ``sparse``).

Such a table never gets a ``.grad`` (its gradient goes to ``weight.sparse_grads``). Left in DDP's reducer,
it would count as a zero gradient: every step DDP all-reduces a table-sized buffer of zeros and writes it to
``.grad`` (a dense gradient the size of the table, which the table optimizer then also walks; seen with torch
2.13 on gloo). :func:`exclude_from_ddp` removes the tables from the reducer before wrapping. The trainer then
calls :func:`all_reduce_table_grads` once per optimizer step, after the last micro-batch's backward and before
clipping, so the clipping norm and every rank's ``TableAdamW`` step see the gradient of the whole global batch,
identical on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from embscale.kernels.ngram import PAD_ROW, SparseRowGrad, merge_sparse_grads
from embscale.kernels.table_optim import merge_row_grads

NO_GRADIENT = -1  # a rank's row count for a table without pending gradients (as opposed to zero rows)


def exclude_from_ddp(model: torch.nn.Module, tables: Sequence[torch.Tensor]) -> list[str]:
    """Mark ``tables`` as ignored by the ``DistributedDataParallel`` that will wrap ``model`` (call before
    wrapping); returns the ignored names.

    DDP matches ignored parameters by qualified name and looks a shared parameter up under each module that
    holds it, so every name of a table is listed, duplicates included."""
    table_ids = {id(t) for t in tables}
    names = [name for name, param in model.named_parameters(remove_duplicate=False) if id(param) in table_ids]
    already = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    ignored = already + [n for n in names if n not in already]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
    return ignored


def _pending_grad(table: torch.Tensor) -> SparseRowGrad | None:
    pending = getattr(table, "sparse_grads", None)
    return merge_row_grads(list(pending)) if pending else None


def all_reduce_table_grads(tables: Sequence[torch.Tensor], group: dist.ProcessGroup | None = None) -> None:
    """Replace each table's ``sparse_grads`` list by one ``SparseRowGrad``: the mean over the ranks of
    ``group`` of their merged local gradients, bit-identical on every rank (the same inputs in rank order,
    re-reduced by the deterministic :func:`embscale.kernels.ngram.merge_sparse_grads`), so every rank's table
    optimizer takes the same step. The mean matches DDP's averaging of the dense gradients: with the loss
    divided by the micro-batches per rank, it equals one process's gradient of the same global batch. Rows
    touched on any rank are present (possibly with a zero sum), as one process would see them.

    Works on gloo and NCCL (``all_gather`` of equal-sized tensors only). Collectives per call: one
    ``all_gather`` of the row counts of all tables (``8 * len(tables)`` bytes a rank), then per table whose
    gradient any rank holds two: rows and values, each rank's ``U`` distinct rows padded to the largest ``U``
    over the ranks. Bytes sent per rank per step: ``8 * len(tables) + sum over tables of max_U * (8 + 4 * d)``
    (``d`` the table width), received: ``world_size`` times that. One host read per call (the counts);
    peak extra memory per table ``world_size * max_U * (8 + 4 * d)`` bytes, twice over for the merge.
    """
    if not tables:
        return
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    local = [_pending_grad(table) for table in tables]
    device = tables[0].device
    # U = the merged gradient's real rows (they come first); one exchange for every table's count
    counts = torch.stack([(g.rows != PAD_ROW).sum() if g is not None
                          else torch.tensor(NO_GRADIENT, device=device) for g in local]).to(device, torch.int64)
    gathered_counts = [torch.empty_like(counts) for _ in range(world_size)]
    dist.all_gather(gathered_counts, counts, group=group)
    counts_by_rank = torch.stack(gathered_counts).cpu().tolist()  # the host read: [rank][table]

    for index, (table, grad) in enumerate(zip(tables, local, strict=True)):
        table_counts = [counts_by_rank[rank][index] for rank in range(world_size)]
        if all(count == NO_GRADIENT for count in table_counts):
            continue  # no rank has a gradient: leave the table without one, as a single process would
        width = table.shape[1]
        largest = max(max(table_counts), 0)
        own = max(table_counts[rank], 0)
        rows = torch.full((largest,), PAD_ROW, dtype=torch.int64, device=table.device)
        values = torch.zeros(largest, width, dtype=torch.float32, device=table.device)
        if grad is not None and own:
            rows[:own] = grad.rows[:own]
            values[:own] = grad.values[:own]
        if largest:  # padding up to the largest count: all_gather needs equal sizes on every rank
            all_rows = [torch.empty_like(rows) for _ in range(world_size)]
            all_values = [torch.empty_like(values) for _ in range(world_size)]
            dist.all_gather(all_rows, rows, group=group)
            dist.all_gather(all_values, values, group=group)
            summed = merge_sparse_grads([SparseRowGrad(r, v) for r, v in zip(all_rows, all_values, strict=True)])
            reduced = SparseRowGrad(rows=summed.rows, values=summed.values / world_size)
        else:  # some rank had a gradient, every one of them empty
            reduced = SparseRowGrad(rows=rows, values=values)
        pending = getattr(table, "sparse_grads", None)
        if pending is None:
            table.sparse_grads = [reduced]
        else:
            pending[:] = [reduced]  # in place: the model's backward appends to this same list


__all__ = ["all_reduce_table_grads", "exclude_from_ddp"]
