"""Atomic writes, and what interrupted writers leave behind."""

from __future__ import annotations

import os

from ofa_kernels.fewshot.files import atomic_dir, remove_stale_temps, write_text

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


# ------------------------------------------------------------------------ names into file names

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ofa_kernels.fewshot.files import NAME_PART_MAX, name_part  # noqa: E402


@pytest.mark.parametrize("name, reason", [
    ("x/../../../ESCAPED", "holds \\['/'\\]"), ("../x", "holds \\['/'\\]"), ("a\\b", "holds"), ("..", "start with '.'"),
    ("a..b", "hold '..'"), (".hidden", "start with '.'"), ("a\x00b", "control"), ("tab\there", "control"),
    ("", "non-empty"), ("   ", "non-empty"), ("x" * (NAME_PART_MAX + 1), "at most"), (None, "non-empty"), (3, "non-empty"),
])
def test_names_that_cannot_be_part_of_a_file_name_are_refused_naming_the_argument(name, reason):
    with pytest.raises(ValueError, match=rf"^--task .*{reason}|^--task must"):
        name_part(name, "--task")


@pytest.mark.parametrize("name", ["sst2", "ce+J", "my task", "tweets_2026", "x" * NAME_PART_MAX, "émotion"])
def test_ordinary_names_pass_unchanged(name):
    assert name_part(name, "--task") == name


@settings(max_examples=400, deadline=None)
@given(task=st.text(max_size=90), arm=st.text(max_size=12), tag=st.text(alphabet="0123456789abcdef", min_size=8,
                                                                          max_size=8))
def test_an_accepted_name_never_leads_a_run_file_outside_its_folder(tmp_path_factory, task, arm, tag):
    """Whatever the task and arm names: either refused, or every file name a run builds from them
    (progress, results, adapter, checkpoint) is one entry directly inside --out."""
    out = tmp_path_factory.getbasetemp() / "out"
    try:
        name_part(task, "task")
        name_part(arm, "arm")
    except ValueError:
        return
    for file_name in (f"progress-{task}-{tag}.json", f"results-{task}-{tag}.md", f"results-{task}-{tag}.json",
                      f"adapter-{task}-{arm}-seed42-{tag}.safetensors", f"checkpoint-{task}-{arm}-seed42-{tag}.pt"):
        path = (out / file_name).resolve()
        assert path.parent == out.resolve() and path.name == file_name
