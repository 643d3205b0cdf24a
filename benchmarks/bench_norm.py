"""RMSNorm / LayerNorm: forward, backward, forward+backward and double backward against eager
PyTorch, ``F.rms_norm`` / ``F.layer_norm``, ``torch.compile`` of them, and Liger (when importable).

Byte model (the minimum traffic of the op chain, e = element size of x; weights are negligible):
  fwd: read x, write y = 2MNe; bwd: read x, dy, write dx = 3MNe; fwd+bwd = 5MNe;
  hvp (fwd + bwd with create_graph + double backward: read dy, x, v, write d_dy, d_x) = 10MNe.
GB/s uses that model for every provider, so it reads as effective bandwidth against the
device-to-device copy measured in the same run. Each provider is validated against an fp32
reference before it is timed; a provider that fails validation is reported, not timed.

    python benchmarks/bench_norm.py                 # GPU: the issue's shapes, bf16 and fp32
    python benchmarks/bench_norm.py --cpu-smoke     # CPU-size run (CI and ``ofa check`` scale)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Row, copy_bandwidth_gbps, heatmap, plot, stamp, time_ms, write_results  # noqa: E402

import ofa_kernels  # noqa: E402
from ofa_kernels.fewshot.files import atomic_path  # noqa: E402
from ofa_kernels.reference import layer_norm_ref, rms_norm_ref  # noqa: E402

GPU_SHAPES = [(32768, 4096), (150, 4096), (32768, 2048), (32768, 8192), (4096, 16384), (4096, 65536)]
CPU_SHAPES = [(256, 576), (64, 4096)]
COMPILE_SHAPES = {(32768, 4096), (150, 4096)}  # torch.compile recompiles per shape: key shapes only
MODES = ["fwd", "bwd", "fwd+bwd", "hvp"]
BYTES_PER_ELEMENT_PASS = {"fwd": 2, "bwd": 3, "fwd+bwd": 5, "hvp": 10}


def providers(op: str, shape: tuple[int, int], device: torch.device) -> dict:
    """name -> f(x, w, b) for one op; compiled and Liger providers where they apply."""
    n = shape[1]
    if op == "rms":
        table = {
            "ofa": lambda x, w, b: ofa_kernels.rms_norm(x, w, 1e-6),
            "hf_eager": lambda x, w, b: rms_norm_ref(x, w, 1e-6),
            "F.rms_norm": lambda x, w, b: F.rms_norm(x, (n,), w, 1e-6),
        }
    else:
        table = {
            "ofa": lambda x, w, b: ofa_kernels.layer_norm(x, w, b, 1e-5),
            "F.layer_norm": lambda x, w, b: F.layer_norm(x, (n,), w, b, 1e-5),
        }
    report = ofa_kernels.backends()
    for name in ("triton", "cuda") if device.type == "cuda" else ("torch", "cpu"):
        if report[name]["available"]:  # each backend explicitly; "ofa" is what auto picks
            table[f"ofa[{name}]"] = ((lambda x, w, b, be=name: ofa_kernels.rms_norm(x, w, 1e-6, backend=be))
                                     if op == "rms" else
                                     (lambda x, w, b, be=name: ofa_kernels.layer_norm(x, w, b, 1e-5, backend=be)))
    if device.type == "cuda" and shape in COMPILE_SHAPES:
        for name in [k for k in table if not k.startswith("ofa")]:
            table[f"compile({name})"] = torch.compile(table[name], dynamic=False)
    if device.type == "cuda":
        try:
            from liger_kernel.transformers.functional import liger_layer_norm, liger_rms_norm
        except ImportError:
            pass
        else:
            table["liger"] = ((lambda x, w, b: liger_rms_norm(x, w, 1e-6)) if op == "rms"
                              else (lambda x, w, b: liger_layer_norm(x, w, b, 1e-5)))
    return table


def make_runner(f, mode, x, w, b, dy, v):
    """A closure that runs one mode; returns the tensors it produced (for validation)."""
    params = [x, w] + ([b] if b is not None else [])
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return [f(x, w, b)]
    elif mode == "bwd":
        y = f(x, w, b)

        def run():
            return list(torch.autograd.grad(y, params, dy, retain_graph=True))
    elif mode == "fwd+bwd":
        def run():
            return list(torch.autograd.grad(f(x, w, b), params, dy))
    else:  # hvp: second derivatives through the norm, as the sharpness term needs
        def run():
            gx, gw = torch.autograd.grad(f(x, w, b), [x, w], dy, create_graph=True)[:2]
            return list(torch.autograd.grad((gx * v).sum() + gw.sum(), [x, w], allow_unused=True,
                                            materialize_grads=True))
    return run


def reference_results(op, mode, x, w, b, dy, v):
    """The same mode computed in fp32 from the reference (HF-style ops under autograd)."""
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    b32 = None if b is None else b.detach().float().requires_grad_()
    f = (lambda x, w, b: rms_norm_ref(x, w, 1e-6)) if op == "rms" else (lambda x, w, b: layer_norm_ref(x, w, b, 1e-5))
    return make_runner(f, mode, x32, w32, b32, dy.float(), v.float())()


def valid(got, want, dtype) -> tuple[bool, float]:
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    worst = 0.0
    for g, t in zip(got, want):
        scale = t.abs().max().item() + 1e-6
        worst = max(worst, (g.float() - t).abs().max().item() / scale)
    return worst <= tol and len(got) == len(want), worst


def bench(device: torch.device, shapes, dtypes, modes, rep_ms: float, on_progress=lambda rows: None) -> list[Row]:
    """Times every (op, shape, dtype, mode, provider); calls ``on_progress(rows)`` after each shape."""
    rows = []
    for op in ("rms", "layer"):
        for shape in shapes:
            for dtype in dtypes:
                M, N = shape
                x = torch.randn(M, N, device=device, dtype=dtype, requires_grad=True)
                w = (torch.rand(N, device=device) + 0.5).to(dtype).requires_grad_()
                b = (torch.randn(N, device=device) * 0.1).to(dtype).requires_grad_() if op == "layer" else None
                dy, v = torch.randn_like(x), torch.randn_like(x)
                for mode in modes:
                    want = reference_results(op, mode, x, w, b, dy, v)
                    nbytes = BYTES_PER_ELEMENT_PASS[mode] * M * N * x.element_size()
                    for name, f in providers(op, shape, device).items():
                        if mode == "hvp" and name.startswith("compile("):
                            continue  # torch.compile does not trace double backward
                        row = Row(op, mode, f"{M}x{N}", str(dtype).replace("torch.", ""), name, None)
                        try:
                            # Liger writes dx into dy's buffer: validate on a copy, time on the original
                            # (its values stay bounded, so timing is unaffected). No clone is timed.
                            ok, err = valid(make_runner(f, mode, x, w, b, dy.clone(), v)(), want, dtype)
                            run = make_runner(f, mode, x, w, b, dy, v)
                        except Exception as exc:  # a provider without double backward, say
                            row.note = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
                            rows.append(row)
                            continue
                        if not ok:
                            row.note = f"wrong result (max rel. error {err:.2g}): not timed"
                        else:
                            row.ms, row.ms_p20, row.ms_p80 = time_ms(run, device, rep_ms=rep_ms)
                            row.gbps = nbytes / row.ms / 1e6
                        rows.append(row)
                        print(f"{op:5s} {mode:7s} {row.shape:>11s} {row.dtype:8s} {name:22s} "
                              f"{row.ms if row.ms else float('nan'):9.4f} ms {row.gbps or 0:8.0f} GB/s {row.note}",
                              flush=True)
                del x, w, b, dy, v
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                on_progress(rows)
    return rows


def boundary_cost_us(device: torch.device, calls: int = 300) -> dict[str, float]:
    """Host time per forward call at the launch-bound shape (150 x 4096, bf16)."""
    from ofa_kernels.ops.dispatch import resolve
    from ofa_kernels.precision import norm_spec

    x = torch.randn(150, 4096, device=device, dtype=torch.bfloat16)
    w = torch.ones(4096, device=device, dtype=torch.bfloat16)
    impl = resolve("auto", device)
    rms = norm_spec(True, 0.0, "llama")
    cases = {
        "ofa.rms_norm (torch.library op)": lambda: ofa_kernels.rms_norm(x, w),
        "backend launcher, no op boundary": lambda: impl.norm_fwd(x, w, None, 1e-6, rms, x.dtype),
        "F.rms_norm": lambda: F.rms_norm(x, (4096,), w, 1e-6),
    }
    out = {}
    for name, fn in cases.items():
        for _ in range(20):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out[name] = (time.perf_counter() - t) / calls * 1e6
    return out


def table(rows: list[Row], meta: dict, copy_gbps: float, boundary: dict[str, float]) -> str:
    lines = [f"Device: {meta['device']}; torch {meta['torch']}, triton {meta['triton']}; {meta['time_utc']} UTC.",
             f"Device-to-device copy (read+write), same run: **{copy_gbps:.0f} GB/s**.", "",
             "| op | mode | shape | dtype | provider | ms (p20-p80) | GB/s | % copy | ofa speed-up | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ours = next((o for o in rows if (o.op, o.mode, o.shape, o.dtype, o.provider) ==
                     (r.op, r.mode, r.shape, r.dtype, "ofa")), None)
        speedup = f"{r.ms / ours.ms:.2f}x" if r.ms and ours and ours.ms and r.provider != "ofa" else ""
        timing = f"{r.ms:.4f} ({r.ms_p20:.4f}-{r.ms_p80:.4f})" if r.ms else "-"
        gbps = f"{r.gbps:.0f}" if r.gbps else "-"
        pct = f"{100 * r.gbps / copy_gbps:.0f}%" if r.gbps else "-"
        lines.append(f"| {r.op} | {r.mode} | {r.shape} | {r.dtype} | {r.provider} | {timing} | {gbps} | {pct} "
                     f"| {speedup} | {r.note} |")
    lines += ["", "Host time per forward call at 150x4096 bf16 (launch-bound; us per call):", ""]
    lines += [f"- {k}: {v:.1f} us" for k, v in boundary.items()]
    return "\n".join(lines) + "\n"


# Which backend "auto" runs for each stage, from the modes that time it (hvp: the whole HVP, whose
# extra over fwd+bwd is the double backward). Where the two kernels are within TIE of each other the
# compiled extension wins: its launch costs less host time.
STAGE_OF_MODE = {"fwd": "fwd", "bwd": "bwd", "hvp": "bwd_bwd"}
TIE = 0.03


def auto_table_from(rows: list[Row], arch: str, tie: float = TIE) -> dict:
    """{arch: {op: {stage: {dtype: {width: backend}}}}} from the timed ``ofa[triton]`` and ``ofa[cuda]``
    rows; per width, the shape with the most rows decides (kernel time, not launch time)."""
    timed = {(r.op, r.mode, r.shape, r.dtype, r.provider): r.ms for r in rows if r.ms}
    found: dict = {}
    best_rows: dict = {}
    for (op, mode, shape, dtype, provider), ms in timed.items():
        if provider != "ofa[triton]" or mode not in STAGE_OF_MODE:
            continue
        cuda = timed.get((op, mode, shape, dtype, "ofa[cuda]"))
        if cuda is None:
            continue
        m, n = (int(v) for v in shape.split("x"))
        key = (op, STAGE_OF_MODE[mode], dtype, n)
        if m < best_rows.get(key, 0):
            continue
        best_rows[key] = m
        choice = "cuda" if cuda <= ms * (1 + tie) else "triton"
        found.setdefault(arch, {}).setdefault(op, {}).setdefault(key[1], {}).setdefault(dtype, {})[str(n)] = choice
    return found


def write_auto_table(found: dict, path: Path) -> dict:
    """Merges ``found`` into the packaged table at ``path`` (entries measured now replace older ones)."""
    table = json.loads(path.read_text()) if path.exists() else {}
    for arch, ops in found.items():
        for op, stages in ops.items():
            for stage, dtypes in stages.items():
                for dtype, widths in dtypes.items():
                    table.setdefault(arch, {}).setdefault(op, {}).setdefault(stage, {}).setdefault(dtype, {}).update(widths)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="small CPU shapes, fp32, a few repeats")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--rep-ms", type=float, default=40.0, help="GPU timing window per measurement")
    parser.add_argument("--shapes", default=None, help="e.g. 32768x4096,150x4096 (default: all)")
    parser.add_argument("--write-auto-table", action="store_true", help="merge which backend won each (op, stage, "
                        "dtype, width) into ofa_kernels/ops/auto_backends.json (what backend='auto' reads)")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.cpu_smoke or not torch.cuda.is_available() else "cuda")
    shapes = CPU_SHAPES if device.type == "cpu" else GPU_SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    dtypes = [torch.float32] if device.type == "cpu" else [torch.bfloat16, torch.float32]
    meta = stamp(device)
    copy_gbps = copy_bandwidth_gbps(device)
    print(f"{meta['device']}: copy {copy_gbps:.0f} GB/s", flush=True)
    name = "norm_cpu" if device.type == "cpu" else "norm_gpu"
    boundary = boundary_cost_us(device)
    meta.update(copy_gbps=copy_gbps, boundary_us=boundary)

    def save(rows):  # after every shape, so a run cut short still leaves its table
        write_results(rows, meta, args.out, name, table(rows, meta, copy_gbps, boundary))

    rows = bench(device, shapes, dtypes, MODES, args.rep_ms, save)
    text = table(rows, meta, copy_gbps, boundary)
    write_results(rows, meta, args.out, name, text)
    plot(rows, args.out / f"{name}.png", f"Norms on {meta['device']}", copy_gbps)
    heatmap(rows, args.out / f"{name}_vs_best.png",
            f"best anchor (F.*, torch.compile(F.*), Liger) / ofa, time per call\n{meta['device']}")
    print(text)
    if args.write_auto_table and device.type == "cuda":
        from ofa_kernels.ops import dispatch
        from ofa_kernels.triton import tuning

        found = auto_table_from(rows, tuning.arch(device))  # "sm90": the key both tables use
        write_auto_table(found, dispatch.AUTO_TABLE_PATH)
        print(f"auto backend table: {json.dumps(found)} -> {dispatch.AUTO_TABLE_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
