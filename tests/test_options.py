"""The shared vocabulary (``ofa_kernels.fewshot.options``): every field checked by name, the run key holds exactly
the fields that change numbers, and the module is a leaf (it loads neither torch nor the trainer)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from ofa_kernels.fewshot import options as op
from ofa_kernels.fewshot.options import AdaptOptions

# one value away from the default for every field (a valid one), to see each field alone move the key
_OTHER_VALUE = {
    "arm": "ce", "protocol": "batched", "batch_size": 2, "shots": 4, "seed": 7, "epochs": 3, "lr": 2e-3,
    "weight_decay": 0.0, "warmup": 0.1, "lambda_j": 0.5, "lambda_s": 0.25, "j_final_norm_step": False,
    "estimator": "hvp", "num_probes": 2, "distribution": "rademacher", "eps": 1e-3, "scoring": "first", "rank": 4,
    "memory_efficient": True, "max_memory_gb": 8.0, "probes_per_pass": 1, "fsdp": True, "cuda_graphs": "off",
    "probe_rows": "all", "sharpness_form": "trace",
}
# for each field keyed when set: a value other than the one runs had before the field existed
_AWAY_FROM_LEGACY = {"j_final_norm_step": False, "probe_rows": "last", "sharpness_form": "gain"}


def _keyed(options: AdaptOptions, name: str):
    """The value of ``name`` the run key sees (``probe_rows``: as it runs, auto resolved)."""
    return options.rows() if name == "probe_rows" else getattr(options, name)


def test_the_table_of_other_values_covers_every_field():
    assert set(_OTHER_VALUE) == {f.name for f in dataclasses.fields(AdaptOptions)}
    for name, value in _OTHER_VALUE.items():
        assert value != getattr(AdaptOptions(), name), name
        AdaptOptions(**{name: value}).check()  # each is a valid setting


def test_the_defaults_pass_and_check_returns_the_options():
    options = AdaptOptions()
    assert options.check() is options


@pytest.mark.parametrize("field, choices", [
    ("arm", op.ARMS), ("protocol", op.PROTOCOLS), ("estimator", op.ESTIMATORS), ("scoring", op.SCORING),
    ("distribution", op.DISTRIBUTIONS), ("cuda_graphs", op.CUDA_GRAPH_MODES), ("probe_rows", op.PROBE_ROWS),
    ("sharpness_form", op.SHARPNESS_FORMS)])
def test_every_named_choice_passes_and_any_other_is_refused_naming_the_field(field, choices):
    for choice in choices:
        AdaptOptions(**{field: choice}).check()
    with pytest.raises(ValueError, match=rf"^{field} must be one of"):
        AdaptOptions(**{field: "bogus"}).check()


def test_riding_probes_and_the_paper_form_refuse_what_they_cannot_compute():
    with pytest.raises(ValueError, match='probe_rows="last" rides with the "fd" estimator only'):
        AdaptOptions(estimator="jvp", probe_rows="last").check()
    with pytest.raises(ValueError, match='sharpness_form="paper" is the authors\' all-positions'):
        AdaptOptions(sharpness_form="paper", probe_rows="last").check()
    with pytest.raises(ValueError, match='sharpness_form="paper"'):
        AdaptOptions(sharpness_form="paper", estimator="hvp").check()
    AdaptOptions(sharpness_form="paper", estimator="jvp").check()
    AdaptOptions(sharpness_form="gain", probe_rows="last").check()
    AdaptOptions(sharpness_form="paper").check()  # auto rows: every position
    AdaptOptions(estimator="jvp").check()


def test_bad_options_are_named():
    bad = {"rank": 0, "epochs": 0, "shots": 0, "num_probes": 0, "batch_size": 0, "probes_per_pass": 0,
           "max_memory_gb": -1, "warmup": 1.0, "scoring": "ful", "distribution": "uniform", "lr": float("nan"),
           "weight_decay": -1.0, "lambda_j": float("inf"), "lambda_s": -1e-3, "eps": 0.0, "memory_efficient": "yes",
           "fsdp": 1, "cuda_graphs": "always", "seed": -42, "j_final_norm_step": "no", "probe_rows": "first",
           "sharpness_form": "hessian"}
    for name, value in bad.items():
        with pytest.raises(ValueError, match=rf"^{name} must be"):
            AdaptOptions(**{name: value}).check()
    for name, value in [("lr", "abc"), ("lambda_s", "1e-3"), ("eps", float("inf")), ("seed", True), ("seed", 1.5)]:
        with pytest.raises(ValueError, match=rf"^{name} must be"):
            AdaptOptions(**{name: value}).check()


def test_seeds_run_from_zero_to_the_limit():
    AdaptOptions(seed=0).check()
    AdaptOptions(seed=op.SEED_LIMIT - 1).check()
    with pytest.raises(ValueError, match="seed must be a whole number from 0 to 2\\*\\*63-1"):
        AdaptOptions(seed=op.SEED_LIMIT).check()


def test_check_choice_returns_the_value_or_names_the_argument():
    assert op.check_choice("mode", "a", ("a", "b")) == "a"
    with pytest.raises(ValueError, match=r"^mode must be one of \('a', 'b'\), got 'c'$"):
        op.check_choice("mode", "c", ("a", "b"))


def test_the_run_key_holds_every_field_that_changes_numbers_and_no_execution_only_one():
    base = AdaptOptions()
    at_legacy = {name for name, legacy in op.KEYED_WHEN_SET.items() if _keyed(base, name) == legacy}
    assert set(base.settings()) == ({f.name for f in dataclasses.fields(base)} - set(op.EXECUTION_ONLY) - at_legacy)
    for name, value in _OTHER_VALUE.items():
        moved = dataclasses.replace(base, **{name: value}).settings()
        if name in op.EXECUTION_ONLY:
            assert moved == base.settings(), name
        else:
            assert moved != base.settings() and moved.get(name, op.KEYED_WHEN_SET.get(name)) == value, name


def test_a_field_keyed_when_set_enters_the_key_only_away_from_its_legacy_value():
    for name, legacy in op.KEYED_WHEN_SET.items():
        assert name not in dataclasses.replace(AdaptOptions(), **{name: legacy}).settings(), name
        away = dataclasses.replace(AdaptOptions(), **{name: _AWAY_FROM_LEGACY[name]})
        assert away.settings()[name] == _AWAY_FROM_LEGACY[name] != legacy, name


def test_the_key_of_a_field_keyed_when_set_does_not_follow_its_default():
    """A run under a moved default must not take the key of the runs made before the field existed (they
    all had the legacy value): the value left out of the key is fixed, not the default. ``sharpness_form``'s
    default did move (trace -> gain, issue 35): the default's runs are keyed "gain", the old runs "trace"."""
    assert AdaptOptions().settings()["sharpness_form"] == "gain"
    assert "sharpness_form" not in AdaptOptions(sharpness_form="trace").settings()
    for name, legacy in op.KEYED_WHEN_SET.items():
        other = _AWAY_FROM_LEGACY[name]
        moved_default = dataclasses.make_dataclass("MovedDefault", [(name, type(other), other)], bases=(AdaptOptions,))
        assert moved_default().settings()[name] == other, name
        assert name not in moved_default(**{name: legacy}).settings(), name


def test_auto_probe_rows_ride_where_they_can_and_are_keyed_as_what_runs():
    """probe_rows None (auto): the last token riding for the "fd" estimator's trace and gain forms, every
    position for the authors' form and for "jvp" and "hvp"; a given value is kept. The key holds the
    resolved rows, so auto and the same rows named give one run."""
    assert AdaptOptions().probe_rows is None and AdaptOptions().rows() == "last"
    for form, estimator, rows in [("gain", "fd", "last"), ("trace", "fd", "last"), ("paper", "fd", "all"),
                                  ("gain", "jvp", "all"), ("trace", "hvp", "all"), ("paper", "jvp", "all")]:
        options = AdaptOptions(sharpness_form=form, estimator=estimator).check()
        assert options.rows() == rows, (form, estimator)
        assert options.settings() == AdaptOptions(sharpness_form=form, estimator=estimator, probe_rows=rows).settings()
    assert AdaptOptions(probe_rows="all").rows() == "all"
    assert AdaptOptions(probe_rows="all").settings() != AdaptOptions().settings()


def test_importing_the_options_loads_neither_torch_nor_the_training_loop():
    code = ("import sys, ofa_kernels.fewshot.options as o; o.AdaptOptions().check(); "
            "print(sorted(m for m in ('torch', 'ofa_kernels.fewshot.trainer', 'ofa_kernels.ops') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_building_the_cli_loads_no_torch():
    """The CLI's flags come from the options and the kernel floor's names (``vocab``), both torch-free, so
    ``ofa --help`` and refused arguments answer at once."""
    code = ("import sys, ofa_kernels.fewshot.cli as c; c.build_parser(); "
            "print(sorted(m for m in ('torch', 'ofa_kernels.ops', 'ofa_kernels.fewshot.trainer') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
