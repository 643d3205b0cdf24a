"""Sweeps the Triton norm launchers' knobs over widths and dtypes on a GPU; writes the launch table.

For every (kernel fwd/bwd/bwd_bwd, dtype, width) cell it times, RMSNorm and LayerNorm together:
rows per program x warps (programs per SM at 2), then programs per SM for the best, then the looped
path (chunk caps below the width) for the best; the winner is the cell's entry. Then, for the
backward kernels at the best knobs, where dW is summed (in the kernel by its last program, or by a
separate sum) at several row counts: the crossover that ``IN_KERNEL_REDUCE_MAX`` is set from.

Each finished cell is written to ``--out`` at once (``tune_<arch>.json``) and skipped when the sweep is
run again, so a sweep cut short by the device budget resumes. ``--write-table`` merges the cells
into the packaged ``ofa_kernels/triton/tuned.json`` that the launchers read. ``--cuda-rows`` instead times
the compiled CUDA backend at 1/2/4/8 rows per CTA against its occupancy rule. GPU only.

    python benchmarks/tune_norm.py --out DIR [--widths 2048,4096] [--dtypes bfloat16] [--write-table]
    python benchmarks/tune_norm.py --out DIR --cuda-rows [--widths 1024,2048,4096] [--kernels fwd,bwd]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

from ofa_kernels.precision import norm_spec
from ofa_kernels.triton import norm as tnorm
from ofa_kernels.triton import tuning

WIDTHS = [1024, 2048, 3072, 4096, 5120, 8192, 16384, 65536]
DTYPES = ["bfloat16", "float16", "float32"]
KERNELS = ["fwd", "bwd", "bwd_bwd"]
ROWS_PER_PROGRAM = [1, 2, 4, 8]
WARPS = [2, 4, 8, 16]
PROGRAMS_PER_SM = [1, 2, 4]
REDUCE_ROWS = [150, 1024, 4096, 32768]


def rows_for(width: int) -> int:
    """The benchmark grid's row counts: 32768 rows, 4096 for the wide rows."""
    return 32768 if width <= 8192 else 4096


def bench_ms(fn, rep_ms: float) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=max(5, rep_ms / 4), rep=rep_ms))


class Cell:
    """Inputs of one (dtype, width) cell and a timer for one kernel's knobs, both norms summed. ``ops``: the
    backend module timed (Triton's launchers, which take the knobs; or ``ofa_kernels.native.norm``)."""

    def __init__(self, rows: int, width: int, dtype: torch.dtype, ops=tnorm, device: str = "cuda"):
        self.ops = ops
        self.x = torch.randn(rows, width, device=device, dtype=dtype)
        self.w = torch.rand(width, device=device, dtype=dtype) + 0.5
        self.dy, self.a = torch.randn_like(self.x), torch.randn_like(self.x)
        # each norm as the ops run it: RMSNorm in Llama's cast mode, LayerNorm's (none)
        self.specs = {rms: norm_spec(rms, 0.0, "llama" if rms else "none") for rms in (True, False)}
        self.stats = {rms: ops.norm_fwd(self.x, self.w, None, 1e-6, spec, dtype)[1:]
                      for rms, spec in self.specs.items()}

    def run(self, kernel: str, is_rms: bool, knobs: dict) -> None:
        mean, rstd = self.stats[is_rms]
        spec = self.specs[is_rms]
        if kernel == "fwd":
            fwd = {k: v for k, v in knobs.items() if k in ("rows_per_program", "num_warps", "max_block_n")}
            self.ops.norm_fwd(self.x, self.w, None, 1e-6, spec, self.x.dtype, **fwd)
        elif kernel == "bwd":
            self.ops.norm_bwd(self.dy, self.x, self.w, mean, rstd, spec, (True, True, False), **knobs)
        else:
            self.ops.norm_bwd_bwd(self.dy, self.x, self.w, mean, rstd, (self.a, None, None), spec.unrounded(),
                                  (True, True, True), **knobs)

    def time(self, kernel: str, knobs: dict, rep_ms: float) -> float | None:
        """ms of RMSNorm + LayerNorm; None where the knobs do not compile or run (registers, smem)."""
        try:
            return sum(bench_ms(lambda r=rms: self.run(kernel, r, knobs), rep_ms) for rms in (True, False))
        except Exception:  # noqa: BLE001 - an infeasible configuration is a result of the sweep
            return None


def best_knobs(cell: Cell, kernel: str, width: int, rep_ms: float) -> tuple[dict, float, list[dict]]:
    """Coordinate search: rows x warps, then programs per SM, then the looped path."""
    tried: list[dict] = []

    def best(candidates: list[dict]) -> tuple[dict, float]:
        for knobs in candidates:
            tried.append({**knobs, "ms": cell.time(kernel, knobs, rep_ms)})
        ok = [t for t in tried if t["ms"] is not None]
        top = min(ok, key=lambda t: t["ms"])
        return {k: v for k, v in top.items() if k != "ms"}, top["ms"]

    persistent = kernel != "fwd"
    base = {"programs_per_sm": 2} if persistent else {}
    choice, ms = best([{**base, "rows_per_program": r, "num_warps": w}
                       for r, w in itertools.product(ROWS_PER_PROGRAM, WARPS)])
    if persistent:
        choice, ms = best([{**choice, "programs_per_sm": p} for p in PROGRAMS_PER_SM
                           if p != choice["programs_per_sm"]])
    caps = [c for c in (4096, 8192) if c < width]
    if caps:
        choice, ms = best([{**choice, "rows_per_program": 1, "max_block_n": c} for c in caps])
    return choice, ms, tried


def reduce_crossover(width: int, dtype: torch.dtype, kernel: str, knobs: dict, rep_ms: float) -> list[dict]:
    """ms with dW summed in the kernel against a separate sum, at several row counts."""
    out = []
    for rows in REDUCE_ROWS:
        cell = Cell(rows, width, dtype)
        times = {flag: cell.time(kernel, {**knobs, "reduce_in_kernel": flag}, rep_ms) for flag in (True, False)}
        out.append({"rows": rows, "in_kernel_ms": times[True], "separate_ms": times[False]})
    return out


CUDA_ROWS = ["rule", "1", "2", "4", "8"]


def sweep_cuda_rows(widths: list[int], dtypes: list[str], kernels: list[str], rep_ms: float, out: Path,
                    arch: str, device: str = "cuda") -> dict:
    """The compiled CUDA backend at each rows-per-CTA setting (``OFA_CUDA_ROWS_PER_CTA``; "rule": unset,
    the occupancy rule), RMSNorm + LayerNorm ms per (kernel, dtype, width); written to
    ``tune_cuda_rows_<arch>.json`` as each cell finishes. It checks the rule; nothing reads it back."""
    path = out / f"tune_cuda_rows_{arch}.json"
    name = torch.cuda.get_device_name() if device == "cuda" else device
    done = json.loads(path.read_text()) if path.exists() else {"device": name, "arch": arch, "cells": {}}
    for width, dtype_name, kernel in itertools.product(widths, dtypes, kernels):
        key = f"{kernel}/{dtype_name}/{width}"
        if key in done["cells"]:
            continue
        cell = _cuda_rows_cell(kernel, getattr(torch, dtype_name), width, rep_ms, device)
        done["cells"][key] = cell
        tmp = path.with_suffix(".json.partial")
        tmp.write_text(json.dumps(done, indent=1))
        os.replace(tmp, path)
        shown = ", ".join(f"{k} {v:.4f}" if v is not None else f"{k} failed" for k, v in cell.items())
        print(f"cuda rows per CTA, {key} (ms): {shown}", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    return done


def _cuda_rows_cell(kernel: str, dtype: torch.dtype, width: int, rep_ms: float, device: str) -> dict:
    from ofa_kernels.native import norm as cnorm

    cell, timings = Cell(rows_for(width), width, dtype, ops=cnorm, device=device), {}
    for setting in CUDA_ROWS:
        if setting == "rule":
            os.environ.pop("OFA_CUDA_ROWS_PER_CTA", None)
        else:
            os.environ["OFA_CUDA_ROWS_PER_CTA"] = setting
        timings[setting] = cell.time(kernel, {}, rep_ms)  # None: the setting did not launch
    os.environ.pop("OFA_CUDA_ROWS_PER_CTA", None)
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--widths", default=",".join(map(str, WIDTHS)))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--kernels", default=",".join(KERNELS))
    parser.add_argument("--rep-ms", type=float, default=10.0, help="timing window per configuration")
    parser.add_argument("--write-table", action="store_true", help="merge the winners into ofa_kernels/triton/tuned.json")
    parser.add_argument("--cuda-rows", action="store_true",
                        help="instead: time the compiled CUDA backend at each rows-per-CTA setting (checks its rule)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_norm.py times GPU kernels: no CUDA device here", file=sys.stderr)
        return 2
    device_arch = tuning.arch(torch.device("cuda"))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.cuda_rows:
        sweep_cuda_rows([int(w) for w in args.widths.split(",")], args.dtypes.split(","), args.kernels.split(","),
                        args.rep_ms, args.out, device_arch)
        return 0
    path = args.out / f"tune_{device_arch}.json"
    done = json.loads(path.read_text()) if path.exists() else {"device": torch.cuda.get_device_name(), "cells": {}}
    for width, dtype_name, kernel in itertools.product(map(int, args.widths.split(",")), args.dtypes.split(","),
                                                       args.kernels.split(",")):
        key = f"{kernel}/{dtype_name}/{width}"
        if key in done["cells"]:
            continue
        start = time.perf_counter()
        dtype = getattr(torch, dtype_name)
        cell = Cell(rows_for(width), width, dtype)
        default = cell.time(kernel, {}, args.rep_ms)
        knobs, ms, tried = best_knobs(cell, kernel, width, args.rep_ms)
        del cell
        entry = {"knobs": knobs, "ms": ms, "default_ms": default, "rows": rows_for(width), "tried": tried}
        if kernel != "fwd":
            entry["reduce"] = reduce_crossover(width, dtype, kernel, knobs, args.rep_ms)
        done["cells"][key] = entry
        tmp = path.with_suffix(".json.partial")
        tmp.write_text(json.dumps(done, indent=1))
        os.replace(tmp, path)  # one finished cell at a time: a cut-short sweep resumes
        print(f"{key}: {knobs} {ms:.4f} ms (default rule {default or float('nan'):.4f} ms), "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        torch.cuda.empty_cache()
    found: dict = {}
    for key, entry in done["cells"].items():
        kernel, dtype_name, width = key.split("/")
        found.setdefault(device_arch, {}).setdefault(kernel, {}).setdefault(dtype_name, {})[width] = entry["knobs"]
    (args.out / "tuned_found.json").write_text(json.dumps(found, indent=1, sort_keys=True))
    if args.write_table:
        merged = tuning.merge(found, tuning.table())
        tuning.TABLE_PATH.write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n")
        print(f"wrote {tuning.TABLE_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
