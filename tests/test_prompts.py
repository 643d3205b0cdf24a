"""Prompt text and tokens (``prompts.py``): the authors' format, padding, the sequence start, context checks."""

from __future__ import annotations

import pytest
import torch

from ofa_kernels.fewshot import data
from ofa_kernels.fewshot import prompts as pr

TASK = data.Task("t", "Review: {text}\nSentiment:", ("negative", "positive"), "files")
ROWS = [data.Example("good film", 1, "rows.csv:2"), data.Example("dull", 0, "rows.csv:3")]


class Tok:
    """A tokenizer of one id per character (id = code point), optionally with a BOS and an EOS."""

    def __init__(self, bos=None, eos=None, pad=None):
        self.bos, self.eos, self.pad_token_id, self.eos_token_id = bos, eos, pad, eos

    def __call__(self, text, add_special_tokens=True):
        ids = [ord(c) for c in text]
        if add_special_tokens:
            ids = ([self.bos] if self.bos is not None else []) + ids + ([self.eos] if self.eos is not None else [])
        return {"input_ids": ids}


def test_the_authors_format():
    assert pr.demonstrations_prefix(TASK, ROWS) == ("Review: good film\nSentiment: positive\n"
                                                    "Review: dull\nSentiment: negative\n")
    assert pr.pair_prompt(TASK, ROWS[0], ROWS[1]) == "Review: good film\nSentiment: positive\nReview: dull\nSentiment:"
    assert pr.label_token_ids(Tok(), ["no"]) == [[32, 110, 111]]  # the leading space belongs to the label


def test_a_sequence_starts_with_the_tokenizers_own_leading_specials_only():
    assert pr.leading_ids(Tok()) == [] and pr.leading_ids(Tok(eos=1)) == []  # a trailing EOS is not leading
    assert pr.leading_ids(Tok(bos=2, eos=1)) == [2]
    assert pr.sequences(Tok(bos=2), ["ab"]) == [[2, 97, 98]] and pr.encode(Tok(bos=2), ["ab"]) == [[97, 98]]


def test_padding():
    ids, mask = pr.pad([[5, 6, 7], [8]], 0, "cpu")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert pr.padding_id(Tok(pad=3, eos=1)) == 3 and pr.padding_id(Tok(eos=1)) == 1 and pr.padding_id(Tok()) == 0
    assert [pr.padded_width(n, 8) for n in (1, 8, 9)] == [8, 8, 16] and pr.padded_width(5, None) == 5
    with pytest.raises(ValueError, match="bucket must be None or >= 0"):
        pr.padded_width(5, -1)
    with pytest.raises(ValueError, match="at least one sequence"):
        pr.pad([], 0, "cpu")


def test_context_checks_name_the_rows():
    class Model:
        class config:
            max_position_embeddings = 40

    assert pr.model_context(Model()) == 40 and pr.model_context(torch.nn.Linear(2, 2)) is None
    pr.check_context(ROWS, [[0] * 30, [0] * 5], 10, 40)  # 30 + 10 fits exactly
    with pytest.raises(ValueError, match=r"rows.csv:2: the prompt takes 41 tokens .* context of 40"):
        pr.check_context(ROWS, [[0] * 31, [0] * 5], 10, 40)
    pr.check_context(ROWS, [[0] * 999] * 2, 10, None)  # a model that states no context is not checked
    long = [data.Example("x" * 20, 0, "rows.csv:4"), data.Example("y" * 30, 1, "rows.csv:5"), *ROWS]
    # the longest pairs (a tie): rows 4 and 5, either way round, 98 characters, + the BOS + a label of 8
    with pytest.raises(ValueError, match=r"rows.csv:[45]: as a training query after the demonstration rows.csv:[45] "
                                         r"it takes 107 tokens"):
        pr.check_pairs_fit(Tok(bos=2), TASK, long, 8, 106)
    pr.check_pairs_fit(Tok(bos=2), TASK, long, 8, 107)


def test_the_context_hint_offers_fewer_shots_with_demonstrations_and_never_no_demos():
    with pytest.raises(ValueError, match=r"with the demonstrations and the label word.*use fewer --shots \(the "
                                         r"demonstrations take 30 tokens\)$") as info:
        pr.check_context(ROWS, [[0] * 11, [0] * 5], 30 + 1, 40, prefix=30)
    assert "--no-demos" not in str(info.value)  # ICL always takes them: that flag would not help
    with pytest.raises(ValueError, match=r"with the label word, more than .*; shorten the text$"):
        pr.check_context(ROWS, [[0] * 40, [0] * 5], 1, 40)


def test_label_words_sharing_a_first_token_are_refused_for_first_token_scoring():
    words = ("negation", "neg")  # one id per character: both start with the id of " "
    assert [t[0] for t in pr.label_token_ids(Tok(), words)] == [ord(" "), ord(" ")]
    pr.label_token_ids(Tok(), words, "full")  # whole-word scoring tells them apart
    with pytest.raises(ValueError, match=r"label words \['negation', 'neg'\] share their first token.*--scoring full"):
        pr.label_token_ids(Tok(), words, "first")


@pytest.mark.slow
def test_smollm2s_negation_and_neg_are_refused_for_first_token_scoring(smollm2):
    tokenizer = smollm2[1]
    ids = pr.label_token_ids(tokenizer, ("negation", "neg"))
    assert ids[0][0] == ids[1][0]  # the case the issue found: every row scored as one class
    with pytest.raises(ValueError, match="share their first token"):
        pr.label_token_ids(tokenizer, ("negation", "neg"), "first")
    assert len({t[0] for t in pr.label_token_ids(tokenizer, ("negative", "positive"), "first")}) == 2
