"""Label scoring against full-logit computations, metrics, and zero-shot on the real SmolLM2."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, TASKS

from ofa_kernels.fewshot import data
from ofa_kernels.fewshot import evaluate as ev



def _tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(DEVICE, torch.float64).eval()


def test_full_and_first_scores_equal_a_full_logit_computation():
    model = _tiny()
    prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11]]
    labels = [[12], [13, 14], [15, 16, 17]]
    full = ev.label_log_probs(model, prompts, labels, scoring="full")
    first = ev.label_log_probs(model, prompts, labels, scoring="first")
    for i, p in enumerate(prompts):
        for j, lab in enumerate(labels):
            logp = F.log_softmax(model(torch.tensor([p + lab], device=DEVICE)).logits[0], -1)
            want = sum(logp[len(p) - 1 + k, t] for k, t in enumerate(lab))
            torch.testing.assert_close(full[i, j], want)
            torch.testing.assert_close(first[i, j], logp[len(p) - 1, lab[0]])


def test_macro_f1():
    assert ev.macro_f1([0, 0, 1, 1], [0, 1, 1, 1], 2) == pytest.approx((2 / 3 + 0.8) / 2)
    assert ev.macro_f1([0, 0], [1, 1], 2) == 0.0


@pytest.mark.slow
def test_smollm2_zero_shot_sst2_beats_chance(smollm2):
    model, tokenizer = smollm2
    ds = data.load_task("sst2", TASKS)
    test = data.test_subset(ds, 40)
    scores = ev.evaluate(model, tokenizer, ds.task, test)
    assert scores.accuracy >= 0.75, scores  # SmolLM2 zero-shot SST-2 is ~0.85
    first = ev.evaluate(model, tokenizer, ds.task, test, scoring="first")
    assert first.predictions == scores.predictions  # single-token label words: both rules agree


def test_a_cached_prefix_scores_like_the_prefix_in_every_prompt():
    model = _tiny()
    prefix = [20, 21, 22, 23, 24]
    prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11]]
    labels = [[12], [13, 14]]
    for scoring in ("full", "first"):
        cached = ev.label_log_probs(model, prompts, labels, scoring=scoring, prefix=ev.Prefix(model, prefix))
        inline = ev.label_log_probs(model, [prefix + p for p in prompts], labels, scoring=scoring)
        torch.testing.assert_close(cached, inline)


def test_step_batch_holds_every_tensor_of_a_step_with_its_label_index():
    from ofa_kernels.fewshot.prompts import step_batch

    prompts, conts = [[3, 4, 5], [6, 7], [8, 9, 10, 11]], [[12], [13, 14], [15, 16, 17]]
    b = step_batch(prompts, conts, 0, DEVICE, bucket=4)
    assert b["input_ids"].shape == (3, 8) and b["prompt_input_ids"].shape == (3, 4)  # 7 -> 8, 4 -> 4
    assert b["input_ids"][1].tolist() == [6, 7, 13, 14, 0, 0, 0, 0] and b["attention_mask"][1].sum() == 4
    assert b["positions"].tolist() == [2, 1, 3] and b["first_tokens"].tolist() == [12, 13, 15]
    # entry (row, column, token) per continuation token, 3 per row; padding entries weigh 0
    assert b["label_rows"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert b["label_cols"].tolist()[:5] == [2, 0, 0, 1, 2] and b["label_tokens"].tolist()[6:] == [15, 16, 17]
    assert b["label_weight"].tolist() == [1, 0, 0, 1, 1, 0, 1, 1, 1]
    shard = step_batch(prompts, conts, 0, DEVICE, bucket=4, rows=slice(1, 3))
    assert shard["input_ids"].shape == (2, 8) and torch.equal(shard["input_ids"], b["input_ids"][1:])
    assert shard["label_rows"].tolist() == [0, 0, 0, 1, 1, 1]  # numbered within the shard
    with pytest.raises(ValueError, match="non-empty continuations"):
        step_batch(prompts, conts[:2], 0, DEVICE)
    with pytest.raises(ValueError, match="bucket"):
        step_batch(prompts, conts, 0, DEVICE, bucket=-1)


def test_indexed_log_probs_equal_continuation_scores():
    from ofa_kernels.fewshot.anatomy import structure
    from ofa_kernels.fewshot.objectives import indexed_log_probs
    from ofa_kernels.fewshot.prompts import step_batch

    model = _tiny()
    prompts, conts = [[3, 4, 5], [6, 7], [8, 9, 10, 11]], [[12], [13, 14], [15, 16, 17]]
    st = structure(model)
    b = step_batch(prompts, conts, 0, DEVICE, bucket=16)
    hidden = st.base(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)[0]
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.log_softmax(-1)
    want = [sum(logits[i, len(p) - 1 + k, t] for k, t in enumerate(c)) for i, (p, c) in enumerate(zip(prompts, conts, strict=True))]
    torch.testing.assert_close(indexed_log_probs(hidden, st.head, b), torch.stack(want))


def test_a_text_longer_than_the_context_is_refused_with_its_file_and_line(smollm2):
    _, tokenizer = smollm2
    model = _tiny()  # a context of 64 positions
    model.resize_token_embeddings(len(tokenizer))
    task = data.Task("t", "Text: {text}\nLabel:", ("no", "yes"), "files")
    short = [data.Example("fine", 0, "rows.csv:2")]
    assert len(ev.evaluate(model, tokenizer, task, short).predictions) == 1
    long = [*short, data.Example("word " * 80, 1, "rows.csv:3")]
    with pytest.raises(ValueError, match=r"rows.csv:3: the prompt takes \d+ tokens .* context of 64"):
        ev.evaluate(model, tokenizer, task, long)
    with pytest.raises(ValueError, match="rows.csv:2: .*demonstrations"):  # the prefix counts too
        ev.evaluate(model, tokenizer, task, short, demonstrations=[data.Example("word " * 70, 0, "rows.csv:9")])


def test_a_long_prefix_scores_fewer_prompts_per_batch_with_the_same_predictions(smollm2, monkeypatch):
    model, tokenizer = smollm2
    ds = data.load_task("trec", TASKS)  # six label words, several of them more than one token
    test, demos = data.test_subset(ds, 12), list(ds.pool[:6])
    calls = []
    real = ev.label_log_probs

    def counted(model, prompt_ids, label_ids, **kw):
        calls.append(len(prompt_ids))
        return real(model, prompt_ids, label_ids, **kw)

    monkeypatch.setattr(ev, "label_log_probs", counted)
    whole = ev.evaluate(model, tokenizer, ds.task, test, demonstrations=demos, batch_size=16)
    assert calls == [12]
    monkeypatch.setattr(ev, "PREFIX_TOKEN_BUDGET", 1)  # one prompt per batch
    calls.clear()
    split = ev.evaluate(model, tokenizer, ds.task, test, demonstrations=demos, batch_size=16)
    assert calls == [1] * 12
    assert split.predictions == whole.predictions


def test_prompts_per_batch():
    assert ev.prompts_per_batch(16, 0, 6) == 16  # no prefix: no copies of its cache
    assert ev.prompts_per_batch(16, 1000, 6) == ev.PREFIX_TOKEN_BUDGET // 6000
    assert ev.prompts_per_batch(16, 10, 1) == 16
    assert ev.prompts_per_batch(16, 10**6, 6) == 1
