"""The PyTorch reference: eager and torch.compile, on CPU and CUDA."""

from __future__ import annotations

import numpy as np

from conformance.paths.base import CaseContext, ExecutionPath, PathUnavailable


class TorchPath(ExecutionPath):
    family = "torch"

    def __init__(self, device: str, compiled: bool):
        self.device, self.compiled = device, compiled
        self.name = f"torch-{'compile' if compiled else 'eager'}-{device}"

    def check(self, case) -> None:
        import torch

        if self.device == "cuda" and not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise PathUnavailable(f"{why} (torch {torch.__version__})")

    def prepare(self, context: CaseContext):
        import torch

        model = context.torch_model.to(self.device)
        fn = torch.compile(model, dynamic=False) if self.compiled else model

        def run(x: np.ndarray) -> dict[str, np.ndarray]:
            with torch.inference_mode():
                taps = fn(torch.tensor(x, device=self.device), return_taps=True)
                if self.device == "cuda":
                    torch.cuda.synchronize()
            return {k: v.cpu().numpy() for k, v in taps.items()}

        if self.compiled:
            run(np.zeros((1, 1, context.case.config.input_dim), np.float32))  # compile now, not when timed
        return run
