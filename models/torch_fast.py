"""A loop-free forward of the reference, for export.

``nn.EmbeddingBag(per_sample_weights=...)`` becomes an ONNX ``Loop`` over the bags in
both stock exporters, and the reference's per-head Python loop becomes one ``TopK`` chain
per head. :class:`FastHashingMemory` computes the same function with plain tensor ops:
one batched matmul for every head's sub-key scores, one ``TopK`` per selection stage
for all heads, and the weighted sum as ``Gather`` followed by a batched ``MatMul``, in
chunks of slots (or, natively, ``weighted_sum="bag"``: one ``F.embedding_bag`` over
every head's rows, the reference's fused gather-and-sum without its loop over heads). It
shares its parameters with the reference module it wraps (no copy), runs in inference
mode only, and its numerical identity with the reference is tested
(``tests/models/test_torch_fast.py``).

Meta's options (docs/memory-layers.md) run as in the reference: a bfloat16 table through
the reference's :func:`~pkm_models.torch_pkm.bf16_weighted_sum` (float32 slot-order
accumulation, one rounding to bf16: an unrolled chain at export), and the projection and
gate through :meth:`~pkm_models.torch_pkm.HashingMemory.project`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pkm_models.config import LAYER_OUTPUT
from pkm_models.stack import call_module, stack_forward
from pkm_models.torch_pkm import HashingMemory, PKMStack, bf16_weighted_sum

WEIGHTED_SUMS = ("gather", "bag")


class FastHashingMemory(nn.Module):
    """Inference-mode ``HashingMemory`` forward without loops. Same taps, same outputs.

    ``chunk``: value rows are gathered and summed ``chunk`` slots at a time (unrolled at
    export), so the gathered block is ``chunk / (heads * knn)`` of the full one: 12 MB
    instead of 201 MB at 512 tokens, and faster in ONNX Runtime (docs/export.md).
    ``None`` gathers every slot at once.

    ``weighted_sum``: ``"gather"`` (the above; what the export needs) or ``"bag"``
    (``F.embedding_bag`` with per-sample weights over all ``heads * knn`` rows of a token:
    one pass over the rows, never written; the fastest PyTorch form on CPU, but stock ONNX
    exporters turn it into a ``Loop``).
    """

    def __init__(self, reference: HashingMemory, chunk: int | None = 8, weighted_sum: str = "gather"):
        super().__init__()
        if weighted_sum not in WEIGHTED_SUMS:
            raise ValueError(f"unknown weighted_sum {weighted_sum!r}; available: {list(WEIGHTED_SUMS)}")
        self.reference = reference
        self.chunk = chunk
        self.sum_form = weighted_sum  # the method below computes it in this form
        c = reference.config
        self.heads, self.k_dim, self.knn, self.n_keys, self.v_dim = c.heads, c.k_dim, c.knn, c.n_keys, c.v_dim
        self.input_dim = c.input_dim

    def weighted_sum(self, flat_indices: torch.Tensor, flat_weights: torch.Tensor) -> torch.Tensor:
        """(bs,n) indices and (bs,1,n) weights -> (bs,v_dim): Gather + batched MatMul, in
        chunks of slots so that each gathered block stays in cache; or, in the ``"bag"``
        form, one ``F.embedding_bag`` with per-sample weights."""
        n = flat_indices.shape[1]
        if self.reference.config.value_dtype == "bfloat16":  # Meta's kernel: one order, one rounding
            # (XLM's layer cast whole to bf16, the @bf16 variant, sums in bf16 below)
            return bf16_weighted_sum(self.reference.values.weight, flat_indices, flat_weights)  # (bs,v_dim)
        if self.sum_form == "bag":
            return F.embedding_bag(
                flat_indices, self.reference.values.weight, per_sample_weights=flat_weights.reshape(-1, n), mode="sum"
            )  # (bs,v_dim)
        chunk = self.chunk or n
        output = None
        for start in range(0, n, chunk):
            rows = F.embedding(flat_indices[:, start : start + chunk], self.reference.values.weight)  # (bs,chunk,v_dim)
            part = torch.matmul(flat_weights[:, :, start : start + chunk], rows)  # (bs,1,v_dim)
            output = part if output is None else output + part
        return output.squeeze(1)

    def forward(self, input: torch.Tensor, return_taps: bool = False):
        ref = self.reference
        heads, k_dim, knn, half = self.heads, self.k_dim, self.knn, self.k_dim // 2
        prefix_shape = input.shape[:-1]

        # query: (bs,heads*k_dim), batchnorm with running statistics
        query = ref.query_proj(input.reshape(-1, self.input_dim))  # (bs,heads*k_dim)

        # sub-key scores of every head and half in one batched matmul
        q = query.reshape(-1, heads * 2, half).transpose(0, 1)  # (heads*2,bs,half)
        subkeys = ref.keys.reshape(heads * 2, self.n_keys, half).transpose(1, 2)  # (heads*2,half,n_keys)
        sub_scores = torch.matmul(q, subkeys)  # (heads*2,bs,n_keys)
        sub_s, sub_i = sub_scores.topk(knn, dim=-1)  # (heads*2,bs,knn)
        sub_s = sub_s.reshape(heads, 2, -1, knn).permute(2, 0, 1, 3)  # (bs,heads,2,knn)
        sub_i = sub_i.reshape(heads, 2, -1, knn).permute(2, 0, 1, 3)  # (bs,heads,2,knn)

        # cartesian product of each half's candidates, then the final top-k
        all_scores = (sub_s[:, :, 0, :, None] + sub_s[:, :, 1, None, :]).reshape(-1, heads, knn * knn)
        all_indices = (sub_i[:, :, 0, :, None] * self.n_keys + sub_i[:, :, 1, None, :]).reshape(-1, heads, knn * knn)
        scores, best = all_scores.topk(knn, dim=-1)  # (bs,heads,knn)
        indices = all_indices.gather(-1, best)  # (bs,heads,knn)
        weights = F.softmax(scores, dim=-1)  # (bs,heads,knn)

        # weighted sum of the selected value rows
        n = heads * knn
        flat_indices = indices.reshape(-1, n)  # (bs,heads*knn)
        flat_weights = weights.reshape(-1, 1, n)  # (bs,1,heads*knn)
        output = self.weighted_sum(flat_indices, flat_weights)  # (bs,v_dim)
        final = ref.project(input.reshape(-1, self.input_dim), output)  # (bs,output_dim) or None
        if len(prefix_shape) >= 2:
            output = output.reshape(*prefix_shape, self.v_dim)  # (...,v_dim)
            if final is not None:
                final = final.reshape(*prefix_shape, ref.output_dim)  # (...,output_dim)

        if return_taps:
            taps = {
                "query": query.reshape(-1, k_dim),
                "scores": scores.reshape(-1, knn),
                "indices": indices.reshape(-1, knn),
                "weights": weights.reshape(-1, knn),
                "output": output,
            }
            if final is not None:
                taps[LAYER_OUTPUT] = final
            return taps
        return output if final is None else final


class FastPKMStack(nn.Module):
    def __init__(self, reference: PKMStack, chunk: int | None = 8, weighted_sum: str = "gather"):
        super().__init__()
        self.layers = nn.ModuleList(FastHashingMemory(layer, chunk, weighted_sum) for layer in reference.layers)

    def forward(self, input: torch.Tensor, return_taps: bool = False):
        return stack_forward(self.layers, input, call_module, return_taps)


def fast_module(reference: nn.Module, weighted_sum: str = "gather") -> nn.Module:
    """The loop-free twin of a ``HashingMemory`` or ``PKMStack`` (sharing its parameters)."""
    if isinstance(reference, HashingMemory):
        return FastHashingMemory(reference, weighted_sum=weighted_sum).eval()
    if isinstance(reference, PKMStack):
        return FastPKMStack(reference, weighted_sum=weighted_sum).eval()
    raise TypeError(f"expected HashingMemory or PKMStack, got {type(reference).__name__}")
