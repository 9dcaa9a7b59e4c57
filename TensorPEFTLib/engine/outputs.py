"""Where results go: output paths checked before any work starts, the run-folder lock, disk-full answers.

Every job checks its output before it loads a model or reads a scan, so a typo in ``--out`` costs a second, not a
training run. The checks create nothing: a refused or interrupted job leaves the file system as it found it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Sequence

from ..data.io import WRITE_ERRNOS
from .runtime import EngineError

DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
LOCK_FILE = ".tensorpeft.lock"


def is_write_failure(err: BaseException) -> bool:
    """An OSError from writing a file that the user can fix (full disk, read-only or forbidden place)."""
    return isinstance(err, OSError) and err.errno in WRITE_ERRNOS


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free space on the file system holding ``path`` (or its nearest existing parent)."""
    try:
        return shutil.disk_usage(_existing_parent(Path(path))).free
    except OSError:
        return None


def folder_bytes(path: str | os.PathLike) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def megabytes(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**20:.1f} MB"


def _existing_parent(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_folder(path: str | os.PathLike, option: str = "--out") -> str:
    """Refuse, before any work, a folder that cannot be made or written: an existing file, a path under a file, a
    read-only or pseudo file system (``/proc``). Creates nothing."""
    text = os.fspath(path)
    if not text:
        raise EngineError(f"{option}: empty path; give the folder to write into")
    target = Path(os.path.abspath(text))
    if target.exists() and not target.is_dir():
        raise EngineError(f"{option} {text}: is a file, not a folder; choose a folder path")
    parent = _existing_parent(target)
    if not parent.is_dir():
        raise EngineError(f"{option} {text}: {parent} is a file, so no folder can be made under it; choose another path")
    probe = target if target.is_dir() else parent
    if not _can_write_in(probe):
        raise EngineError(f"{option} {text}: {probe} is not writable (permissions or a read-only file system); "
                          "choose another folder")
    return text


def _can_write_in(folder: Path) -> bool:
    """Try it: ``os.access`` says yes for root on read-only and pseudo file systems."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    probe = folder / f".tensorpeft-write-test-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError:
        return False
    os.close(fd)
    try:
        os.remove(probe)
    except OSError:
        pass
    return True


def check_output_file(path: str | os.PathLike, extensions: Sequence[str], option: str = "--out") -> str:
    """Refuse, before any work, a file path with an unsupported extension or in a folder that cannot be written."""
    text = os.fspath(path)
    name = os.path.basename(text).lower()
    if not any(name.endswith(ext) and len(name) > len(ext) for ext in extensions):
        raise EngineError(f"{option} {text}: unsupported file type; end the name with one of {', '.join(extensions)} "
                          "(or give a folder)")
    if os.path.isdir(text):
        raise EngineError(f"{option} {text}: is a folder; give a file name or use a folder of several images")
    check_output_folder(os.path.dirname(os.path.abspath(text)), option=f"{option} {text}: its folder")
    return text


def torch_bytes(obj: Any) -> bytes:
    """``torch.save`` into memory: torch's own file writer turns a full disk into an opaque RuntimeError."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` (a temp path of an atomic writer); a full disk raises OSError(ENOSPC)."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def disk_full_message(where: str, needed: int | None = None) -> str:
    free = free_bytes(where)
    need = f"needs about {megabytes(needed)}, " if needed else ""
    return f"{where}: disk full ({need}{megabytes(free)} free); free some space"


# ------------------------------------------------------------------------------------------------ run lock


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """One writer per run folder: ``OUT/.tensorpeft.lock`` holds the holder's pid, host and start time.

    A second ``finetune`` into the same folder is refused, naming the holder. A lock left by a process that no
    longer runs (killed, crashed) is taken over; one from another host cannot be checked and is reported with the
    file to delete when that job is known to be gone.
    """

    def __init__(self, folder: str | os.PathLike, command: str = "finetune") -> None:
        self.folder = os.fspath(folder)
        self.path = os.path.join(self.folder, LOCK_FILE)
        self.command = command
        self.held = False
        self.created = False

    def holder(self) -> dict[str, Any] | None:
        try:
            with open(self.path, encoding="utf-8") as handle:
                data = json.load(handle)
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written, or garbage: treated as held by an unknown process

    def acquire(self) -> "RunLock":
        self.created = not os.path.isdir(self.folder)
        os.makedirs(self.folder, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command, "started": time.time()}
        for _ in range(3):
            try:
                self._create(me)
            except FileExistsError:
                other = self.holder()
                if other is None:
                    continue  # released meanwhile: try again
                if self._stale(other):
                    try:
                        os.remove(self.path)
                    except FileNotFoundError:
                        pass
                    continue
                raise EngineError(self._busy_message(other)) from None
            self.held = True
            return self
        raise EngineError(self._busy_message(self.holder() or {}))

    def _create(self, me: dict[str, Any]) -> None:
        """Create the lock file with its content in one step (FileExistsError if another process holds it): written
        to a private temp file, then hard-linked into place, so a second process never reads a lock that exists but
        is still empty (it used to, and then named its holder "another job (process ?)"). Filesystems without hard
        links fall back to an exclusive create, then the write."""
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(me, handle)
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            raise
        except OSError:  # no hard links here
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(me, handle)
        finally:
            try:
                os.remove(tmp)
            except FileNotFoundError:
                pass

    def _stale(self, other: dict[str, Any]) -> bool:
        pid = other.get("pid")
        if not isinstance(pid, int) or other.get("host") != socket.gethostname():
            return False
        return not _alive(pid)

    def _busy_message(self, other: dict[str, Any]) -> str:
        pid, host = other.get("pid", "?"), other.get("host", "?")
        since = other.get("started")
        when = time.strftime(" since %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else ""
        where = "" if host == socket.gethostname() else f" on host {host}"
        return (f"{self.folder}: in use by another {other.get('command', 'job')} (process {pid}{where}{when}); wait "
                f"for it to finish or choose another --out (if that job is gone, delete {self.path})")

    def release(self) -> None:
        """Drop the lock; a folder the lock itself made and nothing was written into goes too (a job refused
        after taking the lock leaves the file system as it found it)."""
        if self.held:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
            self.held = False
            if self.created:
                try:
                    os.rmdir(self.folder)
                except OSError:
                    pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
