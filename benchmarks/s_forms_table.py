"""The finished cells of issue 35's accuracy runs, read from their progress files (nothing extrapolated).

Prints one markdown table per model: each method's accuracy per seed (a dash where the cell has not
finished), the mean +- population std where all three seeds finished, and OFA - CE paired per seed,
each form against the CE of its own k-shot sets. CE, ICL and zero-shot of Gemma 3 come from
``results/accuracy_gemma3`` (the same key: options, model, pool and test rows), SmolLM2's from the
gain form's run (CE trained beside it; the authors' form draws the same sets). SmolLM2's trace form is
the five-task table's (``results/accuracy_paper``: the pools before 2026-12-03, paired with that run's
CE). Then, per model and form, the mean over the tasks where all three seeds of OFA and its CE
finished: the figure issue 35 chooses the default by; last, that choice by the rule written in RESULTS.md.

    python benchmarks/s_forms_table.py
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SEEDS = (42, 43, 44)
TIE = 0.5  # points: worse-model shortfalls this close are a tie, broken by the two-model mean
MODELS = {
    "smollm2": {"tasks": ("sst2", "mr", "trec", "subj", "sst5"), "base": "accuracy_s_forms/smollm2-gain-last",
                "forms": {"ofa, trace + all (five-task table; its own CE)": ("accuracy_paper", "accuracy_paper"),
                          "ofa, gain + last": ("accuracy_s_forms/smollm2-gain-last",) * 2,
                          "ofa, paper (the authors')": ("accuracy_s_forms/smollm2-paper",
                                                        "accuracy_s_forms/smollm2-gain-last"),
                          "ofa, gain + last, lambda_S 0.5": ("accuracy_s_forms/smollm2-gain-last-s0.5",
                                                             "accuracy_s_forms/smollm2-gain-last")}},
    "gemma3-270m": {"tasks": ("sst2", "mr", "trec"), "base": "accuracy_gemma3",
                    "forms": {"ofa, trace + all (earlier table)": ("accuracy_gemma3",) * 2,
                              "ofa, gain + last": ("accuracy_s_forms/gemma3-gain-last", "accuracy_gemma3"),
                              "ofa, paper (the authors')": ("accuracy_s_forms/gemma3-paper", "accuracy_gemma3"),
                              "ofa, gain + last, lambda_S 0.5": ("accuracy_s_forms/gemma3-gain-last-s0.5",
                                                                 "accuracy_gemma3")}},
}


def _entries(folder: str, task: str) -> dict:
    files = sorted((RESULTS / folder / task).glob(f"progress-{task}-*.json"))
    return json.loads(files[0].read_text())["entries"] if files else {}


def _cell(entries: dict, name: str, seed: int) -> float | None:
    entry = entries.get("zero-shot" if name == "zero-shot" else f"{name}|{seed}")
    return None if entry is None else 100 * entry["accuracy"]


def _fmt(values: list[float | None]) -> str:
    shown = " / ".join("-" if v is None else f"{v:.1f}" for v in values)
    if all(v is not None for v in values):
        return f"{statistics.mean(values):.1f} +- {statistics.pstdev(values):.1f} ({shown})"
    return shown


def table(model: str) -> str:
    spec = MODELS[model]
    lines = [f"{model}: accuracy per seed {'/'.join(map(str, SEEDS))} (mean +- std where all finished)", "",
             "| method | " + " | ".join(spec["tasks"]) + " |", "|---|" + "---:|" * len(spec["tasks"])]
    rows = {"zero-shot": (spec["base"], "zero-shot"), "ICL": (spec["base"], "ICL"), "ce": (spec["base"], "ce")}
    rows.update({label: (folder, "ofa") for label, (folder, _) in spec["forms"].items()})
    for label, (folder, name) in rows.items():
        cells = [_fmt([_cell(_entries(folder, t), name, s) for s in SEEDS]) for t in spec["tasks"]]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for label, (folder, ce_folder) in spec["forms"].items():
        diffs = []
        for t in spec["tasks"]:
            ce, ofa = _entries(ce_folder, t), _entries(folder, t)
            pairs = [(_cell(ofa, "ofa", s), _cell(ce, "ce", s)) for s in SEEDS]
            diffs.append(" / ".join("-" if o is None or c is None else f"{o - c:+.1f}" for o, c in pairs))
        lines.append(f"| {label} - ce, per seed | " + " | ".join(diffs) + " |")
    return "\n".join(lines)


def _finished(entries: dict, name: str) -> list[float] | None:
    cells = [_cell(entries, name, seed) for seed in SEEDS]
    return None if None in cells else cells


def _paired_means(model: str) -> dict[str, tuple[list[str], float, float]]:
    """Per form label: the tasks where OFA and its CE finished all seeds, and OFA's and CE's means over them."""
    spec, out = MODELS[model], {}
    for label, (folder, ce_folder) in spec["forms"].items():
        done = []
        for t in spec["tasks"]:
            ofa, ce = _finished(_entries(folder, t), "ofa"), _finished(_entries(ce_folder, t), "ce")
            if ofa is not None and ce is not None:
                done.append((t, statistics.mean(ofa), statistics.mean(ce)))
        if done:
            out[label] = ([d[0] for d in done], *(statistics.mean(d[i] for d in done) for i in (1, 2)))
    return out


def summary() -> str:
    """Per model and form: OFA's and its CE's means over the tasks where both finished all seeds, and OFA - CE."""
    lines = ["mean over the tasks where OFA and its CE finished all three seeds (OFA - CE: paired)", "",
             "| model | form | tasks | OFA | CE | OFA - CE |", "|---|---|---|---:|---:|---:|"]
    for model, spec in MODELS.items():
        means = _paired_means(model)
        for label in spec["forms"]:
            if label not in means:
                lines.append(f"| {model} | {label} | none finished | - | - | - |")
                continue
            tasks, ofa_mean, ce_mean = means[label]
            complete = "" if len(tasks) == len(spec["tasks"]) else f" ({len(tasks)} of {len(spec['tasks'])})"
            lines.append(f"| {model} | {label} | {', '.join(tasks)}{complete} | {ofa_mean:.1f} | "
                         f"{ce_mean:.1f} | {ofa_mean - ce_mean:+.1f} |")
    return "\n".join(lines)


def choice() -> str:
    """The rule of RESULTS.md ("The S forms: accuracy"), applied: among the forms with every task finished on
    both models, one at or above CE on both models' task means; else the least shortfall on the worse model,
    the mean of the two models' figures breaking a tie within ``TIE`` points."""
    by_form: dict[str, dict[str, float]] = {}
    for model, spec in MODELS.items():
        for label, (tasks, ofa_mean, ce_mean) in _paired_means(model).items():
            if len(tasks) == len(spec["tasks"]):
                by_form.setdefault(label.split(" (")[0], {})[model] = ofa_mean - ce_mean
    eligible = {form: d for form, d in by_form.items() if len(d) == len(MODELS)}
    lines = ["the choice (forms finished on both models)", "",
             "| form | " + " | ".join(MODELS) + " | worse model | mean of the two |", "|---|" + "---:|" * (len(MODELS) + 2)]
    for form, d in eligible.items():
        lines.append(f"| {form} | " + " | ".join(f"{d[m]:+.2f}" for m in MODELS)
                     + f" | {min(d.values()):+.2f} | {statistics.mean(d.values()):+.2f} |")
    if not eligible:
        return "\n".join([*lines, "", "no form has finished on both models"])
    at_or_above = [f for f, d in eligible.items() if min(d.values()) >= 0]
    if at_or_above:
        chosen = max(at_or_above, key=lambda f: statistics.mean(eligible[f].values()))
        verdict = f"chosen: {chosen}, at or above CE on both models"
    else:
        best = max(min(d.values()) for d in eligible.values())
        tied = [f for f, d in eligible.items() if min(d.values()) >= best - TIE]
        chosen = max(tied, key=lambda f: statistics.mean(eligible[f].values()))
        others = [f for f in tied if f != chosen]
        tie = f"; within {TIE} of {', '.join(others)}, chosen by the two-model mean" if others else ""
        verdict = (f"no form is at or above CE on both models; chosen: {chosen}, the closest (worse model "
                   f"{min(eligible[chosen].values()):+.2f}{tie})")
    return "\n".join([*lines, "", verdict])


if __name__ == "__main__":
    print("\n\n".join([*(table(m) for m in MODELS), summary(), choice()]))
