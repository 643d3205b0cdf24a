"""The spread of bf16 S against fp64 S on real SmolLM2 (the basis of test_objectives.py's bf16 bound).

For each probe seed: S ("fd", the trace form) of two SST-2-style reviews from SmolLM2 in fp64 (step 2**-5
times each row's RMS) and from SmolLM2 loaded in bf16 (its bf16-safe defaults: the same step), and their
relative difference. Prints one line per seed and the mean, standard deviation and largest |difference|.

    python benchmarks/bf16_s_spread.py --seeds 30 --probes 2
"""

from __future__ import annotations

import argparse
import statistics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument("--probes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import torch

    from ofa_kernels.fewshot import objectives
    from ofa_kernels.fewshot.models import load_smollm2

    torch.set_num_threads(args.threads)
    model, tokenizer = load_smollm2(torch.float32, "cpu")
    model = model.double()
    bf16, _ = load_smollm2(torch.bfloat16, "cpu")
    texts = ["Review: a gorgeous, witty, seductive movie.\nSentiment:",
             "Review: the plot is nothing but boilerplate cliches.\nSentiment:"]
    batch = dict(tokenizer(texts, return_tensors="pt", padding=True))
    errors = []
    for seed in range(args.seeds):
        with torch.no_grad():
            ref = objectives.sharpness(model, batch, estimator="fd", eps=2.0**-5, eps_scale="rms", seed=seed,
                                       num_probes=args.probes)
            got = objectives.sharpness(bf16, batch, estimator="fd", seed=seed, num_probes=args.probes)
        errors.append(float((got - ref) / ref))
        print(f"seed {seed}: S fp64 {float(ref):.2f}, bf16 {float(got):.2f}, relative difference {errors[-1]:+.4f}",
              flush=True)
    print(f"{len(errors)} seeds, {args.probes} probes: mean {statistics.mean(errors):+.4f}, standard deviation "
          f"{statistics.pstdev(errors):.4f}, largest |difference| {max(map(abs, errors)):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
