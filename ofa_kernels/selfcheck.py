"""``ofa check``: the fused norms in a real model, end to end, in under a minute on a CPU.

Loads SmolLM2-135M-Instruct (see ``models.py``), patches its 61 RMSNorms, and reports: the
largest logit and norm-gradient differences against the unpatched model, the model's zero-shot
answer on two reviews either way, a second-order (Hessian-vector) product through every norm, and
the time of a forward+backward and of a norm-level double backward against eager PyTorch.
"""

from __future__ import annotations

import time

import torch

from . import patch_model, unpatch_model
from .ops import rms_norm
from .reference import rms_norm_ref

_PROMPTS = ["Review: a gripping, funny and moving film.\nSentiment:", "Review: dull, long and lifeless.\nSentiment:"]


def _forward_backward(model, batch, label_ids):
    model.zero_grad(set_to_none=True)
    logits = model(**batch).logits[:, -1]
    loss = torch.nn.functional.cross_entropy(logits[:, label_ids], torch.tensor([1, 0], device=logits.device))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if "norm" in n and p.grad is not None}
    return logits.detach(), grads


def _timed(fn, repeats: int = 3) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def _norm_double_backward_ms(device: str, backend: str | None, rows: int = 512, width: int = 576) -> dict[str, float]:
    """Forward + backward + double backward (an HVP through the norm) at the SmolLM2 width."""
    x = torch.randn(rows, width, device=device, requires_grad=True)
    w = (torch.rand(width, device=device) + 0.5).requires_grad_()
    v = torch.randn(rows, width, device=device)

    def hvp(f):
        def run():
            (g,) = torch.autograd.grad(f(x, w).square().sum(), [x], create_graph=True)
            torch.autograd.grad((g * v).sum(), [x, w])
        return run

    return {
        "fused": _timed(hvp(lambda a, b: rms_norm(a, b, backend=backend))),
        "eager (HF-style)": _timed(hvp(lambda a, b: rms_norm_ref(a, b))),
        "F.rms_norm": _timed(hvp(lambda a, b: torch.nn.functional.rms_norm(a, (width,), b, 1e-6))),
    }


def run_selfcheck(device: str = "cpu", backend: str | None = None) -> int:
    import os

    from .models import load_smollm2

    if backend:
        os.environ["OFA_BACKEND"] = backend
    t0 = time.perf_counter()
    model, tokenizer = load_smollm2(torch.float32, device)
    model.requires_grad_(True)
    print(f"loaded SmolLM2-135M-Instruct in {time.perf_counter() - t0:.1f} s")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(_PROMPTS, return_tensors="pt", padding=True).to(device)
    label_ids = [tokenizer.encode(" negative")[0], tokenizer.encode(" positive")[0]]

    want_logits, want_grads = _forward_backward(model, batch, label_ids)
    t_eager = _timed(lambda: _forward_backward(model, batch, label_ids))
    names = patch_model(model)
    got_logits, got_grads = _forward_backward(model, batch, label_ids)
    t_fused = _timed(lambda: _forward_backward(model, batch, label_ids))

    # An HVP through every norm of the real model: d/dw of <grad_w L, 1>. Fused attention kernels
    # have no double backward, so attention runs on the math backend here.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params = [p for n, p in model.named_parameters() if "norm" in n]
    with sdpa_kernel(SDPBackend.MATH):
        loss = model(**batch).logits[:, -1, label_ids].logsumexp(-1).sum()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        hvp = torch.autograd.grad(sum(g.sum() for g in grads), params)
    unpatch_model(model)

    logit_diff = (got_logits - want_logits).abs().max().item()
    grad_diff = max((got_grads[n] - want_grads[n]).abs().max().item() for n in want_grads)
    answers = ["positive" if row[label_ids[1]] > row[label_ids[0]] else "negative" for row in got_logits]
    print(f"patched {len(names)} norms ({names[0]} ... {names[-1]})")
    print(f"max |logit diff| {logit_diff:.2e}, max |norm-grad diff| {grad_diff:.2e} over {len(want_grads)} weights")
    print(f"zero-shot answers: {answers} (expected ['positive', 'negative'])")
    print(f"HVP through all norms: finite={all(torch.isfinite(h).all().item() for h in hvp)}, "
          f"|HVP|={sum(h.square().sum() for h in hvp).sqrt().item():.3e}")
    print(f"model forward+backward: eager {t_eager:.0f} ms, patched {t_fused:.0f} ms")
    print("norm fwd+bwd+double-bwd at 512x576 (ms): " + ", ".join(
        f"{k} {v:.1f}" for k, v in _norm_double_backward_ms(device, backend).items()))
    ok = logit_diff < 1e-3 and grad_diff < 1e-3 and answers == ["positive", "negative"]
    print("check passed" if ok else "check FAILED")
    return 0 if ok else 1
