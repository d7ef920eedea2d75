"""A value table sharded over the processes of a ``torch.distributed`` group, the way Meta's
memory layers shard theirs (``ColwiseEmbeddingBag``, DTensor ``Shard(1)`` over a
``memory_parallel`` mesh; docs/memory-layers.md), written with plain collectives so that
it runs on gloo (which has no ``all_to_all``) as on NCCL.

Each process holds every row of the table but only its slice of the value dim (columns
``column_bounds(v_dim, world)[rank]``), and its own share of the batch. A read:

1. all-gathers the indices and weights of every process's tokens (Meta all-gathers indices
   and scores);
2. sums its own columns of the rows they select, for every token of the group;
3. all-gathers those column slices and keeps its own tokens' full rows (Meta redistributes
   the output to the batch; an all-gather stands in for the all-to-all that gloo lacks).

Everything else of the layer (query network, sub-keys, top-k, projection, gate) is
replicated and runs on the process's own tokens (:func:`token_bounds`). A column's sum reads the same rows in the
same slot order as the unsharded table, so a sharded read equals the unsharded one (up to
the rounding of a vectorised kernel's tail on a narrower slice).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F


def column_bounds(v_dim: int, world: int) -> list[tuple[int, int]]:
    """The ``[start, stop)`` columns of each of ``world`` processes: contiguous, in rank
    order, sizes differing by at most one (a process may hold none when world > v_dim)."""
    base, extra = divmod(v_dim, world)
    bounds, start = [], 0
    for rank in range(world):
        stop = start + base + (rank < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


def token_bounds(tokens: int, world: int) -> list[tuple[int, int]]:
    """The ``[start, stop)`` tokens each process reads: the batch split like the columns.
    With fewer tokens than processes, every process reads all of them (the processes of a
    tensor-parallel group share one batch): a layer cannot read no token."""
    if tokens < world:
        return [(0, tokens)] * world
    return column_bounds(tokens, world)


def _all_gather_rows(t: torch.Tensor, sizes: list[int], group) -> list[torch.Tensor]:
    """Every process's ``t`` (its first dim ``sizes[rank]``), padded to the largest for the
    collective and trimmed back."""
    rows = max(sizes)
    padded = t.new_zeros((rows, *t.shape[1:]))
    padded[: t.shape[0]] = t
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded.contiguous(), group=group)
    return [o[:n] for o, n in zip(out, sizes, strict=True)]


class ColumnShardedValues(nn.Module):
    """This process's columns of a value table, called like the ``nn.EmbeddingBag`` it
    replaces: ``values(indices, per_sample_weights=weights)`` -> (bs, v_dim), for this
    process's (bs, n) ``indices`` and ``weights``. Collective: every process of ``group``
    must read at the same time (a layer's forward on every process).

    ``table``: the whole (size, v_dim) table; only this process's columns are kept
    (copied). ``columns``: those columns, already read (a large table read by columns from
    its file never has all its pages in this process); ``table`` then only gives the shape.
    ``bf16_sum``: the layer's ``value_dtype`` is bfloat16, so its read is Meta's
    (:func:`pkm_models.torch_pkm.bf16_weighted_sum`), as ``HashingMemory.read`` decides it
    (from the config, not from the table's type).
    """

    def __init__(self, table: torch.Tensor, group=None, columns: torch.Tensor | None = None, bf16_sum: bool = False):
        super().__init__()
        self.group, self.bf16_sum = group, bf16_sum
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.size, self.v_dim = table.shape
        self.bounds = column_bounds(self.v_dim, self.world)
        start, stop = self.bounds[self.rank]
        if columns is None:
            columns = table[:, start:stop].detach().clone()
        elif tuple(columns.shape) != (self.size, stop - start):
            raise ValueError(f"columns {start}:{stop} of a {tuple(table.shape)} table, got {tuple(columns.shape)}")
        self.weight = nn.Parameter(columns.to(table.dtype), requires_grad=False)

    def extra_repr(self) -> str:
        start, stop = self.bounds[self.rank]
        return f"{self.size}, columns [{start}, {stop}) of {self.v_dim}, rank {self.rank} of {self.world}"

    def forward(self, indices: torch.Tensor, per_sample_weights: torch.Tensor) -> torch.Tensor:
        from pkm_models.torch_pkm import bf16_weighted_sum

        n = indices.shape[-1]
        indices, weights = indices.reshape(-1, n), per_sample_weights.reshape(-1, n).float()
        mine = indices.shape[0]
        count = torch.tensor([mine], dtype=torch.int64, device=indices.device)
        counts = [torch.empty_like(count) for _ in range(self.world)]
        dist.all_gather(counts, count, group=self.group)
        sizes = [int(c.item()) for c in counts]

        # 1. every token's selection
        all_indices = torch.cat(_all_gather_rows(indices, sizes, self.group))  # (tokens,n)
        all_weights = torch.cat(_all_gather_rows(weights, sizes, self.group))  # (tokens,n)
        # 2. this process's columns of every token's read
        if self.weight.shape[1] == 0:  # more processes than columns: this one holds none
            part = all_weights.new_zeros((all_weights.shape[0], 0))
        elif self.bf16_sum:
            part = bf16_weighted_sum(self.weight, all_indices, all_weights)  # (tokens,cols)
        else:
            part = F.embedding_bag(all_indices, self.weight, per_sample_weights=all_weights, mode="sum")
        # 3. every process's columns, this process's tokens
        width = max(stop - start for start, stop in self.bounds)
        padded = part.new_zeros((part.shape[0], width))
        padded[:, : part.shape[1]] = part
        slices = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(slices, padded.contiguous(), group=self.group)
        full = torch.cat([s[:, : stop - start] for s, (start, stop) in zip(slices, self.bounds, strict=True)], dim=1)
        first = sum(sizes[: self.rank])
        return full[first : first + mine]  # (bs,v_dim)


def shard_values(model: nn.Module, group=None, read_columns=None) -> nn.Module:
    """Replace the value table of every ``HashingMemory`` in ``model`` by this process's
    :class:`ColumnShardedValues` (a table shared by several layers stays one shard, shared).
    ``read_columns(name, start, stop)``, when given, returns the columns of the table whose
    ``state_dict`` name is ``name`` (``values.weight``, ``layers.0.values.weight``) instead
    of their being sliced from the model's. Returns ``model``; call it on every process of
    ``group`` with the same model."""
    from pkm_models.torch_pkm import HashingMemory

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    sharded: dict[int, ColumnShardedValues] = {}
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, HashingMemory)]:
        table = layer.values
        if id(table) not in sharded:
            columns = None
            if read_columns is not None:
                start, stop = column_bounds(table.weight.shape[1], world)[rank]
                columns = torch.as_tensor(read_columns(f"{name}.values.weight".lstrip("."), start, stop))
            bf16_sum = layer.config.value_dtype == "bfloat16"
            sharded[id(table)] = ColumnShardedValues(table.weight, group, columns, bf16_sum=bf16_sum)
        layer.values = sharded[id(table)]
    return model


def build_sharded_model(config, layers: int, weights, read_columns, group=None) -> nn.Module:
    """The reference of ``config`` (one ``HashingMemory``, or a ``PKMStack`` of ``layers``)
    with ``weights`` (torch-named numpy arrays, shared where the dtype allows, as
    :func:`pkm_models.torch_pkm.build_torch_model` does), every value table replaced by this
    process's :class:`ColumnShardedValues` read by ``read_columns(name, start, stop)``. A
    table itself is never built, read or converted here (it stays on the meta device until
    replaced): a process of a sharded model holds its columns and nothing more of it, a
    bfloat16 or shared table included. Table entries in ``weights`` are not read."""
    from pkm_models.convert import numpy_to_state_dict
    from pkm_models.torch_pkm import HashingMemory, PKMStack

    with torch.device("meta"):
        model = HashingMemory(**config.to_dict()) if layers == 1 else PKMStack(config, layers)
    reference = {k: v for k, v in model.state_dict().items() if not k.endswith("values.weight")}
    rest = {k: v for k, v in weights.items() if not k.endswith("values.weight")}
    model.load_state_dict(numpy_to_state_dict(rest, reference), strict=False, assign=True)
    return shard_values(model, group, read_columns)
