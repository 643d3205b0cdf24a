"""Time and peak memory of one OFA optimizer step at the Llama-2-7B shape, against an authors-style eager step.

Ours (``ofa_kernels.fewshot.trainer.training_step``, memory-efficient: bf16 base weights, fp32 trainable
norms, checkpointed blocks, states recorded only at the last token, logits only there, the probe
pass split to fit ``--max-memory`` GiB) + AdamW on the norms, for the arms
  ce, ofa(fd, K=1), ofa(fd, K=4), ofa(hvp, K=1)
and the authors-style reference (PEFT ``LNTuningConfig`` norms in the model dtype, the full
hidden-state list from ``output_hidden_states``, full ``[B, T, vocab]`` logits, forward hooks that add
the finite-difference noise, one more full pass per probe, every graph alive until one backward)
for ce and ofa(fd, K). Random-init weights of the real shape (hidden 4096, 32 layers, ffn 11008,
vocab 32000), bf16, (B, T) in {(1, 256), (4, 512)}; median of ``--reps`` steps after a warm-up.
Peak memory: ``torch.cuda.max_memory_allocated`` over the step, weights included. An arm that runs
out of memory is reported as OOM.

Also ours captured: the plain step + AdamW replayed from a CUDA graph (``graphs.CapturedSteps``), with
the memory the graph keeps ("graph GiB": growth of reserved memory over the capture).

Targets (issue 6): ofa(fd, K=4) at 4 x 512 peaks <= 20 GiB and takes <= 2.5x the reference CE step;
at the paper's protocol (B = 1) our ofa step is >= 3x faster than the authors-style one. Issue 13:
at 1 x 256 the captured ofa(fd, K=1) step >= 3x faster than the authors-style step and <= 2.2x our
CE step; the captured ce step >= 2x faster than the authors-style ce step.

    python benchmarks/bench_ofa_step.py --out DIR            # GPU
    python benchmarks/bench_ofa_step.py --smoke --out DIR    # CPU, tiny shape (tests)
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_objective import SHAPES  # noqa: E402
from harness import stamp  # noqa: E402

import ofa_kernels  # noqa: E402
from ofa_kernels.fewshot import anatomy  # noqa: E402
from ofa_kernels.fewshot.anatomy import norm_parameters  # noqa: E402
from ofa_kernels.patch import use_fp32_masters  # noqa: E402
from ofa_kernels.fewshot.prompts import step_batch  # noqa: E402
from ofa_kernels.fewshot import graphs  # noqa: E402
from ofa_kernels.fewshot.trainer import AdaptOptions, training_step  # noqa: E402

OURS = [("ce", "ce", "fd", 1), ("ofa-fd-K1", "ofa", "fd", 1), ("ofa-fd-K1-last", "ofa", "fd-last", 1),
        ("ofa-fd-K4", "ofa", "fd", 4), ("ofa-hvp-K1", "ofa", "hvp", 1)]  # "fd-last": the probe riding (issue 34)
PLAIN = ("ce", "ofa-fd-K1", "ofa-fd-K1-last", "ofa-fd-K4")  # also timed without checkpointing or split probe passes
REFERENCE = [("ce", 0), ("ofa-fd-K1", 1), ("ofa-fd-K4", 4)]


def _model(shape: str, dtype: torch.dtype, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(max_position_embeddings=4096, attn_implementation="sdpa", **SHAPES[shape])
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _batch(B: int, T: int, vocab: int, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(B * 1000 + T)
    ids = torch.randint(3, vocab, (B, T), generator=gen)
    labels = torch.randint(3, vocab, (B,), generator=gen).tolist()
    batch = step_batch(ids.tolist(), [[t] for t in labels], 0, device, with_continuations=False)
    return {**batch, "labels": batch["first_tokens"]}


def _measure(step, device: torch.device, reps: int) -> dict:
    """Median time and peak memory of ``step()`` (after one warm-up); OOM is a result."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    try:
        step()
        sync()
        times = []
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            sync()
            times.append(1e3 * (time.perf_counter() - t0))
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        return {"ms": statistics.median(times), "peak_gib": peak}
    except torch.OutOfMemoryError:
        return {"ms": None, "peak_gib": None, "note": "OOM"}
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _options(arm: str, estimator: str, K: int, **kwargs) -> AdaptOptions:
    """``estimator`` "fd-last" is "fd" with the probe riding in the clean pass (``probe_rows="last"``)."""
    estimator, _, rows = estimator.partition("-")
    return AdaptOptions(arm=arm, estimator=estimator, num_probes=K, scoring="first", probe_rows=rows or "all",
                        **kwargs)


def _ours(model, batch, arm: str, estimator: str, K: int, max_memory: float | None, lean: bool = True):
    options = _options(arm, estimator, K, max_memory_gb=max_memory)
    gammas = anatomy.preconditioners(model)
    params = list(norm_parameters(model).values())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-3)

    def step():
        optimizer.zero_grad(set_to_none=True)
        training_step(model, batch, options, gammas, 0, memory_efficient=lean, max_memory_gb=max_memory)
        optimizer.step()
    return step


def _graphed(model, options, gammas, params, optimizer, seed, device: torch.device) -> graphs.CapturedSteps:
    """Our plain step + ``optimizer`` as ``graphs.CapturedSteps`` (the replay emulated off CUDA)."""
    if device.type == "cuda":
        graphs.make_capturable(optimizer, device)
    else:
        graphs.init_capturable_state(optimizer)

    def one_step(b, update):
        parts = training_step(model, b, options, gammas, seed, memory_efficient=False)
        if update:
            optimizer.step()
        return parts
    return graphs.CapturedSteps(one_step, params, device, emulate=device.type != "cuda")


def _captured(model, batch, arm: str, estimator: str, K: int, device: torch.device):
    """Our plain step + AdamW replayed from one CUDA graph (``graphs.CapturedSteps``); the probe seed
    advances on the device between replays. Off CUDA the replay is emulated (the smoke test)."""
    options = _options(arm, estimator, K)
    gammas = anatomy.preconditioners(model)
    params = list(norm_parameters(model).values())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-3)
    seed = torch.tensor(0, dtype=torch.int64, device=device)
    steps = _graphed(model, options, gammas, params, optimizer, seed, device)

    def step():
        steps.step(batch)
        seed.add_(1)
    step.graphs = steps
    return step


STEPS_FILE = Path(__file__).with_name("sst2_paper_steps.json")


def protocol_run(model, vocab: int, device: torch.device, captured: bool, limit: int | None = None) -> dict:
    """The paper's SST-2 protocol end to end: 300 one-sequence steps of OFA (fd, K=1) with AdamW and the
    warm-up + cosine schedule, on random tokens with the real run's lengths (``sst2_paper_steps.json``:
    prompt and label-word lengths per step, SmolLM2 tokenizer), eager or replayed from CUDA graphs
    (widths padded to ``graphs.BUCKET``). Wall seconds from the first step to the last one finished,
    batch building and captures included. The norm weights are restored afterwards."""
    from ofa_kernels.fewshot.prompts import step_batch
    from ofa_kernels.fewshot.trainer import lr_multiplier

    lengths = json.loads(STEPS_FILE.read_text())["steps"][:limit]
    options = AdaptOptions(arm="ofa", estimator="fd", num_probes=1, probe_rows="all")
    gammas = anatomy.preconditioners(model)
    params = list(norm_parameters(model).values())
    saved = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=options.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_multiplier(i + 1, len(lengths), options))
    seed = torch.tensor(options.seed * 7919, dtype=torch.int64, device=device)
    gen = torch.Generator().manual_seed(0)
    sequences = [(torch.randint(3, vocab, (p,), generator=gen).tolist(),
                  torch.randint(3, vocab, (n,), generator=gen).tolist()) for p, n in lengths]
    label_width = max(n for _, n in lengths)
    steps = None
    if captured:
        steps = _graphed(model, options, gammas, params, optimizer, seed, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    losses = []
    sync()
    start = time.perf_counter()
    for prompt, label in sequences:
        if steps is not None:
            parts = steps.step(step_batch([prompt], [label], 0, device, bucket=graphs.BUCKET, label_width=label_width))
        else:
            optimizer.zero_grad(set_to_none=True)
            batch = step_batch([prompt], [label], 0, device, masks_when_unpadded=False)  # as the trainer's eager step
            parts = training_step(model, batch, options, gammas, seed, memory_efficient=False)
            optimizer.step()
        seed.add_(1)
        scheduler.step()
        losses.append(parts["loss"])
    sync()
    seconds = time.perf_counter() - start
    final = float(torch.stack(losses[-10:]).mean())
    with torch.no_grad():
        for p, w in zip(params, saved):
            p.copy_(w)
        for p in params:
            p.grad = None
    return {"impl": "captured" if captured else "eager", "steps": len(sequences), "seconds": seconds,
            "mean_loss_last_10": final, "graphs": len(steps) if steps is not None else 0,
            "graph_gib": steps.captured_bytes / 2**30 if steps is not None else None}


def _reference(model, batch, K: int, gammas, eps: float = 1e-3):
    """The authors-style step: full hidden states, full logits, hook-injected noise, one backward."""
    layers = model.base_model.model.model.layers if hasattr(model, "peft_config") else model.model.layers
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-3)
    ids, mask, labels = batch["input_ids"], batch.get("attention_mask"), batch["labels"]

    def step():
        optimizer.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        ce = F.cross_entropy(out.logits[:, -1].float(), labels)
        loss = ce
        if K:
            hs = [h[:, -1].float() for h in out.hidden_states]
            steps = [(hs[i + 1] - hs[i]).pow(2).sum(-1) for i in range(len(hs) - 1)]
            loss = loss + 1e-2 * sum(steps[i] / steps[i - 1] for i in range(2, len(steps) - 1)).mean()
            s_total = 0.0
            for _ in range(K):
                noise = {}

                def pre(t):
                    def hook(module, args, kwargs):
                        x = args[0] if args else kwargs["hidden_states"]
                        nu = torch.randn_like(x)
                        noise[t] = nu[:, -1].float()
                        y = x + eps * gammas[t].to(x.dtype) * nu
                        return ((y,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": y})
                    return hook

                handles = [blk.register_forward_pre_hook(pre(t), with_kwargs=True) for t, blk in enumerate(layers)]
                try:
                    pert = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
                finally:
                    for h in handles:
                        h.remove()
                ph = [h[:, -1].float() for h in pert.hidden_states]
                for t in range(1, len(layers)):
                    q = -(noise[t] * ((ph[t + 1] - ph[t]) - (hs[t + 1] - hs[t]))).sum(-1) / eps
                    s_total = s_total + F.softplus(q).mean() / K
            loss = loss + 1e-3 * s_total
        loss.backward()
        optimizer.step()
    return step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shape, fp32 (tests)")
    p.add_argument("--shapes", default="1x256,4x512")
    p.add_argument("--max-memory", type=float, default=20.0, help="GiB budget for the probe passes (ours)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--protocol-steps", type=int, default=None,
                   help="steps of the whole-protocol timing (default: all 300; the smoke run takes 4)")
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    shape, dtype = ("tiny", torch.float32) if args.smoke else ("llama2-7b", torch.bfloat16)
    shapes = [tuple(int(v) for v in s.split("x")) for s in (("2x16",) if args.smoke else args.shapes.split(","))]
    reps = 1 if args.smoke else args.reps
    vocab = SHAPES[shape]["vocab_size"]
    rows, protocol = [], []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "cpu" if device.type == "cpu" else "gpu"

    def save(latest: dict) -> None:
        """Prints the latest result and rewrites the tables, so a run cut short keeps what it measured."""
        print(latest, flush=True)
        (out / f"ofa_step_{tag}.json").write_text(json.dumps({"stamp": stamp(device), "rows": rows,
                                                              "protocol": protocol}, indent=1))
        (out / f"ofa_step_{tag}.md").write_text(table(rows) + "\n\n" + protocol_table(protocol) + "\n")

    model = _model(shape, dtype, device)
    ofa_kernels.patch_model(model)
    use_fp32_masters(model)
    for p_ in norm_parameters(model).values():
        p_.requires_grad_(True)
    for B, T in shapes:
        batch = _batch(B, T, vocab, device)
        for name, arm, estimator, K in OURS:
            r = _measure(_ours(model, batch, arm, estimator, K, args.max_memory), device, reps)
            rows.append({"impl": "ofa_kernels", "arm": name, "B": B, "T": T, **r})
            save(rows[-1])
        for name, arm, estimator, K in OURS:
            if name in PLAIN:
                r = _measure(_ours(model, batch, arm, estimator, K, None, lean=False), device, reps)
                rows.append({"impl": "ofa_kernels plain", "arm": name, "B": B, "T": T, **r})
                save(rows[-1])
        for name, arm, estimator, K in OURS:
            try:
                step = _captured(model, batch, arm, estimator, K, device)
                r = _measure(step, device, reps)
                r["graph_gib"] = step.graphs.captured_bytes / 2**30
            except Exception as exc:  # noqa: BLE001 - a step that does not capture is a result
                r = {"ms": None, "peak_gib": None, "note": f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"}
            rows.append({"impl": "ofa_kernels captured", "arm": name, "B": B, "T": T, **r})
            save(rows[-1])
    limit = 4 if args.smoke else args.protocol_steps
    for captured in (False, True):
        try:
            protocol.append(protocol_run(model, vocab, device, captured, limit))
        except Exception as exc:  # noqa: BLE001 - a run that fails is a result
            protocol.append({"impl": "captured" if captured else "eager",
                             "error": f"{type(exc).__name__}: {exc}"[:200]})
        save(protocol[-1])
    if not args.skip_reference:
        from peft import LNTuningConfig, get_peft_model

        del model
        gc.collect()
        base = _model(shape, dtype, device)
        gammas = [blk.post_attention_layernorm.weight.detach().float().clone() for blk in base.model.layers]
        ref = get_peft_model(base, LNTuningConfig(task_type="CAUSAL_LM")).eval()
        for B, T in shapes:
            batch = _batch(B, T, vocab, device)
            for name, K in REFERENCE:
                r = _measure(_reference(ref, batch, K, gammas), device, reps)
                rows.append({"impl": "authors-style", "arm": name, "B": B, "T": T, **r})
                save(rows[-1])
    print(table(rows) + "\n\n" + protocol_table(protocol))
    return 0


def protocol_table(runs: list[dict]) -> str:
    lines = ["The paper's SST-2 protocol end to end (ofa fd K=1, one sequence per step):", "",
             "| steps | eager or captured | wall s | graphs | graph GiB | mean loss, last 10 steps |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in runs:
        if "error" in r:
            lines.append(f"| - | {r['impl']} | {r['error']} | | | |")
            continue
        gib = "-" if r["graph_gib"] is None else f"{r['graph_gib']:.2f}"
        lines.append(f"| {r['steps']} | {r['impl']} | {r['seconds']:.1f} | {r['graphs']} | {gib} | "
                     f"{r['mean_loss_last_10']:.4f} |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    def find(impl, arm, B, T):
        return next((r for r in rows if (r["impl"], r["arm"], r["B"], r["T"]) == (impl, arm, B, T)), None)

    lines = ["| B x T | arm | ofa_kernels ms | peak GiB | plain step ms | peak GiB | captured ms | graph GiB "
             "| authors-style ms | peak GiB | speed-up vs authors | captured vs authors |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for B, T in dict.fromkeys((r["B"], r["T"]) for r in rows):
        for arm in dict.fromkeys(r["arm"] for r in rows):
            ours, ref = find("ofa_kernels", arm, B, T), find("authors-style", arm, B, T)
            plain = find("ofa_kernels plain", arm, B, T) or {}
            o_ms, o_mem = (ours or {}).get("ms"), (ours or {}).get("peak_gib")
            r_ms, r_mem = (ref or {}).get("ms"), (ref or {}).get("peak_gib")
            o_txt = fmt(o_ms, ".1f") if ours is None or o_ms is not None else ours.get("note", "-")
            r_txt = fmt(r_ms, ".1f") if ref is None or r_ms is not None else ref.get("note", "-")
            speed = f"{r_ms / o_ms:.2f}x" if o_ms and r_ms else "-"
            p_txt = fmt(plain.get("ms"), ".1f") if plain.get("ms") is not None else plain.get("note", "-")
            cap = find("ofa_kernels captured", arm, B, T) or {}
            c_txt = fmt(cap.get("ms"), ".1f") if cap.get("ms") is not None else cap.get("note", "-")
            c_speed = f"{r_ms / cap['ms']:.2f}x" if cap.get("ms") and r_ms else "-"
            lines.append(f"| {B} x {T} | {arm} | {o_txt} | {fmt(o_mem, '.2f')} | {p_txt} | "
                         f"{fmt(plain.get('peak_gib'), '.2f')} | {c_txt} | {fmt(cap.get('graph_gib'), '.2f')} | "
                         f"{r_txt} | {fmt(r_mem, '.2f')} | {speed} | {c_speed} |")
        ce, last = find("ofa_kernels", "ce", B, T), find("ofa_kernels", "ofa-fd-K1-last", B, T)
        if ce and last and ce.get("ms") and last.get("ms"):  # issue 34's targets: <= 1.15x time, <= 1.05x memory
            mem = (f"{last['peak_gib'] / ce['peak_gib']:.2f}x" if last.get("peak_gib") and ce.get("peak_gib")
                   else "-")
            lines.append(f"| {B} x {T} | ofa-fd-K1-last / ce | {last['ms'] / ce['ms']:.2f}x | {mem} | | | | | | | | |")
        ce_ref = find("authors-style", "ce", B, T)
        k4 = find("ofa_kernels", "ofa-fd-K4", B, T)
        if ce_ref and k4 and ce_ref.get("ms") and k4.get("ms"):
            lines.append(f"| {B} x {T} | ofa-fd-K4 / authors-style ce | {k4['ms'] / ce_ref['ms']:.2f}x | | | | | | | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
