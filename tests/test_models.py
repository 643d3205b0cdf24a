"""Model loading by name, and the anatomy OFA reads, on real Gemma 3 weights and on random-init
models of other families' layouts (no real weights for those here)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE

from ofa_kernels import anatomy, models, patch_model, unpatch_model
from ofa_kernels.prompts import leading_ids

PLAIN_ENGLISH = ["The cat sat on the mat and looked out of the window.",
                 "It was a bright cold day in April, and the clocks were striking thirteen.",
                 "Water boils at one hundred degrees Celsius at sea level.",
                 "She opened the door and walked into the kitchen to make some tea."]


def _perplexity(model, tokenizer, texts, with_bos: bool = True) -> float:
    nll, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text, add_special_tokens=with_bos)["input_ids"]], device=DEVICE)
        with torch.no_grad():
            logp = model(ids).logits.float().log_softmax(-1)
        nll -= logp[0, :-1].gather(-1, ids[0, 1:, None]).sum().item()
        count += ids.shape[1] - 1
    return math.exp(nll / count)


def test_gemma3_by_name_is_a_working_language_model_with_its_bos(gemma3):
    model, tokenizer = gemma3
    assert type(model).__name__ == "Gemma3ForCausalLM" and len(model.model.layers) == 18
    assert leading_ids(tokenizer) == [tokenizer.bos_token_id]
    # measured 27.4 with BOS, ~1500 without (RESULTS.md, "Gemma 3 270M"); the tokenizer split into
    # characters gave ~500,000
    assert _perplexity(model, tokenizer, PLAIN_ENGLISH) < 60
    assert _perplexity(model, tokenizer, PLAIN_ENGLISH, with_bos=False) > 300


def test_gemma3_patched_keeps_its_logits_and_norm_gradients_within_the_stated_bound(gemma3):
    """Bound: 1e-5 of the largest logit / norm gradient (``selfcheck``'s); measured 1.0e-6 / 2.1e-6 (fp32):
    rounding only, the fused norm and HF's differ by an ulp per norm, carried through 18 blocks."""
    from ofa_kernels.selfcheck import LOGIT_BOUND

    model, tokenizer = gemma3
    ids = torch.tensor([tokenizer("Review: a gripping, funny and moving film.\nSentiment:")["input_ids"]], device=DEVICE)

    def logits_and_grads():
        model.zero_grad(set_to_none=True)
        for n, p in model.named_parameters():
            p.requires_grad_("norm" in n)
        logits = model(ids).logits[0, -1]
        logits.logsumexp(-1).backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want, want_grads = logits_and_grads()
    names = patch_model(model)
    try:
        got, got_grads = logits_and_grads()
    finally:
        unpatch_model(model)
        for p in model.parameters():
            p.requires_grad_(False)
    assert len(names) == 109 and len(want_grads) == 109
    assert (got - want).abs().max() <= LOGIT_BOUND * want.abs().max()
    scale = max(g.abs().max() for g in want_grads.values())
    assert max((got_grads[n] - want_grads[n]).abs().max() for n in want_grads) <= 1e-4 * scale


def test_ofa_check_passes_on_gemma3(gemma3, capsys):
    from ofa_kernels.selfcheck import run_selfcheck

    assert run_selfcheck(device=str(DEVICE), model_name=models.GEMMA3_270M) == 0
    assert "patched 109 norms" in capsys.readouterr().out


def test_an_unknown_name_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match=r"'gemma9' is not one of the named models \['gemma3-270m', 'smollm2'\]"):
        models.find_gguf("gemma9")


# ---------------------------------------------------------------- layouts of other families, random init

def _families():
    import transformers as tf

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=64)
    return {  # name: (model, the norm whose gain is P_t, norms per block)
        "qwen2": (tf.Qwen2ForCausalLM(tf.Qwen2Config(**small)), "post_attention_layernorm", 2),
        "qwen3": (tf.Qwen3ForCausalLM(tf.Qwen3Config(**small, head_dim=16)), "post_attention_layernorm", 4),
        "phi3": (tf.Phi3ForCausalLM(tf.Phi3Config(**small, pad_token_id=0)), "post_attention_layernorm", 2),
        "gemma2": (tf.Gemma2ForCausalLM(tf.Gemma2Config(**small, head_dim=16)), "post_feedforward_layernorm", 4),
        "gemma3": (tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**small, head_dim=16)), "post_feedforward_layernorm", 6),
        "olmo2": (tf.Olmo2ForCausalLM(tf.Olmo2Config(**small, pad_token_id=0)), "post_feedforward_layernorm", 4),
    }


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "phi3", "gemma2", "gemma3", "olmo2"])
def test_each_family_has_its_preconditioner_and_every_norm_trained(family):
    torch.manual_seed(0)
    model, gain_name, per_block = _families()[family]
    model = model.to(DEVICE).eval()
    st = anatomy.structure(model)
    for block in st.blocks:
        with torch.no_grad():  # a gain that differs per norm, so the choice shows in P_t
            for i, norm in enumerate(m for m in block.modules() if anatomy.is_norm(m)):
                norm.weight.fill_(0.1 * (i + 1))
        assert anatomy.preconditioner_norm(block) is getattr(block, gain_name)
    want_gain = getattr(st.blocks[0], gain_name).weight.float() + anatomy.rms_kind(getattr(st.blocks[0], gain_name))[1]
    torch.testing.assert_close(anatomy.preconditioners(model)[0], want_gain)
    ids = torch.randint(1, 64, (2, 7), device=DEVICE)
    with torch.no_grad():
        want = model(ids).logits
    names = patch_model(model)
    assert len(names) == per_block * len(st.blocks) + 1  # q_norm / k_norm (head-dim) included, and the final norm
    trained = anatomy.norm_parameters(model)
    assert len(trained) == len(names)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-4, atol=1e-5)
