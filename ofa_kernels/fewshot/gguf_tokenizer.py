"""A Hugging Face fast tokenizer built from the SentencePiece vocabulary a GGUF file stores.

A GGUF whose ``tokenizer.ggml.model`` is ``"llama"`` stores a SentencePiece BPE vocabulary: pieces,
scores and token types, and no merges. SentencePiece's BPE encodes by merging, again and again, the
adjacent pair whose concatenation is the best-scored piece; a ``tokenizers`` BPE that ranks every
split of every piece by that piece's score does the same. This module builds that BPE from the file's
own fields, so a model's tokenizer never depends on how a library version converts GGUF files:

- pieces of type NORMAL are merge targets, ranked by score (best first), each by its splits into two
  NORMAL pieces; BYTE pieces (``<0x41>``) are the byte fallback for characters outside it;
- USER_DEFINED pieces (``"\\n"``, runs of spaces, ...) are matched whole in the raw text, longest
  first, and never merged; CONTROL and UNUSED pieces are never produced from text;
- a space is the piece character ``U+2581``, no prefix space is added, and the BOS / EOS rules are the
  file's (``tokenizer.ggml.add_bos_token`` / ``add_eos_token``).

``tests/test_gguf_tokenizer.py`` holds it to SentencePiece's own encoder, run on a model proto
written from the same fields, on real sentences.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPACE = "\u2581"
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece's piece types

__all__ = ["GGUFVocabulary", "build_tokenizer", "read_vocabulary", "tokenizer_from_gguf"]


@dataclass(frozen=True)
class GGUFVocabulary:
    """The tokenizer fields of a GGUF file (ids are positions in ``pieces``)."""

    pieces: list[str]
    scores: list[float]
    types: list[int]
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool


def _field(reader, name: str, default=None):
    field = reader.fields.get(name)
    return default if field is None else field.contents()


def read_vocabulary(path: str | Path) -> GGUFVocabulary:
    """The SentencePiece vocabulary stored in the GGUF at ``path``; refuses, naming the file, a GGUF
    whose tokenizer is not SentencePiece BPE (``tokenizer.ggml.model = "llama"``) or is inconsistent."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    model = _field(reader, "tokenizer.ggml.model")
    if model != "llama":
        raise ValueError(f"{path}: tokenizer.ggml.model is {model!r}; this builder reads SentencePiece "
                         "vocabularies ('llama') only")
    pieces = _field(reader, "tokenizer.ggml.tokens")
    scores = _field(reader, "tokenizer.ggml.scores")
    types = _field(reader, "tokenizer.ggml.token_type")
    if not pieces or scores is None or types is None or not len(pieces) == len(scores) == len(types):
        raise ValueError(f"{path}: tokenizer.ggml.tokens, .scores and .token_type must be lists of one length")
    ids = {name: _field(reader, f"tokenizer.ggml.{name}_token_id") for name in ("bos", "eos", "unknown", "padding")}
    for name, value in ids.items():
        if value is not None and not 0 <= value < len(pieces):
            raise ValueError(f"{path}: tokenizer.ggml.{name}_token_id is {value}, outside the {len(pieces)} pieces")
    return GGUFVocabulary(list(pieces), [float(s) for s in scores], [int(t) for t in types], ids["bos"], ids["eos"],
                          ids["unknown"], ids["padding"], bool(_field(reader, "tokenizer.ggml.add_bos_token", True)),
                          bool(_field(reader, "tokenizer.ggml.add_eos_token", False)))


def _spelled(piece: str, kind: int) -> str:
    """A piece as the encoder sees it: spaces are ``U+2581`` in NORMAL pieces (some files store a
    whitespace-only piece with real spaces); USER_DEFINED pieces match the raw text, as stored."""
    return piece if kind == USER_DEFINED else piece.replace(" ", SPACE)


def _merges(vocab: dict[str, int], ranked: list[str]) -> list[tuple[str, str]]:
    """Every split of each merge target into two pieces of the vocabulary, best-scored target first."""
    merges = []
    for piece in ranked:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((left, right))
    return merges


def build_tokenizer(vocab: GGUFVocabulary):
    """A ``PreTrainedTokenizerFast`` that encodes as SentencePiece BPE does over ``vocab``."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    spelled = [_spelled(p, t) for p, t in zip(vocab.pieces, vocab.types)]
    table: dict[str, int] = {}
    for i, piece in enumerate(spelled):
        table.setdefault(piece, i)  # a duplicate spelling keeps its first id, as SentencePiece refuses none here
    mergeable = {p for p, t in zip(spelled, vocab.types) if t == NORMAL}
    ranked = sorted((i for i, t in enumerate(vocab.types) if t == NORMAL and len(spelled[i]) > 1),
                    key=lambda i: (-vocab.scores[i], i))
    merges = _merges({p: table[p] for p in mergeable}, [spelled[i] for i in ranked])
    unk = vocab.pieces[vocab.unk_id] if vocab.unk_id is not None else None
    tok = Tokenizer(BPE(vocab=table, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True,
                        dropout=None))
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    user = [AddedToken(vocab.pieces[i], normalized=False, special=False)
            for i, t in enumerate(vocab.types) if t == USER_DEFINED]
    control = [AddedToken(vocab.pieces[i], normalized=False, special=True)
               for i, t in enumerate(vocab.types) if t == CONTROL]
    tok.add_tokens(user)
    tok.add_special_tokens(control)
    names = {"bos": vocab.bos_id, "eos": vocab.eos_id, "unk": vocab.unk_id, "pad": vocab.pad_id}
    special = {k: vocab.pieces[v] for k, v in names.items() if v is not None}
    single = ([f"{special['bos']}:0"] if vocab.add_bos and "bos" in special else []) + ["$A:0"] + \
        ([f"{special['eos']}:0"] if vocab.add_eos and "eos" in special else [])
    pair = single + ["$B:1"] + ([f"{special['eos']}:1"] if vocab.add_eos and "eos" in special else [])
    used = {special[k]: names[k] for k in ("bos", "eos") if k in special and
            ((k == "bos" and vocab.add_bos) or (k == "eos" and vocab.add_eos))}
    tok.post_processor = processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair),
                                                       special_tokens=list(used.items()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, split_special_tokens=True,
                                   **{f"{k}_token": v for k, v in special.items()})
    fast.add_bos_token, fast.add_eos_token = vocab.add_bos, vocab.add_eos
    return fast


def tokenizer_from_gguf(path: str | Path):
    """``build_tokenizer(read_vocabulary(path))``."""
    return build_tokenizer(read_vocabulary(path))
