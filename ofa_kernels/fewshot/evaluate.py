"""Scoring label words at the last position: predictions, accuracy and macro-F1.

Two scoring rules:
- ``"full"`` (default): the log-probability of the whole label word (all its sub-tokens, teacher
  forced after the prompt). First pieces collide across label words (SmolLM2 splits
  " Abbreviation" as " Ab" + ...), which the first-token rule cannot tell apart.
- ``"first"``: the authors' protocol, the logit of each label word's first sub-token.

Prompt text, label words and padding come from ``prompts`` (the authors' format). In-context
demonstrations are a prefix that is run once and whose KV cache is reused for every batch
(tokenised apart from the prompts, so a token never spans the boundary).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .anatomy import structure
from .data import Example, Task
from .objectives import indexed_log_probs
from .options import SCORING
from .prompts import (
    check_context,
    demonstrations_prefix,
    encode,
    label_token_ids,
    leading_ids,
    model_context,
    pad,
    padding_id,
    step_batch,
)


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


class Prefix:
    """A shared prompt prefix (the ICL demonstrations) run once; its KV cache is reused by every batch."""

    def __init__(self, model, ids: list[int]):
        device = next(model.parameters()).device
        self.length = len(ids)
        with torch.no_grad():
            out = structure(model).base(input_ids=torch.tensor([ids], device=device), use_cache=True)
        self.cache = out[1]  # the cache (named `cache` or `past_key_values` by transformers version)

    def for_batch(self, batch: int):
        import copy

        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(batch)
        return cache


@functools.lru_cache(maxsize=None)
def _cache_argument(base_class: type) -> str:
    """transformers >= 5.2x names the KV-cache argument `cache` (and deprecates `past_key_values`)."""
    return "cache" if "cache" in inspect.signature(base_class.forward).parameters else "past_key_values"


def _run_base(st, ids, mask, prefix: "Prefix | None"):
    if prefix is None:
        return st.base(input_ids=ids, attention_mask=mask, use_cache=False)[0]
    ones = torch.ones(ids.shape[0], prefix.length, dtype=mask.dtype, device=mask.device)
    return st.base(input_ids=ids, attention_mask=torch.cat([ones, mask], 1), use_cache=True,
                   **{_cache_argument(type(st.base)): prefix.for_batch(ids.shape[0])})[0]


def label_log_probs(model, prompt_ids: list[list[int]], label_ids: list[list[int]], *, scoring: str = "full",
                    pad_id: int = 0, prefix: Prefix | None = None) -> torch.Tensor:
    """[N, C] scores of each label for each tokenised prompt; differentiable (the trainer's CE).

    Runs the model's base and applies the LM head only at the positions scored (never sequence x
    vocabulary logits).
    """
    if scoring not in SCORING:
        raise ValueError(f"scoring must be one of {SCORING}, got {scoring!r}")
    st = structure(model)
    device = next(model.parameters()).device
    if all(len(t) == 1 for t in label_ids):
        scoring = "first"  # one-token label words: the two rules are the same numbers, and "first" is one pass
    if scoring == "first":
        seqs, firsts = prompt_ids, torch.tensor([t[0] for t in label_ids], device=device)
    else:
        seqs = [p + lab for p in prompt_ids for lab in label_ids]  # prompt-major
    ids, mask = pad(seqs, pad_id, device)
    hidden = _run_base(st, ids, mask, prefix)
    if scoring == "first":
        last = mask.sum(1) - 1
        logp = F.log_softmax(_at_least_fp32(st.head(hidden[torch.arange(len(seqs), device=device), last])), -1)
        return logp[:, firsts]
    return continuation_log_probs(model, [p for p in prompt_ids for _ in label_ids],
                                  [lab for _ in prompt_ids for lab in label_ids], pad_id=pad_id,
                                  _hidden=(hidden, st)).view(len(prompt_ids), len(label_ids))


def continuation_log_probs(model, prompt_ids: list[list[int]], continuations: list[list[int]], *, pad_id: int = 0,
                           _hidden=None) -> torch.Tensor:
    """[N] log-probability of each continuation after its prompt (teacher forced), LM head at those positions only."""
    batch = step_batch(prompt_ids, continuations, pad_id, next(model.parameters()).device)
    if _hidden is None:  # (hidden [N, T, d], structure) of prompt + continuation when the caller has them
        st = structure(model)
        hidden = st.base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)[0]
    else:
        hidden, st = _hidden
    return indexed_log_probs(hidden, st.head, batch)


@dataclass
class Scores:
    accuracy: float
    macro_f1: float
    predictions: list[int]


def macro_f1(predictions: Sequence[int], targets: Sequence[int], n_classes: int) -> float:
    f1s = []
    for c in range(n_classes):
        tp = sum(p == c and t == c for p, t in zip(predictions, targets))
        fp = sum(p == c and t != c for p, t in zip(predictions, targets))
        fn = sum(p != c and t == c for p, t in zip(predictions, targets))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / n_classes


# With a demonstrations prefix every scored sequence holds its own copy of the prefix's KV cache: a
# batch holds at most this many (sequence x prefix token) pairs (TREC's 30 demonstrations under "full"
# scoring, 16 prompts x 6 label words, were over 20 GB on the CPU for a 135M model).
PREFIX_TOKEN_BUDGET = 2**15


def prompts_per_batch(batch_size: int, prefix_length: int, rows_per_prompt: int) -> int:
    """Prompts per scoring batch: ``batch_size``, fewer where the prefix cache copies would pass
    :data:`PREFIX_TOKEN_BUDGET` (at least one)."""
    if prefix_length == 0:
        return batch_size
    return max(1, min(batch_size, PREFIX_TOKEN_BUDGET // (rows_per_prompt * prefix_length)))


def evaluate(model, tokenizer, task: Task, examples: Sequence[Example], *, demonstrations: Sequence[Example] = (),
             scoring: str = "full", batch_size: int = 16) -> Scores:
    """Predicts each example's label (argmax over label words) with an optional demonstrations prefix.

    ``batch_size`` prompts are scored at once, fewer with a long prefix (:func:`prompts_per_batch`;
    the predictions do not depend on it). A prompt that, with the prefix and the longest label word, does not fit the model's context
    (``config.max_position_embeddings``) is refused with the row's file:line, never scored cut or silently.
    """
    label_ids = label_token_ids(tokenizer, task.labels, scoring)
    pad_token = padding_id(tokenizer)
    text = demonstrations_prefix(task, demonstrations)
    prefix_ids = leading_ids(tokenizer) + (encode(tokenizer, [text])[0] if text else [])  # the sequences' start
    prefix = Prefix(model, prefix_ids) if prefix_ids else None
    context = model_context(model)
    longest_label = max(len(t) for t in label_ids)
    multi_token = scoring == "full" and any(len(t) > 1 for t in label_ids)
    step = prompts_per_batch(batch_size, len(prefix_ids), len(label_ids) if multi_token else 1)
    predictions: list[int] = []
    for start in range(0, len(examples), step):
        chunk = examples[start:start + step]
        prompt_ids = encode(tokenizer, [task.prompt(e.text) for e in chunk])
        check_context(chunk, prompt_ids, len(prefix_ids) + longest_label, context, len(prefix_ids))
        scores = label_log_probs(model, prompt_ids, label_ids, scoring=scoring, pad_id=pad_token, prefix=prefix)
        predictions += scores.argmax(1).tolist()
    targets = [e.label for e in examples]
    accuracy = sum(p == t for p, t in zip(predictions, targets)) / max(1, len(targets))
    return Scores(accuracy, macro_f1(predictions, targets, len(task.labels)), predictions)
