"""Files written atomically: a reader (or a killed run) sees the old file or the whole new one.

The new content goes to a uniquely named temporary file beside the target (two writers never share
one), is flushed to disk (fsync) and then renamed over the target in one step; the folder is
fsynced too, so the rename survives a crash. A temporary's name carries its writer's process id
(``.<name>.ofa-<pid>-<random>.tmp``), so what a killed writer left is recognised and removed by
``remove_stale_temps`` (a live writer's temporaries are left alone).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a folder
        pass
    finally:
        os.close(fd)


class WriteError(OSError):
    """A file could not be written (a full disk, no permission, a writer's own failure); what was at the
    path before is untouched. Its message names the path and the cause in one line."""

    def __init__(self, errno: int | None, message: str):
        super().__init__(message)
        self.errno = errno


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path`` to write; on success it replaces ``path`` in one step,
    with the permissions of a plainly created file (the umask's), whatever the writer set. Any failure
    while writing or replacing is a ``WriteError`` naming ``path``; the old file stays as it was."""
    path = Path(path)
    with _failures_named(path, ""):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        with _failures_named(path, " (the file there before, if any, is unchanged)"):
            yield tmp
            # mkstemp's 0600, or a writer that replaced the file with its own (safetensors): plain permissions
            os.chmod(tmp, 0o666 & ~_umask())
            _fsync(tmp)
            _commit(tmp, path)
            _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def read_json(path: Path, advice: str = "") -> Any:
    """The JSON in ``path``; a file that is not UTF-8 JSON is a ValueError naming it (``advice`` ends it)."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not readable JSON ({exc}){advice}") from None


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yields a temporary folder beside ``path`` to fill; on success it becomes ``path`` in one rename.

    ``path`` must not exist or be an empty folder (a folder with files is refused before anything is
    written, so nothing of the user's is replaced).
    """
    import shutil

    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists and is not an empty folder; pass a new path")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)  # a killed export's half-written folder (hundreds of MB) goes now
    with _failures_named(path, ""):
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        with _failures_named(path, " (nothing was written there)"):
            yield tmp
            for child in tmp.iterdir():
                if child.is_file():
                    os.chmod(child, 0o666 & ~_umask())  # writers that replace their file (safetensors): plain
                    _fsync(child)
            if path.exists():
                path.rmdir()  # empty (checked above); a rename cannot replace a folder on every system
            _commit(tmp, path)
            _fsync(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _failures_named(path: Path, after: str) -> Iterator[None]:
    """Turns a write failure inside the block into one ``WriteError`` line naming ``path`` (``after`` ends
    it); anything else, a ``WriteError`` or ``FileExistsError`` of the block's own, passes unchanged."""
    try:
        yield
    except (WriteError, FileExistsError):
        raise
    except Exception as exc:
        if not _is_write_failure(exc):
            raise
        cause = str(exc).splitlines()[0][:200] if str(exc) else ""
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {cause}"
        raise WriteError(getattr(exc, "errno", None), f"cannot write {path}: {why}{after}") from exc


def _is_write_failure(exc: BaseException) -> bool:
    """What a writer raises when the disk refuses: OSError (ENOSPC, EACCES, ...), torch.save's RuntimeError
    ("file write failed"), safetensors' SafetensorError. Anything else (a ValueError of the caller's own
    checks) is not a write failure and passes unchanged."""
    return isinstance(exc, (OSError, RuntimeError)) or type(exc).__name__ == "SafetensorError"


def _commit(tmp: Path, path: Path) -> None:
    """The one step that makes a written file (or folder) visible at ``path``: a rename."""
    os.replace(tmp, path)


NAME_PART_MAX = 80  # characters of a user-given name inside a file name


def name_part(value: object, what: str) -> str:
    """``value`` when it can stand as it is inside a file name under the run's folder, else a
    ValueError naming ``what`` (the argument) and the reason: a non-empty string of at most
    ``NAME_PART_MAX`` characters, no path separator, no ``..``, no control character, not starting
    with a dot (hidden files and this module's temporaries). Every name that becomes part of a path
    (task, arm, model tag) goes through here once, so no name can lead a write outside the folder."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a non-empty name, got {value!r}")
    if len(value) > NAME_PART_MAX:
        raise ValueError(f"{what} is {len(value)} characters long; a name in a file name takes at most {NAME_PART_MAX}")
    bad = [c for c in value if c in "/\\" or ord(c) < 32 or ord(c) == 127]
    if bad:
        raise ValueError(f"{what} {value!r} cannot be part of a file name: it holds {sorted(set(bad))!r} "
                         "(path separators and control characters are refused)")
    if ".." in value or value.startswith("."):
        raise ValueError(f"{what} {value!r} cannot be part of a file name: it may not start with '.' or hold '..'")
    return value


_STALE = re.compile(r"^\..+\.ofa-(\d+)-[^/]*\.tmp$")


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.ofa-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Removes the temporary files and folders that killed writers left in ``folder``; returns them."""
    import shutil

    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _STALE.match(entry.name)
        if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask
