"""The scale of S (issue 35, item 2): each term's value and gradient norm at the start of SST-2 training.

For the first ``--pairs`` (demonstration, query) pairs of seed 42's first epoch (the paper protocol's
sequences), on the untrained model in fp32 with fused norms, the value and the gradient norm (over
every norm weight) of CE, lambda_J * J and lambda_S * S (lambda_J = 1e-2, lambda_S = 1e-3), S in
each form:
  paper        the authors' arithmetic (``paper_exact=True``: eps-scaled noise, noise left in, B x B)
  trace        the library's trace form, every position perturbed (``probe_rows="all"``; the default
               before issue 35)
  trace-last   the trace form, the probe riding at the last token (``probe_rows="last"``)
  gain         q per unit of gain (``per_gain=True``), every position perturbed
  gain-last    q per unit of gain, the probe riding (the proposed default)
"share" is ||grad(lambda_S * S)|| / ||grad CE||. Every S form takes the same 4 Gaussian probes
(seed 1), eps = 1e-3. Rows are written as they finish (``--out``/s_scale_<model>.json and .md).

    python benchmarks/s_scale.py --model smollm2 --out benchmarks/results
    python benchmarks/s_scale.py --model gemma3-270m --out benchmarks/results
    python benchmarks/s_scale.py --smoke --out DIR          # tiny random model (tests)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import stamp, tiny_llama  # noqa: E402

import ofa_kernels  # noqa: E402
from ofa_kernels.fewshot import anatomy  # noqa: E402
from ofa_kernels.fewshot import objectives as obj  # noqa: E402
from ofa_kernels.fewshot.prompts import step_batch  # noqa: E402
from ofa_kernels.fewshot.trainer import AdaptOptions, training_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FORMS = {"paper": dict(paper_exact=True), "trace": {}, "trace-last": dict(probe_rows="last"),
         "gain": dict(per_gain=True), "gain-last": dict(per_gain=True, probe_rows="last")}
LAMBDA_J, LAMBDA_S = 1e-2, 1e-3


def _norm(grads) -> float:
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))


def measure(model, batch: dict, gammas) -> dict[str, tuple[float, float]]:
    """{term: (value, gradient norm)} of one sequence's CE, lambda_J * J and lambda_S * S per form."""
    params = list(anatomy.norm_parameters(model).values())

    def grads_of(fn) -> tuple[float, list[torch.Tensor]]:
        for p in params:
            p.grad = None
        value = fn()
        return value, [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    ce_parts, ce_grads = grads_of(lambda: training_step(model, batch, AdaptOptions(arm="ce", scoring="first"),
                                                        gammas, 0))
    j_parts, cej_grads = grads_of(lambda: training_step(model, batch, AdaptOptions(arm="ce+J", scoring="first"),
                                                         gammas, 0))
    out = {"ce": (float(ce_parts["ce"]), _norm(ce_grads)),
           "lambda_J * J": (LAMBDA_J * float(j_parts["J"]), _norm([a - b for a, b in zip(cej_grads, ce_grads,
                                                                                          strict=True)]))}
    prompts = {"input_ids": batch["input_ids"], "positions": batch["positions"]}
    for name, form in FORMS.items():
        def s_term(form=form):
            s = LAMBDA_S * obj.sharpness(model, prompts, distribution="gaussian", seed=1, num_probes=4, eps=1e-3,
                                         gammas=gammas, **form)
            s.backward()
            return float(s.detach())
        value, grads = grads_of(s_term)
        out[f"lambda_S * S ({name})"] = (value, _norm(grads))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--smoke", action="store_true", help="a tiny random Llama and random sequences (tests)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if args.smoke:
        model = tiny_llama()
        sequences_ = [(torch.randint(3, 64, (12 + i,)).tolist(), 5) for i in range(args.pairs)]
        name = "smoke"
    else:
        from ofa_kernels.fewshot import data
        from ofa_kernels.fewshot.models import load_model
        from ofa_kernels.fewshot.prompts import label_token_ids, pair_prompt, sequences
        from ofa_kernels.fewshot.trainer import epoch_pairs

        model, tokenizer = load_model(args.model, torch.float32, "cpu")
        ds = data.load_task("sst2", Path(args.data_dir))
        labels = label_token_ids(tokenizer, ds.task.labels)
        pairs = epoch_pairs(data.k_shot(ds, 5, 42), 42, 0)[:args.pairs]
        sequences_ = [(sequences(tokenizer, [pair_prompt(ds.task, d, q)])[0], labels[q.label][0]) for d, q in pairs]
        name = args.model
    model.eval()
    ofa_kernels.patch_model(model)
    for p_ in model.parameters():
        p_.requires_grad_(False)
    for p_ in anatomy.norm_parameters(model).values():
        p_.requires_grad_(True)
    gammas = anatomy.preconditioners(model)
    rows = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, (ids, label) in enumerate(sequences_):
        batch = step_batch([ids], [[label]], 0, "cpu", with_continuations=False, masks_when_unpadded=False)
        for term, (value, grad) in measure(model, batch, gammas).items():
            rows.append({"pair": i, "tokens": len(ids), "term": term, "value": value, "grad_norm": grad})
        print(rows[-1], flush=True)
        (out / f"s_scale_{name}.json").write_text(json.dumps({"stamp": stamp(torch.device("cpu")), "model": name,
                                                               "rows": rows}, indent=1))
        (out / f"s_scale_{name}.md").write_text(table(rows, name) + "\n")
    print(table(rows, name))
    return 0


def table(rows: list[dict], name: str) -> str:
    terms = list(dict.fromkeys(r["term"] for r in rows))
    pairs = sorted({r["pair"] for r in rows})
    ce = {r["pair"]: r["grad_norm"] for r in rows if r["term"] == "ce"}
    lines = [f"{name}, {len(pairs)} SST-2 pairs (mean over pairs; per pair in the JSON):", "",
             "| term | value | gradient norm | share of CE's gradient |", "|---|---:|---:|---:|"]
    for term in terms:
        mine = [r for r in rows if r["term"] == term]
        value = statistics.mean(r["value"] for r in mine)
        grad = statistics.mean(r["grad_norm"] for r in mine)
        share = statistics.mean(r["grad_norm"] / ce[r["pair"]] for r in mine)
        lines.append(f"| {term} | {value:.4g} | {grad:.4g} | {share:.3g} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
