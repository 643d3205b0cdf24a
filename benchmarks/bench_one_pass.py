"""The price of OFA's sharpness probe on real SmolLM2 (issue 34): one training step per arm, same run, interleaved.

Arms, each one norm-tuning step (forward, loss, backward, AdamW) on one SST-2 (demonstration, query)
pair of the paper protocol, real SmolLM2-135M-Instruct in fp32 with fused norms:
  ce          the project's CE step (``training_step``, arm "ce")
  ofa-last    CE + 1e-2 J + 1e-3 S, "fd", K=1, the probe riding as one extra row (``probe_rows="last"``)
  ofa-all     the same with every position perturbed in a second pass (``probe_rows="all"``)
  authors     an authors-style step: two full HF passes with ``output_hidden_states``, hooks that add
              the noise, full logits (``bench_ofa_step._reference``)
Time: median over ``--reps`` rounds, the arms interleaved in each round (round-robin, after one
warm-up each), so drift on this shared CPU reaches every arm alike. Memory (no allocator peak on a
CPU): the distinct tensor storage autograd saves during the step, weights excluded
(``bench_objective.saved_gib``). Two pairs: the shortest SST-2 pair of seed 42's first epoch (~45
tokens) and a ~150-token pair (the longest pair of SST-2 pool rows neighbouring in length, <= 155 tokens).

    python benchmarks/bench_one_pass.py --out benchmarks/results        # real SmolLM2, ~2 min
    python benchmarks/bench_one_pass.py --smoke --out DIR               # tiny random model (tests)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_objective import saved_gib  # noqa: E402
from bench_ofa_step import _reference  # noqa: E402
from harness import stamp, tiny_llama  # noqa: E402

import ofa_kernels  # noqa: E402
from ofa_kernels.fewshot import anatomy  # noqa: E402
from ofa_kernels.fewshot.prompts import step_batch  # noqa: E402
from ofa_kernels.fewshot.trainer import AdaptOptions, training_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("ce", "ofa-last", "ofa-all", "authors")


def _ours(model, batch, arm: str):
    options = {"ce": AdaptOptions(arm="ce", scoring="first"),
               "ofa-last": AdaptOptions(arm="ofa", scoring="first", probe_rows="last"),
               "ofa-all": AdaptOptions(arm="ofa", scoring="first", probe_rows="all")}[arm]
    gammas = anatomy.preconditioners(model)
    params = list(anatomy.norm_parameters(model).values())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-3)

    def step():
        optimizer.zero_grad(set_to_none=True)
        training_step(model, batch, options, gammas, 0, memory_efficient=False)
        optimizer.step()
    return step


def _pairs(tokenizer, data_dir: Path | None, smoke: bool, vocab: int) -> dict[str, list[int]]:
    """Token ids of the two measured sequences (demonstration + query prompt)."""
    if smoke:
        return {"short": list(range(3, 20)), "long": list(range(3, 50))}
    from ofa_kernels.fewshot import data
    from ofa_kernels.fewshot.prompts import pair_prompt, sequences
    from ofa_kernels.fewshot.trainer import epoch_pairs

    ds = data.load_task("sst2", data_dir)
    first = epoch_pairs(data.k_shot(ds, 5, 42), 42, 0)
    short = min((sequences(tokenizer, [pair_prompt(ds.task, d, q)])[0] for d, q in first), key=len)
    by_length = sorted(ds.pool, key=lambda e: len(e.text))
    long = None
    for i in range(len(by_length) - 2, 0, -1):  # the longest pair of neighbours in length that is <= 155 tokens
        long = sequences(tokenizer, [pair_prompt(ds.task, by_length[i], by_length[i + 1])])[0]
        if len(long) <= 155:
            break
    return {"short": short, "long": long}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--smoke", action="store_true", help="a tiny random Llama (tests)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if args.smoke:
        model = tiny_llama()
        tokenizer = None
    else:
        from ofa_kernels.fewshot.models import load_smollm2

        model, tokenizer = load_smollm2(torch.float32, "cpu")
    ofa_kernels.patch_model(model)
    for p_ in model.parameters():
        p_.requires_grad_(False)
    gammas = [g.clone() for g in anatomy.preconditioners(model)]
    for p_ in anatomy.norm_parameters(model).values():
        p_.requires_grad_(True)
    reps = 1 if args.smoke else args.reps
    rows = []
    for name, ids in _pairs(tokenizer, Path(args.data_dir), args.smoke, model.config.vocab_size).items():
        batch = step_batch([ids], [[5]], 0, "cpu", with_continuations=False, masks_when_unpadded=False)  # as adapt
        batch["labels"] = batch["first_tokens"]
        steps = {arm: _ours(model, batch, arm) for arm in ARMS if arm != "authors"}
        steps["authors"] = _reference(model, batch, 1, gammas)
        times = {arm: [] for arm in ARMS}
        for arm in ARMS:
            steps[arm]()  # warm-up
        for _ in range(reps):
            for arm in ARMS:
                t0 = time.perf_counter()
                steps[arm]()
                times[arm].append(1e3 * (time.perf_counter() - t0))
        memory = {arm: saved_gib(steps[arm], model) for arm in ARMS}
        for arm in ARMS:
            rows.append({"pair": name, "tokens": len(ids), "arm": arm, "ms": statistics.median(times[arm]),
                         "ms_all": times[arm], "saved_mib": memory[arm] * 1024})
            print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "smoke" if args.smoke else "cpu"
    (out / f"one_pass_{tag}.json").write_text(json.dumps({"stamp": stamp(torch.device("cpu")), "rows": rows},
                                                         indent=1))
    (out / f"one_pass_{tag}.md").write_text(table(rows) + "\n")
    print(table(rows))
    return 0


def table(rows: list[dict]) -> str:
    lines = ["| pair | tokens | arm | ms (median) | / ce | saved MiB | / ce |", "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        ce = next(c for c in rows if c["pair"] == r["pair"] and c["arm"] == "ce")
        lines.append(f"| {r['pair']} | {r['tokens']} | {r['arm']} | {r['ms']:.0f} | {r['ms'] / ce['ms']:.2f} | "
                     f"{r['saved_mib']:.1f} | {r['saved_mib'] / ce['saved_mib']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
