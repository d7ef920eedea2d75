"""Conformance cases: data files, one per case, in ``conformance/cases/<name>.toml``.

A case names a model (a preset, config overrides, a weight seed), an input (shape and
seed) and how its golden is stored. Adding one is writing a file and running
``python -m conformance golden regenerate --case NAME``::

    description = "what this case is for"
    preset = "small"            # tiny, small, xlm (single-layer presets)
    seed = 0                    # weight seed
    layers = 1                  # PKM layers applied in sequence (needs input_dim == output_dim)

    [config]                    # optional: PKMConfig fields that differ from the preset
    query_batchnorm = true

    [input]
    shape = [2, 7, 64]          # (batch, sequence, input_dim)
    seed = 1

    [weights]                   # optional
    store = true                # keep weights.npz and model.onnx in the golden (default: under 8 MB)
    duplicate_subkeys = 0       # pairs of identical sub-keys per head and half (forces ties)
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from conformance.spec import ModelSpec
from pkm_models.config import ConfigError, PKMConfig, get_preset
from pkm_models.errors import PKMError
from pkm_models.weights import make_input

STORE_LIMIT_BYTES = 8 << 20
NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_SCHEMA: dict[str, set[str] | None] = {
    "description": None,
    "preset": None,
    "seed": None,
    "layers": None,
    "config": None,
    "input": {"shape", "seed"},
    "weights": {"store", "duplicate_subkeys"},
}


class CaseError(PKMError):
    """A case file that is missing, unreadable or invalid."""


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    description: str
    spec: ModelSpec
    input_shape: tuple[int, ...]
    input_seed: int
    store_weights: bool
    source: Path

    @property
    def config(self) -> PKMConfig:
        return self.spec.config

    def make_input(self) -> np.ndarray:
        return make_input(self.input_shape, self.input_seed)

    def memory_bytes(self) -> int:
        """An upper estimate of the memory one path needs for this case: the weights twice
        (the case's copy and the runtime's), the input, and the largest intermediates of
        any path per layer (the product-key candidates' scores and indices, the gathered
        value rows, the output)."""
        c, tokens = self.config, math.prod(self.input_shape[:-1])
        rows = tokens * c.heads
        intermediates = rows * c.knn * c.knn * 12 + rows * c.knn * c.v_dim * 4 + tokens * c.v_dim * 8
        return 2 * self.spec.weight_bytes + 4 * math.prod(self.input_shape) + 2 * intermediates

    def check_fits(self, available: int | None = None) -> None:
        """Refuse (CaseError) a case that would not fit in this machine's memory, before
        anything is allocated."""
        available = available_memory() if available is None else available
        need = self.memory_bytes()
        if available and need > available:
            raise CaseError(
                f"{self.source}: this case needs about {need / 2**30:,.1f} GiB (weights "
                f"{self.spec.weight_bytes / 2**30:,.1f} GiB, input {self.input_shape}); this machine has "
                f"{available / 2**30:,.1f} GiB available. Use a smaller input or model"
            )

    @classmethod
    def from_json(cls, data: dict[str, Any], source: Path) -> Case:
        """The inverse of :meth:`to_json` (how a worker process receives its case)."""
        spec = ModelSpec(
            name=data["name"],
            config=PKMConfig.from_dict(data["config"]),
            layers=data["layers"],
            seed=data["weight_seed"],
            duplicate_subkeys=data["duplicate_subkeys"],
        )
        return cls(
            name=data["name"],
            description=data["description"],
            spec=spec,
            input_shape=tuple(data["input"]["shape"]),
            input_seed=data["input"]["seed"],
            store_weights=data["weights_stored"],
            source=Path(source),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "config": self.config.to_dict(),
            "layers": self.spec.layers,
            "weight_seed": self.spec.seed,
            "duplicate_subkeys": self.spec.duplicate_subkeys,
            "input": {"shape": list(self.input_shape), "seed": self.input_seed},
            "weights_stored": self.store_weights,
        }


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def default_cases_dir() -> Path:
    return Path.cwd() / "conformance" / "cases"


def _int(value: Any, where: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CaseError(f"{where}: expected an integer >= {minimum}, got {value!r}")
    return value


def load_case(path: Path) -> Case:
    path = Path(path)
    name = path.stem
    if not NAME.match(name):
        raise CaseError(f"{path}: case names are lower-case letters, digits, '-' and '_'; got {name!r}")
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise CaseError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise CaseError(f"{path}: not valid TOML: {exc}") from exc
    unknown = sorted(set(data) - set(_SCHEMA))
    if unknown:
        raise CaseError(f"{path}: unknown key(s) {unknown}; known: {sorted(_SCHEMA)}")
    for table, keys in _SCHEMA.items():
        if keys is not None and table in data:
            if not isinstance(data[table], dict):
                raise CaseError(f"{path}: [{table}] must be a table")
            extra = sorted(set(data[table]) - keys)
            if extra:
                raise CaseError(f"{path}: unknown key(s) {extra} in [{table}]; known: {sorted(keys)}")
    try:
        preset = get_preset(data.get("preset", ""))
        if preset.layers != 1:
            raise CaseError(
                f"{path}: cases use single-layer presets and say `layers = N`; {preset.name!r} has {preset.layers}"
            )
        config = preset.config
        if "config" in data:
            config = PKMConfig.from_dict({**config.to_dict(), **data["config"]})
    except ConfigError as exc:
        raise CaseError(f"{path}: {exc}") from exc
    if "input" not in data or "shape" not in data["input"]:
        raise CaseError(f"{path}: [input] shape is required, e.g. shape = [2, 7, {config.input_dim}]")
    shape = data["input"]["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) != 3
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
    ):
        raise CaseError(
            f"{path}: [input] shape must be 3 positive integers (batch, sequence, input_dim), got {shape!r}"
        )
    if shape[-1] != config.input_dim:
        raise CaseError(
            f"{path}: [input] shape {shape} ends in {shape[-1]}, but the model's input_dim is {config.input_dim}"
        )
    weights = data.get("weights", {})
    try:
        spec = ModelSpec(
            name=name,
            config=config,
            layers=_int(data.get("layers", 1), f"{path}: layers", minimum=1),
            seed=_int(data.get("seed", 0), f"{path}: seed"),
            duplicate_subkeys=_int(weights.get("duplicate_subkeys", 0), f"{path}: [weights] duplicate_subkeys"),
        )
    except ConfigError as exc:
        raise CaseError(f"{path}: {exc}") from exc
    store = weights.get("store", spec.weight_bytes <= STORE_LIMIT_BYTES)
    if not isinstance(store, bool):
        raise CaseError(f"{path}: [weights] store must be true or false, got {store!r}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise CaseError(f"{path}: description must be a string")
    return Case(
        name=name,
        description=description,
        spec=spec,
        input_shape=tuple(shape),
        input_seed=_int(data["input"].get("seed", 0), f"{path}: [input] seed"),
        store_weights=store,
        source=path,
    )


def load_cases(cases_dir: Path | None = None, names: list[str] | None = None) -> list[Case]:
    """The named cases (all, sorted by name, when ``names`` is empty)."""
    cases_dir = Path(cases_dir or default_cases_dir())
    if not cases_dir.is_dir():
        raise CaseError(f"no cases folder at {cases_dir}")
    available = sorted(p.stem for p in cases_dir.glob("*.toml"))
    wanted = list(dict.fromkeys(names)) if names else available
    unknown = [n for n in wanted if n not in available]
    if unknown:
        raise CaseError(f"unknown case(s) {unknown}; available: {available}")
    return [load_case(cases_dir / f"{n}.toml") for n in wanted]
