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
