"""A plain-PyTorch transcription of the authors' OFA loss (``wrapper.py``, ``layernorm_adaptation_verion4``).

Written from their code, line for line where it matters, on a plain Hugging Face model: two full
forward passes with ``output_hidden_states=True``, the second with a forward pre-hook on every decoder
block that adds ``noise * gamma_post`` to the block's input. The only change is where the noise comes
from: ``noise = eps * randn_like(x)`` becomes ``eps * ofa_kernels.probes(x.shape, seed, "gaussian",
layer=t)``, the numbers the library's kernels draw, so the two can be compared value for value.
No library code computes any term here: the tests hold ``objectives`` against this.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import ofa_kernels


def _blocks(model):
    if hasattr(model, "transformer"):  # GPT-2
        return list(model.transformer.h)
    return list(model.model.layers)


def host_gaussian(shape, seed: int, layer: int, like: torch.Tensor) -> torch.Tensor:
    """Unit Gaussian numbers of block ``layer``, from the host generator (``ofa_kernels.probes``)."""
    return ofa_kernels.probes(shape, seed, "gaussian", layer=layer, device=like.device, dtype=like.dtype)


def authors_terms(model, input_ids, attn_mask, gammas, *, eps: float = 1e-3, seed: int = 0,
                  label_tokens=None, gaussian=host_gaussian) -> dict[str, torch.Tensor]:
    """Their CE (first label token at the last real position), J (``conver_loss_regular``) and
    ``flat_loss.mean()`` (S), as their code computes them. ``gammas``: each block's frozen
    post-attention gain (their ``module.post_attention_layernorm.weight``, the PEFT base layer's).
    ``gaussian(shape, seed, layer, like)``: their ``randn_like`` (default: the host generator)."""
    pred_loc = attn_mask.shape[1] - 1 - attn_mask.flip(1).long().argmax(1)  # their utils.last_one_indices
    rows = torch.arange(input_ids.shape[0])
    output = model(input_ids=input_ids, attention_mask=attn_mask, output_hidden_states=True)
    hidden_states = output.hidden_states
    out = {}
    if label_tokens is not None:
        out["ce"] = F.cross_entropy(output.logits[rows, pred_loc], label_tokens, reduction="mean")
    conver_loss = 0.0
    for i in range(2, len(hidden_states) - 1):
        numerator = F.mse_loss(hidden_states[i][rows, pred_loc], hidden_states[i + 1][rows, pred_loc])
        demoninator = F.mse_loss(hidden_states[i][rows, pred_loc], hidden_states[i - 1][rows, pred_loc])
        conver_loss += numerator / demoninator
    out["J"] = conver_loss

    noise_holder, hooks = [], []

    def hook_fn_local(t):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            noise = gaussian(x.shape, seed, t, x) * eps
            noise_holder.append(noise)
            y = x + noise * gammas[t].to(x.dtype)
            if args:
                return (y,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": y}
        return hook

    for t, layer in enumerate(_blocks(model)):
        hooks.append(layer.register_forward_pre_hook(hook_fn_local(t), with_kwargs=True))
    try:
        noise_output = model(input_ids=input_ids, attention_mask=attn_mask, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    noise_hidden_states = noise_output.hidden_states
    flat_loss = 0.0
    for i in range(1, len(hidden_states) - 1):
        grad_noise = noise_hidden_states[i + 1][rows, pred_loc] - noise_hidden_states[i][rows, pred_loc]
        grad = hidden_states[i + 1][rows, pred_loc] - hidden_states[i][rows, pred_loc]
        flat_loss += F.softplus(-1 * noise_holder[i][rows, pred_loc] @ (grad_noise - grad).t() / eps)
    out["S"] = flat_loss.mean()
    return out
