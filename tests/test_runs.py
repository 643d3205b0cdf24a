"""The experiment runner's files: a progress file is used only when it is one, of this run."""

from __future__ import annotations

import pytest

from ofa_kernels.runs import _Progress

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
    _Progress(path, KEY).put("zero-shot", {"accuracy": 0.5})
    assert _Progress(path, KEY).get("zero-shot") == {"accuracy": 0.5}
    with pytest.raises(ValueError, match=r"other settings \(differing: \['model'\]\)"):
        _Progress(path, {**KEY, "model": "other"})
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        _Progress(path, KEY)


# ------------------------------------------------------------------ a failure at every write boundary


class _Killed(Exception):
    """Stands for a kill at one instant of a run."""


def _dataset():
    from ofa_kernels import data

    task = data.file_task("mine", "Text: {text}\nLabel:", ("no", "yes"))
    words = ["good", "bad", "fine", "awful", "great", "poor", "nice", "sad", "calm", "angry", "kind", "rude"]
    rows = [data.Example(f"it was {w} today", i % 2, f"mine.csv:{i + 2}") for i, w in enumerate(words)]
    return data.Dataset(task, rows[:8], rows[8:])


def _run(model_dir, out, **kwargs):
    from ofa_kernels import models, runs
    from ofa_kernels.trainer import AdaptOptions

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
    from ofa_kernels import runs

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
