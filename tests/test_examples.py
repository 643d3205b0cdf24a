"""Each script in python/ runs at tiny size."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

from conftest import TASKS

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, args: list[str], monkeypatch):
    monkeypatch.setattr(sys, "argv", [script] + args)
    return runpy.run_path(str(ROOT / "python" / script), run_name="not_main")["main"](args)


def test_examples_adapt_then_predict(tiny_model_dir, tmp_path, monkeypatch, capsys):
    adapter = tmp_path / "a.safetensors"
    _run("adapt_and_evaluate.py", ["--model", str(tiny_model_dir), "--task", "sst2", "--data-dir", str(TASKS),
                                   "--shots", "2", "--epochs", "2", "--test-size", "4", "--adapter", str(adapter)],
         monkeypatch)
    assert adapter.exists() and "zero-shot" in capsys.readouterr().out
    labels = _run("predict_with_adapter.py", ["--model", str(tiny_model_dir), "--task", "sst2", "--adapter",
                                              str(adapter), "great fun", "dull"], monkeypatch)
    assert len(labels) == 2 and set(labels) <= {"negative", "positive"}
