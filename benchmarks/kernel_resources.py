"""What the compiler made of each norm kernel at its default launch: registers, spills, occupancy. No GPU.

    python benchmarks/kernel_resources.py --out benchmarks/results [--arch 90] [--widths 4096,8192]

Triton kernels are compiled ahead of time for the target (``Launcher.compile_for``: Triton's own argument
specialisation, the launch config of ``triton.norm.tile``'s default rule, 32768 rows) and ptxas reports
registers and spill bytes per thread; the compiled CUDA extension (csrc/cuda/norm.cu) is compiled with
``nvcc -Xptxas -v`` (``--cuda``). From those, warps resident per SM (of 64) by the limits of an H100/H200
SM: 64K registers (per-warp allocation in units of 256), 228 KB shared memory (1 KB reserved per CTA),
64 warps, 32 CTAs. A kernel that spills moves registers through local memory on every row, and few
resident warps means few bytes in flight: both read straight off the compiler, before any timing.
Writes ``kernel_resources_sm<arch>.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compiling for a GPU target, not interpreting

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from harness import write_table  # noqa: E402

from ofa_kernels.precision import norm_spec  # noqa: E402
from ofa_kernels.triton import norm as tnorm  # noqa: E402

WIDTHS = [1024, 2048, 3072, 4096, 5120, 8192, 16384, 65536]
DTYPES = ["bfloat16", "float16", "float32"]
KERNELS = ["fwd", "bwd", "bwd_bwd"]
ROWS = 32768
SM = {"regs": 65536, "smem": 228 * 1024, "smem_reserved": 1024, "warps": 64, "ctas": 32}


def resident_warps(regs: int, warps: int, shared: int) -> int:
    """Warps of this kernel resident on one SM (H100/H200 limits)."""
    per_warp = math.ceil(regs * 32 / 256) * 256
    by_regs = (SM["regs"] // per_warp) // warps
    by_smem = SM["smem"] // (shared + SM["smem_reserved"])
    ctas = min(by_regs, by_smem, SM["warps"] // warps, SM["ctas"])
    return ctas * warps


def _launch_args(kernel: str, is_rms: bool, dtype: torch.dtype, N: int, cfg: tuple) -> dict:
    """The arguments, by name, as ``triton.norm``'s launchers pass them for a [ROWS, N] input
    (placeholders on the CPU: only dtypes and alignment matter). The backward sums its partials apart
    (REDUCE off, as at this row count); the double backward is an HVP's (cotangent of dx only)."""
    block_m, block_n, single, _warps = cfg
    cast = norm_spec(is_rms, 0.0, "llama" if is_rms else "none").cast_code  # each norm as the ops run it
    x = torch.empty(16, N, dtype=dtype)
    w, stats = torch.empty(N), torch.empty(16)
    part, counter = torch.empty(4, N), torch.zeros(1, dtype=torch.int32)
    n_tiles, n_progs = math.ceil(ROWS / block_m), 264  # 132 SMs x 2
    tiles = dict(ACC=tl.float32, BLOCK_M=block_m, BLOCK_N=block_n, SINGLE_PASS=single)
    if kernel == "fwd":
        return dict(X=x, Y=x, W=w, B=w, Mean=stats, Rstd=stats, stride_x=N, stride_y=N, M=ROWS, N=N, eps=1e-6,
                    offset=0.0, IS_RMS=is_rms, HAS_W=True, HAS_B=not is_rms, CAST_MODE=cast, **tiles)
    if kernel == "bwd":
        return dict(DY=x, X=x, W=w, Mean=stats, Rstd=stats, DX=x, DW_part=part, DB_part=part, DW=stats, DB=stats,
                    Counter=counter, stride_dy=N, stride_x=N, stride_dx=N, M=ROWS, N=N, n_tiles=n_tiles,
                    n_progs=n_progs, offset=0.0, IS_RMS=is_rms, HAS_W=True, NEED_DX=True, NEED_DW=True,
                    NEED_DB=not is_rms, CAST_MODE=cast, REDUCE=False, **tiles)
    return dict(DY=x, X=x, W=w, Mean=stats, Rstd=stats, A=x, BW=w, E=w, D_DY=x, D_X=x, DW_part=part, DW=stats,
                Counter=counter, stride_dy=N, stride_x=N, stride_a=N, stride_ddy=N, stride_dx=N, M=ROWS, N=N,
                n_tiles=n_tiles, n_progs=n_progs, offset=0.0, IS_RMS=is_rms, HAS_W=True, HAS_A=True, HAS_BW=False,
                HAS_E=False, NEED_DDY=True, NEED_DX=True, NEED_DW=True, REDUCE=False, **tiles)


def _ptxas(ptx: str, arch: str) -> dict:
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        done = subprocess.run([str(ptxas), f"-arch=sm_{arch}a", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
                              capture_output=True, text=True, check=True)
    return _usage(done.stderr)


def _usage(text: str) -> dict:
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    return {"regs": int(regs.group(1)), "spill_bytes": int(spill.group(1)) if spill else 0}


def triton_cell(kernel: str, is_rms: bool, dtype_name: str, N: int, arch: int) -> dict:
    from triton.backends.compiler import GPUTarget

    dtype = getattr(torch, dtype_name)
    cfg = tnorm.tile(kernel, N, on_gpu=True)
    compiled = tnorm.LAUNCHERS[kernel].compile_for(GPUTarget("cuda", arch, 32), cfg[3],
                                                   **_launch_args(kernel, is_rms, dtype, N, cfg))
    usage = _ptxas(compiled.asm["ptx"], str(arch))
    shared = int(compiled.metadata.shared)
    return {"block_m": cfg[0], "block_n": cfg[1], "single": cfg[2], "warps": cfg[3], "shared": shared, **usage,
            "resident_warps": resident_warps(usage["regs"], cfg[3], shared)}


def cuda_extension(arch: int) -> list[dict]:
    """ptxas's report for every kernel instance of csrc/cuda/norm.cu (nvcc needed)."""
    nvcc = shutil.which("nvcc") or str(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc")
    src = Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "norm.cu"
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([nvcc, "-c", "-std=c++17", "-O3", "-DOFA_WITH_CUDA", f"-arch=sm_{arch}", "-Xptxas", "-v",
                               str(src), "-o", str(Path(tmp) / "norm.o")], capture_output=True, text=True, check=True)
    blocks = re.split(r"ptxas info\s+: Compiling entry function '([^']+)'", done.stderr)[1:]
    names = subprocess.run(["c++filt"], input="\n".join(blocks[0::2]), capture_output=True, text=True).stdout.split("\n")
    rows = []
    for name, text in zip(names, blocks[1::2]):
        found = re.search(r"(norm_[a-z_]+)<([^>]*)>", name)
        if not found:
            continue
        kernel = found.group(1).removesuffix("_kernel").removeprefix("norm_")
        tx, ty, vec, items = [p.strip() for p in found.group(2).split(",")]
        usage = _usage(text)
        per_warp = math.ceil(usage["regs"] * 32 / 256) * 256
        short = {"__nv_bfloat16": "bfloat16", "__half": "float16"}
        rows.append({"kernel": kernel, "x": short.get(tx, tx), "y": short.get(ty, ty), "vec": int(vec),
                     "items": int(items), **usage, "max_threads": min(1024, (SM["regs"] // per_warp) * 32)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    parser.add_argument("--widths", default=",".join(map(str, WIDTHS)))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--kernels", default=",".join(KERNELS))
    parser.add_argument("--cuda", action="store_true", help="also the CUDA extension's kernels (nvcc -Xptxas -v)")
    args = parser.parse_args(argv)
    cells = {}
    lines = [f"# Norm kernels at their default launch, compiled for sm_{args.arch} (no GPU): ptxas's registers "
             "and spills, warps resident per SM (of 64)", "",
             "| kernel | norm | dtype | width | BLOCK_M x BLOCK_N | warps | regs | spill B | shared B | warps/SM |",
             "|---|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for kernel in args.kernels.split(","):
        for dtype_name in args.dtypes.split(","):
            for width in map(int, args.widths.split(",")):
                for is_rms in (True, False):
                    c = triton_cell(kernel, is_rms, dtype_name, width, args.arch)
                    norm = "rms" if is_rms else "layer"
                    cells[f"{kernel}/{norm}/{dtype_name}/{width}"] = c
                    lines.append(f"| {kernel} | {norm} | {dtype_name} | {width} | {c['block_m']} x {c['block_n']}"
                                 f"{'' if c['single'] else ' (looped)'} | {c['warps']} | {c['regs']} | "
                                 f"{c['spill_bytes']} | {c['shared']} | {c['resident_warps']} |")
                    print(lines[-1], flush=True)
    data = {"arch": args.arch, "triton": cells, "triton_version": triton.__version__}
    if args.cuda:
        data["cuda"] = cuda_extension(args.arch)
        lines += ["", "## The CUDA extension (csrc/cuda/norm.cu): every kernel instance", "",
                  "| kernel | x | y | vector | items | regs | spill B | max threads per CTA by registers |",
                  "|---|---|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['kernel']} | {r['x']} | {r['y']} | {r['vec']} | {r['items']} | {r['regs']} | "
                  f"{r['spill_bytes']} | {r['max_threads']} |" for r in data["cuda"]]
    write_table(args.out, f"kernel_resources_sm{args.arch}", data, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
