"""The anatomy OFA reads (``anatomy.py``): blocks, norms, the gain that is P_t, on random-init models
of several families' layouts (real weights: ``test_models.py``)."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE
from torch import nn

from ofa_kernels import patch_model
from ofa_kernels.fewshot import anatomy
from ofa_kernels.patch import is_norm, rms_kind


def test_a_block_without_two_norms_has_no_preconditioner():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.only = nn.LayerNorm(4)

    with pytest.raises(ValueError, match="no recognisable post-attention norm"):
        anatomy.preconditioner_norm(Block())


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
            for i, norm in enumerate(m for m in block.modules() if is_norm(m)):
                norm.weight.fill_(0.1 * (i + 1))
        assert anatomy.preconditioner_norm(block) is getattr(block, gain_name)
    want_gain = getattr(st.blocks[0], gain_name).weight.float() + rms_kind(getattr(st.blocks[0], gain_name))[1]
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
