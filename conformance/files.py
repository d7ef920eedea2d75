"""Files the toolkit writes and files it is told to read: one place for the rules.

* Writing: everything is written beside its destination under a temporary name and
  renamed over it only when complete (:func:`atomic_write`, :func:`atomic_output`), so a
  full disk, a signal or a crash leaves the old file intact, never a truncated one.
* Output folders: :func:`check_writable` answers before minutes of work whether a folder
  could be written, without creating, writing or deleting anything.
* Reading what a user or a data file names: :func:`confined` resolves a relative name
  inside a folder and refuses absolute names, ``..``, and symbolic links anywhere on the
  way; :func:`user_file` resolves a path a user gave and checks it is a regular file.
* A command never writes over what it reads: :func:`refuse_overwriting_inputs` compares
  every file a command would write (and every folder it would replace) with every file it
  reads, as the file system sees them (``..``, symbolic links and hard links included),
  before anything is read or written.
* Durability: :func:`fsync` is the one way a file or folder is flushed to the disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from pkm_models.errors import PKMError


class FileProblem(PKMError):
    """A file or folder that cannot be written or must not be read."""


def fsync(path: Path) -> None:
    """Flush a file's or a folder's contents (a folder: its entries, after renames) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _describe(exc: OSError) -> str:
    return exc.strerror or str(exc)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file beside it, fsync, rename)."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)  # atomic_output syncs it before the rename


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that wants a file name (``torch.save``,
    ``model.save``); renamed over ``path`` when the block ends normally, removed otherwise.

    The suffix is kept (some writers choose the format from it). An OSError (full disk,
    read-only folder) becomes a FileProblem naming ``path``; the old file is untouched."""
    path = Path(path)
    if path.is_dir():
        raise FileProblem(f"{path}: is a folder; give a file name")
    if not path.parent.is_dir():
        raise FileProblem(f"{path}: the folder {path.parent} does not exist")
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".partial{path.suffix}", dir=path.parent)
    except OSError as exc:
        raise FileProblem(f"cannot write {path}: {_describe(exc)}") from exc
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync(tmp)  # writers (torch.save, model.save) do not sync
        os.replace(tmp, path)
        fsync(path.parent)
    except OSError as exc:
        raise FileProblem(f"cannot write {path}: {_describe(exc)}; the previous file, if any, is unchanged") from exc
    finally:
        tmp.unlink(missing_ok=True)


def write_files_together(folder: Path, payloads: dict[str, bytes]) -> list[Path]:
    """Several files of one folder that belong together (a report's json, xml and md):
    each written to a temporary name first and renamed only once all are complete, so a
    failure leaves no partial or mismatched set behind. Creates ``folder`` if needed."""
    folder = Path(folder)
    staged: list[tuple[str, Path]] = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in payloads.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
            staged.append((name, Path(tmp)))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            fsync(Path(tmp))
        for name, tmp in staged:
            os.replace(tmp, folder / name)
        fsync(folder)
        return [folder / name for name in payloads]
    except OSError as exc:
        raise FileProblem(f"cannot write to {folder}: {_describe(exc)}") from exc
    finally:
        for _, tmp in staged:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def staging_dir(folder: Path, prefix: str) -> Iterator[Path]:
    """A private temporary folder inside ``folder``, removed when the block ends. While it
    lives, its process holds an exclusive lock on ``<folder name>.lock`` beside it, so that
    a folder left by a process killed outright (its lock released by the kernel) can be
    told apart from a live one and removed by the next command (:func:`remove_abandoned`)."""
    remove_abandoned(folder, prefix)
    try:
        staging = Path(tempfile.mkdtemp(prefix=prefix, dir=folder))
        lock = _locked_file(staging)
    except OSError as exc:
        raise FileProblem(f"cannot write to {folder}: {_describe(exc)}") from exc
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.unlink(f"{staging}.lock")
        os.close(lock)


def _locked_file(staging: Path) -> int:
    """``<staging>.lock``, locked by this process: made under another name, locked, then
    renamed, so that nobody can take the lock between its creation and this process's."""
    fd, name = tempfile.mkstemp(prefix=".lock-", dir=staging.parent)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(name, f"{staging}.lock")
    except OSError:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise
    return fd


def remove_abandoned(folder: Path, prefix: str) -> list[str]:
    """Remove the staging folders (:func:`staging_dir`) with ``prefix`` in ``folder`` whose
    process is gone (killed before it could clean up: ``kill -9``, the out-of-memory
    killer), found by their lock being free; returns their names."""
    removed = []
    with contextlib.suppress(OSError):
        for lock in Path(folder).glob(f"{prefix}*.lock"):
            try:
                fd = os.open(lock, os.O_RDWR)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held: its process is alive
                os.close(fd)
                continue
            try:
                staging = lock.with_name(lock.name[: -len(".lock")])
                shutil.rmtree(staging, ignore_errors=True)
                lock.unlink(missing_ok=True)
                removed.append(staging.name)
            finally:
                os.close(fd)
    return removed


def check_writable(folder: Path) -> None:
    """Raise FileProblem unless ``folder`` exists as a writable folder or could be created
    in its nearest existing ancestor. Touches nothing that exists: the probe is a new,
    uniquely named empty folder, removed at once."""
    folder = Path(folder)
    probe = folder.absolute()
    while not probe.exists():
        if probe.is_symlink():
            raise FileProblem(f"cannot write to output folder {folder}: {probe} is a broken symbolic link")
        probe = probe.parent
    if not probe.is_dir():
        raise FileProblem(f"cannot write to output folder {folder}: {probe} is not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".pkm-write-probe-", dir=probe))
    except OSError as exc:
        raise FileProblem(f"cannot write to output folder {folder}: {_describe(exc)}") from exc


def confined(folder: Path, name: object, what: str) -> Path:
    """``folder / name`` for a relative ``name`` that stays inside ``folder`` with no
    symbolic link on the way; anything else raises FileProblem naming ``name`` only (never
    anything about a file outside)."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise FileProblem(f"{what}: {name!r} is not a file name")
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts or name != rel.as_posix():
        raise FileProblem(f"{what}: {name!r} leaves its folder (absolute, '..' or not normalised); refused")
    path = folder
    for part in rel.parts:
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return folder / rel  # missing: the caller reports it
        except OSError as exc:
            raise FileProblem(f"{what}: {name!r}: {_describe(exc)}") from exc
        if stat.S_ISLNK(mode):
            raise FileProblem(f"{what}: {name!r} is or passes through a symbolic link; refused")
    return folder / rel


def user_file(base: Path, name: object, what: str) -> Path:
    """A file a user named (relative to ``base``, or absolute): it must exist and be a
    regular file (links are followed: the user chose this file)."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise FileProblem(f"{what}: expected a file name, got {name!r}")
    path = Path(name).expanduser()
    if not path.is_absolute():
        path = base / path
    if not path.exists():
        raise FileProblem(f"{what}: {path} does not exist")
    if not path.is_file():
        raise FileProblem(f"{what}: {path} is not a regular file")
    return path


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # device and inode: '..', symbolic and hard links alike
    except OSError:  # one of them does not exist (yet): not the same file
        return False


def refuse_overwriting_inputs(
    inputs: Iterable[str | Path | None],
    outputs: Iterable[str | Path] = (),
    folders: Iterable[str | Path] = (),
) -> None:
    """Raise FileProblem when a command would write over one of its own inputs: an output
    file that is an input file (the same file however it is named: ``./h/../my.pth``, a
    symbolic link, a hard link), or an input inside a folder the command replaces whole.

    Call it before reading anything: it only looks at names and inodes."""
    inputs = [Path(p) for p in inputs if p is not None]
    for out in map(Path, outputs):
        for source in inputs:
            if _same_file(source, out):
                raise FileProblem(
                    f"{out}: this is {source}, which the command reads; writing it would destroy that input. "
                    "Choose another destination"
                )
    for folder in map(Path, folders):
        if not folder.exists():
            continue
        inside = folder.resolve()
        for source in inputs:
            if source.exists() and source.resolve().is_relative_to(inside):
                raise FileProblem(
                    f"{source}: lies inside {folder}, which the command replaces; writing it would destroy that "
                    "input. Move the file out of that folder"
                )
