"""Data parallelism through Hugging Face Accelerate or torchrun: ``accelerate launch ... -m ofa_kernels.fewshot.cli adapt``.

Each rank builds the whole epoch batch (every random choice is a function of the seed and the
epoch, so all ranks agree), pads it to one width, and trains on its contiguous block of rows; the
probes of the sharpness term are drawn for the rows' places in the whole batch (``row_offset``), so
the ranks together compute exactly the single-process loss. The trainable gradients (norm weights:
~0.3M numbers on a 7B model) are summed across ranks with weights ``rows_r / rows`` in one
all-reduce (Accelerate's ``reduce``; gloo on CPU, NCCL on GPUs). Only rank 0 evaluates and writes.

With ``--fsdp`` no rank holds the whole model: ``load_sharded`` builds it on the meta device,
shards it (FSDP2), and fills each rank's shards from the Hugging Face safetensors files through
``torch.distributed.checkpoint``'s Hugging Face reader, which reads only the slices the rank owns.
Checkpoints of such a run are distributed checkpoints (``save_sharded_state``/``load_sharded_state``):
each rank writes and reads its own shards of the trainable norms and their optimizer state.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .anatomy import structure
from ..nn import FusedLayerNorm, FusedRMSNorm
from ..patch import patch_model, use_fp32_masters


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


def shard_model(model: nn.Module, par: Parallel, device: torch.device) -> torch.device:
    """FSDP2: shards the blocks' parameters and every norm across the ranks (each fused norm in its own
    group, so the fp32 trainable norms and the frozen low-precision weights are gathered
    separately) under one root, the model's trunk, placing the shards on this rank's device (``cuda:LOCAL_RANK`` with GPUs, else the
    CPU); returns that device. The embedding and LM head (a few % of a 7B model, often tied, and
    called apart from the model's forward here) stay replicated on every rank. A model on the meta
    device stays there (``load_sharded`` materialises and fills it)."""
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
    # One root over the trunk: FSDP2 keeps a root's parameters gathered after its forward, so without it every
    # block (each its own root) would stay whole after a forward. Its own parameters (the embedding, often tied
    # to the head) are left out and replicated.
    fully_shard(st.base, mesh=mesh, ignored_params={p for p in st.base.parameters() if not hasattr(p, "full_tensor")})
    if next(model.parameters()).device.type != "meta":
        model.to(device)  # what is not sharded: embedding, head, rotary buffers
    return device


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 has sharded ``model``'s parameters (they are DTensors)."""
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def load_sharded(folder: str | Path, dtype: torch.dtype | str, par: Parallel, device: torch.device
                 ) -> tuple[nn.Module, torch.device]:
    """(model, device): a Hugging Face model folder loaded straight into FSDP2 shards.

    The model is built on the meta device (buffers real), its norms patched and kept in fp32, the
    blocks and norms sharded as ``shard_model`` does; then each rank allocates only its shards (and
    the replicated embedding and head) and reads them from the folder's safetensors files (one file
    or ``model-0000x-of-0000y.safetensors``). No rank holds the whole model at any time.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    if not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(f"{folder} holds no .safetensors files: sharded loading (--fsdp) reads a Hugging "
                                "Face folder saved as safetensors")
    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=None if dtype == "auto" else dtype)
    model.eval()
    patch_model(model)
    use_fp32_masters(model)
    device = shard_model(model, par, device)
    buffers = {name: b for name, b in model.named_buffers()}  # computed at build time (rotary frequencies)
    model.to_empty(device=device)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    _fill_from_safetensors(model, folder)
    return model, device


def _fill_from_safetensors(model: nn.Module, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp

    state = model.state_dict()
    reader = dcp.HuggingFaceStorageReader(str(folder))
    stored = set(reader.read_metadata().state_dict_metadata)
    by_tensor: dict[int, list[str]] = {}
    for name, t in state.items():
        by_tensor.setdefault(id(t), []).append(name)
    missing = [n for n, t in state.items() if n not in stored and not any(o in stored for o in by_tensor[id(t)])]
    if missing:
        raise ValueError(f"{folder}: the checkpoint has no tensors named {missing[:3]} (of {len(missing)}); sharded "
                         "loading needs the safetensors names to match the model's (run without --fsdp to let "
                         "transformers convert them)")
    dcp.load({n: t for n, t in state.items() if n in stored}, storage_reader=reader)


def save_sharded_state(folder: Path, params: dict[str, torch.Tensor], model: nn.Module,
                       optimizer: torch.optim.Optimizer, extra: dict, par: Parallel) -> None:
    """A distributed checkpoint of the trainable (sharded) parameters and their optimizer state, plus
    ``extra`` (plain values, written by rank 0), replacing ``folder`` only once it is complete."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    partial = folder.with_name(folder.name + ".partial")
    if par.is_main:
        shutil.rmtree(partial, ignore_errors=True)
    dist.barrier()
    dcp.save({"params": dict(params), "optimizer": get_optimizer_state_dict(model, optimizer)},
             checkpoint_id=str(partial))
    if par.is_main:
        torch.save(extra, partial / "trainer_state.pt")
        old = folder.with_name(folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)  # left by a run killed between the two renames below
        if folder.exists():
            os.replace(folder, old)
        os.replace(partial, folder)  # the complete checkpoint appears in one step
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def read_sharded_extra(folder: Path) -> dict:
    """The plain values of a distributed checkpoint (``extra`` of ``save_sharded_state``)."""
    return torch.load(folder / "trainer_state.pt", weights_only=True)


def load_sharded_state(folder: Path, params: dict[str, torch.Tensor], model: nn.Module,
                       optimizer: torch.optim.Optimizer) -> None:
    """Fills the trainable parameters (in place) and the optimizer from ``save_sharded_state``'s folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = {"params": dict(params), "optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=str(folder))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded (DTensor) parameter; plain tensors as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0, or the only process (read from the launcher's environment; creates no process group)."""
    return int(os.environ.get("RANK", "0")) == 0


def finish() -> None:
    """Ends a run of several processes that succeeded: waits for every rank, then destroys the process
    groups while the interpreter is still whole. A rank that exits with its gloo group alive can abort
    at exit ("terminate called without an active exception") after its work is done. Call it only on
    success: a rank that failed would leave the others waiting in the barrier. No-op in one process."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()  # sharded modules and meshes that went out of scope release the groups they hold
        dist.barrier()
        dist.destroy_process_group()


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
