"""What a model is, for export and for conformance: config, layer count and weights.

Weights come from ``make_weights(config, seed)``, optionally with sub-keys duplicated to
force exact score ties (the ``near-tie`` case), or from a stored ``weights.npz``.

A model of several GB is read once: :meth:`ModelSpec.write_weights` writes its weights into
a folder of ``.npy`` files (drawn and written block by block for a seed), and
:func:`read_weights_dir` memory-maps them, so that every process that needs them (the
parent that judges, each worker) shares the one copy in the page cache instead of holding
its own.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
from pathlib import Path

import numpy as np

from pkm_models.config import ConfigError, PKMConfig, Preset, check_stackable, tap_names
from pkm_models.convert import check_weights, expected_shapes
from pkm_models.weights import Weights, generation_bytes, make_weights, shared_aliases, weight_blocks


def _write_npy(path: Path, shape: tuple[int, ...], blocks) -> None:
    """A float32 ``.npy`` of ``shape`` from its blocks along the first axis, in order."""
    with open(path, "wb") as f:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False}
        np.lib.format.write_array_header_1_0(f, {**header, "shape": tuple(shape)})
        for block in blocks:
            np.ascontiguousarray(block, dtype=np.float32).tofile(f)


def write_weights_dir(weights, folder: Path, aliases: dict[str, str] | None = None) -> Path:
    """Torch-named ``weights`` (a mapping, or ``(name, shape, blocks)`` triples) as
    ``folder/<name>.npy``; returns ``folder``. ``aliases`` (name -> name): tensors that are
    another one (a shared value table, :func:`pkm_models.weights.shared_aliases`), written
    once and hard-linked under their own names (one file on disk, one copy in the page
    cache; copied where the file system has no hard links), never drawn or read again."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    aliases = aliases or {}
    items = weights.items() if hasattr(weights, "items") else weights
    for item in items:
        name, shape, blocks = item if len(item) == 3 else (item[0], item[1].shape, [item[1]])
        if name not in aliases:
            _write_npy(folder / f"{name}.npy", shape, blocks)
    link_weights_dir({name: folder / f"{target}.npy" for name, target in aliases.items()}, folder)
    return folder


# why os.link fails where a copy would not: another file system, or one without hard links
_NO_HARD_LINKS = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP}


def link_weights_dir(files: dict[str, Path], folder: Path) -> Path:
    """``folder/<name>.npy`` for each ``name -> .npy file`` of ``files``, hard-linked (one
    file on disk, one copy in the page cache; copied by the kernel where the file system
    has no hard links): another folder's tensors under new names without reading them, so
    that no process maps (and so holds) their pages to write them. Returns ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        target = folder / f"{name}.npy"
        target.unlink(missing_ok=True)  # left by an attempt that failed after it (a full disk)
        try:
            os.link(source, target)
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            shutil.copyfile(source, target)
    return folder


def read_weights_dir(folder: Path, writable: bool = False) -> Weights:
    """The weights of a folder written by :func:`write_weights_dir`, memory-mapped: read
    only, or ``writable`` as private copy-on-write pages (what torch wants to wrap; the
    pages stay shared with the file until written, which inference never does)."""
    files = sorted(Path(folder).glob("*.npy"))
    return {f.stem: np.load(f, mmap_mode="c" if writable else "r", allow_pickle=False) for f in files}


def read_columns(path: Path, start: int, stop: int, block_bytes: int = 64 << 20) -> np.ndarray:
    """Columns ``[start, stop)`` of the 2-D float32 ``.npy`` at ``path``, read in blocks of
    rows: what a process that holds a slice of a table needs, without ever mapping (and so
    holding) the whole table."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        if len(shape) != 2 or fortran or dtype != np.float32 or not 0 <= start <= stop <= shape[1]:
            raise ValueError(f"{path}: columns {start}:{stop} of a {shape} {dtype} array")
        rows, width = shape
        out = np.empty((rows, stop - start), np.float32)
        step = max(1, block_bytes // max(1, 4 * width))
        block = np.empty((step, width), np.float32)
        for first in range(0, rows, step):
            n = min(step, rows - first)
            view = block[:n]
            if f.readinto(memoryview(view).cast("B")) != view.nbytes:
                raise ValueError(f"{path}: shorter than its header says")
            out[first : first + n] = view[:, start:stop]
    return out


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
    """A user's checkpoint file as a case names it: which memories, in which order, and the
    sha256 and size it had when the case was loaded (a golden pins them)."""

    path: Path
    memories: tuple[str, ...]
    sha256: str
    size: int
    knn: int | None = None  # given by the case where the file does not record it

    def to_json(self, relative_to: Path | None = None) -> dict:
        shown = self.path
        if relative_to is not None and self.path.is_relative_to(relative_to):
            shown = self.path.relative_to(relative_to)
        return {"file": str(shown), "memories": list(self.memories), "sha256": self.sha256, "size": self.size}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """``layers`` PKM layers of ``config`` with the weights of ``seed``.

    ``duplicate_subkeys``: in every head and half, sub-key ``2i + 1`` is made a copy of
    sub-key ``2i`` for ``i < duplicate_subkeys``, so that candidate scores tie exactly.
    ``weights_file``: a ``.npz`` of torch-named weights, or a folder of ``.npy`` files
    (memory-mapped, :func:`read_weights_dir`), used instead of the generated ones.
    ``checkpoint``: a user's checkpoint whose memories are the layers (instead of a seed).
    """

    name: str
    config: PKMConfig
    layers: int = 1
    seed: int = 0
    duplicate_subkeys: int = 0
    weights_file: Path | None = None
    checkpoint: CheckpointRef | None = None

    def __post_init__(self) -> None:
        check_stackable(self.config, self.layers, self.name)
        if self.duplicate_subkeys < 0 or 2 * self.duplicate_subkeys > self.config.n_keys:
            raise ConfigError(
                f"{self.name}: duplicate_subkeys must be in [0, n_keys/2 = {self.config.n_keys // 2}], "
                f"got {self.duplicate_subkeys}"
            )

    @classmethod
    def from_preset(cls, preset: Preset, seed: int = 0) -> ModelSpec:
        return cls(name=preset.name, config=preset.config, layers=preset.layers, seed=seed)

    def output_names(self, tapped: bool) -> list[str]:
        return tap_names(self.layers, self.config) if tapped else ["output"]

    @property
    def weight_bytes(self) -> int:
        """float32 bytes of the weights, a shared value table counted once."""
        shapes = expected_shapes(self.config)
        table = 4 * int(np.prod(shapes["values.weight"]))
        total = self.layers * sum(4 * int(np.prod(s)) for s in shapes.values())
        return total - (self.layers - 1) * table if self.config.share_values else total

    def generation_bytes(self) -> int:
        """The transient memory of drawing this model's generated weights, one block at a
        time (0 for weights read from a file)."""
        if self.checkpoint is not None or self.weights_file is not None:
            return 0
        return generation_bytes(self.config)

    def generated_weights(self) -> Weights:
        weights = make_weights(self.config, self.seed, layers=self.layers)
        if self.duplicate_subkeys:
            for name, array in weights.items():
                if name == "keys" or name.endswith(".keys"):
                    for i in range(self.duplicate_subkeys):
                        array[:, :, 2 * i + 1] = array[:, :, 2 * i]  # (heads,2,n_keys,half)
        return weights

    def weights(self) -> Weights:
        if self.checkpoint is not None:
            return self.checkpoint_weights()
        if self.weights_file is None:
            return self.generated_weights()
        if Path(self.weights_file).is_dir():
            weights = read_weights_dir(self.weights_file, writable=True)
        else:
            with np.load(self.weights_file) as data:
                weights = {k: data[k] for k in data.files}
        check_weights(weights, expected_shapes(self.config, self.layers), str(self.weights_file))
        return weights

    def write_weights(self, folder: Path) -> Path:
        """This model's weights as a folder of ``.npy`` files (see :func:`read_weights_dir`).
        Generated weights are drawn and written in blocks (a few hundred MB of memory at
        most, whatever the model's size); others are read once and written."""
        aliases = shared_aliases(self.config, self.layers)  # a shared table: one file
        if self.checkpoint is not None or self.weights_file is not None:
            return write_weights_dir(self.weights(), folder, aliases)
        blocks = weight_blocks(self.config, self.seed, layers=self.layers)
        if self.duplicate_subkeys:  # the sub-keys are small: duplicated in memory
            return write_weights_dir(self.generated_weights(), folder, aliases)
        return write_weights_dir(blocks, folder, aliases)

    def checkpoint_weights(self) -> Weights:
        """The checkpoint's memories as this spec's layers; the file must still be the one
        the case was loaded with."""
        from pkm_models.checkpoint import read_checkpoint

        ref = self.checkpoint
        read = read_checkpoint(ref.path, knn=self.config.knn, memories=list(ref.memories))
        if read.sha256 != ref.sha256:
            raise ConfigError(
                f"{ref.path} changed while in use (sha256 {read.sha256[:12]}..., was {ref.sha256[:12]}...)"
            )
        return read.stacked_weights()

    def torch_model(self, weights: Weights | None = None):
        """The PyTorch reference in eval mode, with ``weights`` (default: :meth:`weights`)."""
        from pkm_models.torch_pkm import build_torch_model

        return build_torch_model(
            self.config, self.layers, weights=self.weights() if weights is None else weights
        ).eval()

    def keras_model(self, weights: Weights | None = None, method: str = "einsum"):
        """The Keras port with ``weights`` (default: :meth:`weights`) and this weighted-sum method."""
        from pkm_models.keras_pkm import build_keras_model

        weights = self.weights() if weights is None else weights
        return build_keras_model(self.config, self.layers, seed=None, method=method, weights=weights)
