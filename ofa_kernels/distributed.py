"""Data parallelism through Hugging Face Accelerate: ``accelerate launch ... -m ofa_kernels.cli adapt``.

Each rank builds the whole epoch batch (every random choice is a function of the seed and the
epoch, so all ranks agree), pads it to one width, and trains on its contiguous block of rows; the
probes of the sharpness term are drawn for the rows' places in the whole batch (``row_offset``), so
the ranks together compute exactly the single-process loss. The trainable gradients (norm weights:
~0.3M numbers on a 7B model) are summed across ranks with weights ``rows_r / rows`` in one
all-reduce (Accelerate's ``reduce``; gloo on CPU, NCCL on GPUs). Only rank 0 evaluates and writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .anatomy import structure
from .nn import FusedLayerNorm, FusedRMSNorm


@dataclass(frozen=True)
class Parallel:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, rows: int) -> slice:
        """This rank's contiguous block of ``rows`` (sizes differ by at most one)."""
        base, extra = divmod(rows, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """In place: every tensor becomes its sum over ranks (one all-reduce for all of them)."""
        if self.world == 1 or not tensors:
            return
        from accelerate.utils import reduce

        flat = torch.cat([t.reshape(-1) for t in tensors])
        flat = reduce(flat, reduction="sum")
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def shard_model(model, par: Parallel, device: torch.device) -> torch.device:
    """FSDP2: shards the blocks' parameters and every norm across the ranks (each fused norm in its own
    group, so the fp32 trainable norms and the frozen low-precision weights are gathered
    separately), placing the shards on this rank's device (``cuda:LOCAL_RANK`` with GPUs, else the
    CPU); returns that device. The embedding and LM head (a few % of a 7B model, often tied, and
    called apart from the model's forward here) stay replicated on every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard


    if torch.cuda.is_available() and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        mesh = init_device_mesh("cuda", (par.world,))
    else:
        device = torch.device("cpu")
        mesh = init_device_mesh("cpu", (par.world,))
    for module in model.modules():
        if isinstance(module, (FusedRMSNorm, FusedLayerNorm)) and any(True for _ in module.parameters(recurse=False)):
            fully_shard(module, mesh=mesh)
    st = structure(model)
    for block in st.blocks:
        fully_shard(block, mesh=mesh)
    model.to(device)  # what is not sharded: embedding, head, rotary buffers
    return device


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded (DTensor) parameter; plain tensors as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0, or the only process (read from the launcher's environment; creates no process group)."""
    return int(os.environ.get("RANK", "0")) == 0


def current(device_type: str = "cpu") -> Parallel:
    """This process's place: one process unless launched by ``accelerate launch`` (or torchrun) with more."""
    if launched_processes() <= 1:
        return Parallel()
    try:
        from accelerate import PartialState
    except ImportError as exc:
        raise ImportError("data-parallel runs use accelerate: pip install accelerate") from exc
    state = PartialState(cpu=device_type != "cuda")
    return Parallel(state.process_index, state.num_processes)
