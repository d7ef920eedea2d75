"""The PyTorch reference with its value table sharded over N processes:
``torch-dist-cpu[N]`` (gloo) and ``torch-dist-cuda[N]`` (NCCL, one GPU per process).

What a user runs once a table outgrows one device (Meta's 7B memory is 8 GiB of bf16 per
model, 1 GiB per rank at 8 ranks). Each process holds a column slice of every table
(:mod:`pkm_models.torch_sharded`, Meta's ``Shard(1)``) and a share of the tokens; the
taps of every process's tokens are put back together in token order and judged against
the same unsharded golden as every other path.

The path launches its own processes (``python -m conformance.paths.dist_paths``) the first time
it runs, and keeps them for the next case: a :class:`RankGroup` per (device, N) and
process, ended with it. Every process memory-maps the run's folder of weights and keeps
only its columns. A process that raises reports the error; one that dies or hangs ends the
group (after ``RankGroup.timeout`` seconds), and the path reports why.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from conformance.paths.base import CaseContext, ExecutionPath, PathUnavailable
from pkm_models.config import LAYER_OUTPUT

NAME = re.compile(r"torch-dist-(cpu|cuda)\[([1-9][0-9]*)\]")


def parse_name(name: str) -> tuple[str, int] | None:
    """``(device, N)`` of a sharded path's name, ``torch-dist-cpu[2]``; else None."""
    match = NAME.fullmatch(name)
    return (match[1], int(match[2])) if match else None


class DistPath(ExecutionPath):
    """The reference, its value tables sharded over ``world`` processes on ``device``."""

    family = "torch"
    judged_in_bench = True  # a sharded read is only worth timing if it is the unsharded one

    def __init__(self, device: str, world: int):
        if device not in ("cpu", "cuda") or world < 1:
            raise ValueError(f"a sharded path runs on cpu or cuda over N >= 1 processes, got {device!r}, {world!r}")
        self.device, self.world = device, world
        self.processes = world  # beside the worker that starts them (conformance.memory)
        self.name = f"torch-dist-{device}[{world}]"

    def check(self, case) -> None:
        import torch
        import torch.distributed as dist

        if not dist.is_available():
            raise PathUnavailable(f"this torch build has no torch.distributed (torch {torch.__version__})")
        if self.device == "cpu":
            if not dist.is_gloo_available():
                raise PathUnavailable(f"this torch build has no gloo backend (torch {torch.__version__})")
            return
        if torch.version.cuda is None:
            raise PathUnavailable(
                f"this torch build has no CUDA: install the package index's default torch wheel, a CUDA build "
                f"(torch {torch.__version__})"
            )
        if not dist.is_nccl_available():
            raise PathUnavailable(f"this torch build has no NCCL backend (torch {torch.__version__})")
        if torch.cuda.device_count() < self.world:
            raise PathUnavailable(
                f"needs {self.world} CUDA devices (one per process), {torch.cuda.device_count()} visible"
            )

    def _group(self, context: CaseContext) -> RankGroup:
        group = _GROUPS.get((self.device, self.world))
        if group is None or not group.alive:
            group = _GROUPS[(self.device, self.world)] = RankGroup(self.device, self.world)
        group.load(context)
        return group

    def prepare(self, context: CaseContext):
        group = self._group(context)
        return group.run

    def prepare_timed(self, context: CaseContext, x: np.ndarray):
        group = self._group(context)
        group.stage(x)
        return group.timed


def _tap_is_output(name: str) -> bool:
    return name.rpartition("/")[2] in ("output", LAYER_OUTPUT)


class RankGroup:
    """``world`` processes in one ``torch.distributed`` group, driven over a pipe each:
    ``load`` a case's model (sharded), ``run`` an input (taps back), ``stage`` an input and
    time ``timed`` passes on it. Kept for the life of this process (:data:`_GROUPS`)."""

    timeout = 600.0  # seconds any process may take to answer one request

    def __init__(self, device: str, world: int):
        from multiprocessing.connection import Listener

        self.device, self.world = device, world
        self._dir = Path(tempfile.mkdtemp(prefix="pkm-dist-"))
        self._loaded: str | None = None
        self._weights_dir: Path | None = None
        self._conns, self._procs = [], []
        atexit.register(self.close)
        # each process is `python -m` this module (never a re-import of the caller's main
        # module, as multiprocessing's spawn does), in this process's group (ended with it),
        # and calls back on a local socket, authenticated by a key it inherits
        key = os.urandom(16)
        listener = Listener(str(self._dir / "control"), family="AF_UNIX", authkey=key)
        env = {**os.environ, _KEY_VARIABLE: key.hex()}
        threads = max(1, (os.cpu_count() or 1) // world)
        for rank in range(world):
            args = [rank, world, device, self._dir / "rendezvous", threads, os.getpid(), self._dir / "control"]
            cmd = [sys.executable, "-m", __name__, *map(str, args)]
            self._procs.append(subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL))
        accepted: dict[int, object] = {}

        def accept():
            with contextlib.suppress(OSError):
                for _ in range(world):
                    conn = listener.accept()
                    accepted[conn.recv()] = conn

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        deadline = time.monotonic() + self.timeout
        while thread.is_alive() and time.monotonic() < deadline:
            thread.join(0.2)
            dead = [r for r, p in enumerate(self._procs) if p.poll() is not None]
            if dead:
                break
        listener.close()
        self._conns = [accepted.get(rank) for rank in range(world)]
        if None in self._conns:
            missing = [r for r, c in enumerate(self._conns) if c is None]
            codes = {r: self._procs[r].poll() for r in missing}
            self.close()
            raise RuntimeError(f"rank(s) {missing} of {world} did not start (exit codes {codes})")

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.poll() is None for p in self._procs)

    def _ask(self, message) -> list:
        """``message`` to every process; their answers, in rank order (raises if any failed)."""
        answers, problems = [], []
        for rank, conn in enumerate(self._conns):
            try:
                conn.send(message)
            except OSError:
                problems.append(f"rank {rank} of {self.world} died (exit code {self._procs[rank].poll()})")
        for rank, (conn, proc) in enumerate(zip(self._conns, self._procs, strict=True)):
            if problems:
                break  # the others may wait on it in a collective: the group is ended below
            try:
                if not conn.poll(self.timeout):
                    problems.append(f"rank {rank} of {self.world} timed out on {message[0]!r}")
                    break
                status, value = conn.recv()
            except (EOFError, OSError):
                problems.append(f"rank {rank} of {self.world} died (exit code {proc.wait()}) on {message[0]!r}")
                break
            if status == "error":
                problems.append(f"rank {rank} of {self.world}: {value}")
                break
            answers.append(value)
        if problems:
            self.close()
            raise RuntimeError("; ".join(problems))
        return answers

    def load(self, context: CaseContext) -> None:
        """The case's model on every process (nothing to do if it is the one loaded)."""
        case = context.case
        folder = context.weights_dir
        if folder is None:  # this process's weights: written once for the processes to map
            if self._weights_dir is not None:
                shutil.rmtree(self._weights_dir, ignore_errors=True)
            from conformance.spec import write_weights_dir

            folder = self._weights_dir = write_weights_dir(context.weights, Path(tempfile.mkdtemp(dir=self._dir)))
        key = json.dumps([case.config.to_dict(), case.spec.layers, str(folder)])
        if key != self._loaded:
            self._loaded = None
            self._ask(("load", case.config.to_dict(), case.spec.layers, str(folder)))
            self._loaded = key

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The taps of ``x`` (..., input_dim): every process's tokens, in token order."""
        parts = self._ask(("run", x))
        if math.prod(x.shape[:-1]) < self.world:  # every process read every token (token_bounds)
            parts = parts[:1]
        taps = {}
        for name in parts[0]:
            tap = np.concatenate([p[name] for p in parts], axis=0)
            taps[name] = tap.reshape(*x.shape[:-1], -1) if _tap_is_output(name) else tap
        return taps

    def stage(self, x: np.ndarray) -> None:
        """``x`` split over the processes and left on their devices for :meth:`timed`."""
        self._ask(("stage", x))

    def timed(self) -> None:
        """One forward pass of every process on its staged tokens (returns when all have
        finished, their devices included)."""
        self._ask(("timed",))

    def close(self) -> None:
        for conn in self._conns:
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.send(("close",))
        for proc in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for conn in self._conns:
            if conn is not None:
                conn.close()
        self._procs, self._conns = [], []
        shutil.rmtree(self._dir, ignore_errors=True)


_GROUPS: dict[tuple[str, int], RankGroup] = {}
_KEY_VARIABLE = "PKM_DIST_AUTHKEY"


def _rank_main(rank, world, device, rendezvous, threads, parent_pid, control) -> None:
    """One process of a :class:`RankGroup`: call back, join the group, then serve requests
    until ``close`` (or until the process that started it has gone)."""
    import datetime
    from multiprocessing.connection import Client

    conn = Client(control, family="AF_UNIX", authkey=bytes.fromhex(os.environ.pop(_KEY_VARIABLE)))
    conn.send(rank)

    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    backend = "nccl" if device == "cuda" else "gloo"
    where = torch.device(f"cuda:{rank}" if device == "cuda" else "cpu")
    if device == "cuda":
        torch.cuda.set_device(where)
    dist.init_process_group(
        backend,
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=RankGroup.timeout),
    )
    model, staged = None, None
    try:
        while True:
            while not conn.poll(5.0):
                if os.getppid() != parent_pid:
                    return  # orphaned: the worker that drove this group is gone
            message = conn.recv()
            op = message[0]
            if op == "close":
                return
            try:
                if op == "load":
                    model = None
                    model = _load(*message[1:], where=where)
                    answer = None
                elif op == "run":
                    x = message[1]
                    with torch.inference_mode():
                        taps = model(_my_tokens(x, rank, world, where), return_taps=True)
                    answer = {k: v.cpu().numpy() for k, v in taps.items()}
                elif op == "stage":
                    staged = _my_tokens(message[1], rank, world, where)
                    answer = None
                elif op == "timed":
                    with torch.inference_mode():
                        model(staged)
                    if device == "cuda":
                        torch.cuda.synchronize(where)
                    answer = None
                else:
                    raise ValueError(f"unknown request {op!r}")
            except Exception as exc:
                conn.send(("error", f"{type(exc).__name__}: {exc}".strip()))
                continue
            conn.send(("ok", answer))
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _my_tokens(x: np.ndarray, rank: int, world: int, where):
    """This process's share of ``x``'s tokens, (tokens, input_dim) on ``where``."""
    import torch

    from pkm_models.torch_sharded import token_bounds

    flat = x.reshape(-1, x.shape[-1])
    start, stop = token_bounds(flat.shape[0], world)[rank]
    return torch.from_numpy(np.ascontiguousarray(flat[start:stop])).to(where)


def _load(config: dict, layers: int, folder: str, where):
    """The reference model of ``config`` on the mapped weights of ``folder``, its tables
    sharded: this process's columns read from the table's file in blocks (the mapped table
    itself is never touched, so never held), the mapping then let go; on ``where``."""
    import torch

    from conformance.spec import read_columns, read_weights_dir
    from pkm_models.config import PKMConfig
    from pkm_models.torch_pkm import build_torch_model
    from pkm_models.torch_sharded import shard_values

    weights = read_weights_dir(Path(folder), writable=True)
    model = build_torch_model(PKMConfig.from_dict(config), layers, weights=weights)
    del weights

    def columns(name, start, stop):
        return torch.from_numpy(read_columns(Path(folder) / f"{name}.npy", start, stop))

    return shard_values(model, read_columns=columns).to(where).eval()


if __name__ == "__main__":  # a process of a RankGroup
    _rank, _world, _device, _rendezvous, _threads, _parent, _control = sys.argv[1:]
    _rank_main(int(_rank), int(_world), _device, _rendezvous, int(_threads), int(_parent), _control)
