"""Memory for the OFA training step: block checkpointing and the size of the probe passes.

- ``checkpointed_blocks(model)``: every transformer block runs under non-reentrant activation
  checkpointing (its input is kept, its internals are recomputed in the backward). The blocks'
  forward pre-hooks (the state taps and probe perturbations of ``objectives``) run outside the
  checkpointed region, so nothing is recorded or perturbed twice. Unlike HF's
  ``gradient_checkpointing_enable`` it also works in eval mode, which OFA needs (no dropout).
- ``probes_per_pass``: how many probes one perturbed pass may carry under a memory budget, from
  the measured cost of the clean pass.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Callable, ContextManager, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .anatomy import structure


_local = threading.local()  # per thread: checkpointing suspended, and a context to recompute under


@contextlib.contextmanager
def recompute_under(factory: Callable[[], ContextManager] | None) -> Iterator[None]:
    """Blocks checkpointed inside this context recompute under ``factory()`` (e.g. the plain-attention
    mode a pass ran under); ``None`` suspends checkpointing instead (forward-mode passes)."""
    saved = getattr(_local, "factory", False)
    _local.factory = factory
    try:
        yield
    finally:
        _local.factory = saved


@contextlib.contextmanager
def checkpointed_blocks(model: nn.Module) -> Iterator[None]:
    """Within the block, every block of ``model`` is checkpointed (when gradients are recorded)."""
    patched = []
    for block in structure(model).blocks:
        if "forward" in block.__dict__:  # already wrapped (nested use): leave it
            continue
        forward = block.forward

        def run(*args, _forward=forward, **kwargs):
            factory = getattr(_local, "factory", False)
            if not torch.is_grad_enabled() or factory is None:
                return _forward(*args, **kwargs)
            # No RNG state to keep (eval mode: no dropout; probes come from counters), and stashing
            # it is not allowed while a CUDA graph is captured.
            if factory is False:
                return checkpoint(_forward, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, preserve_rng_state=False,
                              context_fn=lambda: (contextlib.nullcontext(), factory()), **kwargs)

        block.forward = run
        patched.append(block)
    try:
        yield
    finally:
        for block in patched:
            del block.__dict__["forward"]


# The lean step pays where a step is large and costs time where it is launch-bound: on by default from
# this many tokens per pass (the choice, from RESULTS.md "One OFA training step at the Llama-2-7B shape").
LEAN_FROM_TOKENS = 1024


def use_lean_step(device: torch.device, tokens: int, max_memory_gb: float | None) -> bool:
    """The default for ``memory_efficient=None``: on CUDA when a budget is given or a pass has at
    least ``LEAN_FROM_TOKENS`` tokens; never on CPU (time, not memory, is what runs out there)."""
    return device.type == "cuda" and (max_memory_gb is not None or tokens >= LEAN_FROM_TOKENS)


def probes_per_pass(num_probes: int, per_probe_bytes: float, max_memory_gb: float | None,
                    device: torch.device) -> int:
    """Probes per perturbed pass so that the pass fits ``max_memory_gb`` (all probes when no budget or on CPU).

    ``per_probe_bytes`` is the measured activation peak of the clean pass over the same batch; a
    checkpointed perturbed pass of k probes is budgeted at twice that per probe (forward plus the
    recompute of one block in the backward).
    """
    if max_memory_gb is None or device.type != "cuda":
        return num_probes
    free = max_memory_gb * 2**30 - torch.cuda.memory_allocated(device)
    fit = math.floor(free / max(1.0, 2.0 * per_probe_bytes))
    return max(1, min(num_probes, fit))
