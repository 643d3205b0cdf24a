"""Property-based tests: the loaders and the CLI's argument checks on arbitrary input.

Loaders: any bytes in a .csv / .tsv / .jsonl file (random, with BOMs, other encodings, quotes that
never close, huge fields) load rows or raise a ValueError naming the file; never another exception,
and every skipped row is reported by file and line. CLI: any values for ``ofa adapt``'s flags are
refused with exit 2 and one line naming what is wrong, before any model loads; never a traceback.
The example budgets are fixed (CI time), and hypothesis's database is off (no files left behind).
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ofa_kernels.fewshot import data
from ofa_kernels.fewshot.cli import main

SETTINGS = settings(max_examples=80, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

_CELL = st.one_of(st.text(max_size=20), st.sampled_from(['"', '""', "\t", ",", "\n", "\r", "\ufeff", "positive",
                                                          "negative", "0", "1", "-1", "{", "}", "\\"]))
_ROW = st.lists(_CELL, min_size=0, max_size=4)


@st.composite
def table_bytes(draw):
    """A table-like file: header-ish rows of awkward cells, a BOM or not, an encoding, maybe a huge field."""
    sep = draw(st.sampled_from([",", "\t"]))
    rows = draw(st.lists(_ROW, max_size=6))
    lines = [sep.join(["text", "label"])] if draw(st.booleans()) else []
    lines += [sep.join(r) for r in rows]
    text = "\n".join(lines)
    if draw(st.booleans()):
        text += sep + "x" * draw(st.sampled_from([10, 200_000]))  # past csv's default field limit
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16"]))
    raw = text.encode(encoding, errors="replace")
    if draw(st.booleans()):
        raw = draw(st.binary(max_size=64)) + raw
    return raw


@st.composite
def jsonl_bytes(draw):
    lines = draw(st.lists(st.one_of(
        st.just('{"text": "fine", "label": "positive"}'), st.just("[1, 2]"), st.just("null"),
        st.just('{"text": 3, "label": []}'), st.just('{"text": "a"'), st.text(max_size=30),
        st.builds(lambda t, lab: '{"text": %s, "label": %s}' % (t, lab),
                  st.sampled_from(['"x"', '""', "1e999", "true"]), st.sampled_from(['"negative"', "1", "7", '"?"'])),
    ), max_size=6))
    raw = "\n".join(lines).encode("utf-8", errors="replace")
    return draw(st.sampled_from([b"", b"\xef\xbb\xbf"])) + raw


def _check_load(path):
    try:
        rows = data.load_table(path, ("negative", "positive"), reader=(reader := data._Reader()))
    except ValueError as exc:
        assert str(path.name) in str(exc), f"a refusal that does not name the file: {exc}"
        return
    for row in rows:
        assert isinstance(row.text, str) and row.text.strip() and row.label in (0, 1)
        assert re.match(rf".*{re.escape(path.name)}:\d+$", row.where), row.where
    for problem in reader.problems:
        assert path.name in problem and re.search(r":\d+", problem), problem


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
@SETTINGS
@given(raw=table_bytes())
def test_any_table_file_loads_or_is_refused_by_name(tmp_path_factory, suffix, raw):
    path = tmp_path_factory.mktemp("fuzz") / f"rows{suffix}"
    path.write_bytes(raw)
    _check_load(path)


@SETTINGS
@given(raw=st.one_of(jsonl_bytes(), st.binary(max_size=200)))
def test_any_jsonl_file_loads_or_is_refused_by_name(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("fuzz") / "rows.jsonl"
    path.write_bytes(raw)
    _check_load(path)


_FLAGS = {
    "--seeds": st.one_of(st.text(max_size=12), st.sampled_from(["-1", "42,42", "1e3", "", ",", "99999999999999999999"])),
    "--arm": st.one_of(st.text(max_size=8), st.sampled_from(["dora", "ce,ce", ""])),
    "--lr": st.one_of(st.text(max_size=8), st.sampled_from(["nan", "-1", "inf", "0"])),
    "--shots": st.one_of(st.text(max_size=6), st.sampled_from(["0", "-3", "2.5"])),
    "--template": st.sampled_from(["no field", "{text}{text:>9999999999}", "{text.upper}", "{0}{text}", "{text"]),
    "--scoring": st.text(max_size=6).filter(lambda t: t not in ("full", "first")),
    "--dtype": st.text(max_size=6).filter(lambda t: t not in ("fp32", "bf16", "fp16", "fp64", "auto")),
    "--task": st.text(max_size=10).filter(lambda t: t not in data.TASKS),
}


@SETTINGS
@given(chosen=st.dictionaries(st.sampled_from(sorted(_FLAGS)), st.none(), min_size=1, max_size=3), data_=st.data())
def test_adapt_refuses_any_bad_flag_value_in_one_line_before_loading(chosen, data_, capsys, monkeypatch):
    import ofa_kernels.fewshot.models

    monkeypatch.setattr(ofa_kernels.fewshot.models, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    argv = ["adapt"]
    for flag in chosen:
        value = data_.draw(_FLAGS[flag], label=flag)
        argv += [f"{flag}={value}"]  # "=" keeps a value that starts with "-" a value
    if "--task" not in chosen:
        argv += ["--task", "no-such-task"]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, (argv, err)
    assert "Traceback" not in err and "error:" in err, (argv, err)


# ------------------------------------------------------------------ progress files, adapter configs, CSV headers

_JSON_VALUE = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True),
                                     st.text(max_size=6)),
                           lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                           max_leaves=8)
_KEY = {"task": {"name": "t"}, "model": "m"}


@st.composite
def progress_shapes(draw):
    """Progress files as damage or a hand edit leaves them: entries of any shape, keys right or wrong."""
    entry = st.one_of(_JSON_VALUE, st.fixed_dictionaries(
        {"accuracy": _JSON_VALUE, "macro_f1": _JSON_VALUE}), st.just({"accuracy": 0.5, "macro_f1": 0.5}))
    doc = draw(st.one_of(_JSON_VALUE, st.fixed_dictionaries(
        {"key": st.one_of(st.just(_KEY), _JSON_VALUE),
         "entries": st.one_of(st.dictionaries(st.sampled_from(["zero-shot", "ICL|42", "ce|42", "x"]), entry,
                                              max_size=3), _JSON_VALUE)})))
    import json

    return json.dumps(doc, allow_nan=True)


@SETTINGS
@given(text=progress_shapes())
def test_any_progress_file_is_used_whole_or_refused_by_name(tmp_path_factory, text):
    from ofa_kernels.fewshot.runs import _Progress

    path = tmp_path_factory.mktemp("fuzz") / "progress-t-abc.json"
    path.write_text(text)
    try:
        progress = _Progress(path, _KEY)
    except ValueError as exc:
        assert str(path) in str(exc), exc
        return
    for entry in progress.entries.values():  # what is taken is what the report can read
        assert 0 <= entry["accuracy"] <= 1 and 0 <= entry["macro_f1"] <= 1


@SETTINGS
@given(changes=st.dictionaries(st.sampled_from(["peft_type", "target_modules", "modules_to_save", "task_type",
                                                "lora_alpha", "r", "inference_mode", "exclude_modules", "junk"]),
                               _JSON_VALUE, max_size=3))
def test_any_peft_adapter_config_loads_whole_or_is_refused_by_name(tmp_path_factory, changes):
    import json

    from ofa_kernels.fewshot import adapters

    folder = tmp_path_factory.mktemp("peft")
    config = {"peft_type": "LN_TUNING", "task_type": "CAUSAL_LM", "target_modules": ["input_layernorm"],
              "base_model_name_or_path": "m", **changes}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    from safetensors.torch import save_file
    import torch

    save_file({"base_model.model.model.layers.0.input_layernorm.ln_tuning_layers.weight": torch.ones(4)},
              str(folder / "adapter_model.safetensors"))
    try:
        weights, meta = adapters.read_adapter(folder)
    except ValueError as exc:
        assert str(folder) in str(exc), exc
        return
    # loaded: then every setting it holds is one this version reads, and its targets match its weights
    assert set(config) <= {"peft_type", "task_type", "target_modules", "base_model_name_or_path", "inference_mode",
                           "exclude_modules", "modules_to_save", "revision", "auto_mapping", "peft_version"}
    assert config["peft_type"] == "LN_TUNING" and not config.get("modules_to_save")
    assert list(weights) == ["model.layers.0.input_layernorm.weight"]


@SETTINGS
@given(header=st.lists(st.one_of(st.sampled_from(["text", "label", "Text", " text ", "note", ""]), st.text(max_size=5)),
                       min_size=1, max_size=5))
def test_any_csv_header_reads_the_columns_it_names_once_or_is_refused_at_its_line(tmp_path_factory, header):
    path = tmp_path_factory.mktemp("fuzz") / "rows.csv"
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerow([f"cell{i}" if h.strip() != "label" else "positive" for i, h in enumerate(header)])
    path.write_text(buffer.getvalue())
    names = [h.strip() for h in header]
    try:
        rows = data.load_table(path, ("negative", "positive"))
    except ValueError as exc:
        assert f"{path}:1" in str(exc) or str(path) in str(exc), exc
        if {"text", "label"} <= set(names) and (names.count("text") > 1 or names.count("label") > 1):
            assert "more than once" in str(exc)
        return
    assert names.count("text") == 1 and names.count("label") == 1  # else it must have been refused
    assert [r.text for r in rows] == [f"cell{names.index('text')}"]
