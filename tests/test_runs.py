"""The experiment runner's files: a progress file is used only when it is one, of this run."""

from __future__ import annotations

import re

import pytest

from ofa_kernels.fewshot.runs import _Progress

KEY = {"task": {"name": "t"}, "model": "m"}


@pytest.mark.parametrize("content", ["[]", "{}", '{"key": {}}', '{"key": [], "entries": {}}',
                                     '{"key": {}, "entries": []}', '{"key": {}, "entries": {"zero-shot": 3}}'],
                         ids=["list", "empty", "no-entries", "key-list", "entries-list", "entry-number"])
def test_a_progress_file_of_the_wrong_shape_is_refused_by_name(tmp_path, content):
    path = tmp_path / "progress-t-abc.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="is not a progress file") as err:
        _Progress(path, KEY)
    assert str(path) in str(err.value)


def test_a_progress_file_resumes_its_own_run_and_refuses_another(tmp_path):
    path = tmp_path / "progress-t-abc.json"
    _Progress(path, KEY).put("zero-shot", {"accuracy": 0.5, "macro_f1": 0.4})
    assert _Progress(path, KEY).get("zero-shot") == {"accuracy": 0.5, "macro_f1": 0.4}
    with pytest.raises(ValueError, match=r"other settings \(differing: \['model'\]\)"):
        _Progress(path, {**KEY, "model": "other"})
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        _Progress(path, KEY)


# ------------------------------------------------------------------ a failure at every write boundary


class _Killed(Exception):
    """Stands for a kill at one instant of a run."""


def _dataset():
    from ofa_kernels.fewshot import data

    task = data.file_task("mine", "Text: {text}\nLabel:", ("no", "yes"))
    words = ["good", "bad", "fine", "awful", "great", "poor", "nice", "sad", "calm", "angry", "kind", "rude"]
    rows = [data.Example(f"it was {w} today", i % 2, f"mine.csv:{i + 2}") for i, w in enumerate(words)]
    return data.Dataset(task, rows[:8], rows[8:])


def _run(model_dir, out, **kwargs):
    from ofa_kernels.fewshot import models, runs
    from ofa_kernels.fewshot.trainer import AdaptOptions

    return runs.adapt_and_report(lambda: models.load_model(str(model_dir)), _dataset(), model_name=str(model_dir),
                                 seeds=[42], arms=["ce"], options=AdaptOptions(arm="ce", shots=2, epochs=8, lr=1e-2),
                                 test_size=4, out=out, with_demos=False, log=lambda *_: None, **kwargs)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    return _run(tiny_model_dir, tmp_path_factory.mktemp("whole"))


@pytest.mark.slow
@pytest.mark.parametrize("boundary", ["adapter-written", "progress-committed"])
def test_a_kill_at_each_write_boundary_keeps_the_finished_arm_or_its_checkpoint(tiny_model_dir, tmp_path, monkeypatch,
                                                                                uninterrupted, boundary):
    from ofa_kernels.fewshot import runs

    out = tmp_path / "run"
    real_save, real_put = runs.save_adapter, runs._Progress.put

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise _Killed(boundary)

    def put_then_die(self, name, entry):
        kept = real_put(self, name, entry)
        if name.startswith("ce|"):
            raise _Killed(boundary)
        return kept

    with monkeypatch.context() as patch:
        if boundary == "adapter-written":
            patch.setattr(runs, "save_adapter", save_then_die)
        else:
            patch.setattr(runs._Progress, "put", put_then_die)
        with pytest.raises(_Killed):
            _run(tiny_model_dir, out)
    [ckpt] = out.glob("checkpoint-mine-ce-seed42-*.pt")  # the checkpoint outlives both instants
    if boundary == "progress-committed":  # the arm is finished: the rerun must not train it again
        monkeypatch.setattr(runs, "adapt", lambda *a, **k: pytest.fail("a finished arm was trained again"))
    # and a temporary file a killed writer (a process that is gone) left behind is recognised
    stale = out / ".progress-mine-x.json.ofa-99999999-abc.tmp"
    stale.write_text("half")
    again = _run(tiny_model_dir, out)
    assert again["accuracy"] == uninterrupted["accuracy"]
    assert [r["losses"] for r in again["runs"]] == [r["losses"] for r in uninterrupted["runs"]]
    assert not ckpt.exists() and not stale.exists()
    assert list(out.glob("adapter-mine-ce-seed42-*.safetensors"))


# ------------------------------------------------------------------ damaged progress files, names, concurrent arms


@pytest.mark.parametrize("content, message", [
    ('{"key": KEY, "entries": {"zero-shot": {}}}', "entry 'zero-shot' has accuracy None"),
    ('{"key": KEY, "entries": {"ce|42": {"accuracy": "high", "macro_f1": 0.5}}}', "entry 'ce|42' has accuracy 'high'"),
    ('{"key": KEY, "entries": {"ce|42": {"accuracy": 1.5, "macro_f1": 0.5}}}', "has accuracy 1.5"),
    ('{"key": KEY, "entries": {"ce|42": {"accuracy": 0.5, "macro_f1": NaN}}}', "has macro_f1 nan"),
    ("\udcff", "not readable JSON"),
])
def test_a_damaged_progress_entry_is_named_with_its_file_before_any_work(tmp_path, content, message):
    import json

    path = tmp_path / "progress-t-abc.json"
    path.write_text(content.replace("KEY", json.dumps(KEY)), errors="surrogateescape")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}.*{re.escape(message)}"):
        _Progress(path, KEY)


def test_a_progress_path_that_is_a_folder_is_named_not_a_traceback(tmp_path):
    path = tmp_path / "progress-t-abc.json"
    path.mkdir()
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))} is not a file"):
        _Progress(path, KEY)


def test_a_name_that_would_leave_out_is_refused_before_the_model_loads(tmp_path):
    from ofa_kernels.fewshot import data, runs

    task = data.file_task("x/../../../ESCAPED", "Text: {text}\nLabel:", ("no", "yes"))
    rows = [data.Example(f"row {i}", i % 2, f"f.csv:{i}") for i in range(12)]
    out = tmp_path / "o" / "inner"
    with pytest.raises(ValueError, match="task 'x/../../../ESCAPED' cannot be part of a file name"):
        runs.adapt_and_report(lambda: pytest.fail("the model was loaded"), data.Dataset(task, rows[:8], rows[8:]),
                              model_name="m", out=out, log=lambda *_: None)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))  # nothing written anywhere


_CONCURRENT = """
import sys
from ofa_kernels.fewshot import data, models, runs
from ofa_kernels.fewshot.trainer import AdaptOptions
task = data.file_task("mine", "Text: {text}\\nLabel:", ("no", "yes"))
words = ["good", "bad", "fine", "awful", "great", "poor", "nice", "sad", "calm", "angry", "kind", "rude"]
rows = [data.Example(f"it was {w} today", i % 2, f"mine.csv:{i + 2}") for i, w in enumerate(words)]
model_dir, out, arm = sys.argv[1:4]
runs.adapt_and_report(lambda: models.load_model(model_dir), data.Dataset(task, rows[:8], rows[8:]), model_name=model_dir,
                      seeds=[42], arms=[arm], options=AdaptOptions(shots=2, epochs=4, lr=1e-2), test_size=4,
                      out=out, with_demos=False, log=lambda *_: None)
"""


@pytest.mark.slow
def test_arms_run_at_once_into_one_out_keep_every_result_and_adapter(tiny_model_dir, tmp_path, monkeypatch):
    """ce, ofa and ia3 started together into one --out: the progress and results files hold all three
    arms, all three adapters are there, and a rerun of each arm trains nothing."""
    import json
    import subprocess
    import sys

    out = tmp_path / "run"
    procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT, str(tiny_model_dir), str(out), arm],
                              stderr=subprocess.PIPE, text=True) for arm in ("ce", "ofa", "ia3")]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    [progress] = out.glob("progress-mine-*.json")
    entries = json.loads(progress.read_text())["entries"]
    assert {"zero-shot", "ICL|42", "ce|42", "ofa|42", "ia3|42"} <= set(entries)
    assert len(list(out.glob("adapter-mine-*-seed42-*.safetensors"))) == 3
    from ofa_kernels.fewshot import data, models, runs
    from ofa_kernels.fewshot.trainer import AdaptOptions

    monkeypatch.setattr(runs, "adapt", lambda *a, **k: pytest.fail("a finished arm was trained again"))
    words = ["good", "bad", "fine", "awful", "great", "poor", "nice", "sad", "calm", "angry", "kind", "rude"]
    rows = [data.Example(f"it was {w} today", i % 2, f"mine.csv:{i + 2}") for i, w in enumerate(words)]
    task = data.file_task("mine", "Text: {text}\nLabel:", ("no", "yes"))
    again = runs.adapt_and_report(lambda: models.load_model(str(tiny_model_dir)), data.Dataset(task, rows[:8], rows[8:]),
                                  model_name=str(tiny_model_dir), seeds=[42], arms=["ia3"],
                                  options=AdaptOptions(shots=2, epochs=4, lr=1e-2), test_size=4, out=out,
                                  with_demos=False, log=lambda *_: None)
    assert set(again["accuracy"]) == {"zero-shot", "ICL", "ia3", "ce", "ofa"}  # the others' rows kept
    [results] = out.glob("results-mine-*.json")
    assert {r["arm"] for r in json.loads(results.read_text())["runs"]} == {"ce", "ofa", "ia3"}
