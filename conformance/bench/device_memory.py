"""Peak GPU memory of this process, the same way for every CUDA path.

The runtimes each see only their own allocator (``torch.cuda.max_memory_allocated``;
ONNX Runtime has no peak at all), so the bench asks the driver instead: ``nvidia-smi``
lists the memory each process uses (its CUDA context included), sampled every
``interval`` seconds (0.1 s) while the path is prepared and runs; the largest value for this process is its peak.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading

QUERY = ["--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]


def process_memory_mb(pid: int, smi: str = "nvidia-smi") -> float | None:
    """MiB of GPU memory that ``pid`` uses now (summed over GPUs), or None if unknown."""
    try:
        done = subprocess.run([smi, *QUERY], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode:
        return None
    used = None
    for line in done.stdout.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 2 and fields[0] == str(pid) and fields[1].isdigit():
            used = (used or 0.0) + float(fields[1])
    return used


class PeakSampler:
    """``with PeakSampler() as s: ...`` then ``s.peak_mb``: the largest GPU memory this
    process used while inside (None without ``nvidia-smi`` or without a GPU process)."""

    def __init__(self, interval: float = 0.1, smi: str | None = None):
        self.interval = interval
        self.smi = smi or shutil.which("nvidia-smi")
        self.peak_mb: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        used = process_memory_mb(os.getpid(), self.smi)
        if used is not None:
            self.peak_mb = max(self.peak_mb or 0.0, used)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakSampler:
        if self.smi:
            self._sample()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread:
            self._stop.set()
            self._thread.join()
            self._sample()
