"""Exports: a merged Hugging Face folder and a PEFT adapter folder each reproduce the adapted logits;
a PEFT LN_TUNING folder loads back through ``load_adapter``; bad input is refused before writing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ofa_kernels import export_hf, export_peft, load_adapter, save_adapter
from ofa_kernels.fewshot.baselines import attach
from ofa_kernels.patch import fusable_norm_parameters, unpatch_model
from ofa_kernels.fewshot.adapters import weights_hash
from ofa_kernels.fewshot.options import AdaptOptions, AdaptResult

pytest.importorskip("peft")


def _tiny(kind: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if kind == "gpt2":  # LayerNorm with a bias
        return GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=40, n_layer=2, n_head=4, bos_token_id=0,
                                          eos_token_id=0)).eval()
    return LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=40, intermediate_size=56, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def _adapter(base, arm: str, path):
    """An adapter for ``base`` with weights visibly away from the base (what training produces)."""
    if arm in ("lora", "ia3"):
        probe = _copy(base)
        options = AdaptOptions(arm=arm)
        weights = {n: p.detach() + 0.2 * torch.randn_like(p) for n, p in attach(probe, options.arm, options.rank).items()}
    else:
        options = AdaptOptions(arm=arm)
        weights = {n: p.detach() + 0.2 * torch.randn_like(p) for n, p in fusable_norm_parameters(base).items()}
    result = AdaptResult(weights, weights_hash(fusable_norm_parameters(base)), [], [], options)
    return save_adapter(result, path, base_model="tiny", task="sst2")


def _copy(model):
    import copy

    return copy.deepcopy(model)


def _adapted(base, adapter):
    """The adapted model computing with the model's own norm classes (the arithmetic the exports keep)."""
    adapted = _copy(base)
    load_adapter(adapted, adapter)
    unpatch_model(adapted)
    return adapted


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("kind,arm", [("llama", "ofa"), ("gpt2", "ofa"), ("llama", "lora"), ("llama", "ia3")])
def test_exports_reproduce_the_adapted_logits(tmp_path, kind, arm):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = _tiny(kind)
    base.save_pretrained(tmp_path / "base")
    adapter = _adapter(base, arm, tmp_path / "a.safetensors")
    adapted = _adapted(base, adapter)
    ids = torch.randint(0, 97, (2, 9))
    want = _logits(adapted, ids)
    assert (want - _logits(base, ids)).abs().max() > 1e-2  # the adapter changes the model: the checks below bite

    with pytest.warns(UserWarning, match="no tokenizer"):
        export_hf(str(tmp_path / "base"), adapter, tmp_path / "hf")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(merged) is type(base)
    torch.testing.assert_close(_logits(merged, ids), want, rtol=0, atol=1e-6)

    with pytest.warns(UserWarning, match="no tokenizer"):
        export_peft(str(tmp_path / "base"), adapter, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == {"ofa": "LN_TUNING", "lora": "LORA", "ia3": "IA3"}[arm]
    assert config["base_model_name_or_path"] == str(tmp_path / "base")
    served = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval(),
                                       tmp_path / "peft").eval()
    torch.testing.assert_close(_logits(served, ids), want, rtol=0, atol=1e-6)

    if arm == "ofa":  # and back: load_adapter reads PEFT's LN tuning folder
        back = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
        meta = load_adapter(back, tmp_path / "peft")
        assert meta["format"] == "peft/LN_TUNING" and meta["base_model"] == str(tmp_path / "base")
        torch.testing.assert_close(_logits(back, ids), want, rtol=0, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "base", "hf", "peft"]  # no temp left


def test_a_loaded_model_is_exported_and_peft_export_leaves_it_at_its_base(tmp_path):
    from peft import PeftModel

    base = _tiny("llama")
    adapter = _adapter(base, "ofa", tmp_path / "a.safetensors")
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    export_peft(base, adapter, tmp_path / "peft", base_model="my/base")
    assert {n: p for n, p in base.named_parameters()}.keys() == before.keys()
    for n, p in base.named_parameters():
        assert torch.equal(p, before[n]), n
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"] == "my/base"
    ids = torch.randint(0, 97, (1, 5))
    adapted = _adapted(base, adapter)
    served = PeftModel.from_pretrained(_copy(base), tmp_path / "peft").eval()
    torch.testing.assert_close(_logits(served, ids), _logits(adapted, ids), rtol=0, atol=1e-6)


def test_exports_refuse_bad_input_before_writing(tmp_path):
    base = _tiny("llama")
    adapter = _adapter(base, "ofa", tmp_path / "a.safetensors")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        export_hf(_copy(base), adapter, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    other = _copy(base)  # another base: same shapes, other norm weights
    with torch.no_grad():
        other.model.norm.weight.mul_(1.5)
    with pytest.raises(ValueError, match="another base model"):
        export_peft(other, adapter, tmp_path / "p")
    with pytest.raises(ValueError, match="another base model"):
        export_hf(other, adapter, tmp_path / "h")
    assert not (tmp_path / "p").exists() and not (tmp_path / "h").exists()
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ValueError, match="LN_TUNING folders"):
        load_adapter(_copy(base), tmp_path / "lora")
    (tmp_path / "empty").mkdir()
    export_hf(_copy(base), adapter, tmp_path / "empty")  # an empty folder is fine
    assert (tmp_path / "empty" / "config.json").is_file()


def test_cli_export_writes_both_formats_and_refuses_a_full_folder(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    adapter = _adapter(base, "ofa", tmp_path / "a.safetensors")
    cmd = [sys.executable, "-m", "ofa_kernels.fewshot.cli", "export", "--adapter", str(adapter), "--model", str(tiny_model_dir)]
    for fmt in ("hf", "peft"):
        run = subprocess.run([*cmd, "--format", fmt, "--out", str(tmp_path / fmt)], capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        assert f"wrote {tmp_path / fmt}" in run.stdout
    assert AutoTokenizer.from_pretrained(tmp_path / "hf")("hello").input_ids  # the tokenizer came along
    bad = subprocess.run([*cmd, "--out", str(tmp_path / "hf")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--out" in bad.stderr and "not an empty folder" in bad.stderr
    foreign = tmp_path / "x.safetensors"
    foreign.write_bytes(b"not safetensors")
    bad = subprocess.run([*cmd[:5], str(foreign), *cmd[6:], "--out", str(tmp_path / "y")], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "--adapter" in bad.stderr and not (tmp_path / "y").exists()


@pytest.mark.slow
def test_smollm2_exports_reproduce_the_adapted_logits(smollm2, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ofa_kernels.fewshot.models import cache_dir

    tokenizer = smollm2[1]
    base_dir = cache_dir() / "smollm2-135m-instruct-fp32"
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    adapter = _adapter(base, "ofa", tmp_path / "a.safetensors")
    adapted = _adapted(base, adapter)
    ids = tokenizer("Review: a gentle, funny film.\nSentiment:", return_tensors="pt").input_ids
    want = _logits(adapted, ids)
    export_hf("smollm2", adapter, tmp_path / "hf")
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval(), ids), want,
                               rtol=0, atol=1e-6)
    export_peft("smollm2", adapter, tmp_path / "peft")
    served = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    torch.testing.assert_close(_logits(served, ids), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("change, message", [
    ({"lora_alpha": 16}, "unknown keys \\['lora_alpha'\\]"),
    ({"fancy_new_setting": True}, "unknown keys \\['fancy_new_setting'\\]"),
    ({"target_modules": ["q_proj"]}, "does not name; the config and the weights disagree"),
    ({"target_modules": 7}, "target_modules must be a module name"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
])
def test_a_peft_folder_whose_config_says_other_than_its_weights_is_refused(tmp_path, change, message):
    base = _tiny("llama")
    base.save_pretrained(tmp_path / "base")
    adapter = _adapter(base, "ofa", tmp_path / "a.safetensors")
    export_peft(str(tmp_path / "base"), adapter, tmp_path / "peft")
    config_path = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    load_adapter(_copy(base), tmp_path / "peft")  # as written, it loads
    config_path.write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=message):
        load_adapter(_copy(base), tmp_path / "peft")
