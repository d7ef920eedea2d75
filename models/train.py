"""Train a small network of PKM layers on key -> value recall, and save it in XLM's layout.

``python -m pkm_models.train`` (from the repository root; CPU, deterministic, well under a
minute) writes

* ``conformance/cases/trained.pth``: an XLM-style training checkpoint (``"model"``
  state_dict with the memories under ``memories.<i>_after.*`` and XLM's
  ``query_proj.query_mlps.*`` names, ``"params"`` as a plain dict of ``mem_*`` options, and
  vocabulary entries that are not tensors);
* ``conformance/cases/trained-input.npy``: real activations, the input of the first memory
  for held-out samples, shape (4, 16, input_dim) float32;

and prints the task accuracy with and without the memories, and the selection margins of
the trained and the untrained memories on that input.

The task: 512 keys, each with a random value among 32 classes. A key's input is a frozen
random embedding plus fresh gaussian noise; the network is ``memories[0] -> memories[1] ->
linear readout``, the memories applied directly one after the other (the conformance
network), not residually as in XLM's transformer. Without the memories, a linear readout of
the frozen embedding cannot hold 512 random labels in 32 dimensions; with them it can.
"""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pkm_models.config import PKMConfig
from pkm_models.selection import selection_margins
from pkm_models.torch_pkm import HashingMemory

CONFIG = PKMConfig(input_dim=32, output_dim=32, k_dim=16, heads=2, knn=4, n_keys=16, query_batchnorm=True)
LAYERS = 2
VOCAB = 512  # keys
CLASSES = 32  # values
NOISE = 0.3  # std of the noise added to a key's embedding (the embedding's entries have std 1)
STEPS = 1500
BATCH = 256
LR = 5e-3
INPUT_SHAPE = (4, 16)  # held-out samples saved as the conformance input
AMBIGUOUS = 1e-5  # the scores atol of golden/tolerances.toml: margins below it count as ambiguous


class RecallNet(nn.Module):
    """Frozen key embeddings (+ noise) -> ``layers`` PKM memories in sequence -> linear readout."""

    def __init__(self, config: PKMConfig, layers: int, use_memory: bool = True):
        super().__init__()
        self.embeddings = nn.Embedding(VOCAB, config.input_dim)
        nn.init.normal_(self.embeddings.weight)
        self.embeddings.weight.requires_grad_(False)
        self.memories = nn.ModuleDict(
            {f"{i}_after": HashingMemory(**config.to_dict()) for i in range(layers)} if use_memory else {}
        )
        self.pred_layer = nn.ModuleDict({"proj": nn.Linear(config.output_dim, CLASSES)})

    def memory_input(self, keys: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.embeddings(keys) + noise  # (..., input_dim)

    def forward(self, keys: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        h = self.memory_input(keys, noise)
        for memory in self.memories.values():
            h = memory(h)  # (..., dim)
        return self.pred_layer["proj"](h)  # (..., classes)


def _samples(gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    keys = torch.randint(0, VOCAB, (n,), generator=gen)
    noise = NOISE * torch.randn(n, CONFIG.input_dim, generator=gen)
    return keys, noise


def _accuracy(net: RecallNet, labels: torch.Tensor, keys: torch.Tensor, noise: torch.Tensor) -> float:
    net.eval()
    with torch.no_grad():
        return float((net(keys, noise).argmax(-1) == labels[keys]).float().mean())


def train(use_memory: bool = True, steps: int = STEPS, log=print) -> tuple[RecallNet, RecallNet, dict]:
    """(trained net, the same net before training, accuracies); deterministic."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, CLASSES, (VOCAB,), generator=gen)  # the value of each key
    net = RecallNet(CONFIG, LAYERS, use_memory=use_memory)
    untrained = RecallNet(CONFIG, LAYERS, use_memory=use_memory)
    untrained.load_state_dict(net.state_dict())
    test = _samples(torch.Generator().manual_seed(2), 4096)  # held-out noise
    stats = {"before": _accuracy(net, labels, *test)}
    optimizer = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=LR)
    for step in range(steps):
        net.train()
        keys, noise = _samples(gen, BATCH)
        loss = F.cross_entropy(net(keys, noise), labels[keys])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if log and (step + 1) % 500 == 0:
            log(f"  step {step + 1}/{steps}: loss {loss.item():.4f}")
    stats["after"] = _accuracy(net, labels, *test)
    net.eval()
    untrained.eval()
    return net, untrained, stats


def xlm_checkpoint(net: RecallNet, steps: int) -> dict:
    """The trained net as XLM's trainer saves it: state_dict under "model", params as a dict."""
    state = {}
    for name, tensor in net.state_dict().items():
        name = name.replace(".query_proj.", ".query_proj.query_mlps.")  # XLM's QueryMLP names
        state[name] = tensor.detach().clone().contiguous()
    c = CONFIG
    params = {
        "emb_dim": c.input_dim,
        "n_layers": LAYERS,
        "n_words": VOCAB,
        "use_memory": True,
        "mem_implementation": "pq_fast",
        "mem_enc_positions": [(i, "after") for i in range(LAYERS)],
        "mem_dec_positions": [],
        "mem_k_dim": c.k_dim,
        "mem_v_dim": -1,
        "mem_heads": c.heads,
        "mem_knn": c.knn,
        "mem_n_keys": c.n_keys,
        "mem_size": c.n_keys**2,
        "mem_product_quantization": True,
        "mem_keys_type": "uniform",
        "mem_keys_learn": True,
        "mem_use_different_keys": True,
        "mem_query_layer_sizes": [0, 0],
        "mem_query_kernel_sizes": "",
        "mem_query_bias": True,
        "mem_query_batchnorm": c.query_batchnorm,
        "mem_share_values": False,
        "mem_shuffle_indices": False,
        "mem_modulo_size": -1,
        "mem_normalize_query": False,
        "mem_temperature": 1,
        "mem_score_softmax": True,
        "mem_score_subtract": "",
        "mem_score_normalize": False,
        "mem_input_dropout": 0.0,
        "mem_query_dropout": 0.0,
        "mem_value_dropout": 0.0,
    }
    return {
        "epoch": 0,
        "n_total_iter": steps,
        "model": state,
        "dico_id2word": {i: f"key{i}" for i in range(VOCAB)},
        "dico_word2id": {f"key{i}": i for i in range(VOCAB)},
        "dico_counts": {f"key{i}": 1 for i in range(VOCAB)},
        "params": params,
    }


def held_out_input(net: RecallNet) -> np.ndarray:
    """The first memory's input for held-out samples: (4, 16, input_dim) float32."""
    keys, noise = _samples(torch.Generator().manual_seed(3), int(np.prod(INPUT_SHAPE)))
    with torch.no_grad():
        x = net.memory_input(keys, noise)
    return x.reshape(*INPUT_SHAPE, CONFIG.input_dim).numpy().astype(np.float32)


def margins(net: RecallNet, x: np.ndarray) -> list[tuple[float, int, int]]:
    """Per memory, on input ``x`` (chained): (smallest margin, ambiguous rows, rows)."""
    out = []
    h = torch.from_numpy(x)
    with torch.no_grad():
        for memory in net.memories.values():
            taps = memory(h, return_taps=True)
            m = selection_margins(taps["query"].numpy(), memory.keys.numpy(), memory.knn)
            out.append((float(m.min()), int((m < AMBIGUOUS).sum()), m.size))
            h = taps["output"]
    return out


def _save_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pkm_models.train",
        description="Train a 2-memory PKM network on key -> value recall (CPU, deterministic) and save it in "
        "XLM's checkpoint layout with a file of real activations for the conformance case 'trained'.",
    )
    parser.add_argument("--out", default="conformance/cases", help="folder to write to (default conformance/cases)")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"training steps (default {STEPS})")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if not out.is_dir():
        parser.error(f"--out {out}: no such folder")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    torch.set_num_threads(1)  # one thread: the same sums in the same order on every run
    torch.use_deterministic_algorithms(True)

    print(f"training {LAYERS} memories of {CONFIG} for {args.steps} steps")
    net, untrained, acc = train(steps=args.steps)
    print("training the same readout without memories")
    _, _, acc_plain = train(use_memory=False, steps=args.steps, log=None)
    print(
        f"held-out accuracy (chance {1 / CLASSES:.3f}): with memories {acc['before']:.3f} before training, "
        f"{acc['after']:.3f} after; without memories {acc_plain['after']:.3f}"
    )

    x = held_out_input(net)
    buffer = io.BytesIO()  # not the file: torch.save names the archive's folder after the file
    torch.save(xlm_checkpoint(net, args.steps), buffer)
    _save_atomic(out / "trained.pth", lambda p: p.write_bytes(buffer.getvalue()))
    _save_atomic(out / "trained-input.npy", lambda p: np.save(p, x))
    print(f"wrote {out / 'trained.pth'} and {out / 'trained-input.npy'} {x.shape}")

    print(f"selection margins on that input (ambiguous: margin < {AMBIGUOUS:g}):")
    for label, model in (("trained", net), ("untrained (random init)", untrained)):
        for name, (low, ambiguous, rows) in zip(net.memories, margins(model, x), strict=True):
            print(f"  {label:<24} memory {name}: smallest margin {low:.3e}, ambiguous rows {ambiguous}/{rows}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
