"""Per-layer diagnostics: the numbers match direct computations, the probe learns, the CLI writes both files."""

from __future__ import annotations

import json

import pytest
from conftest import TASKS
import torch

from ofa_kernels.fewshot import data, diagnostics
from ofa_kernels.fewshot.cli import main



def test_linear_probe_separates_separable_classes_and_not_noise():
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 20, generator=gen, dtype=torch.float64) * 4
    y_train, y_test = torch.arange(3).repeat(5), torch.arange(3).repeat(40)
    x_train = centers[y_train] + torch.randn(15, 20, generator=gen, dtype=torch.float64)
    x_test = centers[y_test] + torch.randn(120, 20, generator=gen, dtype=torch.float64)
    acc, loss = diagnostics.linear_probe(x_train, y_train, x_test, y_test, 3)
    assert acc == 1.0 and loss < 0.5
    noise_acc, _ = diagnostics.linear_probe(torch.randn(15, 20, generator=gen, dtype=torch.float64), y_train,
                                            torch.randn(600, 20, generator=gen, dtype=torch.float64),
                                            torch.arange(3).repeat(200), 3)
    assert noise_acc < 0.45  # chance is 1/3


def test_layer_report_matches_the_hidden_states(tiny_model_dir):
    from ofa_kernels.fewshot.models import load_model

    model, tokenizer = load_model(str(tiny_model_dir))
    ds = data.load_task("sst2", TASKS)
    train, test = data.k_shot(ds, 2, 42), data.test_subset(ds, 6)
    report = diagnostics.layer_report(model, tokenizer, ds.task, train, test, num_probes=2)
    L = model.config.num_hidden_layers
    assert len(report["step"]) == L and len(report["ratio"]) == L - 1 and len(report["sharpness"]) == L
    assert report["sharpness"][0] is None and all(0 <= s < float("inf") for s in report["sharpness"][1:])
    assert len(report["probe_accuracy"]) == L + 1 and all(0 <= a <= 1 for a in report["probe_accuracy"])
    enc = tokenizer(ds.task.prompt(test[0].text), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        hs = model(**enc, output_hidden_states=True).hidden_states
    one = diagnostics.layer_report(model, tokenizer, ds.task, train, test[:1], num_probes=1)
    want = [float((hs[t + 1][0, -1] - hs[t][0, -1]).double().norm()) for t in range(L)]
    assert one["step"] == pytest.approx(want, rel=1e-5)
    # the riding probes read the same per-layer S from the same last-token probe numbers: for one row
    # both estimators see only that row's last token, up to what earlier positions' noise adds in "all"
    riding = diagnostics.layer_report(model, tokenizer, ds.task, train, test, num_probes=2, probe_rows="last")
    assert riding["sharpness"][0] is None and len(riding["sharpness"]) == L
    assert riding["sharpness"] != report["sharpness"]  # another estimator, not the same call
    assert riding["step"] == report["step"]
    with pytest.raises(ValueError, match="probe_rows must be one of"):
        diagnostics.layer_report(model, tokenizer, ds.task, train, test[:1], num_probes=1, probe_rows="every")


def test_diagnose_cli_writes_json_and_png_for_base_and_adapted(tiny_model_dir, tmp_path, capsys):
    from ofa_kernels.fewshot.adapters import save_adapter
    from ofa_kernels.fewshot.models import load_model
    from ofa_kernels.fewshot.trainer import AdaptOptions, adapt

    model, tokenizer = load_model(str(tiny_model_dir))
    ds = data.load_task("sst2", TASKS)
    result = adapt(model, tokenizer, ds, AdaptOptions(arm="ofa", shots=2, epochs=3, lr=3e-2))
    adapter = save_adapter(result, tmp_path / "a.safetensors", base_model=str(tiny_model_dir), task="sst2")
    out = tmp_path / "diag"
    assert main(["diagnose", "--model", str(tiny_model_dir), "--task", "sst2", "--data-dir", str(TASKS),
                 "--adapter", str(adapter), "--test-size", "8", "--shots", "2", "--probes", "2", "--out", str(out)]) == 0
    report = json.loads((out / "diagnostics.json").read_text())
    assert set(report["base"]) == set(report["adapted"]) and report["adapter_task"] == "sst2"
    assert report["base"]["step"] != report["adapted"]["step"]  # the adapter changed the network
    assert (out / "diagnostics.png").read_bytes()[:4] == b"\x89PNG"
    assert "linear-probe accuracy" in capsys.readouterr().out
