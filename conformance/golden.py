"""The golden store: one folder per case under ``golden/``, in DESIGN.md's layout.

::

    golden/<case>/case.json             the case, ordered tap list, provenance, sha256 of every file
    golden/<case>/weights.npz           float32, torch state_dict names (stored cases only)
    golden/<case>/model.onnx            tapped torch-fast export (stored cases only)
    golden/<case>/test_data_set_0/      input_0.pb, output_<k>.pb (k-th tap of case.json)

Goldens come from the PyTorch reference on CPU in float32. Regeneration is deterministic
(bytes depend only on the case and the machine's arithmetic; the provenance date is kept
when no tensor changed) and atomic: the new folder is written beside the old one, synced,
and swapped in with one ``renameat2(RENAME_EXCHANGE)``, so a regeneration killed at any
moment leaves the old golden intact. One regeneration at a time holds ``golden/.lock``.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime
import errno
import fcntl
import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from conformance.cases import Case
from pkm_models.config import TAPS
from pkm_models.errors import PKMError

DATA_SET = "test_data_set_0"
GENERATOR = "torch-eager-cpu (pkm_models.torch_pkm.HashingMemory, float32)"


class GoldenError(PKMError):
    """A golden that is missing, corrupt or inconsistent, or a store that is busy."""


@dataclasses.dataclass
class Golden:
    case: str
    meta: dict
    input: np.ndarray
    taps: dict[str, np.ndarray]
    weights: dict[str, np.ndarray] | None


def default_golden_dir() -> Path:
    return Path.cwd() / "golden"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_tensor(path: Path) -> np.ndarray:
    tensor = onnx.TensorProto()
    try:
        tensor.ParseFromString(path.read_bytes())
        return numpy_helper.to_array(tensor)
    except FileNotFoundError:
        raise GoldenError(f"{path}: missing") from None
    except Exception as exc:
        raise GoldenError(f"{path}: not a readable ONNX TensorProto ({type(exc).__name__}: {exc})") from exc


def _write_tensor(path: Path, array: np.ndarray, name: str) -> None:
    path.write_bytes(numpy_helper.from_array(np.ascontiguousarray(array), name).SerializeToString())


class GoldenStore:
    def __init__(self, root: Path | None = None):
        self.root = Path(root or default_golden_dir())

    def case_dir(self, name: str) -> Path:
        return self.root / name

    # --- reading ------------------------------------------------------------------------
    def read_meta(self, name: str) -> dict:
        folder = self.case_dir(name)
        path = folder / "case.json"
        if not folder.is_dir():
            raise GoldenError(
                f"no golden for case {name!r} at {folder}; run: python -m conformance golden regenerate --case {name}"
            )
        try:
            meta = json.loads(path.read_text())
        except FileNotFoundError:
            raise GoldenError(f"{path}: missing") from None
        except (OSError, ValueError) as exc:
            raise GoldenError(f"{path}: not valid JSON ({exc})") from exc
        required = ("name", "config", "input", "taps", "sha256", "provenance")
        missing = [k for k in required if not isinstance(meta, dict) or k not in meta]
        if missing:
            raise GoldenError(f"{path}: missing field(s) {missing}")
        if list(meta["taps"]) != list(TAPS):
            raise GoldenError(f"{path}: taps {meta['taps']} differ from the contract {list(TAPS)}")
        return meta

    def verify(self, name: str) -> dict:
        """Check that every file listed in case.json exists with its sha256 and that every
        file in the folder is listed; returns the parsed case.json."""
        meta = self.read_meta(name)
        folder = self.case_dir(name)
        if not (folder / DATA_SET).is_dir():
            raise GoldenError(f"{folder / DATA_SET}: missing")
        listed = meta["sha256"]
        expected_files = [f"{DATA_SET}/input_0.pb"] + [f"{DATA_SET}/output_{k}.pb" for k in range(len(TAPS))]
        unlisted = [f for f in expected_files if f not in listed]
        if unlisted:
            raise GoldenError(f"{folder / 'case.json'}: sha256 has no entry for {unlisted}")
        present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {"case.json"}
        extra = sorted(present - set(listed))
        if extra:
            raise GoldenError(f"{folder}: file(s) not listed in case.json: {extra}")
        for rel, digest in listed.items():
            path = folder / rel
            if not path.is_file():
                raise GoldenError(f"{path}: missing (listed in case.json)")
            actual = sha256(path)
            if actual != digest:
                raise GoldenError(f"{path}: sha256 {actual[:12]}... does not match case.json's {digest[:12]}...")
        return meta

    def read(self, name: str) -> Golden:
        meta = self.verify(name)
        folder = self.case_dir(name) / DATA_SET
        taps = {tap: _read_tensor(folder / f"output_{k}.pb") for k, tap in enumerate(meta["taps"])}
        weights = None
        if (self.case_dir(name) / "weights.npz").is_file():
            with np.load(self.case_dir(name) / "weights.npz") as data:
                weights = {k: data[k] for k in data.files}
        return Golden(name, meta, _read_tensor(folder / "input_0.pb"), taps, weights)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    # --- writing ------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / ".lock"
        with open(path, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise GoldenError(
                    f"{self.root} is being regenerated by another process (it holds {path}); "
                    "try again when it has finished"
                ) from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def cleanup_leftovers(self) -> list[str]:
        """Remove staging folders left by a killed regeneration; returns their names."""
        removed = []
        for p in self.root.glob(".staging-*"):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
        return removed

    def write(
        self,
        case: Case,
        taps: dict[str, np.ndarray],
        x: np.ndarray,
        weights: dict[str, np.ndarray] | None,
        model_writer: Callable[[Path], None] | None,
        previous: dict | None,
    ) -> Path:
        """Write the case's golden into a staging folder and swap it in atomically."""
        staging = Path(tempfile.mkdtemp(prefix=f".staging-{case.name}-", dir=self.root))
        try:
            data = staging / DATA_SET
            data.mkdir()
            _write_tensor(data / "input_0.pb", x, "input")
            for k, tap in enumerate(TAPS):
                _write_tensor(data / f"output_{k}.pb", taps[tap], tap)
            if weights is not None:
                _write_npz(staging / "weights.npz", weights)
            if model_writer is not None:
                model_writer(staging / "model.onnx")
            files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
            digests = {rel: sha256(staging / rel) for rel in files}
            provenance = _provenance()
            if previous is not None and previous.get("sha256") == digests:
                provenance = previous["provenance"]  # same bytes: keep the date, stay byte-identical
            meta = {**case.to_json(), "taps": list(TAPS), "provenance": provenance, "sha256": digests}
            (staging / "case.json").write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
            _fsync_tree(staging)
            _swap_in(staging, self.case_dir(case.name))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self.case_dir(case.name)


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """A deterministic .npz: fixed member order and timestamps (np.savez stamps the time)."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for name in sorted(arrays):
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            z.writestr(info, buffer.getvalue())


def _provenance() -> dict:
    import torch

    return {
        "generator": GENERATOR,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "onnx": onnx.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*"), reverse=True):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _swap_in(staging: Path, target: Path) -> None:
    """Make ``staging`` the new ``target`` in one atomic step (the old one ends up at
    ``staging`` and is removed by the caller)."""
    if not target.exists():
        os.rename(staging, target)
    else:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = getattr(libc, "renameat2", None)
        if renameat2 is None:
            raise GoldenError("atomic replacement needs renameat2 (Linux, glibc >= 2.28)")
        rc = renameat2(_AT_FDCWD, os.fsencode(staging), _AT_FDCWD, os.fsencode(target), _RENAME_EXCHANGE)
        if rc != 0:
            err = ctypes.get_errno()
            raise GoldenError(f"cannot swap {staging} into {target}: {os.strerror(err)} ({errno.errorcode.get(err)})")
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
