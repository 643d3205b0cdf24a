"""The jobs behind ``ofa adapt``, ``ofa eval`` and ``ofa demo``: load, adapt per seed, evaluate, write.

``adapt_and_report`` evaluates zero-shot and in-context learning (ICL, the k-shot set as a prefix)
once per seed, adapts a fresh copy of the model per seed and arm, evaluates the adapted model
without (and optionally with) the demonstrations prefix, and writes ``results-<task>-<hash>.json``
and ``.md`` (mean +- population std over seeds) and one adapter per run under ``out``; ``<hash>``
is a short hash of every setting that changes a number, by content (``settings_key``, from
``identity``), so tasks and settings live side by side and no result is reused for another run.
Files are written atomically, finished evaluations are kept in
``progress-<task>-<hash>.json`` and the run in training checkpoints every few steps, so a killed
job resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence


from .. import _version
from . import data as data_mod
from . import distributed
from . import evaluate as ev
from . import identity
from .adapters import save_adapter
from .files import name_part, read_json, remove_stale_temps, write_text
from .options import ARMS, AdaptOptions
from .trainer import adapt


def _mean_std(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} +- {statistics.pstdev(values):.3f}"  # population std, as the authors


def settings_key(task: data_mod.Task, model: str, options: AdaptOptions, test: Sequence[data_mod.Example],
                 pool: Sequence[data_mod.Example] = (), model_settings: dict | None = None,
                 with_demos: bool = True) -> tuple[dict, str]:
    """Every setting that changes a number of a run, by content, and its short hash (names the run's files).

    The model enters by the digest of its files (``identity.model_identity``: weights and tokenizer),
    the task by its definition (template, label words), the training pool and the test rows by their
    rows (text and label); ``model_settings`` holds dtype and device. Never a path: the same files
    named otherwise, or another ``--out``, give the same key.
    """
    key = {"task": identity.task_identity(task), "model": identity.model_identity(model),
           "options": options.settings(), "test_rows": identity.rows_digest(test),
           "pool_rows": identity.rows_digest(pool), "model_settings": model_settings or {},
           "with_demos": with_demos, "library_version": _version.__version__}
    return key, hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]


def _checkpoint_path(out_dir: Path | None, task: str, arm: str, seed: int, tag: str, sharded: bool) -> Path | None:
    """Where an arm's training checkpoint lives (FSDP: a distributed checkpoint, a folder of shards)."""
    if out_dir is None:
        return None
    return out_dir / f"checkpoint-{task}-{arm}-seed{seed}-{tag}.{'dcp' if sharded else 'pt'}"


class _Progress:
    """Finished evaluations and runs of one setting, kept in ``progress-<task>-<hash>.json`` so a
    killed job resumes. A file whose key differs is never reused or overwritten: it is refused.

    Several jobs may share the file (arms of one setting run at once into one ``--out``): every
    read-modify-write holds a lock on it (``<file>.lock``), re-reads what the others committed and
    merges, so an entry once written is never lost, and ``get`` sees the others' finished work.
    """

    def __init__(self, path: Path | None, key: dict):
        self.path, self.key, self.entries = path, key, {}
        self._lock = None
        if path:
            import filelock

            path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = filelock.FileLock(str(path) + ".lock")  # one object: it nests (a count)
            with self.locked():
                self.entries = self._read()

    @contextlib.contextmanager
    def locked(self):
        """Holds the progress file's lock (nothing when there is no file); nests."""
        if self._lock is None:
            yield
            return
        with self._lock:
            yield

    def _read(self) -> dict:
        """The committed entries (none when there is no file yet), checked; call under the lock."""
        path = self.path
        if not path.exists():
            return {}
        if not path.is_file():
            raise ValueError(f"{path} is not a file (a progress file is expected there); move it away to start afresh")
        saved = read_json(path, "; move it away to start afresh")
        if not (isinstance(saved, dict) and isinstance(saved.get("key"), dict)
                and isinstance(saved.get("entries"), dict)
                and all(isinstance(e, dict) for e in saved["entries"].values())):
            raise ValueError(f"{path} is not a progress file (expected an object with a 'key' object and "
                             "'entries' of objects); move it away to start afresh")
        if saved.get("key") != self.key:
            stored = saved.get("key", {})
            differs = sorted(k for k in {**self.key, **stored} if stored.get(k) != self.key.get(k))
            raise ValueError(f"{path} holds results of other settings (differing: {differs}); "
                             "use another --out or move it away")
        for name, entry in saved["entries"].items():
            _check_entry(path, name, entry)
        return saved["entries"]

    def refresh(self) -> None:
        """Takes in what other jobs committed since."""
        if self.path and self.path.exists():
            with self.locked():
                self.entries = {**self._read(), **self.entries}

    def get(self, name: str) -> dict | None:
        if name not in self.entries:
            self.refresh()
        return self.entries.get(name)

    def put(self, name: str, entry: dict) -> dict:
        self.entries[name] = entry
        if self.path and distributed.is_main_process():
            with self.locked():
                self.entries = {**self._read(), **self.entries}
                write_text(self.path, json.dumps({"key": self.key, "entries": self.entries}))
        return entry


def _check_entry(path: Path, name: str, entry: dict) -> None:
    """An evaluation entry as the report reads it: finite accuracy and macro-F1 numbers in [0, 1]."""
    for field in ("accuracy", "macro_f1"):
        value = entry.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"{path}: entry {name!r} has {field} {value!r}, expected a number from 0 to 1; "
                             "the file is damaged: move it away to start afresh")


def adapt_and_report(
    load: Callable[[], tuple],
    task: str | data_mod.Dataset,
    *,
    model_name: str,
    data_dir: str | None = None,
    seeds: Sequence[int] = (42,),
    arms: Sequence[str] = ("ofa",),
    options: AdaptOptions | None = None,
    test_size: int = 500,
    out: str | Path | None = None,
    with_demos: bool = True,
    model_settings: dict | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    """Runs the protocol; returns the results dictionary (also written under ``out``).

    ``task``: a registered task's name (read from ``data_dir``) or a loaded ``Dataset`` (your own files).

    ``with_demos`` also evaluates every adapted model with the demonstrations prefix; ``progress``
    shows a tqdm bar per run. With ``out``,
    finished evaluations are kept in ``out/progress-<task>-<hash>.json``, and a rerun with the same settings
    continues where the last one stopped.
    """
    options = options or AdaptOptions()
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {list(seeds)}")
    main = distributed.is_main_process()  # data-parallel runs: every rank adapts, rank 0 evaluates and writes
    if not main:
        log = lambda *_: None  # noqa: E731
    if distributed.launched_processes() > 1:
        log(f"data-parallel: {distributed.launched_processes()} processes (rank 0 evaluates and writes)")
    dataset = _dataset(task, data_dir, log)
    name_part(dataset.task.name, "task")  # names that become parts of file names: checked before any is built
    for arm in arms:
        name_part(arm, "arm")
    test = data_mod.test_subset(dataset, test_size)
    out_dir = _out_folder(out, main, log)
    key, tag = settings_key(dataset.task, model_name, options, test, dataset.pool, model_settings, with_demos)
    name = dataset.task.name
    run = _Run(load, dataset, test, options, model_name, tag, out_dir, main, with_demos, progress,
               _Progress(out_dir / f"progress-{name}-{tag}.json" if out_dir else None, key))
    k_shot_sets = {seed: data_mod.k_shot(dataset, options.shots, seed) for seed in seeds}  # refused before any load
    zero = run.scored("zero-shot", lambda: run.evaluation(*run.base()))
    log(f"zero-shot {zero['accuracy']:.3f}")
    for seed in seeds:
        shots = k_shot_sets[seed]
        icl = run.scored(f"ICL|{seed}", lambda shots=shots: run.evaluation(*run.base(), shots))
        log(f"seed {seed}: ICL {icl['accuracy']:.3f}")
        for arm in arms:
            entry = run.scored(f"{arm}|{seed}", lambda arm=arm, seed=seed, shots=shots: run.adapted(arm, seed, shots))
            run.drop_checkpoint(arm, seed)
            demos = f" (with demonstrations {entry['demos_accuracy']:.3f})" if "demos_accuracy" in entry else ""
            log(f"seed {seed}: {arm} {entry['accuracy']:.3f}{demos}, final loss {entry['losses'][-1]['loss']:.4f}")
    return run.report(seeds, arms, log)


def _dataset(task: str | data_mod.Dataset, data_dir: str | None, log: Callable[[str], None]) -> data_mod.Dataset:
    """The task's rows (a registered task read from ``data_dir``, or the given ``Dataset``), with what
    loading them left out said once."""
    dataset = task if isinstance(task, data_mod.Dataset) else data_mod.load_task(task, data_dir)
    if dataset.problems:
        log(f"{len(dataset.problems)} rows skipped, e.g. {dataset.problems[0]}")
    if dataset.overlap_removed:
        log(f"{dataset.overlap_removed} training rows left out of the k-shot pool: their text is also a test row's")
    return dataset


def _out_folder(out: str | Path | None, main: bool, log: Callable[[str], None]) -> Path | None:
    """``out`` made, with what an interrupted run left there removed (rank 0 only)."""
    if not out:
        return None
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = remove_stale_temps(out_dir) if main else []
    if stale:
        log(f"removed {len(stale)} temporary file(s) that an interrupted run left in {out_dir}")
    return out_dir


class _Run:
    """One ``adapt_and_report`` job: the base model (loaded on demand, again after a run adapted it),
    the finished evaluations, and the rows of the results table."""

    def __init__(self, load, dataset, test, options, model_name, tag, out_dir, main, with_demos, progress, finished):
        self.load, self.dataset, self.test, self.options = load, dataset, test, options
        self.model_name, self.tag, self.out_dir, self.main = model_name, tag, out_dir, main
        self.with_demos, self.progress, self.finished = with_demos, progress, finished
        self.task = dataset.task.name
        self.sharded = options.fsdp and distributed.launched_processes() > 1  # then every rank evaluates, together
        self.loaded: list = []
        self.started = time.time()

    def base(self) -> tuple:
        """(model, tokenizer) of the unadapted model."""
        if not self.loaded:
            self.loaded.append(self.load())
        return self.loaded[0]

    def scored(self, name: str, compute: Callable[[], dict]) -> dict:
        """The finished entry ``name``, computed (and committed, timed) when there is none."""
        entry = self.finished.get(name)
        if entry is None:
            t0 = time.time()
            entry = self.finished.put(name, {**compute(), "seconds": round(time.time() - t0, 1)})
        return entry

    def evaluation(self, model, tokenizer, demos=()) -> dict:
        if not self.main and not self.sharded:  # a sharded model runs on every rank together
            return {"accuracy": float("nan"), "macro_f1": float("nan")}
        scores = ev.evaluate(model, tokenizer, self.dataset.task, self.test, demonstrations=demos,
                             scoring=self.options.scoring)
        return {"accuracy": scores.accuracy, "macro_f1": scores.macro_f1}

    def adapted(self, arm: str, seed: int, shots) -> dict:
        """Adapts the base model (resuming its checkpoint), evaluates it, writes its adapter."""
        model, tokenizer = self.base()
        result = adapt(model, tokenizer, self.dataset, dataclasses.replace(self.options, arm=arm, seed=seed),
                       train=shots, progress=self.progress and self.main, checkpoint=self._checkpoint(arm, seed))
        entry = self.evaluation(model, tokenizer)
        if self.with_demos:
            entry.update({f"demos_{k}": v for k, v in self.evaluation(model, tokenizer, shots).items()})
        entry["losses"] = result.losses
        entry["adapter"] = None
        if self.out_dir and self.main:
            entry["adapter"] = str(save_adapter(
                result, self.out_dir / f"adapter-{self.task}-{arm}-seed{seed}-{self.tag}.safetensors",
                base_model=self.model_name, task=self.task))
        self.loaded.clear()  # the adapted model is not the base any more
        return entry

    def _checkpoint(self, arm: str, seed: int) -> Path | None:
        return _checkpoint_path(self.out_dir, self.task, arm, seed, self.tag, self.sharded)

    def drop_checkpoint(self, arm: str, seed: int) -> None:
        """Only now, with the adapter written and the progress entry committed, does the checkpoint go: a
        kill at any instant before leaves the checkpoint (the rerun resumes it), after, the finished arm.
        A checkpoint still here for a finished arm is what a kill between the two left."""
        ckpt = self._checkpoint(arm, seed)
        if ckpt is not None and self.main:
            if ckpt.is_dir():
                shutil.rmtree(ckpt, ignore_errors=True)
            else:
                ckpt.unlink(missing_ok=True)

    def report(self, seeds: Sequence[int], arms: Sequence[str], log: Callable[[str], None]) -> dict:
        """The results (returned, and written as JSON and a markdown table under ``out``), from every entry
        committed for these seeds: this job's arms, then any other arm that a job running beside it
        into the same ``out`` finished (so the last writer keeps the others' rows)."""
        with self.finished.locked():
            self.finished.refresh()
            entries = self.finished.entries
            others = [a for a in ARMS if a not in arms and any(f"{a}|{s}" in entries for s in seeds)]
            rows: dict[str, list[float]] = {}
            f1s: dict[str, list[float]] = {}
            runs = []

            def add(row: str, entry: dict, prefix: str = "") -> None:
                rows.setdefault(row, []).append(entry[prefix + "accuracy"])
                f1s.setdefault(row, []).append(entry[prefix + "macro_f1"])

            for seed in seeds:
                add("zero-shot", entries["zero-shot"])  # the same for every seed
                if f"ICL|{seed}" in entries:
                    add("ICL", entries[f"ICL|{seed}"])
                for arm in [*arms, *others]:
                    entry = entries.get(f"{arm}|{seed}")
                    if entry is None:
                        continue
                    add(arm, entry)
                    if "demos_accuracy" in entry:
                        add(f"{arm} + demos", entry, "demos_")
                    runs.append({"seed": seed, "arm": arm, **entry})
            results = {"task": self.task, "model": self.model_name, "test_rows": len(self.test),
                       "seeds": list(seeds), "options": dataclasses.asdict(self.options.resolved()), "accuracy": rows,
                       "macro_f1": f1s, "runs": runs, "seconds": round(time.time() - self.started, 1),
                       "compute_seconds": round(sum(e.get("seconds", 0.0) for e in entries.values()), 1)}
            table = [f"# {self.task} on {self.model_name}: accuracy over {len(self.test)} test rows, seeds "
                     f"{list(seeds)}", "", "| method | accuracy | macro-F1 |", "|---|---:|---:|"]
            table += [f"| {k} | {_mean_std(v)} | {_mean_std(f1s[k])} |" for k, v in rows.items()]
            if self.out_dir and self.main:
                write_text(self.out_dir / f"results-{self.task}-{self.tag}.json", json.dumps(results, indent=1))
                write_text(self.out_dir / f"results-{self.task}-{self.tag}.md", "\n".join(table) + "\n")
        log("\n".join(table))
        return results
