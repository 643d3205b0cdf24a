"""The memory-efficient training step gives the plain step's loss and gradients; checkpointing engages."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

from ofa_kernels.fewshot import anatomy, memory, objectives
from ofa_kernels.patch import patch_model
from ofa_kernels.fewshot.prompts import step_batch
from ofa_kernels.fewshot.trainer import AdaptOptions, norm_parameters, training_step


def _model(dtype, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=101, hidden_size=40, intermediate_size=56, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to(DEVICE, dtype).eval()
    patch_model(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in norm_parameters(model).values():  # away from 1, so every gain matters
        p.data.add_(0.1 * torch.randn_like(p))
        p.requires_grad_(True)
    return model


def _batch(seed=1, bucket=None, rows=slice(None)):
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(10, 101, (p,), generator=gen).tolist() for p in (7, 5, 9)]
    return step_batch(prompts, [[5, 6], [7], [8, 9]], 0, DEVICE, bucket=bucket, rows=rows)


def _step(dtype, options, bucket=None, rows=slice(None), **kwargs):
    model = _model(dtype)
    batch = _batch(bucket=bucket, rows=rows)
    out = training_step(model, batch, options, objectives.preconditioners(model), 11, **kwargs)
    return out, {n: p.grad.clone() for n, p in norm_parameters(model).items()}


@pytest.mark.parametrize("estimator", ["fd", "hvp"])
@pytest.mark.parametrize("scoring", ["full", "first"])
def test_a_step_padded_to_a_bucket_equals_the_unpadded_step(estimator, scoring):
    """Widths rounded up to a multiple of 8 (11 -> 16): for one sequence per step (the paper's protocol)
    the masked padding changes neither the loss, its parts nor any gradient, so steps can share a
    captured shape. With several sequences CE and J are unchanged too, but S draws other probes: a
    probe element's counter is its row of the flattened [B * T] states, which padding renumbers."""
    options = AdaptOptions(arm="ofa", estimator=estimator, num_probes=2, distribution="rademacher", scoring=scoring)
    one = slice(2, 3)
    plain, want = _step(torch.float64, options, rows=one)
    padded, got = _step(torch.float64, options, bucket=8, rows=one)
    assert _batch(bucket=8, rows=one)["input_ids"].shape == (1, 16) and _batch(rows=one)["input_ids"].shape == (1, 11)
    for key in plain:
        assert float(padded[key]) == pytest.approx(float(plain[key]), rel=1e-12), key
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=name)
    several, padded_several = _step(torch.float64, options)[0], _step(torch.float64, options, bucket=8)[0]
    for key in ("ce", "J"):
        assert float(padded_several[key]) == pytest.approx(float(several[key]), rel=1e-12), key


@pytest.mark.parametrize("estimator", ["fd", "jvp", "hvp", "fd-last"])
@pytest.mark.parametrize("per_pass", [1, 3])
def test_memory_efficient_step_equals_the_plain_step(estimator, per_pass):
    """With riding probes ("fd-last") the lean step checkpoints the one pass; all probes ride in it."""
    estimator, _, rows = estimator.partition("-")
    options = AdaptOptions(arm="ofa", estimator=estimator, num_probes=4, distribution="rademacher",
                           probe_rows=rows or "all")
    plain, want = _step(torch.float64, options)
    lean, got = _step(torch.float64, options, memory_efficient=True, probes_per_pass=per_pass)
    assert set(plain) == {"loss", "ce", "J", "S"}
    for key in plain:
        assert float(lean[key]) == pytest.approx(float(plain[key]), rel=1e-12), key
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=name)


def test_memory_efficient_step_in_bf16_matches_within_bf16_tolerance():
    options = AdaptOptions(arm="ofa", estimator="fd", num_probes=2)
    plain, want = _step(torch.bfloat16, options)
    lean, got = _step(torch.bfloat16, options, memory_efficient=True, probes_per_pass=1)
    assert float(lean["loss"]) == pytest.approx(float(plain["loss"]), rel=2e-2)
    for name in want:
        torch.testing.assert_close(got[name].float(), want[name].float(), rtol=5e-2, atol=5e-2 * want[name].abs().max().item())


def test_checkpointing_recomputes_the_blocks_and_restores_them():
    model = _model(torch.float32)
    calls = []
    handle = model.model.layers[1].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    options = AdaptOptions(arm="ce")
    training_step(model, _batch(), options, objectives.preconditioners(model), 0)
    plain_calls = len(calls)
    calls.clear()
    training_step(model, _batch(), options, objectives.preconditioners(model), 0, memory_efficient=True)
    assert plain_calls == 1 and len(calls) == 2  # the forward, and its recomputation in the backward
    handle.remove()
    assert all("forward" not in block.__dict__ for block in model.model.layers)


def test_probe_budget():
    assert memory.probes_per_pass(4, 1e9, None, torch.device("cpu")) == 4
    assert memory.probes_per_pass(4, 1e9, 1.0, torch.device("cpu")) == 4  # budgets apply to CUDA memory only


def test_lean_step_default():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert not memory.use_lean_step(cpu, 10**6, 20.0)
    assert memory.use_lean_step(cuda, 4 * 512, None) and not memory.use_lean_step(cuda, 256, None)
    assert memory.use_lean_step(cuda, 256, 20.0)


@pytest.mark.parametrize("estimator", ["fd", "jvp", "hvp", "fd-last"])
@pytest.mark.parametrize("lean", [False, True])
def test_a_training_step_reads_nothing_back_to_the_host(monkeypatch, estimator, lean):
    """No .item()/float()/int()/.tolist() inside the step: on a GPU each would wait for the device."""
    model = _model(torch.float32)
    batch, gammas = _batch(), objectives.preconditioners(model)
    estimator, _, rows = estimator.partition("-")
    options = AdaptOptions(arm="ofa", estimator=estimator, num_probes=2, probe_rows=rows or "all")
    reads = []

    def refuse(name):
        def read(self, *args, **kwargs):
            reads.append(name)
            raise AssertionError(f"Tensor.{name} called inside the training step")
        return read

    seed = torch.tensor(3, device=DEVICE)  # as adapt passes it: a device scalar it advances in place
    for name in ("item", "tolist", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, refuse(name))
    monkeypatch.setattr(torch, "tensor", refuse("torch.tensor"))  # nor a tensor built from host values
    monkeypatch.setattr(anatomy, "last_positions", refuse("last_positions"))  # its check reads the mask back
    out = training_step(model, batch, options, gammas, seed, memory_efficient=lean, probes_per_pass=1)
    monkeypatch.undo()
    assert not reads
    assert set(out) == {"loss", "ce", "J", "S"}
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in out.values())
    assert float(out["loss"]) == pytest.approx(float(out["ce"]) + 1e-2 * float(out["J"]) + 1e-3 * float(out["S"]))


@pytest.mark.parametrize("scoring, form", [("full", "trace"), ("first", "trace"), ("full", "gain"), ("first", "gain")])
def test_the_one_pass_step_is_ce_j_and_the_riding_s_of_the_prompts(scoring, form):
    """probe_rows="last": one pass over prompt + label word gives the loss and gradients of CE + J (the
    plain step's) plus lambda_S * S as sharpness(probe_rows="last") computes it on the prompts alone
    (the riders copy the prompt's last token, not the sequence's, and draw the prompts' layout), in the
    trace form and per unit gain."""
    options = AdaptOptions(arm="ofa", num_probes=3, distribution="rademacher", probe_rows="last", scoring=scoring,
                           sharpness_form=form)
    got, got_grads = _step(torch.float64, options)
    model = _model(torch.float64)
    batch = _batch()
    gammas = objectives.preconditioners(model)
    clean = training_step(model, batch, AdaptOptions(arm="ce+J", scoring=scoring), gammas, 11)
    prompts = {"input_ids": batch["prompt_input_ids"], "attention_mask": batch["prompt_attention_mask"],
               "positions": batch["positions"]}
    s = objectives.sharpness(model, prompts, probe_rows="last", num_probes=3, distribution="rademacher", seed=11,
                             gammas=gammas, per_gain=form == "gain")
    (1e-3 * s).backward()
    for key in ("ce", "J"):
        assert float(got[key]) == pytest.approx(float(clean[key]), rel=1e-12), key
    assert float(got["S"]) == pytest.approx(float(s), rel=1e-12)
    assert float(got["loss"]) == pytest.approx(float(clean["loss"]) + 1e-3 * float(s), rel=1e-12)
    for name, p in norm_parameters(model).items():
        torch.testing.assert_close(got_grads[name], p.grad, rtol=1e-10, atol=1e-12, msg=name)
