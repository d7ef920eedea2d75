"""The PyTorch reference, and its loop-free twin: eager and torch.compile, on CPU and CUDA."""

from __future__ import annotations

import numpy as np

from conformance.paths.base import CaseContext, ExecutionPath, PathUnavailable

# model name -> the weighted sum of pkm_models.torch_fast (None: the reference itself)
MODELS = {"reference": None, "fast": "gather", "fast-bag": "bag"}


def _precision_casts(config):
    """Inductor keeps a bfloat16 table's sum in float32 across ``.to(bfloat16).float()``
    unless told to emulate the cast (measured: 89% of a bf16 read 1 bf16 ulp off): the
    rounding that Meta's kernel does is part of the model."""
    import contextlib

    if config.value_dtype != "bfloat16":
        return contextlib.nullcontext()
    import torch._inductor.config

    return torch._inductor.config.patch(emulate_precision_casts=True)


class TorchPath(ExecutionPath):
    """``model``: ``"reference"`` (XLM's ``HashingMemory``: a loop over heads and
    ``EmbeddingBag``), ``"fast"`` (``pkm_models.torch_fast``, every head at once: the
    model behind the ``torch-fast`` export, here run natively; named ``[fast]``) or
    ``"fast-bag"`` (the same with one ``embedding_bag`` for the weighted sum)."""

    family = "torch"

    def __init__(self, device: str, compiled: bool, model: str = "reference"):
        if model not in MODELS:
            raise ValueError(f"unknown torch model {model!r}; available: {list(MODELS)}")
        self.device, self.compiled, self.model = device, compiled, model
        self.name = f"torch-{'compile' if compiled else 'eager'}-{device}" + (
            "" if model == "reference" else f"[{model}]"
        )

    def check(self, case) -> None:
        import torch

        if self.device == "cuda" and not torch.cuda.is_available():
            why = (
                "this torch build has no CUDA: install the package index's default torch wheel, a CUDA build"
                if torch.version.cuda is None
                else "no CUDA device is visible"
            )
            raise PathUnavailable(f"{why} (torch {torch.__version__})")

    def _model(self, context: CaseContext, example):
        """The model on the device; for torch-compile compiled now, not when run or timed,
        for ``example``'s shape (a tensor on the device): ``dynamic=False`` compiles once
        per shape, so compiling for any other shape would compile twice."""
        model = context.torch_model.to(self.device)
        if MODELS[self.model] is not None:
            from pkm_models.torch_fast import fast_module

            model = fast_module(model, weighted_sum=MODELS[self.model])  # shares the reference's parameters
        if not self.compiled:
            return model
        import torch

        # what a fresh process compiles: nothing of an earlier path's compilation (in a
        # long-lived worker) may change this one's kernels, hence its numbers
        torch.compiler.reset()
        compiled = torch.compile(model, dynamic=False)
        with torch.inference_mode(), _precision_casts(context.case.config):
            compiled(example, return_taps=True)
        return compiled

    def prepare(self, context: CaseContext):
        import torch

        # the case's input shape: what run() is called on
        model = self._model(context, example=torch.zeros(context.case.input_shape, device=self.device))

        casts = context.case.config  # a recompilation (a guard that fails) must emulate them too

        def run(x: np.ndarray) -> dict[str, np.ndarray]:
            with torch.inference_mode(), _precision_casts(casts):
                taps = model(torch.tensor(x, device=self.device), return_taps=True)
                if self.device == "cuda":
                    torch.cuda.synchronize()
            return {k: v.cpu().numpy() for k, v in taps.items()}

        return run

    def table_reads(self, context: CaseContext) -> list:
        """The weighted sum each layer's forward calls (``HashingMemory.read``: the
        notebook's ``EmbeddingBag``, or Meta's bf16 sum; the loop-free model's
        ``weighted_sum``), on the device. A compiled model fuses the sum into its graph of the
        whole forward: its lookup is not read on its own (the same module's eager lookup is
        swept on the eager path)."""
        from conformance.sweep import NotSwept

        if self.compiled:
            raise NotSwept(
                "torch.compile fuses the weighted sum into the forward's graph; "
                f"the eager lookup is swept on torch-eager-{self.device}"
            )
        model = context.torch_model.to(self.device)
        if MODELS[self.model] is not None:
            from pkm_models.torch_fast import fast_module

            model = fast_module(model, weighted_sum=MODELS[self.model])
        return torch_table_reads(model, context, self.device)

    def prepare_timed(self, context: CaseContext, x: np.ndarray):
        """The input on the device once; the outputs stay there; CUDA synchronises."""
        import torch

        t = torch.tensor(x, device=self.device)
        model = self._model(context, example=t)  # compiled for the timed shape, once
        cuda = self.device == "cuda"

        casts = context.case.config

        def timed():
            with torch.inference_mode(), _precision_casts(casts):
                taps = model(t, return_taps=True)
            if cuda:
                torch.cuda.synchronize()
            return taps

        return timed


def torch_table_reads(model, context: CaseContext, device: str = "cpu") -> list:
    """:class:`conformance.sweep.TableRead` for every value table of a torch model: the
    reference (``HashingMemory`` / ``PKMStack``), its loop-free or int8 twin, or either cast
    (``CastModel``). A shared table (Meta's ``share_values``) is read once, through layer 0."""
    import torch

    from conformance.sweep import TableRead, stored_precision, value_tables

    dtype = getattr(model, "dtype", None)
    module = getattr(model, "module", model)  # CastModel holds the cast module
    layers = list(module.layers) if hasattr(module, "layers") else [module]
    precision = stored_precision(context.case.config)

    def reader(layer):
        fast = hasattr(layer, "weighted_sum")  # FastHashingMemory and its int8 twin

        def read(indices: np.ndarray, weights: np.ndarray) -> np.ndarray:
            n = layer.heads * layer.knn
            idx = torch.from_numpy(np.ascontiguousarray(indices)).to(device).reshape(-1, n)
            w = torch.from_numpy(np.ascontiguousarray(weights)).to(device).reshape(-1, n)
            if dtype is not None:
                w = w.to(dtype)
            with torch.inference_mode():
                out = layer.weighted_sum(idx, w.reshape(len(idx), 1, n)) if fast else layer.read(idx, w)
            return out.float().cpu().numpy()

        return read

    reads = []
    for i, name, reference in value_tables(context.case, context.weights):
        inner = getattr(layers[i], "reference", layers[i])  # the loop-free model wraps the reference
        reads.append(TableRead(name, reference, reader(layers[i]), inner.heads, inner.knn, precision))
    return reads
