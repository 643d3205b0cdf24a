"""J and S against brute force on tiny random models in float64, and bf16 agreement on SmolLM2."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, available_backends

import ofa_kernels
from ofa_kernels.fewshot import anatomy
from ofa_kernels.fewshot import objectives as obj
from ofa_kernels.ops.probe import perturb
from ofa_kernels.rng import ProbeStream

# ------------------------------------------------------------------------------------ step ratio


def test_step_ratio_matches_a_hand_written_loop():
    L, B, T, d = 6, 3, 7, 5
    hs = [torch.randn(B, T, d, device=DEVICE, dtype=torch.float64) for _ in range(L + 1)]
    mask = torch.ones(B, T, dtype=torch.long, device=DEVICE)
    mask[1, 4:] = 0  # right padding
    mask[2, :2] = 0  # left padding
    pos = anatomy.last_positions(mask)
    assert pos.tolist() == [6, 3, 6]
    want = 0.0
    for b in range(B):
        z = [h[b, pos[b]].float() for h in hs]
        for i in range(2, L):
            want += float((z[i + 1] - z[i]).pow(2).sum() / ((z[i] - z[i - 1]).pow(2).sum() + 0.1))
    assert obj.step_ratio([h.float() for h in hs], pos, eps=0.1).dtype == torch.float32
    got = obj.step_ratio(hs, pos, eps=0.1)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.tensor(want / B, dtype=torch.float64, device=DEVICE), rtol=1e-5, atol=0)
    torch.testing.assert_close(obj.step_ratio(torch.stack(hs), pos, eps=0.1), got)
    # without the final norm's step: the last ratio (i = L-1, the step into H_L) left out
    last = sum(float((hs[L][b, pos[b]] - hs[L - 1][b, pos[b]]).pow(2).sum()
                     / ((hs[L - 1][b, pos[b]] - hs[L - 2][b, pos[b]]).pow(2).sum() + 0.1)) for b in range(B))
    torch.testing.assert_close(obj.step_ratio(hs, pos, eps=0.1, final_norm_step=False),
                               torch.tensor((want - last) / B, dtype=torch.float64, device=DEVICE), rtol=1e-5, atol=0)
    torch.testing.assert_close(obj.step_ratio(torch.stack(hs), pos, eps=0.1, final_norm_step=False),
                               obj.step_ratio(hs, pos, eps=0.1, final_norm_step=False))


# ------------------------------------------------------------------------------------ tiny models


def test_last_token_states_equal_hf_hidden_states(tiny):
    batch = _batch()
    pos = anatomy.last_positions(batch["attention_mask"])
    with torch.no_grad():
        hf = tiny(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        ours = anatomy.last_token_states(tiny, batch)
    assert len(ours) == len(hf.hidden_states) == 4
    for h, o in zip(hf.hidden_states, ours, strict=True):
        torch.testing.assert_close(o, h[torch.arange(2, device=DEVICE), pos], rtol=0, atol=0)
    torch.testing.assert_close(tiny.get_output_embeddings()(ours[-1]), hf.logits[torch.arange(2, device=DEVICE), pos])


def _tiny(kind):
    torch.manual_seed(1234)
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=50, hidden_size=12, intermediate_size=20, num_hidden_layers=3,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
        model = LlamaForCausalLM(cfg)
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(vocab_size=50, n_embd=12, n_layer=3, n_head=2, n_positions=16)
        model = GPT2LMHeadModel(cfg)
    model = model.to(DEVICE, torch.float64).eval()
    with torch.no_grad():  # non-trivial preconditioners
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "ln_" in name) and name.endswith("weight"):
                p.copy_(0.5 + torch.rand_like(p))
    return model


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request):
    return _tiny(request.param)


def _batch(B=2, T=5):
    ids = torch.randint(0, 50, (B, T), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[-1, T - 2:] = 0
    labels = torch.randint(0, 50, (B,), device=DEVICE)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _with_offset(model, batch, t, v, *, take_ce=False):
    """Runs the base model with v [B, d] added to block t's input at the last positions."""
    st = anatomy.structure(model)
    pos = anatomy.last_positions(batch["attention_mask"])
    rows = torch.arange(pos.shape[0], device=DEVICE)
    tap = anatomy.StateTap(st, pos, lambda i, x: x.index_put((rows, pos), v, accumulate=True) if i == t else x)
    states = tap.run(batch["input_ids"], batch["attention_mask"])
    if take_ce:
        return F.cross_entropy(st.head(states[-1]), batch["labels"], reduction="sum")
    return states[t + 1] - tap.fed[t]  # block t's update at pos


def _exact_traces(model, batch, estimator):
    """Per block t >= 1 and sequence b: -tr(J_u P) ("fd", "jvp") or tr(P H P) ("hvp"), by brute force."""
    gammas = anatomy.preconditioners(model)
    B, d = batch["input_ids"].shape[0], gammas[0].shape[0]
    out = []
    for t in range(1, len(gammas)):
        v0 = torch.zeros(B, d, dtype=torch.float64, device=DEVICE)
        if estimator == "hvp":
            with obj._PlainAttention():
                full = torch.autograd.functional.hessian(lambda v: _with_offset(model, batch, t, v, take_ce=True), v0)
        else:
            full = torch.autograd.functional.jacobian(lambda v: _with_offset(model, batch, t, v), v0)
        blocks = torch.stack([full[b, :, b, :] for b in range(B)])  # [B, d, d]
        g = gammas[t].double()
        if estimator == "hvp":
            out.append(torch.einsum("bii,i->b", blocks, g * g))
        else:
            out.append(-torch.einsum("bii,i->b", blocks, g))
    return torch.stack(out)  # [layers, B]


@pytest.mark.parametrize("estimator", ["fd", "jvp", "hvp"])
@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_mean_of_probes_converges_to_the_exact_trace(tiny, estimator, dist):
    batch = _batch()
    exact = _exact_traces(tiny, batch, estimator)
    n = 384
    with torch.no_grad() if estimator == "fd" else torch.enable_grad():
        q = obj.sharpness_terms(tiny, batch, estimator=estimator, num_probes=n, distribution=dist,
                                eps=1e-7 if estimator == "fd" else None, max_rows=256,
                                seed=int(torch.randint(0, 2**31, ())))
    q = q.detach()
    mean, stderr = q.mean(0), q.std(0) / n**0.5
    # 5 standard errors of the probe mean (plus fd's O(eps) bias, far smaller): fails ~1e-6 of the time
    assert torch.all((mean - exact).abs() <= 5 * stderr + 1e-6 * exact.abs() + 1e-9), (mean, exact, stderr)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_fd_tends_to_jvp_as_eps_goes_to_zero(kind, monkeypatch):
    # HF's LlamaRMSNorm computes in fp32 even in an fp64 model; ours keep fp64, so fd's cancellation is fp64's.
    monkeypatch.setenv("OFA_BACKEND", "torch")
    model = _tiny(kind)
    ofa_kernels.patch_model(model)
    batch = _batch()
    seed = int(torch.randint(0, 2**31, ()))
    with torch.no_grad():
        jvp = obj.sharpness_terms(model, batch, estimator="jvp", num_probes=2, seed=seed)
        errors = [(obj.sharpness_terms(model, batch, estimator="fd", num_probes=2, seed=seed, eps=eps) - jvp).abs().max()
                  for eps in (1e-2, 1e-4, 1e-6)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] <= 1e-4 * jvp.abs().max()


@pytest.mark.parametrize("estimator", ["fd", "jvp", "hvp"])
def test_batched_probes_equal_sequential_ones(tiny, estimator):
    batch = _batch()
    with torch.no_grad() if estimator == "fd" else torch.enable_grad():
        together = obj.sharpness_terms(tiny, batch, estimator=estimator, num_probes=4, seed=77)
        apart = torch.cat([obj.sharpness_terms(tiny, batch, estimator=estimator, num_probes=1, seed=77, first_probe=k)
                           for k in range(4)])
        capped = obj.sharpness_terms(tiny, batch, estimator=estimator, num_probes=4, seed=77, max_rows=3)
    torch.testing.assert_close(together, apart, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(together, capped, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("estimator", ["fd", "jvp", "hvp"])
def test_shards_of_a_batch_draw_the_whole_batchs_probes(tiny, estimator):
    batch = _batch(B=3)
    with torch.no_grad() if estimator == "fd" else torch.enable_grad():
        whole = obj.sharpness_terms(tiny, batch, estimator=estimator, num_probes=2, seed=5)
        parts = [obj.sharpness_terms(tiny, {k: v[rows] for k, v in batch.items()}, estimator=estimator, num_probes=2,
                                     seed=5, row_offset=rows.start) for rows in (slice(0, 1), slice(1, 3))]
    torch.testing.assert_close(torch.cat(parts, -1), whole, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_paper_exact_is_the_authors_arithmetic(kind):
    """S and its norm-weight gradients against the transcription of the authors' code, fp64, on two
    copies of one model with fused norms (HF's own RMSNorm computes in fp32 whatever the model's
    dtype, 1e-8 apart from fp64: the transcription runs HF's forward with its hooks). With the noise the probe ops draw (the plain-PyTorch
    probe backend, so that the added and the dotted noise are the same numbers): within 1e-10
    relative. With the host generator's Gaussians, which the backends match only to the last fp32
    ulps of log/cos: within 1e-5 relative."""
    from authors_reference import authors_terms, host_gaussian

    def kernel_gaussian(shape, seed, layer, like):  # the numbers perturb() adds, read back through a zero input
        return perturb(torch.zeros(shape, dtype=like.dtype, device=like.device), torch.ones(shape[-1], dtype=like.dtype,
                       device=like.device), 1.0, stream=ProbeStream(seed, layer), distribution="gaussian", backend="torch")[0]

    ours, theirs = _tiny(kind), _tiny(kind)
    ofa_kernels.patch_model(ours)
    ofa_kernels.patch_model(theirs)
    batch = _batch(B=3)
    gammas = anatomy.preconditioners(theirs)
    for m in (ours, theirs):
        for name, p in m.named_parameters():
            p.requires_grad_(p.dim() == 1 and ("norm" in name or "ln_" in name))
    with torch.no_grad():
        host = authors_terms(theirs, batch["input_ids"], batch["attention_mask"], gammas, eps=1e-3, seed=5,
                             gaussian=host_gaussian)["S"]
    want = authors_terms(theirs, batch["input_ids"], batch["attention_mask"], gammas, eps=1e-3, seed=5,
                         gaussian=kernel_gaussian)["S"]
    got = obj.sharpness(ours, batch, estimator="fd", seed=5, paper_exact=True, distribution="gaussian",
                        eps=1e-3, gammas=gammas, backend="torch")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    torch.testing.assert_close(got.detach(), host, rtol=1e-5, atol=0)
    want.backward()
    got.backward()
    theirs_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert ours_grads.keys() == theirs_grads.keys() and ours_grads
    assert all(g.abs().sum() > 0 for n, g in theirs_grads.items() if n.endswith("weight"))  # a test that can fail
    for name, g in theirs_grads.items():
        torch.testing.assert_close(ours_grads[name], g, rtol=1e-9, atol=1e-12 * float(g.abs().max()), msg=name)


def test_paper_exact_jvp_is_the_fd_limit():
    """The forward-mode form of the authors' q equals their finite difference to O(eps) (a small step: the
    tiny model's final norm is far from linear at 1e-3)."""
    model = _tiny("llama")
    batch = _batch(B=2)
    with torch.enable_grad():
        jvp = obj.sharpness_terms(model, batch, estimator="jvp", seed=3, paper_exact=True, eps=1e-5,
                                  distribution="gaussian")
    with torch.no_grad():
        fd = obj.sharpness_terms(model, batch, estimator="fd", seed=3, paper_exact=True, eps=1e-5,
                                 distribution="gaussian")
    assert jvp.shape == fd.shape == (1, 2, 2, 2)
    torch.testing.assert_close(jvp, fd, rtol=1e-3, atol=1e-3 * float(fd.abs().max()))


@pytest.fixture(params=available_backends())
def patched_tiny(request, monkeypatch):
    monkeypatch.setenv("OFA_BACKEND", request.param)
    model = _tiny("llama")
    assert len(ofa_kernels.patch_model(model)) == 7
    return model


@pytest.mark.parametrize("estimator", ["fd", "jvp", "hvp"])
def test_gradcheck_of_J_and_S_with_respect_to_norm_weights(patched_tiny, estimator):
    model = patched_tiny
    batch = _batch()
    gammas = anatomy.preconditioners(model)
    weights = [model.model.layers[1].input_layernorm.weight, model.model.layers[2].post_attention_layernorm.weight]
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights:
        w.requires_grad_(True)

    def S(*ws):
        return obj.sharpness(model, batch, estimator=estimator, num_probes=2, seed=3, gammas=gammas,
                             eps=1e-3 if estimator == "fd" else None)

    def J(*ws):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        return obj.step_ratio(out.hidden_states, anatomy.last_positions(batch["attention_mask"]))

    # Through the Triton interpreter a full Jacobian costs minutes; fast mode checks a random projection of it
    # (torch's "fast gradcheck": wrong gradients still fail), the other backends the full one.
    fast = os.environ.get("OFA_BACKEND") == "triton"
    assert torch.autograd.gradcheck(S, weights, fast_mode=fast)
    if estimator == "fd":
        assert torch.autograd.gradcheck(J, weights, fast_mode=fast)


def test_bad_arguments_are_named():
    model = _tiny("llama")
    batch = _batch()
    with pytest.raises(ValueError, match="estimator"):
        obj.sharpness(model, batch, estimator="exact")
    with pytest.raises(ValueError, match="labels"):
        obj.sharpness(model, {k: v for k, v in batch.items() if k != "labels"}, estimator="hvp")
    with pytest.raises(ValueError, match="layers"):
        obj.sharpness(model, batch, layers=[3])
    with pytest.raises(ValueError, match="no real token"):
        obj.sharpness(model, {**batch, "attention_mask": torch.zeros_like(batch["attention_mask"])})
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match='attn_implementation="sdpa"'):
        obj.sharpness(model, batch, estimator="jvp")


def test_sharpness_takes_exactly_the_keywords_of_its_terms_and_reduces_them():
    """The keywords are written once (``sharpness_terms``); ``sharpness`` shows and forwards them."""
    import inspect

    assert inspect.signature(obj.sharpness) == inspect.signature(obj.sharpness_terms)
    model, batch = _tiny("llama"), _batch()
    with pytest.raises(TypeError, match="num_probe"):
        obj.sharpness(model, batch, num_probe=2)
    with torch.no_grad():
        q = obj.sharpness_terms(model, batch, num_probes=3, seed=9, layers=[2, 1])
        s = obj.sharpness(model, batch, num_probes=3, seed=9, layers=[2, 1])
    assert q.shape == (3, 2, batch["input_ids"].shape[0])
    torch.testing.assert_close(s, F.softplus(q).mean((0, 2)).sum(), rtol=1e-6, atol=0)


def test_hutchinson_trace_of_a_jacobian_and_a_hessian():
    a = torch.randn(6, 6, dtype=torch.float64, device=DEVICE)
    z = torch.randn(6, dtype=torch.float64, device=DEVICE)
    est = ofa_kernels.hutchinson_trace(lambda z: a @ z, z, num_probes=2000, seed=int(torch.randint(0, 2**31, ())))
    assert abs(est.estimate - a.trace()) <= 5 * est.stderr
    h = a @ a.T
    est = ofa_kernels.hutchinson_trace(lambda z: 0.5 * z @ h @ z, z, num_probes=500, distribution="gaussian")
    assert abs(est.estimate - h.trace()) <= 5 * est.stderr
    assert est.samples.shape == (500,)


# --------------------------------------------------------------------------------- real SmolLM2


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["fd", "jvp"])
def test_bf16_agrees_with_fp64_on_smollm2(smollm2, estimator):
    from ofa_kernels.fewshot.models import load_smollm2

    model, tokenizer = smollm2
    texts = ["Review: a gorgeous, witty, seductive movie.\nSentiment:",
             "Review: the plot is nothing but boilerplate cliches.\nSentiment:"]
    batch = dict(tokenizer(texts, return_tensors="pt", padding=True).to(DEVICE))
    bf16, _ = load_smollm2(torch.bfloat16, DEVICE)
    seed = int(torch.randint(0, 2**31, ()))
    with torch.no_grad() if estimator == "fd" else torch.enable_grad():
        ref = obj.sharpness(model.double(), batch, estimator=estimator, eps=2.0**-5, eps_scale="rms", seed=seed,
                            num_probes=2)
        model.float()
        got = obj.sharpness(bf16, batch, estimator=estimator, seed=seed, num_probes=2)  # bf16-safe defaults
    # bf16 rounding (weights and activations) moves S by a random amount per probe draw: over 30 seeds ("fd",
    # 2 probes; benchmarks/bf16_s_spread.py, 2026-12-08) the relative difference had mean +0.4%, standard
    # deviation 2.0% and largest 4.4% (CI once drew 5.7%); the bound is 5 standard deviations. A bf16 path whose perturbation rounds away is off by far more (~100%).
    assert abs(got - ref) <= 0.10 * abs(ref), (got, ref)


def test_states_at_the_prompt_end_do_not_see_the_label_tokens_after_it(tiny):
    """The trainer's one pass: prompt + label word, states taken at the prompt's last token."""
    prompt = torch.randint(0, 50, (2, 5), device=DEVICE)
    label = torch.randint(0, 50, (2, 2), device=DEVICE)
    with torch.no_grad():
        alone = anatomy.last_token_states(tiny, {"input_ids": prompt})
        both, final = anatomy.last_token_states(tiny, {"input_ids": torch.cat([prompt, label], 1)},
                                            torch.tensor([4, 4], device=DEVICE), return_final=True)
    assert final.shape[:2] == (2, 7)
    for a, b in zip(alone, both, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_paper_exact_is_the_authors_arithmetic_on_smollm2(smollm2):
    """Real SmolLM2, fp32, one SST-2-style pair (demonstration + query, the paper protocol's sequence):
    S and its norm-weight gradients against the transcription of the authors' code, the same noise.
    Bounds (fp32): S within 1e-4 relative; the gradient over all norm weights within 5e-3 (relative L2).
    The noise stays in the state differences S takes, which cancel to ~eps of the states' size: one
    ulp more or less where the noise is added (x + s*gamma*nu rounded once here, in two steps there)
    shows at 1e-5..1e-4 (measured: S 2e-5, gradient 1e-3)."""
    from authors_reference import authors_terms

    model, tokenizer = smollm2
    text = ("Review: a gorgeous, witty, seductive movie.\nSentiment: positive\n"
            "Review: the plot is nothing but boilerplate cliches.\nSentiment:")
    batch = dict(tokenizer([text], return_tensors="pt").to(DEVICE))
    gammas = anatomy.preconditioners(model)
    params = [p for n, p in model.named_parameters() if "norm" in n]
    seed = int(torch.randint(0, 2**31, ()))

    def kernel_gaussian(shape, seed, layer, like):
        return perturb(torch.zeros(shape, dtype=like.dtype, device=like.device), torch.ones(shape[-1], dtype=like.dtype,
                       device=like.device), 1.0, stream=ProbeStream(seed, layer), distribution="gaussian", backend="torch")[0]

    want = authors_terms(model, batch["input_ids"], batch["attention_mask"], gammas, seed=seed,
                         gaussian=kernel_gaussian)["S"]
    want_grads = torch.autograd.grad(want, params)
    got = obj.sharpness(model, batch, estimator="fd", seed=seed, paper_exact=True, distribution="gaussian",
                        eps=1e-3, gammas=gammas, backend="torch")
    got_grads = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)
    # the authors' S is gentle: q ~ -eps * sum(gamma) per block (a few tenths), so S sits within 20% of
    # (L - 1) log 2 (the trace form's S is ~900 on this model)
    L = len(gammas)
    assert abs(float(got.detach()) / ((L - 1) * math.log(2)) - 1) < 0.2
    g, w = torch.cat([g.flatten() for g in got_grads]), torch.cat([w.flatten() for w in want_grads])
    error = float((g - w).norm() / w.norm())
    print(f"relative L2 error of the norm-weight gradient: {error:.2e}")
    assert error < 5e-3


def test_per_gain_divides_each_blocks_q_by_its_gain():
    model = _tiny("llama")
    batch = _batch(B=2)
    gammas = [g * (t + 1) for t, g in enumerate(anatomy.preconditioners(model))]  # gains of other sizes per block
    with torch.no_grad():
        for exact in (False, True):
            plain = obj.sharpness_terms(model, batch, seed=4, gammas=gammas, paper_exact=exact)
            scaled = obj.sharpness_terms(model, batch, seed=4, gammas=gammas, paper_exact=exact, per_gain=True)
            for i, t in enumerate((1, 2)):
                torch.testing.assert_close(scaled[:, i], plain[:, i] / gammas[t].abs().sum(), rtol=1e-12, atol=0)
        riding = obj.sharpness_terms(model, batch, seed=4, gammas=gammas, probe_rows="last", per_gain=True)
        want = obj.sharpness_terms(model, batch, seed=4, gammas=gammas, probe_rows="last")
        torch.testing.assert_close(riding[:, 1], want[:, 1] / gammas[2].abs().sum(), rtol=1e-12, atol=0)


def test_the_paper_form_of_a_training_step_is_the_authors_loss(monkeypatch):
    """AdaptOptions(sharpness_form="paper", scoring="first"): one step's loss and norm-weight gradients
    against the transcription's ``ce + 1e-2 * J + 1e-3 * S`` (one sequence, as the paper protocol),
    fp64, within 1e-10."""
    from authors_reference import authors_terms

    from ofa_kernels.fewshot.options import AdaptOptions
    from ofa_kernels.fewshot.prompts import step_batch
    from ofa_kernels.fewshot.trainer import training_step

    monkeypatch.setenv("OFA_BACKEND", "torch")  # the added and the dotted noise from one generator
    ours, theirs = _tiny("llama"), _tiny("llama")
    for m in (ours, theirs):
        ofa_kernels.patch_model(m)
        for name, p in m.named_parameters():
            p.requires_grad_("norm" in name)
    prompt = torch.randint(0, 50, (9,)).tolist()
    batch = step_batch([prompt], [[7]], 0, DEVICE, with_continuations=False)
    gammas = anatomy.preconditioners(ours)
    options = AdaptOptions(arm="ofa", sharpness_form="paper", scoring="first", distribution="gaussian")
    got = training_step(ours, batch, options, gammas, 13)

    def noise(shape, seed, layer, like):
        return perturb(torch.zeros(shape, dtype=like.dtype, device=like.device), torch.ones(shape[-1], dtype=like.dtype,
                       device=like.device), 1.0, stream=ProbeStream(seed, layer), distribution="gaussian")[0]

    ids = torch.tensor([prompt], device=DEVICE)
    terms = authors_terms(theirs, ids, torch.ones_like(ids), gammas, seed=13, gaussian=noise,
                          label_tokens=torch.tensor([7], device=DEVICE))
    loss = terms["ce"] + 1e-2 * terms["J"] + 1e-3 * terms["S"]
    loss.backward()
    for key in ("ce", "J", "S"):
        torch.testing.assert_close(got[key], terms[key].detach(), rtol=1e-10, atol=0, msg=key)
    torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-10, atol=0)
    for (name, p), (_, w) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, w.grad, rtol=1e-9, atol=1e-12 * float(w.grad.abs().max()), msg=name)
