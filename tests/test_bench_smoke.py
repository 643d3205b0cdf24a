"""The benchmark scripts run at CPU size and write their table, JSON and plot (CI smoke)."""

import json
import math
import os
import sys
from pathlib import Path

import pytest
from conftest import TASKS
import torch

import ofa_kernels

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_norm  # noqa: E402


def test_bench_norm_cpu_smoke_writes_a_complete_table(tmp_path):
    assert bench_norm.main(["--cpu-smoke", "--out", str(tmp_path), "--shapes", "64x576"]) == 0
    rows = json.loads((tmp_path / "norm_cpu.json").read_text())["rows"]
    ours = [r for r in rows if r["provider"] == "ofa"]
    assert {(r["op"], r["mode"]) for r in ours} == {(op, m) for op in ("rms", "layer") for m in bench_norm.MODES}
    assert all(r["ms"] and r["ms"] > 0 and not r["note"] for r in ours)  # every mode validated and timed
    assert (tmp_path / "norm_cpu.png").stat().st_size > 0
    assert (tmp_path / "norm_cpu_vs_best.png").stat().st_size > 0  # on CPU the anchors are F.rms_norm/F.layer_norm
    assert "copy" in (tmp_path / "norm_cpu.md").read_text()


def test_speed_ratios_compare_ours_with_the_best_anchor_only():
    from harness import Row, provider_colours, speed_ratios

    rows = [Row("rms", "fwd", "8x8", "bf16", p, ms) for p, ms in
            (("ofa", 2.0), ("F.rms_norm", 3.0), ("compile(F.rms_norm)", 2.5), ("liger", 4.0), ("hf_eager", 1.0))]
    assert speed_ratios(rows) == {("rms", "fwd"): {("8x8", "bf16"): 1.25}}  # hf_eager is no anchor
    first = provider_colours(["F.rms_norm", "ofa"])
    assert first["ofa"] == provider_colours(["liger", "ofa", "x"])["ofa"] and first["ofa"] != first["F.rms_norm"]


def test_rms_norm_forward_backward_cpu(benchmark):
    """pytest-benchmark timing of the CPU path at the SmolLM2 width (a record, not a target)."""
    x = torch.randn(256, 576, requires_grad=True)
    w = torch.ones(576, requires_grad=True)

    def step():
        return torch.autograd.grad(ofa_kernels.rms_norm(x, w).sum(), [x, w])

    gx, gw = benchmark(step)
    want = torch.autograd.grad(torch.nn.functional.rms_norm(x, (576,), w, 1e-6).sum(), [x, w])
    torch.testing.assert_close(gx, want[0], rtol=1e-5, atol=1e-5)  # what was timed is the right computation
    torch.testing.assert_close(gw, want[1], rtol=1e-5, atol=1e-4)


def test_bench_objective_smoke_times_every_arm(tmp_path):
    import bench_objective

    assert bench_objective.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "objective_cpu.json").read_text())["rows"]
    assert [(r["estimator"], r["K"]) for r in rows] == [(e, k) for _, e, k in bench_objective.ARMS]
    assert all(r["ms"] and r["ms"] > 0 for r in rows)
    assert "K=4 / K=1" in (tmp_path / "objective_cpu.md").read_text()


def test_accuracy_benchmark_writes_the_summary_and_resumes(tiny_model_dir, tmp_path):
    import accuracy

    args = ["--model", str(tiny_model_dir), "--data-dir", str(TASKS), "--tasks", "sst2,trec", "--arms", "ce,lora",
            "--seeds", "42,43", "--shots", "1", "--epochs", "2", "--test-size", "6", "--out", str(tmp_path), "--nice", "0"]
    assert accuracy.main(args) == 0
    summary = (tmp_path / "summary.md").read_text()
    for method in ("zero-shot", "ICL", "ce", "ce + demos", "lora", "lora + demos"):
        assert f"| {method} |" in summary
    data = json.loads((tmp_path / "summary.json").read_text())
    assert len(data["methods"]["ce"]["mean_over_tasks_per_seed"]) == 2
    assert len(data["methods"]["ce"]["macro_f1"]["mean_over_tasks_per_seed"]) == 2 and "### Macro-F1 %" in summary
    assert (tmp_path / "summary.png").stat().st_size > 0
    assert [len(v) for v in data["cell_seconds"]["sst2"].values()] == [2, 2]  # ce and lora, two seeds each
    files = [next((tmp_path / t).glob(f"progress-{t}-*.json")) for t in ("sst2", "trec")]
    progress = {f: f.read_text() for f in files}
    assert accuracy.main(args) == 0  # everything finished: nothing is recomputed
    assert {f: f.read_text() for f in files} == progress
    assert (tmp_path / "summary.md").read_text() == summary


def test_bench_ofa_step_smoke_times_ours_plain_and_the_authors_style_step(tmp_path):
    import bench_ofa_step

    assert bench_ofa_step.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "ofa_step_cpu.json").read_text())["rows"]
    impls = {(r["impl"], r["arm"]) for r in rows}
    assert {("ofa_kernels", a) for a, *_ in bench_ofa_step.OURS} <= impls
    assert {("ofa_kernels captured", a) for a, *_ in bench_ofa_step.OURS} <= impls  # replayed (emulated on CPU)
    assert {("authors-style", a) for a, _ in bench_ofa_step.REFERENCE} <= impls
    assert all(r["ms"] and r["ms"] > 0 for r in rows)
    assert "ofa-fd-K4 / authors-style ce" in (tmp_path / "ofa_step_cpu.md").read_text()
    eager, captured = json.loads((tmp_path / "ofa_step_cpu.json").read_text())["protocol"]
    assert eager["steps"] == captured["steps"] == 4 and eager["seconds"] > 0 and captured["graphs"] >= 1
    assert captured["mean_loss_last_10"] == pytest.approx(eager["mean_loss_last_10"], rel=1e-4)  # same steps


def test_paired_differences_pair_seeds_and_pick_the_best_baseline_per_task():
    import pytest

    import accuracy

    per_task = {"sst2": {"accuracy": {"zero-shot": [0.5, 0.5], "ICL": [0.6, 0.4], "ce": [0.7, 0.8],
                                      "lora": [0.9, 0.5], "ofa": [0.8, 0.7]}},
                "trec": {"accuracy": {"zero-shot": [0.3, 0.3], "ICL": [0.2, 0.2], "ce": [0.4, 0.2],
                                      "lora": [0.5, 0.5], "ofa": [0.6, 0.4]}}}
    table, data = accuracy.paired_differences(per_task, [42, 43])
    assert data["sst2"]["ce"]["per_seed"] == pytest.approx([10, -10]) and data["sst2"]["ce"]["std"] == pytest.approx(10)
    assert data["sst2"]["best"]["against"] == "ce"  # mean 0.75 beats lora's 0.70
    assert data["trec"]["best"]["against"] == "lora"
    assert data["trec"]["best"]["per_seed"] == pytest.approx([10, -10])
    assert "| trec | +20.0 +- 0.0 | lora | +0.0 +- 10.0 |" in table
    mean = data["mean over tasks"]  # per seed: ofa 0.7, 0.55; ce 0.55, 0.5; lora 0.7, 0.5 (best over tasks)
    assert mean["ce"]["per_seed"] == pytest.approx([15, 5]) and mean["best"]["against"] == "lora"
    assert mean["best"]["per_seed"] == pytest.approx([0, 5])
    per_task["trec"]["accuracy"]["ofa"] = [0.6]  # an unfinished task: no mean row
    assert "mean over tasks" not in accuracy.paired_differences(per_task, [42, 43])[1]


def test_host_time_smoke_writes_both_ops_and_every_mode(tmp_path):
    import host_time

    assert host_time.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "host_time_cpu.json").read_text())["rows"]
    assert {(r["op"], r["mode"]) for r in rows} == {(op, m) for op in ("rms", "layer") for m in host_time.MODES}
    assert all(r["ofa_us"] > 0 and r["torch_us"] > 0 for r in rows)


def test_lower_priority_nices_the_process_and_its_autogroup():
    import subprocess

    code = ("import sys; sys.path.insert(0, 'benchmarks'); import os, accuracy; "
            "grouped = accuracy.lower_priority(7); from pathlib import Path; "
            "print(os.nice(0), Path('/proc/self/autogroup').read_text().split()[-1] if grouped else 'none')")
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    niceness, group = done.stdout.split()
    assert int(niceness) >= 7  # at least 7 (more if the test itself runs niced)
    assert group == "none" or int(group) >= 7  # where it reports the autogroup niced, it is


def test_tune_norm_search_keeps_the_fastest_knobs_and_merges_into_the_table():
    """The sweep's coordinate search on a fake timer (no GPU): rows x warps, then programs per SM, then
    the looped path; infeasible knobs (None) are skipped; a merge replaces only the cells found."""
    import tune_norm

    from ofa_kernels.triton import tuning

    class FakeCell:
        def time(self, kernel, knobs, rep_ms):
            if knobs.get("num_warps") == 16:
                return None  # does not compile
            return (abs(knobs["rows_per_program"] - 2) + abs(knobs["num_warps"] - 8)
                    + abs(knobs.get("programs_per_sm", 2) - 4) + (-1.0 if "max_block_n" in knobs else 1.0))

    knobs, ms, tried = tune_norm.best_knobs(FakeCell(), "bwd", 8192, 1.0)
    assert knobs == {"programs_per_sm": 4, "rows_per_program": 1, "num_warps": 8, "max_block_n": 4096}
    assert ms == 0.0 and len(tried) == 16 + 2 + 1  # chunk caps below 8192: 4096 only
    knobs, _, _ = tune_norm.best_knobs(FakeCell(), "fwd", 4096, 1.0)
    assert knobs == {"rows_per_program": 2, "num_warps": 8}  # no grid knob, no chunk below the width
    old = {"sm90": {"bwd": {"bfloat16": {"4096": {"num_warps": 4}, "2048": {"num_warps": 2}}}}}
    new = {"sm90": {"bwd": {"bfloat16": {"4096": {"num_warps": 8}}}}, "sm80": {"fwd": {"float32": {"1024": {}}}}}
    merged = tuning.merge(new, old)
    assert merged["sm90"]["bwd"]["bfloat16"] == {"4096": {"num_warps": 8}, "2048": {"num_warps": 2}}
    assert "sm80" in merged and old["sm90"]["bwd"]["bfloat16"]["4096"] == {"num_warps": 4}


def test_tune_norm_cuda_rows_sweep_times_every_setting_and_resumes(tmp_path, monkeypatch):
    """The CUDA rows-per-CTA sweep on the CPU (the compiled cpu backend stands in; a fake timer that runs the
    call once): every setting of every cell is timed with OFA_CUDA_ROWS_PER_CTA set to it ("rule": unset),
    the env is restored, finished cells are written and skipped on a rerun."""
    import tune_norm

    seen = []

    def fake_bench(fn, rep_ms):
        fn()
        seen.append(os.environ.get("OFA_CUDA_ROWS_PER_CTA", "rule"))
        return 0.5

    monkeypatch.setattr(tune_norm, "bench_ms", fake_bench)
    monkeypatch.setattr(tune_norm, "rows_for", lambda width: 5)
    monkeypatch.delenv("OFA_CUDA_ROWS_PER_CTA", raising=False)
    done = tune_norm.sweep_cuda_rows([48, 40], ["float32"], ["fwd", "bwd_bwd"], 1.0, tmp_path, "cpu-test", "cpu")
    assert set(done["cells"]) == {"fwd/float32/48", "fwd/float32/40", "bwd_bwd/float32/48", "bwd_bwd/float32/40"}
    assert all(cell == {s: 1.0 for s in tune_norm.CUDA_ROWS} for cell in done["cells"].values())  # rms + layer
    assert seen == [s for s in tune_norm.CUDA_ROWS for _ in (0, 1)] * 4
    assert "OFA_CUDA_ROWS_PER_CTA" not in os.environ
    assert json.loads((tmp_path / "tune_cuda_rows_cpu-test.json").read_text())["cells"] == done["cells"]
    seen.clear()
    tune_norm.sweep_cuda_rows([48, 40, 24], ["float32"], ["fwd"], 1.0, tmp_path, "cpu-test", "cpu")
    assert len(seen) == 2 * len(tune_norm.CUDA_ROWS)  # only the new cell


def test_tune_norm_cells_run_each_stage_of_each_norm_as_the_ops_do(monkeypatch):
    """A cell calls the backend's stages with the spec the ops pass (RMSNorm in Llama's cast mode,
    LayerNorm's), here on the plain-PyTorch backend: the numbers the sweep times are the ops' numbers."""
    import tune_norm

    from ofa_kernels.eager import norm as eager_norm
    from ofa_kernels.precision import NormSpec

    calls = []
    for name in ("norm_fwd", "norm_bwd", "norm_bwd_bwd"):
        fn = getattr(eager_norm, name)
        monkeypatch.setattr(eager_norm, name, lambda *a, _fn=fn, _name=name, **k: calls.append(
            (_name, next(v for v in a if isinstance(v, NormSpec)))) or _fn(*a, **k))
    cell = tune_norm.Cell(5, 40, torch.float32, ops=eager_norm, device="cpu")
    for kernel in tune_norm.KERNELS:
        for is_rms in (True, False):
            cell.run(kernel, is_rms, {})
    rms, layer = NormSpec(True, 0.0, "llama"), NormSpec(False)
    assert calls[:2] == [("norm_fwd", rms), ("norm_fwd", layer)]  # the statistics, once per norm
    assert calls[2:] == [("norm_fwd", rms), ("norm_fwd", layer), ("norm_bwd", rms), ("norm_bwd", layer),
                         ("norm_bwd_bwd", rms.unrounded()), ("norm_bwd_bwd", layer)]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_launch_profile_times_every_stage_of_the_backend(tmp_path, backend):
    """The host-time profile runs end to end on a CPU: the compiled cpu backend, and Triton under the
    interpreter (which exercises the bare-launch rows' argument tuples)."""
    import launch_profile

    if backend == "cpu" and not ofa_kernels.backends()["cpu"]["available"]:
        pytest.fail("the compiled cpu backend is not built")
    assert launch_profile.main(["--device", "cpu", "--backend", backend, "--shapes", "3x40", "--dtype", "float32",
                                "--calls", "1", "--rounds", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "launch_profile_cpu.json").read_text())["rows"]
    cases = {r["case"] for r in rows}
    assert {"ofa rms_norm hvp", "F.rms_norm hvp", "backend bwd_bwd (d dy, d x, d w)"} <= cases
    assert ("triton bwd launch only" in cases) == (backend == "triton")
    assert all(r["host_us"] > 0 for r in rows)


def test_kernel_resources_compiles_each_kernel_for_a_gpu_without_one(tmp_path):
    """The static report: every Triton kernel compiled ahead of time for sm_90 as its launcher would call it
    (a signature drift fails the argument-count check), ptxas's registers read back. A subprocess: the
    script compiles for the GPU, so it unsets TRITON_INTERPRET, which this test process needs."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "kernel_resources.py", "--out", str(tmp_path), "--widths", "96",
                           "--dtypes", "bfloat16"], cwd=Path(__file__).resolve().parents[1] / "benchmarks", env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    cells = json.loads((tmp_path / "kernel_resources_sm90.json").read_text())["triton"]
    assert set(cells) == {f"{k}/{n}/bfloat16/96" for k in ("fwd", "bwd", "bwd_bwd") for n in ("rms", "layer")}
    for cell in cells.values():
        assert 16 <= cell["regs"] <= 255 and cell["spill_bytes"] >= 0 and 0 < cell["resident_warps"] <= 64
    assert "| bwd_bwd | layer | bfloat16 | 96 |" in (tmp_path / "kernel_resources_sm90.md").read_text()


def test_the_auto_backend_table_takes_each_stages_winner_ties_to_the_cheaper_launch(tmp_path):
    from harness import Row

    def row(op, mode, shape, provider, ms):
        return Row(op, mode, shape, "bfloat16", provider, ms)

    rows = [row("rms", "fwd", "32768x4096", "ofa[triton]", 1.00), row("rms", "fwd", "32768x4096", "ofa[cuda]", 1.02),
            row("rms", "bwd", "32768x4096", "ofa[triton]", 1.00), row("rms", "bwd", "32768x4096", "ofa[cuda]", 1.20),
            row("rms", "bwd", "150x4096", "ofa[triton]", 0.05), row("rms", "bwd", "150x4096", "ofa[cuda]", 0.01),
            row("rms", "hvp", "32768x4096", "ofa[triton]", 3.0), row("rms", "hvp", "32768x4096", "ofa[cuda]", 2.0),
            row("rms", "fwd+bwd", "32768x4096", "ofa[triton]", 3.0), row("rms", "fwd+bwd", "32768x4096", "ofa[cuda]", 1.0),
            row("layer", "fwd", "32768x8192", "ofa[triton]", 1.0), row("layer", "fwd", "32768x8192", "ofa[cuda]", None),
            row("layer", "fwd", "32768x8192", "F.layer_norm", 0.5)]
    found = bench_norm.auto_table_from(rows, "sm90")
    assert found == {"sm90": {"rms": {"fwd": {"bfloat16": {"4096": "cuda"}},  # within 3%: the C++ launch
                                      "bwd": {"bfloat16": {"4096": "triton"}},  # the 32768-row shape decides
                                      "bwd_bwd": {"bfloat16": {"4096": "cuda"}}}}}  # from the hvp mode
    path = tmp_path / "auto_backends.json"
    path.write_text(json.dumps({"sm80": {"rms": {"fwd": {"bfloat16": {"4096": "triton"}}}},
                                "sm90": {"rms": {"fwd": {"bfloat16": {"2048": "triton", "4096": "triton"}}}}}))
    merged = bench_norm.write_auto_table(found, path)
    assert json.loads(path.read_text()) == merged
    assert merged["sm80"] == {"rms": {"fwd": {"bfloat16": {"4096": "triton"}}}}
    assert merged["sm90"]["rms"]["fwd"]["bfloat16"] == {"2048": "triton", "4096": "cuda"}


def test_bench_one_pass_smoke_times_every_arm_on_both_pairs(tmp_path):
    import bench_one_pass

    assert bench_one_pass.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "one_pass_smoke.json").read_text())["rows"]
    assert {(r["pair"], r["arm"]) for r in rows} == {(p, a) for p in ("short", "long") for a in bench_one_pass.ARMS}
    assert all(r["ms"] > 0 and r["saved_mib"] > 0 for r in rows)
    ce = {r["pair"]: r["saved_mib"] for r in rows if r["arm"] == "ce"}
    # a second pass keeps a second set of activations; the riding row adds one token's worth
    assert all(r["saved_mib"] > 1.5 * ce[r["pair"]] for r in rows if r["arm"] == "ofa-all")
    assert all(r["saved_mib"] < 1.3 * ce[r["pair"]] for r in rows if r["arm"] == "ofa-last")
    assert "| ofa-last |" in (tmp_path / "one_pass_smoke.md").read_text()


def test_s_scale_smoke_gives_every_term_and_form(tmp_path):
    import s_scale

    assert s_scale.main(["--smoke", "--pairs", "2", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "s_scale_smoke.json").read_text())["rows"]
    terms = {r["term"] for r in rows}
    assert terms == {"ce", "lambda_J * J"} | {f"lambda_S * S ({f})" for f in s_scale.FORMS}
    assert all(r["grad_norm"] > 0 and math.isfinite(r["value"]) for r in rows)
    by = {(r["pair"], r["term"]): r for r in rows}
    for pair in (0, 1):  # the authors' q is eps times the trace form's: a far smaller gradient
        assert by[pair, "lambda_S * S (paper)"]["grad_norm"] < by[pair, "lambda_S * S (trace)"]["grad_norm"]
    assert "| lambda_S * S (gain-last) |" in (tmp_path / "s_scale_smoke.md").read_text()


@pytest.mark.parametrize("figures, chosen", [
    # (smollm2, gemma3) OFA - CE per form; what the rule picks
    ({"a": (-4.02, 2.96), "b": (-3.95, 1.89), "c": (-0.77, -8.31)}, "a, the closest"),  # tie on the worse model
    ({"a": (-4.0, 2.96), "b": (-3.2, 1.89)}, "b, the closest"),  # b's worse model 0.8 better: no tie
    ({"a": (-4.0, 2.96), "b": (0.1, 0.0)}, "b, at or above CE"),
])
def test_the_s_form_choice_follows_the_written_rule(monkeypatch, figures, chosen):
    """s_forms_table.choice(): at or above CE on both models, else the least shortfall on the worse model with
    ties within 0.5 points broken by the two-model mean; forms unfinished on a model are not eligible."""
    import s_forms_table as sf

    models = list(sf.MODELS)
    table = {m: {f"{form} (label)": (list(sf.MODELS[m]["tasks"]), 50 + pair[i], 50.0)
                 for form, pair in figures.items()} for i, m in enumerate(models)}
    table[models[1]]["d (unfinished)"] = (["sst2"], 99.0, 50.0)  # would win, but not every task finished
    table[models[0]]["d (unfinished)"] = (list(sf.MODELS[models[0]]["tasks"]), 99.0, 50.0)
    monkeypatch.setattr(sf, "_paired_means", lambda model: table[model])
    assert f"chosen: {chosen}" in sf.choice()
