"""Content identities: what a run's numbers depend on, by content, never by path.

A run is named by a hash of these (``runs.settings_key``), and a training checkpoint carries one
(``trainer.adapt``), so a result or a checkpoint is reused only for the very same experiment: the
same model weights and tokenizer files, task definition (template, label words), training pool,
test rows and options. Naming the same file by another path changes nothing; changing one byte of
it, or one row, gives a new identity.

Hashing a model's files costs one read of them; the digest is cached per file under
``$OFA_CACHE`` (``digests.json``), keyed by the file's absolute path, size and modification time,
so a later run reads nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from .files import write_text

_CHUNK = 1 << 22


def _cache_file() -> Path:
    return Path(os.environ.get("OFA_CACHE", Path.home() / ".cache" / "ofa_kernels")) / "digests.json"


def _read_cache(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):  # missing, unreadable or not JSON: start afresh (it is only a cache)
        return {}
    return cache if isinstance(cache, dict) else {}


def _digests(paths: list[Path]) -> list[str]:
    """sha256 of each file's bytes, from the cache where (absolute path, size, mtime) match; the cache is read
    once and written once, whatever the number of files."""
    cache_path = _cache_file()
    cache = _read_cache(cache_path)
    out, changed = [], False
    for path in paths:
        path = path.resolve()
        stat = path.stat()
        stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
        hit = cache.get(str(path))
        if isinstance(hit, dict) and hit.get("stamp") == stamp and isinstance(hit.get("sha256"), str):
            out.append(hit["sha256"])
            continue
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        out.append(h.hexdigest())
        cache[str(path)] = {"stamp": stamp, "sha256": out[-1]}
        changed = True
    if changed:
        try:
            write_text(cache_path, json.dumps(cache))
        except OSError:  # a read-only cache folder costs a rehash next time, nothing else
            pass
    return out


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, cached by (absolute path, size, mtime)."""
    return _digests([Path(path)])[0]


def folder_digest(folder: str | Path) -> str:
    """sha256 over every file of a folder (relative names and contents; hidden files left out)."""
    folder = Path(folder)
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    h = hashlib.sha256()
    for path, digest in zip(files, _digests(files)):
        h.update(path.relative_to(folder).as_posix().encode() + b"\0" + digest.encode() + b"\n")
    return h.hexdigest()


def model_identity(name_or_path: str) -> str:
    """The content identity of a model and its tokenizer: a named model (``models.MODELS``) is its
    name and its GGUF file's digest (its tokenizer is made from that file by this library's version),
    a local folder the digest of all its files; any other name (nothing local to read) is the name itself."""
    from .models import MODELS, find_gguf

    if name_or_path in MODELS:
        return f"gguf:{name_or_path}:" + file_digest(find_gguf(name_or_path))
    path = Path(name_or_path)
    if path.is_dir():
        return "folder:" + folder_digest(path)
    if path.is_file():
        return "file:" + file_digest(path)
    return "name:" + name_or_path


def rows_digest(rows: Iterable) -> str:
    """sha256 of examples by content (text and label), in order; where they were read from does not count."""
    return hashlib.sha256(json.dumps([[e.text, e.label] for e in rows]).encode()).hexdigest()


def task_identity(task) -> dict:
    """A task's definition: what turns a row into a prompt and a prediction into a label."""
    return {"name": task.name, "template": task.template, "labels": list(task.labels)}
