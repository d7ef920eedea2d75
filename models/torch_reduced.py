"""The PyTorch models at reduced precision: fp16 / bf16 casts and an int8 value table.

* :class:`CastModel` runs a ``HashingMemory`` (or its loop-free twin, or a stack) with
  every parameter and activation in ``float16`` or ``bfloat16``: the input is cast to
  that type on the way in and the taps back to ``float32`` (``indices`` stay int64) on the
  way out, so that the interface, and the comparison with the float32 goldens, is the
  float32 one. Every float tap of such a model is exactly representable in its type.
* :class:`Int8HashingMemory` keeps queries, keys, scores and weights in float32 and stores
  the value table as 8-bit codes with a float32 scale and offset per row (weight-only,
  per-row asymmetric quantisation; the format of PyTorch's
  ``torch.ops.quantized.embedding_bag_byte_prepack``). ``fused=True`` computes the
  weighted sum with PyTorch's fused row-wise 8-bit ``EmbeddingBag``
  (``embedding_bag_byte_rowwise_offsets``); ``fused=False`` with plain tensor ops
  (gather the codes, dequantise, batched matmul), which the ONNX exporter turns into
  standard ONNX (``Gather``, ``Cast``, ``Mul``, ``Add``, ``MatMul``). Both dequantise the
  same codes with the same scales.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pkm_models.stack import call_module, stack_forward
from pkm_models.torch_fast import FastHashingMemory
from pkm_models.torch_pkm import HashingMemory, PKMStack

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class CastModel(nn.Module):
    """``module`` with parameters and buffers cast to ``dtype``; float32 in, float32 out.

    The module is cast in place (``module.to(dtype)``): pass a copy if the float32 one is
    still needed.
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module = module.to(dtype)
        self.dtype = dtype

    def forward(self, input: torch.Tensor, return_taps: bool = False):
        out = self.module(input.to(self.dtype), return_taps=return_taps)
        if not return_taps:
            return out.float()
        return {k: v if v.dtype == torch.int64 else v.float() for k, v in out.items()}


def pack_rows(values: torch.Tensor, block_bytes: int = 64 << 20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8-bit codes (N, D) uint8, scale (N,) and offset (N,) float32 of a (N, D) table.

    PyTorch's ``embedding_bag_byte_prepack`` format: per row, offset = min and
    scale = (max - min) / 255, code = round((v - offset) / scale); a stored value is off
    by at most half a step, scale / 2. Made ``block_bytes`` of float32 rows at a time, so
    that no second table-sized buffer exists beside the codes.
    """
    values = values.detach()
    n, d = values.shape
    codes = torch.empty((n, d), dtype=torch.uint8)
    scale, offset = torch.empty(n, dtype=torch.float32), torch.empty(n, dtype=torch.float32)
    step = max(1, block_bytes // max(1, 4 * d))
    for first in range(0, n, step):
        block = values[first : first + step].float().contiguous()
        packed = torch.ops.quantized.embedding_bag_byte_prepack(block)
        codes[first : first + step] = packed[:, :-8]
        scale_offset = packed[:, -8:].contiguous().view(torch.float32)  # (rows,2)
        scale[first : first + step], offset[first : first + step] = scale_offset[:, 0], scale_offset[:, 1]
    return codes, scale, offset


class Int8HashingMemory(FastHashingMemory):
    """A ``HashingMemory`` whose value table is stored as 8-bit codes with per-row scales.

    The float32 value table is not kept: ``model_bytes`` counts the codes, the scales and
    the float32 parameters (query projection, keys).
    """

    def __init__(self, reference: HashingMemory, fused: bool = True, chunk: int | None = 8):
        super().__init__(reference, chunk)
        self.fused = fused
        if fused:  # the fused kernel's layout: each row's codes, then its scale and offset
            table = reference.values.weight.detach()
            self.register_buffer("packed", torch.ops.quantized.embedding_bag_byte_prepack(table))
        else:  # the export's: codes, scales and offsets apart (only one layout is ever made)
            codes, scale, offset = pack_rows(reference.values.weight)
            self.register_buffer("codes", codes)  # (N,D) uint8
            self.register_buffer("scale", scale[:, None])  # (N,1)
            self.register_buffer("offset", offset[:, None])  # (N,1)
        # drop the float32 table: the model must not be able to read it
        reference.values = nn.EmbeddingBag(1, self.v_dim, mode="sum")

    @property
    def model_bytes(self) -> int:
        tensors = [*self.reference.parameters(), *self.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors) - self.v_dim * 4  # less the 1-row stub

    def weighted_sum(self, flat_indices: torch.Tensor, flat_weights: torch.Tensor) -> torch.Tensor:
        """(bs,n) indices and (bs,1,n) weights -> (bs,v_dim) float32."""
        bs, n = flat_indices.shape
        if self.fused:
            offsets = torch.arange(0, bs * n, n, device=flat_indices.device)
            return torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
                self.packed, flat_indices.reshape(-1), offsets, False, 0, False, flat_weights.reshape(-1), None, False
            )
        chunk = self.chunk or n
        output = None
        for start in range(0, n, chunk):
            idx = flat_indices[:, start : start + chunk]  # (bs,chunk)
            rows = F.embedding(idx, self.codes).float()  # (bs,chunk,v_dim)
            rows = rows * F.embedding(idx, self.scale) + F.embedding(idx, self.offset)  # dequantised
            part = torch.matmul(flat_weights[:, :, start : start + chunk], rows)  # (bs,1,v_dim)
            output = part if output is None else output + part
        return output.squeeze(1)


class Int8PKMStack(nn.Module):
    def __init__(self, reference: PKMStack, fused: bool = True):
        super().__init__()
        self.layers = nn.ModuleList(Int8HashingMemory(layer, fused) for layer in reference.layers)

    @property
    def model_bytes(self) -> int:
        return sum(layer.model_bytes for layer in self.layers)

    def forward(self, input: torch.Tensor, return_taps: bool = False):
        return stack_forward(self.layers, input, call_module, return_taps)


def int8_module(reference: nn.Module, fused: bool = True) -> nn.Module:
    """The int8-value-table twin of a ``HashingMemory`` or ``PKMStack``. The reference's
    float32 value table is replaced by a stub (pass a copy to keep it)."""
    if isinstance(reference, HashingMemory):
        return Int8HashingMemory(reference, fused).eval()
    if isinstance(reference, PKMStack):
        return Int8PKMStack(reference, fused).eval()
    raise TypeError(f"expected HashingMemory or PKMStack, got {type(reference).__name__}")


def model_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers as stored (an int8 module says its own)."""
    own = getattr(module, "model_bytes", None)
    if own is not None:
        return own
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


__all__ = ["DTYPES", "CastModel", "Int8HashingMemory", "int8_module", "model_bytes", "pack_rows"]
