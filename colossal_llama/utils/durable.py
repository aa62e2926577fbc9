"""Written data that survives a crash of the machine (power loss, kernel panic), not only of the process.

A rename publishes a file or folder atomically, but the kernel may write the rename to disk before the data it
names: after a power loss the published name can hold empty or short files. So whatever publishes (a folder
renamed into place, a manifest or ``running_states.json`` whose presence means "complete") first fsyncs what it
publishes, then the folder that holds the new name.
"""
from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """fsync a folder: the names created, renamed or removed in it are on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> int:
    """fsync every file and folder under ``root``; returns the bytes of its files (measured on the way: the walk
    opens every file anyway)."""
    total = 0
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
                total += os.fstat(fh.fileno()).st_size
        fsync_dir(Path(dirpath))
    return total


def replace_file(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically and durably: a reader never sees half of it, and after a
    power loss ``path`` holds the old text or the new one, never an empty file."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def publish_file(partial: Path, target: Path) -> None:
    """Rename the finished file ``partial`` to ``target``, its data on disk before its new name."""
    with open(partial, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(partial, target)
    fsync_dir(Path(target).parent)


def flush_filesystem(path: Path) -> None:
    """``syncfs(2)`` on the filesystem holding ``path``: everything this machine wrote there (every local rank's
    files) leaves its page cache. On a filesystem shared by several machines (Lustre, GPFS, NFS) one rank's
    fsync flushes only its own machine, so each machine flushes its own writes before one rank publishes."""
    import ctypes

    try:
        syncfs = ctypes.CDLL(None, use_errno=True).syncfs
    except AttributeError:  # not Linux: every filesystem
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs({path}) failed: {os.strerror(err)}")
    finally:
        os.close(fd)
