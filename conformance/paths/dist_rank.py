"""One process of a sharded path's group (:class:`conformance.paths.dist_paths.RankGroup`):
``python -m conformance.paths.dist_rank RANK WORLD DEVICE RENDEZVOUS THREADS PARENT_PID FD``.

Kept apart from ``dist_paths`` (which the path registry imports) so that running it does
not import it twice. It joins the ``torch.distributed`` group, then serves the requests that
arrive on the connection inherited as file descriptor ``FD``, one answer per request,
until ``close`` or until the process that started it has gone:

* ``("load", config, layers, folder)``: the case's model, sharded (each table's columns of
  this process read from ``folder``'s files in blocks; nothing else of a table is held);
* ``("unload",)``: drop it;
* ``("run", x)``: this process's tokens of ``x`` through the model: its taps, as numpy;
* ``("stage", x)`` then ``("timed",)``: a forward pass on tokens left on the device.

Answers are ``("ok", value)`` or ``("error", "Type: message")``.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import sys
from pathlib import Path

import numpy as np

# a collective waits this long for the others: shorter than the driver's own wait, so that a
# process stuck behind a failed one gives up (and says so) before the driver does
COLLECTIVE_TIMEOUT_S = 300


def _my_tokens(x: np.ndarray, rank: int, world: int, where):
    """This process's share of ``x``'s tokens, (tokens, input_dim) on ``where``."""
    import torch

    from pkm_models.torch_sharded import token_bounds

    flat = x.reshape(-1, x.shape[-1])
    start, stop = token_bounds(flat.shape[0], world)[rank]
    return torch.from_numpy(np.ascontiguousarray(flat[start:stop])).to(where)


def _load(config: dict, layers: int, folder: str, where):
    """The reference model of ``config`` on the mapped weights of ``folder``, every table
    replaced by this process's columns, read from the table's file in blocks."""
    import torch

    from conformance.spec import read_columns, read_weights_dir
    from pkm_models.config import PKMConfig
    from pkm_models.torch_sharded import build_sharded_model

    def columns(name, start, stop):
        return torch.from_numpy(read_columns(Path(folder) / f"{name}.npy", start, stop))

    weights = read_weights_dir(Path(folder), writable=True)
    return build_sharded_model(PKMConfig.from_dict(config), layers, weights, columns).to(where).eval()


def main(rank: int, world: int, device: str, rendezvous: str, threads: int, parent_pid: int, fd: int) -> None:
    from multiprocessing.connection import Connection

    conn = Connection(fd)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    where = torch.device(f"cuda:{rank}" if device == "cuda" else "cpu")
    if device == "cuda":
        torch.cuda.set_device(where)
    dist.init_process_group(
        "nccl" if device == "cuda" else "gloo",
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    conn.send(("ok", None))  # joined
    model, staged = None, None
    try:
        while True:
            while not conn.poll(5.0):
                if os.getppid() != parent_pid:
                    return  # orphaned: the process that drove this group is gone
            message = conn.recv()
            op = message[0]
            if op == "close":
                return
            try:
                answer = None
                if op == "load":
                    model = staged = None
                    gc.collect()
                    model = _load(*message[1:], where=where)
                elif op == "unload":
                    model = staged = None
                    gc.collect()
                elif op == "run":
                    with torch.inference_mode():
                        taps = model(_my_tokens(message[1], rank, world, where), return_taps=True)
                    answer = {k: v.cpu().numpy() for k, v in taps.items()}
                elif op == "stage":
                    staged = _my_tokens(message[1], rank, world, where)
                elif op == "timed":
                    with torch.inference_mode():
                        model(staged)
                    if device == "cuda":
                        torch.cuda.synchronize(where)
                else:
                    raise ValueError(f"unknown request {op!r}")
            except Exception as exc:
                conn.send(("error", f"{type(exc).__name__}: {exc}".strip()))
                continue
            conn.send(("ok", answer))
    finally:
        with contextlib.suppress(Exception):  # ending anyway
            dist.destroy_process_group()


if __name__ == "__main__":
    _rank, _world, _device, _rendezvous, _threads, _parent, _fd = sys.argv[1:]
    main(int(_rank), int(_world), _device, _rendezvous, int(_threads), int(_parent), int(_fd))
