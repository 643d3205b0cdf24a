"""The PEFT baselines (``ofa_kernels.fewshot.baselines``): the configs they build from ``(arm, rank)``, and the
adapters they attach, which start as the identity and are the only parameters left to train."""

from __future__ import annotations

import pytest
import torch

from ofa_kernels.fewshot import baselines

pytest.importorskip("peft")


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("rank", [1, 3])
def test_lora_config_has_the_rank_twice_the_rank_as_alpha_and_no_dropout(rank):
    config = baselines.peft_config("lora", rank)
    assert (config.r, config.lora_alpha, config.lora_dropout) == (rank, 2 * rank, 0.0)


def test_ia3_config_and_a_norm_arm_is_refused_naming_the_peft_arms():
    from peft import IA3Config

    assert isinstance(baselines.peft_config("ia3"), IA3Config)
    with pytest.raises(ValueError, match=r"arm must be one of \('lora', 'ia3'\) for a PEFT baseline, got 'ofa'"):
        baselines.peft_config("ofa")


@pytest.mark.parametrize("arm, rank", [("lora", 3), ("ia3", 1)])
def test_attached_adapters_start_as_the_identity_and_are_the_trainable_parameters(arm, rank):
    model = _tiny_llama()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    params = baselines.attach(model, arm, rank)
    marker = "lora_" if arm == "lora" else "ia3_"
    assert params and all(marker in name and p.requires_grad for name, p in params.items())
    assert set(params) == {n for n, _ in model.named_parameters() if marker in n}
    if arm == "lora":
        shapes = {tuple(p.shape) for n, p in params.items() if "lora_A" in n}
        assert shapes == {(rank, 32)}  # q_proj and v_proj read the 32-wide hidden state
        assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in params} == {"q_proj", "v_proj"}
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)
    # the adapters do move the output once trained
    with torch.no_grad():
        for p in params.values():
            p.add_(0.5)
        assert not torch.allclose(model(input_ids=ids).logits, before)


def test_a_model_without_a_config_is_refused_before_injection():
    with pytest.raises(ValueError, match=r"PEFT baselines need a Hugging Face model \(with \.config\)"):
        baselines.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)), "lora")


def test_a_lora_rank_above_the_adapted_layers_is_refused_before_any_allocation():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1))
    before = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match=r"rank 99999999999 is above the narrowest layer LoRA adapts here \(8 wide\)"):
        baselines.attach(model, "lora", 99999999999)
    assert sum(p.numel() for p in model.parameters()) == before  # nothing was injected
    assert len(baselines.attach(model, "lora", 8)) == 8  # q and v of 2 layers, A and B each


def test_an_absurd_rank_is_refused_by_the_options_before_a_model_loads():
    from ofa_kernels.fewshot.options import MAX_RANK, AdaptOptions

    with pytest.raises(ValueError, match=rf"rank must be at most {MAX_RANK}"):
        AdaptOptions(arm="lora", rank=99999999999).check()
