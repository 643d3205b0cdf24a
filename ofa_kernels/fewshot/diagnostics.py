"""Per-layer diagnostics of OFA's reading of a network as an optimiser, for a base and an adapted model.

For each block t, on the prompts' last token (the position the label is predicted from):
- ``step``: ``||H_{t+1} - H_t||``, the size of block t's update (mean over test rows);
- ``ratio``: ``||H_{t+2} - H_{t+1}||^2 / ||H_{t+1} - H_t||^2`` (mean over rows), the terms of J;
- ``sharpness``: ``s_t = mean softplus(q_t)``, block t's term of S ("fd" estimator, K probes,
  on up to ``sharpness_rows`` test rows; block 0 is not probed);
- ``probe_accuracy`` / ``probe_loss``: a linear probe (multinomial logistic regression, L2, fit by
  L-BFGS in fp64 on standardised features) of the label from ``H_t``, fit on the k-shot set and
  scored on the test subset; index L is the final (normed) state.

``layer_report`` computes one model's numbers; ``compare`` runs it for a base model and for the same
model with an adapter loaded, and ``write`` saves JSON and a PNG with the two side by side.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import objectives
from .anatomy import last_token_states
from .data import Example, Task
from .prompts import pad, padding_id, sequences
from .files import atomic_path, write_text


@torch.no_grad()
def _states(model: nn.Module, tokenizer, task: Task, examples: Sequence[Example], batch_size: int) -> torch.Tensor:
    """[L+1, N, d] fp64 states at each prompt's last token."""
    pad_token = padding_id(tokenizer)
    device = next(model.parameters()).device
    chunks = []
    for start in range(0, len(examples), batch_size):
        ids, mask = pad(sequences(tokenizer, [task.prompt(e.text) for e in examples[start:start + batch_size]]),
                        pad_token, device)
        chunks.append(torch.stack(last_token_states(model, {"input_ids": ids, "attention_mask": mask})))
    return torch.cat(chunks, 1).double().cpu()


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 n_classes: int, l2: float = 1e-2, iterations: int = 100) -> tuple[float, float]:
    """(test accuracy, test cross-entropy) of an L2-regularised multinomial logistic regression."""
    mean, std = train_x.mean(0), train_x.std(0, unbiased=False).clamp_min(1e-6)
    xs, xt = (train_x - mean) / std, (test_x - mean) / std
    w = torch.zeros(xs.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xs @ w + b, train_y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        logits = xt @ w + b
        return float((logits.argmax(1) == test_y).double().mean()), float(F.cross_entropy(logits, test_y))


def layer_report(model: nn.Module, tokenizer, task: Task, train: Sequence[Example], test: Sequence[Example], *,
                 num_probes: int = 4, seed: int = 0, sharpness_rows: int = 32, batch_size: int = 16,
                 probe_rows: str = "all") -> dict:
    """One model's per-layer numbers (see the module docstring); lists indexed by block. ``probe_rows``:
    the "fd" estimator's ("all" positions in a second pass, or the "last" token riding in one)."""
    model.eval()
    test_states = _states(model, tokenizer, task, test, batch_size)
    train_states = _states(model, tokenizer, task, train, batch_size)
    steps = (test_states[1:] - test_states[:-1]).norm(dim=-1)  # [L, N]
    ratio = (steps[1:].pow(2) / steps[:-1].pow(2).clamp_min(1e-30)).mean(1)
    rows = list(test[:sharpness_rows])
    ids, mask = pad(sequences(tokenizer, [task.prompt(e.text) for e in rows]), padding_id(tokenizer),
                    next(model.parameters()).device)
    with torch.no_grad():
        q = objectives.sharpness_terms(model, {"input_ids": ids, "attention_mask": mask}, estimator="fd",
                                       num_probes=num_probes, seed=seed, probe_rows=probe_rows)
    per_layer = F.softplus(q.double()).mean((0, 2)).tolist()
    y_train = torch.tensor([e.label for e in train])
    y_test = torch.tensor([e.label for e in test])
    probes = [linear_probe(train_states[t], y_train, test_states[t], y_test, len(task.labels))
              for t in range(test_states.shape[0])]
    return {"step": steps.mean(1).tolist(), "ratio": ratio.tolist(), "sharpness": [None] + per_layer,
            "probe_accuracy": [a for a, _ in probes], "probe_loss": [lo for _, lo in probes],
            "test_rows": len(test), "train_rows": len(train)}


def compare(load, adapter: str | Path, tokenizer_task_data: tuple, **kwargs) -> dict:
    """``{"base": report, "adapted": report}``: ``load()`` gives a fresh base model; the adapter is loaded into it."""
    from .adapters import load_adapter

    tokenizer, task, train, test = tokenizer_task_data
    model = load()
    base = layer_report(model, tokenizer, task, train, test, **kwargs)
    meta = load_adapter(model, adapter)
    adapted = layer_report(model, tokenizer, task, train, test, **kwargs)
    return {"base": base, "adapted": adapted, "adapter": str(adapter), "adapter_task": meta.get("task")}


def write(report: dict, out: str | Path, title: str = "") -> tuple[Path, Path]:
    """``diagnostics.json`` and ``diagnostics.png`` (four panels, base vs adapted) under ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "diagnostics.json", out / "diagnostics.png"
    write_text(json_path, json.dumps(report, indent=1))
    panels = [("step", "||H_{t+1} - H_t||", True), ("ratio", "step ratio term", True),
              ("sharpness", "sharpness s_t", True), ("probe_accuracy", "linear-probe accuracy", False)]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for ax, (key, label, log) in zip(axes, panels):
        for name, style in (("base", "-o"), ("adapted", "-s")):
            values = report[name][key]
            xs = [i for i, v in enumerate(values) if v is not None]
            ax.plot(xs, [values[i] for i in xs], style, markersize=3, label=name)
        ax.set_xlabel("block t")
        ax.set_title(label)
        if log:
            ax.set_yscale("log")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return json_path, png_path
