"""Whole files or none: every file the library writes goes to a temporary name in the same folder and is renamed over
the target at the end (``os.replace`` is atomic on one file system), so a reader, a crash, a full disk or Ctrl-C
never leaves half a file. The temporary name ends like the target (``.tmp-XXXX-name.png``), so writers that choose
their format by the extension (matplotlib, nibabel, pynrrd) behave as for the target.

One helper for adapters/, models/, data/ and engine/ (it imports nothing of ours, so any layer may use it).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Callable


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: what ``open(path, "w")`` would give a new file here (read once, at import: reading the umask sets it briefly)
NEW_FILE_MODE = 0o666 & ~_umask()


def write_atomically(path: str | os.PathLike, write: Callable[[str], Any]) -> str:
    """Call ``write(temporary_path)``, then rename the result to ``path``; the temporary file goes on any failure.

    The file gets the permissions a plain write would give it (an existing target's own, else 0666 less the umask):
    ``mkstemp`` makes its file 0600, which left masks, adapters and shipped weights unreadable to the other users of
    a shared folder."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    try:
        mode = os.stat(path).st_mode & 0o7777
    except OSError:
        mode = NEW_FILE_MODE
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_text_atomically(path: str | os.PathLike, text: str) -> str:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)

    return write_atomically(path, write)


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> str:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)

    return write_atomically(path, write)


def copy_atomically(source: str | os.PathLike, target: str | os.PathLike) -> str:
    return write_atomically(target, lambda tmp: shutil.copyfile(source, tmp))


def write_folder_atomically(final: str | os.PathLike, write: Callable[[str], Any]) -> str:
    """Write a folder next to ``final`` (``final.new``) and swap it in: a crash, a full disk or Ctrl-C never leaves a
    half-written folder, and nothing of the folder it replaces stays behind. Returns ``final``."""
    final = os.fspath(final)
    new, old = final + ".new", final + ".old"
    shutil.rmtree(new, ignore_errors=True)
    os.makedirs(new)
    try:
        write(new)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)  # a disk-full or interrupted write leaves nothing behind
        raise
    if os.path.isdir(final):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)
    return final
