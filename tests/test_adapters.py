"""Adapter files are checked before they are used: options, values, dtypes, shapes and LoRA ranks."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import DEVICE

from ofa_kernels.fewshot import adapters, baselines
from ofa_kernels.fewshot.adapters import FORMAT, check_adapter_file, checked_adapter, load_adapter, save_adapter
from ofa_kernels.fewshot.cli import main
from ofa_kernels.patch import fusable_norm_parameters
from ofa_kernels.fewshot.adapters import weights_hash
from ofa_kernels.fewshot.options import AdaptOptions, AdaptResult


def _tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(DEVICE).eval()


def _write(path, tensors, options: dict | str, base_hash=""):
    from safetensors.torch import save_file

    meta = {"format": FORMAT, "base_model": "tiny", "base_hash": base_hash, "task": "sst2",
            "options": options if isinstance(options, str) else json.dumps(options), "library_version": "0"}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


@pytest.fixture
def model_and_weights():
    model = _tiny()
    params = fusable_norm_parameters(model)
    return model, {k: p.detach().cpu() * 1.1 for k, p in params.items()}, weights_hash(params)


def test_a_good_adapter_round_trips(model_and_weights, tmp_path):
    model, weights, base = model_and_weights
    path = save_adapter(AdaptResult(weights, base, options=AdaptOptions(arm="ce")), tmp_path / "a.safetensors",
                        base_model="tiny", task="sst2")
    assert check_adapter_file(path)["task"] == "sst2"
    load_adapter(model, path)
    for name, p in fusable_norm_parameters(model).items():
        assert torch.equal(p.detach().cpu(), weights[name])


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weights_are_refused(model_and_weights, tmp_path, value):
    model, weights, base = model_and_weights
    name = next(iter(weights))
    weights[name] = torch.full_like(weights[name], value)
    path = _write(tmp_path / "a.safetensors", weights, {"arm": "ce"}, base)
    with pytest.raises(ValueError, match=f"{name} holds .* non-finite"):
        check_adapter_file(path)
    with pytest.raises(ValueError, match="non-finite"):
        load_adapter(model, path)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_non_float_weights_are_refused_not_cast(model_and_weights, tmp_path, dtype):
    model, weights, base = model_and_weights
    name = next(iter(weights))
    weights[name] = torch.ones(weights[name].shape, dtype=dtype)
    with pytest.raises(ValueError, match=f"{name} is torch.{str(dtype).split('.')[-1]}; adapters hold floating"):
        load_adapter(model, _write(tmp_path / "a.safetensors", weights, {"arm": "ce"}, base))


@pytest.mark.parametrize("options, message", [
    ({"arm": "bogus"}, "arm must be one of"),
    ({"lr": "abc"}, "stored option lr must be int or float"),
    ({"shots": 2.5}, "stored option shots must be int"),
    ({"fsdp": 1}, "stored option fsdp must be bool"),
    ({"epochs": 0}, "epochs must be >= 1"),
    ("[1, 2]", "must be a JSON object"),
    ("{not json", "not JSON"),
])
def test_stored_options_are_checked(model_and_weights, tmp_path, options, message):
    _, weights, base = model_and_weights
    path = _write(tmp_path / "a.safetensors", weights, options, base)
    with pytest.raises(ValueError, match=message) as err:
        check_adapter_file(path)
    assert str(path) in str(err.value)


def test_a_lora_adapter_whose_rank_is_forged_is_refused_before_any_layer_is_built(tmp_path, monkeypatch):
    model = _tiny()
    monkeypatch.setattr(adapters, "attach", lambda *a, **k: pytest.fail("layers built before the rank was checked"))
    lin = model.model.layers[0].self_attn.q_proj
    tensors = {"model.layers.0.self_attn.q_proj.lora_A.default.weight": torch.zeros(2, lin.in_features),
               "model.layers.0.self_attn.q_proj.lora_B.default.weight": torch.zeros(lin.out_features, 2)}
    path = _write(tmp_path / "lora.safetensors", tensors, {"arm": "lora", "rank": 20000})
    with pytest.raises(ValueError, match="has rank 2, but its options say rank 20000"):
        checked_adapter(model, path)
    huge = _write(tmp_path / "huge.safetensors", tensors, {"arm": "lora", "rank": 200000})
    with pytest.raises(ValueError, match="stored options: rank must be at most 65536"):  # the options' own bound
        checked_adapter(model, huge)
    assert baselines.PEFT_ARMS  # the arm is a PEFT one


def test_the_cli_refuses_a_bad_adapter_before_any_model_loads(model_and_weights, tmp_path, capsys, monkeypatch):
    _, weights, base = model_and_weights
    weights = {k: torch.full_like(v, float("nan")) for k, v in weights.items()}
    path = _write(tmp_path / "nan.safetensors", weights, {"arm": "ce"}, base)
    import ofa_kernels.fewshot.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--task", "sst2", "--data-dir", str(tmp_path), "--adapter", str(path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "non-finite" in err and "Traceback" not in err


def test_options_field_types_follow_the_dataclass():
    kinds = {f.name: adapters._field_types(f) for f in dataclasses.fields(AdaptOptions)}
    assert kinds["lr"] == (int, float) and kinds["shots"] == (int,) and kinds["fsdp"] == (bool,)
    assert type(None) in kinds["eps"] and type(None) in kinds["memory_efficient"] and kinds["arm"] == (str,)


def test_the_peft_key_layout_round_trips_through_the_reader():
    """export writes PEFT keys with peft_key; read_adapter maps them back: one layout, both ways."""
    for name in ("model.layers.0.input_layernorm.weight", "model.norm.weight", "transformer.h.1.ln_2.bias"):
        key = adapters.peft_key(name, norm_tuning=True)
        assert key.startswith("base_model.model.") and ".ln_tuning_layers.default." in key
        assert adapters._peft_name(key) == name
    assert adapters.peft_key("model.layers.0.self_attn.q_proj.lora_A.weight", norm_tuning=False) == \
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def test_stored_options_read_back_as_they_ran_and_old_adapters_keep_their_sharpness():
    """An adapter records its options resolved (auto probe rows as they ran); one written before a field
    existed reads back that field's value of those days (``KEYED_WHEN_SET``), not today's default: an
    adapter from before ``sharpness_form`` was trained with the trace form, over every position."""
    meta = {"options": json.dumps(dataclasses.asdict(AdaptOptions().resolved()))}
    assert json.loads(meta["options"])["probe_rows"] == "last"
    assert adapters.adapter_options(meta) == AdaptOptions(probe_rows="last")
    old = {k: v for k, v in dataclasses.asdict(AdaptOptions(arm="ofa")).items()
           if k not in ("sharpness_form", "probe_rows", "j_final_norm_step")}
    read = adapters.adapter_options({"options": json.dumps(old)})
    assert (read.sharpness_form, read.rows(), read.j_final_norm_step) == ("trace", "all", True)
