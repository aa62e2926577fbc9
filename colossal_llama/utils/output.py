"""Output folders: refuse to clobber one unless asked, publish finished folders atomically, and clean up the
temporary folders that a killed run (``kill -9``, out of memory, power loss) leaves behind."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Iterator, List, Sequence

from colossal_llama.utils.durable import fsync_dir, fsync_tree
from colossal_llama.utils.errors import UserInputError

log = logging.getLogger(__name__)


def clear_output_dir(path: Path, overwrite: bool) -> Path:
    """Make sure ``path`` does not exist: remove it with ``overwrite``, else a one-line error."""
    path = Path(path)
    if path.exists():
        if not overwrite:
            raise UserInputError(f"{path}: already exists (pass --overwrite to replace it)")
        shutil.rmtree(path)
    return path


def lies_in(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it, compared after resolving links (``a/../b``, a link to
    ``folder``): what deleting or replacing ``folder`` would take with it."""
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def check_output_dir(path: Path, overwrite: bool, inputs: Sequence[Path] = ()) -> Path:
    """Check, touching nothing, that the folder ``path`` may be written (then build it in a :func:`tmp_sibling`
    and :func:`replace_dir` it): it is not, and does not contain, any of ``inputs`` (even with ``overwrite``,
    replacing it would delete them); it is not a file; it exists only with ``overwrite``. One-line errors."""
    path = Path(path)
    for given in inputs:
        if lies_in(given, path):
            raise UserInputError(f"{path}: output folder is or contains an input ({given}); choose a new folder")
    _refuse_non_directory(path)
    if path.exists() and not overwrite:
        raise UserInputError(f"{path}: already exists (pass --overwrite to replace it)")
    return path


def check_apart(outputs: Sequence[Path], inputs: Sequence[Path]) -> None:
    """None of ``outputs`` (what a run may replace or delete) is, holds or lies inside any of ``inputs`` (files or
    folders; compared after resolving links): replacing it would delete inputs, or a rerun would read its own
    output as input. Checked even with ``--overwrite``; a one-line error naming both."""
    for output in outputs:
        for given in inputs:
            if lies_in(output, given) or lies_in(given, output):
                raise UserInputError(f"{output}: this run writes (and with --overwrite replaces) it, and it is, "
                                     f"holds or lies inside the input {given}; choose an output folder apart from "
                                     f"the inputs")


def check_folder_path(path: Path) -> None:
    """A one-line error unless the folder ``path`` can be used or made: it, or else its nearest existing parent, is
    a directory (not a file, and not a link to nothing)."""
    for folder in (Path(path), *Path(path).parents):
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                raise UserInputError(f"{folder}: exists and is not a directory (a file or a broken link); choose "
                                     f"another output folder")
            return


def check_replaceable(path: Path) -> None:
    """A one-line error when the folder ``path`` exists as something :func:`replace_dir` refuses to replace."""
    _refuse_non_directory(Path(path))


def check_output_file(path, flag: str, overwrite: bool) -> Path:
    """Before the work (which may take hours): the file ``path``, given as ``flag``, can be written when it ends. Not
    a folder, not an existing file unless ``overwrite``, and its nearest existing folder writable (missing folders
    are made when it is written). One-line errors naming the flag."""
    path = Path(path)
    if path.is_dir():
        raise UserInputError(f"{flag} {path}: is a folder (name the file, e.g. {path / 'report.json'})")
    if path.exists() and not overwrite:
        raise UserInputError(f"{flag} {path}: already exists (pass --overwrite to replace it)")
    folder = next(p for p in path.absolute().parents if p.exists())
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UserInputError(f"{flag} {path}: cannot write in {folder}")
    return path


def _refuse_non_directory(path: Path) -> None:
    """A one-line error when ``path`` exists as something a folder cannot replace (a file, a symbolic link)."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise UserInputError(f"{path}: exists and is not a directory (a file or a symbolic link); choose another "
                             f"output folder")


@contextlib.contextmanager
def staged_dir(target: Path, kind: str) -> Iterator[Path]:
    """Build the folder that replaces ``target`` in this process's :func:`tmp_sibling` of ``kind`` (yielded, not
    yet created): when the block ends it replaces ``target`` (:func:`replace_dir`); on any failure it is removed,
    and only it (never a user's files). A sibling of ``kind`` left by a killed run is removed first."""
    target = Path(target)
    remove_stale_siblings(target, kind)
    tmp = tmp_sibling(target, kind)
    shutil.rmtree(tmp, ignore_errors=True)  # this process's own, from an earlier call that was interrupted
    try:
        yield tmp
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def tmp_sibling(target: Path, kind: str) -> Path:
    """This process's temporary sibling of ``target``: ``.{name}.{kind}-{pid}``. After a crash, the next run's
    :func:`remove_stale_siblings` (same ``kind``) removes it once that process is gone."""
    target = Path(target)
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}")


def remove_stale_siblings(target: Path, kind: str) -> List[Path]:
    """Remove the :func:`tmp_sibling` folders of ``target`` left by runs that were killed."""
    target = Path(target)
    return remove_stale_tmp_dirs(target.parent, f".{_literal(target.name)}.{kind}-{{pid}}")


def replace_dir(tmp: Path, target: Path) -> Path:
    """Move the finished folder ``tmp`` to ``target`` (a sibling); an existing ``target`` is removed only once
    ``tmp`` is complete and on disk, so an interrupted run (or a machine that lost power) never leaves a
    half-written folder under the final name. A ``target`` that is a file (or a link) is refused, untouched."""
    tmp, target = Path(tmp), Path(target)
    _refuse_non_directory(target)
    remove_stale_siblings(target, "old")
    fsync_tree(tmp)  # the contents reach the disk before the name that publishes them
    if target.exists():
        old = tmp_sibling(target, "old")
        target.rename(old)
        tmp.rename(target)
        fsync_dir(target.parent)
        shutil.rmtree(old)
    else:
        tmp.rename(target)
        fsync_dir(target.parent)
    return target


# ---------------------------------------------------------------- leftovers of killed runs


def pid_alive(pid: int) -> bool:
    """True when a process with this id exists on this host (also when it belongs to another user)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _literal(text: str) -> str:
    """``text`` quoted for a :func:`remove_stale_tmp_dirs` pattern (its ``*``, ``{`` and ``}`` taken literally)."""
    return text.replace("\\", "\\\\").replace("*", "\\*").replace("{", "\\{").replace("}", "\\}")


def _pattern_regex(pattern: str) -> re.Pattern:
    parts, i = [], 0
    while i < len(pattern):
        if pattern.startswith("{pid}", i):
            parts.append(r"(?P<pid>\d+)")
            i += 5
        elif pattern.startswith("{host}", i):
            parts.append(r"(?P<host>[^/]+?)")
            i += 6
        elif pattern[i] == "*":
            parts.append(".*")
            i += 1
        elif pattern[i] == "\\" and i + 1 < len(pattern):
            parts.append(re.escape(pattern[i + 1]))
            i += 2
        else:
            parts.append(re.escape(pattern[i]))
            i += 1
    if "(?P<pid>" not in "".join(parts):
        raise ValueError(f"remove_stale_tmp_dirs: pattern {pattern!r} has no {{pid}}")
    return re.compile("".join(parts))


def remove_stale_tmp_dirs(parent: Path, pattern: str) -> List[Path]:
    """Remove the temporary folders in ``parent`` left by earlier runs that were killed; returns what it removed.

    Contract:

    - ``pattern`` names the folders, matched against the whole name of each entry directly in ``parent``:
      ``{pid}`` (required) matches the process id of the run that made the folder, ``{host}`` (optional) a host
      name, ``*`` any run of characters; every other character is literal (write ``\\*``, ``\\{`` for literal
      ``*``, ``{``). Example: ``".model.tmp-init-{pid}"``, ``".tmp-epoch-*.{host}-{pid}"``.
    - A match is removed only when it is a real directory (not a symlink), its ``{pid}`` is not this process,
      no process with that id is alive on this host (``os.kill(pid, 0)``), and, when the pattern has
      ``{host}``, the host is this one (``socket.gethostname()``): the folder of a run still going, here or on
      another node sharing the file system, is never touched. (A dead run's PID reused by an unrelated process
      only delays the cleanup to a later run.)
    - A missing ``parent`` is not an error; a folder that vanishes meanwhile (another run cleaning) is skipped.
      Each removal is logged at INFO.
    """
    parent, regex = Path(parent), _pattern_regex(pattern)
    if not parent.is_dir():
        return []
    me, host, removed = os.getpid(), socket.gethostname(), []
    for entry in sorted(parent.iterdir()):
        match = regex.fullmatch(entry.name)
        if not match or entry.is_symlink() or not entry.is_dir():
            continue
        pid = int(match.group("pid"))
        if pid == me or pid_alive(pid) or ("host" in regex.groupindex and match.group("host") != host):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            log.info("removed %s, left by an earlier run (process %d) that did not finish", entry, pid)
            removed.append(entry)
    return removed
