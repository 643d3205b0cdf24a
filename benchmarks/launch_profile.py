"""Where a norm call's host time goes, stage by stage (issue 15, item 1).

    python benchmarks/launch_profile.py --out benchmarks/results --device cuda

Host time is what the CPU spends per call: blocks of calls are timed without a synchronisation
inside the block (the GPU queue absorbs the kernels; it is drained between blocks, untimed), best
of ``--rounds`` blocks. For RMSNorm at each shape (default 150 x 4096, one OFA sequence, and
32768 x 4096) and each Triton launch mode ("jit", "direct": ``ofa_kernels/triton/launch.py``) it
times, from the outside in:

- the public call (``ofa_kernels.rms_norm``) without and with autograd recording, forward+backward
  and an HVP (backward with ``create_graph``, then the double backward), beside ``F.rms_norm``'s;
- the backend's launcher for each stage (fwd, bwd, bwd_bwd): allocations + launch configuration +
  the launch, with no argument checks, dispatch or autograd;
- for Triton: ``_config`` (launch configuration), the allocations of the forward, and the bare
  launch of each kernel with its arguments already built;
- on CUDA: the kernels each public call launches (torch.profiler), which counts extra launches
  (partial-row sums, casts, zero fills).

The differences give the split: argument checks + dispatch = public no-grad call - backend fwd;
autograd bookkeeping = recorded - no-grad; in the backend, what is not config, allocation or launch
is the launcher's own Python. On a CPU the compiled ``cpu`` backend stands in (no Triton rows).
Writes ``launch_profile_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from harness import stamp, write_table


def host_us(fn, device, calls: int, rounds: int) -> float:
    """Best microseconds of host time per call over ``rounds`` blocks of ``calls`` calls."""
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(rounds):
        sync()
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - started) / calls * 1e6)
    sync()
    return best


def kernels_per_call(fn, device) -> int | None:
    """CUDA kernels one call launches (None off CUDA)."""
    import torch

    if device.type != "cuda":
        return None
    fn()
    torch.cuda.synchronize(device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def cases(rows: int, width: int, dtype, device, backend: str = "auto") -> dict[str, tuple[str, object]]:
    """name -> (group, zero-argument call) for one shape."""
    import torch
    import torch.nn.functional as F

    import ofa_kernels
    from ofa_kernels.ops.dispatch import resolve
    from ofa_kernels.precision import norm_spec

    x = torch.randn(rows, width, device=device, dtype=dtype)
    w = (torch.rand(width, device=device) + 0.5).to(dtype)
    dy = torch.randn_like(x)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    impl = resolve(backend, device, "norm", width)
    rms = norm_spec(True, 0.0, "llama")
    y, mean, rstd = impl.norm_fwd(x, w, None, 1e-6, rms, dtype)

    def no_grad(f):
        def call():
            with torch.no_grad():
                f()
        return call

    def fwd_bwd(f):
        return lambda: f(xg, wg).backward(dy)

    def hvp(f):
        def call():
            out = f(xg, wg)
            gx, gw = torch.autograd.grad(out, (xg, wg), dy, create_graph=True)
            torch.autograd.grad((gx, gw), (xg, wg), (dy, torch.ones_like(gw)))
        return call

    ours = lambda a, b: ofa_kernels.rms_norm(a, b, 1e-6, backend=backend)  # noqa: E731
    theirs = lambda a, b: F.rms_norm(a, (width,), b, 1e-6)  # noqa: E731
    out = {
        "F.rms_norm fwd (no grad)": ("public", no_grad(lambda: theirs(x, w))),
        "ofa rms_norm fwd (no grad)": ("public", no_grad(lambda: ours(x, w))),
        "F.rms_norm fwd (grad recorded)": ("public", lambda: theirs(xg, wg)),
        "ofa rms_norm fwd (grad recorded)": ("public", lambda: ours(xg, wg)),
        "F.rms_norm fwd+bwd": ("public", fwd_bwd(theirs)),
        "ofa rms_norm fwd+bwd": ("public", fwd_bwd(ours)),
        "F.rms_norm hvp": ("public", hvp(theirs)),
        "ofa rms_norm hvp": ("public", hvp(ours)),
        "backend fwd": ("backend", lambda: impl.norm_fwd(x, w, None, 1e-6, rms, dtype)),
        "backend bwd (dx, dw)": ("backend", lambda: impl.norm_bwd(dy, x, w, mean, rstd, rms,
                                                                   (True, True, False))),
        "backend bwd_bwd (d dy, d x, d w)": ("backend", lambda: impl.norm_bwd_bwd(
            dy, x, w, mean, rstd, (dy, w, None), rms.unrounded(), (True, True, True))),
    }
    if getattr(impl, "__name__", "").endswith("triton.norm"):
        out.update(_triton_parts(impl, x, w, dy, y, mean, rstd))
    return out


def _triton_parts(tn, x, w, dy, y, mean, rstd) -> dict:
    """The Triton launcher's pieces: launch configuration, allocations, bare launches."""
    import torch

    from ofa_kernels.precision import acc_dtype
    from ofa_kernels.vocab import CAST_CODE

    M, N = x.shape
    acc = acc_dtype(x.dtype)
    block_m, block_n, single, warps, _ = tn._config(x, "fwd", None, None)
    fwd = dict(X=x, Y=y, W=w, B=x, Mean=rstd, Rstd=rstd, stride_x=x.stride(0), stride_y=y.stride(0), M=M, N=N,
               eps=1e-6, offset=0.0, IS_RMS=True, HAS_W=True, HAS_B=False, CAST_MODE=CAST_CODE["llama"], ACC=tn.acc_tl_dtype(x.dtype),
               BLOCK_M=block_m, BLOCK_N=block_n, SINGLE_PASS=single)
    bm, bn, bsingle, bwarps, progs = tn._config(x, "bwd", None, None)
    dx = torch.empty_like(x)
    part = torch.empty(progs, N, dtype=acc, device=x.device)
    bwd = dict(DY=dy, X=x, W=w, Mean=rstd, Rstd=rstd, DX=dx, DW_part=part, DB_part=rstd, DW=rstd, DB=rstd,
               Counter=rstd, stride_dy=dy.stride(0), stride_x=x.stride(0), stride_dx=N, M=M, N=N,
               n_tiles=tn.cdiv(M, bm), n_progs=progs, offset=0.0, IS_RMS=True, HAS_W=True, NEED_DX=True,
               NEED_DW=True, NEED_DB=False, CAST_MODE=CAST_CODE["llama"], ACC=tn.acc_tl_dtype(x.dtype), BLOCK_M=bm, BLOCK_N=bn,
               SINGLE_PASS=bsingle, REDUCE=False)  # partials summed apart (REDUCE off): no shared counter
    return {
        "triton _config (fwd)": ("triton", lambda: tn._config(x, "fwd", None, None)),
        "triton fwd allocations (y, mean, rstd)": ("triton", lambda: (
            torch.empty((M, N), dtype=x.dtype, device=x.device), torch.empty(M, dtype=acc, device=x.device),
            torch.empty(0, dtype=acc, device=x.device))),
        "triton fwd launch only": ("triton", lambda: tn._launch_fwd(tn.cdiv(M, block_m), warps, **fwd)),
        "triton bwd launch only": ("triton", lambda: tn._launch_bwd(progs, bwarps, **bwd)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shapes", default="150x4096,32768x4096")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--backend", default="auto", help="ofa_kernels backend (auto: Triton on CUDA, the compiled "
                        "cpu one on a CPU)")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    import torch

    from ofa_kernels.triton import launch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu for the cpu backend)")
    dtype = getattr(torch, args.dtype)
    modes = list(launch.MODES) if device.type == "cuda" else [f"({args.backend} backend)"]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    results = []
    for rows, width in shapes:
        calls = args.calls if rows * width <= 1 << 22 else max(10, args.calls // 10)
        for mode in modes:
            if device.type == "cuda":
                launch.set_mode(mode)
            for name, (group, fn) in cases(rows, width, dtype, device, args.backend).items():
                results.append({"shape": f"{rows}x{width}", "mode": mode, "group": group, "case": name,
                                "host_us": host_us(fn, device, calls, args.rounds),
                                "kernels": kernels_per_call(fn, device) if group == "public" else None})
    launch.set_mode("jit")
    columns = [(s, m) for s in dict.fromkeys(r["shape"] for r in results) for m in modes]
    names = list(dict.fromkeys((r["group"], r["case"]) for r in results))
    cell = {(r["shape"], r["mode"], r["case"]): r for r in results}
    meta = stamp(device)
    lines = [f"# Host time per call (us, no sync inside a block; best of {args.rounds}), RMSNorm, {args.dtype}, "
             f"{meta['device']}", "",
             "| group | call | " + " | ".join(f"{s} {m}" for s, m in columns) + " | kernels per call |",
             "|---|---|" + "---:|" * len(columns) + "---:|"]
    for group, name in names:
        vals = [cell.get((s, m, name)) for s, m in columns]
        kernels = next((v["kernels"] for v in vals if v and v["kernels"] is not None), None)
        lines.append(f"| {group} | {name} | " + " | ".join(f"{v['host_us']:.1f}" if v else "" for v in vals)
                     + f" | {'' if kernels is None else kernels} |")
    write_table(Path(args.out), f"launch_profile_{device.type}", {"meta": meta, "rows": results}, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
