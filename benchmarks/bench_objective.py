"""Time and peak memory of OFA's sharpness S per estimator and probe count, against a CE-only step.

Each arm is one norm-tuning step (forward, loss, backward to the norm weights) on a random-init
model of a real shape with patched (fused) norms and everything but the norms frozen:
  ce                     CE of the label token at the last position (logits there only)
  ce+S(<estimator>, K)   CE + 1e-3 * S, S by "fd", "jvp" or "hvp" with K probes in one pass
Activation memory: on a GPU the allocator's peak during the step minus the memory before it
(weights, norm grads); on a CPU the distinct storage autograd saves during the step. Targets
(issue 3): K=4 costs <= 2x the time of K=1; "fd" adds <= 1.2x the CE step's activation memory
per probe. An arm that runs out of memory is reported as OOM, not dropped.

    python benchmarks/bench_objective.py                       # GPU: Llama-2-7B shape, bf16, 4 x 512
    python benchmarks/bench_objective.py --cpu                 # CPU: SmolLM2-135M shape, fp32, 2 x 64
    python benchmarks/bench_objective.py --smoke               # tiny shape (tests)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import stamp  # noqa: E402

import ofa_kernels  # noqa: E402
from ofa_kernels.fewshot import anatomy  # noqa: E402
from ofa_kernels.fewshot import objectives as obj  # noqa: E402

SHAPES = {  # LlamaConfig fields
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152),
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
}
ARMS = [("ce", None, 0), ("fd", "fd", 1), ("fd", "fd", 4), ("jvp", "jvp", 1), ("jvp", "jvp", 4),
        ("hvp", "hvp", 1), ("hvp", "hvp", 4)]


def build(shape: str, dtype: torch.dtype, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(max_position_embeddings=4096, attn_implementation="sdpa", **SHAPES[shape])
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    ofa_kernels.patch_model(model)
    for name, p in model.named_parameters():
        p.requires_grad_("norm" in name)  # norms stay in the model dtype here (fp32 masters: the trainer's job)
    return model


def step(model, batch, gammas, estimator, K):
    """One norm-tuning step: a single clean pass gives the label logits and the states S reuses."""
    states = anatomy.last_token_states(model, batch)
    logits = anatomy.structure(model).head(states[-1])  # the label position only
    loss = F.cross_entropy(logits.float(), batch["labels"])
    if estimator:
        loss = loss + 1e-3 * obj.sharpness(model, batch, estimator=estimator, num_probes=K, seed=0, gammas=gammas,
                                           clean_states=states)
    loss.backward()
    for p in model.parameters():
        p.grad = None
    return loss


def saved_gib(fn, model) -> float:
    """GiB of distinct tensor storage autograd saves while ``fn`` runs (forward and create_graph
    backward), weights excluded: the activation memory, where no allocator peak counter exists (CPU)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        except RuntimeError:  # a forward-mode dual tensor has no plain storage
            seen[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(n for ptr, n in seen.items() if ptr not in weights) / 2**30


def measure(fn, device, reps, model):
    fn()  # warm-up (kernel compilation, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.type == "cuda" else saved_gib(fn, model)
    return times[len(times) // 2], peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="SmolLM2-135M shape on the CPU")
    ap.add_argument("--smoke", action="store_true", help="tiny shape, CPU (tests)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--arms", default=None, help="comma list like ce,fd1,fd4,jvp1,hvp1 (default: all)")
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available() and not (args.cpu or args.smoke)
    device = torch.device("cuda" if gpu else "cpu")
    shape, dtype, (B, T) = (("llama2-7b", torch.bfloat16, (4, 512)) if gpu else
                            ("tiny", torch.float32, (2, 16)) if args.smoke else
                            ("smollm2-135m", torch.float32, (2, 64)))
    reps = args.reps or (3 if gpu else 1)
    torch.manual_seed(0)
    model = build(shape, dtype, device)
    vocab = model.config.vocab_size
    batch = {"input_ids": torch.randint(0, vocab, (B, T), device=device),
             "attention_mask": torch.ones(B, T, dtype=torch.long, device=device),
             "labels": torch.randint(0, vocab, (B,), device=device)}
    gammas = anatomy.preconditioners(model)
    wanted = None if args.arms is None else set(args.arms.split(","))
    rows = []
    for name, estimator, K in ARMS:
        label = name if name == "ce" else f"{name}{K}"
        if wanted and label not in wanted:
            continue
        try:
            ms, peak = measure(lambda: step(model, batch, gammas, estimator, K), device, reps, model)
            rows.append(dict(arm="ce" if not estimator else f"ce+S({estimator}, K={K})", estimator=estimator, K=K,
                             ms=round(ms, 2), act_gib=None if peak is None else round(peak, 3), note=""))
        except torch.OutOfMemoryError:
            rows.append(dict(arm=f"ce+S({estimator}, K={K})", estimator=estimator, K=K, ms=None, act_gib=None,
                             note="OOM"))
        finally:
            if gpu:
                torch.cuda.empty_cache()
        print(rows[-1], flush=True)
    meta = {**stamp(device), "shape": shape, "dtype": str(dtype).replace("torch.", ""), "batch": f"{B}x{T}",
            "reps": reps}
    write(rows, meta, Path(args.out), f"objective_{'gpu' if gpu else 'cpu'}")
    return 0


def _ratios(rows):
    by = {(r["estimator"], r["K"]): r for r in rows}
    ce = by.get((None, 0))
    out = []
    for est in ("fd", "jvp", "hvp"):
        one, four = by.get((est, 1)), by.get((est, 4))
        if one and four and one["ms"] and four["ms"]:
            out.append(f"- {est}: K=4 / K=1 time = {four['ms'] / one['ms']:.2f} (target <= 2)")
        if est == "fd" and ce and ce["act_gib"] and one and one["act_gib"]:
            added = one["act_gib"] - ce["act_gib"]
            out.append(f"- fd K=1 adds {added:.2f} GiB = {added / ce['act_gib']:.2f}x the CE step's activations "
                       "(target <= 1.2x per probe)")
            if four and four["act_gib"]:
                per = (four["act_gib"] - ce["act_gib"]) / 4
                out.append(f"- fd K=4 adds {per:.2f} GiB per probe = {per / ce['act_gib']:.2f}x")
    return out


def write(rows, meta, out_dir: Path, name: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# OFA sharpness cost: {meta['shape']} ({meta['dtype']}, batch {meta['batch']}) on {meta['device']}",
             "", f"torch {meta['torch']}, triton {meta['triton']}, {meta['time_utc']} UTC, median of "
             f"{meta['reps']} steps after a warm-up.", "",
             "| arm | step ms | x CE | activation GiB | note |", "|---|---:|---:|---:|---|"]
    ce = next((r for r in rows if r["estimator"] is None), None)
    for r in rows:
        ratio = f"{r['ms'] / ce['ms']:.2f}" if ce and ce["ms"] and r["ms"] else ""
        lines.append(f"| {r['arm']} | {r['ms'] if r['ms'] is not None else ''} | {ratio} | "
                     f"{r['act_gib'] if r['act_gib'] is not None else 'n/a'} | {r['note']} |")
    lines += ["", *_ratios(rows), ""]
    tmp = out_dir / f".{name}.json.tmp"
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    os.replace(tmp, out_dir / f"{name}.json")
    (out_dir / f"{name}.md").write_text("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
