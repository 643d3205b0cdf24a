"""Few-shot accuracy of OFA against zero-shot, ICL, CE-only norm tuning and PEFT baselines.

The issue's protocol: SmolLM2-135M-Instruct (fp32, CPU), tasks sst2, sst5, mr, subj, trec, k = 5
shots per class, seeds 42..46, a class-balanced test subset (seed 0), 60 epochs of the authors'
recipe; every adapted arm is evaluated without and with the demonstrations prefix. Each task runs
through ``ofa_kernels.runs.adapt_and_report`` into ``--out/<task>/``; finished runs are kept there,
so a killed or extended run (more seeds, more arms) only computes what is missing. The summary
(``--out/summary.md`` and ``.json``) is one table: methods by task, mean +- std over seeds, and the
mean over tasks, with the compute time of every cell.

    python benchmarks/accuracy.py --data-dir ../shared/data                        # the full protocol
    python benchmarks/accuracy.py --seeds 42,43 --arms ce,ofa,lora --test-size 200  # what fits an afternoon
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
ARMS = "ce,ce+J,ce+S,ofa,lora"


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} +- {100 * statistics.pstdev(values):.1f}"  # population std


def summarise(per_task: dict[str, dict], seeds: list[int]) -> tuple[str, dict]:
    """Markdown table (accuracy in %, mean +- std over seeds) and its data, methods by task."""
    tasks = list(per_task)
    methods: list[str] = []
    for res in per_task.values():
        methods += [m for m in res["accuracy"] if m not in methods]
    lines = ["| method | " + " | ".join(tasks) + " | mean over tasks |", "|---|" + "---:|" * (len(tasks) + 1)]
    data = {}
    for method in methods:
        cells, per_seed_means = [], []
        if all(method in per_task[t]["accuracy"] for t in tasks):
            # the mean over tasks per seed, then mean +- std of that over seeds
            per_seed_means = [statistics.mean(per_task[t]["accuracy"][method][i] for t in tasks)
                              for i in range(len(seeds))]
        for t in tasks:
            cells.append(_cell(per_task[t]["accuracy"].get(method, [])))
        data[method] = {"per_task": {t: per_task[t]["accuracy"].get(method) for t in tasks},
                        "mean_over_tasks_per_seed": per_seed_means}
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {_cell(per_seed_means)} |")
    return "\n".join(lines), data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--arms", default=ARMS, help="adapted arms (zero-shot and ICL always run)")
    p.add_argument("--seeds", default="42,43,44,45,46")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--test-size", type=int, default=500)
    p.add_argument("--scoring", default="full")
    p.add_argument("--protocol", default="paper", choices=["paper", "batched"],
                   help="the trainer's protocol (paper: the authors', one pair per step)")
    p.add_argument("--no-demos", action="store_true", help="skip evaluating adapted models with the demonstrations")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "accuracy"))
    args = p.parse_args(argv)

    import torch

    from ofa_kernels.runs import adapt_and_report, load_model
    from ofa_kernels.trainer import AdaptOptions

    seeds = [int(s) for s in args.seeds.split(",")]
    arms = [a for a in args.arms.split(",") if a]
    out = Path(args.out)
    options = AdaptOptions(shots=args.shots, epochs=args.epochs, scoring=args.scoring, protocol=args.protocol)
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
    compute = sum(r["compute_seconds"] for r in per_task.values())
    header = (f"Accuracy (%) of {args.model} over {args.test_size} test rows per task, {args.shots} shots per class, "
              f"seeds {seeds}, {args.epochs} epochs, protocol {args.protocol!r}, scoring {args.scoring!r}; "
              "mean +- population std over seeds. "
              f"Compute: {compute / 60:.0f} min on {os.cpu_count()} CPU cores, torch {torch.__version__}.")
    summary = {"args": vars(args), "tasks": list(per_task), "compute_seconds": compute, "methods": data,
               "seconds_this_call": round(time.time() - started, 1)}
    from ofa_kernels.files import write_text

    write_text(out / "summary.md", header + "\n\n" + table + "\n")
    write_text(out / "summary.json", json.dumps(summary, indent=1))
    print(header + "\n\n" + table)


if __name__ == "__main__":
    sys.exit(main())
