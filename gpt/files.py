"""File hashing and atomic writes: readers see the old file or folder or the new one, never a half-written one."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

# The disk, a quota or a file-size limit (RLIMIT_FSIZE) is full: the write itself failed.
DISK_FULL = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


class WriteError(OSError):
    """An output could not be written because the disk is full; names the output, not its temp file."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_beside(dest: Path) -> Path:
    """A new, uniquely named temp file next to dest, for a later os.replace.

    mkstemp creates it private (0600); it gets the umask's usual mode instead, so the
    renamed result looks like any other file the user writes.
    """
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    os.chmod(name, 0o666 & ~_umask())
    return Path(name)


@contextmanager
def reporting_full_disk(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise a disk-full OSError from the block as a WriteError naming `path`.

    A failed write() carries no file name, and a temp file's name would not tell the user which
    output it was; the outermost caller names the output (nested folders are renamed outward).
    """
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        error = WriteError(f"{path}: write failed ({os.strerror(exc.errno)})")
        error.errno = exc.errno
        raise error from exc


def remove_stale_temps(path: str | os.PathLike) -> None:
    """Delete the temp siblings of `path` that a writer killed mid-write (kill -9, power loss) left.

    Only our own names match: `.<name>.old` and `.<name>.<8 random chars>[.part]` (mkdtemp, mkstemp).
    """
    path = Path(path)
    stale = re.compile(rf"\.{re.escape(path.name)}\.(old|[a-z0-9_]{{8}}(\.part)?)")
    if not path.parent.is_dir():
        return
    for entry in path.parent.iterdir():
        if not stale.fullmatch(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success it replaces `path` whole, on error it is removed.

    Readers therefore see the old folder or the new one, never a half-written one. Temp folders
    of an earlier killed run are removed first; a full disk is reported naming `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.with_name(f".{path.name}.old")
    if old.is_dir() and not path.exists():
        os.replace(old, path)  # killed between the two renames below: that was the last good folder
    remove_stale_temps(path)
    with reporting_full_disk(path):
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would otherwise become the final folder's mode
        try:
            yield tmp
            shutil.rmtree(old, ignore_errors=True)
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if old.is_dir() and not path.exists():
                os.replace(old, path)
            raise


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp file beside `path` to write; on success it replaces `path`, on error it is removed.

    Temp files of an earlier killed write are removed first; a full disk is reported naming `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    with reporting_full_disk(path):
        tmp = temp_beside(path)
        try:
            yield tmp
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write data to path atomically (see atomic_file)."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """atomic_write_bytes of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """Write data as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
