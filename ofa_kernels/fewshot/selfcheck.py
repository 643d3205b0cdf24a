"""``ofa check``: the fused norms in a real model, end to end (SmolLM2: under a minute on a CPU).

Loads a model (``models.load_model``: a named model or any HF causal-LM folder; default SmolLM2),
patches its norms, and reports: the largest logit and norm-gradient differences against the
unpatched model, the model's zero-shot answer on two reviews either way, a second-order
(Hessian-vector) product through every norm, and the time of a forward+backward and of a
norm-level double backward against eager PyTorch.

It passes when the patched model gives the unpatched one's answers, its logits agree within
``LOGIT_BOUND`` of the largest logit, its norm gradients within ``GRAD_BOUND`` of the largest one,
and the HVP is finite. The bounds are relative because the two sides round differently (HF norms
compute in fp32 and cast; the fused ones in one pass), and a model's scale sets what a rounding
difference is worth: ``benchmarks/RESULTS.md`` ("Gemma 3 270M") gives the figures.
"""

from __future__ import annotations

import time

import torch

from ..ops import rms_norm, use_backend
from ..patch import patch_model, unpatch_model
from ..reference import rms_norm_ref

LOGIT_BOUND = 1e-5  # max |patched - unpatched logit| / max |logit|
GRAD_BOUND = 1e-4  # max |patched - unpatched norm grad| / max |norm grad|

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


def _norm_double_backward_ms(device: str, backend: str | None, width: int, rows: int = 512) -> dict[str, float]:
    """Forward + backward + double backward (an HVP through the norm) at the model's width."""
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


def run_selfcheck(device: str = "cpu", backend: str | None = None, model_name: str = "smollm2") -> int:
    """Runs the check on ``model_name`` and prints it; returns 0 when it passes, 1 when not. ``backend``
    holds for the check only (``use_backend``): the environment is left as it was."""
    if not backend:
        return _run(device, backend, model_name)
    with use_backend(backend):
        return _run(device, backend, model_name)


def _run(device: str, backend: str | None, model_name: str) -> int:
    from .models import load_model
    from .prompts import padding_id

    t0 = time.perf_counter()
    model, tokenizer = load_model(model_name, torch.float32, device)
    model.requires_grad_(True)
    print(f"loaded {model_name} ({type(model).__name__}) in {time.perf_counter() - t0:.1f} s")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token_id = padding_id(tokenizer)
    batch = tokenizer(_PROMPTS, return_tensors="pt", padding=True).to(device)
    label_ids = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" negative", " positive")]

    want_logits, want_grads = _forward_backward(model, batch, label_ids)
    want_answers = _answers(want_logits, label_ids)
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

    logit_diff = (got_logits - want_logits).abs().max().item() / want_logits.abs().max().item()
    grad_scale = max(g.abs().max().item() for g in want_grads.values())
    grad_diff = max((got_grads[n] - want_grads[n]).abs().max().item() for n in want_grads) / grad_scale
    answers = _answers(got_logits, label_ids)
    finite = all(torch.isfinite(h).all().item() for h in hvp)
    print(f"patched {len(names)} norms ({names[0]} ... {names[-1]})")
    print(f"max |logit diff| / max |logit| {logit_diff:.2e} (bound {LOGIT_BOUND:.0e}), max |norm-grad diff| / "
          f"max |norm grad| {grad_diff:.2e} (bound {GRAD_BOUND:.0e}) over {len(want_grads)} weights")
    print(f"zero-shot answers: patched {answers}, unpatched {want_answers}")
    print(f"HVP through all norms: finite={finite}, |HVP|={sum(h.square().sum() for h in hvp).sqrt().item():.3e}")
    print(f"model forward+backward: eager {t_eager:.0f} ms, patched {t_fused:.0f} ms")
    width = model.get_input_embeddings().embedding_dim
    print(f"norm fwd+bwd+double-bwd at 512x{width} (ms): " + ", ".join(
        f"{k} {v:.1f}" for k, v in _norm_double_backward_ms(device, backend, width).items()))
    ok = logit_diff <= LOGIT_BOUND and grad_diff <= GRAD_BOUND and answers == want_answers and finite
    print("check passed" if ok else "check FAILED")
    return 0 if ok else 1


def _answers(logits: torch.Tensor, label_ids: list[int]) -> list[str]:
    return ["positive" if row[label_ids[1]] > row[label_ids[0]] else "negative" for row in logits]
