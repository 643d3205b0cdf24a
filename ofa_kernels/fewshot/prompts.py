"""Prompt text and its tokens: demonstrations, label words, encoding and padding (one home for all).

Format (the authors'): a demonstration is ``template(x) + " " + label_word + "\\n"``, demonstrations
are concatenated, then the query's ``template(x)``; no instruction text. Label words follow the
prompt with a leading space (" positive"). Each sequence starts with the special tokens the tokenizer
puts before a text (``leading_ids``: Gemma's BOS), its texts are tokenised without them, and batches
are right-padded with the tokenizer's pad token (else its EOS token); the prediction position is
each sequence's last real token.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .data import Example, Task

DEMO_SEPARATOR = "\n"

__all__ = ["DEMO_SEPARATOR", "check_context", "check_pairs_fit", "demonstrations_prefix", "encode", "label_token_ids",
           "leading_ids", "model_context", "pad", "padded_width", "padding_id", "pair_prompt", "sequences",
           "step_batch"]


def demonstrations_prefix(task: Task, demos: Sequence[Example]) -> str:
    """The demonstrations as text: each ``prompt label_word`` followed by the separator."""
    return "".join(f"{task.prompt(d.text)} {task.labels[d.label]}{DEMO_SEPARATOR}" for d in demos)


def pair_prompt(task: Task, demonstration: Example, query: Example) -> str:
    """One training sequence of the paired protocol: a demonstration, then the query's prompt."""
    return demonstrations_prefix(task, [demonstration]) + task.prompt(query.text)


def model_context(model) -> int | None:
    """The longest sequence ``model`` takes (``config.max_position_embeddings``), or None when it states none."""
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return context if isinstance(context, int) and not isinstance(context, bool) else None


def check_context(rows: Sequence[Example], prompt_ids: Sequence[Sequence[int]], extra: int,
                  context: int | None, prefix: int = 0) -> None:
    """Refuses, naming the row's file:line, a prompt that with ``extra`` tokens (``prefix`` of them a
    demonstrations prefix, the rest the longest label word) is longer than ``context``: such a prompt
    is never scored cut or silently."""
    if context is None:
        return
    for row, ids in zip(rows, prompt_ids, strict=True):
        if len(ids) + extra > context:
            # ICL is always scored with the demonstrations, so --no-demos would not avoid this
            fix = (f"shorten the text, or use fewer --shots (the demonstrations take {prefix} tokens)" if prefix
                   else "shorten the text")
            with_demos = "the demonstrations and " if prefix else ""
            raise ValueError(f"{row.where}: the prompt takes {len(ids) + extra} tokens with {with_demos}the label "
                             f"word, more than the model's context of {context}; {fix}")


def check_pairs_fit(tokenizer, task: Task, train: Sequence[Example], longest_label: int, context: int | None) -> None:
    """Refuses, before any step, a k-shot set in which some (demonstration, query) pair would not fit
    ``context``: any two rows may be paired in some epoch, so the bound is the longest demonstration
    plus the longest query of another row plus the longest label word (each part tokenised alone).
    The message names both rows' file:line."""
    if context is None or len(train) < 2:
        return
    demo = [len(ids) for ids in encode(tokenizer, [demonstrations_prefix(task, [e]) for e in train])]
    query = [len(ids) for ids in encode(tokenizer, [task.prompt(e.text) for e in train])]
    by_demo = sorted(range(len(train)), key=demo.__getitem__, reverse=True)[:2]
    by_query = sorted(range(len(train)), key=query.__getitem__, reverse=True)[:2]
    d, q = max(((d, q) for d in by_demo for q in by_query if d != q), key=lambda dq: demo[dq[0]] + query[dq[1]])
    need = len(leading_ids(tokenizer)) + demo[d] + query[q] + longest_label
    if need > context:
        raise ValueError(f"{train[q].where}: as a training query after the demonstration {train[d].where} it takes "
                         f"{need} tokens with the label word, more than the model's context of {context}; "
                         "shorten or remove the longer row")


def label_token_ids(tokenizer, labels: Sequence[str], scoring: str = "full") -> list[list[int]]:
    """Token ids of each label word as it follows the prompt (leading space). With ``scoring="first"``
    (a word scored by its first token, as the authors do) words whose first tokens coincide are
    refused: every row would score them alike and the accuracy would mean nothing."""
    ids = [tokenizer(" " + word, add_special_tokens=False)["input_ids"] for word in labels]
    if any(not t for t in ids):
        raise ValueError(f"a label word tokenises to nothing: {labels}")
    if scoring == "first":
        by_first: dict[int, list[str]] = {}
        for word, t in zip(labels, ids, strict=True):
            by_first.setdefault(t[0], []).append(word)
        shared = [words for words in by_first.values() if len(words) > 1]
        if shared:
            raise ValueError(f"with scoring 'first' the label words {shared[0]} share their first token, so they "
                             "would always score alike; use --scoring full (the whole word) or other label words")
    return ids


def encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (a piece of a sequence)."""
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def leading_ids(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (Gemma: its BOS; SmolLM2: none): every
    sequence starts with them, as the model was trained. Read off the tokenizer itself, so any
    tokenizer's own rule holds."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start])
    return []


def sequences(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text as a whole sequence: ``leading_ids`` first, then the text's own."""
    start = leading_ids(tokenizer)
    return [start + ids for ids in encode(tokenizer, texts)]


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


def padded_width(longest: int, bucket: int | None) -> int:
    """``longest`` rounded up to a multiple of ``bucket`` (None or 0: not rounded)."""
    if bucket is not None and bucket < 0:
        raise ValueError(f"bucket must be None or >= 0, got {bucket}")
    return -(-longest // bucket) * bucket if bucket else longest


def step_batch(prompt_ids: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], pad_token: int, device,
               *, with_continuations: bool = True, bucket: int | None = None,
               rows: slice = slice(None), label_width: int | None = None,
               masks_when_unpadded: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor a training (or scoring) step needs, built on the host and copied to ``device`` in
    one go (pinned, asynchronous on CUDA), so the step itself builds nothing from host data:

    - ``input_ids``/``attention_mask``: prompt + continuation (prompt only without ``with_continuations``),
      right-padded; ``prompt_input_ids``/``prompt_attention_mask``: the prompts alone; ``positions``: each
      prompt's last token.
    - ``label_rows``/``label_cols``/``label_tokens``/``label_weight`` (``[N * longest continuation]``): where
      each continuation token is predicted (the logit at position t predicts token t + 1) and which
      token; padding entries have weight 0. ``first_tokens``: each continuation's first token.

    ``bucket`` pads the sequence widths to a multiple of it, so that steps of similar lengths share
    shapes (what a captured CUDA graph needs); padding is masked and changes no value. ``rows`` keeps a
    block of the batch (a data-parallel shard), padded to the whole batch's widths. ``label_width``
    sizes the label index for continuations up to that long (default: the longest one here).
    ``masks_when_unpadded=False`` leaves out the mask of a group with no padding (one sequence per step,
    say): the model then gets ``attention_mask=None``, which means the same and spares transformers'
    check that the mask is all ones (a read of device memory on every forward).
    """
    if not prompt_ids or len(continuations) != len(prompt_ids) or any(not c for c in continuations) \
            or any(not q for q in prompt_ids):
        raise ValueError("step_batch needs as many non-empty continuations as non-empty prompts (at least one)")
    seqs = [list(q) + list(c) for q, c in zip(prompt_ids, continuations)] if with_continuations else prompt_ids
    longest = max(max(len(c) for c in continuations), label_width or 0)
    widths = {"input": padded_width(max(len(r) for r in seqs), bucket),
              "prompt_input": padded_width(max(len(q) for q in prompt_ids), bucket)}
    prompt_ids, continuations, seqs = prompt_ids[rows], continuations[rows], seqs[rows]
    n = len(prompt_ids)
    host = {}
    for name, kept in (("input", seqs), ("prompt_input", prompt_ids)):
        ids = torch.full((n, widths[name]), pad_token, dtype=torch.long)
        mask = torch.zeros((n, widths[name]), dtype=torch.long)
        for i, r in enumerate(kept):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        host[f"{name}_ids"] = ids
        if masks_when_unpadded or any(len(r) < widths[name] for r in kept):
            host[f"{name.replace('input', 'attention')}_mask"] = mask
    host["positions"] = torch.tensor([len(q) - 1 for q in prompt_ids], dtype=torch.long)
    cols = torch.zeros(n, longest, dtype=torch.long)
    tokens = torch.zeros(n, longest, dtype=torch.long)
    weight = torch.zeros(n, longest)
    for i, (q, c) in enumerate(zip(prompt_ids, continuations)):
        cols[i, : len(c)] = torch.arange(len(q) - 1, len(q) - 1 + len(c))
        tokens[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        weight[i, : len(c)] = 1.0
    host.update(label_rows=torch.arange(n).repeat_interleave(longest), label_cols=cols.flatten(),
                label_tokens=tokens.flatten(), label_weight=weight.flatten(),
                first_tokens=torch.tensor([c[0] for c in continuations], dtype=torch.long))
    device = torch.device(device)
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in host.items()}
    return {k: v.to(device) for k, v in host.items()}
