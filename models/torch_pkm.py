"""The PyTorch reference: XLM's ``HashingMemory`` from the PKM-layer notebook.

Kept recognisably the notebook's code: the same arguments (with the notebook's ``params``
object replaced by keyword arguments, as the seed port did), the same per-head
``_get_indices``, the same ``nn.EmbeddingBag`` weighted sum. Shape arithmetic uses
``size()`` and ``math.prod`` where the notebook used ``len()`` and ``np.prod``, so that the
exporters keep batch and sequence dynamic; a wrong-sized input raises ``ValueError``
instead of failing an assert. Two additions, neither of which changes the default output:

* ``forward(input, return_taps=True)`` also returns the conformance taps
  (``query``, ``scores``, ``indices``, ``weights``, ``output``);
* keys and values are initialised from :func:`pkm_models.weights.make_weights` by
  :meth:`HashingMemory.from_config` (the notebook seeds sub-keys per head with
  ``RandomState(2 * head + half)``; here every tensor comes from one seed).

Options of Meta's memory layers (``lingua/product_key/memory.py`` of facebookresearch/memory;
docs/memory-layers.md), all off by default:

* ``value_dim``, ``swilu_projection``: ``value_proj(read * silu(swilu_projection(input)))``
  (or ``value_proj(read)`` with an own value dim and no SwiLU), both ``nn.Linear`` with bias;
* ``gated``: ``sigmoid(gating(input)) * out``;
* ``value_dtype="bfloat16"``: the table is a bf16 parameter; the weighted sum accumulates
  weight x row in float32 in slot order and rounds once to bf16, as Meta's Triton kernel
  does (:func:`bf16_weighted_sum`), then continues in float32;
* ``share_values``: a :class:`PKMStack` whose layers all read layer 0's table.

The ``output`` tap stays the weighted sum of value rows, (..., v_dim); a layer that
projects or gates also returns its final output as ``layer_output``, (..., output_dim).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pkm_models.config import LAYER_OUTPUT, PKMConfig, check_stackable
from pkm_models.stack import call_module, stack_forward
from pkm_models.weights import make_weights


class HashingMemory(nn.Module):
    """Product-key memory layer (Lample et al. 2019), as in XLM's notebook.

    Args:
        input_dim: size of the input's last dimension.
        output_dim: size of a value row (``v_dim``), and of the output's last dimension.
        k_dim: query and key size; each half is matched against its own sub-keys.
        heads: number of memory heads; their reads are summed.
        knn: value rows read per head.
        n_keys: sub-keys per half; the memory holds ``n_keys ** 2`` value rows.
        query_batchnorm: apply ``BatchNorm1d`` to the projected queries.
        input_dropout, query_dropout, value_dropout: dropout rates (training only).

    Input shape: ``(..., input_dim)``. Output shape: ``(..., output_dim)``.
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        k_dim: int = 256,
        heads: int = 4,
        knn: int = 32,
        n_keys: int = 512,
        query_batchnorm: bool = False,
        input_dropout: float = 0.0,
        query_dropout: float = 0.0,
        value_dropout: float = 0.0,
        value_dim: int = 0,
        swilu_projection: bool = False,
        gated: bool = False,
        value_dtype: str = "float32",
        share_values: bool = False,
    ):
        super().__init__()
        # validated once, in one place, with the project's error messages
        self.config = PKMConfig(
            input_dim=input_dim,
            output_dim=output_dim,
            k_dim=k_dim,
            heads=heads,
            knn=knn,
            n_keys=n_keys,
            query_batchnorm=query_batchnorm,
            input_dropout=input_dropout,
            query_dropout=query_dropout,
            value_dropout=value_dropout,
            value_dim=value_dim,
            swilu_projection=swilu_projection,
            gated=gated,
            value_dtype=value_dtype,
            share_values=share_values,
        )

        # global parameters
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.size = n_keys**2
        self.k_dim = k_dim
        self.v_dim = self.config.v_dim
        self.heads = heads
        self.knn = knn
        self.n_keys = n_keys
        self.input_dropout = input_dropout
        self.query_dropout = query_dropout
        self.value_dropout = value_dropout

        # initialize keys / values (as the notebook does; from_config loads make_weights instead)
        half = k_dim // 2
        self.keys = nn.Parameter(torch.empty(heads, 2, n_keys, half).uniform_(-(half**-0.5), half**-0.5))
        self.values = nn.EmbeddingBag(self.size, self.v_dim, mode="sum")
        nn.init.normal_(self.values.weight, mean=0, std=self.v_dim**-0.5)
        if value_dtype == "bfloat16":
            self.values.to(torch.bfloat16)

        # Meta's read projection and gate (absent in XLM's layer)
        c = self.config
        self.value_proj = nn.Linear(self.v_dim, output_dim) if c.projects_value else None
        self.swilu_projection = nn.Linear(input_dim, self.v_dim) if swilu_projection else None
        self.gating = nn.Linear(input_dim, 1) if gated else None

        # query network
        self.query_proj = nn.Sequential(
            *filter(
                None,
                [
                    nn.Linear(self.input_dim, self.heads * self.k_dim, bias=True),
                    nn.BatchNorm1d(self.heads * self.k_dim) if query_batchnorm else None,
                ],
            )
        )

    @classmethod
    def from_config(cls, config: PKMConfig, seed: int | None = 0) -> HashingMemory:
        """A layer with the deterministic weights of ``(config, seed)``.

        ``seed=None`` keeps the random initialisation of ``__init__`` (for loading a checkpoint).
        """
        layer = cls(**config.to_dict())
        if seed is not None:
            layer.load_weights(make_weights(config, seed))
        return layer

    def load_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Load numpy weights keyed by ``state_dict`` name (checked by name and shape)."""
        from pkm_models.convert import numpy_to_state_dict

        self.load_state_dict(numpy_to_state_dict(weights, self.state_dict()))

    def _get_indices(self, query, subkeys):
        """
        Generate scores and indices for a specific head.
        """
        assert query.dim() == 2 and query.size(1) == self.k_dim
        bs = query.size(0)
        knn = self.knn
        half = self.k_dim // 2
        n_keys = len(subkeys[0])

        # split query for product quantization
        q1 = query[:, :half]  # (bs,half)
        q2 = query[:, half:]  # (bs,half)

        # compute indices with associated scores
        scores1 = F.linear(q1, subkeys[0], bias=None)  # (bs,n_keys)
        scores2 = F.linear(q2, subkeys[1], bias=None)  # (bs,n_keys)
        scores1, indices1 = scores1.topk(knn, dim=1)  # (bs,knn)
        scores2, indices2 = scores2.topk(knn, dim=1)  # (bs,knn)

        # cartesian product on best candidate keys
        all_scores = (
            scores1.view(bs, knn, 1).expand(bs, knn, knn) + scores2.view(bs, 1, knn).expand(bs, knn, knn)
        ).view(bs, -1)  # (bs,knn**2)
        all_indices = (
            indices1.view(bs, knn, 1).expand(bs, knn, knn) * n_keys + indices2.view(bs, 1, knn).expand(bs, knn, knn)
        ).view(bs, -1)  # (bs,knn**2)

        # select best scores with associated indices
        scores, best_indices = torch.topk(all_scores, k=knn, dim=1)  # (bs,knn)
        indices = all_indices.gather(1, best_indices)  # (bs,knn)

        assert scores.shape == indices.shape == (bs, knn)
        return scores, indices

    def get_indices(self, query):
        """
        Generate scores and indices.
        """
        assert query.dim() == 2 and query.size(1) == self.k_dim
        query = query.view(-1, self.heads, self.k_dim)
        bs = query.size(0)  # the notebook's len(query): len() fixes the size in torch.export
        outputs = [self._get_indices(query[:, i], self.keys[i]) for i in range(self.heads)]
        s = torch.cat([s.view(bs, 1, self.knn) for s, _ in outputs], 1)  # (bs,heads,knn)
        i = torch.cat([i.view(bs, 1, self.knn) for _, i in outputs], 1)  # (bs,heads,knn)
        return s.view(-1, self.knn), i.view(-1, self.knn)

    def forward(self, input, return_taps: bool = False):
        """
        Read from the memory.

        With ``return_taps=True`` returns a dict of the conformance taps instead of the
        output alone: query (bs*heads,k_dim), scores / indices / weights (bs*heads,knn)
        and output (...,v_dim).
        """
        # input dimensions
        if input.shape[-1] != self.input_dim:
            raise ValueError(f"HashingMemory: expected input (..., {self.input_dim}), got {tuple(input.shape)}")
        prefix_shape = input.shape[:-1]
        bs = math.prod(prefix_shape)

        # compute query
        input = F.dropout(input, p=self.input_dropout, training=self.training)  # (...,i_dim)
        query = self.query_proj(input.contiguous().view(-1, self.input_dim))  # (bs,heads*k_dim)
        query = query.view(bs * self.heads, self.k_dim)  # (bs*heads,k_dim)
        query = F.dropout(query, p=self.query_dropout, training=self.training)  # (bs*heads,k_dim)
        assert query.shape == (bs * self.heads, self.k_dim)

        # retrieve indices and scores
        scores, indices = self.get_indices(query)  # (bs*heads,knn)
        weights = F.softmax(scores.float(), dim=-1).type_as(scores)  # (bs*heads,knn)

        # merge heads / knn (since we sum heads)
        flat_indices = indices.view(bs, self.heads * self.knn)  # (bs,heads*knn)
        flat_weights = weights.view(bs, self.heads * self.knn)  # (bs,heads*knn)

        # weighted sum of values
        output = self.read(flat_indices, flat_weights)  # (bs,v_dim)
        if not self.config.projects_output:  # Meta drops out after value_proj (in project)
            output = F.dropout(output, p=self.value_dropout, training=self.training)  # (bs,v_dim)

        # Meta's projection and gate: the layer's output is then not the weighted sum
        final = self.project(input.contiguous().view(-1, self.input_dim), output)  # (bs,output_dim)

        # reshape output
        if len(prefix_shape) >= 2:
            output = output.view(prefix_shape + (self.v_dim,))  # (...,v_dim)  # noqa: RUF005
            if final is not None:
                final = final.view(prefix_shape + (self.output_dim,))  # (...,output_dim)  # noqa: RUF005

        if return_taps:
            taps = {"query": query, "scores": scores, "indices": indices, "weights": weights, "output": output}
            if final is not None:
                taps[LAYER_OUTPUT] = final
            return taps
        return output if final is None else final

    def read(self, indices, weights):
        """The weighted sum of value rows for (bs,n) ``indices`` and ``weights``: (bs,v_dim).
        The notebook's ``nn.EmbeddingBag``; a bfloat16 table summed as Meta's kernel does
        (:func:`bf16_weighted_sum`). A table sharded over processes
        (:class:`pkm_models.torch_sharded.ColumnShardedValues`) takes the ``EmbeddingBag``'s
        place and call, and reads its own way."""
        values = self.values
        if isinstance(values, nn.EmbeddingBag) and self.config.value_dtype == "bfloat16":
            return bf16_weighted_sum(values.weight, indices, weights)
        # (a whole model cast to bf16, the @bf16 variant of XLM's layer, sums in bf16 here)
        return values(indices, per_sample_weights=weights)

    def project(self, input, read):
        """Meta's read projection and gate on (bs,input_dim) input and the (bs,v_dim) read:
        ``value_proj(read * silu(swilu_projection(input)))`` (or ``value_proj(read)``), then
        ``sigmoid(gating(input)) *``; None for XLM's layer (the read is the output)."""
        if not self.config.projects_output:
            return None
        out = read
        if self.swilu_projection is not None:
            out = out * F.silu(self.swilu_projection(input))  # (bs,v_dim)
        if self.value_proj is not None:
            out = self.value_proj(out)  # (bs,output_dim)
        out = F.dropout(out, p=self.value_dropout, training=self.training)  # (bs,output_dim)
        if self.gating is not None:
            out = torch.sigmoid(self.gating(input)) * out  # (bs,output_dim)
        return out


def bf16_weighted_sum(table, indices, weights):
    """The weighted sum of a bfloat16 table's rows as Meta's kernel computes it: for each
    bag, ``acc = acc + w_j * float32(row_j)`` in float32, slot by slot in order, then one
    rounding of ``acc`` to bfloat16; returned as float32 (the reference continues in float32).

    (bs,n) int64 ``indices`` and (bs,n) or (bs,1,n) float32 ``weights`` -> (bs,v_dim).
    The product and the sum are rounded separately (a kernel compiled to fused multiply-adds
    rounds once per slot: at most one float32 ulp of the accumulator apart per slot, before
    the bf16 rounding).
    """
    n = indices.shape[-1]
    weights = weights.reshape(-1, n).float()  # (bs,n)
    rows = F.embedding(indices, table)  # (bs,n,v_dim) bf16
    acc = weights[:, 0:1] * rows[:, 0].float()  # (bs,v_dim)
    for j in range(1, n):
        acc = acc + weights[:, j : j + 1] * rows[:, j].float()
    return acc.to(torch.bfloat16).float()


class PKMStack(nn.Module):
    """``layers`` HashingMemory layers applied in sequence (the seed's benchmark net).

    ``state_dict`` names are ``layers.<i>.<HashingMemory name>``. With
    ``return_taps=True`` the taps of every layer, ``<i>/<tap>``
    (:func:`pkm_models.stack.stack_forward`).
    """

    def __init__(self, config: PKMConfig, layers: int):
        super().__init__()
        check_stackable(config, layers, "PKMStack")
        self.config = config
        self.layers = nn.ModuleList(HashingMemory(**config.to_dict()) for _ in range(layers))
        if config.share_values:  # one table, held once: every layer reads layer 0's
            for layer in self.layers[1:]:
                layer.values = self.layers[0].values

    @classmethod
    def from_config(cls, config: PKMConfig, layers: int, seed: int | None = 0) -> PKMStack:
        stack = cls(config, layers)
        if seed is not None:
            stack.load_weights(make_weights(config, seed, layers=layers))
        return stack

    def load_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        from pkm_models.convert import numpy_to_state_dict
        from pkm_models.weights import share_tables

        self.load_state_dict(numpy_to_state_dict(share_tables(dict(weights), self.config), self.state_dict()))

    def forward(self, input, return_taps: bool = False):
        return stack_forward(self.layers, input, call_module, return_taps)


def build_torch_model(
    config: PKMConfig, layers: int = 1, seed: int | None = 0, weights: Mapping[str, np.ndarray] | None = None
) -> nn.Module:
    """A single ``HashingMemory`` for ``layers == 1``, else a ``PKMStack``: with the
    deterministic weights of ``seed``, or with ``weights`` (torch-named numpy arrays,
    checked by name and shape) when given, sharing their memory. The one way this project
    builds a torch model."""
    if weights is None:
        return HashingMemory.from_config(config, seed) if layers == 1 else PKMStack.from_config(config, layers, seed)
    from pkm_models.convert import numpy_to_state_dict

    # Built without storage and then given the arrays themselves (assign=True): the
    # parameters share the numpy arrays' memory (a memory-mapped file stays one copy)
    # instead of being initialised and then overwritten.
    with torch.device("meta"):
        model = HashingMemory(**config.to_dict()) if layers == 1 else PKMStack(config, layers)
    model.load_state_dict(numpy_to_state_dict(weights, model.state_dict()), assign=True)
    return model
