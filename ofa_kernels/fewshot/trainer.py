"""OFA few-shot adaptation: train only the norm weights with CE + lambda_J * J + lambda_S * S.

Two protocols (``AdaptOptions.protocol``); the k-shot set D is the training data:
- ``"paper"`` (default; the authors' code, ``shared/PROTOCOL.md``): each epoch shuffles D (seeded
  by seed and epoch) and takes consecutive disjoint pairs (demonstration, query); an odd example
  left over is dropped. ``batch_size`` pairs (default 1: one sequence) make one optimizer step, so
  an epoch is ceil((|D| // 2) / batch_size) steps (SST-2, |D| = 10: 5 steps, 300 in 60 epochs).
  Warm-up ``int(warmup * total)`` steps, then cosine to zero over the whole horizon: the lr
  multiplier at step s = 1 .. total is ``s / warm`` for ``s <= warm``, else
  ``0.5 * (1 + cos(pi * s / total))``.
- ``"batched"``: every example of D is a query, paired with another one drawn per epoch as its
  demonstration; all queries form one batch, so an epoch is one optimizer step. Warm-up
  ``max(1, round(warmup * epochs))`` steps, then cosine to zero over the steps after it.
AdamW (lr 1e-3, weight decay 1e-3) in both. Arms: "ce", "ce+J", "ce+S", "ofa" (both regularisers)
train the norm weights; "lora" and "ia3" train PEFT adapters with CE in the same protocol (the
baselines, ``baselines.py``). J and S are taken at the last prompt token (before the label); P_t
are the original post-attention gains, frozen at the start. Trainable norms are kept in fp32
(master weights) for bf16/fp16 models; the norms still return the model's dtype.

Runs resume: with ``checkpoint=path`` the state (weights, optimizer, scheduler, step, losses) is
written atomically every ``checkpoint_every`` optimizer steps (and at the end), and a run that
finds a checkpoint of the same options continues from it, mid-epoch too, and ends with the same
weights as an uninterrupted run (every random choice is a function of the seed, the epoch and the
step). Checkpoints hold tensors and plain values only and are read with ``weights_only=True``.
Under FSDP (``options.fsdp`` with several processes) ``checkpoint`` names a folder: a distributed
checkpoint where each rank writes and reads its own shards of the norms and their optimizer state.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..patch import patch_model, use_fp32_masters
from . import distributed, graphs, identity, memory, objectives
from .adapters import weights_hash
from .anatomy import last_token_states, norm_parameters, preconditioners, structure
from .baselines import attach
from .data import Dataset, Example, Task, k_shot
from .files import atomic_path
from .memory import checkpointed_blocks
from .options import PEFT_ARMS, AdaptOptions, AdaptResult
from .prompts import check_pairs_fit, label_token_ids, model_context, padding_id, pair_prompt, sequences, step_batch

_CHECKPOINT_FIELDS = {"fingerprint": str, "step": int, "losses": list}


def _read_checkpoint(ckpt: Path, sharded: bool) -> dict:
    """A checkpoint's state, checked: readable (tensors and plain values only, nothing in it runs) and of
    the expected shape. A truncated or foreign file is a ValueError naming it, not a loader traceback."""
    try:
        state = distributed.read_sharded_extra(ckpt) if sharded else torch.load(ckpt, weights_only=True)
    except Exception as exc:  # torch.load raises RuntimeError, EOFError, UnpicklingError, ... for a bad file
        raise ValueError(f"checkpoint {ckpt} cannot be read ({type(exc).__name__}: {str(exc)[:200]}); it is "
                         "damaged (a truncated write?): remove it to train the arm afresh") from None
    wrong = [k for k, kind in _CHECKPOINT_FIELDS.items() if not isinstance(state, dict)
             or not isinstance(state.get(k), kind)]
    if not sharded and isinstance(state, dict) and not all(isinstance(state.get(k), dict)
                                                           for k in ("weights", "optimizer", "scheduler")):
        wrong.append("weights/optimizer/scheduler")
    if wrong:
        raise ValueError(f"checkpoint {ckpt} is not an ofa_kernels training checkpoint (missing or wrong: {wrong}); "
                         "remove it to train the arm afresh")
    return state


def steps_per_epoch(n_train: int, options: AdaptOptions) -> int:
    """Optimizer steps in one epoch over a k-shot set of ``n_train`` examples."""
    if options.protocol == "batched":
        return 1
    return math.ceil((n_train // 2) / options.batch_size)


def lr_multiplier(step: int, total: int, options: AdaptOptions) -> float:
    """The learning-rate factor of optimizer step ``step`` (1 .. total) of a run of ``total`` steps."""
    if options.protocol == "paper":
        warm = int(options.warmup * total)
        if step <= warm:
            return step / warm
        return 0.5 * (1 + math.cos(math.pi * step / total))
    warm = max(1, round(options.warmup * total)) if options.warmup > 0 else 0
    if step <= warm:
        return step / warm
    progress = (step - 1 - warm) / max(1, total - warm)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def epoch_pairs(train: Sequence[Example], seed: int, epoch: int,
                protocol: str = "paper") -> list[tuple[Example, Example]]:
    """The (demonstration, query) pairs of one epoch, in training order.

    "paper": D shuffled, consecutive disjoint pairs (an odd example left over is dropped);
    "batched": every example a query, with another example drawn as its demonstration.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    if protocol == "paper":
        order = list(range(len(train)))
        rng.shuffle(order)
        return [(train[order[i]], train[order[i + 1]]) for i in range(0, len(order) - 1, 2)]
    out = []
    for j, query in enumerate(train):
        others = [i for i in range(len(train)) if i != j]
        out.append((train[rng.choice(others)], query))
    return out


def _step_pairs(pairs: list, step_in_epoch: int, options: AdaptOptions) -> list:
    if options.protocol == "batched":
        return pairs
    return pairs[step_in_epoch * options.batch_size:(step_in_epoch + 1) * options.batch_size]


def _batch_of_pairs(tokenizer, task: Task, pairs, options: AdaptOptions, label_ids, device,
                    rows: slice = slice(None), bucket: int | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one step (``prompts.step_batch``): prompt (+ label word for whole-word scoring),
    the prompts alone, positions and the label index. ``rows`` keeps a block of the batch (a
    data-parallel shard), padded to the whole batch's widths; ``bucket`` rounds the widths up and
    sizes the label index for the task's longest label word (shapes shared by captured steps)."""
    prompt_ids = sequences(tokenizer, [pair_prompt(task, demo, query) for demo, query in pairs])
    targets = [label_ids[q.label] for _, q in pairs]
    return step_batch(prompt_ids, targets, padding_id(tokenizer), device,
                      with_continuations=options.scoring == "full", rows=rows, bucket=bucket,
                      label_width=max(len(t) for t in label_ids) if bucket else None,
                      masks_when_unpadded=bucket is not None)  # eager steps: no mask to check when unpadded


def training_step(model: nn.Module, batch: dict, options: AdaptOptions, gammas: Sequence[torch.Tensor],
                  seed: int | torch.Tensor, *,
                  memory_efficient: bool = False, max_memory_gb: float | None = None,
                  probes_per_pass: int | None = None, row_offset: int = 0,
                  loss_scale: float = 1.0, info: dict | None = None) -> dict[str, torch.Tensor]:
    """Forward and backward of ``CE + lambda_J * J + lambda_S * S`` on one batch (gradients accumulate
    in the trainable parameters); returns the loss and its parts as detached scalars (fp32, or fp64)
    on the model's device. Nothing in the step reads a value back to the host (no ``.item()``, ``float()``
    or ``.tolist()``), so a GPU step is not held up by a synchronisation: read the parts when needed.

    One pass over prompt (+ label word) gives the CE and, at the prompt's last token (causal: the
    label tokens after it do not change it), the states J and S use. ``memory_efficient``:
    checkpointed blocks, and the probe pass split into passes of ``probes_per_pass`` probes (or as
    many as fit ``max_memory_gb``), each back-propagated at once; the gradient the probe passes send
    into the clean states is collected on detached copies and sent through the clean pass in one
    final backward. Same loss and gradients as the plain step, up to summation order.
    With ``options.rows() == "last"`` the probes ride in the clean pass as K extra rows per
    sequence: one forward and one backward give CE, J and S; checkpointing still applies, and the
    probe-pass split has nothing to split (``probes_per_pass`` and the budget leave it as it is).
    ``row_offset``: the batch is a shard starting at that row of a larger batch (probe numbering);
    ``loss_scale`` multiplies what is back-propagated (not the returned values); ``info`` receives the
    probes per pass the lean step used (``"probes_per_pass"``), to fix the split of later steps.
    """
    device = batch["input_ids"].device
    use_s = options.arm in ("ce+S", "ofa")
    measure = memory_efficient and max_memory_gb is not None and device.type == "cuda"
    context = checkpointed_blocks(model) if memory_efficient else contextlib.nullcontext()
    with context:
        if measure:
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        probe_args = dict(estimator=options.estimator, distribution=options.distribution, eps=options.eps, seed=seed,
                          gammas=gammas, row_offset=row_offset, per_gain=options.sharpness_form == "gain")
        if options.sharpness_form == "paper":
            probe_args["paper_exact"] = True
        riding = use_s and options.rows() == "last"
        states, parts = _clean_pass(model, batch, options, probe_args if riding else None)
        clean_loss = parts["ce"] + options.lambda_j * parts.get("J", 0.0)
        if not use_s or riding:  # CE and J, and with riding probes S too, from the one pass
            loss = clean_loss + options.lambda_s * parts["S"] if riding else clean_loss
            (loss * loss_scale).backward()
            return _detached({"loss": loss, **parts})
        s_batch = _sharpness_batch(batch, options)
        if not memory_efficient:
            parts["S"] = objectives.sharpness(model, s_batch, num_probes=options.num_probes, clean_states=states,
                                              **probe_args)
            loss = clean_loss + options.lambda_s * parts["S"]
            (loss * loss_scale).backward()
            return _detached({"loss": loss, **parts})
        per_pass = probes_per_pass
        if per_pass is None:
            per_probe = torch.cuda.max_memory_allocated(device) - before if measure else 0.0
            per_pass = memory.probes_per_pass(options.num_probes, per_probe, max_memory_gb, device)
        if info is not None:
            info["probes_per_pass"] = per_pass
        s_value = _split_probe_backward(model, s_batch, states, clean_loss, options, per_pass, probe_args, loss_scale)
    return _detached({"loss": clean_loss.detach() + options.lambda_s * s_value, **parts, "S": s_value})


def _clean_pass(model: nn.Module, batch: dict, options: AdaptOptions,
                riding: dict | None = None) -> tuple[list[torch.Tensor], dict]:
    """One pass over prompt + label word: the last-token states J and S read, and the CE (and J).
    ``riding``: the probe arguments of ``probe_rows="last"``: the probes ride in this pass as extra
    rows (``objectives.riding_pass``), and S joins the parts."""
    st = structure(model)
    inputs = _model_inputs(batch, "input_ids", "attention_mask")
    s_part = None
    if riding is None:
        states, hidden = last_token_states(model, inputs, batch["positions"], return_final=True)
    else:
        probe_args = {k: v for k, v in riding.items() if k != "estimator"}
        states, hidden, q = objectives.riding_pass(model, inputs, batch["positions"],
                                                   layout_width=batch["prompt_input_ids"].shape[1],
                                                   num_probes=options.num_probes, **probe_args)
        s_part = objectives.softplus_mean(q)
    parts = {"ce": objectives.label_ce(hidden, states[-1], st.head, batch, options.scoring)}
    del hidden
    if options.arm in ("ce+J", "ofa"):
        parts["J"] = objectives.step_ratio(states, None, final_norm_step=options.j_final_norm_step)
    if s_part is not None:
        parts["S"] = s_part
    return states, parts


def _sharpness_batch(batch: dict, options: AdaptOptions) -> dict:
    """The prompts alone (S is taken at the prompt's last token), with the label token for "hvp"."""
    s_batch = {**_model_inputs(batch, "prompt_input_ids", "prompt_attention_mask"), "positions": batch["positions"]}
    if options.estimator == "hvp":
        s_batch["labels"] = batch["first_tokens"]
    return s_batch


def _split_probe_backward(model, s_batch, states, clean_loss, options: AdaptOptions, per_pass: int,
                          probe_args: dict, loss_scale: float) -> torch.Tensor:
    """The probe pass in passes of ``per_pass`` probes, each back-propagated at once; the gradient they
    send into the clean states is collected on detached copies and sent through the clean pass in one
    final backward (with the clean loss). Returns S, detached."""
    K = options.num_probes
    leaves = [h.detach().requires_grad_() for h in states] if options.estimator == "fd" else None
    s_value = None
    for first in range(0, K, per_pass):
        k = min(per_pass, K - first)
        s_part = objectives.sharpness(model, s_batch, num_probes=k, first_probe=first, clean_states=leaves,
                                      **probe_args)
        (loss_scale * options.lambda_s * k / K * s_part).backward()
        term = s_part.detach() * (k / K)
        s_value = term if s_value is None else s_value + term
        del s_part
    surrogate = clean_loss
    if leaves is not None:
        surrogate = surrogate + sum((h * leaf.grad).sum() for h, leaf in zip(states, leaves)
                                    if leaf.grad is not None)
    (surrogate * loss_scale).backward()
    return s_value


def _model_inputs(batch: dict, ids: str, mask: str) -> dict[str, torch.Tensor]:
    """``input_ids`` (and ``attention_mask`` where the batch has one: none means no padding)."""
    return {"input_ids": batch[ids], **({"attention_mask": batch[mask]} if mask in batch else {})}


def _detached(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached scalars in at least fp32 (fp64 stays fp64)."""
    return {k: v.detach() if v.dtype == torch.float64 else v.detach().float() for k, v in parts.items()}


def _lean_step(options: AdaptOptions, device: torch.device, batch: dict) -> bool:
    """Whether a step runs lean (checkpointed blocks, split probe passes): as the options say, else
    ``memory.use_lean_step``'s default for this batch."""
    if options.memory_efficient is not None:
        return options.memory_efficient
    return memory.use_lean_step(device, batch["input_ids"].numel(), options.max_memory_gb)


def adapt(
    model: nn.Module,
    tokenizer,
    dataset: Dataset,
    options: AdaptOptions | None = None,
    *,
    train: Sequence[Example] | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 10,
    stop_after: int | None = None,
    progress: bool = False,
    log_every: int | None = None,
) -> AdaptResult:
    """Adapts ``model`` (in place) to ``dataset.task`` from its k-shot set; returns the norm weights.

    ``train`` overrides the k-shot draw; ``checkpoint_every`` counts optimizer steps; ``stop_after``
    ends after that many optimizer steps (as a killed run would; resume with the same ``checkpoint``).
    The steps' losses stay on the device and are read every ``log_every`` steps (default: once per
    epoch), at checkpoints and at the end, in one transfer each; a non-finite loss is reported then,
    naming its step, and the run stops without an adapter.
    """
    options = (options or AdaptOptions()).check()
    if log_every is not None and log_every < 1:
        raise ValueError(f"log_every must be a positive number of steps, got {log_every}")
    run = _setup(model, tokenizer, dataset, options, train, checkpoint)
    _loop(run, stop_after=stop_after, progress=progress, log_every=log_every, checkpoint_every=checkpoint_every)
    return _finish(run)


@dataclass
class _Run:
    """One adaptation as ``_setup`` makes it and ``_loop`` advances it."""

    model: nn.Module
    tokenizer: Any
    task: Task
    options: AdaptOptions
    train: list[Example]
    label_ids: list[list[int]]
    device: torch.device
    par: distributed.Parallel
    sharded: bool
    params: dict[str, nn.Parameter]
    gammas: list[torch.Tensor]
    base_hash: str
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    per_epoch: int
    total: int
    fingerprint: str
    checkpoint: Path | None
    start: int
    losses: list[dict[str, float]]
    probe_seed: torch.Tensor  # this step's probe stream (seed * 7919 + step), advanced on the device
    use_graphs: bool
    captured: graphs.CapturedSteps | None = None


def _setup(model: nn.Module, tokenizer, dataset: Dataset, options: AdaptOptions, train: Sequence[Example] | None,
           checkpoint: str | Path | None) -> _Run:
    """The model frozen with its norms fused and the arm's parameters trainable; the k-shot set checked
    against the context; the optimizer, schedule and (resumed) state; the captured step where it may run."""
    task = dataset.task
    model.eval()  # no dropout: the clean and probe passes must see the same network
    patch_model(model)
    for p in model.parameters():
        p.requires_grad_(False)
    base_hash = weights_hash(norm_parameters(model))
    gammas = preconditioners(model)
    params = _trainable(model, options)
    train = list(train) if train is not None else k_shot(dataset, options.shots, options.seed)
    if len(train) < 2:
        raise ValueError("adapt needs at least 2 training examples (each query is paired with another one)")
    label_ids = label_token_ids(tokenizer, task.labels, options.scoring)
    check_pairs_fit(tokenizer, task, train, max(len(t) for t in label_ids), model_context(model))
    device = next(model.parameters()).device
    par = distributed.current(device.type)
    per_epoch = steps_per_epoch(len(train), options)
    _check_shares(len(train), options, par.world)
    sharded = options.fsdp and par.world > 1
    if sharded:
        if not distributed.is_sharded(model):  # else loaded into its shards already (distributed.load_sharded)
            device = distributed.shard_model(model, par, device)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}  # FSDP2 swapped in sharded ones
    total = options.epochs * per_epoch
    optimizer = torch.optim.AdamW(params.values(), lr=options.lr, weight_decay=options.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_multiplier(i + 1, total, options))
    not_capturable = graphs.unsupported_reason(device, par.world, options.arm in PEFT_ARMS)
    if options.cuda_graphs == "on" and not_capturable:
        raise ValueError(f"cuda_graphs='on' cannot be used here: {not_capturable}")
    # by content: the same k-shot rows read through another path resume the same checkpoint
    fingerprint = json.dumps({"options": options.settings(), "task": identity.task_identity(task), "base": base_hash,
                              "train": identity.rows_digest(train)}, sort_keys=True)
    ckpt = Path(checkpoint) if checkpoint else None
    start, losses = 0, []
    if ckpt and ckpt.exists():
        start, losses = _resume(ckpt, fingerprint, sharded, params, model, optimizer, scheduler)
    probe_seed = torch.tensor(options.seed * 7919 + start, dtype=torch.int64, device=device)
    run = _Run(model, tokenizer, task, options, train, label_ids, device, par, sharded, params, gammas, base_hash,
               optimizer, scheduler, per_epoch, total, fingerprint, ckpt, start, losses, probe_seed,
               use_graphs=options.cuda_graphs != "off" and not_capturable is None)
    if run.use_graphs:
        graphs.make_capturable(optimizer, device)
        run.captured = graphs.CapturedSteps(_graph_step(run), list(params.values()), device)
    return run


def _graph_step(run: _Run) -> Callable[[dict, bool], dict]:
    """The step a CUDA graph captures: the training step (its probe split measured in each shape's warm-up)
    and, when ``update``, the optimizer's."""
    split: dict[tuple, int | None] = {}  # probes per pass, by shape
    options = run.options

    def graph_step(batch: dict, update: bool) -> dict:
        key = graphs.shape_key(batch)
        lean = _lean_step(options, run.device, batch)
        per_pass = options.probes_per_pass or split.get(key)
        info: dict = {}
        parts = training_step(run.model, batch, options, run.gammas, run.probe_seed, memory_efficient=lean,
                              max_memory_gb=options.max_memory_gb if per_pass is None else None,
                              probes_per_pass=per_pass, info=info)
        split.setdefault(key, info.get("probes_per_pass"))
        if update:
            run.optimizer.step()
        return parts

    return graph_step


def _loop(run: _Run, *, stop_after: int | None, progress: bool, log_every: int | None, checkpoint_every: int) -> None:
    """The optimizer steps from the resumed one to the last (or ``stop_after``): each epoch's pairs, one
    step each (captured or eager), the losses read in batches, checkpoints."""
    options, per_epoch, total = run.options, run.per_epoch, run.total
    steps = range(run.start, total)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"{run.task.name} {options.arm}", initial=run.start, total=total, unit="step")
    pairs: list = []
    pending: list[tuple[dict, dict[str, torch.Tensor]]] = []  # (epoch, step, lr), parts still on the device
    every = per_epoch if log_every is None else log_every
    for step in steps:
        if stop_after is not None and step >= stop_after:
            break
        epoch, in_epoch = divmod(step, per_epoch)
        if in_epoch == 0 or not pairs:
            pairs = epoch_pairs(run.train, options.seed, epoch, options.protocol)
        lr = run.scheduler.get_last_lr()[0]  # the rate of this step (a float: no device read)
        parts = _optimizer_step(run, _step_pairs(pairs, in_epoch, options), step)
        run.probe_seed.add_(1)  # the next step's probe stream, advanced on the device (seed * 7919 + step)
        run.scheduler.step()
        pending.append(({"epoch": epoch, "step": step + 1, "lr": lr}, parts))
        done = step + 1
        if done % every == 0 or done % checkpoint_every == 0 or done == total:
            _read_losses(pending, run.losses, total, options)
        if run.checkpoint and (done % checkpoint_every == 0 or done == total):
            _save_checkpoint(run.checkpoint, {"fingerprint": run.fingerprint, "step": done, "losses": run.losses,
                                              "scheduler": run.scheduler.state_dict()}, run.params, run.model,
                             run.optimizer, run.par, run.sharded, run.use_graphs)
    _read_losses(pending, run.losses, total, options)


def _optimizer_step(run: _Run, batch_pairs: list, step: int) -> dict[str, torch.Tensor]:
    """One optimizer step on these pairs: replayed from a captured graph, or eager (data-parallel shards
    and FSDP included); a capture that fails under "auto" turns graphs off for the rest of the run."""
    options = run.options
    if run.captured is not None:
        batch = _batch_of_pairs(run.tokenizer, run.task, batch_pairs, options, run.label_ids, run.device,
                                bucket=graphs.BUCKET)
        try:
            return run.captured.step(batch)
        except graphs.CaptureError as exc:  # "auto": this and every later step run eagerly, saying why
            if options.cuda_graphs == "on":
                raise
            print(f"cuda graphs off from step {step + 1}: {exc}; running eager steps", flush=True)
            run.captured = None  # frees the graphs' pool
    run.optimizer.zero_grad(set_to_none=True)
    rows = run.par.shard(len(batch_pairs))
    batch = _batch_of_pairs(run.tokenizer, run.task, batch_pairs, options, run.label_ids, run.device, rows)
    parts = _eager_step(run.model, batch, options, run.gammas, run.probe_seed, run.params, run.par, run.sharded,
                        rows, len(batch_pairs), run.device)
    run.optimizer.step()
    return parts


def _finish(run: _Run) -> AdaptResult:
    """The trained weights (refused when not finite), with what made them."""
    return AdaptResult(_finite_weights(run.params), run.base_hash, run.losses, run.train, run.options)


def _trainable(model: nn.Module, options: AdaptOptions) -> dict[str, nn.Parameter]:
    """The parameters the arm trains, made trainable: a PEFT baseline's adapter layers, else the norms
    (fp32 master weights for a low-precision model)."""
    if options.arm in PEFT_ARMS:
        return attach(model, options.arm, options.rank)
    use_fp32_masters(model)
    params = norm_parameters(model)
    if not params:
        raise ValueError("the model has no norms that ofa_kernels recognises; nothing to adapt")
    for p in params.values():
        p.requires_grad_(True)
    return params


def _check_shares(n_train: int, options: AdaptOptions, world: int) -> None:
    """Refuses a protocol whose smallest step has fewer sequences than there are processes."""
    if options.protocol == "batched":
        smallest = n_train  # one step of every example
    else:  # steps of batch_size pairs; the last one holds the remainder
        pairs = n_train // 2
        smallest = min(options.batch_size, pairs) if pairs % options.batch_size == 0 else pairs % options.batch_size
    if smallest < world:
        raise ValueError(f"a step of {smallest} sequences cannot be shared by {world} processes "
                         f"(protocol {options.protocol!r}: raise batch_size, or use fewer processes)")


def _resume(ckpt: Path, fingerprint: str, sharded: bool, params: dict, model: nn.Module, optimizer,
            scheduler) -> tuple[int, list]:
    """Loads a checkpoint of this very run into the parameters, optimizer and scheduler; returns
    (steps done, their losses). A checkpoint of another run is refused, naming it."""
    state = _read_checkpoint(ckpt, sharded)  # tensors and plain values only: nothing in it runs
    if state.get("fingerprint") != fingerprint:
        raise ValueError(f"checkpoint {ckpt} belongs to another run (options, task, base model or k-shot set "
                         "differ); remove it or pass another path")
    if sharded:  # each rank reads its own shards of the norms and of their optimizer state
        distributed.load_sharded_state(ckpt, params, model, optimizer)
    else:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state["weights"][name])
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["step"], state["losses"]


def _eager_step(model: nn.Module, batch: dict, options: AdaptOptions, gammas, probe_seed, params: dict, par,
                sharded: bool, rows: slice, batch_rows: int, device) -> dict[str, torch.Tensor]:
    """One step's gradients (not applied) on this rank's rows; in a data-parallel run, the whole batch's
    mean: the shard means weighted by their share of the rows, gradients and logged parts alike."""
    share = (rows.stop - rows.start) / batch_rows  # this rank's part of the batch mean
    parts = training_step(model, batch, options, gammas, probe_seed,
                          memory_efficient=_lean_step(options, device, batch), max_memory_gb=options.max_memory_gb,
                          probes_per_pass=options.probes_per_pass, row_offset=rows.start or 0,
                          loss_scale=share * par.world if sharded else 1.0)
    if par.world > 1:
        grads = []
        if not sharded:  # FSDP reduce-scattered the (share * world)-scaled gradients already
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params.values()]
            for p, g in zip(params.values(), grads):
                p.grad = g.mul_(share)
        logged = torch.stack([parts[k].double() * share for k in sorted(parts)])
        par.sum_(grads + [logged])
        parts = dict(zip(sorted(parts), logged.unbind()))
    return parts


def _save_checkpoint(ckpt: Path, state: dict, params: dict, model: nn.Module, optimizer, par, sharded: bool,
                     use_graphs: bool) -> None:
    """Writes the run's state atomically (rank 0), or every rank's shards of it (FSDP)."""
    if sharded:
        distributed.save_sharded_state(ckpt, params, model, optimizer, state, par)
    elif par.is_main:
        with atomic_path(ckpt) as tmp:
            torch.save({**state, "weights": {k: v.detach().clone() for k, v in params.items()},
                        "optimizer": graphs.portable_state(optimizer) if use_graphs else optimizer.state_dict()}, tmp)


def _finite_weights(params: dict) -> dict[str, torch.Tensor]:
    """The trained weights, gathered and copied; refuses non-finite ones."""
    weights = {k: distributed.full(v).detach().clone() for k, v in params.items()}
    bad = [k for k, v in weights.items() if not torch.isfinite(v).all()]
    if bad:
        raise FloatingPointError(f"the trained weights are not finite ({bad[:3]}); lower the learning rate")
    return weights


def _read_losses(pending: list[tuple[dict, dict[str, torch.Tensor]]], losses: list[dict], total: int,
                 options: AdaptOptions) -> None:
    """Moves the pending steps' parts to ``losses`` as floats (one device-to-host transfer); stops the run
    at the first non-finite loss."""
    if not pending:
        return
    names = sorted(pending[0][1])
    values = torch.stack([torch.stack([parts[k].double() for k in names]) for _, parts in pending]).tolist()
    for (info, _), row in zip(pending, values):
        record = {**info, **dict(zip(names, row))}
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"training diverged at step {record['step']} of {total} (loss {record['loss']}); "
                                     f"lower the learning rate (lr {options.lr})")
        losses.append(record)
    pending.clear()
