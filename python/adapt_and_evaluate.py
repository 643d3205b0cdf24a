"""Adapt a causal LM's norm weights to a task with OFA, evaluate it, and save the adapter.

    python python/adapt_and_evaluate.py --model smollm2 --task sst2 --data-dir ../shared/data
"""

from __future__ import annotations

import argparse

import ofa_kernels
from ofa_kernels.fewshot import data
from ofa_kernels.fewshot import evaluate as ev
from ofa_kernels.fewshot.adapters import save_adapter
from ofa_kernels.fewshot.models import load_model
from ofa_kernels.fewshot.trainer import AdaptOptions, adapt


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--task", default="sst2")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--test-size", type=int, default=200)
    p.add_argument("--adapter", default="adapter.safetensors")
    args = p.parse_args(argv)

    model, tokenizer = load_model(args.model)
    dataset = data.load_task(args.task, args.data_dir)
    test = data.test_subset(dataset, args.test_size)
    before = ev.evaluate(model, tokenizer, dataset.task, test)

    ofa_kernels.patch_model(model)  # fused, twice-differentiable norms (adapt would patch them too)
    result = adapt(model, tokenizer, dataset, AdaptOptions(arm="ofa", shots=args.shots, epochs=args.epochs))
    after = ev.evaluate(model, tokenizer, dataset.task, test)

    save_adapter(result, args.adapter, base_model=args.model, task=args.task)
    print(f"{args.task}: zero-shot {before.accuracy:.3f} -> OFA {after.accuracy:.3f} "
          f"(loss {result.losses[0]['loss']:.3f} -> {result.losses[-1]['loss']:.3f}); adapter: {args.adapter}")


if __name__ == "__main__":
    main()
