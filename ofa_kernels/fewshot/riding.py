"""Probe rows that ride in the clean pass: the sharpness probe as K extra tokens per sequence.

S reads each sequence's last real token ``pos`` only. Under causal attention no earlier position
sees that token, so a perturbed copy of it needs nothing but the clean pass's prefix. Each sequence
of ``[B, T]`` is extended by K rows, columns ``T .. T+K-1``; row ``T + k``:
- is a copy of the token at ``pos`` with ``pos``'s position id;
- attends to the sequence's real positions ``0 .. pos-1`` (and, on sliding-window layers, only to
  those ``pos`` itself sees) and to itself; no other row attends to it;
- gets ``s * gamma_t * nu`` added at every probed block's input, with probe k's numbers at the
  counters of ``pos`` in the ``[B, T_layout, d]`` layout (``T_layout``: the width of the batch the
  all-positions estimator would perturb), so it shares the last token's probe with that estimator.

The probes of all probed blocks are drawn in one call before the pass (``K * B`` rows of ``d``
numbers per block, kept: a few KiB) and the dot products are plain tensor ops on them, so nothing
is regenerated in the backward and a step adds a handful of small ops per block to the clean pass.

The clean rows see exactly the keys they see in a plain pass (a row's padded and rider keys are
masked), so their states equal a plain pass's up to the attention kernel's summation order. The
extended batch goes to the model as ``input_ids``, ``position_ids`` and a 4D additive mask (a dict
of masks by layer type for models with sliding-window layers), which HF's ``"sdpa"`` and
``"eager"`` attention take as given; other implementations are refused.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from .. import rng
from .anatomy import Structure, base_output, block_input, with_block_input
from .memory import recompute_under
from ..precision import acc_dtype

MASKABLE_ATTENTION = ("sdpa", "eager")
_GQA_SWITCH = "TRANSFORMERS_SDPA_FORCE_GQA"  # transformers' own switch, read at every attention call


@contextlib.contextmanager
def _grouped_keys_in_sdpa(device: torch.device) -> Iterator[None]:
    """On the CPU, lets HF's sdpa attention hand grouped keys and values to PyTorch's SDPA with the mask
    (``enable_gqa``) instead of repeating them per query head first, as it does whenever a mask is
    given: the repeated copies are what the backward keeps (SmolLM2, 3 key heads for 9: the riding
    pass saved 1.13x the CE step's activations with them, 1.03x without; RESULTS.md). PyTorch's CPU
    flash kernel takes both; on CUDA a mask with grouped heads falls back to the math kernel, so
    nothing changes there."""
    if device.type != "cpu" or os.environ.get(_GQA_SWITCH) is not None:
        yield
        return
    os.environ[_GQA_SWITCH] = "1"
    try:
        yield
    finally:
        os.environ.pop(_GQA_SWITCH, None)

__all__ = ["MASKABLE_ATTENTION", "RiderProbes", "RidingBatch", "RidingTap", "check_attention", "riding_batch"]


def check_attention(st: Structure) -> None:
    """Refuses attention implementations that cannot take the riding rows' 4D mask."""
    if st.attn not in MASKABLE_ATTENTION:
        raise ValueError(f'probe_rows="last" needs attention that takes a 4D mask, but the model uses '
                         f'attn_implementation={st.attn!r}; load it with attn_implementation="sdpa" (or "eager"), '
                         'e.g. model.set_attn_implementation("sdpa"), or use probe_rows="all"')


@dataclass
class RidingBatch:
    """The extended batch: ``[B, T + K]`` ids and position ids, the mask(s), the widths."""

    input_ids: Tensor
    position_ids: Tensor
    attention_mask: Tensor | dict[str, Tensor]
    width: int  # T, the clean rows
    riders: int  # K


def _layer_windows(config) -> dict[str, int | None]:
    """The mask each layer type needs: None for full attention, the window for sliding layers."""
    types = getattr(config, "layer_types", None)
    if not types or "sliding_attention" not in types:
        return {}
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"the model has sliding-window layers but config.sliding_window is {window!r}")
    return {kind: (window if kind == "sliding_attention" else None) for kind in sorted(set(types))}


def riding_batch(input_ids: Tensor, attention_mask: Tensor | None, positions: Tensor, riders: int, dtype: torch.dtype,
                 config=None) -> RidingBatch:
    """``input_ids`` [B, T] with ``riders`` copies of each sequence's token at ``positions`` appended.

    Built by tensor ops only (nothing read back to the host: a captured step can rebuild it).
    ``dtype``: the model's dtype (the additive mask's). ``config``: the model's config, for its
    sliding-window layers (``layer_types``, ``sliding_window``).
    """
    if riders < 1:
        raise ValueError(f"riders must be >= 1, got {riders}")
    B, T = input_ids.shape
    device = input_ids.device
    R = T + riders
    rows = torch.arange(B, device=device)
    pos = positions.to(device)
    ids = torch.cat([input_ids, input_ids[rows, pos][:, None].expand(B, riders)], 1)
    clean_ids = torch.arange(T, device=device).expand(B, T)  # HF's own position ids for a plain pass
    position_ids = torch.cat([clean_ids, pos[:, None].expand(B, riders)], 1)
    real = (torch.ones(B, T, dtype=torch.bool, device=device) if attention_mask is None
            else attention_mask.to(device).bool())
    i = torch.arange(R, device=device)[:, None]
    j = torch.arange(R, device=device)[None, :]
    key_is_clean = (j < T)[None]  # [1, R, R]
    key_real = torch.cat([real, torch.zeros(B, riders, dtype=torch.bool, device=device)], 1)[:, None, :]  # [B, 1, R]
    clean_rows = (i < T)[None] & key_is_clean & (j <= i)[None]
    rider_rows = (i >= T)[None] & key_is_clean & (j < pos[:, None, None])
    allowed = ((clean_rows | rider_rows) & key_real) | (i == j)[None]  # [B, R, R]; every row sees itself

    def additive(window: int | None) -> Tensor:
        keep = allowed
        if window is not None:
            qpos, kpos = position_ids[:, :, None], position_ids[:, None, :]
            keep = keep & ((qpos - kpos < window) | (i == j)[None])
        zero = torch.zeros((), dtype=dtype, device=device)
        return torch.where(keep, zero, torch.finfo(dtype).min)[:, None]  # [B, 1, R, R]

    windows = _layer_windows(config) if config is not None else {}
    mask = {kind: additive(w) for kind, w in windows.items()} if windows else additive(None)
    return RidingBatch(ids, position_ids, mask, T, riders)


@dataclass
class RiderProbes:
    """What the rider rows' perturbation needs: the probed blocks, their gains, the probe stream and step."""

    layers: list[int]
    gammas: list[Tensor]
    seed: int | Tensor
    first_probe: int
    num_probes: int  # K, the riders per sequence
    distribution: str
    eps: float
    scale_by_rms: bool
    probe: Tensor  # [K * B] probe index of each rider row (probe-major)
    base: Tensor  # [K * B] counter base: pos's row in the [B, T_layout, d] layout (row_offset included)

    def draw(self, width: int, dtype: torch.dtype, device) -> Tensor:
        """The unit probes of every probed block at the rider rows, ``[len(layers), K * B, width]`` in
        ``dtype``: one generator call, the numbers ``ops.probe.perturb`` draws at those counters."""
        keys = torch.stack([rng.key_table(self.seed, t, self.first_probe, self.num_probes, device)
                            for t in self.layers])  # [layers, K, 2]
        rows = keys[:, self.probe.to(device)]  # [layers, K * B, 2]
        counters = self.base.to(device)[:, None] + torch.arange(width, device=device)  # [K * B, width]
        nu = rng.values(counters[None], rows[..., 0:1], rows[..., 1:2], self.distribution, torch.float32)
        return nu.to(dtype)


class RidingTap:
    """Hooks that record, in one pass of the extended batch, each block's input at the clean rows'
    ``positions`` and at the rider rows (before and after their perturbation), and the final state.

    ``clean[t]``: [B, d]; ``rider_in[t]`` / ``rider_fed[t]``: [K * B, d] (probe-major: rider k of
    sequence b is row ``k * B + b``); ``scales[t]``: [K * B] steps of the probed blocks;
    ``final_full``: the final hidden states of the clean rows, [B, T, d]. After the run, ``q(t, ...)``
    gives block t's terms.
    """

    def __init__(self, st: Structure, positions: Tensor, batch: RidingBatch, probes: RiderProbes):
        self.st, self.batch, self.probes = st, batch, probes
        self.pos = positions
        self.rows = torch.arange(positions.shape[0], device=positions.device)
        n = len(st.blocks)
        self.clean: list[Tensor | None] = [None] * (n + 1)
        self.rider_in: list[Tensor | None] = [None] * (n + 1)
        self.rider_fed: dict[int, Tensor] = {}
        self.scales: dict[int, Tensor] = {}
        self.nu: dict[int, Tensor] = {}
        self.final_full: Tensor | None = None

    def _riders(self, h: Tensor) -> Tensor:
        T, K = self.batch.width, self.batch.riders
        return h[:, T:].transpose(0, 1).reshape(K * h.shape[0], h.shape[-1])

    def _perturb(self, t: int, x: Tensor) -> Tensor:
        pr, T, K = self.probes, self.batch.width, self.batch.riders
        acc = acc_dtype(x.dtype)
        if not self.nu:  # every block's probes in one call, at the first probed block
            drawn = pr.draw(x.shape[-1], acc, x.device)
            self.nu = dict(zip(pr.layers, drawn, strict=True))
        rows = self._riders(x)
        if pr.scale_by_rms:
            rms = rows.detach().to(acc).pow(2).mean(-1).sqrt()
            scale = pr.eps * torch.where(rms > 0, rms, torch.ones_like(rms))
        else:
            scale = torch.full((rows.shape[0],), pr.eps, dtype=acc, device=x.device)
        noise = scale[:, None] * pr.gammas[t].to(device=x.device, dtype=acc) * self.nu[t]
        fed = (rows.to(acc) + noise).to(x.dtype)
        self.rider_fed[t], self.scales[t] = fed, scale
        B = x.shape[0]
        return torch.cat([x[:, :T], fed.view(K, B, -1).transpose(0, 1)], 1)

    def q(self, t: int, clean_next: Tensor, clean_in: Tensor) -> Tensor:
        """Block t's terms ``-nu . ((H~_{t+1} - X~_t) - (H_{t+1} - H_t)) / s`` at the rider rows, [K * B],
        in fp32 (fp64 for fp64); ``clean_next``, ``clean_in``: the clean ``H_{t+1}``, ``H_t`` at pos."""
        nu, scale = self.nu[t], self.scales[t]
        acc = nu.dtype
        rider = self.rider_in[t + 1].to(acc) - self.rider_fed[t].to(acc)
        clean = (clean_next.to(acc) - clean_in.to(acc)).repeat(self.batch.riders, 1)
        return -(nu * (rider - clean)).sum(-1) / scale

    def _pre(self, t: int) -> Callable:
        def hook(module, args, kwargs):
            x = block_input(args, kwargs)
            self.clean[t] = x[self.rows, self.pos]
            self.rider_in[t] = self._riders(x)
            if t not in self.probes.layers:
                return None
            return with_block_input(args, kwargs, self._perturb(t, x))
        return hook

    def _post(self, module, args, kwargs, output):
        h = base_output(output)
        self.final_full = h[:, :self.batch.width]
        self.clean[-1] = h[self.rows, self.pos]
        self.rider_in[-1] = self._riders(h)

    def run(self, base: nn.Module) -> list[Tensor]:
        """Runs ``base`` on the extended batch; returns the clean ``[H_0, .., H_L]`` at the positions."""
        blocks = self.st.blocks
        handles = [b.register_forward_pre_hook(self._pre(t), with_kwargs=True) for t, b in enumerate(blocks)]
        handles.append(base.register_forward_hook(self._post, with_kwargs=True))
        try:
            device = self.batch.input_ids.device
            # checkpointed blocks recompute under the same switch (else their saved shapes differ)
            with _grouped_keys_in_sdpa(device), recompute_under(lambda: _grouped_keys_in_sdpa(device)):
                base(input_ids=self.batch.input_ids, attention_mask=self.batch.attention_mask,
                     position_ids=self.batch.position_ids, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return list(self.clean)
