"""Fault injection at every write: each commit of a run made to fail in turn (a full disk, no permission,
a kill between the temporary file and the rename), through the CLI, for training with evaluation
(``ofa adapt``) and export (``ofa export``).

A failed write must give one line and exit 2, leave the file it was replacing as it was (or absent),
leave no temporary behind once a rerun starts, and the rerun must finish with the uninterrupted run's
numbers. The writes are counted by wrapping ``files._commit`` (the rename that publishes a file).
"""

from __future__ import annotations

import errno
import json

import pytest

from ofa_kernels.fewshot import files
from ofa_kernels.fewshot.cli import main

pytestmark = pytest.mark.slow


class _Killed(BaseException):
    """Stands for a kill: not an Exception, so nothing on the way catches it."""


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _error_lines(capsys) -> list[str]:
    """The lines of standard error that are not progress bars (tqdm's carriage-return lines), no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.strip() and "it/s]" not in line and "step/s]" not in line
            and not line.startswith(("Loading weights", "Writing model"))]


def _adapt_argv(model_dir, out, train):
    return ["adapt", "--model", str(model_dir), "--train", str(train), "--labels", "no,yes", "--task", "mine",
            "--shots", "2", "--seeds", "42", "--arm", "ce", "--epochs", "3", "--test-size", "4", "--no-demos",
            "--out", str(out)]


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "mine.csv"
    words = ["good", "bad", "fine", "awful", "great", "poor", "nice", "sad", "calm", "angry", "kind", "rude"]
    path.write_text("text,label\n" + "".join(f"it was {w} today,{'yes' if i % 2 == 0 else 'no'}\n"
                                             for i, w in enumerate(words)))
    return path


@pytest.fixture(scope="module")
def whole(tiny_model_dir, train_file, tmp_path_factory):
    """The uninterrupted run: its results and how many files it publishes."""
    out = tmp_path_factory.mktemp("whole")
    commits = []
    real = files._commit
    files._commit = lambda tmp, path: (commits.append(path) if out in path.parents else None) or real(tmp, path)
    try:
        assert main(_adapt_argv(tiny_model_dir, out, train_file)) == 0
    finally:
        files._commit = real
    [results] = out.glob("results-mine-*.json")
    return json.loads(results.read_text()), commits


def _failing_at(monkeypatch, n: int, fault, out):
    """Makes the n-th commit into ``out`` (or its parent folder, for an export) raise ``fault`` before the
    rename; returns the snapshot taken of its target. Commits elsewhere (the model's digest cache) pass."""
    seen = {"count": 0, "target": None, "before": None}
    real = files._commit

    def commit(tmp, path):
        if out not in path.parents and path != out:
            return real(tmp, path)
        seen["count"] += 1
        if seen["count"] == n:
            seen["target"] = path
            seen["before"] = _snapshot(path) if path.is_dir() else (path.read_bytes() if path.exists() else None)
            raise fault
        return real(tmp, path)

    monkeypatch.setattr(files, "_commit", commit)
    return seen


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_every_write_of_a_run_failing_in_turn_gives_one_line_and_keeps_what_was_there(
        tiny_model_dir, train_file, tmp_path, monkeypatch, capsys, whole, code):
    results, commits = whole
    assert len(commits) >= 5  # progress entries, the checkpoint, the adapter, the results files
    for n in range(1, len(commits) + 1):
        out = tmp_path / f"run{n}"
        with monkeypatch.context() as patch:
            seen = _failing_at(patch, n, OSError(code, "injected: " + errno.errorcode[code]), out)
            assert main(_adapt_argv(tiny_model_dir, out, train_file)) == 2, (n, [p.name for p in commits])
        err = _error_lines(capsys)
        assert len(err) == 1 and err[0].startswith("ofa adapt: error: cannot write ")
        assert str(seen["target"]) in err[0] and "injected" in err[0]
        target = seen["target"]
        assert (target.read_bytes() if target.exists() else None) == seen["before"]  # untouched
        assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # the failed writer removed its own
        assert main(_adapt_argv(tiny_model_dir, out, train_file)) == 0  # and the run then finishes
        capsys.readouterr()
        [again] = out.glob("results-mine-*.json")
        assert json.loads(again.read_text())["accuracy"] == results["accuracy"], n


def test_a_kill_between_the_temporary_file_and_the_rename_resumes_to_the_same_results(
        tiny_model_dir, train_file, tmp_path, monkeypatch, capsys, whole):
    results, commits = whole
    for n in range(1, len(commits) + 1):
        out = tmp_path / f"run{n}"
        with monkeypatch.context() as patch:
            seen = _failing_at(patch, n, _Killed(), out)
            with pytest.raises(_Killed):
                main(_adapt_argv(tiny_model_dir, out, train_file))
        target = seen["target"]
        assert (target.read_bytes() if target.exists() else None) == seen["before"]
        assert main(_adapt_argv(tiny_model_dir, out, train_file)) == 0
        capsys.readouterr()
        [again] = out.glob("results-mine-*.json")
        assert json.loads(again.read_text())["accuracy"] == results["accuracy"], n
        assert not [p for p in out.iterdir() if p.name.endswith(".tmp") or p.name.startswith("checkpoint-")]


@pytest.mark.parametrize("fault", [OSError(errno.ENOSPC, "injected: ENOSPC"), OSError(errno.EACCES, "injected"),
                                   _Killed()], ids=["ENOSPC", "EACCES", "kill"])
def test_an_export_that_fails_to_write_leaves_nothing_and_says_so(tiny_model_dir, train_file, tmp_path, monkeypatch,
                                                                  capsys, whole, fault):
    results, _ = whole
    [adapter] = [r["adapter"] for r in results["runs"]]
    out = tmp_path / "export"
    argv = ["export", "--model", str(tiny_model_dir), "--adapter", adapter, "--out", str(out)]
    with monkeypatch.context() as patch:
        _failing_at(patch, 1, fault, out)
        if isinstance(fault, _Killed):
            with pytest.raises(_Killed):
                main(argv)
        else:
            assert main(argv) == 2
            err = _error_lines(capsys)
            assert len(err) == 1 and err[0].startswith(f"ofa export: error: cannot write {out}")
    assert not out.exists()
    assert main(argv) == 0  # the next export clears what a killed one left and writes the folder
    assert (out / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_written_files_follow_the_umask_whatever_their_writer(tiny_model_dir, tmp_path, whole):
    import os
    import stat

    results, _ = whole
    [adapter] = [r["adapter"] for r in results["runs"]]
    old = os.umask(0o027)
    try:
        out = tmp_path / "export"
        assert main(["export", "--model", str(tiny_model_dir), "--adapter", adapter, "--out", str(out)]) == 0
        from ofa_kernels.fewshot.files import write_text

        plain = write_text(tmp_path / "plain.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(plain.stat().st_mode) == 0o640
    weights = out / "model.safetensors"
    assert stat.S_IMODE(weights.stat().st_mode) == 0o640  # safetensors writes 0600 files of its own
    assert stat.S_IMODE(os.stat(adapter).st_mode) & 0o044 == 0o044  # the run's adapter: the default umask's 0644

