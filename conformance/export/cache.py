"""Tapped exports kept between runs, found by what they were made from.

An export is a pure function of the model (config, layers and weights), the exporter
and its precision, the opset, the code that builds and exports the model, and the
libraries that do it. The key is the sha256 of exactly that:

* the spec: config, layers, weight seed and duplicated sub-keys; where the weights are
  not generated from the seed, the sha256 of their file (a checkpoint's as the case pins
  it, a layer's own weights file);
* the exporter name with its precision (``torch-fast@int8``), the opset, tapped or not;
* the sources of ``pkm_models`` and of ``conformance/export`` and ``conformance/spec.py``;
* the versions of numpy, torch, onnx, onnxscript, TensorFlow, Keras and tf2onnx.

Generated weights are not hashed: they are a pure function of the seed and of the code
in the key. So a change to any of these makes a new entry; nothing is ever invalidated
in place.

Layout: ``<root>/exports/<key>/<exporter>.onnx`` (and its external data), with
``key.json`` saying what the key was made of. An exporter's refusal
(:class:`~conformance.export.ExportUnsupported`: a model it cannot handle, a type the
opset does not allow) is as pure a function of the key as an export, and costs as much
to find out: it is kept as ``<key>/<exporter>.refused`` (its message), and every later
request for that export, in this run or the next, is refused at once with it. Each entry
records the sha256 and size of every file it holds in ``manifest.json`` when it is built,
and an entry is checked against it when it is used (hashed once per process while the
file's inode, size and time stay the same): a file changed, added or copied over another
after the build (another exporter's file, a planted refusal, a truncated table) is an
ExportError naming the entry and how to clear it, never a path judged on it. Any other
failure is not kept: it may be the machine's (a full disk, a killed process). An entry is built in a private folder
beside it and renamed into place whole, under an exclusive lock on ``<key>.lock``, so two
workers that need the same export build it once, and a killed build leaves no entry. An
entry used is touched; entries unused for a day are removed once the cache holds more
than :data:`CACHE_BYTES`.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.metadata
import json
import os
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from conformance.export import DEFAULT_OPSET, ExportError, ExportUnsupported, export
from conformance.files import fsync, staging_dir
from conformance.spec import ModelSpec
from pkm_models.small_files import SmallFileError, read_small_text

CACHE_BYTES = 8 << 30  # more than this, and entries unused for a day go
STALE_SECONDS = 24 * 3600
LIBRARIES = ("numpy", "torch", "onnx", "onnxscript", "tensorflow", "keras", "tf2onnx")


def default_cache_dir() -> Path:
    """``$PKM_CONFORMANCE_CACHE``, else ``$XDG_CACHE_HOME/pkm-conformance``, else
    ``~/.cache/pkm-conformance``."""
    if os.environ.get("PKM_CONFORMANCE_CACHE"):
        return Path(os.environ["PKM_CONFORMANCE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pkm-conformance"


@functools.cache
def code_digest() -> str:
    """sha256 of the sources that decide what an export holds."""
    import conformance.export
    import pkm_models

    here = Path(conformance.export.__file__).parent
    files = [
        *sorted(Path(pkm_models.__file__).parent.rglob("*.py")),
        *sorted(here.glob("*.py")),
        here.parent / "spec.py",
    ]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()


@functools.cache
def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        names = ("tensorflow", "tensorflow-cpu") if name == "tensorflow" else (name,)
        versions[name] = None
        for dist in names:
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                versions[name] = importlib.metadata.version(dist)
                break
    return versions


def _file_sha256(path: Path) -> str:
    """sha256 of a file, or of a folder of weights (``.npy`` files: each name and content,
    in name order), hashed once per process while the files stay as they were."""
    path = Path(path)
    files = sorted(path.glob("*.npy")) if path.is_dir() else [path]
    stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _sha256_of(str(path.resolve()), stamp)


@functools.lru_cache(maxsize=64)
def _sha256_of(path: str, stamp: tuple) -> str:
    digest = hashlib.sha256()
    root = Path(path)
    for name, _, _ in stamp:
        file = root / name if root.is_dir() else root
        if root.is_dir():
            digest.update(name.encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def key_material(spec: ModelSpec, exporter: str, opset: int = DEFAULT_OPSET, tapped: bool = True) -> dict:
    """What the export of ``spec`` by ``exporter`` is made from (see the module docstring)."""
    if spec.checkpoint is not None:
        ref = spec.checkpoint
        weights = {"checkpoint_sha256": ref.sha256, "memories": list(ref.memories), "knn": ref.knn}
    elif spec.weights_file is not None:
        weights = {"weights_file_sha256": _file_sha256(spec.weights_file)}
    else:
        weights = {"generated": {"seed": spec.seed, "duplicate_subkeys": spec.duplicate_subkeys}}
    return {
        "exporter": exporter,
        "opset": opset,
        "tapped": tapped,
        "config": spec.config.to_dict(),
        "layers": spec.layers,
        "weights": weights,
        "code": code_digest(),
        "versions": library_versions(),
    }


MANIFEST = "manifest.json"


def _manifest(folder: Path) -> dict:
    """{file name: {"size", "sha256"}} of every file an entry holds (but its key)."""
    out = {}
    for f in sorted(folder.iterdir()):
        if f.name in (MANIFEST, "key.json"):
            continue
        info = f.stat()
        out[f.name] = {
            "size": info.st_size,
            "sha256": _entry_file_sha256(str(f), info.st_ino, info.st_size, info.st_mtime_ns),
        }
    return out


def _entry_file_sha256(path: str, inode: int, size: int, mtime_ns: int) -> str:
    """sha256 of a cache entry's file, once per process while it stays the same file (the
    weights' hasher, keyed by inode as well)."""
    return _sha256_of(path, ((Path(path).name, size, (mtime_ns, inode)),))


def _made(found: Path) -> bool:
    """The export ``found`` is in the cache, or its refusal (``<exporter>.refused``) is."""
    return found.is_file() or found.with_suffix(".refused").is_file()


class ExportCache:
    """Exports under ``root`` by content (see the module docstring)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.folder = self.root / "exports"

    def export(self, spec: ModelSpec, exporter: str) -> Path:
        """The tapped export of ``spec`` by ``exporter``: from the cache, or built now and kept."""
        material = key_material(spec, exporter)
        key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]
        entry = self.folder / key
        found = entry / f"{exporter}.onnx"
        if _made(found):
            return self._used(entry, found)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ExportError(f"cannot create the export cache {self.folder}: {exc.strerror or exc}") from exc
        with self._locked(key):
            if _made(found):  # made while this process waited
                return self._used(entry, found)
            with staging_dir(self.folder, f".{key}-") as staging:  # one a killed build left is removed
                try:
                    export(spec, exporter, staging, tapped=True)
                except ExportUnsupported as exc:  # kept: the next request is refused at once
                    (staging / f"{exporter}.refused").write_text(str(exc))
                (staging / "key.json").write_text(json.dumps(material, indent=2, sort_keys=True) + "\n")
                (staging / MANIFEST).write_text(json.dumps(_manifest(staging), indent=2, sort_keys=True) + "\n")
                os.rename(staging, entry)
                fsync(self.folder)
        self._trim()
        return self._used(entry, found)

    def _used(self, entry: Path, found: Path) -> Path:
        """``found``, the export of ``entry``, as it was built; ExportUnsupported where the
        exporter refused it."""
        self._check(entry)
        with contextlib.suppress(OSError):
            os.utime(entry)
        refused = found.with_suffix(".refused")
        if not found.is_file() and refused.is_file():
            raise ExportUnsupported(refused.read_text())
        return found

    def _check(self, entry: Path) -> None:
        """Every file of ``entry`` as its manifest recorded it when it was built."""
        clear = f"remove the entry ({entry}) or the whole cache ({self.root}) and run again"
        try:
            recorded = json.loads(read_small_text(entry / MANIFEST))
            present = {f.name for f in entry.iterdir()} - {MANIFEST, "key.json"}
        except (OSError, ValueError, SmallFileError) as exc:
            raise ExportError(f"the export cache's entry {entry} has no readable manifest ({exc}): {clear}") from None
        if not isinstance(recorded, dict) or set(recorded) != present:
            changed = sorted(set(recorded) ^ present) if isinstance(recorded, dict) else sorted(present)
            raise ExportError(
                f"the export cache's entry {entry} holds other files than it was built with {changed}: {clear}"
            )
        for name, want in recorded.items():
            file = entry / name
            info = file.lstat()
            if not stat.S_ISREG(info.st_mode) or not isinstance(want, dict) or info.st_size != want.get("size"):
                raise ExportError(f"{file}: not the file the export cache built (its size changed): {clear}")
            if _entry_file_sha256(str(file), info.st_ino, info.st_size, info.st_mtime_ns) != want.get("sha256"):
                raise ExportError(f"{file}: changed since the export cache built it (sha256 differs): {clear}")

    @contextlib.contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        fd = os.open(self.folder / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _trim(self) -> None:
        """Entries unused for :data:`STALE_SECONDS` removed, oldest first, while the cache
        holds more than :data:`CACHE_BYTES` (an entry in use by a run is fresh)."""
        entries = []
        with contextlib.suppress(OSError):
            for entry in self.folder.iterdir():
                if entry.is_dir() and not entry.name.startswith("."):
                    size = sum(f.stat().st_size for f in entry.iterdir() if f.is_file())
                    entries.append((entry.stat().st_mtime, size, entry))
        total = sum(size for _, size, _ in entries)
        for mtime, size, entry in sorted(entries):
            if total <= CACHE_BYTES or time.time() - mtime < STALE_SECONDS:
                break
            shutil.rmtree(entry, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.unlink(self.folder / f"{entry.name}.lock")
            total -= size
