"""The golden store: one folder per case under ``golden/`` (layout in docs/design.md).

::

    golden/<case>/case.json             the case, ordered tap list, provenance, sha256 of every file
    golden/<case>/weights.npz           float32, torch state_dict names (stored cases only)
    golden/<case>/model.onnx            tapped torch-fast export (stored cases only)
    golden/<case>/test_data_set_0/      input_0.pb, output_<k>.pb (k-th tap of case.json)

Reading trusts nothing in the folder: every file case.json names must be a plain relative
name inside the folder with no symbolic link on the way, every byte is hashed as it is
read (the bytes parsed are the bytes checked), tensors must be finite, and the weights
must have the case's names, shapes and dtype. Any of that wrong is a GoldenError (bad
data, exit 2), never a path's failure. Readers hold ``golden/.lock`` shared and a
regeneration holds it exclusively, so a run never reads a half-replaced store.

Goldens come from the PyTorch reference on CPU in float32. Regeneration is deterministic
(bytes depend only on the case and the machine's arithmetic; the provenance date is kept
when no tensor changed) and atomic: the new folder is written beside the old one, synced,
and swapped in with one ``renameat2(RENAME_EXCHANGE)``, so a regeneration killed at any
moment leaves the old golden intact."""

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

from conformance.cases import Case, check_case_name
from conformance.files import FileProblem, confined, fsync
from pkm_models.config import ConfigError, PKMConfig, tap_names
from pkm_models.convert import ConversionError, check_weights, expected_shapes
from pkm_models.errors import PKMError
from pkm_models.small_files import SmallFileError, open_lock_file, read_small, read_small_text

DATA_SET = "test_data_set_0"
STREAM_SAMPLE = "test_data_set_1"  # the reference's taps on a fixed sample of the case's stream
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
    digest: str = ""  # sha256 of case.json: names this exact golden (it lists every file's sha256)
    # the case's stream: the sampled tokens (conformance.stream.sample_rows) and their taps
    stream_input: np.ndarray | None = None
    stream_taps: dict[str, np.ndarray] | None = None


def default_golden_dir() -> Path:
    return Path.cwd() / "golden"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_HEX = frozenset("0123456789abcdef")


def _parse_tensor(data: bytes, path: Path) -> np.ndarray:
    tensor = onnx.TensorProto()
    try:
        tensor.ParseFromString(data)
        array = numpy_helper.to_array(tensor)
    except Exception as exc:
        raise GoldenError(f"{path}: not a readable ONNX TensorProto ({type(exc).__name__}: {exc})") from exc
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise GoldenError(
            f"{path}: holds {int(np.isnan(array).sum())} NaN and {int(np.isinf(array).sum())} Inf values; "
            "a golden must be finite"
        )
    return array


def _write_tensor(path: Path, array: np.ndarray, name: str) -> None:
    path.write_bytes(numpy_helper.from_array(np.ascontiguousarray(array), name).SerializeToString())


class GoldenStore:
    def __init__(self, root: Path | None = None):
        self.root = Path(root or default_golden_dir())

    def case_dir(self, name: str) -> Path:
        check_case_name(name, f"golden folder in {self.root}")
        return self.root / name

    # --- reading ------------------------------------------------------------------------
    def read_meta(self, name: str) -> dict:
        folder = self.case_dir(name)
        path = folder / "case.json"
        if folder.is_symlink():  # a link out of the store would be read as its golden
            raise GoldenError(f"{folder}: a symbolic link; a golden folder must be in the store itself")
        if not folder.is_dir():
            raise GoldenError(
                f"no golden for case {name!r} at {folder}; run: python -m conformance golden regenerate --case {name}"
            )
        try:
            meta = json.loads(read_small_text(path))
        except FileNotFoundError:
            raise GoldenError(f"{path}: missing") from None
        except SmallFileError as exc:
            raise GoldenError(str(exc)) from None
        except (OSError, ValueError) as exc:
            raise GoldenError(f"{path}: not valid JSON ({exc})") from exc
        return _check_meta(meta, path)

    def _load(self, name: str) -> tuple[dict, dict[str, bytes], str]:
        """case.json and the bytes of every file it lists, each checked against its sha256
        as read, after checking that the folder holds exactly those files and no link."""
        folder = self.case_dir(name)
        meta = self.read_meta(name)
        try:
            digest = hashlib.sha256(read_small(folder / "case.json")).hexdigest()
        except (OSError, SmallFileError) as exc:
            raise GoldenError(f"{folder / 'case.json'}: {exc}") from None
        if not (folder / DATA_SET).is_dir() or (folder / DATA_SET).is_symlink():
            raise GoldenError(f"{folder / DATA_SET}: missing")
        listed = meta["sha256"]
        expected_files = [f"{DATA_SET}/input_0.pb"] + [f"{DATA_SET}/output_{k}.pb" for k in range(len(meta["taps"]))]
        unlisted = [f for f in expected_files if f not in listed]
        if unlisted:
            raise GoldenError(f"{folder / 'case.json'}: sha256 has no entry for {unlisted}")
        links = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_symlink())
        if links:
            raise GoldenError(f"{folder}: symbolic link(s) in a golden folder are refused: {links}")
        present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {"case.json"}
        extra = sorted(present - set(listed))
        if extra:
            raise GoldenError(f"{folder}: file(s) not listed in case.json: {extra}")
        contents = {}
        for rel, expected in listed.items():
            try:
                path = confined(folder, rel, f"{folder / 'case.json'}: sha256")
            except FileProblem as exc:
                raise GoldenError(str(exc)) from None
            if not path.is_file():
                raise GoldenError(f"{path}: missing (listed in case.json)")
            data = path.read_bytes()
            actual = hashlib.sha256(data).hexdigest()
            if actual != expected:
                raise GoldenError(f"{path}: sha256 {actual[:12]}... does not match case.json's {expected[:12]}...")
            contents[rel] = data
        return meta, contents, digest

    def verify(self, name: str, case: Case | None = None) -> dict:
        """Check everything :meth:`read` checks (files, hashes, finite tensors, weights) and,
        given the ``case``, everything a run checks before trusting the golden (it was made
        from this case as it is now: config, checkpoint and input file by sha256); returns
        the parsed case.json."""
        golden = self.read(name)
        if case is not None:
            check_golden_matches_case(case, golden, self)
        return golden.meta

    def read(self, name: str) -> Golden:
        """The golden of case ``name``, every file checked (see the module docstring)."""
        meta, contents, digest = self._load(name)
        folder = self.case_dir(name)
        taps = {
            tap: _parse_tensor(contents[f"{DATA_SET}/output_{k}.pb"], folder / DATA_SET / f"output_{k}.pb")
            for k, tap in enumerate(meta["taps"])
        }
        x = _parse_tensor(contents[f"{DATA_SET}/input_0.pb"], folder / DATA_SET / "input_0.pb")
        weights = None
        if "weights.npz" in contents:
            weights = _parse_weights(contents["weights.npz"], folder / "weights.npz", meta)
        stream_input = stream_taps = None
        if f"{STREAM_SAMPLE}/input_0.pb" in contents:
            sample = folder / STREAM_SAMPLE
            stream_input = _parse_tensor(contents[f"{STREAM_SAMPLE}/input_0.pb"], sample / "input_0.pb")
            stream_taps = {}
            for k, tap in enumerate(meta["taps"]):
                rel = f"{STREAM_SAMPLE}/output_{k}.pb"
                if rel not in contents:
                    raise GoldenError(f"{folder / 'case.json'}: the stream sample has no {rel}")
                stream_taps[tap] = _parse_tensor(contents[rel], sample / f"output_{k}.pb")
        elif meta.get("stream"):
            raise GoldenError(f"{folder}: the case has a stream but its golden has no {STREAM_SAMPLE}: regenerate it")
        return Golden(name, meta, x, taps, weights, digest, stream_input, stream_taps)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        names = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        for name in names:
            check_case_name(name, f"golden folder in {self.root}")
        return names

    # --- writing ------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive: one regeneration at a time, and no reader while it writes."""
        path = self.root / ".lock"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = open_lock_file(path)
        except SmallFileError as exc:
            raise GoldenError(str(exc)) from None
        except OSError as exc:
            raise GoldenError(f"cannot regenerate in {self.root}: {exc.strerror or exc}") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise GoldenError(
                    f"{self.root} is being regenerated by another process, or read by a run (they hold {path}); "
                    "try again when it has finished"
                ) from None
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def reading(self, wait_message=None) -> Iterator[None]:
        """Shared: readers wait while a regeneration holds the lock. A store where the lock
        file cannot be created cannot be regenerated either, and is read as it is; a lock
        that is not a regular file (a FIFO would be waited on) is refused."""
        path = self.root / ".lock"
        try:
            fd = open_lock_file(path)
        except SmallFileError as exc:
            raise GoldenError(str(exc)) from None
        except OSError:
            yield
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                if wait_message:
                    wait_message(f"waiting for the regeneration of {self.root} to finish ...")
                fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

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
        stream_sample: tuple[np.ndarray, dict[str, np.ndarray]] | None = None,
    ) -> Path:
        """Write the case's golden into a staging folder and swap it in atomically. Refuses
        non-finite tensors; a write that fails (full disk, read-only folder) is a GoldenError
        and leaves the old golden as it was."""
        names = case.spec.output_names(tapped=True)
        for name, array in [("input", x), *((n, taps[n]) for n in names)]:
            if not np.all(np.isfinite(array)):
                raise GoldenError(f"{case.name}: the reference computed non-finite values in {name!r}; not written")
        try:
            staging = Path(tempfile.mkdtemp(prefix=f".staging-{case.name}-", dir=self.root))
            staging.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would become the golden folder's mode
        except OSError as exc:
            raise GoldenError(f"cannot write a golden in {self.root}: {exc.strerror or exc}") from exc
        try:
            self._write_staging(staging, case, taps, x, weights, model_writer, previous, names, stream_sample)
            _swap_in(staging, self.case_dir(case.name))
        except OSError as exc:
            raise GoldenError(
                f"cannot write the golden of {case.name} in {self.root}: {exc.strerror or exc}; the old golden is kept"
            ) from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self.case_dir(case.name)

    def _write_staging(self, staging, case, taps, x, weights, model_writer, previous, names, stream_sample) -> None:
        """Every file of the golden, and case.json listing their sha256, into ``staging``."""
        sets = [(DATA_SET, x, taps)]
        if stream_sample is not None:
            sets.append((STREAM_SAMPLE, *stream_sample))
        for folder, inputs, outputs in sets:
            data = staging / folder
            data.mkdir()
            _write_tensor(data / "input_0.pb", inputs, "input")
            for k, tap in enumerate(names):
                _write_tensor(data / f"output_{k}.pb", outputs[tap], tap)
        if weights is not None:
            _write_npz(staging / "weights.npz", weights)
        if model_writer is not None:
            model_writer(staging / "model.onnx")
        files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
        digests = {rel: sha256(staging / rel) for rel in files}
        provenance = _provenance()
        if previous is not None and previous.get("sha256") == digests:
            provenance = previous["provenance"]  # same bytes: keep the date, stay byte-identical
        case_json = {k: v for k, v in case.to_json().items() if k != "deploy"}  # judged against it, not of it
        meta = {**case_json, "taps": names, "provenance": provenance, "sha256": digests}
        (staging / "case.json").write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
        _fsync_tree(staging)


def check_golden_matches_case(case: Case, golden: Golden, store: GoldenStore) -> None:
    """The golden was made from this case as it is now: same model, same weights (a named
    checkpoint with the same sha256), same input (a named input file with the same sha256).
    ``run`` and ``golden verify`` both ask this; a GoldenError names what changed."""
    expected = case.to_json()
    regenerate = f"python -m conformance golden regenerate --case {case.name}"

    def size(entry: dict) -> str:
        return f"{entry['size']} bytes" if isinstance(entry.get("size"), int) else "size not recorded"

    for key, what in (("checkpoint", "checkpoint"), ("input", "input file")):
        old, new = golden.meta.get(key) or {}, expected.get(key) or {}
        if "sha256" in old and "sha256" in new and old["sha256"] != new["sha256"]:
            raise GoldenError(
                f"{case.source}: the {what} {new.get('file')} changed since its golden was made (sha256 now "
                f"{new['sha256'][:12]}..., {size(new)}; the golden has {old['sha256'][:12]}..., "
                f"{size(old)}). If the change is intended: {regenerate}"
            )
    old, new = (golden.meta.get("stream") or {}), (expected.get("stream") or {})
    if old.get("sha256") and new.get("sha256") and old["sha256"] != new["sha256"]:
        raise GoldenError(
            f"{case.source}: the stream's file {new.get('file') or new.get('embeddings')} changed since its golden "
            f"was made (sha256 now {new['sha256'][:12]}..., the golden has {old['sha256'][:12]}...). "
            f"If the change is intended: {regenerate}"
        )
    keys = ("config", "layers", "weight_seed", "duplicate_subkeys", "input", "checkpoint", "stream")
    stale = [k for k in keys if golden.meta.get(k) != expected.get(k)]
    if stale:
        raise GoldenError(
            f"{store.case_dir(case.name) / 'case.json'}: {stale} differ from {case.source}; the case changed "
            f"since its golden was made: run {regenerate}"
        )


def _check_meta(meta, path: Path) -> dict:
    """case.json's fields, checked by type (a damaged file is bad data, not a traceback)."""
    required = ("name", "config", "input", "taps", "sha256", "provenance")
    if not isinstance(meta, dict):
        raise GoldenError(f"{path}: expected a JSON object")
    missing = [k for k in required if k not in meta]
    if missing:
        raise GoldenError(f"{path}: missing field(s) {missing}")
    layers = meta.get("layers", 1)
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise GoldenError(f"{path}: layers must be a positive integer, got {layers!r}")
    listed = meta["sha256"]
    if not isinstance(listed, dict):
        raise GoldenError(f"{path}: sha256 must map file names to digests, got {type(listed).__name__}")
    for rel, digest in listed.items():
        if not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= _HEX):
            raise GoldenError(f"{path}: sha256 of {rel!r} is not 64 lower-case hex digits: {digest!r}")
    if not isinstance(meta["config"], dict):
        raise GoldenError(f"{path}: config must be an object")
    try:
        config = PKMConfig.from_dict(meta["config"])
    except ConfigError as exc:
        raise GoldenError(f"{path}: {exc}") from None
    if meta["taps"] != tap_names(layers, config):
        raise GoldenError(f"{path}: taps {meta['taps']} differ from the contract {tap_names(layers, config)}")
    return meta


def _parse_weights(data: bytes, path: Path, meta: dict) -> dict[str, np.ndarray]:
    """weights.npz: plain float32 arrays (no pickles) with the case's names and shapes, finite."""
    import io

    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            weights = {k: npz[k] for k in npz.files}
    except Exception as exc:
        raise GoldenError(f"{path}: not a readable .npz of plain arrays ({type(exc).__name__}: {exc})") from exc
    try:
        config = PKMConfig.from_dict(meta["config"])
        check_weights(weights, expected_shapes(config, meta.get("layers", 1)), str(path))
    except (ConfigError, ConversionError) as exc:
        raise GoldenError(str(exc)) from None
    for name, array in weights.items():
        if array.dtype != np.float32:
            raise GoldenError(f"{path}: {name} is {array.dtype}, expected float32")
        if not np.all(np.isfinite(array)):
            raise GoldenError(f"{path}: {name} holds NaN or Inf values")
    return weights


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
    for p in [*sorted(root.rglob("*"), reverse=True), root]:
        fsync(p)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _umask() -> int:
    """This process's umask (read by setting it, and set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
    fsync(target.parent)
