"""Sweeps the Triton launchers' knobs (rows per program, warps, programs per SM) on a GPU.

Prints, per (kernel, op, width), each configuration's time and the best one; the defaults in
``ofa_kernels/triton/norm.py::_config`` are set from this sweep. GPU only.

    python benchmarks/tune_norm.py --out DIR
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench

from ofa_kernels.triton import norm as tnorm

WIDTHS = [4096]  # the target width; add more when the device budget allows


def sweep(rows: int, width: int, dtype: torch.dtype, is_rms: bool) -> list[dict]:
    x = torch.randn(rows, width, device="cuda", dtype=dtype)
    w = torch.rand(width, device="cuda", dtype=dtype) + 0.5
    y, mean, rstd = tnorm.norm_fwd(x, w, None, 1e-6, 0.0, is_rms, "llama", dtype)
    dy, a = torch.randn_like(x), torch.randn_like(x)
    out = []
    for rpp, warps in itertools.product([1, 2, 4], [4, 8, 16]):
        cfg = dict(rows_per_program=rpp, num_warps=warps)
        ms = do_bench(lambda: tnorm.norm_fwd(x, w, None, 1e-6, 0.0, is_rms, "llama", dtype, **cfg), rep=25)
        out.append(dict(kernel="fwd", **cfg, programs_per_sm=None, ms=ms))
        for pps in [1, 2, 4, 8]:
            cfgb = dict(cfg, programs_per_sm=pps)
            try:
                ms = do_bench(lambda: tnorm.norm_bwd(dy, x, w, mean, rstd, 0.0, is_rms, "llama", True, True, False,
                                                     **cfgb), rep=25)
                out.append(dict(kernel="bwd", **cfgb, ms=ms))
                ms = do_bench(lambda: tnorm.norm_bwd_bwd(dy, x, w, mean, rstd, a, None, None, 0.0, is_rms,
                                                         True, True, True, **cfgb), rep=25)
                out.append(dict(kernel="bwd_bwd", **cfgb, ms=ms))
            except Exception as exc:  # out of registers / shared memory for this combination
                out.append(dict(kernel="bwd", **cfgb, ms=None, error=str(exc)[:80]))
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    results = {}
    for width in WIDTHS:
        for op in ("rms", "layer"):
            rows = sweep(32768, width, torch.bfloat16, op == "rms")
            results[f"{op}-{width}"] = rows
            for kernel in ("fwd", "bwd", "bwd_bwd"):
                ok = [r for r in rows if r["kernel"] == kernel and r["ms"]]
                best = min(ok, key=lambda r: r["ms"])
                print(f"{op:5s} {width:5d} {kernel:7s} best {best['ms']:.4f} ms rpp={best['rows_per_program']} "
                      f"warps={best['num_warps']} pps={best['programs_per_sm']} "
                      f"(worst {max(r['ms'] for r in ok):.4f})", flush=True)
    (args.out / "tune_norm.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
