"""Makes ``tests/data/tasks/``: a small labelled copy of ``../shared/data`` in the same release formats.

Each file keeps ``ROWS_PER_CLASS`` lines of every class, its first and its longest (bytes as released:
the Latin-1 lines stay Latin-1), so the loaders read it exactly as they read the shared sets, and the trainer,
CLI, evaluation and example tests run from any clean clone, with or without ``../shared``. TREC's
test file is kept whole (500 lines, 23 KB: its class-balanced subset is what the TREC tests score).
Run once from the repository root when the shared sets change: ``python tests/data/make_task_fixture.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
OUT = Path(__file__).resolve().parent / "tasks"
ROWS_PER_CLASS = 24
LONGEST = 4  # of them the class's longest rows, the rest its first

_LABEL_PREFIX = {"sst2": rb"^(\d)\s", "sst5": rb"^(\d)\s", "trec": rb"^([A-Z]+):"}
_BY_FILE = {"mr": ("rt-polarity.neg", "rt-polarity.pos"), "subj": ("subj.objective", "subj.subjective"),
            "cr": ("custrev.neg", "custrev.pos"), "mpqa": ("mpqa.neg", "mpqa.pos")}


def _first_per_class(lines: list[bytes], pattern: bytes, per_class: int) -> list[bytes]:
    """Per class, its first ``per_class - LONGEST`` lines and its ``LONGEST`` longest (in file order): the
    fixture keeps short and long rows, so steps fall in more than one padded length (the captured-step
    tests need two shapes)."""
    by_class: dict[bytes, list[int]] = {}
    for i, line in enumerate(lines):
        match = re.match(pattern, line)
        if match:
            by_class.setdefault(match.group(1), []).append(i)
    chosen: set[int] = set()
    for rows in by_class.values():
        first = rows[:per_class - LONGEST]
        longest = sorted((r for r in rows if r not in first), key=lambda r: -len(lines[r]))[:per_class - len(first)]
        chosen.update(first + longest)
    return [lines[i] for i in sorted(chosen)]


def main() -> None:
    for task, pattern in _LABEL_PREFIX.items():
        for source in sorted((SHARED / task).glob("*.txt")):
            lines = source.read_bytes().splitlines(keepends=True)
            keep = lines if (task, source.name) == ("trec", "test.txt") else _first_per_class(lines, pattern,
                                                                                              ROWS_PER_CLASS)
            target = OUT / task / source.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"".join(keep))
    for task, names in _BY_FILE.items():
        for name in names:
            lines = (SHARED / task / name).read_bytes().splitlines(keepends=True)
            target = OUT / task / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"".join(lines[:2 * ROWS_PER_CLASS]))


if __name__ == "__main__":
    main()
