"""The OFA training step captured as CUDA graphs: one graph per batch shape, replayed every step.

At one sequence per step (the paper's protocol) a step is a few thousand small launches and the
host, not the GPU, sets its time. Captured once, the whole step (clean pass, J, the probe passes,
backward, the AdamW update) replays as one graph launch.

How the pieces stay capturable:
- Inputs: ``prompts.step_batch`` builds every tensor of a step on the host; sequences are padded to
  a multiple of ``BUCKET`` tokens (and the label index to the task's longest label word), so a task
  needs a handful of shapes. Each shape's graph owns static input buffers; a step copies its batch
  into them (device to device) and replays.
- Randomness: the probes' seed is a device scalar that the trainer advances after each step; the
  probe kernels derive their keys from it on the device (``rng.key_table``), so every replay draws
  new probes. Checkpointed blocks keep no RNG state (``memory.checkpointed_blocks``).
- Optimizer: AdamW with ``capturable=True`` and the learning rate as a device tensor that the
  schedule fills before each replay; its state is created before the first capture.
- Memory: all graphs share one memory pool. A graph is self-contained (it reads only its static
  inputs and persistent tensors, writes everything else before reading it, and its outputs are
  copied out right after its replay), so the pool holds the largest step, not the sum of all.
- The double backward (``estimator="hvp"``) and forward-mode passes (``"jvp"``) are captured the same
  way: ``torch.cuda.graph`` records kernels, whatever autograd did to launch them.

Not captured: data-parallel runs (their all-reduce sits between backward and update) and PEFT arms.
"""

from __future__ import annotations

from typing import Callable

import torch

from .options import CUDA_GRAPH_MODES

BUCKET = 64  # sequence widths are padded to a multiple of this many tokens
MODES = CUDA_GRAPH_MODES



def unsupported_reason(device: torch.device, world: int, arm_is_peft: bool) -> str | None:
    """Why a run cannot use captured steps (None: it can)."""
    if device.type != "cuda":
        return f"the model is on {device.type}, not CUDA"
    if world > 1:
        return "data-parallel runs all-reduce between backward and update"
    if arm_is_peft:
        return "PEFT arms train adapter layers outside the captured norm step"
    return None


def init_capturable_state(optimizer: torch.optim.Optimizer) -> None:
    """Creates AdamW's state (step, moments) for every parameter that has none yet, as the first
    ``step`` would: inside a capture it would be created in the graph and zeroed at every replay."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


class CaptureError(RuntimeError):
    """A step's graph could not be captured (its cause is ``__cause__``); replays of graphs already
    captured are unaffected, and the same step can run eagerly."""


def shape_key(batch: dict[str, torch.Tensor]) -> tuple:
    return tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(batch.items()))


class _Recorded:
    """Stands in for ``torch.cuda.CUDAGraph`` off CUDA (tests): "capture" keeps the step and "replay"
    calls it again on the static buffers, so a step that kept a host value of the first batch
    instead of reading its buffers gives the wrong result here as it would in a real graph."""

    def __init__(self, fn: Callable[[], dict]):
        self.fn, self.outputs = fn, {}

    def replay(self) -> None:
        self.outputs.update(self.fn())


class CapturedSteps:
    """Training steps (``step(batch) -> parts``) replayed from one captured graph per batch shape.

    ``step_fn(batch, update)`` runs one step on ``batch`` (forward and backward, and the optimizer
    update when ``update``) and returns its detached loss parts; the warm-up before a capture runs it
    without the update, so the weights only change at replays. ``params`` are the trained parameters
    (their gradients are dropped before each capture, so a graph assigns them instead of adding to
    another graph's). ``emulate`` runs the same bookkeeping without CUDA (tests).
    """

    def __init__(self, step_fn: Callable[[dict, bool], dict[str, torch.Tensor]], params: list[torch.Tensor],
                 device: torch.device, *, warmup: int = 2, emulate: bool = False):
        if device.type != "cuda" and not emulate:
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.step_fn, self.params, self.device, self.warmup, self.emulate = step_fn, params, device, warmup, emulate
        self.graphs: dict[tuple, tuple] = {}  # shape -> (graph, static inputs, static outputs)
        self.pool = None if emulate else torch.cuda.graph_pool_handle()
        self.captured_bytes = 0  # growth of reserved memory over all captures

    def __len__(self) -> int:
        return len(self.graphs)

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One step: copies ``batch`` into its shape's buffers (capturing on a shape's first step), replays.
        Raises ``CaptureError`` when that capture fails; the weights are then untouched (a warm-up never
        updates them and a failed graph never replays)."""
        key = shape_key(batch)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(batch)
            except Exception as exc:
                self._drop_grads()
                raise CaptureError(f"capturing the step for batch shape {dict((k, s) for k, s, _ in key)} failed: "
                                   f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}") from exc
        graph, inputs, outputs = self.graphs[key]
        for name, value in batch.items():
            inputs[name].copy_(value, non_blocking=True)
        graph.replay()
        return {k: v.clone() for k, v in outputs.items()}  # the next replay overwrites them

    def _drop_grads(self) -> None:
        for p in self.params:
            p.grad = None

    def _capture(self, batch: dict[str, torch.Tensor]):
        inputs = {k: v.clone() for k, v in batch.items()}
        if self.emulate:
            graph = _Recorded(lambda: self._drop_grads() or self.step_fn(inputs, True))
            return graph, inputs, graph.outputs
        before = torch.cuda.memory_reserved(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # compiles kernels, sets up cuBLAS workspaces; weights untouched
            for _ in range(self.warmup):
                self._drop_grads()
                self.step_fn(inputs, False)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self._drop_grads()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = self.step_fn(inputs, True)
        self._drop_grads()
        self.captured_bytes += torch.cuda.memory_reserved(self.device) - before
        return graph, inputs, outputs


def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Turns an Adam/AdamW into one whose ``step`` can be captured: ``capturable``, its learning rate a
    device tensor (the schedule fills it; no host value is baked into the graph), its state on the
    device and created now. The schedule must have been built before (its base rates stay floats)."""
    for group in optimizer.param_groups:
        group["capturable"] = True
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
    for p, state in optimizer.state.items():
        if "step" in state:
            state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
    init_capturable_state(optimizer)


def portable_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` as the eager optimizer writes it (float learning rates, steps on the
    host), so a checkpoint resumes with or without CUDA graphs. Reads the device: checkpoints only."""
    saved = optimizer.state_dict()
    groups = [{**g, "lr": float(g["lr"]), "capturable": False} for g in saved["param_groups"]]
    state = {k: {**v, "step": v["step"].detach().float().cpu()} if "step" in v else v for k, v in saved["state"].items()}
    return {"state": state, "param_groups": groups}
