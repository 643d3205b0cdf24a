"""Per-rank peak host memory and time while loading a model for FSDP2: meta-device sharded loading
(``distributed.load_sharded``) against loading the whole model on every rank and then sharding it.

    python benchmarks/fsdp_loading.py --out benchmarks/results --ranks 2,4

Builds a random Llama of about 440 MB (fp32, 32 layers, hidden 256, ffn 4096, a small vocabulary so the
replicated embedding stays small), saves it as sharded safetensors (``model-0000x-of-0000y`` + index),
then for each rank count and mode launches ``torchrun`` (gloo, CPU) with this file as the worker. Each
rank reports its peak resident memory above what it held just before loading (``ru_maxrss`` minus the
resident size before), and the loading time. Writes ``fsdp_loading.json`` and ``fsdp_loading.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import write_table

MODES = ("meta", "full")


def make_model(folder: Path, layers: int = 32, hidden: int = 256, ffn: int = 4096) -> int:
    """Saves the random model as sharded safetensors; returns its size in bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, max_shard_size="10MB")
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(folder: str, mode: str, out: str) -> None:
    """One rank: load ``folder`` in ``mode`` and write {rank: peak bytes above the start, seconds}."""
    import torch
    from transformers import AutoModelForCausalLM

    from ofa_kernels.fewshot import distributed
    from ofa_kernels.patch import patch_model, use_fp32_masters

    par = distributed.current("cpu")
    import torch.distributed as dist
    import torch.distributed.checkpoint  # noqa: F401  (imports cost ~170 MB: paid before the measurement)
    from accelerate import init_empty_weights  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    dist.barrier()
    before, started = _resident_bytes(), time.perf_counter()
    if mode == "meta":
        model, _ = distributed.load_sharded(folder, torch.float32, par, torch.device("cpu"))
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        patch_model(model)
        use_fp32_masters(model)
        distributed.shard_model(model, par, torch.device("cpu"))
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux
    held = sum(p.to_local().numel() * p.element_size() if hasattr(p, "to_local") else p.numel() * p.element_size()
               for p in model.parameters())
    Path(out, f"rank{par.rank}.json").write_text(json.dumps(
        {"rank": par.rank, "peak_above_start": peak - before, "seconds": seconds, "parameter_bytes": held}))
    dist.barrier()


def measure(folder: Path, mode: str, ranks: int, port: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
               str(port), str(Path(__file__).resolve()), "--worker", str(folder), mode, out]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
        if run.returncode != 0:
            raise RuntimeError(f"torchrun failed ({mode}, {ranks} ranks):\n{run.stderr[-3000:]}")
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(ranks)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--ranks", default="2,4")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--ffn", type=int, default=4096)
    parser.add_argument("--worker", nargs=3, metavar=("FOLDER", "MODE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        size = make_model(folder, layers=args.layers, ffn=args.ffn)
        for i, ranks in enumerate(int(r) for r in args.ranks.split(",")):
            for j, mode in enumerate(MODES):
                per_rank = measure(folder, mode, ranks, 29600 + 10 * i + j)
                rows.append({"ranks": ranks, "mode": mode, "model_bytes": size, "per_rank": per_rank})
    lines = [f"# FSDP2 loading, per-rank peak host memory above the start (model {size / 2**20:.0f} MiB fp32, "
             "CPU, gloo)", "", "| ranks | loading | worst rank MiB | / model | load s (slowest rank) |",
             "|---:|---|---:|---:|---:|"]
    for r in rows:
        worst = max(p["peak_above_start"] for p in r["per_rank"])
        slowest = max(p["seconds"] for p in r["per_rank"])
        name = "meta device, shards read (load_sharded)" if r["mode"] == "meta" else "whole model, then sharded"
        lines.append(f"| {r['ranks']} | {name} | {worst / 2**20:.0f} | {worst / size:.2f} | {slowest:.2f} |")
    write_table(Path(args.out), "fsdp_loading", {"rows": rows}, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
