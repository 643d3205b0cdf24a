"""Prompt text and its tokens: demonstrations, label words, encoding and padding (one home for all).

Format (the authors'): a demonstration is ``template(x) + " " + label_word + "\\n"``, demonstrations
are concatenated, then the query's ``template(x)``; no instruction text. Label words follow the
prompt with a leading space (" positive"). Texts are tokenised without special tokens, and batches
are right-padded with the tokenizer's pad token (else its EOS token); the prediction position is
each sequence's last real token.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .data import Example, Task

DEMO_SEPARATOR = "\n"

__all__ = ["DEMO_SEPARATOR", "demonstrations_prefix", "encode", "label_token_ids", "pad", "padding_id", "pair_prompt"]


def demonstrations_prefix(task: Task, demos: Sequence[Example]) -> str:
    """The demonstrations as text: each ``prompt label_word`` followed by the separator."""
    return "".join(f"{task.prompt(d.text)} {task.labels[d.label]}{DEMO_SEPARATOR}" for d in demos)


def pair_prompt(task: Task, demonstration: Example, query: Example) -> str:
    """One training sequence of the paired protocol: a demonstration, then the query's prompt."""
    return demonstrations_prefix(task, [demonstration]) + task.prompt(query.text)


def label_token_ids(tokenizer, labels: Sequence[str]) -> list[list[int]]:
    """Token ids of each label word as it follows the prompt (leading space)."""
    ids = [tokenizer(" " + word, add_special_tokens=False)["input_ids"] for word in labels]
    if any(not t for t in ids):
        raise ValueError(f"a label word tokenises to nothing: {labels}")
    return ids


def encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens."""
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def padding_id(tokenizer) -> int:
    """The id batches are padded with: the pad token, else EOS, else 0 (padding is masked out)."""
    for token_id in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if token_id is not None:
            return int(token_id)
    return 0


def pad(seqs: Sequence[Sequence[int]], pad_token: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``[N, max_len]`` ids and the attention mask (1 on real tokens)."""
    if not seqs:
        raise ValueError("pad needs at least one sequence")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_token, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)
