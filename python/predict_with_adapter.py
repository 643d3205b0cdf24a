"""Load a saved OFA adapter into its base model and label new texts.

    python python/predict_with_adapter.py --model smollm2 --task sst2 --adapter adapter.safetensors \
        "a warm, funny film" "two hours I will not get back"
"""

from __future__ import annotations

import argparse

from ofa_kernels.fewshot import data
from ofa_kernels.fewshot import evaluate as ev
from ofa_kernels.fewshot.adapters import load_adapter
from ofa_kernels.fewshot.models import load_model


def main(argv=None) -> list[str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--task", default="sst2")
    p.add_argument("--adapter", required=True)
    p.add_argument("texts", nargs="+")
    args = p.parse_args(argv)

    model, tokenizer = load_model(args.model)
    load_adapter(model, args.adapter)  # refuses a different base model
    task = data.get_task(args.task)
    examples = [data.Example(text, 0, "argv") for text in args.texts]
    predictions = ev.evaluate(model, tokenizer, task, examples).predictions
    labels = [task.labels[i] for i in predictions]
    for text, label in zip(args.texts, labels):
        print(f"{label:>12s}  {text}")
    return labels


if __name__ == "__main__":
    main()
