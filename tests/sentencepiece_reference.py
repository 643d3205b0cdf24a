"""SentencePiece's own encoder over a GGUF vocabulary: the independent side of the tokenizer check.

Writes a SentencePiece ``ModelProto`` (BPE, byte fallback, identity normalizer that only escapes
spaces, no prefix space) from the pieces, scores and types a GGUF stores, in protobuf's wire format by
hand (field numbers from sentencepiece_model.proto), and loads it into ``sentencepiece``.
Whitespace-only pieces stored with real spaces are spelled with U+2581, as SentencePiece matches
pieces against the text after escaping its spaces.
"""

from __future__ import annotations

import struct

SPACE = "\u2581"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _bytes_field(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def _int_field(field: int, value: int) -> bytes:
    return _key(field, 0) + _varint(value)


def _float_field(field: int, value: float) -> bytes:
    return _key(field, 5) + struct.pack("<f", value)


def _id_field(field: int, value: int | None) -> bytes:
    """A special-token id; -1 (none) as protobuf writes a negative int32: ten bytes, two's complement."""
    return _int_field(field, (-1 if value is None else value) & (2**64 - 1))


def model_proto(pieces, scores, types, unk_id: int | None, bos_id: int | None, eos_id: int | None,
                pad_id: int | None) -> bytes:
    """The serialised ``ModelProto`` of a BPE SentencePiece model over these pieces."""
    out = bytearray()
    for piece, score, kind in zip(pieces, scores, types, strict=True):
        if " " in piece and not piece.strip(" "):
            piece = piece.replace(" ", SPACE)
        body = _bytes_field(1, piece.encode()) + _float_field(2, score) + _int_field(3, kind)
        out += _bytes_field(1, body)  # ModelProto.pieces
    trainer = (_int_field(3, 2)  # model_type = BPE
               + _int_field(4, len(pieces))  # vocab_size
               + _int_field(26, 1)  # allow_whitespace_only_pieces
               + _int_field(35, 1)  # byte_fallback
               + _id_field(40, unk_id) + _id_field(41, bos_id) + _id_field(42, eos_id) + _id_field(43, pad_id))
    out += _bytes_field(2, trainer)
    normalizer = (_bytes_field(1, b"identity") + _int_field(3, 0)  # add_dummy_prefix = false
                  + _int_field(4, 0)  # remove_extra_whitespaces = false
                  + _int_field(5, 1))  # escape_whitespaces = true
    out += _bytes_field(3, normalizer)
    return bytes(out)


def sentencepiece_processor(vocab):
    """A ``sentencepiece.SentencePieceProcessor`` over an ``ofa_kernels.fewshot.gguf_tokenizer.GGUFVocabulary``."""
    import sentencepiece

    proto = model_proto(vocab.pieces, vocab.scores, vocab.types, vocab.unk_id, vocab.bos_id, vocab.eos_id,
                        vocab.pad_id)
    processor = sentencepiece.SentencePieceProcessor()
    processor.LoadFromSerializedProto(proto)
    return processor
