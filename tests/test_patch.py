"""patch_model / unpatch_model on Hugging Face models: parity, exact restore, PEFT wrappers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from conftest import DEVICE, available_backends

import ofa_kernels
from ofa_kernels import FusedLayerNorm, FusedRMSNorm
from ofa_kernels.patch import is_norm, rms_kind

transformers = pytest.importorskip("transformers")


def test_norm_recognition_and_rms_kinds():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    assert rms_kind(LlamaRMSNorm(8, eps=1e-5)) == (1e-5, 0.0, "llama")
    assert rms_kind(Gemma3RMSNorm(8, eps=1e-6)) == (1e-6, 1.0, "gemma")
    assert rms_kind(nn.RMSNorm(8, eps=1e-4))[1:] == (0.0, "gemma")
    assert rms_kind(FusedRMSNorm(8, 1e-3, offset=1.0, cast_mode="gemma")) == (1e-3, 1.0, "gemma")
    assert rms_kind(nn.LayerNorm(8)) is None and is_norm(nn.LayerNorm(8))
    assert not is_norm(nn.Linear(8, 8))


def tiny_llama(dtype=torch.float32):
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)
    return transformers.LlamaForCausalLM(cfg).to(DEVICE, dtype).eval()


def tiny_gpt2(dtype=torch.float32):
    cfg = transformers.GPT2Config(vocab_size=101, n_embd=48, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).to(DEVICE, dtype).eval()  # no dropout: parity


def tiny_bert(dtype=torch.float32):
    cfg = transformers.BertConfig(vocab_size=101, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=72, max_position_embeddings=64)
    return transformers.BertForMaskedLM(cfg).to(DEVICE, dtype).eval()


def randomise_norms(model):
    """Random-init models have unit norm weights; make them non-trivial so parity means something."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or ".ln_" in name or name.startswith("ln_"):
                p.copy_(torch.rand_like(p) + 0.5 if p.dim() == 1 and "bias" not in name else torch.randn_like(p) * 0.1)
    return model


def norm_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and p.dim() == 1
            and ("norm" in n.lower() or "ln_" in n)}


def run(model, ids):
    model.zero_grad()
    logits = model(input_ids=ids).logits
    (logits.float().square().mean()).backward()
    return logits.detach(), norm_grads(model)


MODELS = [
    pytest.param(tiny_llama, {"model.norm"} | {f"model.layers.{i}.{n}" for i in range(2)
                                              for n in ("input_layernorm", "post_attention_layernorm")}, id="llama"),
    pytest.param(tiny_gpt2, {"transformer.ln_f"} | {f"transformer.h.{i}.ln_{k}" for i in range(2) for k in (1, 2)},
                 id="gpt2"),
    pytest.param(tiny_bert, {"bert.embeddings.LayerNorm", "cls.predictions.transform.LayerNorm"}
                 | {f"bert.encoder.layer.{i}.{p}.LayerNorm" for i in range(2) for p in ("attention.output", "output")},
                 id="bert"),
]


@pytest.fixture(params=available_backends())
def backend(request, monkeypatch):
    monkeypatch.setenv("OFA_BACKEND", request.param)
    return request.param


@pytest.mark.parametrize("build,expected", MODELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_patched_model_matches_unpatched_logits_and_norm_grads(backend, build, expected, dtype):
    model = randomise_norms(build(dtype))
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 101, (2, 9), device=DEVICE)
    assert set(ofa_kernels.patch_model(model)) == expected
    got_logits, got_grads = run(model, ids)
    want_logits, want_grads = run(ref, ids)
    # fp32: reduction order only. bf16: a rounding flip in one norm can move a logit by a few ulps.
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got_logits, want_logits, rtol=tol, atol=tol)
    assert got_grads.keys() == want_grads.keys() and len(got_grads) >= len(expected)
    for name in want_grads:
        scale = want_grads[name].abs().max().item()
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=tol, atol=tol * max(scale, 1e-3))


def test_patch_keeps_parameters_dtype_device_and_requires_grad_and_unpatch_is_exact():
    model = randomise_norms(tiny_llama())
    model.model.layers[0].input_layernorm.weight.requires_grad_(False)
    originals = {n: m for n, m in model.named_modules()}
    params_before = {n: p for n, p in model.named_parameters()}
    ids = torch.randint(0, 101, (1, 7), device=DEVICE)
    before = model(input_ids=ids).logits

    names = ofa_kernels.patch_model(model)
    assert all(isinstance(model.get_submodule(n), FusedRMSNorm) for n in names)
    assert {n: p for n, p in model.named_parameters()} == params_before  # the same Parameter objects
    assert model.model.layers[0].input_layernorm.weight.requires_grad is False
    assert model.model.norm.eps == model.config.rms_norm_eps
    assert ofa_kernels.patch_model(model) == []

    assert ofa_kernels.unpatch_model(model) == names
    assert all(model.get_submodule(n) is originals[n] for n in names)
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)


def test_forward_hooks_survive_patching():
    model = tiny_gpt2()
    seen = []
    model.transformer.ln_f.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    ofa_kernels.patch_model(model)
    assert isinstance(model.transformer.ln_f, FusedLayerNorm)
    model(input_ids=torch.randint(0, 101, (1, 5), device=DEVICE))
    assert seen == [torch.Size([1, 5, 48])]


def test_peft_ln_tuning_copies_are_patched_and_still_train():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(randomise_norms(tiny_llama()), peft.LNTuningConfig(task_type="CAUSAL_LM"))
    ref = copy.deepcopy(model)
    names = ofa_kernels.patch_model(model)
    assert any(".ln_tuning_layers.default" in n for n in names) and any(n.endswith(".base_layer") for n in names)
    ids = torch.randint(0, 101, (2, 6), device=DEVICE)
    got_logits, got = run(model, ids)
    want_logits, want = run(ref, ids)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    trained = [n for n in got if "ln_tuning_layers" in n]
    assert trained and all(got[n].abs().sum() > 0 for n in trained)
    assert not any("base_layer" in n for n in got)  # the frozen originals get no gradient
    for n in trained:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-5)


def test_peft_modules_to_save_wrapper_is_patched():
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["norm"])
    model = peft.get_peft_model(randomise_norms(tiny_llama()), cfg)
    names = ofa_kernels.patch_model(model)
    assert any(n.endswith("model.norm.modules_to_save.default") for n in names)
    assert any(n.endswith("model.norm.original_module") for n in names)
    _, grads = run(model, torch.randint(0, 101, (1, 5), device=DEVICE))
    assert any("modules_to_save" in n for n in grads)


@pytest.mark.slow
def test_real_smollm2_patched_gives_the_same_logits_and_norm_grads(smollm2, backend):
    model, tokenizer = smollm2
    ids = tokenizer(["Review: a gripping, funny film.\nSentiment:"], return_tensors="pt")["input_ids"].to(DEVICE)
    want_logits, want = run(model, ids)
    names = ofa_kernels.patch_model(model)
    try:
        assert len(names) == 2 * model.config.num_hidden_layers + 1
        got_logits, got = run(model, ids)
    finally:
        ofa_kernels.unpatch_model(model)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-3)
    assert got.keys() == want.keys() and len(got) == len(names)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-3, atol=1e-4 * max(want[n].abs().max().item(), 1.0))


def test_the_public_surface_shadows_no_submodule():
    import importlib
    import pkgutil

    submodules = {m.name for m in pkgutil.iter_modules(ofa_kernels.__path__)}
    for name in ofa_kernels.__all__:
        assert name not in submodules, name
    for name in submodules - {"_C"}:
        assert isinstance(importlib.import_module(f"ofa_kernels.{name}"), type(ofa_kernels)), name


def test_every_public_name_resolves_from_its_one_table():
    assert len(set(ofa_kernels.__all__)) == len(ofa_kernels.__all__) > 30
    for name in ofa_kernels.__all__:
        assert getattr(ofa_kernels, name) is not None, name
    with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
        ofa_kernels.nothing_here  # noqa: B018


def _norm_grads_and_hvp(model, norms, ids, probes):
    """Gradient of a loss in the norm weights and its Hessian-vector product with ``probes``."""
    loss = model(input_ids=ids).logits.float().square().mean()
    grads = torch.autograd.grad(loss, norms, create_graph=True)
    hvp = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, probes, strict=True)), norms)
    return [g.detach() for g in grads] + list(hvp)


@pytest.mark.gpu
def test_a_patched_model_replays_from_a_cuda_graph_like_eager(backend):
    """Forward, backward and an HVP (double backward) of a patched tiny Llama captured as one CUDA graph:
    each replay, on new token ids and updated norm weights, equals the eager computation. Only a GPU can
    tell (off CUDA there is no graph: the check would compare the step with itself)."""
    model = randomise_norms(tiny_llama())
    model.config._attn_implementation = "eager"  # attention with a double backward on every device
    ofa_kernels.patch_model(model)
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in norms:
        p.requires_grad_(True)
    probes = [torch.randn_like(p) for p in norms]
    ids = torch.randint(0, 101, (2, 9), device=DEVICE)

    def step():
        return _norm_grads_and_hvp(model, norms, ids, probes)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()

    def replay():
        graph.replay()
        return [o.clone() for o in outputs]

    for _ in range(3):
        ids.copy_(torch.randint(0, 101, ids.shape, device=DEVICE))
        with torch.no_grad():
            for p in norms:
                p.mul_(torch.rand_like(p) + 0.5)
        got = replay()
        want = _norm_grads_and_hvp(model, norms, ids.clone(), probes)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
        assert any(g.abs().max() > 0 for g in got[len(norms):])  # the HVP is not trivially zero
