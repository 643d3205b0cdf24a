"""Few-shot accuracy of OFA against zero-shot, ICL, CE-only norm tuning and PEFT baselines.

The issue's protocol: SmolLM2-135M-Instruct (fp32, CPU), tasks sst2, sst5, mr, subj, trec, k = 5
shots per class, seeds 42, 43, 44, 300 class-balanced test rows (seed 0), 60 epochs of the authors'
protocol and recipe (one (demonstration, query) pair per step, lr 1e-3); every adapted arm is
evaluated without and with the demonstrations prefix. Each task runs through
``ofa_kernels.fewshot.runs.adapt_and_report`` into ``--out/<task>/``; every finished cell (an evaluation, or
an arm for one seed) is written at once, and a killed or extended run (more seeds, more arms) only
computes what is missing, resuming an arm mid-training from its checkpoint. It lowers its own CPU
priority (``--nice``, default 19; its session's autogroup too, see ``lower_priority``) so it can run
in the background for days and yield the cores to anything else.

The summary (``--out/summary.md``, ``.json`` and ``.png``): accuracy and macro-F1 by method and
task (mean +- population std over seeds) with the mean over tasks, the compute time of every cell,
and paired per-seed differences OFA - CE and OFA - best baseline; the plot shows accuracy per task
and method with the seed spread as error bars.

    nice python benchmarks/accuracy.py --data-dir ../shared/data                    # the full table
    python benchmarks/accuracy.py --seeds 42 --arms ce,ofa --tasks sst2 --test-size 200  # one afternoon cell
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = "sst2,sst5,mr,subj,trec"
ARMS = "ce,ofa,lora"  # the ablations ce+J and ce+S: --arms ce,ofa,lora,ce+J,ce+S where the CPU time allows
BASELINES = ("zero-shot", "ICL", "ce", "lora")  # what "OFA - best baseline" compares against


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} +- {100 * statistics.pstdev(values):.1f}"  # population std


def _table(per_task: dict[str, dict], seeds: list[int], metric: str) -> tuple[list[str], dict]:
    """Markdown rows (``metric`` in %, mean +- std over seeds) and their data, methods by task."""
    tasks = list(per_task)
    methods: list[str] = []
    for res in per_task.values():
        methods += [m for m in res[metric] if m not in methods]
    lines = ["| method | " + " | ".join(tasks) + " | mean over tasks |", "|---|" + "---:|" * (len(tasks) + 1)]
    data = {}
    for method in methods:
        per_seed_means = []
        if all(len(per_task[t][metric].get(method, [])) == len(seeds) for t in tasks):
            # the mean over tasks per seed, then mean +- std of that over seeds
            per_seed_means = [statistics.mean(per_task[t][metric][method][i] for t in tasks)
                              for i in range(len(seeds))]
        cells = [_cell(per_task[t][metric].get(method, [])) for t in tasks]
        data[method] = {"per_task": {t: per_task[t][metric].get(method) for t in tasks},
                        "mean_over_tasks_per_seed": per_seed_means}
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {_cell(per_seed_means)} |")
    return lines, data


def summarise(per_task: dict[str, dict], seeds: list[int]) -> tuple[str, dict]:
    """Markdown tables (accuracy and macro-F1 in %) and their data."""
    accuracy, data = _table(per_task, seeds, "accuracy")
    f1, f1_data = _table(per_task, seeds, "macro_f1")
    for method, d in f1_data.items():
        data.setdefault(method, {})["macro_f1"] = d
    return "\n".join(["### Accuracy %", "", *accuracy, "", "### Macro-F1 %", "", *f1]), data


def paired_differences(per_task: dict[str, dict], seeds: list[int], arm: str = "ofa") -> tuple[str, dict]:
    """Per task: ``arm`` - CE and ``arm`` - the best baseline (highest mean accuracy of BASELINES on that
    task), paired by seed, in points: mean +- population std over seeds. With every task finished, a
    last row does the same for each seed's mean over tasks (the best baseline: best mean over tasks)."""
    lines = [f"| task | {arm} - ce | best baseline | {arm} - best baseline |", "|---|---:|---|---:|"]
    data = {}
    tasks = dict(per_task)
    complete = [m for m in (arm, *BASELINES) if all(len(r["accuracy"].get(m, [])) == len(seeds)
                                                    for r in per_task.values())]
    if len(per_task) > 1 and arm in complete:
        tasks["mean over tasks"] = {"accuracy": {m: [statistics.mean(r["accuracy"][m][i] for r in per_task.values())
                                                     for i in range(len(seeds))] for m in complete}}
    for task, res in tasks.items():
        acc = res["accuracy"]
        if len(acc.get(arm, [])) != len(seeds):
            continue
        baselines = [b for b in BASELINES if len(acc.get(b, [])) == len(seeds)]
        best = max(baselines, key=lambda b: statistics.mean(acc[b]), default=None)
        row = {}
        for name, other in (("ce", "ce"), ("best", best)):
            if other in acc and len(acc[other]) == len(seeds):
                diffs = [100 * (a - b) for a, b in zip(acc[arm], acc[other])]
                row[name] = {"against": other, "per_seed": diffs, "mean": statistics.mean(diffs),
                             "std": statistics.pstdev(diffs)}
        data[task] = row
        cell = lambda k: f"{row[k]['mean']:+.1f} +- {row[k]['std']:.1f}" if k in row else "-"  # noqa: E731
        lines.append(f"| {task} | {cell('ce')} | {best or '-'} | {cell('best')} |")
    return "\n".join(lines), data


def cell_seconds(per_task: dict[str, dict]) -> tuple[str, dict]:
    """Compute seconds of every finished cell (arm and seed) per task: median and total."""
    lines = ["| task | arm | runs | median s per run | total min |", "|---|---|---:|---:|---:|"]
    data = {}
    for task, res in per_task.items():
        by_arm: dict[str, list[float]] = {}
        for run in res.get("runs", []):
            if run.get("seconds") is not None:
                by_arm.setdefault(run["arm"], []).append(run["seconds"])
        for arm, secs in by_arm.items():
            data.setdefault(task, {})[arm] = secs
            lines.append(f"| {task} | {arm} | {len(secs)} | {statistics.median(secs):.0f} | {sum(secs) / 60:.1f} |")
    return "\n".join(lines), data


def plot(per_task: dict[str, dict], path: Path) -> None:
    """Accuracy per task and method (mean over seeds, population std as error bars) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(per_task)
    methods: list[str] = []
    for res in per_task.values():
        methods += [m for m in res["accuracy"] if m not in methods]
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(tasks) + 2), 4))
    colours = plt.get_cmap("tab10")
    for i, method in enumerate(methods):
        xs, means, stds = [], [], []
        for j, task in enumerate(tasks):
            values = per_task[task]["accuracy"].get(method)
            if values:
                xs.append(j + (i - (len(methods) - 1) / 2) * width)
                means.append(100 * statistics.mean(values))
                stds.append(100 * statistics.pstdev(values))
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=method, color=colours(i % 10))
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("accuracy % (mean +- std over seeds)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    from ofa_kernels.fewshot.files import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def lower_priority(niceness: int) -> bool:
    """``nice`` this process, and its autogroup too where the kernel has them: with autogroups (Linux's
    default for desktop and container sessions) a process's nice value only ranks it within its own
    session, so a job started in its own session would otherwise still take an equal share of the CPU.
    Returns whether the autogroup now runs at ``niceness`` or lower priority (False where there are no
    autogroups, or they may not be changed)."""
    os.nice(niceness)
    group = Path("/proc/self/autogroup")
    try:
        current = int(group.read_text().split()[-1])  # "/autogroup-33 nice 0"
        if niceness > current:  # never raise the session's priority
            group.write_text(str(min(19, niceness)))
        return int(group.read_text().split()[-1]) >= min(19, niceness)
    except (OSError, ValueError, IndexError):
        return False  # no autogroups here (or not allowed): the plain nice value is what counts


def main(argv: list[str] | None = None) -> int:
    from ofa_kernels.fewshot.cli import add_option_flags, option_names, options_from_args  # torch-free

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--arms", default=ARMS, help="adapted arms (zero-shot and ICL always run)")
    p.add_argument("--seeds", default="42,43,44")
    p.add_argument("--test-size", type=int, default=300)
    add_option_flags(p, option_names(per_run=False))  # every AdaptOptions field (not arm, seed: --arms, --seeds)
    p.add_argument("--no-demos", action="store_true", help="skip evaluating adapted models with the demonstrations")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "accuracy_paper"))
    p.add_argument("--nice", type=int, default=19, help="lower this process's CPU priority by this much (0: not)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 when something else runs on the cores; default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.nice:
        lower_priority(args.nice)

    import torch

    from ofa_kernels.fewshot.models import load_model
    from ofa_kernels.fewshot.runs import adapt_and_report

    seeds = [int(s) for s in args.seeds.split(",")]
    arms = [a for a in args.arms.split(",") if a]
    out = Path(args.out)
    options = options_from_args(args)
    started = time.time()
    per_task = {}
    for task in args.tasks.split(","):
        per_task[task] = adapt_and_report(lambda: load_model(args.model, torch.float32, "cpu"), task,
                                          model_name=args.model, data_dir=args.data_dir, seeds=seeds, arms=arms,
                                          options=options, test_size=args.test_size, out=out / task,
                                          with_demos=not args.no_demos)
        _write_summary(out, per_task, seeds, args, started)  # after every task, so a long run shows progress
    return 0


def _write_summary(out: Path, per_task: dict, seeds: list[int], args, started: float) -> None:
    import torch

    table, data = summarise(per_task, seeds)
    paired, paired_data = paired_differences(per_task, seeds)
    timing, timing_data = cell_seconds(per_task)
    compute = sum(r["compute_seconds"] for r in per_task.values())
    rows = {t: r.get("test_rows") for t, r in per_task.items() if r.get("test_rows") not in (None, args.test_size)}
    fewer = f" ({', '.join(f'{t}: {n}, all it has class-balanced' for t, n in rows.items())})" if rows else ""
    header = (f"{args.model} over {args.test_size} test rows per task{fewer}, {args.shots} shots per class, "
              f"seeds {seeds}, {args.epochs} epochs, protocol {args.protocol!r}, scoring {args.scoring!r}; "
              "mean +- population std over seeds (\"+ demos\": the adapted model evaluated with the "
              "demonstrations prefix). "
              f"Compute: {compute / 60:.0f} min on {os.cpu_count()} CPU cores, torch {torch.__version__}.")
    text = "\n\n".join([header, table, "### Paired per-seed differences (points)", paired,
                         "### Compute per cell", timing])
    summary = {"args": vars(args), "tasks": list(per_task), "compute_seconds": compute, "methods": data,
               "paired": paired_data, "cell_seconds": timing_data,
               "seconds_this_call": round(time.time() - started, 1)}
    from ofa_kernels.fewshot.files import write_text

    write_text(out / "summary.md", text + "\n")
    write_text(out / "summary.json", json.dumps(summary, indent=1))
    plot(per_task, out / "summary.png")
    print(text)


if __name__ == "__main__":
    sys.exit(main())
