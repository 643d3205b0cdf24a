"""Host time per call of the norm ops against PyTorch's own, on the CPU (no GPU needed).

    python benchmarks/host_time.py --out benchmarks/results

At a small shape (default 1 x 576, SmolLM2's width, fp32) the work is a few hundred flops, so a call's
time is the path on the way to the kernel: argument checks, dispatch, autograd bookkeeping,
allocations. Each provider runs blocks of calls in turn (ours, then F.rms_norm / F.layer_norm,
then ours again, ...) so that load from other processes hits all of them alike; the figure is
the best block's microseconds per call. Modes: forward with no grad, forward with grad recorded
(no backward), forward + backward. Writes ``host_time_cpu.json`` and ``host_time_cpu.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from harness import write_table


def _calls(op: str, provider: str, mode: str, rows: int, width: int, backend: str = "auto"):
    import torch
    import torch.nn.functional as F

    import ofa_kernels

    x = torch.randn(rows, width)
    w, b = torch.rand(width) + 0.5, torch.randn(width)
    grad = mode != "fwd"
    if grad:
        x, w, b = (t.requires_grad_() for t in (x, w, b))
    if op == "rms":
        fn = (lambda: ofa_kernels.rms_norm(x, w, 1e-6, backend=backend)) if provider == "ofa" else \
             (lambda: F.rms_norm(x, (width,), w, 1e-6))
    else:
        fn = (lambda: ofa_kernels.layer_norm(x, w, b, 1e-5, backend=backend)) if provider == "ofa" else \
             (lambda: F.layer_norm(x, (width,), w, b, 1e-5))
    if mode == "fwd":
        def call():
            with torch.no_grad():
                fn()
    elif mode == "fwd (grad recorded)":
        call = fn
    else:
        def call():
            fn().sum().backward()
    return call


MODES = ("fwd", "fwd (grad recorded)", "fwd+bwd")


def measure(op: str, mode: str, rows: int, width: int, block: int, rounds: int, backend: str = "auto"
            ) -> dict[str, float]:
    """Best microseconds per call of each provider over ``rounds`` interleaved blocks of ``block`` calls."""
    calls = {p: _calls(op, p, mode, rows, width, backend) for p in ("ofa", "torch")}
    best = {p: float("inf") for p in calls}
    for call in calls.values():
        for _ in range(max(10, block // 10)):
            call()
    for _ in range(rounds):
        for provider, call in calls.items():
            started = time.perf_counter()
            for _ in range(block):
                call()
            best[provider] = min(best[provider], (time.perf_counter() - started) / block * 1e6)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--shape", default="1x576")
    parser.add_argument("--block", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--backend", default="auto", help="ofa_kernels backend (auto: the compiled cpu one when "
                        "built, else torch)")
    parser.add_argument("--smoke", action="store_true", help="tiny blocks (CI)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    rows, width = (int(v) for v in args.shape.split("x"))
    block, rounds = (20, 2) if args.smoke else (args.block, args.rounds)
    import ofa_kernels

    backend_name = args.backend  # auto on CPU tensors: the compiled extension when built, else plain PyTorch
    if backend_name == "auto":
        backend_name = "cpu" if ofa_kernels.backends()["cpu"]["available"] else "torch"
    rows_out = []
    for op in ("rms", "layer"):
        for mode in MODES:
            best = measure(op, mode, rows, width, block, rounds, args.backend)
            rows_out.append({"op": op, "mode": mode, "shape": [rows, width], "ofa_us": best["ofa"],
                             "torch_us": best["torch"], "ratio": best["ofa"] / best["torch"]})
    lines = [f"# Host time per call on the CPU, {rows} x {width} fp32, {backend_name} backend, 1 thread (best of {rounds} "
             f"interleaved blocks of {block} calls)", "",
             "| op | mode | ofa_kernels us | F.rms_norm / F.layer_norm us | ratio |", "|---|---|---:|---:|---:|"]
    for r in rows_out:
        lines.append(f"| {r['op']} | {r['mode']} | {r['ofa_us']:.1f} | {r['torch_us']:.1f} | {r['ratio']:.2f} |")
    data = {"rows": rows_out, "torch": torch.__version__, "backend": backend_name}
    write_table(Path(args.out), "host_time_cpu", data, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
