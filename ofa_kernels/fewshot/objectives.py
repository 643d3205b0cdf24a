"""OFA's objective: the CE of the label word, the step ratio J and the sharpness S (three estimators).

Notation (the paper, arXiv 2505.19107, and its authors' code). ``H_0 .. H_L`` are the hidden states
HF returns with ``output_hidden_states`` (``H_t`` is block t's input, ``H_L`` the final norm's
output); ``pos`` is each sequence's last real token; block t's update is ``u_t = H_{t+1} - H_t``;
``P_t = diag(gamma_t)`` with gamma_t block t's post-attention norm weight (GPT-2 ``ln_2``), a
constant taken from the frozen original weights.

- CE (``label_ce``): minus the label word's log-probability after the prompt, averaged over the
  batch: all its tokens (``scoring="full"``, read at the label positions of ``prompts.step_batch``),
  or its first token at the prompt's last position (``"first"``); in fp32, fp64 for fp64 models.
- Step ratio ``J = sum_{i=2}^{L-1} ||H_{i+1} - H_i||^2 / (||H_i - H_{i-1}||^2 + eps)`` at ``pos``, per
  sequence, averaged over the batch, in fp32. Its last ratio's step ``H_L - H_{L-1}`` runs through the
  final norm (HF's ``H_L`` is its output); ``final_norm_step=False`` leaves that ratio out (i up to
  L-2: the steps between block inputs only). The paper's J is the default.
- Sharpness ``S = sum_t mean_{batch, probes} softplus(q_t)`` over the probed blocks (default 1..L-1),
  where ``q_t`` estimates ``tr(P_t H_t P_t)``:

  ``"fd"`` (the authors'): a second pass in which every probed block's input x becomes
  ``x + s * gamma_t * nu_t`` (all blocks in one pass, ``s = eps``, or ``eps * rms(x_row)`` with
  ``eps_scale="rms"``), and ``q_t = -nu_t . ((H~_{t+1} - X~_t) - (H_{t+1} - H_t)) / s`` at pos, with
  ``X~_t`` the perturbed input block t was actually fed (so the injected noise and its rounding
  cancel exactly). ``paper_exact=True`` is the authors' arithmetic (``wrapper.py``,
  ``layernorm_adaptation_verion4``): every block's input, block 0 included, gets the noise
  ``n_t = s * nu_t`` scaled by gamma_t; the injected noise stays in (``H~_t`` in place of ``X~_t``);
  the dot product takes the step-scaled noise, ``q = -(n_t @ delta.T) / eps`` (for s = eps:
  ``-(nu_t @ delta.T)``, eps times a trace estimate, so q sits near ``-eps * sum(gamma_t)``), over
  the B x B pairs of sequences, all of it averaged. ``tests/authors_reference.py`` transcribes their
  code; the tests hold this mode to it.
  ``"jvp"``: the eps -> 0 limit of "fd" for the same probes, exactly: one forward-mode pass whose
  tangent gets ``s * gamma_t * nu_t`` added at every probed block's input (no cancellation).
  ``"hvp"``: Hutchinson ``q_t = (P_t v_t)^T (d^2 CE / d H_t[pos]^2) (P_t v_t)`` for the CE of the label
  token at pos, one double-backward HVP for all probed blocks (cross-block terms have zero mean).

  The scale of q: the trace form above is a sum over the block's width of Jacobian entries weighted
  by gamma_t, so its size (and lambda_S's weight) follows the model's width and gains (measured per
  model: RESULTS.md, "The scale of S").
  ``per_gain=True`` divides q_t by ``tr(P_t) = sum |gamma_t|``: the P-weighted mean of the diagonal
  of the update's Jacobian, a number of order one on any model, so lambda_S means the same on
  every model. The authors' arithmetic (``paper_exact``) is eps times the trace form.

  Probes come from the counter-based generator of ``ofa_kernels.rng`` keyed by
  ``(seed, block, probe, element)``: kernels regenerate them (perturbation, dot products, their
  backward), K probes are K copies of the batch in one pass (``max_rows`` caps a pass).

bf16 safety ("fd"): differences are formed and reduced in fp32, and for bf16/fp16 models the default
step is ``2**-5 * rms(row)`` (``eps=None``, ``eps_scale="auto"``): a step of 1e-3 is below bf16's
resolution (2**-8 relative), so the perturbation would round away. Pass ``eps`` and ``eps_scale``
to choose yourself.

The model must be in eval mode (dropout would make the clean and probe passes differ).
"jvp" and "hvp" differentiate through attention in forward mode or twice; they run attention as
plain PyTorch ops (a TorchFunctionMode replaces ``scaled_dot_product_attention`` and ``softmax`` for
that pass), so models must use ``attn_implementation="sdpa"`` or ``"eager"``.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad
from torch.overrides import TorchFunctionMode

from .. import rng
from ..rng import ProbeStream
from .anatomy import StateTap, Structure, input_batch, positions_of, preconditioners, structure
from .memory import recompute_under
from ..ops.probe import perturb, probe_dot, probe_rows
from .options import ESTIMATORS, PROBE_ROWS, SCORING, check_choice, check_probe_rows
from ..precision import acc_dtype
from .riding import RiderProbes, RidingTap, check_attention, riding_batch

EPS_SCALES = ("auto", "none", "rms")
BF16_SAFE_EPS = 2.0**-5

__all__ = ["ESTIMATORS", "PROBE_ROWS", "hutchinson_trace", "indexed_log_probs", "label_ce", "riding_pass", "sharpness", "sharpness_terms", "softplus_mean", "step_ratio",
           "TraceEstimate"]


# -------------------------------------------------------------------------------------------- CE


def _at_least_fp32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float64 else t.float()


def indexed_log_probs(hidden: Tensor, head: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """[N] summed log-probability of each row's label tokens, from the final hidden states ``[N, T, d]``
    of prompt + label and the label index of ``prompts.step_batch`` (no host data: capturable)."""
    picked = hidden[batch["label_rows"], batch["label_cols"]]
    logp = F.log_softmax(_at_least_fp32(head(picked)), -1)
    token_logp = logp.gather(1, batch["label_tokens"][:, None])[:, 0]
    token_logp = torch.where(batch["label_weight"] > 0, token_logp, torch.zeros_like(token_logp))
    return torch.zeros(hidden.shape[0], dtype=token_logp.dtype, device=hidden.device).index_add(
        0, batch["label_rows"], token_logp)


def label_ce(hidden: Tensor, last_states: Tensor, head: nn.Module, batch: Mapping[str, Tensor],
             scoring: str = "full") -> Tensor:
    """The training CE (see the module docstring): ``hidden`` the final states ``[N, T, d]`` of prompt +
    label, ``last_states`` the final states at the prompts' last tokens ``[N, d]`` (read by "first"),
    ``batch`` a ``prompts.step_batch`` (its ``first_tokens`` for "first")."""
    check_choice("scoring", scoring, SCORING)
    if scoring == "full":
        return -indexed_log_probs(hidden, head, batch).mean()
    logp = F.log_softmax(_at_least_fp32(head(last_states)), -1)
    return -logp.gather(1, batch["first_tokens"][:, None]).mean()


# ------------------------------------------------------------------------------------ step ratio


def _gather(h: Tensor, positions: Tensor | None) -> Tensor:
    if positions is None:
        return h
    return h[torch.arange(h.shape[0], device=h.device), positions.to(h.device)]


def step_ratio(hidden_states: Sequence[Tensor] | Tensor, positions: Tensor | None, eps: float = 0.0, *,
               final_norm_step: bool = True) -> Tensor:
    """J averaged over the batch (fp32 scalar; fp64 for fp64 states).

    ``hidden_states``: L+1 tensors ``[B, T, d]`` (HF's ``output_hidden_states``) or a stacked
    ``[L+1, B, T, d]``; with ``positions=None`` they are already taken at the positions, ``[B, d]``.
    ``final_norm_step=False``: without the last ratio, whose step ends at the final norm's output.
    """
    if not final_norm_step:
        hidden_states = list(hidden_states)[:-1]
    states = [_gather(h, positions) for h in hidden_states]
    states = [h.to(torch.promote_types(h.dtype, torch.float32)) for h in states]
    if len(states) < 4:
        raise ValueError(f"step_ratio needs at least 4 hidden states (L >= 3 blocks; L >= 4 without the final "
                         f"norm's step), got {len(states)}")
    z = torch.stack(states)  # [L+1, B, d]
    steps = (z[1:] - z[:-1]).pow(2).sum(-1)  # steps[i] = ||Z_{i+1} - Z_i||^2, i = 0..L-1
    L = z.shape[0] - 1
    return (steps[2:L] / (steps[1:L - 1] + eps)).sum(0).mean()


# ------------------------------------------------------------ attention that differentiates in any mode


def _softmax(x: Tensor, dim: int | None = None, _stacklevel: int = 3, dtype: torch.dtype | None = None) -> Tensor:
    if dtype is not None:
        x = x.to(dtype)
    m = x.detach().amax(dim, keepdim=True)
    e = (x - torch.where(torch.isfinite(m), m, torch.zeros_like(m))).exp()
    return e / e.sum(dim, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *,
          softmax=torch.softmax):
    if dropout_p:
        raise ValueError("the sharpness passes need deterministic attention: call model.eval() (dropout_p > 0)")
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = (query @ key.transpose(-2, -1)) * scale
    Lq, Lk = scores.shape[-2:]
    if is_causal:
        causal = torch.ones(Lq, Lk, dtype=torch.bool, device=scores.device).tril(Lk - Lq)
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), -1).to(query.dtype) @ value


class _PlainAttention(TorchFunctionMode):
    """Attention as plain ops: PyTorch's fused SDPA lacks forward-mode and double derivatives.

    With ``forward_mode`` softmax is composed of exp and sum too: its built-in forward-mode tangent
    cannot be backpropagated (PyTorch 2.13). Otherwise the built-in softmax (which saves only its
    output) is kept, for memory.
    """

    def __init__(self, forward_mode: bool = False):
        super().__init__()
        self.softmax = _softmax if forward_mode else torch.softmax

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return _sdpa(*args, **kwargs, softmax=self.softmax)
        if self.softmax is _softmax and func in (F.softmax, torch.softmax, Tensor.softmax):
            return _softmax(*args, **kwargs)
        return func(*args, **kwargs)


def _needs_plain_attention(st: Structure, estimator: str) -> None:
    if st.attn not in ("sdpa", "eager"):
        raise ValueError(
            f'estimator "{estimator}" differentiates through attention in forward mode or twice, which '
            f'{st.attn!r} attention cannot; load the model with attn_implementation="sdpa" (or "eager"), '
            'e.g. model.set_attn_implementation("sdpa"), or use estimator="fd"')


# -------------------------------------------------------------------------------- the estimators


@dataclass
class _Probing:
    layers: list[int]
    gammas: list[Tensor]
    seed: int | Tensor  # a 0-dim int64 device tensor keeps the probe stream on the device (rng.key_table)
    distribution: str
    eps: float
    scale_by_rms: bool
    paper_exact: bool
    backend: str | None
    row_offset: int = 0  # sequences before this batch in the batch whose probes it draws (a shard)


def _counters(positions: Tensor, T: int, d: int, K: int, row_offset: int = 0) -> tuple[Tensor, Tensor]:
    """Probe index and counter base of each gathered row of a K-probe pass ([K * B])."""
    B = positions.shape[0]
    b = torch.arange(B, device=positions.device) + row_offset
    base = ((b * T + positions) * d).repeat(K)
    probe = torch.arange(K, device=positions.device).repeat_interleave(B)
    return probe, base


def _repeat(batch: tuple[Tensor, Tensor, Tensor], K: int) -> tuple[Tensor, Tensor, Tensor]:
    ids, mask, pos = batch
    return ids.repeat(K, 1), None if mask is None else mask.repeat(K, 1), pos.repeat(K)


def _fd(st, batch, pr: _Probing, first: int, K: int, clean: list[Tensor]) -> Tensor:
    ids, mask, pos = _repeat(batch, K)
    B, T = batch[0].shape
    scales = {}
    perturbed = range(len(st.blocks)) if pr.paper_exact else pr.layers  # the authors perturb block 0 too

    def transform(t, x):
        if t not in perturbed:
            return x
        y, s = perturb(x, pr.gammas[t].to(x.device), pr.eps, stream=ProbeStream(pr.seed, t, first, K),
                       distribution=pr.distribution, scale_by_rms=pr.scale_by_rms, row_offset=pr.row_offset * T,
                       backend=pr.backend)
        scales[t] = s[torch.arange(K * B, device=x.device), pos]
        return y

    tap = StateTap(st, pos, transform)
    pert = tap.run(ids, mask)
    probe, base = _counters(batch[2], T, pert[0].shape[-1], K, pr.row_offset)
    out = []
    for t in pr.layers:
        keys = rng.key_table(pr.seed, t, first, K, ids.device)
        if pr.paper_exact:
            out.append(_paper_exact_q(pert[t + 1], pert[t], clean[t + 1], clean[t], scales[t], pr.eps, keys, probe,
                                      base, pr.distribution, K, pr.backend))
        else:
            q = probe_dot(pert[t + 1], tap.fed[t], clean[t + 1], clean[t], scales[t], keys, probe, base,
                          pr.distribution, backend=pr.backend)
            out.append(q.view(K, B))
    return torch.stack(out, 1)  # [K, layers, B] (or [K, layers, B, B])


def _paper_exact_q(a, b, c, d, scale, eps, keys, probe, base, distribution, K, backend) -> Tensor:
    """The authors' arithmetic: ``-(n @ delta.T) / eps`` with ``n = s * nu`` the step-scaled noise (not the
    unit probe: for s = eps this is ``-(nu @ delta.T)``, eps times a trace estimate), the injected
    noise left in ``delta``, over every (probe row, sequence) pair: [K, B, B]."""
    R, N = a.shape
    noise = probe_rows(scale / eps, None, keys, probe, base, N, distribution, backend)  # (s / eps) * nu
    acc = scale.dtype
    delta = (a.to(acc) - b.to(acc)) - (c.to(acc) - d.to(acc)).repeat(K, 1)
    return -(noise.view(K, -1, N) @ delta.view(K, -1, N).transpose(1, 2))


def _fd_last(st, config, batch, pr: _Probing, first: int, K: int, layout_width: int,
             clean: list[Tensor] | None = None) -> tuple[list[Tensor], Tensor, Tensor]:
    """The probes as K rows riding in one clean pass (``riding.py``): the clean states at the positions,
    the clean rows' final hidden states [B, T, d] and q [K, layers, B]. The rider rows draw the
    numbers of their sequence's last token in the ``[B, layout_width, d]`` layout."""
    ids, mask, pos = batch
    B = ids.shape[0]
    d = pr.gammas[0].shape[0]
    probe, base = _counters(pos, layout_width, d, K, pr.row_offset)
    rb = riding_batch(ids, mask, pos, K, _model_dtype(st), config)
    tap = RidingTap(st, pos, rb, RiderProbes(pr.layers, pr.gammas, pr.seed, first, K, pr.distribution, pr.eps,
                                             pr.scale_by_rms, probe, base))
    states = tap.run(st.base)
    c = states if clean is None else list(clean)
    return states, tap.final_full, torch.stack([tap.q(t, c[t + 1], c[t]).view(K, B) for t in pr.layers], 1)


def _jvp(st, batch, pr: _Probing, first: int, K: int) -> Tensor:
    ids, mask, pos = _repeat(batch, K)
    B, T = batch[0].shape
    scales, tangents_fed = {}, {}
    perturbed = range(len(st.blocks)) if pr.paper_exact else pr.layers
    with forward_ad.dual_level(), _PlainAttention(forward_mode=True), recompute_under(None):  # no checkpointing
        def transform(t, x):
            if t not in perturbed:
                return x
            primal = forward_ad.unpack_dual(x).primal
            noise, s = perturb(primal, pr.gammas[t].to(x.device), 1.0, stream=ProbeStream(pr.seed, t, first, K),
                               distribution=pr.distribution, scale_by_rms=pr.scale_by_rms,
                               noise_only=True, row_offset=pr.row_offset * T, backend=pr.backend)
            scales[t] = s[torch.arange(K * B, device=x.device), pos]
            return x + forward_ad.make_dual(torch.zeros_like(noise), noise)

        tap = StateTap(st, pos, transform)
        states = tap.run(ids, mask)
        tangent = [_tangent_of(h) for h in states]
        tangents_fed = {t: _tangent_of(tap.fed[t]) for t in pr.layers}
    probe, base = _counters(batch[2], T, states[0].shape[-1], K, pr.row_offset)
    out = []
    for t in pr.layers:
        keys = rng.key_table(pr.seed, t, first, K, ids.device)
        if pr.paper_exact:
            zero = torch.zeros_like(tangent[t][:B])
            # the eps -> 0 limit of the authors' q: the state differences are eps * sigma * (tangent), and the
            # noise in the dot product is eps-scaled, then divided by eps
            out.append(_paper_exact_q(tangent[t + 1], tangent[t], zero, zero, scales[t] * pr.eps, 1.0, keys, probe,
                                      base, pr.distribution, K, pr.backend))
        else:
            q = probe_dot(tangent[t + 1], tangents_fed[t], None, None, scales[t], keys, probe, base, pr.distribution,
                          backend=pr.backend)
            out.append(q.view(K, B))
    return torch.stack(out, 1)


def _tangent_of(h: Tensor) -> Tensor:
    tangent = forward_ad.unpack_dual(h).tangent
    return torch.zeros_like(h) if tangent is None else tangent


def _hvp(st, batch, labels: Tensor, pr: _Probing, first: int, K: int) -> Tensor:
    if st.head is None:
        raise ValueError('estimator "hvp" needs a model with an LM head (get_output_embeddings())')
    ids, mask, pos = _repeat(batch, K)
    B, T = batch[0].shape
    zs: dict[int, Tensor] = {}
    rows = torch.arange(K * B, device=ids.device)

    def transform(t, x):
        if t not in pr.layers:
            return x
        zs[t] = torch.zeros(K * B, x.shape[-1], dtype=x.dtype, device=x.device, requires_grad=True)
        return x.index_put((rows, pos), zs[t], accumulate=True)

    with torch.enable_grad(), _PlainAttention(), recompute_under(_PlainAttention):
        states = StateTap(st, pos, transform).run(ids, mask)
        logits = st.head(states[-1])
        logits = logits if logits.dtype == torch.float64 else logits.float()
        ce = F.cross_entropy(logits, labels.to(ids.device).repeat(K), reduction="sum")
        z_list = [zs[t] for t in pr.layers]
        grads = torch.autograd.grad(ce, z_list, create_graph=True)
        d = states[0].shape[-1]
        probe, base = _counters(batch[2], T, d, K, pr.row_offset)
        acc = acc_dtype(states[0].dtype)
        vs = [probe_rows(torch.ones(K * B, dtype=acc, device=ids.device), pr.gammas[t].to(ids.device),
                         rng.key_table(pr.seed, t, first, K, ids.device), probe, base, d, pr.distribution, pr.backend)
              for t in pr.layers]
        dot = sum((g.to(acc) * v).sum() for g, v in zip(grads, vs))
        train = any(p.requires_grad for p in st.base.parameters())
        hv = torch.autograd.grad(dot, z_list, create_graph=train and torch.is_grad_enabled())
    return torch.stack([(v * h.to(acc)).sum(-1).view(K, B) for v, h in zip(vs, hv)], 1)


# ------------------------------------------------------------------------------------ public API


def _model_dtype(st: Structure) -> torch.dtype:
    for p in st.blocks[0].parameters():
        return p.dtype
    return torch.float32


def sharpness_terms(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    *,
    estimator: str = "fd",
    probe_rows: str = "all",
    num_probes: int = 1,
    distribution: str = "rademacher",
    eps: float | None = None,
    eps_scale: str = "auto",
    layers: Sequence[int] | None = None,
    seed: int | Tensor | None = None,
    first_probe: int = 0,
    paper_exact: bool = False,
    per_gain: bool = False,
    max_rows: int | None = None,
    gammas: Sequence[Tensor] | None = None,
    clean_states: Sequence[Tensor] | None = None,
    backend: str | None = None,
    row_offset: int = 0,
) -> Tensor:
    """The per-probe quadratic forms q before the softplus: ``[K, len(layers), B]`` (with
    ``paper_exact``, every (probe row, sequence) pair: ``[K, len(layers), B, B]``).

    ``batch``: ``input_ids``, ``attention_mask`` (and ``labels``, the label token per sequence, for
    "hvp"). ``estimator``: "fd", "jvp" or "hvp" (see the module docstring). ``probe_rows`` ("fd"):
    "all" perturbs every position in a second pass; "last" perturbs only each sequence's last token,
    as K rows riding in the clean pass (``riding.py``; same last-token probe numbers, the same
    expectation per block, a lower variance; needs "sdpa" or "eager" attention). ``num_probes`` K
    probes run in one pass as K copies of the batch (K rider rows per sequence with "last"), at most
    ``max_rows`` sequences per pass.
    ``distribution``: "rademacher" or "gaussian". ``eps``: the finite-difference step (default
    1e-3, or ``2**-5 * rms`` for bf16/fp16 models); ``eps_scale``: "none", "rms" (step relative to
    each row's RMS) or "auto" (rms for bf16/fp16). ``layers``: probed block indices (default
    1..L-1). ``seed``: the probe stream (an int, a 0-dim int64 tensor on the model's device read only
    there, or None: one drawn from torch's generator). ``first_probe``: this call's probes are probes
    ``first_probe ..`` of the stream (K probes at once equal K calls of one; S over K probes is the
    mean of S over disjoint probe ranges, which is how a training step splits the probe pass).
    ``paper_exact``: the authors' arithmetic (block 0 perturbed too, noise left in, eps-scaled noise in
    the B x B product; see the module docstring); ``layers`` still chooses the blocks whose q enter S.
    ``per_gain``: each block's q divided by ``tr(P_t) = sum |gamma_t|``, the trace per unit of gain
    (a P-weighted mean of the diagonal of the block update's Jacobian: order one on any model, whatever
    its width and gains; see the module docstring). ``gammas``: the
    preconditioners (default: :func:`preconditioners` of the model now; pass the originals while
    training). ``clean_states``: the clean pass's ``[H_0..H_L]`` at the last positions, if already
    computed. ``backend``: the probe kernels' backend (None: the default choice). ``row_offset``: the
    batch is rows ``row_offset ..`` of a larger batch padded to the same width, and draws that
    batch's probes (shards of a batch together equal the whole batch: how data-parallel ranks draw).
    """
    _check_estimator(estimator, distribution, eps_scale, num_probes, paper_exact, probe_rows)
    st = structure(model)
    if probe_rows == "last":
        check_attention(st)
    ids, mask = input_batch(batch)
    pos = batch["positions"] if "positions" in batch else positions_of(ids, mask)  # given: no check read back
    pr = _probing(st, model, layers, gammas, seed, distribution, eps, eps_scale, paper_exact, backend, row_offset)
    labels = _hvp_labels(batch, ids.shape[0]) if estimator == "hvp" else None
    if estimator != "fd":
        _needs_plain_attention(st, estimator)
    if estimator == "fd" and probe_rows == "all" and clean_states is None:
        clean_states = StateTap(st, pos, None).run(ids, mask)
    per_pass = num_probes if max_rows is None else max(1, int(max_rows) // ids.shape[0])
    parts = []
    for start in range(0, num_probes, per_pass):  # probe passes of at most max_rows sequences
        K, first = min(per_pass, num_probes - start), first_probe + start
        if estimator == "fd" and probe_rows == "last":
            parts.append(_fd_last(st, getattr(model, "config", None), (ids, mask, pos), pr, first, K, ids.shape[1],
                                  clean_states)[2])
        elif estimator == "fd":
            parts.append(_fd(st, (ids, mask, pos), pr, first, K, list(clean_states)))
        elif estimator == "jvp":
            parts.append(_jvp(st, (ids, mask, pos), pr, first, K))
        else:
            parts.append(_hvp(st, (ids, mask, pos), labels, pr, first, K))
    q = torch.cat(parts, 0)
    return _per_gain(q, pr) if per_gain else q


def _per_gain(q: Tensor, pr: _Probing) -> Tensor:
    """q of each probed block divided by ``sum |gamma_t|`` (axis 1 of q holds the blocks)."""
    gain = torch.stack([pr.gammas[t].abs().sum() for t in pr.layers]).to(device=q.device, dtype=q.dtype)
    return q / gain.view(1, -1, *([1] * (q.dim() - 2)))


def riding_pass(model: nn.Module, batch: Mapping[str, Tensor], positions: Tensor, *, layout_width: int,
                num_probes: int = 1, distribution: str = "rademacher", eps: float | None = None,
                eps_scale: str = "auto", layers: Sequence[int] | None = None, seed: int | Tensor | None = None,
                gammas: Sequence[Tensor] | None = None, backend: str | None = None,
                row_offset: int = 0, per_gain: bool = False) -> tuple[list[Tensor], Tensor, Tensor]:
    """One pass that gives everything a training step reads: the clean ``[H_0 .. H_L]`` at ``positions``,
    the clean rows' final hidden states ``[B, T, d]`` (label scoring) and the sharpness terms q
    ``[K, len(layers), B]`` of ``probe_rows="last"`` (the probes riding as K extra rows).

    ``batch``: ``input_ids`` (and ``attention_mask``) of the sequences the step scores (prompt and
    label word, say); ``positions``: the token S reads in each (the prompt's last); ``layout_width``:
    the width of the batch whose counters the probes take (the prompts' batch, so the riders share
    the all-positions estimator's numbers). Other keywords as :func:`sharpness_terms`.
    """
    _check_estimator("fd", distribution, eps_scale, num_probes, False, "last")
    st = structure(model)
    check_attention(st)
    ids, mask = input_batch(batch)
    pr = _probing(st, model, layers, gammas, seed, distribution, eps, eps_scale, False, backend, row_offset)
    states, final_full, q = _fd_last(st, getattr(model, "config", None), (ids, mask, positions), pr, 0, num_probes,
                                     int(layout_width))
    return states, final_full, _per_gain(q, pr) if per_gain else q


def _check_estimator(estimator: str, distribution: str, eps_scale: str, num_probes, paper_exact: bool,
                     probe_rows: str = "all") -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    check_probe_rows(probe_rows, estimator, paper_exact)
    rng.check_distribution(distribution)
    if eps_scale not in EPS_SCALES:
        raise ValueError(f"eps_scale must be one of {EPS_SCALES}, got {eps_scale!r}")
    if not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(f"num_probes must be an int >= 1, got {num_probes!r}")
    if paper_exact and estimator == "hvp":
        raise ValueError('paper_exact reproduces the authors\' finite difference; it applies to "fd" and "jvp" only')


def _probing(st: Structure, model: nn.Module, layers, gammas, seed, distribution: str, eps, eps_scale: str,
             paper_exact: bool, backend: str | None, row_offset: int) -> _Probing:
    """What every probe pass shares, checked: the probed blocks, their preconditioners, the probe
    stream (a drawn seed when none is given) and the finite-difference step and its scaling."""
    L = len(st.blocks)
    layers = list(range(1, L)) if layers is None else [int(t) for t in layers]
    if not layers or any(not 0 <= t < L for t in layers) or len(set(layers)) != len(layers):
        raise ValueError(f"layers must be distinct block indices in [0, {L - 1}], got {layers}")
    low_precision = _model_dtype(st) in (torch.bfloat16, torch.float16)
    scale_by_rms = eps_scale == "rms" or (eps_scale == "auto" and low_precision)
    if eps is None:
        eps = BF16_SAFE_EPS if scale_by_rms and low_precision else 1e-3
    if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    gammas = preconditioners(model) if gammas is None else list(gammas)
    if len(gammas) != L:
        raise ValueError(f"gammas must hold one vector per block ({L}), got {len(gammas)}")
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    if row_offset < 0:
        raise ValueError(f"row_offset must be >= 0, got {row_offset}")
    if not isinstance(seed, Tensor):
        seed = int(seed)
    return _Probing(layers, gammas, seed, distribution, float(eps), scale_by_rms, paper_exact, backend,
                    int(row_offset))


def _hvp_labels(batch: Mapping[str, Tensor], B: int) -> Tensor:
    labels = batch.get("labels")
    if labels is None or labels.shape != (B,):
        raise ValueError('estimator "hvp" needs batch["labels"]: the label token id of each sequence, shape [B]')
    return labels


def sharpness(model: nn.Module, batch: Mapping[str, Tensor], **keywords) -> Tensor:
    """OFA's sharpness S (fp32 scalar; fp64 for fp64 models), differentiable with respect to the trainable
    norm weights: ``softplus`` of :func:`sharpness_terms`, averaged over probes and sequences and summed
    over the probed layers. Its keywords are ``sharpness_terms``'s (the one place they are written and
    documented; an unknown one is a TypeError)."""
    return softplus_mean(sharpness_terms(model, batch, **keywords))


def softplus_mean(q: Tensor) -> Tensor:
    """S from its terms q ``[K, layers, B]`` (or ``[K, layers, B, B]``): softplus, averaged over every
    axis but the layers', summed over the layers (fp32, or fp64 for fp64 terms)."""
    s = F.softplus(q if q.dtype == torch.float64 else q.float())
    reduce = [d for d in range(s.dim()) if d != 1]
    return s.mean(reduce).sum()


sharpness.__signature__ = inspect.signature(sharpness_terms)  # help() and IDEs show the keywords it takes


# ------------------------------------------------------------------------------- general Hutchinson


class TraceEstimate(NamedTuple):
    """Hutchinson estimate of a trace: the mean, its standard error, and the per-probe samples."""

    estimate: Tensor
    stderr: Tensor
    samples: Tensor


def hutchinson_trace(
    fn: Callable[[Tensor], Tensor],
    z: Tensor,
    num_probes: int,
    distribution: str = "rademacher",
    seed: int | None = None,
) -> TraceEstimate:
    """Estimates ``tr(d fn / d z)`` (``fn(z)`` shaped like z) or, for a scalar ``fn``, the trace of its Hessian.

    Each probe is one vector-Jacobian product ``v . (v^T J)`` (two for the Hessian), with probes
    from ``rng.probes`` (probe k of ``seed``). Differentiable when ``fn``'s graph is (create_graph).
    """
    rng.check_distribution(distribution)
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    z = z if z.requires_grad else z.detach().requires_grad_()
    with torch.enable_grad():
        out = fn(z)
        scalar = out.dim() == 0
        if not scalar and out.shape != z.shape:
            raise ValueError(f"fn(z) must be a scalar or shaped like z {tuple(z.shape)}, got {tuple(out.shape)}")
        if scalar:
            (out,) = torch.autograd.grad(out, z, create_graph=True)
        samples = []
        for k in range(num_probes):
            v = rng.probes(z.shape, seed, distribution, probe=k, device=z.device, dtype=z.dtype)
            (vjp,) = torch.autograd.grad(out, z, v, retain_graph=True, create_graph=torch.is_grad_enabled())
            samples.append((v * vjp).sum())
    samples = torch.stack(samples)
    stderr = samples.std() / math.sqrt(num_probes) if num_probes > 1 else torch.full_like(samples[0], float("nan"))
    return TraceEstimate(samples.mean(), stderr, samples)
