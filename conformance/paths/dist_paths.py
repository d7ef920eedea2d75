"""The PyTorch reference with its value table sharded over N processes:
``torch-dist-cpu[N]`` (gloo) and ``torch-dist-cuda[N]`` (NCCL, one GPU per process).

What a user runs once a table outgrows one device (Meta's 7B memory is 8 GiB of bf16 per
model, 1 GiB per rank at 8 ranks). Each process holds a column slice of every table
(:mod:`pkm_models.torch_sharded`, Meta's ``Shard(1)``) and a share of the tokens; the
taps of every process's tokens are put back together in token order and judged against
the same unsharded golden as every other path.

The path launches its own processes (``python -m conformance.paths.dist_rank``, never a
re-import of the caller's script) the first time it runs, and keeps them for the next case:
a :class:`RankGroup` per (device, N) and process, ended with it; the case's model is dropped
when its context closes. Every process reads only its columns of each table from the run's
folder of weights. A process that raises, dies or hangs ends the whole group at once (the
others may be waiting for it in a collective), and the path reports which and why.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
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

    # its own family: one worker drives the run's one group of processes (as a torch path,
    # each torch worker would start a group of its own), and that worker needs no torch
    # before the check
    family = "dist"
    judged_in_bench = True  # a sharded read is only worth timing if it is the unsharded one

    def table_reads(self, context) -> list:
        from conformance.sweep import NotSwept

        raise NotSwept(
            "the sharded lookup runs in the group's rank processes; its tables are not swept yet "
            "(each shard is a slice of the mapped reference table)"
        )

    def __init__(self, device: str, world: int):
        if device not in ("cpu", "cuda") or world < 1:
            raise ValueError(f"a sharded path runs on cpu or cuda over N >= 1 processes, got {device!r}, {world!r}")
        self.device, self.world = device, world
        self.processes = world  # beside the worker that starts them (conformance.memory)
        self.name = f"torch-dist-{device}[{world}]"

    def check(self, case) -> None:
        import torch
        import torch.distributed as dist

        if case is not None and self.world > case.config.v_dim:
            raise PathUnavailable(
                f"cannot split the {case.config.v_dim} columns of a value row over {self.world} processes"
            )
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
        key = (self.device, self.world)
        group = _GROUPS.get(key)
        if group is None or not group.alive:
            if group is not None:
                group.close()  # a process died: end the others too
            group = _GROUPS[key] = RankGroup(self.device, self.world)
        group.load(context)
        context.on_close(group.unload)
        return group

    def prepare(self, context: CaseContext):
        return self._group(context).run

    def prepare_timed(self, context: CaseContext, x: np.ndarray):
        group = self._group(context)
        group.stage(x)
        return group.timed


def _tap_is_output(name: str) -> bool:
    return name.rpartition("/")[2] in ("output", LAYER_OUTPUT)


class GroupFailed(RuntimeError):
    """A process of a :class:`RankGroup` raised, died or hung; the group has been ended."""


class RankGroup:
    """``world`` processes in one ``torch.distributed`` group (``conformance.paths.dist_rank``),
    driven over a connection each: ``load`` a case's model (sharded), ``run`` an input (taps
    back), ``stage`` an input and time ``timed`` passes on it, ``unload``. Kept for the life
    of this process (:data:`_GROUPS`)."""

    timeout = 600.0  # seconds the group may take to answer one request

    def __init__(self, device: str, world: int):
        from multiprocessing import Pipe

        self.device, self.world = device, world
        self._dir = Path(tempfile.mkdtemp(prefix="pkm-dist-"))
        self._loaded: str | None = None
        self._written: tuple[int, Path] | None = None  # (id of the weights, the folder written for them)
        self._conns, self._procs = [], []
        atexit.register(self.close)
        # each process inherits one end of a socket pair (no listener, nothing to connect
        # to); the collectives' own sockets stay on the loopback unless the user says otherwise
        env = {**os.environ}
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        env.setdefault("NCCL_SOCKET_IFNAME", "lo")
        threads = max(1, len(os.sched_getaffinity(0)) // world)
        try:
            for rank in range(world):
                mine, theirs = Pipe()
                args = [rank, world, device, self._dir / "rendezvous", threads, os.getpid(), theirs.fileno()]
                cmd = [sys.executable, "-m", "conformance.paths.dist_rank", *map(str, args)]
                proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, pass_fds=(theirs.fileno(),))
                theirs.close()
                self._conns.append(mine)
                self._procs.append(proc)
            self._collect("start")  # every process has joined the group
        except BaseException:
            self.close()
            raise

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.poll() is None for p in self._procs)

    def _collect(self, what: str) -> list:
        """One answer from every process, in rank order; the first failure (an error, a
        process that exits, or no answer within ``timeout``) ends the group and raises
        :class:`GroupFailed` naming the process and the cause."""
        from multiprocessing.connection import wait

        answers: dict[int, object] = {}
        waiting = dict(enumerate(self._conns))
        deadline = time.monotonic() + self.timeout
        problem = ""
        while waiting and not problem:
            left = deadline - time.monotonic()
            ready = wait(list(waiting.values()), timeout=max(0.0, min(left, 1.0)))
            for rank, conn in list(waiting.items()):
                if conn not in ready:
                    continue
                try:
                    status, value = conn.recv()
                except (EOFError, OSError):
                    code = self._procs[rank].wait()
                    problem = f"rank {rank} of {self.world} died (exit code {code}) on {what!r}"
                    break
                if status == "error":
                    problem = f"rank {rank} of {self.world} on {what!r}: {value}"
                    break
                answers[rank] = value
                del waiting[rank]
            if not problem and waiting and time.monotonic() >= deadline:
                problem = f"rank(s) {sorted(waiting)} of {self.world} timed out on {what!r} after {self.timeout:.0f} s"
        if problem:
            self.close()  # the others may wait for it in a collective
            raise GroupFailed(problem)
        return [answers[rank] for rank in range(self.world)]

    def _ask(self, message) -> list:
        """``message`` to every process; their answers, in rank order (:meth:`_collect`)."""
        if not self.alive:
            dead = [(r, p.poll()) for r, p in enumerate(self._procs) if p.poll() is not None]
            self.close()
            why = f"rank {dead[0][0]} of {self.world} died (exit code {dead[0][1]})" if dead else "it was closed"
            raise GroupFailed(f"the group of {self.world} processes has ended: {why}")
        for rank, conn in enumerate(self._conns):
            try:
                conn.send(message)
            except OSError:
                code = self._procs[rank].poll()
                self.close()
                raise GroupFailed(f"rank {rank} of {self.world} died (exit code {code})") from None
        return self._collect(message[0])

    def load(self, context: CaseContext) -> None:
        """The case's model on every process (nothing to do if it is the one loaded)."""
        case = context.case
        folder = context.weights_dir
        if folder is None:  # the caller's weights: written once for the processes to read
            if self._written is None or self._written[0] != id(context.weights):
                from conformance.spec import write_weights_dir

                if self._written is not None:
                    shutil.rmtree(self._written[1], ignore_errors=True)
                written = write_weights_dir(context.weights, Path(tempfile.mkdtemp(dir=self._dir)))
                self._written = (id(context.weights), written)
            folder = self._written[1]
        key = json.dumps([case.config.to_dict(), case.spec.layers, str(folder)])
        if key != self._loaded:
            self._loaded = None
            self._ask(("load", case.config.to_dict(), case.spec.layers, str(folder)))
            self._loaded = key

    def unload(self) -> None:
        """Drop the loaded model (its processes stay, for the next case)."""
        if self._loaded is not None and self.alive:
            self._loaded = None
            with contextlib.suppress(GroupFailed):
                self._ask(("unload",))

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The taps of ``x`` (..., input_dim): every process's tokens, in token order."""
        parts = self._ask(("run", x))
        tokens = int(np.prod(x.shape[:-1]))
        if tokens < self.world:  # every process read every token (token_bounds)
            parts = parts[:1]
        taps = {}
        for name in parts[0]:
            tap = np.concatenate([p[name] for p in parts], axis=0)
            # the reference gives (..., dim) for an input of 3 or more dims, (tokens, dim) else
            taps[name] = tap.reshape(*x.shape[:-1], -1) if _tap_is_output(name) and x.ndim >= 3 else tap
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
            with contextlib.suppress(OSError):
                conn.send(("close",))
        for proc in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for conn in self._conns:
            conn.close()
        self._procs, self._conns, self._loaded = [], [], None
        shutil.rmtree(self._dir, ignore_errors=True)


_GROUPS: dict[tuple[str, int], RankGroup] = {}
