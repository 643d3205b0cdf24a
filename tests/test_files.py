"""Atomic writes, and what interrupted writers leave behind."""

from __future__ import annotations

import os

from ofa_kernels.files import atomic_dir, remove_stale_temps, write_text

GONE = 99999999  # above any pid_max: no such process


def test_a_dead_writers_temporaries_are_removed_and_a_live_ones_kept(tmp_path):
    dead_file = tmp_path / f".results.json.ofa-{GONE}-x1.tmp"
    dead_dir = tmp_path / f".export.ofa-{GONE}-x2.tmp"
    live = tmp_path / f".other.json.ofa-{os.getppid()}-x3.tmp"  # our parent is alive
    mine = tmp_path / f".mine.json.ofa-{os.getpid()}-x4.tmp"
    users = tmp_path / ".hidden.tmp"  # not ours by name: never touched
    for path in (dead_file, live, mine, users):
        path.write_text("half")
    dead_dir.mkdir()
    (dead_dir / "model.safetensors").write_bytes(b"\0" * 1024)
    assert sorted(remove_stale_temps(tmp_path)) == sorted([dead_file, dead_dir])
    assert live.exists() and mine.exists() and users.exists()


def test_a_killed_exports_folder_is_removed_by_the_next_export(tmp_path):
    left = tmp_path / f".trec-hf.ofa-{GONE}-abc.tmp"
    left.mkdir()
    (left / "model.safetensors").write_bytes(b"\0" * 1024)
    with atomic_dir(tmp_path / "trec-hf") as tmp:
        (tmp / "config.json").write_text("{}")
    assert not left.exists() and (tmp_path / "trec-hf" / "config.json").exists()


def test_temporaries_are_named_for_their_writer(tmp_path):
    seen = []
    write_text(tmp_path / "a.json", "{}")
    assert (tmp_path / "a.json").read_text() == "{}" and not list(tmp_path.glob(".*.tmp"))
    with atomic_dir(tmp_path / "folder") as tmp:
        seen.append(tmp.name)
    assert seen[0].startswith(f".folder.ofa-{os.getpid()}-") and seen[0].endswith(".tmp")
