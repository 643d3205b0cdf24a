"""OFA few-shot adaptation: train only the norm weights with CE + lambda_J * J + lambda_S * S.

Protocol (the authors'): the k-shot set is the training data; each training sequence pairs one
demonstration (another k-shot example, drawn per epoch) with one query, and the loss is computed
at the query's label; all queries form one batch, so an epoch is one optimizer step. AdamW
(lr 1e-3, weight decay 1e-3), linear warm-up over the first 5% of steps, then cosine to zero.
Arms: "ce", "ce+J", "ce+S", "ofa" (both regularisers) train the norm weights; "lora" and "ia3"
train PEFT adapters with CE in the same protocol (the baselines, ``baselines.py``). J and S are
taken at the last prompt token (before the label); P_t are the original post-attention gains,
frozen at the start. Trainable norms are kept in fp32 (master weights) for bf16/fp16 models; the
norms still return the model's dtype.

Runs resume: with ``checkpoint=path`` the state (weights, optimizer, scheduler, epoch, losses) is
written atomically every ``checkpoint_every`` epochs, and a run that finds a checkpoint of the same
options continues from it and ends with the same weights as an uninterrupted run (every random
choice is a function of the seed and the epoch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from . import distributed, memory, objectives
from .baselines import PEFT_ARMS, attach
from .data import Dataset, Example, Task, k_shot
from .evaluate import _encode, _pad, continuation_log_probs, demonstrations_prefix, label_token_ids
from .files import atomic_path
from .memory import checkpointed_blocks
from .nn import FusedLayerNorm, FusedRMSNorm
from .patch import patch_model

NORM_ARMS = ("ce", "ce+J", "ce+S", "ofa")
ARMS = NORM_ARMS + PEFT_ARMS


@dataclass
class AdaptOptions:
    """Everything that decides the adapted weights (stored with checkpoints and adapters)."""

    arm: str = "ofa"
    shots: int = 5
    seed: int = 42
    epochs: int = 60
    lr: float = 1e-3
    weight_decay: float = 1e-3
    warmup: float = 0.05
    lambda_j: float = 1e-2
    lambda_s: float = 1e-3
    estimator: str = "fd"
    num_probes: int = 1
    distribution: str = "gaussian"
    eps: float | None = None
    scoring: str = "full"
    rank: int = 1  # LoRA rank (arm "lora")
    memory_efficient: bool | None = None  # checkpointed blocks + split probe pass; None: memory.use_lean_step
    max_memory_gb: float | None = None  # budget that sizes the probe passes (CUDA)
    probes_per_pass: int | None = None  # fixes the split instead of the budget
    fsdp: bool = False  # data-parallel runs: shard the frozen base weights with FSDP2 (else replicate)

    def check(self) -> "AdaptOptions":
        if self.arm not in ARMS:
            raise ValueError(f"arm must be one of {ARMS}, got {self.arm!r}")
        if self.estimator not in objectives.ESTIMATORS:
            raise ValueError(f"estimator must be one of {objectives.ESTIMATORS}, got {self.estimator!r}")
        for name in ("shots", "epochs", "num_probes", "rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.probes_per_pass is not None and self.probes_per_pass < 1:
            raise ValueError(f"probes_per_pass must be >= 1, got {self.probes_per_pass}")
        if self.max_memory_gb is not None and not self.max_memory_gb > 0:
            raise ValueError(f"max_memory_gb must be > 0, got {self.max_memory_gb}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be a fraction in [0, 1), got {self.warmup}")
        return self


@dataclass
class AdaptResult:
    weights: dict[str, torch.Tensor]  # the trained parameters by name (norms; adapter layers for lora/ia3)
    base_hash: str  # of the base model's norm weights before training
    losses: list[dict[str, float]] = field(default_factory=list)
    train: list[Example] = field(default_factory=list)
    options: AdaptOptions = field(default_factory=AdaptOptions)


def norm_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights (and biases) of the model's fused norms, by name."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, (FusedRMSNorm, FusedLayerNorm)):
            for pname, p in module.named_parameters(recurse=False):
                out[f"{name}.{pname}" if name else pname] = p
    return out


def _fp32_masters(model: nn.Module) -> None:
    """Trainable norms of a bf16/fp16 model in fp32; the norms keep returning the model's dtype."""
    for module in model.modules():
        if isinstance(module, (FusedRMSNorm, FusedLayerNorm)):
            for p in module.parameters(recurse=False):
                if p.dtype in (torch.bfloat16, torch.float16):
                    module.output_dtype = p.dtype
                    p.data = p.data.float()


def weights_hash(params: dict[str, torch.Tensor]) -> str:
    """sha256 over names, shapes and fp32 values of norm parameters (identifies a base model)."""
    h = hashlib.sha256()
    for name in sorted(params):
        t = params[name].detach().float().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _schedule(options: AdaptOptions):
    warm = max(1, round(options.warmup * options.epochs)) if options.warmup > 0 else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, options.epochs - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _pairs(train: Sequence[Example], seed: int, epoch: int) -> list[tuple[Example, Example]]:
    """(demonstration, query) for every query; the demonstration is another example, drawn per epoch."""
    rng = random.Random(seed * 1_000_003 + epoch)
    out = []
    for j, query in enumerate(train):
        others = [i for i in range(len(train)) if i != j]
        out.append((train[rng.choice(others)], query))
    return out


def _batch_of_pairs(tokenizer, task: Task, pairs, options: AdaptOptions, label_ids, device,
                    rows: slice = slice(None)) -> dict:
    """The token batch of one epoch: prompt (+ label word for whole-word scoring), positions, targets.

    ``rows`` keeps a block of the batch (a data-parallel shard), padded to the whole batch's widths.
    """
    prompts = [demonstrations_prefix(task, [demo]) + task.prompt(query.text) for demo, query in pairs]
    prompt_ids = _encode(tokenizer, prompts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    targets = [label_ids[q.label] for _, q in pairs]
    full = options.scoring == "full"
    seqs = [p + t for p, t in zip(prompt_ids, targets)] if full else prompt_ids
    ids, mask = _pad(seqs, pad_id, device)
    p_ids, p_mask = _pad(prompt_ids, pad_id, device)
    return {"input_ids": ids[rows], "attention_mask": mask[rows], "prompt_ids": prompt_ids[rows],
            "targets": targets[rows], "prompt_input_ids": p_ids[rows], "prompt_attention_mask": p_mask[rows],
            "positions": torch.tensor([len(p) - 1 for p in prompt_ids[rows]], device=device)}


def training_step(model: nn.Module, batch: dict, options: AdaptOptions, gammas: Sequence[torch.Tensor], seed: int, *,
                  memory_efficient: bool = False, max_memory_gb: float | None = None,
                  probes_per_pass: int | None = None, row_offset: int = 0,
                  loss_scale: float = 1.0) -> dict[str, float]:
    """Forward and backward of ``CE + lambda_J * J + lambda_S * S`` on one batch (gradients accumulate
    in the trainable parameters); returns the loss and its parts as floats.

    One pass over prompt (+ label word) gives the CE and, at the prompt's last token (causal: the
    label tokens after it do not change it), the states J and S use. ``memory_efficient``:
    checkpointed blocks, and the probe pass split into passes of ``probes_per_pass`` probes (or as
    many as fit ``max_memory_gb``), each back-propagated at once; the gradient the probe passes send
    into the clean states is collected on detached copies and sent through the clean pass in one
    final backward. Same loss and gradients as the plain step, up to summation order.
    ``row_offset``: the batch is a shard starting at that row of a larger batch (probe numbering);
    ``loss_scale`` multiplies what is back-propagated (not the returned values).
    """
    st = objectives._structure(model)
    device = batch["input_ids"].device
    n = batch["input_ids"].shape[0]
    full = options.scoring == "full"
    use_j, use_s = options.arm in ("ce+J", "ofa"), options.arm in ("ce+S", "ofa")
    measure = memory_efficient and max_memory_gb is not None and device.type == "cuda"
    context = checkpointed_blocks(model) if memory_efficient else contextlib.nullcontext()
    with context:
        if measure:
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        states, hidden = objectives.last_token_states(
            model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, batch["positions"],
            return_final=True)
        targets = batch["targets"]
        if full:  # token-level CE of the whole label word
            ce = -continuation_log_probs(model, batch["prompt_ids"], targets, _hidden=(hidden, st)).mean()
        else:
            logp = torch.log_softmax(st.head(states[-1]).float(), -1)
            ce = -logp[torch.arange(n, device=device), torch.tensor([t[0] for t in targets], device=device)].mean()
        del hidden
        parts = {"ce": ce}
        if use_j:
            parts["J"] = objectives.step_ratio(states, None)
        clean_loss = ce + options.lambda_j * parts.get("J", 0.0)
        if not use_s:
            (clean_loss * loss_scale).backward()
            return {"loss": float(clean_loss.detach()), **{k: float(v.detach()) for k, v in parts.items()}}
        s_batch = {"input_ids": batch["prompt_input_ids"], "attention_mask": batch["prompt_attention_mask"]}
        if options.estimator == "hvp":
            s_batch["labels"] = torch.tensor([t[0] for t in targets], device=device)
        probe_args = dict(estimator=options.estimator, distribution=options.distribution, eps=options.eps, seed=seed,
                          gammas=gammas, row_offset=row_offset)
        K = options.num_probes
        if not memory_efficient:
            parts["S"] = objectives.sharpness(model, s_batch, num_probes=K, clean_states=states, **probe_args)
            loss = clean_loss + options.lambda_s * parts["S"]
            (loss * loss_scale).backward()
            return {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in parts.items()}}
        per_pass = probes_per_pass
        if per_pass is None:
            per_probe = torch.cuda.max_memory_allocated(device) - before if measure else 0.0
            per_pass = memory.probes_per_pass(K, per_probe, max_memory_gb, device)
        leaves = [h.detach().requires_grad_() for h in states] if options.estimator == "fd" else None
        s_value = 0.0
        for first in range(0, K, per_pass):
            k = min(per_pass, K - first)
            s_part = objectives.sharpness(model, s_batch, num_probes=k, first_probe=first, clean_states=leaves,
                                          **probe_args)
            (loss_scale * options.lambda_s * k / K * s_part).backward()
            s_value += float(s_part.detach()) * k / K
            del s_part
        surrogate = clean_loss
        if leaves is not None:
            surrogate = surrogate + sum((h * leaf.grad).sum() for h, leaf in zip(states, leaves)
                                        if leaf.grad is not None)
        (surrogate * loss_scale).backward()
    out = {"loss": float(clean_loss.detach()) + options.lambda_s * s_value}
    out.update({k: float(v.detach()) for k, v in parts.items()})
    out["S"] = s_value
    return out


def adapt(
    model: nn.Module,
    tokenizer,
    dataset: Dataset,
    options: AdaptOptions | None = None,
    *,
    train: Sequence[Example] | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 5,
    stop_after: int | None = None,
    progress: bool = False,
) -> AdaptResult:
    """Adapts ``model`` (in place) to ``dataset.task`` from its k-shot set; returns the norm weights.

    ``train`` overrides the k-shot draw; ``stop_after`` ends after that many epochs (as a killed
    run would; resume with the same ``checkpoint``).
    """
    options = (options or AdaptOptions()).check()
    task = dataset.task
    model.eval()  # no dropout: the clean and probe passes must see the same network
    patch_model(model)
    for p in model.parameters():
        p.requires_grad_(False)
    base_hash = weights_hash(norm_parameters(model))
    gammas = objectives.preconditioners(model)
    if options.arm in PEFT_ARMS:
        params = attach(model, options)
    else:
        _fp32_masters(model)
        params = norm_parameters(model)
        if not params:
            raise ValueError("the model has no norms that ofa_kernels recognises; nothing to adapt")
        for p in params.values():
            p.requires_grad_(True)
    train = list(train) if train is not None else k_shot(dataset, options.shots, options.seed)
    if len(train) < 2:
        raise ValueError("adapt needs at least 2 training examples (each query is paired with another one)")
    label_ids = label_token_ids(tokenizer, task.labels)
    device = next(model.parameters()).device
    par = distributed.current(device.type)
    if len(train) < par.world:
        raise ValueError(f"{len(train)} training examples cannot be shared by {par.world} processes")
    sharded = options.fsdp and par.world > 1
    if sharded:
        if checkpoint:
            raise ValueError("checkpoint/resume is not supported with fsdp yet; run without checkpoint")
        device = distributed.shard_model(model, par, device)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}  # FSDP2 swapped in sharded ones
    optimizer = torch.optim.AdamW(params.values(), lr=options.lr, weight_decay=options.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(options))
    losses: list[dict[str, float]] = []
    start = 0
    ckpt = Path(checkpoint) if checkpoint else None
    fingerprint = json.dumps({"options": dataclasses.asdict(options), "task": task.name, "base": base_hash,
                              "train": [e.where for e in train]}, sort_keys=True)
    if ckpt and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        if state["fingerprint"] != fingerprint:
            raise ValueError(f"checkpoint {ckpt} belongs to another run (options, task, base model or k-shot set "
                             "differ); remove it or pass another path")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state["weights"][name])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, losses = state["epoch"], state["losses"]
    epochs = range(start, options.epochs)
    if progress:
        from tqdm.auto import tqdm

        epochs = tqdm(epochs, desc=f"{task.name} {options.arm}", initial=start, total=options.epochs)
    for epoch in epochs:
        if stop_after is not None and epoch >= stop_after:
            break
        optimizer.zero_grad(set_to_none=True)
        rows = par.shard(len(train))
        share = (rows.stop - rows.start) / len(train)  # this rank's part of the batch mean
        batch = _batch_of_pairs(tokenizer, task, _pairs(train, options.seed, epoch), options, label_ids, device, rows)
        memory_efficient = options.memory_efficient
        if memory_efficient is None:
            memory_efficient = memory.use_lean_step(device, batch["input_ids"].numel(), options.max_memory_gb)
        parts = training_step(model, batch, options, gammas, options.seed * 7919 + epoch,
                              memory_efficient=memory_efficient, max_memory_gb=options.max_memory_gb,
                              probes_per_pass=options.probes_per_pass, row_offset=rows.start or 0,
                              loss_scale=share * par.world if sharded else 1.0)
        if par.world > 1:  # the whole batch's mean: shard means weighted by their share of the rows
            grads = []
            if not sharded:  # FSDP reduce-scattered the (share * world)-scaled gradients already
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params.values()]
                for p, g in zip(params.values(), grads):
                    p.grad = g.mul_(share)
            logged = torch.tensor([parts[k] * share for k in sorted(parts)], dtype=torch.float64, device=device)
            par.sum_(grads + [logged])
            parts = dict(zip(sorted(parts), logged.tolist()))
        optimizer.step()
        scheduler.step()
        losses.append({"epoch": epoch, **parts})
        done = epoch + 1
        if ckpt and par.is_main and (done % checkpoint_every == 0 or done == options.epochs):
            with atomic_path(ckpt) as tmp:
                torch.save({"fingerprint": fingerprint, "epoch": done, "losses": losses,
                            "weights": {k: v.detach().clone() for k, v in params.items()},
                            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp)
    weights = {k: distributed.full(v).detach().clone() for k, v in params.items()}
    return AdaptResult(weights, base_hash, losses, train, options)
