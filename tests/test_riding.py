"""The probe riding as extra rows of the clean pass (``probe_rows="last"``), against plain passes in fp64.

- The clean rows beside the riders equal a plain pass (states and final hidden states).
- S's terms and the norm-weight gradients equal a second pass that perturbs only the last token,
  written here in plain PyTorch with the host probe generator.
- Per block, the expectation of q equals the all-positions estimator's (a paired z-test), with the
  variance ratio printed.
Every layout the library reads: Llama, GPT-2 (learned positions), Qwen2, Gemma 3 (sliding-window
layers whose window the riders must respect).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE

import ofa_kernels
from ofa_kernels.fewshot import anatomy
from ofa_kernels.fewshot import objectives as obj
from ofa_kernels.ops.probe import perturb
from ofa_kernels.rng import ProbeStream
from ofa_kernels.fewshot.riding import RiderProbes, RidingTap, riding_batch

KINDS = ["llama", "gpt2", "qwen2", "gemma3"]
VOCAB = 50


def _tiny(kind: str, attn: str = "sdpa"):
    torch.manual_seed(4321)
    import transformers as tf

    if kind == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=VOCAB, hidden_size=12, intermediate_size=20,
                                                   num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                                                   max_position_embeddings=32, attn_implementation=attn))
    elif kind == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=12, n_layer=3, n_head=2, n_positions=32,
                                                 attn_implementation=attn, bos_token_id=0, eos_token_id=0))
    elif kind == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(vocab_size=VOCAB, hidden_size=12, intermediate_size=20,
                                                   num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                                                   max_position_embeddings=32, attn_implementation=attn))
    else:  # sliding window 3 over sequences of 7: the window decides what the last token sees
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
            vocab_size=VOCAB, hidden_size=12, intermediate_size=20, num_hidden_layers=3, num_attention_heads=2,
            num_key_value_heads=1, head_dim=6, max_position_embeddings=32, sliding_window=3,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"], attn_implementation=attn))
    model = model.to(DEVICE, torch.float64).eval()
    with torch.no_grad():  # non-trivial gains
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "ln_" in name) and name.endswith("weight"):
                p.copy_(0.5 + torch.rand_like(p) if "gemma" not in type(model).__name__.lower()
                        else torch.rand_like(p) - 0.5)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _batch(B=3, T=7):
    """Right padding in row 1, a prompt that ends before the sequence's end in row 2 (label tokens after it)."""
    ids = torch.randint(0, VOCAB, (B, T), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, T - 3:] = 0
    pos = anatomy.last_positions(mask)
    if B > 2:
        pos[2] = T - 3  # the prompt's last token; two label tokens follow
    return {"input_ids": ids, "attention_mask": mask, "positions": pos}


def _last_token_rerun(model, batch, seed, K, eps, distribution="rademacher"):
    """q of a second pass that perturbs only each sequence's token at pos, in plain PyTorch: [K, L-1, B]."""
    st = anatomy.structure(model)
    ids, mask, pos = batch["input_ids"], batch["attention_mask"], batch["positions"]
    B, T = ids.shape
    rows = torch.arange(B, device=DEVICE)
    gammas = anatomy.preconditioners(model)
    at_pos = torch.zeros(B, T, 1, dtype=torch.float64, device=DEVICE)
    at_pos[rows, pos] = 1
    clean = anatomy.StateTap(st, pos, None).run(ids, mask)
    out = []
    for k in range(K):
        nus = {}

        def add(t, x):
            if t == 0:
                return x
            nu = ofa_kernels.probes(x.shape, seed, distribution, layer=t, probe=k, device=DEVICE, dtype=x.dtype)
            nus[t] = nu[rows, pos]
            return x + eps * gammas[t].to(x.dtype) * nu * at_pos

        tap = anatomy.StateTap(st, pos, add)
        pert = tap.run(ids, mask)
        out.append(torch.stack([-(nus[t] * ((pert[t + 1] - tap.fed[t]) - (clean[t + 1] - clean[t]))).sum(-1) / eps
                                for t in range(1, len(st.blocks))]))
    return torch.stack(out)


@pytest.mark.parametrize("kind", KINDS)
def test_the_clean_rows_beside_the_riders_equal_a_plain_pass(kind):
    model = _tiny(kind)
    batch = _batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        want, want_full = anatomy.last_token_states(model, inputs, batch["positions"], return_final=True)
        got, got_full, q = obj.riding_pass(model, inputs, batch["positions"], layout_width=7, num_probes=3, seed=1)
    assert q.shape == (3, 2, 3)
    assert len(got) == len(want) == 4
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got_full[real], want_full[real], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_riding_terms_and_gradients_equal_a_rerun_perturbing_only_the_last_token(kind):
    """fp64, fused norms: q within 1e-9 relative and every norm-weight gradient of S within 1e-8."""
    model = _tiny(kind)
    ofa_kernels.patch_model(model)
    params = list(anatomy.norm_parameters(model).values())
    for p in params:
        p.requires_grad_(True)
    batch = _batch()
    seed, K = int(torch.randint(0, 2**31, ())), 2
    gammas = anatomy.preconditioners(model)
    q = obj.sharpness_terms(model, batch, probe_rows="last", num_probes=K, seed=seed, eps=1e-3, gammas=gammas,
                            backend="torch")
    want = _last_token_rerun(model, batch, seed, K, 1e-3)
    assert q.shape == want.shape == (K, 2, 3)
    torch.testing.assert_close(q, want, rtol=1e-9, atol=1e-9 * float(want.detach().abs().max()))
    got_grads = torch.autograd.grad(obj.softplus_mean(q), params)
    want_grads = torch.autograd.grad(obj.softplus_mean(want), params)
    assert any(float(g.abs().sum()) > 0 for g in want_grads)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-8 * max(float(w.abs().max()), 1e-30))


def test_riders_draw_the_all_positions_estimators_last_token_probe():
    """The rider of sequence b, probe k, block t adds exactly the numbers that perturb() adds at pos in the
    all-positions pass's [K * B, T, d] slab."""
    model = _tiny("llama")
    batch = _batch()
    st = anatomy.structure(model)
    pos = batch["positions"]
    gammas = anatomy.preconditioners(model)
    B, T, d, K = 3, 7, 12, 2
    rb = riding_batch(batch["input_ids"], batch["attention_mask"], pos, K, torch.float64)
    probe = torch.arange(K, device=DEVICE).repeat_interleave(B)
    base = ((torch.arange(B, device=DEVICE) * T + pos) * d).repeat(K)
    tap = RidingTap(st, pos, rb, RiderProbes([1, 2], gammas, 9, 0, K, "gaussian", 1e-3, False, probe, base))
    with torch.no_grad():
        tap.run(st.base)
        for t in (1, 2):
            zeros = torch.zeros(K * B, T, d, dtype=torch.float64, device=DEVICE)
            noise_all = perturb(zeros, gammas[t], 1e-3, stream=ProbeStream(9, t, 0, K), distribution="gaussian",
                                backend="torch")[0]
            want = noise_all[torch.arange(K * B, device=DEVICE), pos.repeat(K)]
            torch.testing.assert_close(tap.rider_fed[t] - tap.rider_in[t], want, rtol=1e-9, atol=1e-15)
            assert tap.scales[t].shape == (K * B,)


def test_the_riders_expectation_per_block_equals_the_all_positions_estimators():
    """Paired z-test per (block, sequence) over 800 probes (Rademacher; |z| < 4.0 on each of the 4: a
    false-alarm rate under 2.6e-4 per run for estimators whose means agree), and the variance ratio
    var(last) / var(all) printed (measured on this tiny model: 0.14 to 0.97 by block and sequence)."""
    model = _tiny("llama")
    batch = _batch(B=2)
    K = 800
    with torch.no_grad():
        last = obj.sharpness_terms(model, batch, probe_rows="last", num_probes=K, seed=11)
        every = obj.sharpness_terms(model, batch, probe_rows="all", num_probes=K, seed=11)
    diff = (every - last).flatten(1, 2)  # [K, blocks * B]: paired (the same last-token probe)
    z = diff.mean(0) / (diff.std(0) / math.sqrt(K))
    ratio = last.flatten(1, 2).var(0) / every.flatten(1, 2).var(0)
    print(f"z per (block, sequence): {z.tolist()}; var(last) / var(all): {ratio.tolist()}")
    assert float(z.abs().max()) < 4.0
    # the cross-position terms are gone: over all blocks and sequences the spread is lower
    assert float(last.flatten(1, 2).var(0).sum()) < float(every.flatten(1, 2).var(0).sum())


def test_riding_rows_respect_the_sliding_window():
    """Gemma 3's sliding layers: the rider sees what pos sees (window 3), not the whole prefix."""
    rb = riding_batch(torch.zeros(1, 6, dtype=torch.long), None, torch.tensor([5]), 1, torch.float32,
                      _tiny("gemma3").config)
    assert set(rb.attention_mask) == {"full_attention", "sliding_attention"}
    rider = rb.attention_mask["sliding_attention"][0, 0, 6]
    assert (rider == 0).nonzero().flatten().tolist() == [3, 4, 6]  # positions 3, 4 (5 - 3 < j) and itself
    full = rb.attention_mask["full_attention"][0, 0, 6]
    assert (full == 0).nonzero().flatten().tolist() == [0, 1, 2, 3, 4, 6]
    assert (rb.attention_mask["full_attention"][0, 0, :6, 6] < 0).all()  # no clean row sees the rider


@pytest.mark.parametrize("attn", ["flash_attention_2", "flex_attention"])
def test_attention_that_cannot_take_the_mask_is_refused_by_name(attn):
    model = _tiny("llama")
    model.config._attn_implementation = attn
    with pytest.raises(ValueError, match=f"attn_implementation='{attn}'.*sdpa"):
        obj.sharpness_terms(model, _batch(), probe_rows="last", seed=0)


@pytest.mark.parametrize("estimator", ["jvp", "hvp"])
def test_other_estimators_and_paper_exact_refuse_last(estimator):
    model = _tiny("llama")
    batch = {**_batch(), "labels": torch.zeros(3, dtype=torch.long, device=DEVICE)}
    with pytest.raises(ValueError, match='probe_rows="last" rides with the "fd" estimator only'):
        obj.sharpness_terms(model, batch, estimator=estimator, probe_rows="last", seed=0)
    with pytest.raises(ValueError, match="paper_exact.*probe_rows=\"all\""):
        obj.sharpness_terms(model, batch, probe_rows="last", paper_exact=True, seed=0)
    with pytest.raises(ValueError, match="probe_rows must be one of"):
        obj.sharpness_terms(model, batch, probe_rows="first", seed=0)


def test_shards_and_split_passes_draw_the_whole_batchs_probes():
    """Data-parallel shards (row_offset) and probe passes capped by max_rows give the one-pass terms."""
    model = _tiny("qwen2")
    batch = _batch()
    with torch.no_grad():
        whole = obj.sharpness_terms(model, batch, probe_rows="last", num_probes=4, seed=5)
        split = obj.sharpness_terms(model, batch, probe_rows="last", num_probes=4, seed=5, max_rows=3)
        parts = [obj.sharpness_terms(model, {k: v[rows] for k, v in batch.items()}, probe_rows="last", num_probes=4,
                                     seed=5, row_offset=rows.start) for rows in (slice(0, 1), slice(1, 3))]
    torch.testing.assert_close(split, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat(parts, -1), whole, rtol=1e-10, atol=1e-10)
