"""The small state files kept beside runs and sweeps: written whole, read with a clear error, and
the lock that lets only one process at a time start a sweep or a run.

    write_json(path, {"mlflow_run_id": run_id})          # the old file or the new one, never half
    data = read_json(path, "delete it to start again")   # StateFileError naming the file if torn
    with exclusive(folder / "sweep.lock", "sweep 'demo'", "wait for it to end"):
        ...                                              # a second process is refused at once

`write_json` writes a temporary file in the same folder, syncs it and renames it over the old one
(`os.replace`, atomic on local file systems and on NFS/EFS): a kill or a full disk midway leaves
the old file and at most a stray `.<name>.<pid>.tmp`.

`exclusive` is a POSIX record lock (`fcntl.lockf`, non-blocking) on a lock file. Unlike a lock
file created with O_EXCL, it cannot go stale: the kernel (or, on NFSv4 such as EFS, the server)
releases it when the holding process dies, however it dies. On NFS a node that vanishes entirely
keeps its locks until its lease runs out (about 90 s on EFS). POSIX locks belong to a process, not
to a file descriptor: a second lock taken by the same process would succeed, and closing any other
descriptor of the file would drop the lock, so the paths this process holds are also kept in a set
and a second `exclusive` on one of them is refused before the file is opened again.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from orchestrator.errors import LockedError, StateFileError

_held: set[str] = set()  # lock files this process holds (see the module docstring)
_held_guard = threading.Lock()


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as JSON to `path` whole or not at all (temp file + fsync + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())  # the data is on disk (on the NFS server) before the rename
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: str | os.PathLike, fix: str) -> dict[str, Any]:
    """The JSON object in `path`; a file that is not one (torn, edited, emptied) raises
    StateFileError naming the file, the problem and `fix` (what the user should do)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        problem = f"{type(err).__name__}: {err}"
    else:
        if isinstance(data, dict):
            return data
        problem = f"it holds a {type(data).__name__}, not a JSON object"
    raise StateFileError(f"state file {path} cannot be read ({problem}): {fix}")


@contextmanager
def exclusive(path: str | os.PathLike, what: str, hint: str) -> Iterator[Path]:
    """Hold an exclusive lock on the file `path` (created, with its folder, when missing) for the
    block; refuse at once with LockedError naming `what`, the lock file and its holder (host, pid,
    since when), followed by `hint`, when another process or this one holds it.

    When the block ends and the folder holds nothing but the lock file (the block wrote nothing,
    for example a sweep refused before its state was written), both are removed again.
    """
    path = Path(os.path.abspath(path))
    key = str(path)
    with _held_guard:
        if key in _held:
            raise LockedError(
                f"{what} is in use by this process (pid {os.getpid()}): {path} is locked. {hint}"
            )
        _held.add(key)
    fd = None
    try:
        fd = _acquire(path, what, hint)
        yield path
    finally:
        try:
            if fd is not None:
                _release(path, fd)
        finally:
            with _held_guard:
                _held.discard(key)


def _acquire(path: Path, what: str, hint: str) -> int:
    for _ in range(20):  # another process may remove an unused lock file between open and lock
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            continue
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _holder(fd)
            os.close(fd)
            if err.errno in (errno.EACCES, errno.EAGAIN):
                raise LockedError(
                    f"{what} is in use: its lock file {path} is held by {holder}. {hint}"
                ) from None
            raise StateFileError(
                f"cannot lock {path} ({os.strerror(err.errno or 0)}): its file system does not "
                "support POSIX locks (NFS mounted with 'nolock'?); mount it with locking (EFS "
                "supports it) or keep the state on a local disk"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # removed (or replaced) by its last holder before we locked it: try again
            os.close(fd)
            continue
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        return fd
    raise StateFileError(f"cannot lock {path}: it keeps being removed and created again")


def _release(path: Path, fd: int) -> None:
    try:
        alone = [p.name for p in path.parent.iterdir()] == [path.name]
        if alone:
            path.unlink()  # still locked: a process that opened it meanwhile sees a new inode
    except OSError:
        alone = False
    os.close(fd)  # releases the lock
    if alone:
        try:
            path.parent.rmdir()
        except OSError:  # something was created in it meanwhile
            pass


def _holder(fd: int) -> str:
    """'host H, pid P (since T)' as the holder wrote it into the lock file, if it could be read."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
        return f"host {info['host']}, pid {info['pid']} (since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"
