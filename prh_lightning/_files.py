"""Atomic file output that a collaborator can read and a crash cannot litter.

:func:`atomic_write` fills a file inside a private temporary folder next to the target,
``.<name>.<pid>@<host>.<token>.prh-tmp/``, then renames it over the target. So:

- the target is either the old file or the complete new one, never half-written;
- the file gets the user's umask (``0o666 & ~umask``), like a file made by ``open``: a writer
  that makes its own private temporary file (``mkstemp``, safetensors' ``save_file``) would
  leave it ``0o600``;
- whatever a writer leaves behind stays inside that folder, which is removed on any error; a
  folder left by a killed process (SIGKILL, power loss) is removed by the next save of the
  same target (its process is gone, or it is more than a day old);
- an I/O error (disk full, quota, read-only folder) is an ``OSError`` naming the target.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

TEMP_SUFFIX = ".prh-tmp"
_STALE_AFTER_S = 24 * 3600


def temp_folder_name(target: Path) -> str:
    """``.<name>.<pid>@<host>.<token>.prh-tmp`` for a save of ``target`` by this process.

    >>> temp_folder_name(Path("out/x.json")).startswith(".x.json.")
    True
    """
    return f".{target.name}.{os.getpid()}@{socket.gethostname()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _is_stale(entry: Path, target: Path) -> bool:
    """A temporary folder of ``target`` whose writer is gone (same host) or which is over a day old."""
    middle = entry.name[len(target.name) + 2 : -len(TEMP_SUFFIX)]  # "<pid>@<host>.<token>"
    owner, _, _token = middle.rpartition(".")
    pid, _, host = owner.partition("@")
    try:
        if time.time() - entry.lstat().st_mtime > _STALE_AFTER_S:
            return True
    except FileNotFoundError:
        return False
    return pid.isdigit() and host == socket.gethostname() and not _pid_alive(int(pid))


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders that killed saves of ``target`` left behind; returns them."""
    target = Path(target)
    removed = []
    try:
        candidates = list(target.parent.glob(f".{target.name}.*{TEMP_SUFFIX}"))
    except OSError:
        return removed
    for entry in candidates:
        if entry.is_dir() and not entry.is_symlink() and _is_stale(entry, target):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _named(err: OSError, what: str) -> OSError:
    """``OSError`` with ``err``'s errno (so ``errno.ENOSPC`` checks still work) and a message naming the file."""
    if err.errno is None:
        return OSError(f"{what}: {err}")
    return OSError(err.errno, f"{what}: {err.strerror or err}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Create or replace ``path`` atomically: ``write(tmp)`` fills the file ``tmp``, which then
    becomes ``path`` with the user's umask. Parent folders are created.

    Raises ``OSError`` (naming ``path``) when the file cannot be written; nothing is left behind.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> atomic_write(folder / "hello.txt", lambda tmp: tmp.write_text("hi")).read_text()
    'hi'
    >>> sorted(p.name for p in folder.iterdir())  # no temporary left
    ['hello.txt']
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        folder = path.parent / temp_folder_name(path)
        folder.mkdir()  # mode 0o777 & ~umask: the umask, read without changing it
    except OSError as err:
        raise _named(err, f"cannot write {path}") from err
    try:
        tmp = folder / path.name
        write(tmp)
        if not tmp.is_file():
            raise RuntimeError(f"the writer of {path} did not create its temporary file")
        os.chmod(tmp, folder.stat().st_mode & 0o666)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data reach the disk before the rename does
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as err:
        raise _named(err, f"could not write {path}") from err
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`).

    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "sub" / "data.bin"
    >>> atomic_write_bytes(target, b"abc").read_bytes()
    b'abc'
    """
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))
