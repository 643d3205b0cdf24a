"""One identity per run: everything that changes a number changes the key, nothing else does."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest

import ofa_kernels
from ofa_kernels.fewshot import data, identity
from ofa_kernels.fewshot.runs import settings_key
from ofa_kernels.fewshot.trainer import AdaptOptions


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OFA_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden_size": 8}')
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (folder / "tokenizer.json").write_text('{"vocab": ["a", "b"]}')
    return folder


TASK = data.Task("mine", "Review: {text}\nSentiment:", ("negative", "positive"), "by_file")
POOL = [data.Example(f"pool text {i}", i % 2, f"train.csv:{i + 2}") for i in range(6)]
TEST = [data.Example(f"test text {i}", i % 2, f"test.csv:{i + 2}") for i in range(4)]
SETTINGS = {"dtype": "fp32", "device": "cpu"}


def _key(model, task=TASK, options=AdaptOptions(), test=TEST, pool=POOL, settings=SETTINGS, with_demos=True):
    return settings_key(task, str(model), options, test, pool, settings, with_demos)[1]


def _changed_row(rows, **change):
    return [dataclasses.replace(rows[0], **change), *rows[1:]]


def test_each_setting_that_changes_a_number_changes_the_key(model_dir, tmp_path, monkeypatch):
    base = _key(model_dir)
    other_model = tmp_path / "other"
    shutil.copytree(model_dir, other_model)
    (other_model / "tokenizer.json").write_text('{"vocab": ["a", "c"]}')  # the tokenizer alone differs
    variants = {
        "template": _key(model_dir, task=dataclasses.replace(TASK, template="Q: is this text rude? {text}\nA:")),
        "label words": _key(model_dir, task=dataclasses.replace(TASK, labels=("bad", "good"))),
        "a training row": _key(model_dir, pool=_changed_row(POOL, text="another text")),
        "a training label": _key(model_dir, pool=_changed_row(POOL, label=1)),
        "a test row": _key(model_dir, test=_changed_row(TEST, text="another text")),
        "options": _key(model_dir, options=AdaptOptions(lr=2e-3)),
        "scoring": _key(model_dir, options=AdaptOptions(scoring="first")),
        "dtype": _key(model_dir, settings={**SETTINGS, "dtype": "bf16"}),
        "device": _key(model_dir, settings={**SETTINGS, "device": "cuda"}),
        "demonstrations": _key(model_dir, with_demos=False),
        "tokenizer file": _key(other_model),
    }
    (model_dir / "model.safetensors").write_bytes(bytes(range(255, -1, -1)) * 64)  # same size, other weights
    variants["weights"] = _key(model_dir)
    monkeypatch.setattr(ofa_kernels._version, "__version__", "9.9.9")
    variants["library version"] = _key(other_model)
    keys = [base, *variants.values()]
    assert len(set(keys)) == len(keys), {k: v for k, v in variants.items() if v == base}


def test_execution_only_settings_and_paths_keep_the_key(model_dir, tmp_path, monkeypatch):
    base = _key(model_dir)
    copy = tmp_path / "elsewhere" / "model"
    shutil.copytree(model_dir, copy)
    assert _key(copy) == base  # the same files in another folder
    monkeypatch.chdir(model_dir.parent)
    assert _key("model") == base  # a relative path to the same folder
    moved = [dataclasses.replace(e, where="/abs/" + e.where) for e in POOL]
    assert _key(model_dir, pool=moved, test=[dataclasses.replace(e, where="x:1") for e in TEST]) == base
    assert _key(model_dir, options=AdaptOptions(cuda_graphs="off")) == base  # the same step, replayed or not
    lean = AdaptOptions(memory_efficient=True, probes_per_pass=1, max_memory_gb=4.0)
    assert _key(model_dir, options=lean) == base  # the same step, split (the trainer test bounds the difference)


def test_a_file_digest_is_cached_and_follows_the_content(model_dir):
    path = model_dir / "model.safetensors"
    first = identity.file_digest(path)
    cache = json.loads((identity._cache_file()).read_text())
    assert cache[str(path.resolve())]["sha256"] == first
    path.write_bytes(b"changed")
    assert identity.file_digest(path) != first  # size and mtime changed: rehashed
    os.utime(path, ns=(1, 1))
    stamp = identity.file_digest(path)
    (identity._cache_file()).write_text("not json")  # a broken cache is only a cache
    assert identity.file_digest(path) == stamp


def test_a_model_with_nothing_local_is_named_by_its_name():
    assert identity.model_identity("some-org/some-model") == "name:some-org/some-model"
