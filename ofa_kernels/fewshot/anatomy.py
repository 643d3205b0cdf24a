"""A decoder's anatomy as OFA reads it: blocks, base, head, norms, post-attention gains, and states.

The one place that knows how a Hugging Face causal LM is put together (every other module asks here):
- ``structure(model)``: the block list (the longest ModuleList of one class), the module that owns
  it (the "base": embeddings, blocks, final norm; returns the last hidden state), the LM head and
  the attention implementation.
- ``preconditioner_norm`` finds the norm of block t whose gain gamma_t is OFA's preconditioner
  P_t = diag(gamma_t) (see there); which modules are norms, the kernel floor's ``patch.py`` says.
- ``norm_parameters``: the fused norms' weights and biases by name (what OFA trains).
- ``StateTap`` / ``last_token_states``: one pass of the base that records ``H_0 .. H_L`` at chosen
  positions (each block's input, optionally transformed: the probe perturbations), never the full
  ``[B, T, d]`` states of every block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from ..nn import FusedLayerNorm, FusedRMSNorm
from ..patch import is_norm, rms_kind

POST_ATTENTION_NORM_NAMES = ("post_attention_layernorm", "ln_2", "post_attention_norm", "ffn_norm", "norm2")

__all__ = ["POST_ATTENTION_NORM_NAMES", "StateTap", "Structure", "base_output", "block_input", "input_batch",
           "last_positions", "last_token_states", "norm_parameters", "preconditioner_norm", "preconditioners",
           "structure", "with_block_input"]


# ------------------------------------------------------------------------------------------ norms


def norm_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights (and biases) of the model's fused norms, by qualified name."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, (FusedRMSNorm, FusedLayerNorm)):
            for pname, p in module.named_parameters(recurse=False):
                out[f"{name}.{pname}" if name else pname] = p
    return out


# -------------------------------------------------------------------------------------- structure


@dataclass
class Structure:
    base: nn.Module  # runs embeddings, blocks and the final norm; returns the last hidden state
    blocks: list[nn.Module]
    head: nn.Module | None  # output embeddings (LM head)
    attn: str  # the attention implementation ("sdpa", "eager", "flash_attention_2", ...)


def structure(model: nn.Module) -> Structure:
    """Finds the block list (the longest ModuleList of one class) and the module that owns it."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise ValueError(f"found no list of transformer blocks in {type(model).__name__}")
    owner_name = best[0].rpartition(".")[0]
    base = model.get_submodule(owner_name) if owner_name else model
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    attn = getattr(config, "_attn_implementation", None) or "eager"
    return Structure(base, list(best[1]), head, attn)


def preconditioner_norm(block: nn.Module) -> nn.Module:
    """The norm of ``block`` whose gain is OFA's P_t = diag(gamma_t).

    The paper reads block t as Z_{t+1} = Z_t - P_t grad L(Z_t): P_t scales the block's update.
    - Pre-norm blocks (Llama, Qwen2/3, Phi-3, GPT-2): no gain scales the update itself; the
      authors take the post-attention norm (the one before the MLP), found by HF's names
      (``POST_ATTENTION_NORM_NAMES``), else the block's second norm.
    - Blocks with a norm on the MLP's output (Gemma 2/3's sandwich norms, OLMo 2's post-norms):
      ``post_feedforward_layernorm``'s gain multiplies the block's last update directly, which is
      the paper's P_t literally; it is chosen. (Gemma's ``post_attention_layernorm`` is the norm on
      the attention's output, not the norm before the MLP that the name means in Llama.)
    """
    last = getattr(block, "post_feedforward_layernorm", None)
    if last is not None and is_norm(last):
        return last
    for name in POST_ATTENTION_NORM_NAMES:
        module = getattr(block, name, None)
        if module is not None and is_norm(module):
            return module
    norms = [m for m in block.modules() if is_norm(m)]
    if len(norms) < 2:
        raise ValueError(f"block {type(block).__name__} has no recognisable post-attention norm")
    return norms[1]


def preconditioners(model: nn.Module) -> list[Tensor]:
    """Each block's ``gamma_t`` (``preconditioner_norm``'s gain, offset included) as detached fp32 copies.

    Take these once from the original model and pass them to ``sharpness`` while training.
    """
    gammas = []
    for block in structure(model).blocks:
        norm = preconditioner_norm(block)
        kind = rms_kind(norm)
        offset = kind[1] if kind else 0.0
        weight = norm.weight.detach()
        if hasattr(weight, "full_tensor"):  # a sharded (FSDP2) parameter: every rank gathers the whole gain
            weight = weight.full_tensor()
        gammas.append(weight.float().clone() + offset)
    return gammas


# ----------------------------------------------------------------------------------- recording


def input_batch(batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
    """(input_ids, attention_mask) of a batch dictionary. A missing mask (None) means every token is real;
    it is passed to the model as None, which needs no look at the mask's values."""
    if "input_ids" not in batch:
        raise ValueError("batch must hold 'input_ids' (and 'attention_mask')")
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    if mask is not None and mask.shape != ids.shape:
        raise ValueError(f"batch['attention_mask'] has shape {tuple(mask.shape)}, expected {tuple(ids.shape)}")
    return ids, mask


def positions_of(input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Each sequence's last real token: from the mask, or the last column when there is none."""
    if attention_mask is None:
        return torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, dtype=torch.long, device=input_ids.device)
    return last_positions(attention_mask)


def last_positions(attention_mask: Tensor) -> Tensor:
    """Index of each row's last real token (works for left and right padding)."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [batch, seq], got shape {tuple(attention_mask.shape)}")
    mask = attention_mask.bool()
    idx = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    pos = torch.where(mask, idx, -1).amax(1)
    if (pos < 0).any():
        raise ValueError(f"attention_mask rows {torch.nonzero(pos < 0).flatten().tolist()} have no real token")
    return pos


def block_input(args: tuple, kwargs: dict) -> Tensor:
    """The hidden states a decoder block was called with (positional or ``hidden_states=``)."""
    return args[0] if args else kwargs["hidden_states"]


def with_block_input(args: tuple, kwargs: dict, y: Tensor) -> tuple[tuple, dict]:
    """A forward pre-hook's return value that calls the block with ``y`` in place of its hidden states."""
    if args:
        return (y,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": y}


def base_output(output) -> Tensor:
    """The last hidden state of a base model's output (a tuple, a ``ModelOutput`` or a tensor)."""
    return output[0] if isinstance(output, (tuple, list)) else getattr(output, "last_hidden_state", output)


class StateTap:
    """Hooks on the blocks that take each block's input at the selected rows (before and after an
    optional ``transform(t, x)`` of that input) and the final hidden state."""

    def __init__(self, st: Structure, positions: Tensor, transform: Callable[[int, Tensor], Tensor] | None):
        self.st, self.pos, self.transform = st, positions, transform
        self.rows = torch.arange(positions.shape[0], device=positions.device)
        n = len(st.blocks)
        self.inputs: list[Tensor | None] = [None] * n
        self.fed: list[Tensor | None] = [None] * n
        self.final: Tensor | None = None
        self.final_full: Tensor | None = None

    def _take(self, h: Tensor) -> Tensor:
        return h[self.rows, self.pos]

    def _pre(self, t: int):
        def hook(module, args, kwargs):
            x = block_input(args, kwargs)
            self.inputs[t] = self._take(x)
            if self.transform is None:
                self.fed[t] = self.inputs[t]
                return None
            y = self.transform(t, x)
            self.fed[t] = self._take(y)
            return with_block_input(args, kwargs, y)
        return hook

    def _post(self, module, args, kwargs, output):
        h = base_output(output)
        self.final_full = h  # [B, T, d]: callers that score other positions (label tokens) read it
        self.final = self._take(h)

    def run(self, input_ids: Tensor, attention_mask: Tensor | None) -> list[Tensor]:
        """Runs the base model; returns ``[H_0, .., H_L]`` at the positions (H_t as block t received it)."""
        handles = [b.register_forward_pre_hook(self._pre(t), with_kwargs=True) for t, b in enumerate(self.st.blocks)]
        handles.append(self.st.base.register_forward_hook(self._post, with_kwargs=True))
        try:
            self.st.base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return list(self.inputs) + [self.final]


def last_token_states(model: nn.Module, batch: Mapping[str, Tensor], positions: Tensor | None = None,
                      *, return_final: bool = False):
    """One forward pass of the model's base; returns ``[H_0, .., H_L]`` at each sequence's last real token.

    Equal to HF's ``output_hidden_states`` taken at those positions, without keeping the full
    ``[B, T, d]`` states or computing logits: ``head(H_L)`` gives the label-position logits, the list
    feeds ``step_ratio`` (``positions=None``) and ``sharpness(clean_states=...)``. ``positions``
    overrides the positions (e.g. the prompt's last token of prompt + label sequences);
    ``return_final`` also returns the full final hidden states ``[B, T, d]`` (for label scoring).
    """
    ids, mask = input_batch(batch)
    tap = StateTap(structure(model), positions_of(ids, mask) if positions is None else positions, None)
    states = tap.run(ids, mask)
    return (states, tap.final_full) if return_final else states
