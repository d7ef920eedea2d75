"""The small files a command reads whole (a case file, ``case.json``, the tolerances,
``params.json``) and the lock file it holds: checked to be regular files before anything
is read, opened without blocking, and read with a size cap.

A FIFO in place of one of them used to hang the command on ``open``, and a link to
``/dev/zero`` to read until memory ran out; a 1 GB ``params.json`` was read whole.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from pkm_models.errors import PKMError

SMALL_FILE_BYTES = 16 << 20  # a JSON or TOML file written by hand or by this toolkit: a few MB at most


class SmallFileError(PKMError):
    """Not a regular file, or larger than a file of its kind can be; the message says which."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def _regular(fd: int, path: Path) -> os.stat_result:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise SmallFileError(f"{path}: {_kind(info.st_mode)}, where a regular file is expected")
    return info


def read_small(path: Path, cap: int = SMALL_FILE_BYTES) -> bytes:
    """The bytes of ``path``, a regular file of at most ``cap`` bytes (links followed: the
    file they name is checked). FileNotFoundError propagates; anything else that keeps
    the file from being read is a SmallFileError naming it."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise SmallFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        info = _regular(fd, path)
        if info.st_size > cap:
            raise SmallFileError(f"{path}: {info.st_size:,} bytes; a file of this kind is at most {cap:,}")
        data = f.read(cap + 1)
    if len(data) > cap:  # it grew while being read
        raise SmallFileError(f"{path}: more than {cap:,} bytes; a file of this kind is at most {cap:,}")
    return data


def read_small_text(path: Path, cap: int = SMALL_FILE_BYTES) -> str:
    """:func:`read_small`, decoded as UTF-8 (a SmallFileError where it is not)."""
    data = read_small(path, cap)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SmallFileError(
            f"{path}: not UTF-8 text (byte {exc.start}: {data[exc.start : exc.start + 1]!r})"
        ) from None


def open_lock_file(path: Path) -> int:
    """A file descriptor of the lock file ``path`` (created where missing), for ``flock``;
    the caller closes it. A regular file, opened without blocking: a FIFO there would
    wait for a reader."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a FIFO that no process reads
            raise SmallFileError(f"{path}: a FIFO, where a regular file is expected") from None
        raise
    try:
        _regular(fd, Path(path))
    except BaseException:
        os.close(fd)
        raise
    return fd
