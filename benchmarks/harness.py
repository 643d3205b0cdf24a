"""One benchmark harness: timing, the copy-bandwidth ceiling, stamped tables and plots.

Scripts declare providers, shapes, modes and a byte model; this module times them (CUDA events via
``triton.testing.do_bench`` on a GPU, wall clock on a CPU), validates each provider against a
reference before timing, and writes a markdown table, a JSON file and a PNG plot.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch


@dataclass
class Row:
    op: str
    mode: str
    shape: str
    dtype: str
    provider: str
    ms: float | None
    ms_p20: float | None = None
    ms_p80: float | None = None
    gbps: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


def stamp(device: torch.device) -> dict:
    """Card, versions and time, written with every result file."""
    import triton

    info = {
        "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device=props.name, sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1))
    else:
        info.update(device=f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    return info


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup_ms: float = 25, rep_ms: float = 100,
            cpu_reps: int = 5) -> tuple[float, float, float]:
    """Median, 20th and 80th percentile time of ``fn`` in milliseconds."""
    if device.type == "cuda":
        from triton.testing import do_bench

        q = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return q[0], q[1], q[2]
    fn()
    samples = []
    for _ in range(cpu_reps):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e3)
    samples.sort()
    return statistics.median(samples), samples[len(samples) // 5], samples[(4 * len(samples)) // 5]


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (bytes read + written) measured in this run: the ceiling."""
    n = nbytes // 2 if device.type == "cuda" else nbytes // 64
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms, _, _ = time_ms(lambda: dst.copy_(src), device)
    return 2 * n / ms / 1e6


def write_results(rows: list[Row], meta: dict, out_dir: Path, name: str, table: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{name}.json.tmp"
    tmp.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))
    os.replace(tmp, out_dir / f"{name}.json")
    (out_dir / f"{name}.md").write_text(table)


def write_table(out_dir: Path, name: str, data: dict, lines: list[str]) -> None:
    """``name.json`` (``data``) and ``name.md`` (``lines``) under ``out_dir``, each written atomically; prints the table."""
    from ofa_kernels.fewshot.files import write_text

    write_text(out_dir / f"{name}.json", json.dumps(data, indent=1))
    write_text(out_dir / f"{name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def provider_colours(providers) -> dict[str, str]:
    """One colour per provider for every plot of a run: ours in the same colour everywhere."""
    fixed = {"ofa": "tab:red", "liger": "tab:green", "hf_eager": "tab:gray"}
    palette = ["tab:blue", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan",
               "gold", "navy", "teal", "salmon", "black"]
    others = [p for p in sorted(set(providers)) if p not in fixed]
    return {**fixed, **{p: palette[i % len(palette)] for i, p in enumerate(others)}}


def is_anchor(provider: str) -> bool:
    """The providers ours is judged against: PyTorch's own ops, their torch.compile, Liger."""
    return provider.startswith(("F.", "compile(F.", "liger"))


def plot(rows: list[Row], path: Path, title: str, ceiling_gbps: float | None) -> None:
    """GB/s per provider for each (op, mode, shape, dtype), one panel per op and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r.op, r.mode) for r in rows})
    colours = provider_colours(r.provider for r in rows)
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 3.2 * len(panels)), squeeze=False)
    for ax, (op, mode) in zip(axes[:, 0], panels):
        sub = [r for r in rows if r.op == op and r.mode == mode and r.gbps]
        cases = sorted({(r.shape, r.dtype) for r in sub})
        providers = sorted({r.provider for r in sub})
        width = 0.8 / max(1, len(providers))
        for i, prov in enumerate(providers):
            vals = [next((r.gbps for r in sub if (r.shape, r.dtype) == c and r.provider == prov), 0) for c in cases]
            ax.bar([j + i * width for j in range(len(cases))], vals, width, label=prov, color=colours[prov])
        if ceiling_gbps:
            ax.axhline(ceiling_gbps, color="k", linestyle="--", linewidth=1, label="copy")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
        ax.set_xticklabels([f"{s}\n{d}" for s, d in cases], fontsize=7)
        ax.set_ylabel("GB/s")
        ax.set_title(f"{op} {mode}", fontsize=9)
        ax.legend(fontsize=6, ncol=4)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def speed_ratios(rows: list[Row], ours: str = "ofa") -> dict[tuple[str, str], dict[tuple[str, str], float]]:
    """(op, mode) -> (shape, dtype) -> best anchor's ms / ours' ms (above 1: ours is faster)."""
    out: dict = {}
    for r in rows:
        if r.provider != ours or not r.ms:
            continue
        anchors = [a.ms for a in rows if is_anchor(a.provider) and a.ms and
                   (a.op, a.mode, a.shape, a.dtype) == (r.op, r.mode, r.shape, r.dtype)]
        if anchors:
            out.setdefault((r.op, r.mode), {})[(r.shape, r.dtype)] = min(anchors) / r.ms
    return out


def heatmap(rows: list[Row], path: Path, title: str) -> None:
    """Ours against the best anchor in every cell of the grid: one row per (op, mode), one column per
    (shape, dtype); red below 1 (slower), green above."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = speed_ratios(rows)
    if not ratios:
        return
    lines = sorted(ratios)
    cells = sorted({c for per in ratios.values() for c in per})
    grid = [[ratios[line].get(c, float("nan")) for c in cells] for line in lines]
    fig, ax = plt.subplots(figsize=(1.1 * len(cells) + 2.5, 0.45 * len(lines) + 1.8))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.5, vmax=1.5, aspect="auto")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if v == v:  # not NaN
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(cells)))
    ax.set_xticklabels([f"{s}\n{d}" for s, d in cells], fontsize=7)
    ax.set_yticks(range(len(lines)))
    ax.set_yticklabels([f"{op} {mode}" for op, mode in lines], fontsize=7)
    fig.colorbar(image, ax=ax, label="best anchor ms / ours ms")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def tiny_llama():
    """A tiny random-init Llama with sdpa attention and 4 blocks (J needs at least 3): the smoke runs' model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        attn_implementation="sdpa")).eval()
