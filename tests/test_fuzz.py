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

from ofa_kernels import data
from ofa_kernels.cli import main

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
    import ofa_kernels.models

    monkeypatch.setattr(ofa_kernels.models, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
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
